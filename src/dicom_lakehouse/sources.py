"""Opening a catalogued file for reading, wherever it lives: local, Databricks FUSE, a zip member.

The one place that turns a `path` URI into a seekable binary stream, so that the
per-file readers never load a whole file into memory.
"""

from __future__ import annotations

import io
import os
import zipfile
from contextlib import contextmanager
from functools import lru_cache

from .params import is_remote_path, local_path_of
from .paths import contained

ARCHIVE_SEP = "!/"


def split_member(path: str) -> tuple[str, str | None]:
    """`a.zip!/dir/m.dcm` -> (`a.zip`, `dir/m.dcm`); a plain path -> (path, None).

    A `!/` in a path means a zip member only where the part before it is a real zip archive, told
    by its bytes: a folder may be named `scans!` and hold ordinary files."""
    start = 0
    while (i := path.find(ARCHIVE_SEP, start)) != -1:
        if _is_zip_archive(path[:i]):
            return path[:i], path[i + len(ARCHIVE_SEP):]
        start = i + 1
    return path, None


@lru_cache(maxsize=4096)
def _is_zip_archive(path: str) -> bool:
    try:
        if not is_remote_path(path) or path.startswith("dbfs:/"):
            local = local_path_of(path)
            return os.path.isfile(local) and zipfile.is_zipfile(local)
        with _open_fs(path) as f:
            return zipfile.is_zipfile(f)
    except (OSError, ValueError):
        return False


def _open_fs(path: str):
    if is_remote_path(path) and not path.startswith("dbfs:/"):
        try:
            import fsspec  # optional: s3fs/adlfs/gcsfs give executors object-store access
        except ImportError as e:
            raise OSError(
                f"cannot open {path}: reading object storage from Python needs fsspec with its backend "
                "(pip install s3fs / adlfs / gcsfs), or a mounted path such as /Volumes or /dbfs"
            ) from e
        return fsspec.open(path, "rb").open()
    return open(local_path_of(path), "rb", buffering=64 * 1024)


@contextmanager
def open_source(path: str):
    """Yield a seekable binary stream for a file URI or a zip member."""
    archive, member = split_member(path)
    if member is None:
        f = _open_fs(path)
        try:
            yield f
        finally:
            f.close()
        return
    outer = _open_fs(archive)
    try:
        with zipfile.ZipFile(outer) as zf:
            info = zf.getinfo(member)
            with zf.open(info) as m:
                # ZipExtFile is seekable but re-inflates on backward seeks; DICOM headers are small,
                # so members up to 64 MiB are buffered and larger ones are streamed.
                if info.file_size <= 64 * 1024 * 1024:
                    yield io.BytesIO(m.read(info.file_size + 1)[: info.file_size])
                else:
                    yield m
    finally:
        outer.close()


def write_file(path: str, data: bytes, root: str) -> None:
    """Write a whole file under `root`, replacing any earlier copy. Locally (and on /Volumes or /dbfs)
    through a temporary name in the same folder, so a reader or a retried task never sees half a file.

    A target that does not resolve inside `root` (a `..` part, a symlink to elsewhere) raises
    paths.UnsafePath and nothing is written: the names come from file headers, and the check here
    holds even where a caller's own check of them was missed."""
    contained(root, path)
    if is_remote_path(path) and not path.startswith("dbfs:/"):
        try:
            import fsspec
        except ImportError as e:
            raise OSError(f"cannot write {path}: writing object storage from Python needs fsspec with "
                          "its backend (s3fs / adlfs / gcsfs), or a mounted path such as /Volumes") from e
        with fsspec.open(path, "wb", auto_mkdir=True) as f:
            f.write(data)
        return
    local = local_path_of(path)
    os.makedirs(os.path.dirname(local), exist_ok=True)
    contained(root, path)  # again: a folder made meanwhile may be a symlink
    tmp = f"{local}.{os.getpid()}.tmp"
    try:
        # O_NOFOLLOW: a symlink planted at the temporary name is not followed.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o666)
        with open(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, local)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
