"""ShardedIndex over gloo ranks equals one index holding every shard; distributed build + manifest;
hard-negative mining in a distributed job.

One spawn of 4 ranks covers both world sizes: the whole group (4 shards), and two subgroups of 2
ranks ({0, 1} and {2, 3}) that run the same checks side by side (2 shards each)."""

from __future__ import annotations

import os

import _dist
import numpy as np
import pytest
import torch

DIM, N, NQ = 16, 1200, 12
K, R = 5, 3
RANK_QUERIES = {2: [7, 0], 4: [3, 0, 6, 1]}  # uneven, one rank with none


def _data():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(20, DIM)).astype(np.float32) * 3
    x = (centers[rng.integers(0, 20, N)] + rng.normal(size=(N, DIM))).astype(np.float32)
    x[1::97] = x[0::97][: len(x[1::97])]  # exact duplicates: PQ and exact ties across shards
    q = (centers[rng.integers(0, 20, NQ)] + rng.normal(size=(NQ, DIM))).astype(np.float32)
    q[0] = x[0]  # a query on a duplicated vector
    return x, q


def _kinds():
    from hotops.ann import IVFPQIndex, PQIndex

    return {
        "pq8": lambda: PQIndex(DIM, 4, 8, keep_vectors=True, verbose=False),
        "pq4": lambda: PQIndex(DIM, 4, 4, keep_vectors=True, verbose=False),
        "ivf8": lambda: IVFPQIndex(DIM, 16, 4, 8, keep_vectors=True, verbose=False),
        "ivf4": lambda: IVFPQIndex(DIM, 16, 8, 4, keep_vectors=True, verbose=False),
        "ivf8_ip": lambda: IVFPQIndex(DIM, 16, 4, 8, metric="ip", keep_vectors=True, verbose=False),
    }


_TRAINED = {}


def _trained(kind, x):
    """(trained state, a factory of fresh indexes with it); trained once per process and kind."""
    from hotops.ann.sharded import _set_trained_state, _trained_state

    if kind not in _TRAINED:
        idx = _kinds()[kind]()
        idx.train(x)
        _TRAINED[kind] = _trained_state(idx)
    state = _TRAINED[kind]
    return state, lambda: _fresh(kind, state, _set_trained_state)


def _fresh(kind, state, setter):
    idx = _kinds()[kind]()
    setter(idx, state)
    return idx


def _score(dist, metric):
    return -dist if metric == "ip" else dist


def _reference(single, q, k, kw, refine=None, metric="l2", store=None, fusion=0.0, candidates=None):
    """What the sharded search must return, from the single index's full ranking with ties broken
    by id: the best k (or the best R·k / `candidates` re-ranked exactly by the re-rank kernel)."""
    from hotops import _backend
    from hotops.ann import _arrays

    pq = single
    dist, ids = pq.search(q, pq.ntotal, **kw)
    score = _score(dist, metric).astype(np.float32)
    score[ids < 0] = np.inf
    order = np.lexsort((np.where(ids < 0, np.iinfo(np.int64).max, ids), score), axis=-1)
    width = k if refine is None and store is None else (candidates or k * refine)
    top = order[:, :width]
    s, i = np.take_along_axis(score, top, 1), np.take_along_axis(ids, top, 1)
    if refine is None and store is None:
        return _score(s, metric), i
    if store is None:
        by = np.argsort(pq.ids)
        rows = np.where(i >= 0, by[np.searchsorted(pq.ids[by], np.maximum(i, 0))], -1)
        base, first = pq.vectors, None
    else:
        rows, base, first = i, store, np.where(i >= 0, s, 0).astype(np.float32)
    ex_s = np.empty(rows.shape, np.float32)
    ex_r = np.empty(rows.shape, np.int64)
    _backend.ext().ann_rerank(
        np.ascontiguousarray(q),
        base,
        np.ascontiguousarray(rows),
        first,
        float(fusion),
        metric,
        ex_s,
        ex_r,
        _arrays.threads(),
    )
    ex_ids = np.where(ex_r >= 0, pq.ids[np.maximum(ex_r, 0)] if store is None else ex_r, -1)
    o = np.lexsort((np.where(ex_ids < 0, np.iinfo(np.int64).max, ex_ids), ex_s), axis=-1)[:, :k]
    return _score(np.take_along_axis(ex_s, o, 1), metric), np.take_along_axis(ex_ids, o, 1)


def assert_same_up_to_ties(dist_a, ids_a, dist_b, ids_b, tied_ok):
    """Same distances; the same ids except inside a group of equal distances, where both must be
    members of tied_ok(row, distance) (the ids at that distance)."""
    np.testing.assert_array_equal(dist_a, dist_b)
    for r in range(dist_a.shape[0]):
        for d in np.unique(dist_a[r]):
            a, b = set(ids_a[r][dist_a[r] == d].tolist()), set(ids_b[r][dist_b[r] == d].tolist())
            if a != b:
                ok = tied_ok(r, d)
                assert a <= ok and b <= ok, (r, d, a, b, ok)


def _check_equal(got, want, what):
    np.testing.assert_array_equal(got[1], want[1], err_msg=f"{what}: ids")
    np.testing.assert_array_equal(got[0], want[0], err_msg=f"{what}: distances")


def _search_cases(rank, world, group, x, q, tmp):
    """Every index kind, plain and refine, and bi-granular, on the ranks of `group`."""
    import torch.distributed as dist

    from hotops.ann import BiGranularIndex, ShardedIndex, write_store

    grank, gworld = dist.get_rank(group), dist.get_world_size(group)
    counts = RANK_QUERIES[gworld]
    start = sum(counts[:grank])
    mine = q[start : start + counts[grank]]
    owner = np.random.default_rng(1).integers(0, gworld, N)  # ids interleave over the shards
    for kind in _kinds():
        _, make = _trained(kind, x)
        single, shard = make(), make()
        single.add(x, np.arange(N))
        shard.add(x[owner == grank], np.flatnonzero(owner == grank))
        sharded = ShardedIndex(shard, group)
        assert sharded.ntotal == N
        metric = single.metric
        kws = [{}] if kind.startswith("pq") else [{"nprobe": 3}, {"nprobe": 16}]
        for kw in kws:
            got = sharded.search(mine, K, **kw)
            want = _reference(single, mine, K, kw, metric=metric)
            _check_equal(got, want, f"{kind} {kw} world {gworld}")
            # the single index's own answer is the same up to the order inside exact ties
            full_d, full_i = single.search(mine, N, **kw)

            def tied(r, d, full_d=full_d, full_i=full_i):
                return set(full_i[r][full_d[r] == d].tolist())

            own = single.search(mine, K, **kw)
            assert_same_up_to_ties(got[0], got[1], own[0], own[1], tied)
            got_r = sharded.search(mine, K, refine=R, **kw)
            _check_equal(
                got_r,
                _reference(single, mine, K, kw, refine=R, metric=metric),
                f"{kind} {kw} refine world {gworld}",
            )
        if kind == "ivf8":  # an allow-list of global ids
            kw = {"nprobe": 16, "allow": np.arange(0, N, 3)}
            _check_equal(
                sharded.search(mine, K, **kw), _reference(single, mine, K, kw), f"allow world {gworld}"
            )
            # a rank's bad arguments raise there, and on the others instead of leaving them waiting
            bad = mine[:, :3] if grank == gworld - 1 else mine
            with pytest.raises(
                ValueError, match="dimension 3" if grank == gworld - 1 else "refused their arguments"
            ):
                sharded.search(bad, K)
            with pytest.raises(ValueError, match="must be the same on every rank"):
                sharded.search(mine, K + grank)
            # the last rank's shard is empty
            held = (owner == grank) & (owner != gworld - 1)
            part, rest = make(), make()
            part.add(x[held], np.flatnonzero(held))
            rest.add(x[owner != gworld - 1], np.flatnonzero(owner != gworld - 1))
            with_empty = ShardedIndex(part, group)
            for kw in ({"nprobe": 16}, {"nprobe": 16, "refine": R}):
                _check_equal(
                    with_empty.search(mine, K, **kw),
                    _reference(rest, mine, K, {"nprobe": 16}, refine=kw.get("refine")),
                    f"empty shard {kw} world {gworld}",
                )
        tq = sharded.search(torch.from_numpy(mine), K, **kws[0])  # torch in, torch out
        assert (
            isinstance(tq[0], torch.Tensor) and tq[1].dtype == torch.int64 and tq[1].shape == (len(mine), K)
        )

    # bi-granular: each shard a contiguous block of rows with its own store file
    _, make = _trained("ivf8", x)
    bounds = np.linspace(0, N, gworld + 1).astype(int)
    lo, hi = bounds[grank], bounds[grank + 1]
    path = os.path.join(tmp, f"bi-{gworld}-{grank}-{dist.get_rank()}.store")
    write_store(path, x[lo:hi])
    coarse = make()
    coarse.add(x[lo:hi], np.arange(hi - lo))
    sharded = ShardedIndex(BiGranularIndex(coarse, path), group)
    assert sharded.id_offset == lo
    single = make()
    single.add(x, np.arange(N))
    for fusion in (0.0, 0.5):
        got = sharded.search(mine, K, candidates=20, nprobe=4, fusion=fusion)
        want = _reference(single, mine, K, {"nprobe": 4}, store=x, fusion=fusion, candidates=20)
        _check_equal(got, want, f"bigran fusion {fusion} world {gworld}")
    mask = np.arange(N) % 2 == 0  # a boolean allow mask over global ids
    kw = {"nprobe": 4, "allow": mask}
    _check_equal(
        sharded.search(mine, K, candidates=20, **kw),
        _reference(single, mine, K, kw, store=x, candidates=20),
        f"bigran allow world {gworld}",
    )
    np.testing.assert_array_equal(sharded.vectors(np.array([5, N - 1, 0])), x[[5, N - 1, 0]])


def _build_cases(rank, world, group, x, q, tmp):
    """build_sharded -> manifest -> ShardedIndex.load (mmap) round trip, and refused manifests."""
    import json

    import torch.distributed as dist

    from hotops.ann import IVFPQIndex, ShardedIndex, build_sharded

    grank, gworld = dist.get_rank(group), dist.get_world_size(group)
    tag = f"{gworld}-{dist.get_rank() // gworld}"
    part = np.array_split(np.arange(N), gworld)[grank]
    folder = os.path.join(tmp, f"build-{tag}")
    built = build_sharded(
        IVFPQIndex(DIM, 16, 4, 8, keep_vectors=True, verbose=False),
        x[part],
        folder,
        train_sample=x[part][::2],
        group=group,
    )
    loaded = ShardedIndex.load(os.path.join(folder, "manifest.json"), group)
    assert loaded.local._mapped, "ShardedIndex.load(mmap=True) maps its shard"
    mine = q[grank::gworld]
    for kw in ({"nprobe": 4}, {"nprobe": 4, "refine": 2}):
        a, b = built.search(mine, K, **kw), loaded.search(mine, K, **kw)
        _check_equal(a, b, f"built vs loaded {kw}")
    # equal to one index with the same trained quantizers holding the whole corpus
    from hotops.ann.sharded import _set_trained_state, _trained_state

    single = IVFPQIndex(DIM, 16, 4, 8, keep_vectors=True, verbose=False)
    _set_trained_state(single, _trained_state(loaded.local))
    single.add(x, np.arange(N))
    _check_equal(
        loaded.search(mine, K, nprobe=4), _reference(single, mine, K, {"nprobe": 4}), "manifest vs single"
    )

    # a bi-granular build (store files beside the shards)
    bfold = os.path.join(tmp, f"bibuild-{tag}")
    bi = build_sharded(
        IVFPQIndex(DIM, 16, 4, 8, verbose=False), x[part], bfold, store_dtype="float32", group=group
    )
    bl = ShardedIndex.load(os.path.join(bfold, "manifest.json"), group)
    _check_equal(
        bi.search(mine, K, candidates=20), bl.search(mine, K, candidates=20), "bigran built vs loaded"
    )

    # a shard of another build (other training sample) is refused on every rank
    other = os.path.join(tmp, f"other-{tag}")
    build_sharded(
        IVFPQIndex(DIM, 16, 4, 8, keep_vectors=True, verbose=False),
        x[part],
        other,
        train_sample=x[part][1::2],
        group=group,
    )
    mixed = os.path.join(tmp, f"mixed-{tag}")
    if grank == 0:
        os.makedirs(mixed, exist_ok=True)
        with open(os.path.join(folder, "manifest.json")) as f:
            meta = json.load(f)
        with open(os.path.join(other, "manifest.json")) as f:
            bad = json.load(f)["shards"][gworld - 1]
        meta["shards"][gworld - 1] = dict(bad, path=os.path.join("..", os.path.basename(other), bad["path"]))
        with open(os.path.join(mixed, "manifest.json"), "w") as f:
            json.dump(meta, f)
    dist.barrier(group)
    with pytest.raises(ValueError, match=f"rank {gworld - 1}: .*differ from the manifest"):
        ShardedIndex.load(os.path.join(mixed, "manifest.json"), group)
    if gworld == 2:  # 2 ranks cannot open a 4-shard manifest
        with pytest.raises(ValueError, match="one shard per rank"):
            ShardedIndex.load(os.path.join(tmp, "build-4-0", "manifest.json"), group)


def _mining_cases(rank, world, x, q):
    """Each rank mines for its own batch from the sharded index (uneven batches, one empty); the
    same negatives as from a single index; positives and exclusions never come back; the exact
    vectors come from the owning shards. (tests/test_ddp.py feeds them to InfoNCELoss(gather=True).)"""
    from hotops.ann import ShardedIndex
    from hotops.ann.mining import HardNegativeMiner

    _, make = _trained("ivf8", x)
    single, shard = make(), make()
    single.add(x, np.arange(N))
    own = np.arange(N) % world == rank
    shard.add(x[own], np.flatnonzero(own))
    sharded = ShardedIndex(shard)
    B = [3, 2, 0, 2][rank]  # uneven batches, one empty
    rng = np.random.default_rng(10 + rank)
    pos = rng.integers(0, N, B)
    qb = x[pos] + 0.05 * rng.normal(size=(B, DIM)).astype(np.float32)
    # each rank's own exclude width (exclusion_matrix gives a batch its widest row's), one none:
    # the collective search must still ask every shard for the same k
    exclude = None if rank == 3 else np.full((B, 1 + rank), -1)
    if B and exclude is not None:
        exclude[0, 0] = single.search(qb[:1], 2, nprobe=8)[1][0, 1]  # a known false negative
    for sample in (False, True):
        a = HardNegativeMiner(sharded, n=4, depth=10, sample=sample, seed=3, nprobe=8)
        b = HardNegativeMiner(single, n=4, depth=10, sample=sample, seed=3, nprobe=8)
        ma = a.mine(torch.from_numpy(qb), torch.from_numpy(pos), exclude, with_vectors=True)
        mb = b.mine(qb, pos, exclude, with_vectors=True)
        full_d, full_i = single.search(qb, N, nprobe=8)

        def tied(r, d, full_d=full_d, full_i=full_i):
            return set(full_i[r][full_d[r] == d].tolist())

        assert_same_up_to_ties(
            ma.distances.numpy(), ma.ids.numpy(), mb.distances.numpy(), mb.ids.numpy(), tied
        )
        assert ma.ids.shape == (B, 4) and (ma.ids >= 0).all()
        assert not (ma.ids.numpy() == pos[:, None]).any()
        if exclude is not None:
            assert not (ma.ids.numpy()[:, :, None] == exclude[:, None, :]).any()
        np.testing.assert_array_equal(ma.vectors.numpy(), x[ma.ids.numpy()])
    # a rank whose arguments are refused makes every rank raise, none is left waiting
    bad = pos[:, None].repeat(2, 1)[:1] if rank == 1 else pos
    with pytest.raises(ValueError, match="rank 1: ValueError: positive_ids"):
        HardNegativeMiner(sharded, n=4, depth=10, nprobe=8).mine(qb, bad, exclude)


def _worker(rank, world, tmp):
    import torch.distributed as dist

    x, q = _data()
    _search_cases(rank, world, None, x, q, tmp)
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
    _search_cases(rank, world, pairs[rank // 2], x, q, tmp)
    _build_cases(rank, world, None, x, q, tmp)
    dist.barrier()
    _build_cases(rank, world, pairs[rank // 2], x, q, tmp)
    _mining_cases(rank, world, x, q)


def test_sharded_equals_single_index(tmp_path):
    _dist.run(_worker, 4, str(tmp_path), timeout=150)


def test_sharded_needs_init():
    from hotops.ann import PQIndex, ShardedIndex

    with pytest.raises(RuntimeError, match="init_process_group"):
        ShardedIndex(PQIndex(DIM, 4, verbose=False))
