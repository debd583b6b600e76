"""Hard-negative mining for dense-retrieval training (STAR / ANCE style), inside a DDP job or not.

Each rank mines from the index for its own batch: the index is searched with the batch's query
embeddings, the known positives (and any extra false negatives per query) are dropped, and the
best n remaining ids (STAR: or n drawn from the best `depth`) are the hard negatives. With a
ShardedIndex the search is collective, so every rank must call mine() at each step (a rank with
an empty batch passes zero queries).

They compose with hotops.nn.InfoNCELoss(gather=True): the negatives are per-query hard negatives
(B, n, D), which stay local while the in-batch documents are gathered across ranks::

    miner = HardNegativeMiner(sharded_index, n=8, depth=100)
    with torch.no_grad():
        mined = miner.mine(q_emb.detach(), positive_ids)
    hard = doc_encoder(corpus[mined.ids])        # ANCE: re-encode; STAR: mined.vectors (fixed)
    loss = InfoNCELoss(gather=True)(q_emb, d_emb, hard)
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple, Optional

import numpy as np
import torch

from hotops.ann import _arrays


class MinedNegatives(NamedTuple):
    ids: torch.Tensor  # (B, n) int64, -1 where fewer than n negatives were found
    distances: torch.Tensor  # (B, n) the index's distances (inf / -inf where absent)
    vectors: Optional[torch.Tensor]  # (B, n, dim) float32 (zeros where absent), with_vectors=True


class HardNegativeMiner:
    """HardNegativeMiner(index, n=8, depth=100, sample=False, seed=0, **search_kwargs)

    index: a PQIndex, IVFPQIndex, BiGranularIndex or ShardedIndex (collective). n negatives per
    query, taken among the index's best `depth` after the exclusions: the first n (ANCE's top
    negatives) or, with sample=True, n drawn without replacement (STAR's random hard negatives),
    from a generator seeded with `seed` and advanced once per mine() call (the same on every
    rank unless seeds differ). search_kwargs (nprobe, refine, candidates, ...) go to search().
    """

    def __init__(
        self, index, n: int = 8, depth: int = 100, *, sample: bool = False, seed: int = 0, **search_kwargs
    ):
        self.index = index
        self.n, self.depth = _arrays.check_k(n, "n"), _arrays.check_k(depth, "depth")
        if depth < n:
            raise ValueError(f"depth ({depth}) must be at least n ({n})")
        self.sample, self.search_kwargs = bool(sample), search_kwargs
        self.generator = torch.Generator().manual_seed(int(seed))

    def mine(self, q, positive_ids, exclude=None, *, with_vectors: bool = False) -> MinedNegatives:
        """q (B, dim) query embeddings; positive_ids (B,) or (B, P) ids never returned as negatives
        (the false negatives a search would otherwise surface first); exclude: optional (B, E) more
        ids to skip per query (-1 = none). Returns MinedNegatives on q's device (CPU for NumPy).
        with_vectors: a hotops index is searched and read under one hold of its reader lock (a
        removal from another thread waits for both)."""
        from hotops._collective import raise_together
        from hotops.ann.sharded import ShardedIndex

        device = q.device if _arrays.is_torch(q) else torch.device("cpu")
        sharded = isinstance(self.index, ShardedIndex)
        error, skip = None, torch.empty(0, 0, dtype=torch.int64)
        try:  # a rank of a ShardedIndex that refuses its arguments must not leave the others waiting
            qv = torch.as_tensor(_arrays.as_numpy(q, "q"))
            if qv.dim() != 2:
                raise ValueError(f"q must be (B, dim) query embeddings, got shape {tuple(qv.shape)}")
            B = qv.shape[0]
            skip = [_as_id_matrix(positive_ids, B, "positive_ids")]
            if exclude is not None:
                skip.append(_as_id_matrix(exclude, B, "exclude"))
            skip = torch.cat(skip, 1)
        except (TypeError, ValueError) as exc:
            if not sharded:
                raise
            error = f"{type(exc).__name__}: {exc}"
        # enough to keep `depth` after dropping every excluded id that could appear; a sharded
        # search is collective, so every rank asks for the widest rank's k (exclude widths differ)
        width = skip.shape[1]
        if sharded:
            width = max(raise_together(error, self.index.group, "HardNegativeMiner.mine", width))
        k = self.depth + width
        # with_vectors: one read of the index for the search and the reconstruct, so that an id
        # removed by another thread in between cannot make the reconstruct fail (its reader lock
        # is re-entrant: the search's and reconstruct's own shared holds nest inside this one)
        with _read_lock(self.index) if with_vectors else contextlib.nullcontext():
            return self._mine(qv, skip, width, k, device, with_vectors)

    def _mine(self, qv, skip, width, k, device, with_vectors) -> MinedNegatives:
        from hotops._collective import fail_together
        from hotops.ann.sharded import ShardedIndex

        refused = None
        try:
            dist, ids = self.index.search(qv.detach().float().cpu().numpy(), k, **self.search_kwargs)
        except ValueError as exc:
            refused = ValueError(
                f"HardNegativeMiner: the index refused the search (k = depth {self.depth} + "
                f"{width} positive and excluded ids per query = {k}): {exc}"
            )
            refused.__cause__ = exc
        if with_vectors and isinstance(self.index, ShardedIndex):
            # a sharded search raises on the asking rank alone for an id held by two shards (it
            # checks after its last collective); the other ranks would wait in vectors()
            fail_together(refused, self.index.group, "HardNegativeMiner.mine")
        elif refused is not None:
            raise refused
        # the first depth + own width columns hold the `depth` kept ones: the rest would only
        # change the random draw with the other ranks' widths
        own = self.depth + skip.shape[1]
        dist, ids = torch.as_tensor(dist)[:, :own], torch.as_tensor(ids)[:, :own]
        keep = (ids >= 0) & ~(ids.unsqueeze(2) == skip.unsqueeze(1)).any(2)
        # keep the first `depth` kept ones per row, in rank order
        rank_in_kept = torch.cumsum(keep.to(torch.int64), 1) - 1
        keep &= rank_in_kept < self.depth
        if self.sample:
            noise = torch.rand(ids.shape, generator=self.generator)
            prio = torch.where(keep, noise, torch.full_like(noise, 2.0))
        else:
            prio = torch.where(
                keep, rank_in_kept.to(torch.float64), torch.full(ids.shape, float("inf"), dtype=torch.float64)
            )
        take = torch.argsort(prio, dim=1, stable=True)[:, : self.n]
        valid = torch.gather(keep, 1, take)  # the search returned depth + E >= n columns
        if self.sample:  # sampled negatives in rank order
            order = torch.argsort(torch.where(valid, take, take.new_full(take.shape, 1 << 62)), 1)
            take, valid = torch.gather(take, 1, order), torch.gather(valid, 1, order)
        neg = torch.where(valid, torch.gather(ids, 1, take.clamp(max=ids.shape[1] - 1)), -1)
        nd = torch.gather(dist, 1, take.clamp(max=ids.shape[1] - 1))
        absent = float("-inf") if getattr(self.index, "metric", "l2") == "ip" else float("inf")
        nd = torch.where(valid, nd, torch.full_like(nd, absent))
        vectors = None
        if with_vectors:
            vectors = self._vectors(neg).to(device)
        return MinedNegatives(neg.to(device), nd.to(device), vectors)

    def _vectors(self, neg: torch.Tensor) -> torch.Tensor:
        """Exact vectors of the mined ids (collective for a ShardedIndex); zeros for -1. Read
        through the index's own lookup, which sees re-added ids' new vectors and takes its lock."""
        from hotops.ann.bigran import BiGranularIndex
        from hotops.ann.sharded import ShardedIndex

        flat = neg.reshape(-1).numpy()
        have = flat >= 0
        if isinstance(self.index, ShardedIndex):
            found = self.index.vectors(flat[have])
        elif isinstance(self.index, BiGranularIndex) or getattr(self.index, "keep_vectors", False):
            found = np.asarray(self.index.reconstruct(flat[have]), np.float32)
        else:
            raise ValueError(
                "with_vectors needs the exact vectors: an index that keeps them (keep_vectors=True, "
                "a BiGranularIndex, or a FaissPQIndex with refine=True)"
            )
        out = np.zeros((flat.size, found.shape[1]), np.float32)
        out[have] = found
        return torch.from_numpy(out).reshape(neg.shape[0], neg.shape[1], out.shape[1])


def _read_lock(index):
    """The index's reader lock held across a search and a reconstruct (the one a BiGranularIndex's
    coarse index guards both with), or nothing: a ShardedIndex changes only by collective calls,
    which cannot run beside a collective mine(); an index of another kind has no lock to take."""
    from hotops.ann._sync import RWLock
    from hotops.ann.bigran import BiGranularIndex

    inner = index.coarse if isinstance(index, BiGranularIndex) else index
    lock = getattr(inner, "_lock", None)
    return lock.shared() if isinstance(lock, RWLock) else contextlib.nullcontext()


def _as_id_matrix(ids, B: int, name: str) -> torch.Tensor:
    a = torch.as_tensor(_arrays.as_numpy(ids, name)).cpu()
    if a.dtype.is_floating_point or a.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer ids, got {a.dtype}")
    shape = tuple(a.shape)
    a = a.to(torch.int64)
    if a.dim() == 1:
        a = a.unsqueeze(1)
    if a.dim() != 2 or a.shape[0] != B:
        raise ValueError(f"{name} must be ({B},) or ({B}, P) ids, one row per query, got shape {shape}")
    return a
