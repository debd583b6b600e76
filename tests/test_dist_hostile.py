"""The scale-out paths used the way real jobs use them: uneven batches, a rank with no rows,
arguments that differ between ranks. Each case either equals one process holding every rank's
data, or raises on every rank (never a hang, a crash inside the collective library, or a silently
wrong answer)."""

from __future__ import annotations

import _dist
import pytest
import torch

D = 8


def _infonce_inputs(world, rows, pools):
    """Every rank's (q, d, pool or None), from one generator: rank r has rows[r] queries and
    pools[r] pool rows (None: no pool)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for r in range(world):
        q, d = torch.randn(rows[r], D, generator=g), torch.randn(rows[r], D, generator=g)
        h = None if pools[r] is None else torch.randn(pools[r], D, generator=g)
        out.append((q, d, h))
    return out


def _uneven_worker(rank, world, rows, pools, reduction):
    import hotops

    data = _infonce_inputs(world, rows, pools)
    q, d, h = (None if t is None else t.clone().requires_grad_() for t in data[rank])
    loss = hotops.nn.InfoNCELoss(temperature=0.1, gather=True, reduction=reduction)(q, d, h)
    loss.sum().backward()

    # one process holding every rank's rows: the candidates and pools concatenated in rank order
    qa, da = (torch.cat([x[i] for x in data]).requires_grad_() for i in (0, 1))
    pool_parts = [x[2] for x in data if x[2] is not None]
    ha = torch.cat(pool_parts).requires_grad_() if pool_parts else None
    ref = hotops.info_nce(qa, da, ha, temperature=0.1, reduction="none")
    # each rank's loss.sum(): with "mean" a query of rank r counts 1 / rows[r]
    weight = torch.cat([torch.full((n,), 1.0 / max(n, 1) if reduction == "mean" else 1.0) for n in rows])
    (ref * weight).sum().backward()
    start = sum(rows[:rank])
    mine = slice(start, start + rows[rank])
    want = ref.detach()[mine]
    if reduction == "sum":
        want = want.sum()
    elif reduction == "mean":
        want = want.mean() if rows[rank] else torch.zeros(())
    torch.testing.assert_close(loss.detach(), want, rtol=1e-6, atol=1e-6)
    # gradients: every rank's loss reaches this rank's candidates; the gathered backward sums them
    torch.testing.assert_close(q.grad, qa.grad[mine], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d.grad, da.grad[mine], rtol=1e-5, atol=1e-6)
    if h is not None:
        p0 = sum(p or 0 for p in pools[:rank])
        torch.testing.assert_close(h.grad, ha.grad[p0 : p0 + pools[rank]], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "rows, pools, reduction",
    [
        ([3, 5, 1], [None, None, None], "sum"),  # uneven batches
        ([4, 0, 2], [2, None, 5], "none"),  # a rank with no rows; pools of different sizes, one absent
        ([2, 6, 0], [3, 3, None], "mean"),  # an empty rank's mean is 0 and still joins the backward
    ],
)
def test_infonce_gather_uneven_ranks_equal_one_process(rows, pools, reduction):
    _dist.run(_uneven_worker, 3, rows, pools, reduction, timeout=150)


def _mismatch_worker(rank, world, case):
    import hotops

    q, d = torch.randn(4, D), torch.randn(4, D, requires_grad=True)
    h = None
    if case == "dtype" and rank == 1:
        q, d = q.bfloat16(), d.detach().bfloat16().requires_grad_()
    if case == "dim" and rank == 1:
        q, d = torch.randn(4, D + 1), torch.randn(4, D + 1, requires_grad=True)
    if case == "hard_kinds":
        h = torch.randn(3, D) if rank == 0 else torch.randn(4, 2, D)
    if case == "local_error" and rank == 1:
        q = torch.randn(4, D + 1)  # refused by this rank alone
    if case == "everyone_empty":
        q, d = q[:0], d[:0]
    # a weight info_nce refuses on one rank only: checked after the gather, it left the other
    # ranks waiting in the backward's all_reduce
    w = None
    if case == "neg_weight":
        w = torch.ones(8)
        w[3] = float("nan") if rank == 1 else 1.0
    match = {
        "dtype": "d has dtype",
        "dim": "dimension",
        "hard_kinds": "hard",
        "local_error": "rank.*1" if rank == 0 else "same dimension",
        "everyone_empty": "non-empty batch",
        "neg_weight": "rank.*1" if rank == 0 else "neg_weight",
    }[case]
    with pytest.raises((TypeError, ValueError), match=match):
        hotops.nn.InfoNCELoss(gather=True)(q, d, h, w).backward()


@pytest.mark.parametrize(
    "case", ["dtype", "dim", "hard_kinds", "local_error", "everyone_empty", "neg_weight"]
)
def test_infonce_gather_mismatch_raises_on_every_rank(case):
    _dist.run(_mismatch_worker, 2, case, timeout=90)


def _autocast_worker(rank, world):
    import hotops

    g = torch.Generator().manual_seed(rank)
    q, d = torch.randn(3 + rank, D, generator=g), torch.randn(3 + rank, D, generator=g)
    loss_fn = hotops.nn.InfoNCELoss(temperature=0.1, gather=True)
    # inside autocast info_nce takes q and d in autocast's dtype, as torch's matmul does: a bf16 q
    # (an autocast encoder's output) beside a float32 d (a cache) is the same loss as two bf16
    dc = d.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(q.bfloat16(), dc)
    loss.backward()
    db = d.bfloat16().requires_grad_()
    want = loss_fn(q.bfloat16(), db)
    want.backward()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(dc.grad, db.grad.float())


def test_infonce_gather_autocast_casts_before_gathering():
    _dist.run(_autocast_worker, 2, timeout=90)


def _compile_worker(rank, world):
    import hotops

    torch.manual_seed(rank)
    enc = torch.nn.Linear(D, D)
    loss_fn = hotops.nn.InfoNCELoss(temperature=0.1, learnable_temperature=True, gather=True)
    x, y = torch.randn(4, D), torch.randn(4, D)

    def step():
        return loss_fn(enc(x), enc(y))

    eager = step()
    eager.backward()
    want = enc.weight.grad.clone()
    enc.weight.grad = None
    # the exchange of counts reads tensor values, which a full graph cannot guard on
    got = torch.compile(step, fullgraph=True, backend="aot_eager")()
    got.backward()
    torch.testing.assert_close(got, eager)
    torch.testing.assert_close(enc.weight.grad, want)


def test_infonce_gather_compiles_fullgraph():
    _dist.run(_compile_worker, 2, timeout=240)


# ---------------------------------------------------------------------- ShardedIndex

ADIM = 16


def _shards(rank, world):
    """A 2-shard flat PQ ShardedIndex of 400 vectors (ids dealt by id % world), its data, queries."""
    import numpy as np

    from hotops.ann import PQIndex, ShardedIndex
    from hotops.ann.sharded import _set_trained_state, _trained_state

    rng = np.random.default_rng(0)
    x, q = rng.normal(size=(400, ADIM)).astype(np.float32), rng.normal(size=(6, ADIM)).astype(np.float32)
    base = PQIndex(ADIM, 4, 8, keep_vectors=True, verbose=False)
    base.train(x)
    idx = PQIndex(ADIM, 4, 8, keep_vectors=True, verbose=False)
    _set_trained_state(idx, _trained_state(base))
    ids = np.arange(400)
    idx.add(x[ids % world == rank], ids[ids % world == rank])
    return ShardedIndex(idx), x, q


def _sharded_mismatch_worker(rank, world, folder):
    import os

    import numpy as np
    import torch.distributed as dist

    from hotops.ann import PQIndex, ShardedIndex, build_sharded

    s, x, q = _shards(rank, world)
    # allow filters every rank's queries on every shard: one rank's list cannot apply to its own
    # queries only, so lists that differ are refused (they let other ids through, silently)
    allow = np.arange(0, 400, 2) if rank == 0 else None
    with pytest.raises(ValueError, match="allow"):
        s.search(q, 10, allow=allow)
    _, ids = s.search(q, 10, allow=np.arange(0, 400, 2))
    assert (ids % 2 == 0).all()

    # ids one rank refuses in vectors(): every rank raises; float ids are not truncated to ints
    with pytest.raises((TypeError, ValueError), match="ids" if rank == 1 else "rank"):
        s.vectors(np.array([1, 2]) if rank == 0 else np.array([1.7]))
    np.testing.assert_array_equal(s.vectors(np.array([1, 2])), x[[1, 2]])

    # build_sharded with parameters that differ between ranks, or ids one rank refuses
    m = 4 if rank == 0 else 8
    with pytest.raises(ValueError, match="differ" if rank == 0 else "differ|m"):
        build_sharded(PQIndex(ADIM, m, 8, verbose=False), x[rank::world], os.path.join(folder, "a"))
    part = x[rank::world]
    ids = np.arange(len(part)) + 1000 * rank
    with pytest.raises(ValueError, match="ids" if rank == 1 else "rank"):
        build_sharded(
            PQIndex(ADIM, 4, 8, verbose=False),
            part,
            os.path.join(folder, "b"),
            ids=ids[:-1] if rank == 1 else ids,
        )

    # a shard's mapped file cut underneath: every rank raises (the others used to wait)
    build_sharded(PQIndex(ADIM, 4, 8, keep_vectors=True, verbose=False), part, os.path.join(folder, "c"))
    s = ShardedIndex.load(os.path.join(folder, "c", "manifest.json"))
    dist.barrier()
    if rank == 1:
        with open(os.path.join(folder, "c", f"shard-00001-of-{world:05d}.hann"), "r+b") as f:
            f.truncate(100)
    with pytest.raises(ValueError, match="changed" if rank == 1 else "rank"):
        s.search(q, 5)


def test_sharded_mismatches_raise_on_every_rank(tmp_path):
    _dist.run(_sharded_mismatch_worker, 2, str(tmp_path), timeout=150)


def _overlap_worker(rank, world):
    import numpy as np

    from hotops.ann import ShardedIndex
    from hotops.ann.mining import HardNegativeMiner

    s, x, q = _shards(rank, world)
    local = s.local
    # shards built with overlapping ids: refused on every rank, naming an id and its two ranks
    if rank == 1:  # ids 0 and 2 (rank 0's) added to rank 1's shard as well
        local.add(x[[0, 2]], np.array([0, 2]))
    with pytest.raises(
        ValueError, match=r"2 id\(s\) held by more than one shard, e.g. id 0 on ranks 0 and 1"
    ):
        ShardedIndex(local)
    if rank == 1:
        local.remove_ids(np.array([0, 2]))
    s = ShardedIndex(local)
    # one added to a shard through its own index afterwards: a single index never holds an id
    # twice, and the answer would list id 0 twice, silently
    if rank == 1:
        local.add(x[[0]], np.array([0]))
    if rank == 0:
        with pytest.raises(ValueError, match="more than one shard"):
            s.search(x[:1], 5)
    else:  # a rank whose answers hold no such id is not affected
        s.search(x[:0], 5)
    s.search(x[3:4], 5)
    # the miner reads the mined vectors in a collective after its search: the rank whose search
    # raised must not leave the other waiting there
    miner = HardNegativeMiner(s, n=2, depth=5)
    with pytest.raises(ValueError, match="more than one shard" if rank == 0 else "rank"):
        miner.mine(x[:1] if rank == 0 else x[3:4], np.array([10 if rank == 0 else 3]), with_vectors=True)


def _bigran_offset_worker(rank, world, folder):
    import numpy as np

    from hotops.ann import BiGranularIndex, PQIndex, ShardedIndex
    from hotops.ann.bigran import write_store
    from hotops.ann.sharded import _set_trained_state, _trained_state

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, ADIM)).astype(np.float32)
    base = PQIndex(ADIM, 4, 8, verbose=False)
    base.train(x)
    coarse = PQIndex(ADIM, 4, 8, verbose=False)
    _set_trained_state(coarse, _trained_state(base))
    mine = x[rank * 200 : (rank + 1) * 200]
    coarse.add(mine, np.arange(200))
    store = f"{folder}/store{rank}.f32"
    write_store(store, mine)
    local = BiGranularIndex(coarse, store)
    assert ShardedIndex(local).ntotal == 400  # default offsets: the rows of the ranks before
    # an offset on one rank that puts its ids past 2**63 - 1 (they wrapped) or below 0 (search
    # reads a negative id as "no result": never found); rank 1 alone raised, rank 0 waited
    for bad in (2**63 - 100, -50):
        with pytest.raises(ValueError, match="outside 0 .. 2..63 - 1" if rank == 1 else r"rank\(s\) \[1\]"):
            ShardedIndex(local, id_offset=bad if rank == 1 else 0)
    with pytest.raises(TypeError if rank == 0 else ValueError, match="id_offset must be an integer|refused"):
        ShardedIndex(local, id_offset=1.5 if rank == 0 else 200)
    # a PQ shard holds global ids: an offset would shift its search answers but not remove_ids
    with pytest.raises(ValueError, match="bi-granular shards only|refused"):
        ShardedIndex(coarse, id_offset=5 if rank == 0 else None)
    untrained = PQIndex(ADIM, 4, 8, verbose=False)
    with pytest.raises(ValueError, match="not trained" if rank == 1 else "refused"):
        ShardedIndex(untrained if rank == 1 else coarse)
    with pytest.raises(
        ValueError, match=r"100 id\(s\) held by more than one shard, e.g. id 100 on ranks 0 and 1"
    ):
        ShardedIndex(local, id_offset=100 * rank)  # rank 1's 100..299 overlap rank 0's 0..199


def _build_overlap_worker(rank, world, folder):
    import os

    import numpy as np

    from hotops.ann import PQIndex, build_sharded

    rng = np.random.default_rng(rank)
    x = rng.normal(size=(300, ADIM)).astype(np.float32)
    ids = np.arange(300) + 200 * rank  # 200..299 on both ranks
    with pytest.raises(ValueError, match=r"100 id\(s\) given on more than one rank, e.g. id 200"):
        build_sharded(PQIndex(ADIM, 4, 8, verbose=False), x, os.path.join(folder, "o"), ids=ids)
    assert not os.path.exists(os.path.join(folder, "o"))  # refused before any file was written
    # an id repeated within one rank's ids is that rank's (add keeps the last vector), not shared
    mine = np.arange(300) + 300 * rank
    mine[1] = mine[0]
    built = build_sharded(PQIndex(ADIM, 4, 8, verbose=False), x, os.path.join(folder, "r"), ids=mine)
    assert built.ntotal == 2 * 299


def test_sharded_id_held_by_two_shards_is_refused(tmp_path):
    _dist.run(_overlap_worker, 2, timeout=90)
    _dist.run(_bigran_offset_worker, 2, str(tmp_path), timeout=90)
    _dist.run(_build_overlap_worker, 2, str(tmp_path), timeout=90)
