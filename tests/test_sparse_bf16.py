"""hotops.sparse on bfloat16 / float16 activations: float32 accumulation, the output rounded once;
the bf16 linear forward with AVX512_BF16 (vdpbf16ps) and the convert path, each against the
float64 reference with the tolerance idiom."""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_to_reference
from torch import nn

from hotops import _backend
from hotops.sparse import SparseLinear, SparseWeight, reference, sparse_conv2d, sparse_linear


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_activations(isa, dtype):
    """bf16 / f16 activations: float32 accumulation, the output rounded once to x's dtype."""
    from hotops.sparse.format import PANEL_COLS

    torch.manual_seed(0)
    lin = SparseWeight.from_dense(torch.randn(19, PANEL_COLS + 40).to(dtype), sparsity=0.8)
    conv = SparseWeight.from_dense(torch.randn(6, 4, 3, 3), sparsity=0.6)
    cases = [
        (sparse_linear, reference.sparse_linear, lin, torch.randn(70, PANEL_COLS + 40), {}),
        (sparse_linear, reference.sparse_linear, lin, torch.randn(1, PANEL_COLS + 40), {}),
        (sparse_conv2d, reference.sparse_conv2d, conv, torch.randn(2, 4, 9, 9), dict(padding=1)),
    ]
    for fn, ref, sw, x, geo in cases:
        b = torch.randn(sw.out_features)
        xl, bl = x.to(dtype), b.to(dtype)
        y = fn(xl, sw, bl, activation="relu", **geo)
        assert y.dtype == dtype
        assert_close_to_reference(
            y,
            ref(xl.double(), sw.with_values(sw.values.double()), bl.double(), activation="relu", **geo),
            ref(xl, sw, bl, activation="relu", **geo),
        )
        xg, v = xl.clone().requires_grad_(), sw.values.clone().requires_grad_()
        gx, gv = torch.autograd.grad(fn(xg, sw.with_values(v), **geo).float().sum(), (xg, v))
        wx, wv = torch.autograd.grad(ref(xg.float(), sw.with_values(v), **geo).sum(), (xg, v))
        assert gx.dtype == dtype
        torch.testing.assert_close(gx.float(), wx.float(), rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(gv, wv, rtol=1e-4, atol=1e-3)


def test_low_precision_module_both_paths():
    lin = nn.Linear(40, 12).to(torch.bfloat16)
    x = torch.randn(8, 40, dtype=torch.bfloat16)
    want = F.linear(x.float(), lin.weight.float(), lin.bias.float())
    for policy in ("sparse", "dense", "auto"):
        layer = SparseLinear.from_dense(lin, mask=torch.ones(12, 40, dtype=torch.bool), policy=policy)
        y = layer(x)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), want, rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------ bfloat16 linear (AVX512_BF16)

BF16_KERNELS = ["convert", *(["avx512_bf16"] if _backend.ext().cpu_has("avx512_bf16") else [])]


@pytest.fixture(params=BF16_KERNELS)
def bf16_kernel(request):
    """The bf16 linear forward with vdpbf16ps (where the CPU has it) and the convert path."""
    ext = _backend.ext()
    before = ext.feature("avx512_bf16")
    ext.set_feature("avx512_bf16", request.param == "avx512_bf16")
    yield request.param
    ext.set_feature("avx512_bf16", before)


@pytest.mark.parametrize("B", [16, 31, 33, 64, 100])
@pytest.mark.parametrize("act", [None, "relu6"])
def test_bf16_linear_paths(isa, bf16_kernel, B, act):
    """float32 weights (not bf16-representable) on bf16 activations, column panels, rows with odd
    and even non-zero counts, partial 32-pixel vectors: within twice torch's own bf16 error."""
    from hotops.sparse.format import PANEL_COLS

    torch.manual_seed(B)
    I, O = PANEL_COLS + 77, 45
    w = torch.randn(O, I)
    w[3] = 0.0  # an empty row: act(bias)
    w[4, 1:] = 0.0  # a row with one non-zero: paired with zeros
    sw = SparseWeight.from_dense(w, sparsity=0.7)
    x, b = torch.randn(B, I).bfloat16(), torch.randn(O).bfloat16()
    y = sparse_linear(x, sw, b, activation=act)
    assert y.dtype == torch.bfloat16
    assert_close_to_reference(
        y,
        reference.sparse_linear(x.double(), sw.with_values(sw.values.double()), b.double(), activation=act),
        reference.sparse_linear(x, sw, b, activation=act),
    )


def test_bf16_linear_nan_and_inf(bf16_kernel):
    """An inf or NaN input reaches only the outputs whose rows keep its column (a row's odd last
    non-zero is paired with zeros, never with another column)."""
    sw = SparseWeight.from_dense(torch.randn(8, 40), sparsity=0.8)
    x = torch.randn(32, 40).bfloat16()
    x[5, 7], x[9, 11] = float("inf"), float("nan")
    y = sparse_linear(x, sw).float()
    kept = sw.mask().bool()
    want = torch.zeros(32, 8, dtype=torch.bool)
    want[5], want[9] = kept[:, 7], kept[:, 11]
    assert torch.equal(~y.isfinite(), want)
    assert torch.equal(y[9].isnan(), kept[:, 11])
