"""PQIndex (flat product quantization) and IVFPQIndex (inverted lists over a coarse quantizer,
product-quantized residuals): train / add / remove_ids / reconstruct / search / save / load, NumPy
or torch in and out. The shared core is in _pq.py (files, add plumbing), _mutable.py (removal,
replacement, compaction) and _device.py (the GPU path)."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from hotops import _backend
from hotops.ann import _arrays
from hotops.ann._pq import (  # noqa: F401 (re-exported)
    PRECOMPUTED_TABLES_MAX_BYTES,
    TABLE_STRIDE,
    _ProductQuantized,
    pack_fastscan,
)
from hotops.ann._source import chunks
from hotops.ann.kmeans import kmeans, nearest


class PQIndex(_ProductQuantized):
    """Flat product quantization: every query scans every code (ADC with a fused top-k).

    PQIndex(dim, m, nbits=8, metric="l2"|"ip", keep_vectors=False); m must divide dim.
    """

    kind = "PQIndex"

    def __init__(
        self,
        dim: int,
        m: int,
        nbits: int = 8,
        metric: str = "l2",
        *,
        keep_vectors: bool = False,
        seed: int = 1234,
        verbose: bool = True,
    ):
        super().__init__(dim, m, nbits, metric, keep_vectors, seed, verbose)
        self._origin = np.zeros((1, self.dim), np.float32)  # fast-scan treats the codes as one list

    @classmethod
    def from_faiss(cls, index) -> "PQIndex":
        """A PQIndex holding a faiss IndexPQ's (or IndexPQFastScan's) codebooks, codes and ids
        (IndexRefineFlat -> keep_vectors, IndexIDMap -> ids); see hotops.integrations.faiss."""
        from hotops.integrations.faiss import pq_from_faiss

        return pq_from_faiss(index)

    def _train(self, x: np.ndarray) -> None:
        self._train_pq(x)

    def _lists_of(self, src, chunk_rows: int) -> None:
        return None  # one flat list

    def _encode_rows(self, x: np.ndarray, lists: None) -> np.ndarray:
        return self.encode(x)

    def _placement(self, lists: None, n: int):
        """New rows go after the held ones, in order."""
        return np.arange(self.codes.shape[0] + n), None

    def search(self, q, k: int = 10, *, refine: Optional[int] = None, allow=None):
        """(distances, ids), each (nq, k): squared L2 distances ascending (l2) or inner products
        descending (ip). refine=R re-ranks the best R*k by exact distance (keep_vectors=True);
        allow restricts the scan to some ids (an id array or a boolean mask over ids)."""
        return self._search(q, k, refine, allow)

    def _search_cpu(self, q, k, refine, allow):
        torch_out = _arrays.is_torch(q)
        q = _arrays.as_vectors(q, "queries", self.dim)
        kk = self._scan_k(q.shape[0], k, refine)
        score, rows = self._result_buffers(q.shape[0], kk)
        allow = self._scan_allow(allow)
        if self.fast_scan:  # one list around the origin
            self._fastscan(q, self._origin, np.zeros((q.shape[0], 1), np.int64), allow, score, rows)
        else:
            _backend.ext().ann_pq_scan(self._tables(q), self.codes, allow, score, rows, _arrays.threads())
        return self._finish(q, score, rows, k, refine, torch_out)

    def _device_scan(self, state, q) -> dict:
        from hotops.ann.triton import flat_slices

        offsets, probes = flat_slices(self.codes.shape[0], q.shape[0], q.device)
        return dict(qtables=self._device_tables(state, q, with_norm=True), offsets=offsets, probes=probes)


class IVFPQIndex(_ProductQuantized):
    """Inverted lists over a k-means coarse quantizer; each list holds the PQ codes of its
    vectors' residuals to the list centroid. A query scans its `nprobe` nearest lists.

    IVFPQIndex(dim, nlist=1024, m=16, nbits=8, metric="l2"|"ip", keep_vectors=False). With
    by_residual=False the codes quantize the vectors themselves and the lists only partition them
    (faiss's by_residual = false).
    """

    kind = "IVFPQIndex"

    def __init__(
        self,
        dim: int,
        nlist: int = 1024,
        m: int = 16,
        nbits: int = 8,
        metric: str = "l2",
        *,
        keep_vectors: bool = False,
        by_residual: bool = True,
        seed: int = 1234,
        verbose: bool = True,
    ):
        super().__init__(dim, m, nbits, metric, keep_vectors, seed, verbose)
        self.by_residual = bool(by_residual)
        self.nlist = _backend.check_number(nlist, "nlist", integer=True, low=1)
        self.coarse: Optional[np.ndarray] = None  # (nlist, dim)
        self.offsets = np.zeros(self.nlist + 1, dtype=np.int64)

    @property
    def is_trained(self) -> bool:
        return self.coarse is not None and self.codebooks is not None

    @classmethod
    def from_faiss(cls, index) -> "IVFPQIndex":
        """An IVFPQIndex holding a faiss IndexIVFPQ's (or IndexIVFPQFastScan's) coarse centroids,
        codebooks, lists and ids (IndexRefineFlat -> keep_vectors); see hotops.integrations.faiss."""
        from hotops.integrations.faiss import ivfpq_from_faiss

        return ivfpq_from_faiss(index)

    def _assign(self, x: np.ndarray) -> np.ndarray:
        return self._probe(x, 1)[:, 0]

    def _clear(self):
        super()._clear()
        self.offsets = np.zeros(self.nlist + 1, dtype=np.int64)

    def _train(self, x: np.ndarray) -> None:
        coarse = kmeans(x, self.nlist, niter=10, seed=self.seed, verbose=self.verbose)
        self.coarse = coarse
        rng = np.random.default_rng(self.seed)
        sample = (
            x
            if x.shape[0] <= self.ksub * 256
            else x[np.sort(rng.choice(x.shape[0], self.ksub * 256, replace=False))]
        )
        self._train_pq(sample - coarse[self._assign(sample)] if self.by_residual else sample)

    def _lists_of(self, src, chunk_rows: int) -> np.ndarray:
        """Each row's list (the first pass of add over the source)."""
        lists = np.empty(src.shape[0], np.int64)
        for b, chunk in chunks(src, self.dim, chunk_rows):
            lists[b : b + chunk.shape[0]] = self._assign(chunk)
        return lists

    def _encode_rows(self, x: np.ndarray, lists: np.ndarray) -> np.ndarray:
        return self.encode(x - self.coarse[lists] if self.by_residual else x)

    def _placement(self, lists: np.ndarray, n: int):
        """(the place of each held row then each new row, new offsets): one stable sort by list,
        held rows first within each list."""
        every = np.concatenate([self._row_lists(), lists])
        order = np.argsort(every, kind="stable")
        offsets = _offsets(every, self.nlist)
        del every
        dest = np.empty_like(order)
        dest[order] = np.arange(order.size)
        return dest, offsets

    def _row_lists(self) -> np.ndarray:
        return np.repeat(np.arange(self.nlist), np.diff(self.offsets))

    def _row_arrays(self) -> dict:
        return dict(super()._row_arrays(), offsets=self.offsets)

    def _live_arrays(self) -> dict:
        keep = self._live.view(np.bool_)
        rows = {name: a[keep] for name, a in super()._row_arrays().items()}
        return dict(rows, offsets=_offsets(self._row_lists()[keep], self.nlist))

    def _decode_rows(self, rows: np.ndarray) -> np.ndarray:
        out = super()._decode_rows(rows)
        if self.by_residual:
            out += self.coarse[np.searchsorted(self.offsets, rows, side="right") - 1]
        return out

    def _list_offsets(self) -> np.ndarray:
        return self.offsets

    def _origins(self) -> np.ndarray:
        """What the codes of each list are residuals to: the coarse centroids, or zeros without
        by_residual (the same array while the centroids stay, so the list-table cache holds)."""
        if self.by_residual:
            return self.coarse
        cached = getattr(self, "_zero_origins", None)  # (coarse, zeros): one store, so searches may share it
        if cached is None or cached[0] is not self.coarse:
            cached = (self.coarse, np.zeros_like(self.coarse))
            self._zero_origins = cached
        return cached[1]

    def probe(self, q, nprobe: int) -> np.ndarray:
        """(n, nprobe) the lists to scan (or, with 1, to add to): nearest centroids for l2, largest
        inner products for ip (the coarse k-means itself is L2, as in faiss)."""
        self._need_trained("probe")
        q = _arrays.as_vectors(q, "queries", self.dim)
        return self._probe(q, _backend.check_number(nprobe, "nprobe", integer=True, low=1, high=self.nlist))

    def _probe(self, q: np.ndarray, nprobe: int) -> np.ndarray:
        idx, _ = nearest(q, self.coarse[None], k=nprobe, metric=self.metric)
        return np.ascontiguousarray(idx[:, 0, :])

    def search(
        self, q, k: int = 10, *, nprobe: Optional[int] = None, refine: Optional[int] = None, allow=None
    ):
        """(distances, ids), each (nq, k), as PQIndex.search; scans the nprobe nearest lists
        (default min(16, nlist))."""
        nprobe = min(16, self.nlist) if nprobe is None else nprobe
        nprobe = _backend.check_number(nprobe, "nprobe", integer=True, low=1, high=self.nlist)
        return self._search(q, k, refine, allow, nprobe=nprobe)

    def _search_cpu(self, q, k, refine, allow, nprobe):
        torch_out = _arrays.is_torch(q)
        q = _arrays.as_vectors(q, "queries", self.dim)
        kk = self._scan_k(q.shape[0], k, refine)
        score, rows = self._result_buffers(q.shape[0], kk)
        probes, allow = self._probe(q, nprobe), self._scan_allow(allow)
        origins = self._origins()
        if self.fast_scan:
            self._fastscan(q, origins, probes, allow, score, rows)
        else:
            _backend.ext().ann_ivf_scan(
                q,
                origins,
                probes,
                self._ct,
                self._cterm,
                self.metric,
                self.codes,
                self.offsets,
                allow,
                score,
                rows,
                _arrays.threads(),
                self._precomputed_tables(origins),
            )
        return self._finish(q, score, rows, k, refine, torch_out)

    def _device_extra(self, to_device) -> dict:
        extra = dict(coarse=to_device(self.coarse), offsets=to_device(self.offsets))
        extra["coarse_norm"] = (extra["coarse"].double() ** 2).sum(1).float()
        if self.metric == "l2" and self.by_residual:
            extra["list_tables"] = to_device(
                self._list_tables(self.coarse).reshape(self.nlist, self.m, self.ksub)
            )
        return extra

    def _device_scan(self, state, q, nprobe) -> dict:
        """Probes on the device; the scan's per-probe bias is ||q - c||^2 (l2) or -<q, c> (ip)
        and, for l2, list l's table 2<c_l,s, b> completes the query's (precomputed tables)."""
        dots = q @ state["coarse"].T
        if not self.by_residual:  # the codes alone score a row: ||q - r||^2 or -<q, r>
            near = state["coarse_norm"][None] - 2 * dots if self.metric == "l2" else -dots
            probes = torch.topk(near, nprobe, dim=1, largest=False).indices.contiguous()
            return dict(
                qtables=self._device_tables(state, q, with_norm=self.metric == "l2"),
                probes=probes,
                offsets=state["offsets"],
            )
        if self.metric == "l2":
            near = state["coarse_norm"][None] - 2 * dots
            best, probes = torch.topk(near, nprobe, dim=1, largest=False)
            bias = best + q.square().sum(1, keepdim=True)
            return dict(
                qtables=self._device_tables(state, q, with_norm=False),
                list_tables=state["list_tables"],
                bias=bias.contiguous(),
                probes=probes.contiguous(),
                offsets=state["offsets"],
            )
        best, probes = torch.topk(dots, nprobe, dim=1, largest=True)
        return dict(
            qtables=self._device_tables(state, q, with_norm=False),
            bias=(-best).contiguous(),
            probes=probes.contiguous(),
            offsets=state["offsets"],
        )

    def _params(self) -> dict:
        return dict(super()._params(), nlist=self.nlist, by_residual=self.by_residual)

    def _arrays_to_save(self) -> dict:
        return dict(super()._arrays_to_save(), coarse=self.coarse)

    def _restore(self, arrays: dict):
        coarse, offsets = arrays["coarse"], arrays["offsets"]
        if coarse.shape != (self.nlist, self.dim) or coarse.dtype != np.float32:
            raise ValueError(f"coarse centroids must be float32 ({self.nlist}, {self.dim})")
        self.coarse = np.array(coarse, order="C")  # a copy: small, and kept across reset / add
        super()._restore(arrays)
        if (
            offsets.shape != (self.nlist + 1,)
            or offsets.dtype != np.int64
            or offsets[0] != 0
            or offsets[-1] != self.codes.shape[0]
            or (np.diff(offsets) < 0).any()
        ):
            raise ValueError("list offsets must rise from 0 to the number of codes")
        self.offsets = np.ascontiguousarray(offsets)


def _offsets(lists: np.ndarray, nlist: int) -> np.ndarray:
    """List offsets (nlist + 1,) of rows sorted by their list numbers."""
    return np.concatenate([[0], np.cumsum(np.bincount(lists, minlength=nlist))]).astype(np.int64)
