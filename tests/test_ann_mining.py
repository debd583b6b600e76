"""HardNegativeMiner on one process: the exact vectors it returns are the index's current ones
(a re-added id's new vector), refusals that say why. Mining over a ShardedIndex is in
tests/test_ann_sharded.py, over faiss in tests/test_integrations_faiss.py."""

import numpy as np
import pytest
import torch

from hotops.ann import BiGranularIndex, IVFPQIndex, PQIndex, write_store
from hotops.ann.mining import HardNegativeMiner

DIM = 8


def _x(n=400, seed=0):
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def _pq(x):
    index = PQIndex(DIM, 2, 8, "ip", keep_vectors=True, verbose=False)
    index.train(x)
    index.add(x)
    return index


def _ivf(x):
    index = IVFPQIndex(DIM, nlist=4, m=2, nbits=8, metric="ip", keep_vectors=True, verbose=False)
    index.train(x)
    index.add(x)
    return index


@pytest.mark.parametrize("make", [_pq, _ivf])
def test_vectors_are_the_current_ones_after_a_re_add(make):
    x = _x()
    index = make(x)
    new = np.full((1, DIM), 10, np.float32)  # re-adding id 5 replaces its vector
    index.add(new, ids=np.array([5]))
    kw = {"nprobe": 4} if isinstance(index, IVFPQIndex) else {}
    mined = HardNegativeMiner(index, n=3, depth=3, **kw).mine(new, np.array([0]), with_vectors=True)
    assert 5 in mined.ids[0].tolist()  # the largest inner product with itself
    want = x[mined.ids[0].numpy()]
    want[mined.ids[0].numpy() == 5] = new
    np.testing.assert_array_equal(mined.vectors[0].numpy(), want)


def test_vectors_from_a_bigranular_store(tmp_path):
    x = _x()
    write_store(tmp_path / "store.bin", x, "float16")
    index = BiGranularIndex(_pq(x), tmp_path / "store.bin")
    mined = HardNegativeMiner(index, n=4, depth=10).mine(x[:3], np.arange(3), with_vectors=True)
    np.testing.assert_allclose(mined.vectors.numpy(), x[mined.ids.numpy()], rtol=1e-3, atol=1e-3)


def test_refusals_say_why():
    x = _x()
    index = PQIndex(DIM, 2, 8, "ip", verbose=False)
    index.train(x)
    index.add(x)
    miner = HardNegativeMiner(index, n=2, depth=3)
    with pytest.raises(ValueError, match="keep_vectors=True"):
        miner.mine(x[:2], np.arange(2), with_vectors=True)
    with pytest.raises(ValueError, match=r"q must be \(B, dim\)"):
        miner.mine(x[0], np.array([0]))
    with pytest.raises(ValueError, match=r"k = depth 3 \+ 3 positive and excluded ids per query = 6.*refine"):
        HardNegativeMiner(index, n=2, depth=3, refine=2).mine(x[:2], np.arange(2), np.full((2, 2), -1))
    q = x[:2].copy()
    q[1, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        miner.mine(q, np.arange(2))
    mined = miner.mine(torch.from_numpy(x[:0]), torch.empty(0, dtype=torch.int64))
    assert mined.ids.shape == (0, 2)


@pytest.mark.parametrize("kind", ["pq", "bigran"])
def test_a_removal_between_the_search_and_the_reconstruct_waits(kind, tmp_path):
    """with_vectors searched and reconstructed under two separate reader holds: an id another
    thread removed in between made the reconstruct raise KeyError. The writer now waits until
    mine() has read both."""
    import threading

    x = _x()
    index = _pq(x)
    lock = index._lock
    if kind == "bigran":
        write_store(tmp_path / "store.bin", x, "float16")
        index = BiGranularIndex(index, tmp_path / "store.bin")
    search, writers = index.search, []

    def search_then_remove(*args, **kw):
        dist, ids = search(*args, **kw)
        found = np.asarray(ids)
        writer = threading.Thread(target=index.remove_ids, args=(found[found >= 0],))
        writer.start()
        writers.append(writer)
        while writer.is_alive() and not lock._writers_waiting:  # removed, or waiting for mine()
            writer.join(0.001)
        return dist, ids

    index.search = search_then_remove
    mined = HardNegativeMiner(index, n=4, depth=10).mine(x[:3], np.arange(3), with_vectors=True)
    writers[0].join()
    np.testing.assert_allclose(mined.vectors.numpy(), x[mined.ids.numpy()], rtol=1e-3, atol=1e-3)
    assert index.ntotal < len(x)  # the removal ran afterwards
