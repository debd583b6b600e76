"""Vectors to add, read in chunks of rows: an in-memory array or tensor, an np.memmap, or the path
of a .npy file (mapped by hotops, so that a file truncated while it is read raises
MappedFileChangedError instead of killing the process with SIGBUS). Only one chunk is converted to
float32 at a time, and the pages of a memory-mapped source are released once their chunk is
encoded, so adding from a file larger than RAM holds one chunk of it (plus the codes) in memory."""

from __future__ import annotations

import mmap
import os
from typing import Iterator, Tuple

import numpy as np

from hotops.ann import _arrays, _io

CHUNK_ROWS = 1 << 16


def open_source(x, dim: int, name: str = "x") -> np.ndarray:
    """A 2-d (n, dim) floating-point array (not yet converted or checked for finiteness)."""
    if isinstance(x, (str, bytes, os.PathLike)):
        path = _io.fs_path(x, name)
        try:
            header = np.load(path, mmap_mode="r", allow_pickle=False)  # shape, dtype and offset only
            shape, dtype, offset = header.shape, header.dtype, header.offset
            order = "F" if header.flags.f_contiguous and not header.flags.c_contiguous else "C"
            del header
            mapped = _io.Mapped(path)
            x = np.ndarray(shape, dtype, buffer=mapped.file, offset=offset, order=order).view(_OwnMapped)
        except (ValueError, OSError, TypeError, AttributeError) as exc:
            raise ValueError(f"{name}: {path} is not a readable .npy file ({exc})") from None
    return _arrays.float_rows(_arrays.as_numpy(x, name), name, dim)


class _OwnMapped(np.ndarray):
    """A .npy that open_source mapped itself (not a view of an index's or store's live mapping,
    whose pages must stay and whose changes have their own errors)."""


def _root_map(a: np.ndarray):
    """The mapping under a: the _C.MappedFile of a .npy opened here, or the mmap.mmap under an
    np.memmap opened read-only or shared (never copy-on-write: dropping its pages would lose the
    caller's private changes); else None."""
    base = a
    if isinstance(a, _OwnMapped):
        while isinstance(base, np.ndarray):
            base = base.base
        return base
    if not isinstance(a, np.memmap) or getattr(a, "mode", "c") not in ("r", "r+", "readonly", "readwrite"):
        return None
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None)
    return base


def _release(mm, chunk: np.ndarray) -> None:
    """Drops the resident pages of a read chunk of a file mapping (they stay in the page cache)."""
    try:
        start = np.frombuffer(mm, np.uint8).ctypes.data
    except (TypeError, ValueError):
        return
    lo = chunk.ctypes.data - start
    if not isinstance(mm, mmap.mmap):
        return mm.release(lo, chunk.nbytes)
    hi = lo + chunk.nbytes
    lo -= lo % mmap.PAGESIZE
    hi = min(hi - hi % mmap.PAGESIZE, len(mm))
    if hi > lo:
        try:
            mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
        except (OSError, ValueError, AttributeError):
            pass


def chunks(
    a: np.ndarray, dim: int, rows: int = CHUNK_ROWS, name: str = "x"
) -> Iterator[Tuple[int, np.ndarray]]:
    """(first row, (r, dim) float32 C-contiguous finite chunk) over the rows of a; errors name the
    row in the whole source."""
    mm = _root_map(a)
    for b in range(0, a.shape[0], rows):
        raw = a[b : b + rows]
        try:
            chunk = _arrays.as_vectors(raw, name, dim)
        except ValueError as exc:
            raise ValueError(f"{exc} (in the chunk of rows {b} .. {b + raw.shape[0] - 1})") from None
        if mm is not None:  # copy out of the mapping (if not converted already), then drop its pages
            if np.may_share_memory(chunk, raw):
                chunk = np.array(chunk)
            if not isinstance(mm, mmap.mmap):  # hotops' own mapping: were zeros read for a cut file?
                why = mm.changed()
                if why:
                    raise _io.MappedFileChangedError(
                        f"{name}: the .npy file changed while it was read: {why}"
                    )
            _release(mm, raw)
        yield b, chunk
