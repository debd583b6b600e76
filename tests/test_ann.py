"""hotops.ann: PQ kernels against the NumPy reference on every ISA, index behaviour (refine,
allow-lists, ids, incremental add, NumPy/torch in and out), 4-bit fast-scan, threads, and bad input.
Files and the bi-granular index: test_ann_files.py; the Triton scan: test_ann_triton.py;
quantize_ste: test_ann_quantize_ste.py."""

import numpy as np
import pytest
import torch
from _ann import data, ivf, pq
from hypothesis import given, settings
from hypothesis import strategies as st

from hotops import _backend
from hotops.ann import BiGranularIndex, IVFPQIndex, PQIndex, kmeans, reference, write_store
from hotops.ann.kmeans import nearest

# ------------------------------------------------------------------ kernels vs reference


def test_encode_matches_reference(isa):
    index, x = pq()
    codes = index.encode(x)
    ref = reference.encode(x, index.codebooks)
    t = reference.tables(x, index.codebooks, "l2")
    chosen = np.take_along_axis(t, codes[..., None].astype(np.int64), 2)[..., 0]
    assert np.all(chosen <= t.min(-1) + 1e-4)  # equal up to exact ties
    assert (codes == ref).mean() > 0.999


def test_decode_round_trip(isa):
    index, _ = pq()
    codes = np.random.default_rng(1).integers(0, index.ksub, (300, index.m)).astype(np.uint8)
    np.testing.assert_allclose(index.decode(codes), reference.decode(codes, index.codebooks), rtol=0, atol=0)
    np.testing.assert_array_equal(index.encode(index.decode(codes)), codes)


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_tables_match_reference(isa, metric):
    index, x = pq(d=20, m=5, metric=metric)
    q = data(7, 20, seed=3)
    t = index.tables(q)
    ref = reference.tables(q, index.codebooks, metric)
    np.testing.assert_allclose(t[:, :, : index.ksub], ref, rtol=1e-4, atol=1e-3)
    assert np.isinf(t[:, :, index.ksub :]).all()


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("nbits", [8, 5])
def test_adc_equals_exact_distance_to_decoded(isa, metric, nbits):
    index, x = pq(d=12, m=3, nbits=nbits, metric=metric, n=700)
    q = data(9, 12, seed=4)
    dist, ids = index.search(q, k=15)
    decoded = index.decode(index.codes)
    exact = -reference.scores(q, decoded, metric) if metric == "ip" else reference.scores(q, decoded, metric)
    np.testing.assert_allclose(dist, np.take_along_axis(exact, ids, 1), rtol=1e-4, atol=1e-3)
    ref_scores, _ = reference.search(q, decoded, 15, metric)
    np.testing.assert_allclose(np.abs(dist), np.abs(ref_scores), rtol=1e-4, atol=1e-3)  # same top-15 values


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_ivf_adc_is_distance_to_reconstruction(isa, metric):
    index, x = ivf(metric=metric)
    q = data(5, 16, seed=5)
    dist, ids = index.search(q, k=10, nprobe=index.nlist)
    lists = np.repeat(np.arange(index.nlist), np.diff(index.offsets))
    recon = index.coarse[lists] + index.decode(index.codes)
    rows = np.argsort(index.ids)[ids]  # id -> row
    s = reference.scores(q, recon, metric)
    want = np.take_along_axis(-s if metric == "ip" else s, rows, 1)
    np.testing.assert_allclose(dist, want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_full_probe_and_refine_equal_brute_force(isa, metric):
    index, x = ivf(metric=metric, keep_vectors=True)
    q = data(11, 16, seed=6)
    k = 5
    dist, ids = index.search(q, k=k, nprobe=index.nlist, refine=-(-len(x) // k))
    ref_s, ref_rows = reference.search(q, x, k, metric)
    np.testing.assert_array_equal(ids, ref_rows)  # ids default to insertion order
    np.testing.assert_allclose(dist, -ref_s if metric == "ip" else ref_s, rtol=1e-4, atol=1e-3)


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(1, 300),
    m=st.sampled_from([1, 2, 3]),
    dsub=st.integers(1, 5),
    k=st.integers(1, 12),
    nbits=st.integers(1, 8),
    metric=st.sampled_from(["l2", "ip"]),
    seed=st.integers(0, 2**16),
)
def test_property_refined_flat_pq_is_exact(n, m, dsub, k, nbits, metric, seed):
    d = m * dsub
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    index = PQIndex(d, m, nbits, metric, keep_vectors=True, verbose=False)
    index.set_codebooks(np.random.default_rng(seed + 1).standard_normal((m, 1 << nbits, dsub)))
    index.add(x)
    q = np.random.default_rng(seed + 2).standard_normal((3, d)).astype(np.float32)
    dist, ids = index.search(q, k=k, refine=n)
    ref_s, ref_rows = reference.search(q, x, min(k, n), metric)
    np.testing.assert_allclose(np.abs(dist[:, : min(k, n)]), np.abs(ref_s), rtol=1e-4, atol=1e-4)
    assert (ids[:, n:] == -1).all() and np.isinf(dist[:, n:]).all()
    assert set(ids[:, : min(k, n)].ravel()) <= set(range(n))


# ------------------------------------------------------------------ index behaviour


def test_kmeans_is_seeded_and_finds_clusters():
    x = data(2000, 8, clusters=4)
    a = kmeans(x, 4, seed=7, verbose=False)
    b = kmeans(torch.from_numpy(x), 4, seed=7, verbose=False)
    np.testing.assert_array_equal(a, b)
    idx, _ = nearest(x, a[None])
    assert len(np.unique(idx)) == 4


def test_kmeans_keeps_every_centroid_with_duplicates():
    x = np.repeat(data(3, 4), 50, axis=0)
    c = kmeans(x, 6, niter=5, verbose=False)
    assert np.isfinite(c).all() and c.shape == (6, 4)


def test_allow_list_is_applied_inside_the_scan():
    index, x = ivf(keep_vectors=True)
    q = data(4, 16, seed=8)
    allowed = np.arange(0, len(x), 7)
    for allow in (allowed, np.isin(np.arange(len(x)), allowed), torch.from_numpy(allowed), allowed.tolist()):
        dist, ids = index.search(q, k=5, nprobe=index.nlist, refine=len(x), allow=allow)
        ref_s, ref_rows = reference.search(q, x[allowed], 5, "l2")
        np.testing.assert_array_equal(ids, allowed[ref_rows])
    flat, _ = pq()
    _, ids = flat.search(q, k=3, allow=np.array([5, 9]))
    assert set(ids.ravel()) == {5, 9, -1}
    assert (flat.search(q, k=3, allow=[])[1] == -1).all()  # a list, as remove_ids takes one


def test_add_takes_ids_as_a_list():
    index, x = pq()
    n = index.ntotal
    index.add(x[:3] + 1, ids=[0, 1, 2])  # replaces ids 0..2
    assert index.ntotal == n
    np.testing.assert_array_equal(index.reconstruct([0, 1, 2]), index.reconstruct(np.arange(3)))
    with pytest.raises(TypeError, match="expected integers"):
        index.add(x[:1], ids=[0.5])


def test_numpy_in_numpy_out_torch_in_torch_out():
    index, x = pq()
    q = data(3, 16, seed=9)
    d_np, i_np = index.search(q, k=4)
    d_t, i_t = index.search(torch.from_numpy(q), k=4)
    assert isinstance(d_np, np.ndarray) and isinstance(i_np, np.ndarray)
    assert isinstance(d_t, torch.Tensor) and i_t.dtype == torch.int64
    np.testing.assert_array_equal(i_t.numpy(), i_np)
    d64, i64 = index.search(q.astype(np.float64), k=4)  # float64 is converted
    np.testing.assert_array_equal(i64, i_np)


def test_ids_and_incremental_add():
    x = data(800, 16, seed=1)
    ids = np.arange(800, dtype=np.int64) * 10 + 3
    one = IVFPQIndex(16, 8, 4, 6, verbose=False)
    one.train(x)
    two = IVFPQIndex(16, 8, 4, 6, verbose=False)
    two.set_codebooks(one.codebooks)
    two.coarse = one.coarse.copy()
    one.add(x, ids)
    two.add(x[:300], ids[:300])
    two.add(torch.from_numpy(x[300:]), torch.from_numpy(ids[300:]))
    q = data(6, 16, seed=2)
    d1, i1 = one.search(q, k=8, nprobe=3)
    d2, i2 = two.search(q, k=8, nprobe=3)
    np.testing.assert_array_equal(i1, i2)
    assert set(i1.ravel()) <= set(ids)


def test_empty_index_and_k_beyond_size():
    index = PQIndex(8, 2, 4, verbose=False)
    index.train(data(100, 8))
    dist, ids = index.search(data(2, 8), k=3)
    assert (ids == -1).all() and np.isinf(dist).all()
    index.add(data(2, 8))
    dist, ids = index.search(data(2, 8), k=3)
    assert (ids[:, 2] == -1).all() and (ids[:, :2] >= 0).all()
    dist, ids = index.search(np.zeros((0, 8), np.float32), k=3)
    assert dist.shape == ids.shape == (0, 3)


def test_nbits_4():
    index, x = ivf(nbits=4, keep_vectors=True)
    _, ids = index.search(x[:20], k=1, nprobe=index.nlist, refine=50)
    assert (ids[:, 0] == np.arange(20)).mean() >= 0.95


def test_without_the_extension_search_and_rerank_say_why_each_backend_refused(tmp_path, monkeypatch):
    """The scans, the exact re-rank (of refine and the bi-granular index; the sharded index's exact
    stage calls the same function), the tables and k-means are chosen among backends: where none
    runs, the error names the call and lists each backend's reason."""
    from hotops.ann import _pq

    index, x = pq(keep_vectors=True)
    write_store(tmp_path / "store.bin", x)
    bi = BiGranularIndex(index, tmp_path / "store.bin")
    q = x[:3]
    refused = (
        _backend.Backend("cpu (C++)", lambda device: "the compiled extension is missing (test)", None),
    )
    monkeypatch.setattr(_pq, "RERANK_BACKENDS", refused)
    index.search(q, 4)  # the scan alone still runs
    for search, op in (
        (lambda: index.search(q, 4, refine=2), "PQIndex"),
        (lambda: bi.search(q, 4), "BiGranularIndex"),
    ):
        with pytest.raises(
            RuntimeError,
            match=rf"no hotops backend can run {op}.search on cpu:\n  cpu \(C\+\+\): the compiled",
        ):
            search()
    monkeypatch.setattr(_backend, "_C", None)
    with pytest.raises(
        RuntimeError,
        match=r"run PQIndex.search on cpu:\n  cpu \(C\+\+\): the compiled extension is missing \(.*\n  cuda \(Triton\): needs CUDA",
    ):
        index.search(q, 4)
    for call, op in (
        (lambda: index.tables(q), "PQIndex.tables"),
        (lambda: nearest(q, index.codebooks), "nearest"),
        (lambda: kmeans(x, 4, niter=1, verbose=False), "kmeans"),
    ):
        with pytest.raises(RuntimeError, match=rf"run {op} on cpu:\n  cpu \(C\+\+\): the compiled extension"):
            call()


# ------------------------------------------------------------------ bad input


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="divisor"):
        PQIndex(10, 3)
    with pytest.raises(ValueError, match="nbits"):
        PQIndex(8, 2, nbits=9)
    with pytest.raises(ValueError, match="metric"):
        IVFPQIndex(8, 4, 2, metric="cos")
    with pytest.raises(ValueError, match="nlist"):
        IVFPQIndex(8, 0, 2)


def test_use_before_train():
    index = IVFPQIndex(8, 4, 2, 4)
    x = data(10, 8)
    for call in (lambda: index.add(x), lambda: index.search(x, 1), lambda: index.save("/tmp/never")):
        with pytest.raises(RuntimeError, match="before train"):
            call()


def test_bad_search_and_add_inputs():
    index, x = ivf(keep_vectors=False)
    with pytest.raises(ValueError, match="dimension 15"):
        index.search(x[:, :15], k=1)
    with pytest.raises(ValueError, match="k must be"):
        index.search(x[:2], k=0)
    with pytest.raises(ValueError, match="nprobe"):
        index.search(x[:2], k=1, nprobe=index.nlist + 1)
    with pytest.raises(ValueError, match="nprobe"):
        index.search(x[:2], k=1, nprobe=0)
    bad = x[:3].copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        index.search(bad, k=1)
    with pytest.raises(ValueError, match="NaN or Inf"):
        index.add(np.full((2, 16), np.inf, np.float32))
    with pytest.raises(TypeError, match="int64"):
        index.search(x[:2].astype(np.int64), k=1)
    with pytest.raises(ValueError, match="ids have shape"):
        index.add(x[:4], ids=np.arange(3))
    with pytest.raises(TypeError, match="ids have dtype"):
        index.add(x[:4], ids=np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="keep_vectors"):
        index.search(x[:2], k=1, refine=2)
    with pytest.raises(ValueError, match="2-d"):
        index.search(x[0], k=1)
    with pytest.raises(TypeError, match="NumPy array or a torch tensor"):
        index.search(x[:2].tolist(), k=1)


def test_kernels_validate_their_arguments():
    ext = _backend.ext()
    index, x = pq()
    score, rows = np.empty((2, 3), np.float32), np.empty((2, 3), np.int64)
    with pytest.raises(ValueError, match="256 entries"):
        ext.ann_pq_scan(np.zeros((2, 4, 64), np.float32), index.codes, None, score, rows, 1)
    with pytest.raises(ValueError, match="bytes per vector"):
        ext.ann_pq_scan(np.zeros((2, 3, 256), np.float32), index.codes, None, score, rows, 1)
    with pytest.raises(ValueError, match="not a stored row"):
        ext.ann_rerank(x[:2], x, np.full((2, 3), len(x), np.int64), None, 0.0, "l2", score, rows, 1)
    with pytest.raises(ValueError, match="metric"):
        ext.ann_rerank(x[:2], x, np.zeros((2, 3), np.int64), None, 0.0, "cos", score, rows, 1)
    iv, _ = ivf()
    with pytest.raises(ValueError, match="not a list"):
        ext.ann_ivf_scan(
            x[:2],
            iv.coarse,
            np.full((2, 1), 99, np.int64),
            iv._ct,
            iv._cterm,
            "l2",
            iv.codes,
            iv.offsets,
            None,
            score,
            rows,
            1,
        )
    with pytest.raises(ValueError, match="assignment"):
        ext.ann_kmeans_update(x, np.full(len(x), 5, np.int64), np.zeros((3, 16), np.float32))


# ------------------------------------------------------------------ 4-bit fast-scan


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("make", [pq, ivf])
def test_fastscan_scores_are_quantized_adc(isa, metric, make):
    """Fast-scan scores are ADC scores up to the uint8 rounding of the tables (m/2 steps of the
    per-list scale), and its top-k is exactly the k best of its own scores over all rows."""
    index, x = make(d=20, m=5, nbits=4, metric=metric)
    q = data(6, 20, seed=12)
    kw = {"nprobe": index.nlist} if isinstance(index, IVFPQIndex) else {}
    dist, ids = index.search(q, k=len(x), **kw)  # every row, in approximate order
    if isinstance(index, IVFPQIndex):
        lists = np.repeat(np.arange(index.nlist), np.diff(index.offsets))
        recon = (index.coarse[lists] + index.decode(index.codes))[np.argsort(index.ids)]
    else:
        recon = index.decode(index.codes)
    s = reference.scores(q, recon, metric)
    exact = np.take_along_axis(-s if metric == "ip" else s, ids, 1)
    spread = np.abs(reference.tables(q, index.codebooks, metric)).max() * 2  # bounds any table's span
    assert np.abs(dist - exact).max() <= index.m * 0.5 * spread / 255 + 1e-3
    for k in (1, 7, 40):
        dk, _ = index.search(q, k=k, **kw)
        np.testing.assert_array_equal(dk, dist[:, :k])


def test_fastscan_same_results_on_every_isa():
    index, x = ivf(nbits=4, m=8, keep_vectors=True)
    q = data(9, 16, seed=13)
    ext, out = _backend.ext(), []
    for name in ("scalar", "avx2", "avx512")[: ("scalar", "avx2", "avx512").index(ext.best_isa()) + 1]:
        ext.set_isa(name)
        out.append(index.search(q, k=12, nprobe=3, allow=np.arange(0, len(x), 3)))
    ext.set_isa(ext.best_isa())
    for d, i in out[1:]:  # float tables differ in the last bits between ISAs (FMA order)
        np.testing.assert_allclose(d, out[0][0], rtol=1e-5)
        assert (i == out[0][1]).mean() > 0.95
    assert set(out[0][1].ravel()) <= set(range(0, len(x), 3))


def test_few_queries_split_the_codes_across_threads():
    """With fewer queries than threads the flat scan splits the codes and merges the slices."""
    x = data(9000, 8, seed=3)
    index = PQIndex(8, 2, 8, keep_vectors=True, verbose=False)
    index.train(x)
    index.add(x)
    q = data(1, 8, seed=4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = index.search(q, k=20, allow=np.arange(0, 9000, 2))
        torch.set_num_threads(3)
        three = index.search(q, k=20, allow=np.arange(0, 9000, 2))
        exact = index.search(q, k=20, refine=450)
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(one[0], three[0])  # equal scores; equal-score rows may swap
    inside = one[0] < one[0].max()
    assert set(one[1][inside]) == set(three[1][inside])
    assert set(three[1].ravel()) <= set(range(0, 9000, 2))
    np.testing.assert_allclose(exact[0], reference.search(q, x, 20, "l2")[0], rtol=1e-5)


def test_few_queries_split_the_lists_across_threads():
    """With fewer queries than threads the IVF scan splits each query's lists and merges."""
    index, x = ivf(n=40000, nlist=16, m=2, nbits=8)  # all lists probed: 40k rows, above kSplitRows
    q = data(2, 16, seed=4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = index.search(q, k=15, nprobe=16)
        torch.set_num_threads(3)
        three = index.search(q, k=15, nprobe=16)
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(one[0], three[0])
    inside = one[0] < one[0].max(axis=1, keepdims=True)
    np.testing.assert_array_equal(one[1][inside], three[1][inside])
