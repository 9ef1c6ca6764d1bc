"""Opening a catalogued file for reading, wherever it lives: local, Databricks FUSE, a zip member.

The one place that turns a `path` URI into a seekable binary stream, so that the
per-file readers never load a whole file into memory.
"""

from __future__ import annotations

import io
import os
import struct
import zipfile
import zlib
from contextlib import contextmanager
from functools import lru_cache

from dicom_lakehouse.files.paths import contained, is_object_store, local_path_of

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
        if not is_object_store(path):
            local = local_path_of(path)
            return os.path.isfile(local) and zipfile.is_zipfile(local)
        with open_fs(path) as f:
            return zipfile.is_zipfile(f)
    except (OSError, ValueError):
        return False


def open_fs(path: str):
    if is_object_store(path):
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
        f = open_fs(path)
        try:
            yield f
        finally:
            f.close()
        return
    outer = open_fs(archive)
    try:
        with zipfile.ZipFile(outer) as zf:
            info = zf.getinfo(member)
            if info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x1:
                yield _StoredMember(outer, info)  # outer is buffered already
                return
            with zf.open(info) as m:
                # A compressed member: ZipExtFile is seekable but re-inflates on backward seeks; DICOM
                # headers are small, so members up to 64 MiB are buffered and larger ones are streamed.
                if info.file_size <= 64 * 1024 * 1024:
                    yield io.BytesIO(m.read(info.file_size + 1)[: info.file_size])
                else:
                    yield m
    finally:
        outer.close()


class _StoredMember(io.RawIOBase):
    """A stored (uncompressed) zip member read in place in its archive: seeks cost nothing and no
    member, whatever its size, is copied into memory (a worker reads one frame of a 600 MB multi-frame
    member). A member read from its start to its end is checked against its CRC, as zipfile does."""

    def __init__(self, f, info: zipfile.ZipInfo):
        super().__init__()
        f.seek(info.header_offset)
        head = f.read(zipfile.sizeFileHeader)
        if len(head) != zipfile.sizeFileHeader or head[:4] != zipfile.stringFileHeader:
            raise zipfile.BadZipFile("bad local file header of a zip member")
        name_len, extra_len = struct.unpack("<HH", head[26:30])
        self._f, self._size, self._crc_want = f, info.file_size, info.CRC
        self._start = info.header_offset + zipfile.sizeFileHeader + name_len + extra_len
        self._pos = self._crc_pos = 0
        self._crc = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position in a zip member")
        self._pos = base + offset
        if self._pos == 0:  # a read from the start again (a header sniffed first) checks the CRC anew
            self._crc = self._crc_pos = 0
        return self._pos

    def readinto(self, b) -> int:
        n = min(len(b), self._size - self._pos)
        if n <= 0:
            return 0
        self._f.seek(self._start + self._pos)
        view = memoryview(b)[:n]
        got = self._f.readinto(view)
        if not got:
            raise EOFError("zip member ends before its declared size")
        if self._pos == self._crc_pos:  # sequential from the start: keep the CRC going
            self._crc = zlib.crc32(view[:got], self._crc)
            self._crc_pos += got
            if self._crc_pos == self._size and self._crc != self._crc_want:
                raise zipfile.BadZipFile("bad CRC-32 of a zip member")
        self._pos += got
        return got


def write_file(path: str, data: bytes, root: str) -> None:
    """Write a whole file under `root`, replacing any earlier copy. Locally (and on /Volumes or /dbfs)
    through a temporary name in the same folder, so a reader or a retried task never sees half a file.

    A target that does not resolve inside `root` (a `..` part, a symlink to elsewhere) raises
    paths.UnsafePath and nothing is written: the names come from file headers, and the check here
    holds even where a caller's own check of them was missed."""
    contained(root, path)
    if is_object_store(path):
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


def remove_file(path: str, root: str) -> bool:
    """Remove a file this job wrote under `root` (a de-identified copy whose source is gone); False if
    it was not there. Refuses (paths.UnsafePath) a target outside `root`, as write_file does."""
    contained(root, path)
    if is_object_store(path):
        import fsspec

        fs, key = fsspec.core.url_to_fs(path)
        if not fs.exists(key):
            return False
        fs.rm_file(key)
        return True
    try:
        os.unlink(local_path_of(path))
    except FileNotFoundError:
        return False
    return True
