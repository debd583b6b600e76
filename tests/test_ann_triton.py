"""hotops.ann's Triton scan (the GPU path): the same neighbours as the C++ path, run under
TRITON_INTERPRET=1 on the CPU and on a CUDA GPU where there is one; adc_topk's edge cases."""

import numpy as np
import pytest
import torch
from _ann import data, ivf, pq

from hotops.ann import IVFPQIndex, PQIndex


def _device_search_matches_cpu(index, q, device, **kw):
    """The Triton path (search on `device` tensors) returns the C++ path's neighbours."""
    d_ref, i_ref = index.search(q, **kw)
    d, i = index._search_triton(
        torch.from_numpy(q).to(device), kw.pop("k"), kw.pop("refine", None), kw.pop("allow", None), **kw
    )
    np.testing.assert_allclose(d.cpu().numpy(), d_ref, rtol=1e-5, atol=1e-4)
    i = i.cpu().numpy()
    for row, row_ref, dist in zip(i, i_ref, d_ref):  # the same neighbours, up to near-ties with the k-th
        inside = np.abs(dist - dist[-1]) > 1e-4 * max(1.0, abs(dist[-1]))
        assert set(row[inside]) == set(row_ref[inside])


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("make", [pq, ivf])
def test_triton_scan_matches_cpu(metric, make):
    from conftest import require_triton_runs

    require_triton_runs()
    index, x = make(n=300, metric=metric, keep_vectors=True)
    q = data(3, 16, seed=9)
    extra = dict(nprobe=3) if make is ivf else {}
    _device_search_matches_cpu(index, q, "cpu", k=5, refine=2, allow=np.arange(0, 300, 3), **extra)


def test_triton_adc_topk_edges():
    """Empty lists, absent probes (-1), k beyond the rows scanned, and ties broken by row."""
    from conftest import require_triton_runs

    require_triton_runs()
    from hotops.ann.triton import adc_topk

    qt = torch.tensor([[[1.0, 0.0, 2.0], [0.5, 0.5, 0.0]]])  # (1 query, m = 2, ksub = 3)
    codes = torch.tensor([[0, 0], [1, 1], [2, 2], [1, 2], [1, 0]], dtype=torch.uint8)
    offsets = torch.tensor([0, 3, 3, 5])  # list 1 is empty
    probes = torch.tensor([[2, 1, -1]])
    score, rows = adc_topk(qt, codes, offsets, probes, k=4, bias=torch.tensor([[1.0, 0.0, 0.0]]))
    # list 2 holds rows 3 (0 + 0 + 1) and 4 (0 + 0.5 + 1); nothing else is scanned
    np.testing.assert_allclose(score.numpy(), [[1.0, 1.5, np.inf, np.inf]])
    np.testing.assert_array_equal(rows.numpy(), [[3, 4, -1, -1]])
    score, rows = adc_topk(qt, codes, offsets, torch.tensor([[0, 2, 1]]), k=3)
    # rows 0..4 score 1.5, 0.5, 2, 0, 0.5
    np.testing.assert_allclose(score.numpy(), [[0.0, 0.5, 0.5]])
    np.testing.assert_array_equal(rows.numpy(), [[3, 1, 4]])  # equal scores: lower row first


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_triton_scan_on_gpu(metric):
    x = data(20000, 32, seed=5)
    q = data(64, 32, seed=6)
    for index in (
        PQIndex(32, 8, 8, metric, keep_vectors=True, verbose=False),
        IVFPQIndex(32, 64, 8, 8, metric, keep_vectors=True, verbose=False),
    ):
        index.train(x)
        index.add(x)
        extra = dict(nprobe=8) if isinstance(index, IVFPQIndex) else {}
        for refine in (None, 4):
            _device_search_matches_cpu(index, q, "cuda", k=10, refine=refine, **extra)
        d, i = index.search(torch.from_numpy(q).cuda(), k=10, **extra)  # the public entry point
        assert d.is_cuda and i.is_cuda and i.dtype == torch.int64


def test_triton_adc_topk_signed_zero_and_nan_order():
    """-0.0 ties with +0.0 (broken by row, as for any tie; the C++ scan compares them equal) and a
    NaN score ranks after +inf whatever its sign bit: a negative NaN used to rank first."""
    from conftest import require_triton_runs

    require_triton_runs()
    from hotops.ann.triton import adc_topk

    neg_nan = torch.tensor([-4194304], dtype=torch.int32).view(torch.float32)  # 0xFFC00000
    vals = torch.tensor([1.0, -0.0, 0.0, float("nan"), 0.0, float("inf"), -1.0, -0.0])
    vals[4] = neg_nan[0]
    qt = vals.view(1, 1, 8)
    codes = torch.arange(8, dtype=torch.uint8).view(8, 1)
    for bias in (None, torch.tensor([[-0.0]])):  # -0.0 + -0.0 stays -0.0 with a bias
        score, rows = adc_topk(qt, codes, torch.tensor([0, 8]), torch.tensor([[0]]), k=8, bias=bias)
        np.testing.assert_array_equal(rows.numpy(), [[6, 1, 2, 7, 0, 5, 3, 4]])
        assert torch.isnan(score[0, -2:]).all() and torch.isinf(score[0, -3])


def test_triton_adc_topk_many_queries_and_probes():
    """One program per (query, probe) on a one-dimensional grid (CUDA caps grid y at 65,535, which
    a flat index's slices pass): every pair is scanned once, for any split of the ids."""
    from conftest import require_triton_runs

    require_triton_runs()
    from hotops.ann.triton import adc_topk

    g = torch.Generator().manual_seed(3)
    nq, m, ksub, nlist = 5, 3, 16, 7
    qt = torch.randn(nq, m, ksub, generator=g)
    codes = torch.randint(0, ksub, (90, m), generator=g, dtype=torch.uint8)
    offsets = torch.tensor([0, 10, 25, 25, 40, 61, 80, 90])
    probes = torch.stack([torch.randperm(nlist, generator=g)[:4] for _ in range(nq)])
    score, rows = adc_topk(qt, codes, offsets, probes, k=6)
    full = qt[:, torch.arange(m), codes.long()].sum(-1)  # (nq, N): every row's score
    for q in range(nq):
        scanned = torch.cat([torch.arange(offsets[p], offsets[p + 1]) for p in probes[q].tolist()])
        want = full[q, scanned].sort(stable=True)
        np.testing.assert_allclose(score[q].numpy(), want.values[:6].numpy(), rtol=1e-6)
        np.testing.assert_array_equal(rows[q].numpy(), scanned[want.indices[:6]].numpy())
