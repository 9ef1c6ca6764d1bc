"""What kind of path a string is (local, `file:`, an object store: answered here only), and output
paths that stay inside their root, for every writer (de-identified copies, sample data, OHIF's
archive, a receiver's landing folder).

Values from DICOM headers (UIDs, names) end up in file names, and a header can hold anything: a
"UID" such as `1.2.840.10008.1/../../tmp/x` would climb out of the output folder. So each value is
checked before it becomes a name (`check_uid`, `check_name`), and each target is checked after it
is built (`contained`), symlinks resolved, so one missed check is not enough to write elsewhere.
"""

from __future__ import annotations

import os
import posixpath
import re

REMOTE_SCHEMES = ("s3://", "s3a://", "s3n://", "abfss://", "abfs://", "gs://", "dbfs:/", "wasbs://", "hdfs://")


def is_remote_path(path: str) -> bool:
    """An object-store or Hadoop URI: read through fsspec or Spark, never with `open`."""
    return path.startswith(REMOTE_SCHEMES)


def local_path_of(path: str) -> str:
    """The OS path of a `file:` URI or plain path (and of Databricks FUSE paths)."""
    if path.startswith("file://"):
        return path[len("file://") :] or "/"
    if path.startswith("file:"):
        return path[len("file:") :]
    if path.startswith("dbfs:/"):
        return "/dbfs/" + path[len("dbfs:/") :]
    return path


def is_object_store(path: str) -> bool:
    """A remote path with no local mount: bytes come through fsspec, and there are no symlinks.
    `dbfs:/` is remote to Spark but mounted at /dbfs on Databricks, so it is not one."""
    return is_remote_path(path) and not path.startswith("dbfs:/")


def is_local_file(path: str) -> bool:
    """A plain path or a `file:` URI: one `os.stat` away."""
    return "://" not in path and path.startswith(("file:", "/"))


def as_uri(path: str) -> str:
    """A URI for `path`: plain local paths become `file:` URIs, as the catalog names its files."""
    return path if "://" in path or path.startswith(("file:", "dbfs:")) else f"file:{path}"


# PS3.5 9.1: components of digits, no leading zero unless the component is 0; at most 64 characters.
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
UID_MAX = 64
# A folder or file name: no separators, no control characters, not . or .. (checked below).
_NAME = re.compile(r"[A-Za-z0-9._+=@-]{1,255}")


class UnsafePath(ValueError):
    """A target that would not land inside its root; the message never quotes the value."""


def is_uid(value) -> bool:
    """True for a value that follows the DICOM UID grammar (PS3.5 9.1)."""
    return isinstance(value, str) and len(value) <= UID_MAX and _UID.fullmatch(value) is not None


def check_uid(value, what: str = "UID") -> str:
    if not is_uid(value):
        raise UnsafePath(f"{what} is not a valid DICOM UID (digits and dots, no leading zeros, at most "
                         f"{UID_MAX} characters): it cannot name a file")
    return value


def check_name(value, what: str = "name") -> str:
    """One path component: letters, digits and ._+=@-, never . or .. (no separators of any OS)."""
    if not isinstance(value, str) or not _NAME.fullmatch(value) or value in (".", ".."):
        raise UnsafePath(f"{what} is not a safe file name: it cannot name a file")
    return value


def _inside(root: str, target: str) -> bool:
    return target == root or target.startswith(root.rstrip("/") + "/")


def contained(root: str, target: str) -> str:
    """`target` if it resolves inside `root` (both URIs or paths), else UnsafePath.

    Local paths (file:, dbfs:/, /Volumes) are compared after resolving symlinks, so a link inside the
    root that points elsewhere is refused too. Object stores have no symlinks: their keys are
    compared as written, and any `.` or `..` part is refused (some clients normalise it away)."""
    if is_object_store(target):
        rest = target[len(root):] if target.startswith(root) else None
        if rest is None or not rest.startswith("/") and not root.endswith("/") \
                or any(p in (".", "..") for p in rest.split("/")):
            raise UnsafePath("the target is not inside the output folder")
        return target
    r = os.path.realpath(local_path_of(root))
    t = os.path.realpath(local_path_of(target))
    if not _inside(r, t) or is_object_store(root):
        raise UnsafePath("the target is not inside the output folder")
    return target


def join(root: str, *parts: str) -> str:
    """root/part/part..., each part one checked name, the result checked by `contained`."""
    for p in parts:
        check_name(p)
    return contained(root, posixpath.join(root, *parts))
