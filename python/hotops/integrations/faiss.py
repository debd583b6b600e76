"""faiss <-> hotops index conversion, code for code (no re-encoding, no re-training).

`from_faiss(index)` reads a faiss IndexPQ, IndexPQFastScan, IndexIVFPQ (by_residual true or false)
or IndexIVFPQFastScan, optionally inside an IndexRefineFlat (-> keep_vectors, re-rank with
`search(..., refine=R)`) and an IndexIDMap / IndexIDMap2 (-> the ids), and builds the hotops
PQIndex / IVFPQIndex holding the same codebooks, coarse centroids, codes and ids. `to_faiss(index)`
goes the other way. `PQIndex.from_faiss`, `IVFPQIndex.from_faiss` and `.to_faiss()` call these.
`FaissPQIndex` builds a faiss IndexPQ / IndexIVFPQ (+ IndexRefineFlat) from vectors and answers
hotops' `search(q, k, nprobe=, refine=)`, so code written for a hotops index (HardNegativeMiner,
a benchmark's search loop) runs on faiss as it is.

faiss is imported only here, and only when a conversion runs or a FaissPQIndex is built."""

from __future__ import annotations

import copy
import warnings
from typing import Optional

import numpy as np

from hotops.ann import _arrays
from hotops.ann import index as _index


def _faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("converting faiss indexes needs faiss: pip install faiss-cpu") from exc
    return faiss


# ------------------------------------------------------------------ codes


def unpack_codes(packed: np.ndarray, m: int, nbits: int) -> np.ndarray:
    """faiss's PQ code bytes (n, ceil(m * nbits / 8)), codes written least significant bit
    first, -> (n, m) uint8 codes."""
    if nbits == 8:
        return np.ascontiguousarray(packed[:, :m])
    bits = np.unpackbits(packed, axis=1, bitorder="little")[:, : m * nbits].reshape(-1, m, nbits)
    return (bits.astype(np.uint8) << np.arange(nbits, dtype=np.uint8)).sum(-1, dtype=np.uint8)


def pack_codes(codes: np.ndarray, nbits: int) -> np.ndarray:
    """The inverse of unpack_codes: (n, m) codes -> faiss's (n, ceil(m * nbits / 8)) code bytes."""
    if nbits == 8:
        return np.ascontiguousarray(codes, dtype=np.uint8)
    n, m = codes.shape
    bits = (codes[:, :, None] >> np.arange(nbits, dtype=np.uint8)) & 1
    return np.packbits(bits.reshape(n, m * nbits), axis=1, bitorder="little")


def _metric(faiss, index, what: str) -> str:
    if index.metric_type == faiss.METRIC_L2:
        return "l2"
    if index.metric_type == faiss.METRIC_INNER_PRODUCT:
        return "ip"
    raise ValueError(
        f"{what} uses faiss metric {index.metric_type}; hotops indexes score by L2 or inner product only"
    )


def _codebooks(pq) -> np.ndarray:
    if pq.nbits > 8:
        raise ValueError(
            f"the faiss product quantizer has nbits = {pq.nbits}; hotops stores one byte per "
            "sub-space code, so nbits must be 1..8"
        )
    return _faiss().vector_to_array(pq.centroids).reshape(pq.M, pq.ksub, pq.dsub)


def _fastscan_codes(faiss, packer, blocks: np.ndarray, n: int, m: int) -> np.ndarray:
    """The (n, m) 4-bit codes of n vectors in faiss's fast-scan blocks, unpacked by faiss's own
    CodePacker (one call per block of packer.nvec vectors)."""
    nb = (n + packer.nvec - 1) // packer.nvec
    blocks = np.ascontiguousarray(blocks[: nb * packer.block_size])
    flat = np.empty((nb * packer.nvec, packer.code_size), np.uint8)
    for b in range(nb):
        packer.unpack_all(
            faiss.swig_ptr(blocks[b * packer.block_size :]), faiss.swig_ptr(flat[b * packer.nvec :])
        )
    return unpack_codes(flat[:n], m, 4)


# ------------------------------------------------------------------ faiss -> hotops


def _unwrap(faiss, index):
    """IndexIDMap(IndexRefineFlat(core)) and its sub-forms -> (core, id map, refine vectors,
    the refine index's k_factor)."""
    index = faiss.downcast_index(index)
    id_map = vectors = k_factor = None
    if isinstance(index, faiss.IndexPreTransform):
        raise TypeError(
            "IndexPreTransform (OPQ, PCA, ... before the quantizer) does not convert: hotops indexes "
            "quantize the vectors as given, with no transform"
        )
    if isinstance(index, faiss.IndexIDMap):
        id_map = faiss.vector_to_array(index.id_map)
        index = faiss.downcast_index(index.index)
    if isinstance(index, faiss.IndexRefine):
        refine = faiss.downcast_index(index.refine_index)
        if not isinstance(refine, faiss.IndexFlat):
            raise ValueError(
                f"the refine index is a {type(refine).__name__}; hotops keeps exact float32 vectors, "
                "so only IndexRefineFlat (a flat refine index) converts"
            )
        vectors = (
            refine.reconstruct_n(0, refine.ntotal) if refine.ntotal else np.empty((0, refine.d), np.float32)
        )
        base = faiss.downcast_index(index.base_index)
        if isinstance(base, faiss.IndexIDMap):
            raise ValueError(
                "an IndexIDMap inside an IndexRefineFlat does not convert: faiss re-ranks by treating "
                "the base index's labels as rows of the refine index; put the IndexIDMap outside"
            )
        if refine.metric_type != base.metric_type:
            raise ValueError("the refine index and the base index use different metrics")
        k_factor = float(index.k_factor)
        index = base
    return index, id_map, vectors, k_factor


def _remember(out, k_factor: Optional[float]):
    """The faiss refine index's k_factor, to_faiss's default for this index (so a round trip
    gives faiss's own searches back); None without an IndexRefineFlat."""
    out._faiss_k_factor = k_factor
    return out


def _warn_fast_scan(faiss, core, pq):
    """A float-table faiss index of 4-bit codes becomes a hotops fast-scan index: say so. A
    fast-scan index is read through faiss's CodePacker, which unpacks blocks of 32 vectors
    correctly but not the second half of a 64-vector block (bbs=64: its reconstruct_n is wrong
    there too, its search right): refused rather than converted to wrong codes."""
    if isinstance(core, (faiss.IndexPQFastScan, faiss.IndexIVFPQFastScan)) and core.bbs != 32:
        raise ValueError(
            f"the faiss {type(core).__name__} packs its codes in blocks of {core.bbs} vectors; hotops "
            "converts fast-scan indexes built with the default bbs=32 only (faiss.index_factory "
            '"PQ8x4fs" rather than "PQ8x4fs_64")'
        )
    if pq.nbits == 4 and not isinstance(core, (faiss.IndexPQFastScan, faiss.IndexIVFPQFastScan)):
        fast = "IndexIVFPQFastScan" if isinstance(core, faiss.IndexIVF) else "IndexPQFastScan"
        warnings.warn(
            f"the faiss {type(core).__name__} holds 4-bit codes scored with float lookup tables; "
            "hotops searches 4-bit codes only with its fast scan (lookup tables rounded to 8 bits), "
            "so results may differ from faiss's float tables (other ids among near ties, distances "
            f"off by the rounding); to_faiss() returns an {fast} (the same codes), "
            f"to_faiss(fast_scan=False) gives an {type(core).__name__} back",
            UserWarning,
            stacklevel=4,  # the caller of PQIndex.from_faiss / from_faiss
        )


def _finish_ids(ids: np.ndarray, id_map: Optional[np.ndarray], vectors: Optional[np.ndarray]):
    """Row ids of the core index -> user ids (through the id map) and the kept vectors of each row."""
    if vectors is not None:
        if ids.size and (ids.min() < 0 or ids.max() >= vectors.shape[0]):
            raise ValueError(
                "the base index's ids are not rows of the refine index (was it filled through "
                "IndexRefineFlat.add?)"
            )
        vectors = np.ascontiguousarray(vectors[ids], dtype=np.float32)
    if id_map is not None:
        if ids.size and (ids.min() < 0 or ids.max() >= id_map.shape[0]):
            raise ValueError("the index's labels are not rows of the IndexIDMap's id map")
        ids = id_map[ids]
    return np.ascontiguousarray(ids, dtype=np.int64), vectors


def pq_from_faiss(index) -> "_index.PQIndex":
    """A PQIndex with the codebooks, codes and ids of a faiss IndexPQ or IndexPQFastScan (or
    either inside IndexRefineFlat / IndexIDMap)."""
    faiss = _faiss()
    core, id_map, vectors, k_factor = _unwrap(faiss, index)
    if isinstance(core, (faiss.IndexIVF,)):
        raise TypeError(f"{type(core).__name__} is an inverted-file index: use IVFPQIndex.from_faiss")
    if not isinstance(core, (faiss.IndexPQ, faiss.IndexPQFastScan)):
        raise TypeError(f"PQIndex.from_faiss converts IndexPQ and IndexPQFastScan, got {type(core).__name__}")
    if not core.is_trained:
        raise ValueError("the faiss index is not trained")
    pq, n = core.pq, int(core.ntotal)
    books = _codebooks(pq)
    _warn_fast_scan(faiss, core, pq)
    if isinstance(core, faiss.IndexPQFastScan):
        blocks = faiss.rev_swig_ptr(core.codes.get(), core.codes.size()) if n else np.empty(0, np.uint8)
        codes = _fastscan_codes(faiss, core.get_CodePacker(), np.asarray(blocks), n, pq.M)
    else:
        codes = unpack_codes(faiss.vector_to_array(core.codes).reshape(n, core.code_size), pq.M, pq.nbits)
    ids, vectors = _finish_ids(np.arange(n, dtype=np.int64), id_map, vectors)
    out = _index.PQIndex(
        core.d,
        pq.M,
        pq.nbits,
        _metric(faiss, core, type(core).__name__),
        keep_vectors=vectors is not None,
        verbose=False,
    )
    out._restore(dict(codebooks=books, codes=codes, ids=ids, vectors=vectors))
    return _remember(out, k_factor)


def _list_arrays(faiss, invlists, l: int, nbytes: int, count: int):
    """Copies of list l's ids and code bytes (released after, as on-disk lists require)."""
    ids_ptr, codes_ptr = invlists.get_ids(l), invlists.get_codes(l)
    try:
        ids = np.array(faiss.rev_swig_ptr(ids_ptr, count), dtype=np.int64)
        codes = np.array(faiss.rev_swig_ptr(codes_ptr, nbytes), dtype=np.uint8)
    finally:
        invlists.release_ids(l, ids_ptr)
        invlists.release_codes(l, codes_ptr)
    return ids, codes


def ivfpq_from_faiss(index) -> "_index.IVFPQIndex":
    """An IVFPQIndex with the coarse centroids, codebooks, inverted lists (codes and ids) of a faiss
    IndexIVFPQ or IndexIVFPQFastScan (or either inside IndexRefineFlat / IndexIDMap)."""
    faiss = _faiss()
    core, id_map, vectors, k_factor = _unwrap(faiss, index)
    if isinstance(core, faiss.IndexIVFPQR):
        raise TypeError(
            "IndexIVFPQR re-ranks with a second product quantizer, which hotops does not have; "
            "convert an IndexIVFPQ inside an IndexRefineFlat instead"
        )
    if not isinstance(core, (faiss.IndexIVFPQ, faiss.IndexIVFPQFastScan)):
        raise TypeError(
            f"IVFPQIndex.from_faiss converts IndexIVFPQ and IndexIVFPQFastScan, got {type(core).__name__}"
        )
    if not core.is_trained:
        raise ValueError("the faiss index is not trained")
    metric = _metric(faiss, core, type(core).__name__)
    quantizer = faiss.downcast_index(core.quantizer)
    if quantizer.metric_type != core.metric_type:
        raise ValueError(
            f"the coarse quantizer ranks lists by {_metric(faiss, quantizer, 'the quantizer')} but the "
            f"index scores by {metric}; hotops probes the lists by the index's own metric"
        )
    pq, nlist = core.pq, int(core.nlist)
    books = _codebooks(pq)
    _warn_fast_scan(faiss, core, pq)
    coarse = np.ascontiguousarray(quantizer.reconstruct_n(0, nlist), dtype=np.float32)
    invlists = core.invlists
    counts = np.array([invlists.list_size(l) for l in range(nlist)], dtype=np.int64)
    all_ids, all_codes = [], []
    fast = isinstance(core, faiss.IndexIVFPQFastScan)
    packer = core.get_CodePacker() if fast else None
    for l in np.flatnonzero(counts):
        n = int(counts[l])
        if fast:
            nbytes = (n + packer.nvec - 1) // packer.nvec * packer.block_size
            ids, raw = _list_arrays(faiss, invlists, int(l), nbytes, n)
            codes = _fastscan_codes(faiss, packer, raw, n, pq.M)
        else:
            ids, raw = _list_arrays(faiss, invlists, int(l), n * core.code_size, n)
            codes = unpack_codes(raw.reshape(n, core.code_size), pq.M, pq.nbits)
        all_ids.append(ids)
        all_codes.append(codes)
    ids = np.concatenate(all_ids) if all_ids else np.empty(0, np.int64)
    codes = np.concatenate(all_codes) if all_codes else np.empty((0, pq.M), np.uint8)
    ids, vectors = _finish_ids(ids, id_map, vectors)
    out = _index.IVFPQIndex(
        core.d,
        nlist,
        pq.M,
        pq.nbits,
        metric,
        keep_vectors=vectors is not None,
        by_residual=bool(core.by_residual),
        verbose=False,
    )
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    out._restore(dict(codebooks=books, codes=codes, ids=ids, vectors=vectors, coarse=coarse, offsets=offsets))
    return _remember(out, k_factor)


def from_faiss(index):
    """PQIndex or IVFPQIndex, whichever the faiss index is."""
    faiss = _faiss()
    core = _unwrap(faiss, index)[0]
    return ivfpq_from_faiss(index) if isinstance(core, faiss.IndexIVF) else pq_from_faiss(index)


# ------------------------------------------------------------------ hotops -> faiss


def _set_codebooks(faiss, pq, books: np.ndarray):
    faiss.copy_array_to_vector(np.ascontiguousarray(books, dtype=np.float32).ravel(), pq.centroids)


def _wrap(faiss, base, index, k_factor: float):
    """base (filled; its labels are the row numbers 0..n-1 of `index`) inside IndexRefineFlat (kept
    vectors) and IndexIDMap2 (ids other than the row numbers)."""
    out = base
    if index.keep_vectors:
        vectors = np.ascontiguousarray(index.vectors, dtype=np.float32)
        out = faiss.IndexRefineFlat(base, faiss.swig_ptr(vectors))  # copies the vectors
        out.k_factor = float(k_factor)
    if not np.array_equal(index.ids, np.arange(index.ntotal)):
        # faiss wraps only empty indexes: wrap an empty stand-in, then point the map at `out`
        idmap = faiss.IndexIDMap2(faiss.IndexFlat(index.dim, out.metric_type))
        idmap.index, idmap.ntotal = out, out.ntotal
        idmap.referenced_objects.append(out)
        faiss.copy_array_to_vector(np.ascontiguousarray(index.ids, dtype=np.int64), idmap.id_map)
        idmap.construct_rev_map()
        out = idmap
    return out


def to_faiss(index, fast_scan: Optional[bool] = None, k_factor: Optional[float] = None):
    """The faiss index holding `index`'s codebooks, codes (and coarse centroids, lists) unchanged:
    IndexPQ / IndexIVFPQ, or their FastScan forms (fast_scan, default: when nbits = 4), inside an
    IndexRefineFlat when the index keeps vectors, and an IndexIDMap2 when its ids are not 0..n-1
    in row order (IVF lists hold the ids themselves unless the vectors are kept). k_factor: the
    refine index's re-rank factor, as `refine=` of hotops' search; None (the default) takes the
    k_factor of the IndexRefineFlat the index came from (from_faiss), else 1. Search parameters
    (nprobe) are the caller's to set on the result, as in faiss. Removed vectors are left out."""
    faiss = _faiss()
    index._need_trained("to_faiss")
    if k_factor is None:
        k_factor = getattr(index, "_faiss_k_factor", None)
        k_factor = 1.0 if k_factor is None else k_factor
    if index.ndeleted:  # removed rows still in place: export a compacted copy (the index is unchanged)
        index = copy.deepcopy(index)
        index.compact()
    fast_scan = index.fast_scan if fast_scan is None else bool(fast_scan)
    if fast_scan and index.nbits != 4:
        raise ValueError(f"faiss's fast-scan indexes hold 4-bit codes; this index has nbits = {index.nbits}")
    metric = faiss.METRIC_L2 if index.metric == "l2" else faiss.METRIC_INNER_PRODUCT
    packed = pack_codes(np.asarray(index.codes), index.nbits)
    if isinstance(index, _index.IVFPQIndex):
        quantizer = faiss.IndexFlat(index.dim, metric)
        quantizer.add(np.ascontiguousarray(index.coarse))
        base = faiss.IndexIVFPQ(quantizer, index.dim, index.nlist, index.m, index.nbits, metric)
        base.by_residual = index.by_residual
        _set_codebooks(faiss, base.pq, index.codebooks)
        base.is_trained = True
        base.precompute_table()
        # the lists hold row numbers when the vectors are kept (the refine index is indexed by them)
        ids = (
            np.arange(index.ntotal, dtype=np.int64) if index.keep_vectors else np.ascontiguousarray(index.ids)
        )
        for l in range(index.nlist):
            b, e = int(index.offsets[l]), int(index.offsets[l + 1])
            if e > b:
                base.invlists.add_entries(l, e - b, faiss.swig_ptr(ids[b:e]), faiss.swig_ptr(packed[b:e]))
        base.ntotal = index.ntotal
        if fast_scan:
            base = faiss.IndexIVFPQFastScan(base)
        if not index.keep_vectors:
            return base
        return _wrap(faiss, base, index, k_factor)
    base = faiss.IndexPQ(index.dim, index.m, index.nbits, metric)
    _set_codebooks(faiss, base.pq, index.codebooks)
    base.is_trained = True
    if index.ntotal:
        base.add_sa_codes(packed)
    if fast_scan:
        base = faiss.IndexPQFastScan(base)
    return _wrap(faiss, base, index, k_factor)


# ------------------------------------------------------------------ faiss behind hotops' search


class FaissPQIndex:
    """FaissPQIndex(x, m, nlist=None, refine=False, metric="ip", seed=1234)

    A faiss IndexIVFPQ of `nlist` lists (nlist None: a flat IndexPQ) with 8-bit codes, m bytes
    per vector, trained on and filled with the rows of x (ids 0..n-1); with refine=True inside
    an IndexRefineFlat (the float32 vectors kept for an exact re-rank). ``search(q, k,
    nprobe=16, refine=None) -> (distances, ids)`` has the shape of hotops' IVFPQIndex.search
    (refine: candidates per result re-ranked exactly, faiss's k_factor), so hotops code that
    takes an index runs on this one too: ``HardNegativeMiner(FaissPQIndex(x, 48, 64), nprobe=8)``.
    """

    def __init__(
        self,
        x: np.ndarray,
        m: int,
        nlist: Optional[int] = None,
        refine: bool = False,
        metric: str = "ip",
        seed: int = 1234,
    ):
        faiss = _faiss()
        if metric not in ("ip", "l2"):
            raise ValueError(f"metric must be 'ip' or 'l2', got {metric!r}")
        if np.ndim(x) != 2:
            raise ValueError(f"x must be (n, dim) vectors, got shape {np.shape(x)}")
        x = _arrays.as_vectors(x, "x", np.shape(x)[1])  # as hotops' indexes take vectors
        need = max(256, nlist or 0)  # faiss trains 256 centroids per subspace (and nlist lists)
        if x.shape[0] < need:
            raise ValueError(f"FaissPQIndex needs at least {need} vectors to train on, got {x.shape[0]}")
        self.metric, d = metric, x.shape[1]
        fmetric = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
        if nlist is None:
            self.quantizer = None
            self.pq = faiss.IndexPQ(d, m, 8, fmetric)
        else:
            self.quantizer = faiss.IndexFlat(d, fmetric)
            self.pq = faiss.IndexIVFPQ(self.quantizer, d, nlist, m, 8, fmetric)
            self.pq.cp.seed = seed  # the coarse clustering
        self.pq.pq.cp.seed = seed  # the sub-space codebooks (faiss's default seed is 1234 too)
        self.index = faiss.IndexRefineFlat(self.pq) if refine else self.pq
        self.index.train(x)
        self.index.add(x)
        self.refine = refine

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.pq.d)

    @property
    def keep_vectors(self) -> bool:
        """Whether the exact vectors are kept (refine=True), as hotops' indexes say it."""
        return self.refine

    def reconstruct(self, ids) -> np.ndarray:
        """(n, dim) float32 exact vectors of these ids (rows of x) from the refine index."""
        if not self.refine:
            raise ValueError("reconstruct needs the exact vectors: build with refine=True")
        ids = np.asarray(ids, np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.ntotal):
            raise KeyError(f"ids must be in [0, {self.ntotal}), got {ids.min()}..{ids.max()}")
        flat = self.index.refine_index
        return flat.reconstruct_batch(ids) if ids.size else np.empty((0, self.dim), np.float32)

    def search(self, q, k: int = 10, nprobe: int = 16, refine: Optional[int] = None):
        """(distances, ids), each (nq, k), best first: nprobe lists probed (IVF), and with an
        IndexRefineFlat `refine` x k candidates re-ranked exactly (default 1). Refuses what
        hotops' search refuses: queries of another width or not finite, refine without kept
        vectors."""
        faiss = _faiss()
        q = _arrays.as_vectors(q, "queries", self.dim)  # hotops' own checks and messages
        k = _arrays.check_k(k)
        if refine is not None:
            if not self.refine:
                raise ValueError("refine needs the exact vectors: build the FaissPQIndex with refine=True")
            refine = _arrays.check_k(refine, "refine")
        if self.quantizer is not None:
            nlist = int(self.pq.nlist)
            if (
                isinstance(nprobe, bool)
                or not isinstance(nprobe, (int, np.integer))
                or not 1 <= nprobe <= nlist
            ):
                raise ValueError(f"nprobe must be an integer in 1..nlist = {nlist}, got {nprobe!r}")
        base = faiss.SearchParametersIVF(nprobe=nprobe) if self.quantizer is not None else None
        if self.refine:
            params = faiss.IndexRefineSearchParameters(k_factor=refine or 1, base_index_params=base)
        else:
            params = base
        return self.index.search(q, k, params=params)

    def ram_bytes_per_vector(self) -> float:
        """Bytes per vector in RAM: the codes, the ids an IVF list stores beside them (int64),
        and with refine the float32 vectors."""
        faiss = _faiss()
        n = self.index.ntotal
        if self.quantizer is None:
            codes = n * self.pq.pq.code_size  # flat PQ: the ids are the positions
        else:
            lists = faiss.extract_index_ivf(self.index).invlists
            codes = sum(lists.list_size(i) for i in range(lists.nlist)) * (lists.code_size + 8)
        flat = n * self.pq.d * 4 if self.refine else 0
        return (codes + flat) / n
