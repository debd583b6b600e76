"""ShardedIndex: one index spread over the ranks of a torch.distributed job, one shard per rank.

Every rank holds one shard (a PQIndex, IVFPQIndex or BiGranularIndex trained with the same
codebooks) and calls search() collectively with its own queries (any count, 0 included). The
answer on each rank is what one index holding every shard would give for that rank's queries:

1. the queries of all ranks are gathered, so each shard scans every query;
2. each shard's top candidates (k, or R·k with refine, or `candidates` for the bi-granular index)
   go back to the rank that asked (all_to_all), which merges them in the order (score, id);
3. with refine (and for the bi-granular index), the merged best R·k candidates are sent to the
   shards that hold them, which compute their exact scores (the same kernel as a single index's
   re-rank), and the asker keeps the best k, again in the order (score, id).

Results are ordered by (distance, id): among equal distances the smaller id comes first.

The distributed build (build_sharded) trains on a sample (gathered from every rank, or rank 0's),
broadcasts the trained quantizers, lets each rank encode and add its own part, save its shard,
and has rank 0 write a JSON manifest that ShardedIndex.load() opens (memory-mapped) and checks."""

from __future__ import annotations

import json
import os
import zlib
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from hotops._collective import (
    all_gather_rows,
    all_to_all,
    comm_device,
    exchange,
    fail_together,
    raise_together,
    shared_values,
)
from hotops.ann import _arrays
from hotops.ann._mutable import as_id_list
from hotops.ann._pq import rerank
from hotops.ann.bigran import BiGranularIndex
from hotops.ann.index import IVFPQIndex, PQIndex
from hotops.ann.shard_build import (  # noqa: F401 (re-exported)
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    _set_trained_state,
    _trained_state,
    build_sharded,
    trained_fingerprint,
)

_KINDS = {"PQIndex": PQIndex, "IVFPQIndex": IVFPQIndex}


def _allow_hash(allow) -> int:
    """A digest of an allow-list (0 for None), to check that every rank passed the same. CRC-32 of
    the bytes beside the dtype and shape's: it catches a rank's mistake (no adversary), at ~4 GB/s
    where a cryptographic hash took 13 ms per search for a 10M-entry mask."""
    if allow is None:
        return 0
    a = np.ascontiguousarray(_arrays.as_numpy(allow, "allow"))
    head = zlib.crc32(f"{a.dtype.str}{a.shape}".encode()) & 0x7FFFFFFF  # 63 bits in all: an int64
    return (head << 32 | zlib.crc32(memoryview(a).cast("B"))) or 1


def _ranks(group, a: int, b: int) -> str:
    """Group ranks a and b, named with their global ranks in a subgroup."""
    if group is None or dist.get_world_size(group) == dist.get_world_size():
        return f"ranks {a} and {b}"
    ga, gb = dist.get_global_rank(group, a), dist.get_global_rank(group, b)
    return f"ranks {a} and {b} of the group (global ranks {ga} and {gb})"


def _merge(score: np.ndarray, gid: np.ndarray, k: int):
    """Per row, the k best by (score, id), absent entries (id -1, score inf) last: returns
    (order, score, id). The rows are runs already sorted by (score, id) (one per shard), which a
    stable sort by score merges quickly; rows with equal finite scores are sorted again by id."""
    order = np.argsort(score, axis=1, kind="stable")
    s = np.take_along_axis(score, order, 1)
    tied = np.flatnonzero(((s[:, 1:] == s[:, :-1]) & np.isfinite(s[:, 1:])).any(1))
    if tied.size:
        key = np.where(gid[tied] < 0, np.iinfo(np.int64).max, gid[tied])
        order[tied] = np.lexsort((key, score[tied]), axis=-1)
    order = np.ascontiguousarray(order[:, :k])
    return order, np.take_along_axis(score, order, 1), np.take_along_axis(gid, order, 1)


# ---------------------------------------------------------------------- the index


class ShardedIndex:
    """One shard per rank of `group` (default: the whole job); search() is collective.

    ShardedIndex(local_index, group=None, id_offset=None): `local_index` is this rank's PQIndex,
    IVFPQIndex or BiGranularIndex; all shards must share their trained codebooks (and coarse
    quantizer). PQ and IVF-PQ shards hold global ids already (add them with ids=...); a
    bi-granular shard's ids are rows of its own store, and id_offset (default: the rows of the
    stores of the ranks before) turns them into global ids.
    """

    def __init__(self, local_index, group=None, id_offset: Optional[int] = None):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "ShardedIndex needs torch.distributed: call torch.distributed.init_process_group first"
            )
        self.local, self.group = local_index, group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        error, info = None, None
        try:  # a rank that refuses its shard alone would leave the others in the gather below
            if not isinstance(local_index, (PQIndex, IVFPQIndex, BiGranularIndex)):
                raise TypeError(
                    f"local_index must be a PQIndex, IVFPQIndex or BiGranularIndex, "
                    f"got {type(local_index).__name__}"
                )
            self.bigran = isinstance(local_index, BiGranularIndex)
            self.pq = local_index.coarse if self.bigran else local_index
            if not self.pq.is_trained:
                raise ValueError("local_index is not trained: every shard needs the shared trained codebooks")
            self._check_offset(id_offset)
            info = dict(
                fingerprint=trained_fingerprint(self.pq),
                dim=self.pq.dim,
                ntotal=self.local.ntotal,
                rows=self._local_rows(),
                kind=type(local_index).__name__,
            )
        except (TypeError, ValueError) as exc:
            error = exc
        infos = [None] * self.world_size
        dist.all_gather_object(infos, info, group=group)
        if error is not None:
            raise error
        refused = [r for r, i in enumerate(infos) if i is None]
        if refused:
            raise ValueError(
                f"ShardedIndex: rank(s) {refused} of the group refused their shard (see their error)"
            )
        odd = [
            r
            for r, i in enumerate(infos)
            if (i["fingerprint"], i["kind"]) != (infos[0]["fingerprint"], infos[0]["kind"])
        ]
        if odd:
            raise ValueError(
                f"the shards do not share their trained codebooks/coarse quantizer (or kind): ranks "
                f"{odd} differ from rank 0 ({infos[0]['kind']}); train once and broadcast "
                f"(see build_sharded)"
            )
        self.shard_ntotal = [int(i["ntotal"]) for i in infos]  # kept current by the collective changes
        if id_offset is None:
            id_offset = sum(int(i["rows"]) for i in infos[: self.rank]) if self.bigran else 0
        self.id_offset = int(id_offset)
        self._refuse_shared_ids()

    def _check_offset(self, id_offset) -> None:
        """A given id_offset: a bi-granular shard's, keeping its global ids in 0 .. 2**63 - 1
        (search takes a negative id for "no result"; past 2**63 - 1 they wrap)."""
        if id_offset is None:
            return
        if isinstance(id_offset, bool) or not isinstance(id_offset, (int, np.integer)):
            raise TypeError(f"id_offset must be an integer, got {type(id_offset).__name__} {id_offset!r}")
        if not self.bigran:
            if id_offset != 0:
                raise ValueError(
                    "id_offset applies to bi-granular shards only: PQ and IVF-PQ shards hold global ids "
                    "(add them with ids=...)"
                )
            return
        last = int(id_offset) + max(self._local_rows() - 1, 0)
        if id_offset < 0 or last > _arrays.INT64_MAX:
            raise ValueError(
                f"id_offset {int(id_offset)} puts this shard's ids outside 0 .. 2**63 - 1 "
                f"({self._local_rows()} store rows)"
            )

    def _refuse_shared_ids(self) -> None:
        """Refuses, on every rank, shards that hold one global id twice (built with overlapping ids
        or id_offsets): a single index never does, and a search would answer that id twice."""
        shared = shared_values(self.pq._live_ids() + self.id_offset, self.group)
        if shared is not None:
            count, gid, a, b = shared
            raise ValueError(
                f"ShardedIndex: {count} id(s) held by more than one shard, e.g. id {gid} on "
                f"{_ranks(self.group, a, b)}; give every vector one global id on one shard "
                f"(ShardedIndex.add moves re-added ids)"
            )

    # -------------------------------------------------------------- properties

    @property
    def dim(self) -> int:
        return self.pq.dim

    @property
    def metric(self) -> str:
        return self.pq.metric

    @property
    def ntotal(self) -> int:
        """Vectors over all shards."""
        return sum(self.shard_ntotal)

    def _local_rows(self) -> int:
        return int(self.local.store.shape[0]) if self.bigran else self.pq.ntotal

    # -------------------------------------------------------------- search

    def search(
        self,
        q,
        k: int = 10,
        *,
        refine: Optional[int] = None,
        candidates: Optional[int] = None,
        nprobe: Optional[int] = None,
        fusion: float = 0.0,
        allow=None,
    ):
        """Collective: (distances, ids), each (nq, k), for this rank's queries (nq may be 0),
        equal to a single index holding every shard. PQ/IVF-PQ: refine=R re-ranks the global best
        R·k PQ candidates exactly (keep_vectors=True on every shard). Bi-granular: the global
        best `candidates` (default 200) are re-ranked exactly (+ fusion · PQ score). nprobe goes to
        IVF shards; allow is a global id array or a boolean mask over global ids."""
        torch_out, device = _arrays.is_torch(q), (q.device if _arrays.is_torch(q) else torch.device("cpu"))
        error, qv, kk = None, None, 0
        try:  # a rank that refuses its arguments must not leave the others waiting: see below
            qv, kk, extra = self._check_search(q, k, refine, candidates, nprobe, fusion)
            ahash = _allow_hash(allow)
        except (TypeError, ValueError) as exc:
            error = exc
        cdev = comm_device(self.group)

        # 1. everyone's query count and settings (which must agree), then the queries in rank order
        fbits = int(np.array(float(fusion) if error is None else 0.0, np.float64).view(np.int64))
        settings = [0] * 5 if error else [kk, int(k), int(refine or 0), extra.get("nprobe", 0), ahash]
        heads = torch.tensor(exchange([-1 if error else qv.shape[0]] + settings + [fbits], self.group))
        if error is not None:
            raise error
        bad = torch.nonzero(heads[:, 0] < 0).flatten().tolist()
        if bad:
            raise ValueError(f"ShardedIndex.search: rank(s) {bad} of the group refused their arguments")
        if not bool((heads[:, 1:] == heads[0, 1:]).all()):
            raise ValueError(
                "ShardedIndex.search: k, refine, candidates, nprobe, fusion and allow must be the same on "
                "every rank (each shard scans every rank's queries with them); got (depth, k, refine, "
                f"nprobe, allow hash, fusion bits) {heads[:, 1:].tolist()} by rank"
            )
        counts = heads[:, 0].tolist()
        nq = counts[self.rank]
        qall_t = all_gather_rows(torch.from_numpy(qv).to(cdev), counts, self.group)
        qall = qall_t.cpu().numpy()

        # 2. this shard's candidates for every query
        # CUDA queries: the shard scans on their device (the Triton path), the merge runs on the CPU
        scan_q = qall_t.to(device) if device.type == "cuda" else qall
        error = None
        try:  # e.g. a mapped shard file changed underneath: the others would wait in all_to_all
            score_l, ids_l = self._local_topk(scan_q, kk, allow=self._local_allow(allow), **extra)
        except (OSError, ValueError) as exc:
            error = exc
        fail_together(error, self.group, "ShardedIndex.search")
        gid_l = np.where(ids_l >= 0, ids_l + self.id_offset, -1)
        send = [c * kk for c in counts]
        recv = [nq * kk] * self.world_size
        score = all_to_all(torch.from_numpy(score_l).reshape(-1).to(cdev), send, recv, self.group)
        gid = all_to_all(torch.from_numpy(gid_l).reshape(-1).to(cdev), send, recv, self.group)
        # (world, nq, kk) -> (nq, world * kk): candidate j of shard s sits at column s * kk + j
        W = self.world_size
        score = score.cpu().numpy().reshape(W, nq, kk).transpose(1, 0, 2).reshape(nq, W * kk)
        gid = gid.cpu().numpy().reshape(W, nq, kk).transpose(1, 0, 2).reshape(nq, W * kk)
        order, score, gid = _merge(score, gid, kk)

        if refine or self.bigran:
            score, gid = self._rerank(qall, ids_l, score_l, counts, order, gid, kk, fusion, cdev)
            order, score, gid = _merge(score, gid, k)
        score, gid = score[:, :k], gid[:, :k]
        # one id on two shards (the constructor refuses it and add() keeps them apart, but a shard
        # changed through its own index since) would be answered twice; checked here, after the
        # last collective, so on the asking rank alone
        srt = np.sort(gid, axis=1)
        dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
        if dup.any():
            raise ValueError(
                f"ShardedIndex.search: id {int(srt[:, 1:][dup][0])} is held by more than one shard; "
                f"give every vector one global id on one shard (ShardedIndex.add moves re-added ids)"
            )
        if score.shape[1] < k:  # fewer candidates than k in all
            score = np.pad(score, ((0, 0), (0, k - score.shape[1])), constant_values=np.inf)
            gid = np.pad(gid, ((0, 0), (0, k - gid.shape[1])), constant_values=-1)
        score = np.where(gid < 0, np.float32(np.inf), score).astype(np.float32)
        out = -score if self.metric == "ip" else score
        if torch_out:
            return torch.from_numpy(out).to(device), torch.from_numpy(np.ascontiguousarray(gid)).to(device)
        return out, np.ascontiguousarray(gid)

    def _check_search(self, q, k, refine, candidates, nprobe, fusion):
        """(queries as float32 NumPy, candidates per shard, search kwargs) after the checks."""
        k = _arrays.check_k(k)
        if self.bigran:
            if refine is not None:
                raise ValueError(
                    "refine does not apply to a bi-granular shard: it always re-ranks `candidates`"
                )
            candidates = _arrays.check_k(200 if candidates is None else candidates, "candidates")
            if candidates < k:
                raise ValueError(f"candidates ({candidates}) must be at least k ({k})")
            if not np.isfinite(fusion):
                raise ValueError(f"fusion must be finite, got {fusion!r}")
        else:
            if candidates is not None or fusion != 0.0:
                raise ValueError("candidates and fusion apply to bi-granular shards only")
            if refine is not None:
                refine = _arrays.check_k(refine, "refine")
                if not self.pq.keep_vectors:
                    raise ValueError(
                        "refine needs the exact vectors: build the shards with keep_vectors=True"
                    )
        extra = {}
        if isinstance(self.pq, IVFPQIndex):
            nprobe = min(16, self.pq.nlist) if nprobe is None else nprobe
            if (
                isinstance(nprobe, bool)
                or not isinstance(nprobe, (int, np.integer))
                or not 1 <= nprobe <= self.pq.nlist
            ):
                raise ValueError(f"nprobe must be an integer in 1..nlist = {self.pq.nlist}, got {nprobe!r}")
            extra["nprobe"] = int(nprobe)
        elif nprobe is not None:
            raise ValueError("nprobe applies to IVFPQIndex shards only")
        qv = _arrays.as_vectors(q, "queries", self.dim)
        return qv, (candidates if self.bigran else (k * refine if refine else k)), extra

    def _local_topk(self, q, k: int, **kw):
        """This shard's best k by (score, id): (scores (n, k) lower-is-better, local ids). The scan
        keeps an arbitrary subset of the scores tied at its k-th place, so a query whose (k+1)-th
        score equals its k-th is searched again with twice the depth until the tie is inside."""
        n = q.shape[0]
        score = np.full((n, k), np.inf, np.float32)
        ids = np.full((n, k), -1, np.int64)
        todo, depth, limit = np.arange(n), k + 1, max(self.pq.ntotal, 1)
        while todo.size:
            d, i = self.pq.search(
                q[torch.from_numpy(todo).to(q.device)] if _arrays.is_torch(q) else q[todo],
                min(depth, limit),
                **kw,
            )
            d, i = _arrays.as_numpy(d, "distances"), _arrays.as_numpy(i, "ids")
            s = np.where(i >= 0, -d if self.metric == "ip" else d, np.inf).astype(np.float32)
            _, top_s, top_i = _merge(s, i, k)  # the scan's output is sorted by score already
            w = top_s.shape[1]
            score[todo, :w], ids[todo, :w] = top_s, top_i
            if depth >= limit or s.shape[1] <= k:
                break
            tied = np.isfinite(s[:, -1]) & (s[:, -1] == score[todo, k - 1])
            todo, depth = todo[tied], depth * 2
        return score, ids

    def _rerank(self, qall, ids_l, score_l, counts, order, gid, kk, fusion, cdev):
        """Phase 2: the owners score the merged candidates exactly; returns (nq, kk) (score, id)."""
        W, nq, start = self.world_size, counts[self.rank], sum(counts[: self.rank])
        src, pos = np.divmod(order, kk)  # the shard holding each chosen candidate, its place there
        sel = (gid >= 0).reshape(-1)
        qi = np.repeat(np.arange(nq, dtype=np.int64), order.shape[1])
        s_src = src.reshape(-1)[sel]
        by_src = np.argsort(s_src, kind="stable")  # grouped by shard, queries ascending inside
        req = np.stack([qi[sel][by_src] + start, pos.reshape(-1)[sel][by_src]], 1)  # (global query, place)
        send = np.bincount(s_src, minlength=W).tolist()
        recv = all_to_all(torch.tensor(send, dtype=torch.int64, device=cdev), [1] * W, [1] * W, self.group)
        recv = recv.cpu().tolist()
        asked = all_to_all(torch.from_numpy(np.ascontiguousarray(req)).to(cdev), send, recv, self.group)
        error = None
        try:  # reads the kept vectors or the store, which may be a changed mapping
            exact = self._exact(qall, ids_l, score_l, asked.cpu().numpy(), fusion)
        except (OSError, ValueError) as exc:
            error = exc
        fail_together(error, self.group, "ShardedIndex.search (re-rank)")
        back = all_to_all(torch.from_numpy(exact).to(cdev), recv, send, self.group).cpu().numpy()
        out = np.full(order.size, np.inf, dtype=np.float32)
        flat = np.empty(back.shape[0], np.float32)
        flat[by_src] = back
        out[sel] = flat
        return out.reshape(order.shape), gid

    def _exact(self, qall, ids_l, score_l, asked: np.ndarray, fusion: float) -> np.ndarray:
        """Exact scores (+ fusion · PQ score for bi-granular) of (query, candidate position)
        pairs of this shard, from the same kernel a single index re-ranks with: one row per pair
        (the pair's query, one candidate), so each score comes back in the pair's place."""
        if asked.shape[0] == 0:
            return np.empty(0, np.float32)
        gq, pos = asked[:, 0], asked[:, 1]
        local_ids = ids_l[gq, pos]
        if self.bigran:
            base, rows = self.local.store, local_ids
        else:
            base, rows = self.pq.vectors, self._rows_of(local_ids)
        first = np.ascontiguousarray(score_l[gq, pos].reshape(-1, 1)) if self.bigran else None
        score, _ = rerank(
            "ShardedIndex.search",
            np.ascontiguousarray(qall[gq]),
            base,
            np.ascontiguousarray(rows.reshape(-1, 1)),
            1,
            self.metric,
            first,
            fusion,
        )
        return score.reshape(-1)

    def _rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Live rows of this shard holding the given ids, -1 where none does."""
        return self.pq._held_rows(ids)

    def _local_allow(self, allow):
        """A global allow-list as this shard's (bi-granular shards hold rows, not global ids)."""
        if allow is None or not self.bigran:
            return allow
        a = _arrays.as_numpy(allow, "allow")
        n = self._local_rows()
        if a.dtype == np.bool_:
            part = a[self.id_offset : self.id_offset + n]
            return np.concatenate([part, np.zeros(n - part.shape[0], np.bool_)])
        a = a.astype(np.int64) - self.id_offset
        return a[(a >= 0) & (a < n)]

    # -------------------------------------------------------------- vectors

    def vectors(self, ids, exact: bool = True) -> np.ndarray:
        """Collective: (n, dim) float32 exact vectors of the given global ids (this rank's list, any
        length) from the shards that hold them (kept vectors, or the bi-granular store; with
        exact=False, decoded from the codes where the shards keep no vectors). An id no shard
        holds raises ValueError on every rank."""
        with self.pq._lock.shared():
            return self._vectors(ids, exact)

    def reconstruct(self, ids) -> np.ndarray:
        """Collective: as each shard's reconstruct (exact from kept vectors or the store, else
        decoded), from the shards that hold the ids."""
        return self.vectors(ids, exact=False)

    def _vectors(self, ids, exact: bool) -> np.ndarray:
        error, want = None, np.empty(0, np.int64)
        try:
            a = _arrays.as_numpy(ids, "ids")
            if a.size and not np.issubdtype(a.dtype, np.integer):  # 1.7 must not read id 1's vector
                raise TypeError(f"ids have dtype {a.dtype}; expected integers (int64)")
            want = a.reshape(-1).astype(np.int64)
        except (TypeError, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        raise_together(error, self.group, "ShardedIndex.vectors")
        cdev = comm_device(self.group)
        counts = [n for (n,) in exchange([want.size], self.group)]
        every = all_gather_rows(torch.from_numpy(want).to(cdev), counts, self.group).cpu().numpy()
        found = np.zeros(every.size, np.bool_)
        vec = np.zeros((every.size, self.dim), np.float32)
        if self.bigran:
            local = every - self.id_offset
            found = (local >= 0) & (local < self._local_rows())
            vec[found] = self.local.store[local[found]]
            found[found] = self.pq._held_rows(local[found]) >= 0
        elif (self.pq.keep_vectors or not exact) and self.pq.ntotal:
            rows = self._rows_of(every)
            found = rows >= 0
            vec[found] = (
                self.pq.vectors[rows[found]] if self.pq.keep_vectors else self.pq._decode_rows(rows[found])
            )
        elif not self.pq.keep_vectors and exact:
            raise ValueError("vectors() needs the exact vectors: build the shards with keep_vectors=True")
        # rank r's ids go back to rank r; this rank hears from every shard about its own ids
        answers = [counts[self.rank]] * self.world_size
        got = all_to_all(torch.from_numpy(vec).to(cdev), counts, answers, self.group)
        hit = all_to_all(torch.from_numpy(found.astype(np.int64)).to(cdev), counts, answers, self.group)
        got = got.cpu().view(self.world_size, -1, self.dim).sum(0).numpy()
        hits = hit.cpu().view(self.world_size, -1).sum(0).numpy()
        missing = want[hits == 0]
        raise_together(
            f"ids {missing[:5].tolist()} are held by no shard" if missing.size else None,
            self.group,
            "ShardedIndex.vectors",
        )
        return got

    # -------------------------------------------------------------- changes (collective)

    def _gather_ids(self, ids: np.ndarray):
        """Every rank's ids (in rank order) and the rank each came from."""
        cdev = comm_device(self.group)
        counts = [n for (n,) in exchange([ids.size], self.group)]
        every = all_gather_rows(torch.from_numpy(ids).to(cdev), counts, self.group).cpu().numpy()
        return every, np.repeat(np.arange(self.world_size), counts)

    def _refresh(self, removed: int) -> int:
        """Every shard's ntotal again; the sum over ranks of `removed`."""
        every = exchange([self.local.ntotal, removed], self.group)
        self.shard_ntotal = [n for n, _ in every]
        return sum(r for _, r in every)

    def _local_ids(self, ids: np.ndarray) -> np.ndarray:
        """Global ids as this shard's (bi-granular shards hold store rows)."""
        if not self.bigran:
            return ids
        local = ids - self.id_offset
        return local[(local >= 0) & (local < self._local_rows())]

    def remove_ids(self, ids) -> int:
        """Collective: removes the union of every rank's ids (global ids, any count per rank, 0
        included) from the shards that hold them; returns the number removed over all shards,
        on every rank. ntotal is current afterwards on every rank."""
        error, want = None, np.empty(0, np.int64)
        try:
            want = as_id_list(ids)
        except (TypeError, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        raise_together(error, self.group, "ShardedIndex.remove_ids")
        every, _ = self._gather_ids(want)
        return self._refresh(self.local.remove_ids(self._local_ids(every)))

    def add(self, x, ids) -> None:
        """Collective: each rank adds its own vectors with global ids (any count, 0 included) to
        its own shard; an id that some shard holds already is removed there first, so re-adding
        replaces it wherever it lived (ntotal unchanged), and when several ranks add one id in
        the same call the highest rank's vector wins. PQ and IVF-PQ shards only (a bi-granular
        shard's vectors live in its store file)."""
        error = None
        try:
            if self.bigran:
                raise TypeError("add() on bi-granular shards: their vectors are rows of the store files")
            xv = _arrays.as_vectors(x, "x", self.dim)
            mine = _arrays.as_ids(ids, xv.shape[0])
        except (TypeError, ValueError) as exc:
            error, mine = f"{type(exc).__name__}: {exc}", np.empty(0, np.int64)
        raise_together(error, self.group, "ShardedIndex.add")
        every, src = self._gather_ids(mine)
        later = every[src > self.rank]
        keep = ~np.isin(mine, later) if later.size else np.ones(mine.size, np.bool_)
        with self.pq._lock.exclusive():
            self.pq.remove_ids(every[src != self.rank])
            if keep.any():
                self.pq.add(xv[keep], mine[keep])
        self._refresh(0)

    def compact(self) -> int:
        """Collective: compacts every shard; returns the rows dropped over all shards."""
        return self._refresh(self.local.compact())

    # -------------------------------------------------------------- files

    @classmethod
    def load(cls, manifest, group=None, mmap: bool = True):
        """Collective: opens this rank's shard of a manifest written by build_sharded (one shard per
        rank of `group`), memory-mapped by default. Refuses (ValueError on every rank) a world
        size other than the manifest's, a shard whose size differs from the manifest's, and shards
        whose trained codebooks/coarse quantizer differ from the manifest's fingerprint.

        Rank 0 of the group reads the manifest and sends it to the others, so on machines without
        a shared file system only rank 0's machine needs it; every rank opens its shard at the
        manifest's relative path under the manifest's folder on its own machine."""
        manifest = os.fspath(manifest)
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        error, local, meta = None, None, None
        if rank == 0:
            try:
                with open(manifest) as f:
                    meta = json.load(f)
            except (OSError, ValueError) as exc:
                meta = f"{type(exc).__name__}: {exc}"
        box = [meta]
        dist.broadcast_object_list(
            box, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group
        )
        meta = box[0]
        try:
            if isinstance(meta, str):
                raise ValueError(f"rank 0 could not read the manifest ({meta})")
            if (
                not isinstance(meta, dict)
                or meta.get("format") != MANIFEST_FORMAT
                or meta.get("version") != MANIFEST_VERSION
            ):
                raise ValueError(
                    f"{manifest}: not a hotops sharded-index manifest (version {MANIFEST_VERSION})"
                )
            shards = meta["shards"]
            if len(shards) != world:
                raise ValueError(
                    f"{manifest}: {len(shards)} shards, but the group has {world} ranks (one shard per rank)"
                )
            entry, folder = shards[rank], os.path.dirname(os.path.abspath(manifest))
            path = os.path.join(folder, entry["path"])
            size = os.path.getsize(path)
            if size != entry["bytes"]:
                raise ValueError(f"{path}: {size} bytes, the manifest says {entry['bytes']}")
            local = _KINDS[meta["index_kind"]].load(path, mmap=mmap)
            if local.ntotal != entry["ntotal"]:
                raise ValueError(f"{path}: {local.ntotal} vectors, the manifest says {entry['ntotal']}")
            if trained_fingerprint(local) != meta["trained_sha256"]:
                raise ValueError(
                    f"{path}: its trained codebooks/coarse quantizer differ from the manifest's "
                    f"(a shard of another build?)"
                )
            if "store" in entry:
                local = BiGranularIndex(local, os.path.join(folder, entry["store"]))
        except (OSError, KeyError, TypeError, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        raise_together(error, group, f"ShardedIndex.load({manifest})")
        offset = meta["shards"][rank].get("id_offset") if "store" in meta["shards"][rank] else None
        return cls(local, group, id_offset=offset)
