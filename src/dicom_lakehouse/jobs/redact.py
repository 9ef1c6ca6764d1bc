"""Secrets masked by value, whatever their source.

Masking by variable name misses a token read from a profile file, a client secret under another
variable, or an OAuth access token fetched at run time. The deploy path registers every value
that databricks-sdk's resolved configuration marks sensitive, and the bearer value it sends, and
masks them in all it prints.
"""

from __future__ import annotations

import json
import logging
import os

log = logging.getLogger(__name__)
MASK = "***"
MIN_LENGTH = 6  # shorter values would mask ordinary words


def _leaves(value: str) -> list[str]:
    """A JSON credential (GOOGLE_CREDENTIALS) also leaks piecewise: its private key, its key id."""
    try:
        doc = json.loads(value)
    except ValueError:
        return []
    out, todo = [], [doc]
    while todo:
        x = todo.pop()
        if isinstance(x, dict):
            todo.extend(x.values())
        elif isinstance(x, list):
            todo.extend(x)
        elif isinstance(x, str) and len(x) >= 16:
            out.append(x)
    return out


class Redactor:
    def __init__(self):
        self._values: set[str] = set()

    def add(self, *values) -> None:
        for v in values:
            if isinstance(v, str) and len(v.strip()) >= MIN_LENGTH:
                self._values.update({v, v.strip(), *_leaves(v)})

    def __call__(self, text) -> str:
        text = str(text)
        for v in sorted(self._values, key=len, reverse=True):
            text = text.replace(v, MASK)
        return text


def sensitive_env_names() -> list[str]:
    from databricks.sdk.config import Config

    return [a.env for a in Config.attributes() if a.sensitive and a.env]


def sdk_secrets(config) -> list[str]:
    """Every sensitive value of a resolved databricks-sdk Config (environment, profile file or any
    other source), and the credential in the headers it authenticates with."""
    from databricks.sdk.config import Config

    values = [getattr(config, a.name, None) for a in Config.attributes() if a.sensitive]
    try:
        for header, value in (config.authenticate() or {}).items():
            if header.lower() == "authorization" and isinstance(value, str):
                values.append(value.split(" ", 1)[-1])
    except Exception as e:  # noqa: BLE001 - a login that cannot authenticate now is reported elsewhere
        log.debug("no bearer value to mask: %s", type(e).__name__)
    return [v for v in values if isinstance(v, str)]


def from_environment() -> Redactor:
    r = Redactor()
    r.add(*(os.environ.get(name) for name in sensitive_env_names()))
    return r
