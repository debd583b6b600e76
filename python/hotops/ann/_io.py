"""The index file format. Layout (little-endian):

    0   magic  b"HOTOPSAN"
    8   uint32 version (1)
    12  uint32 length of the metadata JSON
    16  uint32 CRC-32 of the metadata JSON
    20  the metadata JSON: kind, parameters, file size, and per array dtype, shape, offset, CRC-32
        arrays follow, each at a 64-byte aligned offset

Writes go to a temporary file in the same folder that is renamed over the target (atomic on
POSIX). Loads validate every field and every checksum before building an index; mmap=True maps
the arrays copy-on-write (their pages are read lazily and never written back)."""
from __future__ import annotations

import json
import os
import struct
import zlib

import numpy as np

MAGIC = b"HOTOPSAN"
VERSION = 1
HEADER = struct.Struct("<8sIII")
ALIGN = 64
DTYPES = ("float32", "float16", "int64", "uint8")
CRC_CHUNK = 1 << 24


def _crc(a: np.ndarray) -> int:
    flat = a.reshape(-1).view(np.uint8)
    crc = 0
    for b in range(0, flat.size, CRC_CHUNK):
        crc = zlib.crc32(flat[b:b + CRC_CHUNK], crc)
    return crc


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def save(path, kind: str, params: dict, arrays: dict) -> None:
    path = os.fspath(path)
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
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(HEADER.pack(MAGIC, VERSION, len(blob), zlib.crc32(blob)))
            f.write(blob)
            for name, a in arrays.items():
                f.seek(meta["arrays"][name]["offset"])
                f.write(a.tobytes() if a.nbytes < CRC_CHUNK else memoryview(a.reshape(-1).view(np.uint8)))
            f.truncate(meta["file_size"])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _fail(path, what: str):
    raise ValueError(f"{path}: {what}")


def load(path, kind: str, mmap: bool = False):
    """(params, arrays) of an index file of this kind; ValueError on anything malformed."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(HEADER.size)
        if len(head) < HEADER.size:
            _fail(path, f"truncated: {size} bytes is shorter than the {HEADER.size}-byte header")
        magic, version, meta_len, meta_crc = HEADER.unpack(head)
        if magic != MAGIC:
            _fail(path, f"not a hotops index file (magic {magic!r}, expected {MAGIC!r})")
        if version != VERSION:
            _fail(path, f"format version {version} is not supported (this hotops reads version {VERSION})")
        if HEADER.size + meta_len > size:
            _fail(path, "truncated inside the metadata")
        blob = f.read(meta_len)
    if zlib.crc32(blob) != meta_crc:
        _fail(path, "metadata checksum mismatch (the file is corrupted)")
    try:
        meta = json.loads(blob)
        file_kind, params, file_size, entries = meta["kind"], meta["params"], meta["file_size"], meta["arrays"]
    except (ValueError, KeyError, TypeError):
        _fail(path, "unreadable metadata")
    if file_kind != kind:
        _fail(path, f"holds a {file_kind}, not a {kind}")
    if file_size != size:
        _fail(path, f"size {size} bytes, expected {file_size} (truncated or extended)")
    arrays = {}
    for name, e in entries.items():
        try:
            dtype, shape, offset, crc = np.dtype(e["dtype"]), tuple(int(s) for s in e["shape"]), int(e["offset"]), int(e["crc32"])
        except (KeyError, TypeError, ValueError):
            _fail(path, f"unreadable entry for array {name!r}")
        if dtype.name not in DTYPES or any(s < 0 for s in shape):
            _fail(path, f"array {name!r} has an invalid dtype or shape")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if offset < HEADER.size + meta_len or offset + nbytes > size:
            _fail(path, f"array {name!r} lies outside the file")
        if mmap and nbytes:
            a = np.memmap(path, dtype=dtype, mode="c", offset=offset, shape=shape)
        else:
            a = np.fromfile(path, dtype=dtype, count=int(np.prod(shape)), offset=offset).reshape(shape)
        if _crc(a) != crc:
            _fail(path, f"array {name!r} checksum mismatch (the file is corrupted)")
        arrays[name] = a
    return params, arrays
