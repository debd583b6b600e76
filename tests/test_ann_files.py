"""hotops.ann files: save/load round trips (in memory and mmap'd), index files that load refuses
(corrupted, truncated, wrong version, magic or kind), and the bi-granular index re-ranking from a
vector store file."""

import numpy as np
import pytest
import torch
from _ann import data, ivf, pq

from hotops.ann import BiGranularIndex, IVFPQIndex, PQIndex, reference, write_store

# ------------------------------------------------------------------ files


@pytest.mark.parametrize("make", [pq, ivf])
@pytest.mark.parametrize("mmap", [False, True])
def test_save_load_round_trip(tmp_path, make, mmap):
    index, x = make(keep_vectors=True)
    path = tmp_path / "index.hann"
    index.save(path)
    loaded = type(index).load(path, mmap=mmap)
    assert [p.name for p in tmp_path.iterdir()] == ["index.hann"]  # no temporary file left behind
    q = data(5, 16, seed=10)
    kw = {"nprobe": 4} if isinstance(index, IVFPQIndex) else {}
    for a, b in zip(index.search(q, k=6, refine=3, **kw), loaded.search(q, k=6, refine=3, **kw)):
        np.testing.assert_array_equal(a, b)
    if mmap:  # the codes are read from the guarded mapping, not copied
        assert np.shares_memory(loaded.codes, loaded._mapped[0].bytes)


@pytest.fixture
def saved(tmp_path):
    index, _ = ivf()
    path = tmp_path / "index.hann"
    index.save(path)
    return path


def _rewrite(path, fn):
    raw = bytearray(path.read_bytes())
    path.write_bytes(bytes(fn(raw)))


def test_load_refuses_corrupted_codes(saved):
    _rewrite(saved, lambda b: b[:-100] + bytes([b[-100] ^ 0xFF]) + b[-99:])
    with pytest.raises(ValueError, match="checksum"):
        IVFPQIndex.load(saved)


@pytest.mark.parametrize("cut", [5, 30, 500, -1])
def test_load_refuses_truncated(saved, cut):
    _rewrite(saved, lambda b: b[:cut])
    with pytest.raises(ValueError, match="truncated|size"):
        IVFPQIndex.load(saved, mmap=True)


def test_load_refuses_wrong_version_magic_kind(saved, tmp_path):
    raw = saved.read_bytes()
    saved.write_bytes(raw[:8] + (99).to_bytes(4, "little") + raw[12:])
    with pytest.raises(ValueError, match="version 99"):
        IVFPQIndex.load(saved)
    saved.write_bytes(b"NOTANIDX" + raw[8:])
    with pytest.raises(ValueError, match="not a hotops index"):
        IVFPQIndex.load(saved)
    saved.write_bytes(raw[:20] + bytes([raw[20] ^ 1]) + raw[21:])
    with pytest.raises(ValueError, match="metadata checksum"):
        IVFPQIndex.load(saved)
    saved.write_bytes(raw)
    with pytest.raises(ValueError, match="holds a IVFPQIndex"):
        PQIndex.load(saved)


# ------------------------------------------------------------------ bi-granular


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_bigranular_reranks_exactly(tmp_path, dtype):
    index, x = ivf()
    store = tmp_path / "store.bin"
    write_store(store, x, dtype)
    bi = BiGranularIndex(index, store, dtype)
    q = data(7, 16, seed=11)
    dist, ids = bi.search(q, k=5, candidates=len(x), nprobe=index.nlist)
    ref_s, ref_rows = reference.search(q, x.astype(dtype).astype(np.float32), 5, "l2")
    np.testing.assert_allclose(dist, ref_s, rtol=1e-4, atol=1e-3)
    assert (ids == ref_rows).mean() > 0.97  # float16 ties may swap
    d_t, i_t = bi.search(torch.from_numpy(q), k=5, candidates=50, nprobe=4, fusion=0.5)
    assert isinstance(i_t, torch.Tensor) and i_t.shape == (7, 5)
    assert bi.ram_bytes_per_vector() == index.m + 8


def test_bigranular_store_errors(tmp_path):
    index, x = ivf()
    store = tmp_path / "store.bin"
    write_store(store, x, "float32")
    raw = store.read_bytes()
    store.write_bytes(raw[:-4])
    with pytest.raises(ValueError, match="does not match"):
        BiGranularIndex(index, store)
    write_store(store, x[:, :8], "float32")
    with pytest.raises(ValueError, match="dimension"):
        BiGranularIndex(index, store)
    write_store(store, x[:10], "float32")
    with pytest.raises(ValueError, match="only 10 rows"):
        BiGranularIndex(index, store)
    write_store(store, x, "float16")
    with pytest.raises(ValueError, match="float16"):
        BiGranularIndex(index, store, "float32")
    bi = BiGranularIndex(index, store)
    with pytest.raises(ValueError, match="candidates"):
        bi.search(x[:2], k=10, candidates=5)
