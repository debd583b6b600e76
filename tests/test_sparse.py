"""hotops.sparse: kernels vs the dense masked reference, gradients, ops, modules, sparsify."""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_to_reference, require_triton_runs
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import hotops
from hotops import _backend
from hotops.sparse import (
    SparseConv2d,
    SparseLinear,
    SparseWeight,
    op,
    reference,
    sparse_conv2d,
    sparse_linear,
    sparsify,
)
from hotops.sparse.module import DENSE, SPARSE


def _ref(fn, x, sw, *args, **kw):
    """The reference in float64 and in float32 (the tolerance idiom)."""
    sw64 = sw.with_values(sw.values.double())
    b = kw.pop("bias", None)
    r64 = fn(x.double(), sw64, b.double() if b is not None else None, *args, **kw)
    return r64, fn(x, sw, b, *args, **kw)


def _close(y, r64, r32):
    assert y.shape == r32.shape
    if y.numel():
        assert_close_to_reference(y, r64, r32)


# ------------------------------------------------------------------ linear


@pytest.mark.parametrize("B", [0, 1, 5, 40, 64, 100, 131])
@pytest.mark.parametrize("sparsity", [0.0, 0.6, 0.97])
def test_linear_matches_reference(isa, B, sparsity):
    sw = SparseWeight.from_dense(torch.randn(37, 53), sparsity=sparsity)
    x, b = torch.randn(B, 53), torch.randn(37)
    for bias, act in ((None, None), (b, "relu")):
        y = sparse_linear(x, sw, bias, act)
        r64, r32 = _ref(reference.sparse_linear, x, sw, bias=bias, activation=act)
        _close(y, r64, r32)


@pytest.mark.parametrize("B", [1, 9, 64, 77])
def test_linear_column_panels(isa, B):
    """More input features than one column panel: the non-zeros are stored panel by panel."""
    from hotops.sparse.format import PANEL_COLS

    I = 2 * PANEL_COLS + 37
    w = torch.randn(23, I)
    w[5] = 0  # a row with no non-zero
    w[7, :PANEL_COLS] = 0  # a row empty in the first panel only
    sw = SparseWeight.from_dense(w, sparsity=0.8)
    assert sw.rowptr.numel() == 3 * 23 + 1
    torch.testing.assert_close(sw.to_dense(), w * sw.mask())
    x, b = torch.randn(B, I), torch.randn(23)
    r64, r32 = _ref(reference.sparse_linear, x, sw, bias=b, activation="relu")
    _close(sparse_linear(x, sw, b, "relu"), r64, r32)
    xg, v = x.clone().requires_grad_(), sw.values.clone().requires_grad_()
    gy = torch.randn(B, 23)
    got = torch.autograd.grad((sparse_linear(xg, sw.with_values(v), b) * gy).sum(), (xg, v))
    want = torch.autograd.grad((reference.sparse_linear(xg, sw.with_values(v), b) * gy).sum(), (xg, v))
    for g, w_ in zip(got, want):
        torch.testing.assert_close(g, w_, rtol=1e-4, atol=1e-4)


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


def test_linear_leading_dims_and_empty_rows():
    w = torch.randn(6, 10)
    w[2] = 0  # a row with no non-zero: output is the bias
    sw = SparseWeight.from_dense(w)
    x, b = torch.randn(3, 4, 10), torch.randn(6)
    y = sparse_linear(x, sw, b)
    assert y.shape == (3, 4, 6)
    torch.testing.assert_close(y, F.linear(x, w, b))
    torch.testing.assert_close(y[..., 2], b[2].expand(3, 4))


@pytest.mark.parametrize("B", [1, 3, 70])
def test_linear_gradients(isa, B):
    sw = SparseWeight.from_dense(torch.randn(19, 33), sparsity=0.7)
    x = torch.randn(B, 33, requires_grad=True)
    v = sw.values.clone().requires_grad_()
    b = torch.randn(19, requires_grad=True)
    gy = torch.randn(B, 19)
    got = torch.autograd.grad((sparse_linear(x, sw.with_values(v), b, "relu") * gy).sum(), (x, v, b))
    want = torch.autograd.grad(
        (reference.sparse_linear(x, sw.with_values(v), b, "relu") * gy).sum(), (x, v, b)
    )
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ conv2d

CONVS = {  # name: (C, O, kernel, stride, padding, dilation, groups, H, W)
    "1x1": (16, 8, (1, 1), 1, 0, 1, 1, 7, 9),
    "1x1 stride 2": (8, 8, (1, 1), 2, 0, 1, 1, 9, 8),
    "3x3": (8, 12, (3, 3), 1, 1, 1, 1, 10, 11),
    "3x3 stride 2": (8, 6, (3, 3), 2, 1, 1, 1, 11, 9),
    "5x5": (4, 6, (5, 5), 1, 2, 1, 1, 12, 10),
    "depthwise 3x3": (12, 12, (3, 3), 1, 1, 1, 12, 9, 9),
    "depthwise 3x3 stride 2": (8, 8, (3, 3), 2, 1, 1, 8, 10, 13),
    "depthwise x2 5x5 dilated stride 2": (6, 12, (5, 5), 2, 3, 2, 6, 13, 11),
    "depthwise 3x3 stride (1, 2) padding (2, 0)": (5, 5, (3, 3), (1, 2), (2, 0), 1, 5, 7, 12),
    "one input channel 3x3": (1, 7, (3, 3), 1, 1, 1, 1, 8, 21),
    "depthwise 3x3 on 4x4": (16, 16, (3, 3), 1, 1, 1, 16, 4, 4),
    "depthwise 3x3 padding (0, 1)": (6, 6, (3, 3), 1, (0, 1), 1, 6, 7, 5),
    "depthwise 3x3 dilated, same size": (4, 4, (3, 3), 1, 2, 2, 4, 9, 10),
    "depthwise 3x3 on 70x70 (row by row)": (3, 3, (3, 3), 1, 1, 1, 3, 70, 70),
    "depthwise x2 3x3 stride 2 dilated on 3x5": (4, 8, (3, 3), 2, 2, 2, 4, 3, 5),
    "grouped 3x3": (8, 12, (3, 3), 1, 1, 1, 4, 8, 8),
    "dilated 3x3": (6, 6, (3, 3), 1, 2, 2, 1, 11, 11),
    "1x7": (6, 8, (1, 7), 1, (0, 3), 1, 1, 8, 12),
    "7x1": (6, 8, (7, 1), 1, (3, 0), 1, 1, 12, 8),
    "3x3 no padding stride 3": (5, 7, (3, 3), 3, 0, 1, 1, 13, 14),
    "3x3 two column panels": (60, 8, (3, 3), 1, 1, 1, 1, 9, 10),
}


def _conv_case(name, sparsity=0.6, N=2):
    C, O, k, s, p, d, g, H, W = CONVS[name]
    sw = SparseWeight.from_dense(torch.randn(O, C // g, *k), sparsity=sparsity, groups=g)
    return sw, torch.randn(N, C, H, W), torch.randn(O), dict(stride=s, padding=p, dilation=d)


@pytest.mark.parametrize("name", list(CONVS))
def test_conv_matches_reference(isa, name):
    sw, x, b, geo = _conv_case(name)
    for bias, act in ((None, None), (b, "relu"), (b, "relu6")):
        y = sparse_conv2d(x * 4, sw, bias, activation=act, **geo)  # x 4: outputs beyond relu6's 6
        r64, r32 = _ref(reference.sparse_conv2d, x * 4, sw, bias=bias, activation=act, **geo)
        _close(y, r64, r32)


def test_depthwise_channels_without_taps(isa):
    """At 95 % most depthwise channels keep no tap: those write act(bias) only."""
    torch.manual_seed(1)
    sw = SparseWeight.from_dense(torch.randn(40, 1, 3, 3), sparsity=0.95, groups=40)
    empty = sw.mask().flatten(1).sum(1) == 0
    assert empty.any() and not empty.all()
    x, b = torch.randn(3, 40, 6, 5), torch.randn(40)
    for act in (None, "relu6"):
        y = sparse_conv2d(x, sw, b, padding=1, activation=act)
        r64, r32 = _ref(reference.sparse_conv2d, x, sw, bias=b, padding=1, activation=act)
        _close(y, r64, r32)
        want = reference._act(b, act)[empty][None, :, None, None].expand(3, -1, 6, 5)
        torch.testing.assert_close(y[:, empty], want)


def test_relu6_gradients_and_nan(isa):
    torch.manual_seed(2)
    sw = SparseWeight.from_dense(torch.randn(9, 1, 3, 3), sparsity=0.5, groups=9)
    x = (4 * torch.randn(2, 9, 6, 6)).requires_grad_()
    v, b = sw.values.clone().requires_grad_(), torch.randn(9, requires_grad=True)
    y = sparse_conv2d(x, sw.with_values(v), b, padding=1, activation="relu6")
    assert (y == 6).any() and (y == 0).any()
    gy = torch.randn_like(y)
    got = torch.autograd.grad((y * gy).sum(), (x, v, b))
    want = torch.autograd.grad(
        (reference.sparse_conv2d(x, sw.with_values(v), b, padding=1, activation="relu6") * gy).sum(),
        (x, v, b),
    )
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    lin = SparseWeight.from_dense(torch.ones(3, 4))
    xn = torch.zeros(2, 4)
    xn[0, 1] = float("nan")
    yl = sparse_linear(xn, lin, activation="relu6")
    assert torch.isnan(yl[0]).all() and not torch.isnan(yl[1]).any()
    xc = torch.zeros(1, 9, 4, 4)
    xc[0, 3, 2, 2] = float("nan")
    full = SparseWeight.from_dense(torch.ones(9, 1, 3, 3), groups=9)  # pruned taps skip NaNs, as they should
    yc = sparse_conv2d(xc, full, padding=1, activation="relu6")
    assert torch.isnan(yc[0, 3, 1:, 1:]).all() and torch.isnan(yc).sum() == 9


@pytest.mark.parametrize("name", list(CONVS))
def test_conv_gradients(name):
    sw, x, b, geo = _conv_case(name)
    x.requires_grad_()
    b.requires_grad_()
    v = sw.values.clone().requires_grad_()
    gy = torch.randn_like(reference.sparse_conv2d(x, sw, b, **geo))
    got = torch.autograd.grad(
        (sparse_conv2d(x, sw.with_values(v), b, activation="relu", **geo) * gy).sum(), (x, v, b)
    )
    want = torch.autograd.grad(
        (reference.sparse_conv2d(x, sw.with_values(v), b, activation="relu", **geo) * gy).sum(), (x, v, b)
    )
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_conv_gradients_every_isa(isa):
    test_conv_gradients("grouped 3x3")
    test_conv_gradients("1x1")


def test_conv_empty_batch_and_fully_pruned():
    sw, x, b, geo = _conv_case("3x3")
    assert sparse_conv2d(x[:0], sw, b, **geo).shape == (0, 12, 10, 11)
    zero = SparseWeight.from_dense(torch.zeros(4, 3, 3, 3))
    assert zero.nnz == 0
    y = sparse_conv2d(torch.randn(1, 3, 5, 5), zero, torch.ones(4), padding=1)
    torch.testing.assert_close(y, torch.ones(1, 4, 5, 5))


def test_nan_propagates():
    sw = SparseWeight.from_dense(torch.ones(3, 4))
    x = torch.zeros(2, 4)
    x[0, 1] = float("nan")
    y = sparse_linear(x, sw, activation="relu")
    assert torch.isnan(y[0]).all() and not torch.isnan(y[1]).any()


@settings(max_examples=25, deadline=None)
@given(
    C=st.integers(1, 6),
    O=st.integers(1, 6),
    g=st.sampled_from([1, 2]),
    kh=st.integers(1, 4),
    kw=st.integers(1, 4),
    s=st.integers(1, 3),
    p=st.integers(0, 2),
    d=st.integers(1, 2),
    H=st.integers(1, 9),
    W=st.integers(1, 9),
    sparsity=st.sampled_from([0.0, 0.5, 0.9]),
)
def test_conv_property(C, O, g, kh, kw, s, p, d, H, W, sparsity):
    C, O = C * g, O * g
    if H + 2 * p < d * (kh - 1) + 1 or W + 2 * p < d * (kw - 1) + 1:
        return
    sw = SparseWeight.from_dense(torch.randn(O, C // g, kh, kw), sparsity=sparsity, groups=g)
    x = torch.randn(2, C, H, W)
    y = sparse_conv2d(x, sw, stride=s, padding=p, dilation=d)
    r64, r32 = _ref(reference.sparse_conv2d, x, sw, stride=s, padding=p, dilation=d)
    _close(y, r64, r32)


@settings(max_examples=40, deadline=None)
@given(
    C=st.integers(1, 6),
    mult=st.integers(1, 2),
    kh=st.integers(1, 5),
    kw=st.integers(1, 5),
    sh=st.integers(1, 3),
    sw_=st.integers(1, 3),
    p=st.integers(0, 3),
    d=st.integers(1, 2),
    H=st.integers(1, 12),
    W=st.integers(1, 12),
    sparsity=st.sampled_from([0.0, 0.5, 0.9]),
    act=st.sampled_from([None, "relu", "relu6"]),
)
def test_depthwise_property(C, mult, kh, kw, sh, sw_, p, d, H, W, sparsity, act):
    """The direct depthwise kernel (both of its paths) over random geometry, channel multipliers
    and activations."""
    if H + 2 * p < d * (kh - 1) + 1 or W + 2 * p < d * (kw - 1) + 1:
        return
    sw = SparseWeight.from_dense(torch.randn(C * mult, 1, kh, kw), sparsity=sparsity, groups=C)
    x, b = 4 * torch.randn(2, C, H, W), torch.randn(C * mult)
    geo = dict(stride=(sh, sw_), padding=p, dilation=d)
    r64, r32 = _ref(reference.sparse_conv2d, x, sw, bias=b, activation=act, **geo)
    _close(sparse_conv2d(x, sw, b, activation=act, **geo), r64, r32)


# ------------------------------------------------------------------ torch.library


def _linear_args(requires_grad=False):
    sw = SparseWeight.from_dense(torch.randn(9, 13), sparsity=0.5)
    x = torch.randn(5, 13, requires_grad=requires_grad)
    v = sw.values.clone().requires_grad_(requires_grad)
    b = torch.randn(9, requires_grad=requires_grad)
    return (x, v, sw.rowptr, sw.colidx, sw.t_rowptr, sw.t_colidx, sw.t_perm, b, 13, 1)


def _conv_args(requires_grad=False, name="grouped 3x3", activation=1):
    sw, x, b, _ = _conv_case(name)
    x.requires_grad_(requires_grad)
    v = sw.values.clone().requires_grad_(requires_grad)
    b.requires_grad_(requires_grad)
    return (
        x,
        v,
        sw.rowptr,
        sw.colidx,
        sw.t_rowptr,
        sw.t_colidx,
        sw.t_perm,
        b,
        list(sw.shape),
        [1, 1],
        [1, 1],
        [1, 1],
        sw.groups,
        activation,
    )


def test_opcheck():
    depthwise_relu6 = lambda grad: _conv_args(grad, "depthwise 3x3", activation=2)  # noqa: E731
    for fn, make in (
        (op.sparse_linear_op, _linear_args),
        (op.sparse_conv2d_op, _conv_args),
        (op.sparse_conv2d_op, depthwise_relu6),
    ):
        torch.library.opcheck(fn, make(False))
        torch.library.opcheck(fn, make(True))
    a = _linear_args()
    gy = torch.randn(5, 9)
    torch.library.opcheck(op.sparse_linear_backward, (gy, a[0], *a[1:7], 13, True, True))
    c = _conv_args()
    gy = torch.randn(2, 12, 8, 8)
    torch.library.opcheck(op.sparse_conv2d_backward, (gy, c[0], *c[1:7], *c[8:13], True, False))


def test_compile_linear():
    sw = SparseWeight.from_dense(torch.randn(9, 13), sparsity=0.5)
    b = torch.randn(9)
    f = torch.compile(lambda x: sparse_linear(x, sw, b, "relu") * 2, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 13)
    torch.testing.assert_close(f(x), reference.sparse_linear(x, sw, b, "relu") * 2)


@pytest.mark.parametrize("name, act", [("3x3", "relu"), ("depthwise 3x3", "relu6")])
def test_compile_conv_with_backward(name, act):
    sw, x, b, geo = _conv_case(name)
    v = sw.values.clone().requires_grad_()

    def f(x, v):
        return sparse_conv2d(x, sw.with_values(v), b, activation=act, **geo).square().sum()

    x.requires_grad_()
    got = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(x, v), (x, v))
    want = torch.autograd.grad(f(x, v), (x, v))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


# ------------------------------------------------------------------ bad input


def test_bad_inputs():
    w = torch.randn(8, 6)
    with pytest.raises(ValueError, match="sparsity"):
        SparseWeight.from_dense(w, sparsity=1.0)
    with pytest.raises(ValueError, match="sparsity"):
        SparseWeight.from_dense(w, sparsity=-0.1)
    with pytest.raises(ValueError, match="mask"):
        SparseWeight.from_dense(w, mask=torch.ones(6, 8, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        SparseWeight.from_dense(w, mask=torch.ones(8, 6))
    with pytest.raises(TypeError, match="float32"):
        SparseWeight.from_dense(w.double(), sparsity=0.5)
    with pytest.raises(ValueError, match="groups"):
        SparseWeight.from_dense(torch.randn(6, 2, 3, 3), groups=4)
    sw = SparseWeight.from_dense(w, sparsity=0.5)
    with pytest.raises(ValueError, match="6 input features"):
        sparse_linear(torch.randn(3, 5), sw)
    with pytest.raises(TypeError, match="float32"):
        sparse_linear(torch.randn(3, 6, dtype=torch.float64), sw)
    with pytest.raises(TypeError, match="float32"):
        SparseWeight.from_dense(torch.randn(3, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="bias"):
        sparse_linear(torch.randn(3, 6), sw, torch.randn(7))
    with pytest.raises(ValueError, match="activation"):
        sparse_linear(torch.randn(3, 6), sw, activation="gelu")
    with pytest.raises(TypeError, match="SparseWeight"):
        sparse_linear(torch.randn(3, 6), w)
    csw = SparseWeight.from_dense(torch.randn(4, 3, 3, 3), sparsity=0.5)
    with pytest.raises(ValueError, match="channels"):
        sparse_conv2d(torch.randn(1, 4, 5, 5), csw)
    with pytest.raises(ValueError, match="groups"):
        sparse_conv2d(torch.randn(1, 6, 5, 5), csw, groups=2)
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        sparse_conv2d(torch.randn(1, 3, 2, 2), csw)
    with pytest.raises(ValueError, match="stride"):
        sparse_conv2d(torch.randn(1, 3, 5, 5), csw, stride=0)


def test_corrupt_structure_is_caught_by_the_kernel():
    sw = SparseWeight.from_dense(torch.randn(4, 6), sparsity=0.5)
    bad_col = sw.colidx.clone()
    bad_col[0] = 6
    with pytest.raises(ValueError, match="column index out of range"):
        op.sparse_linear_op(
            torch.randn(2, 6), sw.values, sw.rowptr, bad_col, sw.t_rowptr, sw.t_colidx, sw.t_perm, None, 6, 0
        )
    bad_ptr = sw.rowptr.clone()
    bad_ptr[2] = bad_ptr[3] + 1
    with pytest.raises(ValueError, match="rowptr"):
        op.sparse_linear_op(
            torch.randn(2, 6), sw.values, bad_ptr, sw.colidx, sw.t_rowptr, sw.t_colidx, sw.t_perm, None, 6, 0
        )
    dw = SparseWeight.from_dense(torch.randn(4, 1, 3, 3), sparsity=0.5, groups=4)
    bad_col = dw.colidx.clone()
    bad_col[-1] = 9
    with pytest.raises(ValueError, match="column index out of range"):  # the depthwise kernel checks too
        op.sparse_conv2d_op(
            torch.randn(1, 4, 5, 5),
            dw.values,
            dw.rowptr,
            bad_col,
            dw.t_rowptr,
            dw.t_colidx,
            dw.t_perm,
            None,
            list(dw.shape),
            [1, 1],
            [1, 1],
            [1, 1],
            4,
            0,
        )
    with pytest.raises(ValueError, match="activation must be"):
        op.sparse_conv2d_op(
            torch.randn(1, 4, 5, 5),
            dw.values,
            dw.rowptr,
            dw.colidx,
            dw.t_rowptr,
            dw.t_colidx,
            dw.t_perm,
            None,
            list(dw.shape),
            [1, 1],
            [1, 1],
            [1, 1],
            4,
            3,
        )


# ------------------------------------------------------------------ modules and sparsify


def test_sparse_linear_module():
    lin = nn.Linear(20, 10)
    layer = SparseLinear.from_dense(lin, sparsity=0.9, policy="sparse")
    assert abs(layer.density - 0.1) < 0.01
    dense = layer.to_dense()
    assert (dense != 0).sum() == layer.values.numel()
    x = torch.randn(4, 20)
    torch.testing.assert_close(layer(x), F.linear(x, dense, lin.bias))
    assert layer.backend == SPARSE
    layer.policy = "dense"
    torch.testing.assert_close(layer(x), F.linear(x, dense, lin.bias))
    assert layer.backend == DENSE
    # the model policy: a 90 %-sparse batched layer runs sparse, a 10 % one dense
    model_sparse = SparseLinear.from_dense(lin, sparsity=0.9, policy="model")
    model_dense = SparseLinear.from_dense(lin, sparsity=0.1, policy="model")
    model_sparse(torch.randn(16, 20))
    model_dense(torch.randn(16, 20))
    assert (model_sparse.backend, model_dense.backend) == (SPARSE, DENSE)


@pytest.mark.parametrize("sparse_faster", [True, False])
def test_measured_dispatch(monkeypatch, sparse_faster):
    """policy="auto" times both paths once per input signature and runs the faster."""
    from hotops.sparse import module

    calls = []

    def fake_measure(run_sparse, run_dense):
        calls.append(1)
        torch.testing.assert_close(run_sparse(), run_dense())
        return (1.0, 2.0) if sparse_faster else (2.0, 1.0)

    monkeypatch.setattr(module, "measure_pair", fake_measure)
    conv = SparseConv2d.from_dense(nn.Conv2d(4, 6, 3, padding=1), sparsity=0.5, activation="relu")
    lin = SparseLinear.from_dense(nn.Linear(12, 5), sparsity=0.5)
    want = SPARSE if sparse_faster else DENSE
    for layer, make in ((conv, lambda n: torch.randn(n, 4, 7, 7)), (lin, lambda n: torch.randn(n, 12))):
        calls.clear()
        for n in (2, 2, 3, 2):
            x = make(n)
            y = layer(x)
            assert layer.backend == want
            dense = (
                F.conv2d(x, layer.to_dense(), layer.bias, padding=1).relu()
                if layer is conv
                else F.linear(x, layer.to_dense(), layer.bias)
            )
            torch.testing.assert_close(y, dense)
        assert len(calls) == 2  # batch 2 and batch 3: each signature measured once
        assert all(d[1:] == ((1.0, 2.0) if sparse_faster else (2.0, 1.0)) for d in layer.dispatch.values())


def test_measured_dispatch_really_times():
    layer = SparseLinear.from_dense(nn.Linear(64, 32), sparsity=0.9)
    layer(torch.randn(8, 64))
    ((wins, ts, td),) = layer.dispatch.values()
    assert ts > 0 and td > 0 and wins == (ts < td)
    assert layer.backend == (SPARSE if wins else DENSE)


def test_dense_cache_follows_values():
    layer = SparseLinear.from_dense(nn.Linear(8, 4), sparsity=0.5, policy="dense")
    x = torch.randn(2, 8)
    with torch.no_grad():
        y0 = layer(x)
        layer.values.mul_(2)  # an in-place update bumps the version: the cache is rebuilt
        y1 = layer(x)
    torch.testing.assert_close(y1 - layer.bias, 2 * (y0 - layer.bias))


@pytest.mark.parametrize("policy", ["sparse", "dense"])
def test_prepared_inference_call_follows_the_layer(policy):
    """Repeated inference calls run a call bound once per signature; whatever it depends on
    (values or bias updated in place or replaced, activation, policy, input layout) rebinds it."""
    import copy
    import io

    torch.manual_seed(0)
    conv = SparseConv2d.from_dense(
        nn.Conv2d(6, 6, 3, padding=1, groups=3), sparsity=0.5, activation="relu6", policy=policy
    )
    x = 4 * torch.randn(2, 6, 5, 5)

    def want(inp=x):
        return reference.sparse_conv2d(
            inp, conv.sparse_weight, conv.bias, padding=1, activation=conv.activation
        )

    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(conv(x), want())
        assert conv._prepared is not None
        conv.values.mul_(-2)  # in place
        torch.testing.assert_close(conv(x), want())
        conv.bias.add_(1)
        torch.testing.assert_close(conv(x), want())
        conv.values = nn.Parameter(torch.randn_like(conv.values))  # replaced
        torch.testing.assert_close(conv(x), want())
        conv.activation = None
        torch.testing.assert_close(conv(x), want())
        conv.policy = "dense" if policy == "sparse" else "sparse"
        torch.testing.assert_close(conv(x), want())
        assert conv.backend == (DENSE if policy == "sparse" else SPARSE)
        xt = x.transpose(2, 3)  # not contiguous: the full path
        torch.testing.assert_close(conv(xt), want(xt))
        torch.testing.assert_close(conv(x[:1]), want(x[:1]))
    copied = copy.deepcopy(conv)  # the bound C++ call is not copied, but rebuilt
    buf = io.BytesIO()
    torch.save(conv, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.inference_mode():
        for layer in (copied, loaded):
            torch.testing.assert_close(layer(x), want())
    xg = x.clone().requires_grad_()  # with autograd: the op, differentiable
    conv(xg).sum().backward()
    assert xg.grad is not None and conv.values.grad is not None


@pytest.mark.parametrize("policy", ["sparse", "dense"])
@pytest.mark.parametrize("shape", [(1, 20), (7, 20), (2, 3, 20)])
def test_prepared_linear_call(policy, shape):
    torch.manual_seed(0)
    lin = SparseLinear.from_dense(nn.Linear(20, 9), sparsity=0.6, activation="relu", policy=policy)
    x = torch.randn(*shape)
    with torch.inference_mode():
        for _ in range(3):
            torch.testing.assert_close(
                lin(x), reference.sparse_linear(x, lin.sparse_weight, lin.bias, "relu")
            )
        assert lin._prepared is not None
        lin.activation = "relu6"
        torch.testing.assert_close(
            lin(3 * x), reference.sparse_linear(3 * x, lin.sparse_weight, lin.bias, "relu6")
        )


def test_training_under_fixed_mask():
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    layer = SparseConv2d.from_dense(conv, sparsity=0.8, activation="relu", policy="sparse")
    mask = layer.mask()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x, target = torch.randn(3, 4, 6, 6), torch.randn(3, 6, 6, 6)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = F.mse_loss(layer(x), target)
        loss.backward()
        # the values' gradient is the dense masked gradient at the mask's non-zeros
        w = layer.to_dense().detach().requires_grad_()
        F.mse_loss(F.relu(F.conv2d(x, w, layer.bias, padding=1)), target).backward()
        torch.testing.assert_close(layer.values.grad, w.grad[mask], rtol=1e-4, atol=1e-6)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert torch.equal(layer.mask(), mask)  # the mask is fixed; only values moved


def test_set_mask_repacks():
    layer = SparseConv2d.from_dense(nn.Conv2d(3, 4, 3), sparsity=0.5)
    new = torch.zeros(4, 3, 3, 3, dtype=torch.bool)
    new[:, :, 1, 1] = True
    layer.set_mask(new)
    assert layer.values.numel() == 12 and torch.equal(layer.mask(), new)


def _tiny_net():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )


def test_sparsify_magnitude():
    net = _tiny_net()
    sp = sparsify(net, sparsity=0.75, policy="sparse")
    assert (
        isinstance(sp[0], SparseConv2d)
        and isinstance(sp[2], SparseConv2d)
        and isinstance(sp[6], SparseLinear)
    )
    assert isinstance(net[0], nn.Conv2d)  # not in place by default
    dense = _tiny_net()
    dense.load_state_dict(net.state_dict())
    for i in (0, 2, 6):
        dense[i].weight.data = sp[i].to_dense()
        assert abs(sp[i].density - 0.25) < 0.05
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(sp(x), dense(x), rtol=1e-4, atol=1e-5)


def test_sparsify_learned():
    torch.manual_seed(0)
    net = _tiny_net()
    data = [(torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))) for _ in range(3)]
    sp = sparsify(
        net,
        sparsity=0.7,
        method="learned",
        data=data,
        loss_fn=F.cross_entropy,
        steps=6,
        lr=5.0,
        skip=lambda name, m: isinstance(m, nn.Linear),
    )
    assert isinstance(sp[0], SparseConv2d) and isinstance(sp[6], nn.Linear)
    assert abs(sp[0].density - 0.3) < 0.02
    magnitude = sparsify(net, sparsity=0.7, skip=lambda name, m: isinstance(m, nn.Linear))
    assert not torch.equal(sp[0].mask(), magnitude[0].mask())  # the scores moved the mask
    with pytest.raises(ValueError, match="data"):
        sparsify(net, method="learned")
    with pytest.raises(ValueError, match="method"):
        sparsify(net, method="random")


def _bn_net():
    """conv + BN + ReLU6, depthwise + BN + ReLU, a sparse layer with its own ReLU before a BN (must
    not fold), a dense conv + BN (torch's folding), linear + BatchNorm1d + ReLU."""
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU6(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 6, 1),
        nn.ReLU(),
        nn.BatchNorm2d(6),
        nn.Conv2d(6, 4, 1),
        nn.BatchNorm2d(4),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 7),
        nn.BatchNorm1d(7),
        nn.ReLU(),
    )
    for bn in net.modules():
        if isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.data.uniform_(0.5, 2)
            bn.bias.data.uniform_(-1, 1)
    return net.eval()


def test_fuse_folds_batchnorm_and_activations():
    torch.manual_seed(0)
    sp = sparsify(_bn_net(), sparsity=0.6, policy="sparse", skip=lambda name, m: name == "9")
    fused = hotops.sparse.fuse(sp)
    kinds = [type(m).__name__ for m in fused]
    assert kinds == [
        "SparseConv2d",
        "Identity",
        "Identity",
        "SparseConv2d",
        "Identity",
        "Identity",
        "SparseConv2d",
        "Identity",
        "BatchNorm2d",
        "Conv2d",
        "Identity",
        "Flatten",
        "SparseLinear",
        "Identity",
        "Identity",
    ]
    assert [fused[i].activation for i in (0, 3, 6, 12)] == ["relu6", "relu", "relu", "relu"]
    assert isinstance(sp[1], nn.BatchNorm2d) and sp[0].activation is None  # not in place by default
    x = 3 * torch.randn(4, 3, 5, 5)
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), sp(x), rtol=1e-4, atol=1e-4)
        fused[0].policy = "dense"  # the dense path of a fused layer applies the same activation
        torch.testing.assert_close(fused(x), sp(x), rtol=1e-4, atol=1e-4)


def test_fuse_refuses_training_mode():
    sp = sparsify(_bn_net(), sparsity=0.5)
    with pytest.raises(ValueError, match="eval mode"):
        hotops.sparse.fuse(sp.train())
    sp.eval()
    sp[1].train()
    with pytest.raises(ValueError, match="but 1 are"):  # names the module in training mode
        hotops.sparse.fuse(sp)


def test_public_api():
    assert hotops.sparse_linear is sparse_linear and hotops.nn.SparseConv2d is SparseConv2d


# ------------------------------------------------------------------ the Triton BSR kernel


def _force_triton(monkeypatch):
    require_triton_runs()
    monkeypatch.setattr(
        op,
        "LINEAR_BACKENDS",
        (_backend.Backend("triton", lambda dev: None, (op._triton_linear, op._triton_linear_grads)),),
    )


@pytest.mark.parametrize("B,O,I", [(5, 40, 70), (33, 32, 32)])
def test_triton_bsr_linear_in_interpreter(monkeypatch, B, O, I):
    _force_triton(monkeypatch)
    sw = SparseWeight.from_dense(torch.randn(O, I), sparsity=0.8)
    x = torch.randn(B, I, requires_grad=True)
    v = sw.values.clone().requires_grad_()
    b = torch.randn(O, requires_grad=True)
    y = sparse_linear(x, sw.with_values(v), b, "relu")
    r64, r32 = _ref(reference.sparse_linear, x.detach(), sw, bias=b.detach(), activation="relu")
    _close(y.detach(), r64, r32)
    gy = torch.randn(B, O)
    got = torch.autograd.grad((y * gy).sum(), (x, v, b))
    want = torch.autograd.grad(
        (reference.sparse_linear(x, sw.with_values(v), b, "relu") * gy).sum(), (x, v, b)
    )
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_bsr_packing_round_trip():
    pytest.importorskip("triton")
    from hotops.sparse.triton import to_bsr

    sw = SparseWeight.from_dense(torch.randn(70, 45), sparsity=0.9)
    crow, ccol, blocks = to_bsr(sw.rowptr, sw.colidx, sw.values, sw.shape, block=(16, 16))
    dense = torch.zeros(80, 48)
    for br in range(crow.numel() - 1):
        for j in range(crow[br], crow[br + 1]):
            c = int(ccol[j])
            dense[br * 16 : (br + 1) * 16, c * 16 : (c + 1) * 16] = blocks[j]
    torch.testing.assert_close(dense[:70, :45], sw.to_dense())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_sparse_linear():
    sw = SparseWeight.from_dense(torch.randn(300, 500), sparsity=0.9)
    dev = SparseWeight(
        sw.shape,
        sw.groups,
        *(t.cuda() for t in (sw.rowptr, sw.colidx, sw.values, sw.t_rowptr, sw.t_colidx, sw.t_perm)),
    )
    x = torch.randn(100, 500, device="cuda")
    torch.testing.assert_close(
        sparse_linear(x, dev, activation="relu").cpu(),
        reference.sparse_linear(x.cpu(), sw, activation="relu"),
        rtol=1e-4,
        atol=1e-4,
    )


def test_conv_dispatch_model():
    x = torch.randn(1, 8, 6, 6)
    cases = [
        (nn.Conv2d(8, 8, 3, padding=1), 0.9, SPARSE),
        (nn.Conv2d(8, 8, 3, padding=1), 0.5, DENSE),
        (nn.Conv2d(8, 8, 1), 0.7, SPARSE),
        (nn.Conv2d(8, 8, 1), 0.3, DENSE),
        (nn.Conv2d(8, 8, 3, padding=1, groups=8), 0.9, SPARSE),
        (nn.Conv2d(8, 8, 3, padding=1, groups=8), 0.5, DENSE),
    ]
    for conv, sparsity, backend in cases:
        layer = SparseConv2d.from_dense(conv, sparsity=sparsity, policy="model")
        torch.testing.assert_close(
            layer(x), F.conv2d(x, layer.to_dense(), conv.bias, 1, conv.padding, 1, conv.groups)
        )
        assert layer.backend == backend, (conv, sparsity)
