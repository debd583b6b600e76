"""PQIndex (flat product quantization) and IVFPQIndex (inverted lists over a coarse quantizer,
product-quantized residuals): train / add / search / save / load, NumPy or torch in and out."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from hotops import _backend
from hotops.ann import _arrays, _io
from hotops.ann._sync import RWLock
from hotops.ann.kmeans import codebook_layout, kmeans, nearest

METRICS = ("l2", "ip")
TABLE_STRIDE = 256  # the scan kernels' table width (entries past ksub are +inf)
PRECOMPUTED_TABLES_MAX_BYTES = 256 << 20  # IVF l2: beyond this, residual tables per probed list
ENCODE_CHUNK = 1 << 16
RESULT_PAD_MAX_BYTES = 1 << 30  # k > ntotal: refuse padded answers larger than this


def pack_fastscan(codes: np.ndarray, offsets: np.ndarray):
    """4-bit codes (n, m) grouped by list -> (packed (blocks, mp * 16) uint8, block offsets): blocks
    of 32 vectors per list; byte [s * 16 + j] of a block holds vector j's code for sub-space s in
    the low nibble and vector 16 + j's in the high one; sub-spaces padded to mp = 4 * ceil(m / 4)."""
    n, m = codes.shape
    mp = (m + 3) // 4 * 4
    counts = np.diff(offsets)
    blocks = (counts + 31) // 32
    block_offsets = np.concatenate([[0], np.cumsum(blocks)]).astype(np.int64)
    local = np.arange(n) - np.repeat(offsets[:-1], counts)
    block = np.repeat(block_offsets[:-1], counts) + local // 32
    slots = np.zeros((int(block_offsets[-1]), 32, mp), dtype=np.uint8)
    slots[block, local % 32, :m] = codes
    packed = slots[:, :16, :] | (slots[:, 16:, :] << 4)  # (blocks, 16, mp)
    return np.ascontiguousarray(packed.transpose(0, 2, 1)).reshape(-1, mp * 16), block_offsets


class _ProductQuantized:
    """What both indexes share: the sub-space codebooks, codes, ids, optional kept vectors."""

    kind = ""

    def __init__(
        self, dim: int, m: int, nbits: int, metric: str, keep_vectors: bool, seed: int, verbose: bool
    ):
        dim = _backend.check_number(dim, "dim", integer=True, low=1)
        m = _backend.check_number(m, "m", integer=True, low=1)
        if dim % m:
            raise ValueError(f"m must be a positive divisor of dim = {dim}, got {m!r}")
        nbits = _backend.check_number(
            nbits, "nbits (codes are stored one byte per sub-space)", integer=True, low=1, high=8
        )
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        seed = _backend.check_number(seed, "seed", integer=True, low=0)
        self.dim, self.m, self.nbits, self.metric = dim, m, nbits, metric
        self.ksub, self.dsub = 1 << self.nbits, self.dim // self.m
        self.keep_vectors, self.seed, self.verbose = bool(keep_vectors), seed, verbose
        self.codebooks: Optional[np.ndarray] = None  # (m, ksub, dsub)
        self.codes = np.empty((0, self.m), dtype=np.uint8)
        self.ids = np.empty(0, dtype=np.int64)
        self.vectors = np.empty((0, self.dim), dtype=np.float32) if keep_vectors else None
        self._packed = None  # fast-scan layout of the codes (nbits = 4), rebuilt after changes
        self._list_tables_cached = (None, None)  # (key, tables): one attribute, swapped whole
        self._device_cached = (None, None)  # (key, state)
        self._lock = RWLock()  # searches share it, changes take it alone
        self._mapped = []  # _io.Mapped files the arrays come from (load(mmap=True)), checked around use

    def __getstate__(self):  # pickle / deepcopy: the arrays, not the lock or the maps (copied in full)
        state = dict(self.__dict__)
        for name in ("_lock", "_mapped", "_list_tables_cached", "_device_cached", "_packed"):
            state.pop(name, None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._packed, self._list_tables_cached, self._device_cached = None, (None, None), (None, None)
        self._lock, self._mapped = RWLock(), []

    # ---------------------------------------------------------------- properties

    @property
    def is_trained(self) -> bool:
        return self.codebooks is not None

    @property
    def ntotal(self) -> int:
        return int(self.codes.shape[0])

    def __len__(self) -> int:
        return self.ntotal

    @property
    def fast_scan(self) -> bool:
        """4-bit codes are scanned with the fast-scan kernel (uint8 tables in SIMD registers)."""
        return self.nbits == 4

    def bytes_per_vector(self) -> float:
        """Resident bytes per stored vector: codes (both layouts for fast-scan), id, kept vectors."""
        arrays = [self.codes, self.ids] + ([self.vectors] if self.keep_vectors else [])
        if self.fast_scan:
            arrays.append(self._fastscan_layout()[0])
        return sum(a.nbytes for a in arrays) / max(self.ntotal, 1)

    def _list_offsets(self) -> np.ndarray:
        return np.array([0, self.ntotal], dtype=np.int64)

    def _fastscan_layout(self):
        if self._packed is None:
            self._packed = pack_fastscan(np.asarray(self.codes), self._list_offsets())
        return self._packed

    def _list_tables(self, coarse: np.ndarray) -> np.ndarray:
        """(nlist, m, ksub) 2 <c_l,s, b_s,j>: what a list adds to the query's own l2 table."""
        key, tables = self._list_tables_cached  # key: the arrays themselves, so no id is reused
        if key is None or key[0] is not coarse or key[1] is not self.codebooks:
            c = coarse.reshape(coarse.shape[0], self.m, self.dsub)
            tables = np.ascontiguousarray(2 * np.einsum("lsd,sjd->lsj", c, self.codebooks), dtype=np.float32)
            self._list_tables_cached = ((coarse, self.codebooks), tables)  # one store: searches share it
        return tables

    def _precomputed_tables(self, origins: np.ndarray) -> Optional[np.ndarray]:
        """l2 list tables for the 8-bit scan when they fit PRECOMPUTED_TABLES_MAX_BYTES: a probed list
        then costs m * ksub additions instead of a residual table's m * ksub * dsub multiply-adds."""
        if self.metric != "l2" or 4 * origins.shape[0] * self.m * self.ksub > PRECOMPUTED_TABLES_MAX_BYTES:
            return None
        return self._list_tables(origins)

    def _fastscan(self, q, coarse, probes, allow, score, rows):
        packed, block_offsets = self._fastscan_layout()
        _backend.ext().ann_fastscan(
            q,
            coarse,
            probes,
            self._ct,
            self._cterm,
            self.metric,
            self._list_tables(coarse),
            packed,
            block_offsets,
            self._list_offsets(),
            allow,
            score,
            rows,
            _arrays.threads(),
        )

    def _need_trained(self, what: str):
        if not self.is_trained:
            raise RuntimeError(f"{what} before train(): call {type(self).__name__}.train(x) first")

    # ---------------------------------------------------------------- product quantizer

    def _train_pq(self, x: np.ndarray):
        books = np.empty((self.m, self.ksub, self.dsub), dtype=np.float32)
        for s in range(self.m):
            sub = np.ascontiguousarray(x[:, s * self.dsub : (s + 1) * self.dsub])
            books[s] = kmeans(sub, self.ksub, seed=self.seed + s, verbose=self.verbose)
        self._set_codebooks(books)

    def _refuse_if_holding(self, what: str):
        """Codes made with old codebooks (or lists) are not valid under new ones: re-encode from the
        kept vectors, or refuse when the index does not keep them."""
        if self.ntotal and not self.keep_vectors:
            raise RuntimeError(
                f"{what} on an index that holds {self.ntotal} vectors: their codes were made with the old "
                f"codebooks and the index does not keep the vectors to re-encode them, so search would "
                f"silently lose recall. Call reset() and add the vectors again, or build the index with "
                f"keep_vectors=True (then {what} re-encodes the held vectors)"
            )

    def _reencode(self):
        """Codes (and lists) of the kept vectors again, with the current codebooks, same ids."""
        if self.ntotal:
            ids, vectors = self.ids, np.ascontiguousarray(self.vectors)
            self._clear()
            self._add(vectors, ids)

    def reset(self) -> None:
        """Removes every vector (codes, ids, kept vectors); the training stays."""
        with self._lock.exclusive():
            self._clear()

    def _clear(self):
        self.codes = np.empty((0, self.m), dtype=np.uint8)
        self.ids = np.empty(0, dtype=np.int64)
        self.vectors = np.empty((0, self.dim), dtype=np.float32) if self.keep_vectors else None
        self._packed, self._mapped = None, []

    def set_codebooks(self, codebooks):
        """Loads (m, ksub, dsub) codebooks (e.g. learned ones). Vectors already held are re-encoded
        when the index keeps them (keep_vectors=True); otherwise a non-empty index refuses."""
        books = self._checked_codebooks(codebooks)
        with self._lock.exclusive():
            self._refuse_if_holding("set_codebooks()")
            self._set_codebooks(books)
            self._reencode()

    def _checked_codebooks(self, codebooks) -> np.ndarray:
        books = _arrays.as_numpy(codebooks, "codebooks")
        want = (self.m, self.ksub, self.dsub)
        if books.shape != want:
            raise ValueError(f"codebooks have shape {books.shape}, expected {want}")
        if not np.issubdtype(books.dtype, np.floating):
            raise TypeError(f"codebooks have dtype {books.dtype}; expected floating point")
        books = np.array(books, dtype=np.float32, order="C")  # a copy: caches key on its identity
        if not np.isfinite(books).all():
            raise ValueError("codebooks contain NaN or Inf")
        return books

    def _set_codebooks(self, books: np.ndarray):
        self._ct, self._cterm = codebook_layout(books)
        self.codebooks = books
        self._device_cached = (None, None)  # the same array may come back changed in place

    def encode(self, x) -> np.ndarray:
        """(n, m) uint8 codes of vectors already in the quantized space (residuals for IVF)."""
        self._need_trained("encode")
        x = _arrays.as_vectors(x, "x", self.dim)
        codes = np.empty((x.shape[0], self.m), dtype=np.uint8)
        for b in range(0, x.shape[0], ENCODE_CHUNK):
            idx, _ = nearest(x[b : b + ENCODE_CHUNK], self.codebooks)
            codes[b : b + ENCODE_CHUNK] = idx[:, :, 0]
        return codes

    def decode(self, codes) -> np.ndarray:
        self._need_trained("decode")
        codes = _arrays.as_numpy(codes, "codes")
        if not np.issubdtype(codes.dtype, np.integer):
            raise TypeError(f"codes have dtype {codes.dtype}; expected integers (uint8)")
        if codes.ndim != 2 or codes.shape[1] != self.m:
            raise ValueError(f"codes must be (n, {self.m}), got {codes.shape}")
        if codes.size and (int(codes.max()) >= self.ksub or int(codes.min()) < 0):
            raise ValueError(
                f"codes must be in 0 .. ksub - 1 = {self.ksub - 1}, got values in "
                f"{int(codes.min())} .. {int(codes.max())}"
            )
        return self.codebooks[np.arange(self.m), codes.astype(np.int64)].reshape(-1, self.dim)

    def tables(self, q) -> np.ndarray:
        """(nq, m, 256) lookup tables: score of each query sub-vector against each centroid."""
        self._need_trained("tables")
        return self._tables(_arrays.as_vectors(q, "queries", self.dim))

    def _tables(self, q: np.ndarray) -> np.ndarray:
        out = np.full((q.shape[0], self.m, TABLE_STRIDE), np.inf, dtype=np.float32)
        _backend.ext().ann_tables(q, self._ct, self._cterm, self.metric, out, _arrays.threads())
        return out

    # ---------------------------------------------------------------- add / search plumbing

    def _append(self, codes: np.ndarray, ids: np.ndarray, x: np.ndarray):
        self._packed = None
        self.codes = np.concatenate([self.codes, codes])
        self.ids = np.concatenate([self.ids, ids])
        if self.keep_vectors:
            self.vectors = np.concatenate([self.vectors, x])

    def _next_ids(self, n: int, ids) -> np.ndarray:
        if ids is None:
            return _arrays.auto_ids(int(self.ids.max()) if self.ids.size else -1, n)
        return _arrays.as_ids(ids, n)

    def add(self, x, ids=None) -> None:
        """Adds vectors x (n, dim) with ids (n,) int64 in 0 .. 2**63 - 1 (default: after the largest
        id held). Waits for running searches; searches started meanwhile wait for it."""
        self._need_trained("add")
        x = _arrays.as_vectors(x, "x", self.dim)
        with self._lock.exclusive():
            ids = self._next_ids(x.shape[0], ids)
            with _io.guarded(self._mapped):  # the old codes are read from the mapping
                self._add(x, ids)
            self._mapped = []  # every array is a new one now

    def train(self, x) -> None:
        """Learns the codebooks (and IVF lists) from x. An index that already holds vectors re-encodes
        them when it keeps them (keep_vectors=True) and refuses otherwise (RuntimeError)."""
        x = _arrays.as_vectors(x, "training vectors", self.dim)
        with self._lock.exclusive():
            self._refuse_if_holding("train()")
            mapped = self._mapped
            with _io.guarded(mapped):  # re-encoding reads the kept vectors from the mapping
                self._train(x)
                self._reencode()
            if self.ntotal:
                self._mapped = []

    def _search(self, q, k, refine, allow, **kw):
        """Checks the arguments, then runs the search on the queries' device: the C++ kernels
        for NumPy arrays and CPU tensors, the Triton scan for CUDA tensors."""
        self._need_trained("search")
        k = _arrays.check_k(k)
        if refine is not None:
            refine = _arrays.check_k(refine, "refine")
            if not self.keep_vectors:
                raise ValueError("refine needs the exact vectors: build the index with keep_vectors=True")
        if not (_arrays.is_torch(q) or isinstance(q, np.ndarray)):
            raise TypeError(f"queries must be a NumPy array or a torch tensor, got {type(q).__name__}")
        device = q.device if _arrays.is_torch(q) else torch.device("cpu")
        backend = _backend.choose(
            f"{type(self).__name__}.search",
            (
                _backend.Backend("cpu (C++)", _backend.cpu_refuses, self._search_cpu),
                _backend.Backend("cuda (Triton)", _backend.triton_refuses, self._search_triton),
            ),
            device,
        )
        with self._lock.shared(), _io.guarded(self._mapped):  # zero pages would give wrong results
            return backend.run(q, k, refine, allow, **kw)

    # ---------------------------------------------------------------- the GPU path

    def _on_device(self, device) -> dict:
        """The index's arrays as tensors on `device`, copied again only after the index changed."""
        arrays = (self.codes, self.ids, self.codebooks, self.vectors, getattr(self, "coarse", None))
        key = (str(device),) + tuple(map(id, arrays))
        cached_key, state = self._device_cached
        if cached_key != key:  # every change replaces an array (the cache keeps them alive)
            t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
            state = dict(
                codes=t(self.codes),
                ids=t(self.ids),
                codebooks=t(self.codebooks),
                cnorm=t((self.codebooks.astype(np.float64) ** 2).sum(-1).astype(np.float32)),
            )
            if self.keep_vectors:
                state["vectors"] = t(self.vectors)
            state.update(self._device_extra(t))
            state["_arrays"] = arrays  # ids stay unique while the arrays live
            self._device_cached = (key, state)  # one store: concurrent searches see key and state together
        return state

    def _device_extra(self, to_device) -> dict:
        return {}

    def _device_tables(self, state: dict, q: torch.Tensor, with_norm: bool) -> torch.Tensor:
        """(nq, m, ksub) query tables on the device: ||b||^2 - 2<q_s, b> (+ ||q_s||^2 if
        with_norm) for l2, -<q_s, b> for ip."""
        dots = torch.einsum("nsd,sjd->nsj", q.view(q.shape[0], self.m, self.dsub), state["codebooks"])
        if self.metric == "ip":
            return (-dots).contiguous()
        t = state["cnorm"][None] - 2 * dots
        if with_norm:
            t += q.view(q.shape[0], self.m, self.dsub).square().sum(-1, keepdim=True)
        return t.contiguous()

    def _search_triton(self, q, k, refine, allow, **kw):
        from hotops.ann import triton as ann_triton

        q = _arrays.as_device_vectors(q, "queries", self.dim)
        state = self._on_device(q.device)
        kk = k * refine if refine else k
        allow = _arrays.allow_rows(allow, self.ids)
        allow = torch.from_numpy(allow).to(q.device) if allow is not None else None
        scan = self._device_scan(state, q, **kw)
        score, rows = ann_triton.adc_topk(scan.pop("qtables"), state["codes"], k=kk, allow=allow, **scan)
        if refine:
            score, rows = self._device_rerank(state, q, rows, k)
        dist = -score if self.metric == "ip" else score
        return dist, torch.where(rows >= 0, state["ids"][rows.clamp(min=0)], -1)

    def _device_rerank(self, state, q, rows, k):
        """Exact scores of the candidate rows from the kept vectors, best k (plain torch)."""
        cand = state["vectors"][rows.clamp(min=0)]  # (nq, kk, dim)
        if self.metric == "l2":
            exact = (cand - q[:, None]).square().sum(-1)
        else:
            exact = -torch.einsum("nkd,nd->nk", cand, q)
        exact = exact.masked_fill(rows < 0, float("inf"))
        score, at = torch.topk(exact, min(k, exact.shape[1]), dim=1, largest=False, sorted=True)
        rows = torch.gather(rows, 1, at).masked_fill(torch.isinf(score), -1)
        if score.shape[1] < k:  # fewer candidates than k
            pad = k - score.shape[1]
            score = torch.nn.functional.pad(score, (0, pad), value=float("inf"))
            rows = torch.nn.functional.pad(rows, (0, pad), value=-1)
        return score, rows

    def _scan_k(self, nq: int, k: int, refine) -> int:
        """How many results the scan keeps: k (or k * refine candidates), but never more than the
        index holds; the answer is padded to k afterwards. A padded answer past RESULT_PAD_MAX_BYTES
        is refused (k = 10**9 on a small index would otherwise try to allocate it)."""
        if k > self.ntotal and nq * k * 12 > RESULT_PAD_MAX_BYTES:
            raise ValueError(
                f"k = {k} is more than the {self.ntotal} vectors the index holds, and the (nq, k) answer "
                f"padded with -1 would take {nq * k * 12 / 2**30:.1f} GiB; ask for at most ntotal"
            )
        return max(1, min(k * refine if refine else k, self.ntotal))

    def _finish(self, q, score, rows, k, refine, torch_out):
        """Re-ranks (refine), pads to k and hands back (distances, ids) in the caller's kind."""
        if refine is not None:
            score, rows = self._rerank(q, rows, k)
        if score.shape[1] < k:
            pad = ((0, 0), (0, k - score.shape[1]))
            score, rows = np.pad(score, pad, constant_values=np.inf), np.pad(rows, pad, constant_values=-1)
        elif score.shape[1] > k:
            score, rows = np.ascontiguousarray(score[:, :k]), np.ascontiguousarray(rows[:, :k])
        return _arrays.results(score, rows, self.ids, self.metric, torch_out)

    def _rerank(self, q, rows, k):
        score = np.empty((q.shape[0], k), dtype=np.float32)
        out = np.empty((q.shape[0], k), dtype=np.int64)
        _backend.ext().ann_rerank(
            q, self.vectors, rows, None, 0.0, self.metric, score, out, _arrays.threads()
        )
        return score, out

    @staticmethod
    def _result_buffers(nq: int, k: int):
        return np.empty((nq, k), dtype=np.float32), np.empty((nq, k), dtype=np.int64)

    # ---------------------------------------------------------------- faiss (hotops.integrations.faiss)

    def to_faiss(self, fast_scan: Optional[bool] = None, k_factor: float = 1.0):
        """The equivalent faiss index, codes unchanged (see hotops.integrations.faiss.to_faiss)."""
        from hotops.integrations.faiss import to_faiss

        return to_faiss(self, fast_scan, k_factor)

    # ---------------------------------------------------------------- files

    def _params(self) -> dict:
        return dict(
            dim=self.dim,
            m=self.m,
            nbits=self.nbits,
            metric=self.metric,
            keep_vectors=self.keep_vectors,
            seed=self.seed,
        )

    def _arrays_to_save(self) -> dict:
        arrays = {"codebooks": self.codebooks, "codes": self.codes, "ids": self.ids}
        if self.keep_vectors:
            arrays["vectors"] = self.vectors
        return arrays

    def save(self, path) -> None:
        """Writes the index to `path` (str, bytes or os.PathLike) atomically: a uniquely named
        temporary file beside it, fsync'ed and renamed over it. Concurrent saves to one path leave
        one complete index (the last to rename)."""
        self._need_trained("save")
        with self._lock.shared():
            mapped = self._mapped
            _io.save(
                path,
                self.kind,
                self._params(),
                self._arrays_to_save(),
                before_replace=lambda: _io.check_mapped(mapped),
            )  # never save zero pages

    @classmethod
    def load(cls, path, mmap: bool = False):
        """Reads an index written by save(); mmap=True maps the codes (and ids, vectors) from the
        file instead of reading them. Raises ValueError on truncated or corrupted files, and
        MappedFileChangedError (an OSError and ValueError) from search/add/save of a mapped index
        whose file was truncated or rewritten in place since."""
        path = _io.fs_path(path)
        params, arrays, mapped = _io.load(path, cls.kind, mmap=mmap)
        try:
            index = cls(**params, verbose=False)
            index._restore(arrays)
        except (TypeError, ValueError, KeyError) as exc:
            raise ValueError(f"{path}: inconsistent index file ({exc})") from None
        index._mapped = mapped
        return index

    def _restore(self, arrays: dict):
        self._set_codebooks(self._checked_codebooks(arrays["codebooks"]))
        codes, ids = arrays["codes"], arrays["ids"]
        if codes.ndim != 2 or codes.shape[1] != self.m or codes.dtype != np.uint8:
            raise ValueError(f"codes must be uint8 (n, {self.m})")
        if ids.shape != (codes.shape[0],) or ids.dtype != np.int64:
            raise ValueError("ids must be int64, one per code")
        if self.nbits < 8 and codes.size and int(codes.max()) >= self.ksub:
            raise ValueError(f"codes must be < ksub = {self.ksub}")
        self.codes, self.ids, self._packed = codes, ids, None
        if self.keep_vectors:
            vectors = arrays["vectors"]
            if vectors.shape != (codes.shape[0], self.dim) or vectors.dtype != np.float32:
                raise ValueError(f"vectors must be float32 ({codes.shape[0]}, {self.dim})")
            self.vectors = vectors


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

    def _add(self, x: np.ndarray, ids: np.ndarray) -> None:
        self._append(self.encode(x), ids, x)

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
        allow = _arrays.allow_rows(allow, self.ids)
        if self.fast_scan:  # one list around the origin
            self._fastscan(q, self._origin, np.zeros((q.shape[0], 1), np.int64), allow, score, rows)
        else:
            _backend.ext().ann_pq_scan(self._tables(q), self.codes, allow, score, rows, _arrays.threads())
        return self._finish(q, score, rows, k, refine, torch_out)

    def _device_scan(self, state, q) -> dict:
        from hotops.ann.triton import flat_slices

        offsets, probes = flat_slices(self.ntotal, q.shape[0], q.device)
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

    def _add(self, x: np.ndarray, ids: np.ndarray) -> None:
        lists = self._assign(x)
        codes = self.encode(x - self.coarse[lists] if self.by_residual else x)
        old_lists = np.repeat(np.arange(self.nlist), np.diff(self.offsets))
        order = np.argsort(np.concatenate([old_lists, lists]), kind="stable")
        self._append(codes, ids, x)
        self.codes, self.ids = self.codes[order], self.ids[order]
        if self.keep_vectors:
            self.vectors = self.vectors[order]
        counts = np.bincount(np.concatenate([old_lists, lists]), minlength=self.nlist)
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

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
        probes, allow = self._probe(q, nprobe), _arrays.allow_rows(allow, self.ids)
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
        return dict(super()._arrays_to_save(), coarse=self.coarse, offsets=self.offsets)

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
            or offsets[-1] != self.ntotal
            or (np.diff(offsets) < 0).any()
        ):
            raise ValueError("list offsets must rise from 0 to the number of codes")
        self.offsets = np.ascontiguousarray(offsets)
