"""The product-quantized core both indexes share: codebooks, codes, ids, kept vectors, the add and
search plumbing and the file format; the 4-bit fast-scan layout."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from hotops import _backend
from hotops.ann import _arrays, _io
from hotops.ann._device import OnDevice
from hotops.ann._mutable import Mutable
from hotops.ann._source import CHUNK_ROWS, chunks, open_source
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


class _ProductQuantized(Mutable, OnDevice):
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
        if nbits == 4 and m > 128:  # the 4-bit fast-scan kernel's tables hold 128 sub-spaces
            raise ValueError(f"a 4-bit index takes at most 128 sub-spaces, got m={m}; use nbits=8")
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
        self._live, self._ndead = None, 0  # per-row 1/0 once a row was removed, and the dead count
        self._packed = None  # fast-scan layout of the codes (nbits = 4), rebuilt after changes
        self._list_tables_cached = (None, None)  # (key, tables): one attribute, swapped whole
        self._device_cached = (None, None)  # (key, state)
        self._lock = RWLock()  # searches share it, changes take it alone
        self._mapped = []  # _io.Mapped files the arrays come from (load(mmap=True)), checked around use

    def __getstate__(self):  # pickle / deepcopy: the arrays, not the lock or the maps (copied in full)
        state = dict(self.__dict__)
        for name in ("_lock", "_mapped", "_list_tables_cached", "_device_cached", "_packed", "_id_order"):
            state.pop(name, None)
        return state

    def __setstate__(self, state):
        state.setdefault("_live", None)
        state.setdefault("_ndead", 0)
        self.__dict__.update(state)
        self._packed, self._list_tables_cached, self._device_cached = None, (None, None), (None, None)
        self._lock, self._mapped = RWLock(), []

    # ---------------------------------------------------------------- properties

    @property
    def is_trained(self) -> bool:
        return self.codebooks is not None

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
        return np.array([0, self.codes.shape[0]], dtype=np.int64)

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
        self._compact()
        if self.ntotal:
            ids, vectors = self.ids, np.ascontiguousarray(self.vectors)
            self._clear()
            self._add(vectors, ids)

    def reset(self) -> None:
        """Removes every vector (codes, ids, kept vectors); the training stays, and automatic ids
        start again at 0, as in a new index."""
        with self._lock.exclusive():
            self._clear()

    def _clear(self):
        self.codes = np.empty((0, self.m), dtype=np.uint8)
        self.ids = np.empty(0, dtype=np.int64)
        self.vectors = np.empty((0, self.dim), dtype=np.float32) if self.keep_vectors else None
        self._packed, self._mapped, self._live, self._ndead = None, [], None, 0
        self._largest_id = -1

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
        run = _backend.choose(f"{type(self).__name__}.tables", TABLES_BACKENDS, torch.device("cpu")).run
        return run(q, self._ct, self._cterm, self.m, self.metric)

    # ---------------------------------------------------------------- add / search plumbing

    def _add(self, x: np.ndarray, ids: np.ndarray) -> None:
        """Encodes and inserts x (ids unique among themselves and new to the index)."""
        self._merge(x, ids, None, self._lists_of(x, CHUNK_ROWS), CHUNK_ROWS)

    # the largest id this index object has held since it was made or reset: removed ids,
    # compacted away, are not handed out again by automatic ids (a loaded index starts from its
    # saved, live ids)
    _largest_id = -1

    def _next_ids(self, n: int, ids) -> np.ndarray:
        if ids is None:
            held = int(self.ids.max()) if self.ids.size else -1
            return _arrays.auto_ids(max(held, self._largest_id), n)
        return _arrays.as_ids(ids, n)

    def add(self, x, ids=None, *, chunk_rows: int = CHUNK_ROWS) -> None:
        """Adds vectors x (n, dim) with ids (n,) int64 in 0 .. 2**63 - 1 (default: after the largest
        id this index has held, removed ones too; a loaded index: after its saved ids). An id the index holds already is replaced (ntotal unchanged); within one call the
        last vector of an id wins. x may be an array, a tensor, an np.memmap or the path of a .npy
        file: it is converted and encoded chunk_rows rows at a time, and the pages of a mapped
        source are let go after each chunk, so a file larger than RAM adds in bounded memory: the
        index's row arrays at their new size, written in place, plus one chunk (an IVF index reads
        the source twice, first for each row's list). Waits for running searches; searches started
        meanwhile wait for it; a failure leaves the index as it was."""
        self._need_trained("add")
        src = open_source(x, self.dim)
        chunk_rows = _backend.check_number(chunk_rows, "chunk_rows", integer=True, low=1)
        explicit = ids is not None  # automatic ids are new ones
        with self._lock.exclusive():
            ids = self._next_ids(src.shape[0], ids)
            if not src.shape[0]:
                return
            lists = self._lists_of(src, chunk_rows)
            keep = self._last_of_each(ids) if explicit else None
            with _io.guarded(self._mapped):  # the old rows are read from the mapping
                before = self._live, self._ndead
                try:
                    if explicit:
                        self._displace(ids if keep is None else ids[keep])
                    self._merge(src, ids, keep, lists, chunk_rows)
                except BaseException:
                    self._live, self._ndead = before  # _kill replaces _live: the old one is intact
                    raise
                self._largest_id = max(self._largest_id, int(ids.max()))
                self._maybe_compact()
            self._mapped = []  # every array is a new one now

    def _merge(self, src, ids, keep, lists, chunk_rows) -> None:
        """Inserts the rows `keep` (None: all) of src with their ids: every row array is allocated
        once at its new size with the held rows copied to their places, then each chunk of src is
        encoded straight into its rows' places. The index changes only once all of it succeeded."""
        held = self.codes.shape[0]
        new_ids = ids if keep is None else ids[keep]
        dest, offsets = self._placement(
            lists if keep is None or lists is None else lists[keep], new_ids.shape[0]
        )
        to = dest[held:]  # each source row's place (-1: dropped, an id repeated later in src)
        if keep is not None:
            to = np.full(src.shape[0], -1, np.int64)
            to[keep] = dest[held:]

        def placed(old, dtype):
            out = np.empty((dest.shape[0],) + old.shape[1:], dtype)
            out[dest[:held]] = old
            return out

        codes, out_ids = placed(self.codes, np.uint8), placed(self.ids, np.int64)
        vectors = placed(self.vectors, np.float32) if self.keep_vectors else None
        for b, chunk in chunks(src, self.dim, chunk_rows):
            at = to[b : b + chunk.shape[0]]
            c = self._encode_rows(chunk, None if lists is None else lists[b : b + chunk.shape[0]])
            if keep is not None:
                kept = at >= 0
                at, c, chunk = at[kept], c[kept], chunk[kept]
            codes[at] = c
            if vectors is not None:
                vectors[at] = chunk
            del c, chunk
        out_ids[dest[held:]] = new_ids
        live = None
        if self._live is not None:
            live = placed(self._live, np.uint8)
            live[dest[held:]] = 1
        self.codes, self.ids, self.vectors, self._live, self._packed = codes, out_ids, vectors, live, None
        if offsets is not None:
            self.offsets = offsets

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
        run = _backend.choose(f"{type(self).__name__}.search", SEARCH_BACKENDS, device).run
        with self._lock.shared(), _io.guarded(self._mapped):  # zero pages would give wrong results
            return run(self, q, k, refine, allow, **kw)

    def _scan_k(self, nq: int, k: int, refine) -> int:
        """How many results the scan keeps: k (or k * refine candidates), but never more than the
        index holds; the answer is padded to k afterwards. A padded answer past RESULT_PAD_MAX_BYTES
        is refused (k = 10**9 on a small index would otherwise try to allocate it)."""
        if k > self.ntotal and max(nq, 1) * k * 12 > RESULT_PAD_MAX_BYTES:  # (no query: one row's worth)
            raise ValueError(
                f"k = {k} is more than the {self.ntotal} vectors the index holds, and the (nq, k) answer "
                f"padded with -1 would take {max(nq, 1) * k * 12 / 2**30:.1f} GiB; ask for at most ntotal"
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
        return rerank(f"{type(self).__name__}.search", q, self.vectors, rows, k, self.metric)

    @staticmethod
    def _result_buffers(nq: int, k: int):
        return np.empty((nq, k), dtype=np.float32), np.empty((nq, k), dtype=np.int64)

    # ---------------------------------------------------------------- faiss (hotops.integrations.faiss)

    def to_faiss(self, fast_scan: Optional[bool] = None, k_factor: Optional[float] = None):
        """The equivalent faiss index, codes unchanged (see hotops.integrations.faiss.to_faiss);
        k_factor None: the one of the IndexRefineFlat the index came from (from_faiss), else 1."""
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

    def _row_arrays(self) -> dict:
        arrays = {"codes": self.codes, "ids": self.ids}
        if self.keep_vectors:
            arrays["vectors"] = self.vectors
        return arrays

    def _arrays_to_save(self) -> dict:  # the live rows only
        return dict(codebooks=self.codebooks, **(self._live_arrays() if self._ndead else self._row_arrays()))

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
        self.codes, self.ids, self._packed, self._live, self._ndead = codes, ids, None, None, 0
        if self.keep_vectors:
            vectors = arrays["vectors"]
            if vectors.shape != (codes.shape[0], self.dim) or vectors.dtype != np.float32:
                raise ValueError(f"vectors must be float32 ({codes.shape[0]}, {self.dim})")
            self.vectors = vectors


def _search_cpu(index, q, k, refine, allow, **kw):
    """The C++ kernels (NumPy arrays and CPU tensors)."""
    return index._search_cpu(q, k, refine, allow, **kw)


def _search_cuda(index, q, k, refine, allow, **kw):
    """The Triton scan (CUDA tensors)."""
    return index._search_triton(q, k, refine, allow, **kw)


SEARCH_BACKENDS = (
    _backend.Backend("cpu (C++)", _backend.cpu_refuses, _search_cpu),
    _backend.Backend("cuda (Triton)", _backend.triton_refuses, _search_cuda),
)


def _tables_cpu(q, ct, cterm, m, metric):
    """The C++ kernel (NumPy arrays)."""
    out = np.full((q.shape[0], m, TABLE_STRIDE), np.inf, dtype=np.float32)
    _backend.ext().ann_tables(q, ct, cterm, metric, out, _arrays.threads())
    return out


TABLES_BACKENDS = (_backend.Backend("cpu (C++)", _backend.cpu_refuses, _tables_cpu),)


def rerank(op: str, q, base, rows, k: int, metric: str, first=None, fusion: float = 0.0):
    """(score, row) each (nq, k), the best k of each query's candidate rows of `base` (rows
    (nq, c), -1 for none) by exact score, lower is better (negated inner product for ip), plus
    fusion * first (nq, c) where stage-1 scores are given. The exact stage of refine, of the
    bi-granular index and of the sharded index; `op` names the caller in errors."""
    run = _backend.choose(op, RERANK_BACKENDS, torch.device("cpu")).run
    return run(q, base, rows, k, metric, first, fusion)


def _rerank_cpu(q, base, rows, k, metric, first, fusion):
    """The C++ kernel (NumPy arrays)."""
    score = np.empty((q.shape[0], k), dtype=np.float32)
    out = np.empty((q.shape[0], k), dtype=np.int64)
    _backend.ext().ann_rerank(q, base, rows, first, float(fusion), metric, score, out, _arrays.threads())
    return score, out


RERANK_BACKENDS = (_backend.Backend("cpu (C++)", _backend.cpu_refuses, _rerank_cpu),)
