"""BiDR's bi-granular retrieval: light PQ codes in memory pick candidates, heavy dense vectors
memory-mapped from a store file re-rank them exactly.

Store file: a 64-byte header (magic b"HOTOPSST", uint32 version, uint32 dtype code, int64 rows,
int64 dim, uint32 CRC-32 of those fields) then the rows, row i = the vector with id i."""

from __future__ import annotations

import struct
import zlib
from typing import Optional, Union

import numpy as np
import torch

from hotops import _backend
from hotops.ann import _arrays, _io
from hotops.ann._mutable import as_id_list
from hotops.ann._pq import rerank
from hotops.ann.index import IVFPQIndex, PQIndex

STORE_MAGIC = b"HOTOPSST"
STORE_VERSION = 1
STORE_FIELDS = struct.Struct("<8sIIqq")
STORE_HEADER = 64
STORE_DTYPES = {0: np.float32, 1: np.float16}


def write_store(path, x, dtype: str = "float32") -> None:
    """Writes the dense vectors x (row i = id i) to a store file, atomically."""
    if dtype not in ("float32", "float16"):
        raise ValueError(f"store dtype must be 'float32' or 'float16', got {dtype!r}")
    a = _arrays.as_numpy(x, "x")
    if a.ndim != 2:
        raise ValueError(f"x must be a 2-d (n, dim) array, got shape {a.shape}")
    a = _arrays.as_vectors(a, "x", a.shape[1])
    top = float(np.abs(a).max()) if dtype == "float16" and a.size else 0.0
    if top > 65504.0:  # float16's largest finite value
        raise ValueError(
            f"x holds values up to {top:.3g}, beyond float16's 65504: they would be stored as inf; "
            f"write a float32 store (or scale the vectors)"
        )
    a = a.astype(dtype, copy=False)
    code = 0 if dtype == "float32" else 1
    fields = STORE_FIELDS.pack(STORE_MAGIC, STORE_VERSION, code, a.shape[0], a.shape[1])
    header = (fields + struct.pack("<I", zlib.crc32(fields))).ljust(STORE_HEADER, b"\0")

    def write(f):
        f.write(header)
        f.write(memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8)))

    _io.atomic_write(path, write)


def open_store(path) -> np.ndarray:
    """The store's rows, memory-mapped copy-on-write (read lazily, never written back). If the file
    is truncated under the mapping, the rows past its end read as zeros instead of killing the
    process; BiGranularIndex notices and raises MappedFileChangedError."""
    return _open_store(path)[0]


def _open_store(path):
    path = _io.fs_path(path)
    mapped = _io.Mapped(path)
    size, raw = mapped.file.size, mapped.bytes
    if size < STORE_HEADER:
        raise ValueError(f"{path}: truncated store header ({size} bytes)")
    head = raw[:STORE_HEADER].tobytes()
    fields = head[: STORE_FIELDS.size]
    magic, version, code, rows, dim = STORE_FIELDS.unpack(fields)
    if magic != STORE_MAGIC:
        raise ValueError(f"{path}: not a hotops vector store (magic {magic!r})")
    if version != STORE_VERSION:
        raise ValueError(f"{path}: store version {version} is not supported (expected {STORE_VERSION})")
    (crc,) = struct.unpack_from("<I", head, STORE_FIELDS.size)
    if crc != zlib.crc32(fields) or code not in STORE_DTYPES or rows < 0 or dim <= 0:
        raise ValueError(f"{path}: corrupted store header")
    dtype = np.dtype(STORE_DTYPES[code])
    want = STORE_HEADER + rows * dim * dtype.itemsize
    if size != want:
        raise ValueError(
            f"{path}: store size {size} bytes does not match {rows} x {dim} {dtype.name} "
            f"rows ({want} bytes expected)"
        )
    mapped.check("vector store")
    return raw[STORE_HEADER:].view(dtype).reshape(rows, dim), mapped


class BiGranularIndex:
    """Two-stage search: stage 1 takes the `candidates` best ids from the in-memory PQ index,
    stage 2 re-ranks them by exact distance to their dense vectors in the store file, optionally
    fused with the stage-1 score: score = exact + fusion * pq (both as lower-is-better scores).

    BiGranularIndex(coarse_index, store_path, dtype=None); dtype None reads the store's own
    ("float32" or "float16"; a value given must match it). The coarse index's ids must be row
    numbers of the store (write the store with `write_store(path, x, dtype)`).
    """

    def __init__(self, coarse_index: Union[PQIndex, IVFPQIndex], store_path, dtype: Optional[str] = None):
        if not isinstance(coarse_index, (PQIndex, IVFPQIndex)):
            raise TypeError(
                f"coarse_index must be a PQIndex or IVFPQIndex, got {type(coarse_index).__name__}"
            )
        self.coarse = coarse_index
        self.store, mapped = _open_store(store_path)
        self._mapped = [mapped]
        if dtype is not None and np.dtype(dtype) != self.store.dtype:
            raise ValueError(
                f"{store_path}: the store holds {self.store.dtype.name} vectors, {dtype} was asked"
            )
        if self.store.shape[1] != coarse_index.dim:
            raise ValueError(
                f"{store_path}: store vectors have dimension {self.store.shape[1]}, "
                f"the index has {coarse_index.dim}"
            )
        if coarse_index.ntotal and int(coarse_index.ids.max()) >= self.store.shape[0]:
            raise ValueError(
                f"{store_path}: the index holds ids up to {int(coarse_index.ids.max())}, "
                f"the store only {self.store.shape[0]} rows"
            )

    @property
    def metric(self) -> str:
        return self.coarse.metric

    @property
    def ntotal(self) -> int:
        """Vectors the index returns: those the coarse index holds (removed ones not counted)."""
        return self.coarse.ntotal

    def remove_ids(self, ids) -> int:
        """Removes these ids from the coarse index (the store file is never written); returns how
        many were removed. A removed id is never returned again; reconstruct refuses it."""
        return self.coarse.remove_ids(ids)

    def compact(self) -> int:
        """Drops the coarse index's removed rows now; returns how many."""
        return self.coarse.compact()

    def reconstruct(self, ids):
        """(n, dim) float32 exact vectors of these ids from the store (a scalar id gives (dim,)).
        KeyError names the ids the coarse index does not hold."""
        torch_out = _arrays.is_torch(ids)
        scalar = np.ndim(_arrays.as_numpy(ids, "ids") if torch_out else ids) == 0
        want = as_id_list(ids)
        index = self.coarse
        with index._lock.shared(), _io.guarded(index._mapped), _io.guarded(self._mapped, "vector store"):
            held = index._held_rows(want) >= 0
            held &= want < self.store.shape[0]
            if not held.all():
                missing = want[~held]
                raise KeyError(
                    f"ids {missing[:5].tolist()} are not held by the index ({missing.size} in all)"
                )
            out = self.store[want].astype(np.float32)
        out = out.reshape(-1) if scalar else out
        return torch.from_numpy(out) if torch_out else out

    def ram_bytes_per_vector(self) -> float:
        """Bytes per vector held in memory (the codes and ids; the store stays on disk)."""
        return self.coarse.bytes_per_vector()

    def search(
        self,
        q,
        k: int = 10,
        *,
        candidates: int = 200,
        nprobe: Optional[int] = None,
        fusion: float = 0.0,
        allow=None,
    ):
        """(distances, ids), each (nq, k), ranked by exact distance (+ fusion * PQ score)."""
        torch_out = _arrays.is_torch(q)
        k = _arrays.check_k(k)
        candidates = _arrays.check_k(candidates, "candidates")
        if candidates < k:
            raise ValueError(f"candidates ({candidates}) must be at least k ({k})")
        fusion = _backend.check_number(fusion, "fusion")
        q = _arrays.as_vectors(q, "queries", self.coarse.dim)
        extra = {"nprobe": nprobe} if isinstance(self.coarse, IVFPQIndex) else {}
        if nprobe is not None and not extra:
            raise ValueError("nprobe applies to an IVFPQIndex coarse index, this one is a PQIndex")
        with _io.guarded(self._mapped, "vector store"):  # rows read as zeros would give wrong scores
            dist, ids = self.coarse.search(q, candidates, allow=allow, **extra)
            first = np.ascontiguousarray(-dist if self.metric == "ip" else dist, dtype=np.float32)
            first[ids < 0] = 0.0  # absent candidates are skipped by the kernel; keep the scores finite
            if ids.size and int(ids.max()) >= self.store.shape[0]:
                raise ValueError(
                    f"the coarse index returned id {int(ids.max())}, the store has only "
                    f"{self.store.shape[0]} rows (ids added after the BiGranularIndex was built?)"
                )
            score, rows = rerank("BiGranularIndex.search", q, self.store, ids, k, self.metric, first, fusion)
        return _arrays.results(
            score, rows, np.arange(self.store.shape[0], dtype=np.int64), self.metric, torch_out
        )
