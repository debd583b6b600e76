"""Changing an index in place, as faiss users expect: remove_ids, re-adding an id replaces its
vector, reconstruct, and compaction.

A removal only marks rows dead (a per-row byte the scan kernels test with the allow-list), so it
costs one pass over the ids and never touches the codes: on an index loaded with mmap=True the file
stays untouched (the marks live in memory). Dead rows are dropped by compaction, which rewrites the
codes (in memory: a mapped index is then copied out of its file) when dead rows pass
`compact_fraction` of the rows, or on compact(); save() writes the live rows only."""

from __future__ import annotations

from typing import Optional

import numpy as np

from hotops.ann import _arrays, _io

COMPACT_FRACTION = 0.25  # compact automatically once this share of the rows is dead


def as_id_list(ids, name: str = "ids") -> np.ndarray:
    """Any integer ids (a scalar, list, NumPy array or tensor) as a flat int64 array."""
    a = (
        _arrays.as_numpy(ids, name)
        if not isinstance(ids, (int, np.integer, list, tuple))
        else np.asarray(ids)
    )
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{name} have dtype {a.dtype}; expected integers (int64)")
    if a.dtype.kind == "u" and a.size:
        a = a[a <= _arrays.INT64_MAX]  # cannot be held
    return a.reshape(-1).astype(np.int64, copy=False)


class Mutable:
    """Mixed into the product-quantized indexes (which set _live = None, _ndead = 0)."""

    compact_fraction: float = COMPACT_FRACTION

    @property
    def ntotal(self) -> int:
        """Vectors held (removed ones not counted)."""
        return int(self.codes.shape[0]) - self._ndead

    @property
    def ndeleted(self) -> int:
        """Removed rows still taking room (until compaction)."""
        return self._ndead

    def _live_ids(self) -> np.ndarray:
        """The ids of the rows not removed (each once: add and remove keep live ids unique)."""
        return self.ids if self._live is None else self.ids[self._live.view(np.bool_)]

    def _scan_allow(self, allow) -> Optional[np.ndarray]:
        """The per-row byte mask the scan kernels test: the caller's allow-list and the live rows."""
        rows = _arrays.allow_rows(allow, self.ids)
        if self._live is None:
            return rows
        return self._live if rows is None else np.bitwise_and(rows, self._live)

    def _held_rows(self, ids: np.ndarray) -> np.ndarray:
        """The live row holding each id, -1 where none does (ids are unique among live rows)."""
        key, by, sorted_ids = getattr(self, "_id_order", (None, None, None))
        if key is None or key[0] is not self.ids or key[1] is not self._live:
            live = np.arange(self.ids.shape[0]) if self._live is None else np.flatnonzero(self._live)
            order = np.argsort(self.ids[live], kind="stable")
            by, sorted_ids = live[order], np.ascontiguousarray(self.ids[live][order])
            self._id_order = ((self.ids, self._live), by, sorted_ids)  # one store: searches share it
        if not by.size:
            return np.full(ids.shape, -1, np.int64)
        at = np.minimum(np.searchsorted(sorted_ids, ids), by.size - 1)
        return np.where(sorted_ids[at] == ids, by[at], -1)

    def _kill(self, rows: np.ndarray) -> int:
        """Marks the live rows among `rows` (a boolean mask over rows) dead; how many were live."""
        live = np.ones(self.ids.shape[0], np.uint8) if self._live is None else self._live.copy()
        hit = rows & live.view(np.bool_)
        n = int(np.count_nonzero(hit))
        if n:
            live[hit] = 0
            self._live, self._ndead = live, self._ndead + n  # a new array: caches key on identity
        return n

    def _displace(self, ids: np.ndarray) -> None:
        """Before adding `ids`: the rows already holding them die (re-adding replaces)."""
        if ids.size and self.ids.size and int(ids.min()) <= int(self.ids.max()):
            self._kill(np.isin(self.ids, ids))

    @staticmethod
    def _last_of_each(ids: np.ndarray) -> Optional[np.ndarray]:
        """Positions keeping the last occurrence of each id in one batch, or None if all differ."""
        if ids.size < 2:
            return None
        unique, last = np.unique(ids[::-1], return_index=True)
        return None if unique.size == ids.size else np.sort(ids.size - 1 - last)

    def remove_ids(self, ids) -> int:
        """Removes the vectors with these ids (ids not held are ignored); returns how many were
        removed. A removed id is never returned by search again and ntotal drops at once; the
        room is reclaimed by compaction (automatic past compact_fraction dead rows, or compact()).
        On an index loaded with mmap=True the file is never written."""
        want = as_id_list(ids)
        with self._lock.exclusive(), _io.guarded(self._mapped):
            n = self._kill(np.isin(self.ids, want)) if want.size and self.ids.size else 0
            self._maybe_compact()
        return n

    def compact(self) -> int:
        """Drops the removed rows now (rewrites the codes in memory); returns how many."""
        with self._lock.exclusive(), _io.guarded(self._mapped):
            return self._compact()

    def _maybe_compact(self) -> None:
        if self._ndead and self._ndead > self.compact_fraction * self.codes.shape[0]:
            self._compact()

    def _compact(self) -> int:
        n = self._ndead
        if n:
            for name, a in self._live_arrays().items():
                setattr(self, name, a)
            self._live, self._ndead, self._packed, self._mapped = None, 0, None, []
        return n

    def _live_arrays(self) -> dict:
        """The row arrays (codes, ids, kept vectors; IVF: offsets) without the dead rows."""
        keep = self._live.view(np.bool_)
        return {name: a[keep] for name, a in self._row_arrays().items()}

    def reconstruct(self, ids):
        """(n, dim) float32 vectors of these ids (a scalar id gives (dim,)): exact when the index
        keeps the vectors (keep_vectors=True), else decoded from the codes. KeyError names the
        ids the index does not hold. NumPy or torch in, the same out."""
        torch_out = _arrays.is_torch(ids)
        scalar = np.ndim(_arrays.as_numpy(ids, "ids") if torch_out else ids) == 0
        want = as_id_list(ids)
        self._need_trained("reconstruct")
        with self._lock.shared(), _io.guarded(self._mapped):
            rows = self._held_rows(want)
            if (rows < 0).any():
                missing = want[rows < 0]
                raise KeyError(
                    f"ids {missing[:5].tolist()} are not held by the index ({missing.size} in all)"
                )
            out = np.array(self.vectors[rows]) if self.keep_vectors else self._decode_rows(rows)
        out = out.reshape(self.dim) if scalar else out
        if torch_out:
            import torch

            return torch.from_numpy(out)
        return out

    def _decode_rows(self, rows: np.ndarray) -> np.ndarray:
        return self.decode(np.asarray(self.codes[rows]))
