"""The ann family's fault suite: property tests against ann/reference.py over dtypes, layouts and
value ranges; argument errors that name the argument; ids; re-training a non-empty index;
threads sharing an index. Index and store files: test_ann_file_faults.py."""

import copy
import functools
import pickle
import threading

import numpy as np
import pytest
import torch
from _ann import data, shared, small
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hotops.ann import (
    BiGranularIndex,
    IVFPQIndex,
    PQIndex,
    kmeans,
    quantize_ste,
    reference,
    write_store,
)


@functools.lru_cache(maxsize=None)
def exact_pq():
    """A flat PQ index whose refine over every row is exact search (shared, never changed)."""
    x = data(40, 8, seed=3)
    index = PQIndex(8, 2, 4, keep_vectors=True, verbose=False)
    index.train(x)
    index.add(x)
    return index, x


# ------------------------------------------------------------------ layouts and dtypes

LAYOUTS = ("contiguous", "fortran", "offset", "negative_rows", "negative_both")
KINDS = (
    "np.float32",
    "np.float64",
    "np.float16",
    "torch.float32",
    "torch.bfloat16",
    "torch.float16",
    "torch.t",
)


def laid_out(a: np.ndarray, layout: str) -> np.ndarray:
    """The same logical array in another memory layout."""
    if layout == "fortran":
        return np.asfortranarray(a)
    if layout == "offset":
        big = np.zeros((a.shape[0] + 1, a.shape[1] + 3), a.dtype)
        big[1:, 3:] = a
        return big[1:, 3:]
    if layout == "negative_rows":
        return np.ascontiguousarray(a[::-1])[::-1]
    if layout == "negative_both":
        return np.ascontiguousarray(a[::-1, ::-1])[::-1, ::-1]
    return a


def as_kind(a: np.ndarray, kind: str):
    """(the input in this kind, the float32 values the index should see)."""
    if kind.startswith("np."):
        v = a.astype(getattr(np, kind[3:]))
        return v, v.astype(np.float32)
    if kind == "torch.t":  # a transposed (non-contiguous) tensor
        t = torch.from_numpy(np.ascontiguousarray(a.T)).t()
        return t, a.astype(np.float32)
    t = torch.from_numpy(np.ascontiguousarray(a)).to(getattr(torch, kind[6:]))
    return t, t.float().numpy()


def to_np(x):
    return x.numpy() if isinstance(x, torch.Tensor) else x


@settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(
    nq=st.integers(0, 4),
    k=st.integers(1, 50),
    kind=st.sampled_from(KINDS),
    layout=st.sampled_from(LAYOUTS),
    scale=st.sampled_from([1.0, 1e-20, 1e-3, 1e6, 1e12]),
    seed=st.integers(0, 2**16),
)
def test_property_exact_search_matches_reference(nq, k, kind, layout, scale, seed):
    """refine over every row is exact: distances equal the brute-force reference's at each rank
    (ids may differ only between equal distances), k beyond ntotal pads with (inf, -1)."""
    index, x = exact_pq()
    if kind.endswith("float16") and scale > 1e3:
        scale = 1e3  # beyond float16's range (65504): the input itself would be inf
    q = (np.random.default_rng(seed).standard_normal((nq, 8)) * scale).astype(np.float32)
    q, seen = as_kind(laid_out(q, layout) if kind.startswith("np.") else q, kind)
    dist, ids = (to_np(a) for a in index.search(q, k, refine=40))
    assert isinstance(index.search(q, 1)[0], torch.Tensor) == isinstance(q, torch.Tensor)
    assert dist.shape == ids.shape == (nq, k)
    ref_d, ref_rows = reference.search(seen, x, min(k, 40), "l2")
    tol = 1e-4 * (1 + ref_d.max(initial=0)) if nq else 0
    np.testing.assert_allclose(dist[:, :40], ref_d, rtol=1e-4, atol=tol)
    exact = reference.scores(seen, x, "l2")
    np.testing.assert_allclose(np.take_along_axis(exact, ids[:, :40], 1), ref_d, rtol=1e-4, atol=tol)
    assert (ids[:, 40:] == -1).all() and np.isinf(dist[:, 40:]).all()


@settings(max_examples=40)
@given(
    n=st.integers(0, 20),
    kind=st.sampled_from(KINDS),
    layout=st.sampled_from(LAYOUTS),
    scale=st.sampled_from([1.0, 1e-3, 1e4]),
    seed=st.integers(0, 2**16),
)
def test_property_encode_matches_reference(n, kind, layout, scale, seed):
    """encode picks a nearest centroid per sub-space (ties within float32 rounding either way)."""
    index, _ = exact_pq()
    if kind.endswith("float16") and scale > 1e3:
        scale = 1e3
    v = (np.random.default_rng(seed).standard_normal((n, 8)) * scale).astype(np.float32)
    v, seen = as_kind(laid_out(v, layout) if kind.startswith("np.") else v, kind)
    codes = index.encode(v)
    assert codes.shape == (n, 2) and codes.dtype == np.uint8
    t = reference.tables(seen, index.codebooks, "l2")  # (n, m, ksub)
    got = np.take_along_axis(t, codes[:, :, None].astype(np.int64), 2)[:, :, 0]
    np.testing.assert_allclose(got, t.min(-1), rtol=1e-5, atol=1e-5 * (1 + scale**2))


@settings(max_examples=40)
@given(
    n=st.integers(0, 5),
    m=st.integers(1, 3),
    ksub=st.integers(1, 5),
    dsub=st.integers(1, 3),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    temperature=st.sampled_from([0.05, 1.0, 30.0]),
    poison=st.sampled_from([None, float("nan"), float("inf"), -float("inf")]),
    scale=st.sampled_from([1e-3, 1.0, 10.0]),
    seed=st.integers(0, 2**16),
)
def test_property_quantize_ste_matches_reference(n, m, ksub, dsub, dtype, temperature, poison, scale, seed):
    """Forward equal to the reference (NaN wherever a sub-vector holds NaN/Inf); gradients and
    second-order gradients (create_graph=True) equal the reference's autograd for finite input."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, m * dsub, generator=g, dtype=dtype) * scale
    c = torch.randn(m, ksub, dsub, generator=g, dtype=dtype) * scale
    if poison is not None and n:
        x[n // 2, (seed % (m * dsub))] = poison
    out = quantize_ste(x, c, temperature)
    torch.testing.assert_close(out, reference.quantize_ste(x, c, temperature), equal_nan=True)
    if poison is not None or dtype != torch.float64 or not n:
        return
    w = torch.randn(n, m * dsub, generator=g, dtype=dtype)
    grads = []
    for f in (quantize_ste, reference.quantize_ste):
        xr, cr = x.clone().requires_grad_(), c.clone().requires_grad_()
        gx, gc = torch.autograd.grad((f(xr, cr, temperature) * w).sum(), (xr, cr), create_graph=True)
        assert gx.requires_grad and gc.requires_grad
        hx, hc = torch.autograd.grad(gx.square().sum() + gc.square().sum(), (xr, cr))
        grads.append((gx.detach(), gc.detach(), hx, hc))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-8)


@settings(max_examples=30)
@given(
    where=st.sampled_from(["queries", "x", "training vectors"]),
    bad=st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e16, -3e30]),
    row=st.integers(0, 4),
    col=st.integers(0, 15),
)
def test_property_nonfinite_and_huge_inputs_are_refused(where, bad, row, col):
    """NaN, Inf and magnitudes above 1e15 (whose squared distances overflow float32) are refused
    with the argument's name, never turned into silent -1 results or garbage codes."""
    index, x = shared()
    v = x[:5].copy()
    v[row, col] = bad
    with pytest.raises(ValueError, match=where):
        {
            "queries": lambda: index.search(v, 3),
            "x": lambda: index.add(v),
            "training vectors": lambda: PQIndex(16, 4, 6, verbose=False).train(v),
        }[where]()


# ------------------------------------------------------------------ argument errors


def test_half_precision_queries_are_converted():
    index, x = shared()
    want = index.search(x[:4], 5)
    for dtype in (torch.bfloat16, torch.float16):
        q = torch.from_numpy(x[:4]).to(dtype)
        d, i = index.search(q, 5)
        np.testing.assert_array_equal(i.numpy(), index.search(q.float().numpy(), 5)[1])
    assert want[1].shape == (4, 5)


@pytest.mark.parametrize(
    "call, exc, name",
    [
        (lambda ix, x: ix.search(x[:2], 0), ValueError, "k"),
        (lambda ix, x: ix.search(x[:2], -3), ValueError, "k"),
        (lambda ix, x: ix.search(x[:2], 2.5), ValueError, "k"),
        (lambda ix, x: ix.search(x[:2], "3"), TypeError, "k"),
        (lambda ix, x: ix.search(x[:2], True), TypeError, "k"),
        (lambda ix, x: ix.search(x[:2], 10**9), ValueError, "k"),
        (lambda ix, x: ix.search(x[:2], 3, refine=0), ValueError, "refine"),
        (lambda ix, x: ix.search(x[:2].astype(np.int32), 3), TypeError, "queries"),
        (lambda ix, x: ix.search(x[:2].astype(np.complex64), 3), TypeError, "queries"),
        (lambda ix, x: ix.search(x[0], 3), ValueError, "queries"),
        (lambda ix, x: ix.search(x[:2, :8], 3), ValueError, "queries"),
        (lambda ix, x: ix.search(x[:2, :, None], 3), ValueError, "queries"),
        (lambda ix, x: ix.search(x[:2].tolist(), 3), TypeError, "queries"),
        (lambda ix, x: ix.add(x[:2], ids=np.array([1.0, 2.0])), TypeError, "ids"),
        (lambda ix, x: ix.add(x[:2], ids=np.array([1])), ValueError, "ids"),
        (lambda ix, x: ix.decode(np.array([[-1, 0, 0, 0]])), ValueError, "codes"),
        (lambda ix, x: ix.decode(np.zeros((1, 4), np.float32)), TypeError, "codes"),
        (lambda ix, x: ix.search(x[:2], 3, allow=np.ones((2, 2), bool)), ValueError, "allow"),
        (lambda ix, x: ix.save(3.5), TypeError, "path"),
        (lambda ix, x: PQIndex(16, 3, verbose=False), ValueError, "m"),
        (lambda ix, x: PQIndex(True, 1, verbose=False), TypeError, "dim"),
        (lambda ix, x: PQIndex(16, 4, 9, verbose=False), ValueError, "nbits"),
        (lambda ix, x: PQIndex(16, 4, 4.5, verbose=False), ValueError, "nbits"),
        (lambda ix, x: PQIndex(256, 256, 4, verbose=False), ValueError, "m=256"),  # fast-scan's 128
        (lambda ix, x: ix.search(x[:0], k=2**62), ValueError, "k = "),  # no query, still refused
        (lambda ix, x: PQIndex(16, 4, metric="cos", verbose=False), ValueError, "metric"),
        (lambda ix, x: IVFPQIndex(16, 0, 4, verbose=False), ValueError, "nlist"),
        (lambda ix, x: kmeans(x, 0), ValueError, "k"),
        (lambda ix, x: kmeans(x, 4, niter="3"), TypeError, "niter"),
        (lambda ix, x: kmeans(x, 4, seed=-1), ValueError, "seed"),
        (lambda ix, x: ix.tables(x[:2, :3]), ValueError, "queries"),
        (lambda ix, x: ix.encode(x[:2].astype(np.int64)), TypeError, "x"),
        (
            lambda ix, x: quantize_ste(torch.zeros(2, 4), torch.zeros(2, 3, 2), "0.1"),
            TypeError,
            "temperature",
        ),
        (
            lambda ix, x: quantize_ste(torch.zeros(2, 4), torch.zeros(2, 3, 2), float("inf")),
            ValueError,
            "temperature",
        ),
        (lambda ix, x: quantize_ste(torch.zeros(2, 4), torch.zeros(2, 3, 2), 0.0), ValueError, "temperature"),
    ],
)
def test_bad_arguments_name_the_argument(call, exc, name):
    index, x = shared()
    with pytest.raises(exc, match=name):
        call(index, x)


def test_bigranular_arguments_name_the_argument(tmp_path):
    index, x = shared()
    write_store(tmp_path / "v.store", x)
    big = BiGranularIndex(index, tmp_path / "v.store")
    for kw, exc, name in (
        ({"fusion": "0.5"}, TypeError, "fusion"),
        ({"fusion": float("nan")}, ValueError, "fusion"),
        ({"candidates": 0}, ValueError, "candidates"),
        ({"candidates": 2}, ValueError, "candidates"),
        ({"nprobe": 2}, ValueError, "nprobe"),
        ({"k": 0}, ValueError, "k"),
    ):
        with pytest.raises(exc, match=name):
            big.search(x[:2], **{"k": 3, **kw})
    np.testing.assert_array_equal(
        big.search(x[:2], np.int64(3), candidates=torch.tensor(20))[1][:, 0], [0, 1]
    )
    with pytest.raises(ValueError, match="beyond float16's 65504"):  # not stored as inf
        write_store(tmp_path / "h.store", x * 1e5, "float16")


def test_ivf_probe_validates():
    index, x = shared("ivf")
    assert index.probe(x[:3].astype(np.float64), np.int64(2)).shape == (3, 2)
    with pytest.raises(ValueError, match="nprobe"):
        index.probe(x[:3], 5)


@pytest.mark.parametrize(
    "nprobe, ok",
    [
        (0, False),
        (5, False),
        (-1, False),
        (1.5, False),
        ("2", False),
        (np.int32(2), True),
        (torch.tensor(4), True),
        (4.0, True),
    ],
)
def test_nprobe_range_and_kinds(nprobe, ok):
    index, x = shared("ivf")
    if ok:
        assert index.search(x[:3], 2, nprobe=nprobe)[1].shape == (3, 2)
    else:
        with pytest.raises((ValueError, TypeError), match="nprobe"):
            index.search(x[:3], 2, nprobe=nprobe)


@pytest.mark.parametrize("kind", ["pq", "ivf"])
def test_empty_index_and_empty_queries(kind):
    index, x = small(kind)
    index.reset()
    d, i = index.search(x[:3], 4)
    assert (i == -1).all() and np.isinf(d).all()
    d, i = index.search(x[:0], 4)
    assert d.shape == i.shape == (0, 4)
    index.add(x[:0])
    assert index.ntotal == 0


# ------------------------------------------------------------------ ids


def test_ids_out_of_int64_range_or_negative_are_refused():
    index, x = small()
    with pytest.raises(ValueError, match=r"2\*\*63"):
        index.add(x[:2], ids=np.array([5, 2**63], dtype=np.uint64))
    with pytest.raises(ValueError, match="non-negative"):
        index.add(x[:2], ids=np.array([5, -1]))
    assert index.ntotal == 300  # nothing was added
    index.add(x[:1], ids=np.array([2**63 - 1], dtype=np.uint64))
    assert (
        index.search(x[:1], 1, allow=np.array([2**63 - 1, 2**64 - 1], dtype=np.uint64))[1][0, 0] == 2**63 - 1
    )
    with pytest.raises(ValueError, match="automatic ids"):
        index.add(x[:1])
    index.add(x[:0])  # nothing to number: fine


# ------------------------------------------------------------------ training a non-empty index


@pytest.mark.parametrize("kind", ["pq", "ivf"])
def test_retrain_refuses_without_kept_vectors(kind):
    index, x = small(kind)
    before = index.search(x[:20], 1)
    with pytest.raises(RuntimeError, match="keep_vectors"):
        index.train(x * 2)
    with pytest.raises(RuntimeError, match="keep_vectors"):
        index.set_codebooks(index.codebooks * 2)
    np.testing.assert_array_equal(index.search(x[:20], 1)[1], before[1])  # untouched
    index.reset()
    index.train(x * 2)
    index.add(x)
    assert index.ntotal == 300


@pytest.mark.parametrize("kind", ["pq", "ivf"])
def test_retrain_reencodes_kept_vectors(kind):
    """train() again (other data) and set_codebooks() re-encode the kept vectors: the index then
    equals one built fresh with that training (same ids); self-recall does not collapse."""
    index, x = small(kind, keep_vectors=True)
    ids = np.arange(300) * 7 + 3
    index.reset()
    index.add(x, ids=ids)
    other = data(300, 16, seed=9) * 1.5
    index.train(other)
    fresh = type(index)(**{**index._params(), "verbose": False})
    fresh.train(other)
    fresh.add(x, ids=ids)
    # the same codes in another row order (lists were refilled in stored order): equal distances
    np.testing.assert_array_equal(index.search(x[:50], 5)[0], fresh.search(x[:50], 5)[0])
    assert (index.search(x, 1, refine=8)[1][:, 0] == ids).mean() > 0.7  # (collapsed to 0 before the fix)
    index.set_codebooks(fresh.codebooks * 1.01)
    assert (index.search(x, 1, refine=8)[1][:, 0] == ids).mean() > 0.7  # (collapsed to 0 before the fix)


def test_pickle_and_deepcopy_keep_the_index():
    index, x = small("ivf", keep_vectors=True)
    for twin in (pickle.loads(pickle.dumps(index)), copy.deepcopy(index)):
        for a, b in zip(index.search(x[:9], 4), twin.search(x[:9], 4)):
            np.testing.assert_array_equal(a, b)
        twin.add(x[:3])  # its own lock
        assert twin.ntotal == index.ntotal + 3


# ------------------------------------------------------------------ threads


@pytest.mark.parametrize("kind", ["pq", "ivf"])
def test_concurrent_searches_equal_serial(kind):
    index, x = small(kind, nbits=4 if kind == "ivf" else 6)
    want = [index.search(x[i::7], 5) for i in range(7)]
    errors, got = [], {}

    def work(i):
        try:
            for _ in range(5):
                got[i] = index.search(x[i::7], 5)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(7):
        for a, b in zip(want[i], got[i]):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind", ["pq", "ivf"])
def test_search_during_add_sees_whole_adds(kind):
    """add() takes the index's lock alone: searches running beside a stream of adds never fail and
    see the index before or after each add. The adds are far from the queries, so every search
    must equal the one before any add; the final index holds every add."""
    index, x = small(kind, keep_vectors=True)
    q = x[:16]
    want = index.search(q, 5, refine=2)
    far = data(40, 16, seed=5) + 1000.0
    errors, stop = [], threading.Event()

    def searcher():
        try:
            while not stop.is_set():
                d, i = index.search(q, 5, refine=2)
                np.testing.assert_array_equal(i, want[1])
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=searcher) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for b in range(0, 40, 4):
            index.add(far[b : b + 4])
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[0]
    assert index.ntotal == 340
    assert index.search(far[:4], 1, refine=60)[1][:, 0].tolist() == [300, 301, 302, 303]
