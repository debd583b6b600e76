"""The index file format, atomic writes, and guarded memory maps. Layout (little-endian):

    0   magic  b"HOTOPSAN"
    8   uint32 version (1)
    12  uint32 length of the metadata JSON
    16  uint32 CRC-32 of the metadata JSON
    20  the metadata JSON: kind, parameters, file size, and per array dtype, shape, offset, CRC-32
        arrays follow, each at a 64-byte aligned offset

Writes go to a temporary file of a unique name in the target's folder, which is fsync'ed and
renamed over the target (atomic on POSIX): concurrent writers to one path never share a temporary
file, the last rename wins, and the path always holds a complete file. Loads validate every field
and every checksum before building an index. mmap=True maps the file copy-on-write through
`_C.MappedFile`: pages are read lazily and never written back, and if the file is truncated under
the mapping the pages past its end read as zeros instead of killing the process with SIGBUS;
`check_mapped` then raises MappedFileChangedError on the next use."""

from __future__ import annotations

import json
import os
import secrets
import struct
import threading
import zlib
from typing import Callable, Optional

import numpy as np

from hotops import _backend

MAGIC = b"HOTOPSAN"
VERSION = 1
HEADER = struct.Struct("<8sIII")
ALIGN = 64
DTYPES = ("float32", "float16", "int64", "uint8")
CRC_CHUNK = 1 << 24


class MappedFileChangedError(OSError, ValueError):
    """A memory-mapped index or vector store was truncated, resized or rewritten in place after it
    was mapped: results computed from it would be wrong, so the call raises instead. Load the file
    again (once it is intact). An OSError (the file changed under us) and a ValueError (like every
    other unusable index file)."""


def fs_path(path, name: str = "path") -> str:
    """str, bytes or os.PathLike -> str (undecodable bytes survive through surrogateescape)."""
    try:
        return os.fsdecode(os.fspath(path))
    except TypeError:
        raise TypeError(
            f"{name} must be a str, bytes or os.PathLike path, got {type(path).__name__}"
        ) from None


def _crc(a: np.ndarray) -> int:
    flat = a.reshape(-1).view(np.uint8)
    crc = 0
    for b in range(0, flat.size, CRC_CHUNK):
        crc = zlib.crc32(flat[b : b + CRC_CHUNK], crc)
    return crc


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def atomic_write(path, write: Callable, before_replace: Optional[Callable] = None) -> None:
    """write(file) into a new temporary file beside `path`, fsync, then rename it over `path`
    (and fsync the folder). before_replace() may still refuse (raise) before the rename. The
    temporary name is unique per call (pid, thread, random), so concurrent writers never share one."""
    path = fs_path(path)
    folder, base = os.path.split(path)
    for _ in range(100):
        tmp = os.path.join(
            folder, f".{base}.tmp-{os.getpid()}-{threading.get_ident()}-{secrets.token_hex(4)}"
        )
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"{path}: could not create a unique temporary file beside it")
    try:
        with open(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(folder or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


class Mapped:
    """A file mapped through _C.MappedFile, with the path it was opened under."""

    def __init__(self, path: str):
        self.path = path
        self.file = _backend.ext().MappedFile(os.fsencode(path))
        self.bytes = np.frombuffer(self.file, dtype=np.uint8) if self.file.size else np.empty(0, np.uint8)

    def check(self, what: str = "index") -> None:
        why = self.file.changed()
        if why:
            raise MappedFileChangedError(
                f"{self.path}: the memory-mapped {what} file changed under the mapping: {why}. "
                f"Results from it would be wrong; load it again from an intact file"
            )


def check_mapped(mapped, what: str = "index") -> None:
    for m in mapped:
        m.check(what)


class guarded:
    """Checks the mappings before and after the block, and when the block fails (an error raised
    by code that read zero pages, e.g. list offsets that no longer add up), so that the error
    says the file changed instead. Costs nothing for an index that maps no file."""

    __slots__ = ("mapped", "what")

    def __init__(self, mapped, what: str = "index"):
        self.mapped, self.what = mapped, what

    def __enter__(self):
        check_mapped(self.mapped, self.what)
        return self

    def __exit__(self, *exc):
        check_mapped(self.mapped, self.what)  # on failure too: raises from the original error
        return False


def save(path, kind: str, params: dict, arrays: dict, before_replace: Optional[Callable] = None) -> None:
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    # Offsets depend on the metadata's length, which depends on the offsets: fix the JSON length
    # by reserving room for the offsets first (two passes suffice: digits only grow).
    meta = {"kind": kind, "params": params, "file_size": 0, "arrays": {}}
    for _ in range(3):
        pos = _aligned(HEADER.size + len(json.dumps(meta).encode()) + 64)
        entries = {}
        for name, a in arrays.items():
            entries[name] = {"dtype": str(a.dtype), "shape": list(a.shape), "offset": pos, "crc32": _crc(a)}
            pos = _aligned(pos + a.nbytes)
        meta = {"kind": kind, "params": params, "file_size": pos, "arrays": entries}
    blob = json.dumps(meta).encode()
    first = min((e["offset"] for e in meta["arrays"].values()), default=meta["file_size"])
    assert HEADER.size + len(blob) <= first, "metadata outgrew its reserved room"

    def write(f):
        f.write(HEADER.pack(MAGIC, VERSION, len(blob), zlib.crc32(blob)))
        f.write(blob)
        for name, a in arrays.items():
            f.seek(meta["arrays"][name]["offset"])
            f.write(a.tobytes() if a.nbytes < CRC_CHUNK else memoryview(a.reshape(-1).view(np.uint8)))
        f.truncate(meta["file_size"])

    atomic_write(path, write, before_replace)


def _fail(path, what: str):
    raise ValueError(f"{path}: {what}")


def load(path, kind: str, mmap: bool = False):
    """(params, arrays, mapped) of an index file of this kind: mapped is [Mapped] with mmap=True,
    else []. ValueError on anything malformed."""
    path = fs_path(path)
    if mmap:
        mapped = Mapped(path)
        raw, mapped = mapped.bytes, [mapped]
    else:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw = np.empty(size, dtype=np.uint8)
            got = f.readinto(memoryview(raw)) if size else 0
        if got != size:
            _fail(path, f"truncated while being read ({got} of {size} bytes)")
        mapped = []
    size = raw.size
    if size < HEADER.size:
        _fail(path, f"truncated: {size} bytes is shorter than the {HEADER.size}-byte header")
    magic, version, meta_len, meta_crc = HEADER.unpack(raw[: HEADER.size].tobytes())
    if magic != MAGIC:
        _fail(path, f"not a hotops index file (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        _fail(path, f"format version {version} is not supported (this hotops reads version {VERSION})")
    if HEADER.size + meta_len > size:
        _fail(path, "truncated inside the metadata")
    blob = raw[HEADER.size : HEADER.size + meta_len].tobytes()
    if zlib.crc32(blob) != meta_crc:
        _fail(path, "metadata checksum mismatch (the file is corrupted)")
    try:
        meta = json.loads(blob)
        file_kind, params, file_size, entries = (
            meta["kind"],
            meta["params"],
            meta["file_size"],
            meta["arrays"],
        )
        if not isinstance(params, dict) or not isinstance(entries, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        _fail(path, "unreadable metadata")
    if file_kind != kind:
        _fail(path, f"holds a {file_kind}, not a {kind}")
    if file_size != size:
        _fail(path, f"size {size} bytes, expected {file_size} (truncated or extended)")
    arrays = {}
    for name, e in entries.items():
        try:
            dtype, shape, offset, crc = (
                np.dtype(e["dtype"]),
                tuple(int(s) for s in e["shape"]),
                int(e["offset"]),
                int(e["crc32"]),
            )
        except (KeyError, TypeError, ValueError):
            _fail(path, f"unreadable entry for array {name!r}")
        if dtype.name not in DTYPES or any(s < 0 for s in shape) or offset % ALIGN:
            _fail(path, f"array {name!r} has an invalid dtype, shape or offset")
        nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
        if offset < HEADER.size + meta_len or offset + nbytes > size:
            _fail(path, f"array {name!r} lies outside the file")
        a = raw[offset : offset + nbytes].view(dtype).reshape(shape)
        if _crc(a) != crc:
            check_mapped(mapped)  # a checksum over zero pages: say that the file changed
            _fail(path, f"array {name!r} checksum mismatch (the file is corrupted)")
        arrays[name] = a
    check_mapped(mapped)
    return params, arrays, mapped
