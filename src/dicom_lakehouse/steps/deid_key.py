"""Where the de-identification key comes from: the environment locally, a secret scope on Databricks.

The key is read once, on the driver, and handed to the executors inside the step's function; it
is never a job parameter, so it never reaches a command line, a log or the run record.
"""

from __future__ import annotations

import os

from dicom_lakehouse.dicom.deid import KEY_ENV, DeidError, Pseudonyms


def _databricks_secret(spark, scope: str, key: str) -> str | None:
    try:
        from pyspark.dbutils import DBUtils  # Databricks Runtime only
    except ImportError:
        return None
    try:
        return DBUtils(spark).secrets.get(scope=scope, key=key)
    except Exception as e:  # noqa: BLE001 - a missing scope or key, or no permission
        raise DeidError(f"cannot read the de-identification key from secret scope {scope!r}, key {key!r}: "
                        f"{type(e).__name__}. Create it with `databricks secrets put-secret {scope} {key}`, "
                        "or set " + KEY_ENV) from None


_FROM_SCOPE: dict[tuple[str, str], str] = {}


def resolve_key(conf: dict, spark=None, environ=os.environ) -> Pseudonyms:
    """The key from `DICOM_LAKEHOUSE_DEID_KEY`, else (on Databricks) from conf deid.secret_scope and
    deid.secret_key; else a DeidError that says how to provide one. A task checks the key before any
    work and uses it later: a secret scope is read once per process."""
    value = environ.get(KEY_ENV)
    dconf = conf.get("deid") or {}
    scope, name = dconf.get("secret_scope"), dconf.get("secret_key")
    if not value and spark is not None and scope and name:
        if (scope, name) not in _FROM_SCOPE:
            secret = _databricks_secret(spark, scope, name)
            if secret:
                _FROM_SCOPE[(scope, name)] = secret
        value = _FROM_SCOPE.get((scope, name))
    if not value:
        where = f" or secret scope {scope!r} key {name!r}" if scope and name else ""
        raise DeidError(f"deid=basic needs a key and none was found: set {KEY_ENV}{where}. Make one with "
                        "`python -c \"import secrets; print(secrets.token_hex(32))\"` and keep it safe: "
                        "the same key gives the same pseudonyms on every run.")
    return Pseudonyms(value)
