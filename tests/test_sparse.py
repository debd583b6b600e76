"""hotops.sparse: kernels vs the dense masked reference, gradients, the ops, bad inputs, Triton BSR."""

import pytest
import torch
import torch.nn.functional as F
from _sparse_ref import check_close, reference_pair
from conftest import require_triton_runs
from hypothesis import given, settings
from hypothesis import strategies as st

from hotops import _backend
from hotops.sparse import (
    SparseWeight,
    op,
    reference,
    sparse_conv2d,
    sparse_linear,
)

# ------------------------------------------------------------------ linear


@pytest.mark.parametrize("B", [0, 1, 5, 40, 64, 100, 131])
@pytest.mark.parametrize("sparsity", [0.0, 0.6, 0.97])
def test_linear_matches_reference(isa, B, sparsity):
    sw = SparseWeight.from_dense(torch.randn(37, 53), sparsity=sparsity)
    x, b = torch.randn(B, 53), torch.randn(37)
    for bias, act in ((None, None), (b, "relu")):
        y = sparse_linear(x, sw, bias, act)
        r64, r32 = reference_pair(reference.sparse_linear, x, sw, bias=bias, activation=act)
        check_close(y, r64, r32)


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
    r64, r32 = reference_pair(reference.sparse_linear, x, sw, bias=b, activation="relu")
    check_close(sparse_linear(x, sw, b, "relu"), r64, r32)
    xg, v = x.clone().requires_grad_(), sw.values.clone().requires_grad_()
    gy = torch.randn(B, 23)
    got = torch.autograd.grad((sparse_linear(xg, sw.with_values(v), b) * gy).sum(), (xg, v))
    want = torch.autograd.grad((reference.sparse_linear(xg, sw.with_values(v), b) * gy).sum(), (xg, v))
    for g, w_ in zip(got, want):
        torch.testing.assert_close(g, w_, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("B", [40, 300])
def test_value_gradient_threads(isa, threads, B):
    """The value gradient on any thread count: at 40 rows (one tile of pixels) the work items own
    disjoint rows and write grad_values directly; at 300 (three tiles) they share rows, each thread
    sums a fixed share into a lane of its own and the lanes are added up. Either way every call
    gives the same bits (no dependence on timing)."""
    sw = SparseWeight.from_dense(torch.randn(70, 600), sparsity=0.8)  # two column panels
    x, gy = torch.randn(B, 600), torch.randn(B, 70)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        grads = [
            op.sparse_linear_backward(
                gy, x, sw.values, sw.rowptr, sw.colidx, sw.t_rowptr, sw.t_colidx, sw.t_perm, 600, False, True
            )[1]
            for _ in range(3)
        ]
    finally:
        torch.set_num_threads(old)
    from hotops.sparse.format import csr_rows

    want = (gy.double().t() @ x.double())[csr_rows(sw.rowptr, 70), sw.colidx.long()]
    torch.testing.assert_close(grads[0], want.float(), rtol=1e-4, atol=1e-4)
    assert all(torch.equal(g, grads[0]) for g in grads[1:])


@pytest.mark.parametrize("B", [1024, 1040, 1500])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_linear_many_rows(isa, B, dtype):
    """Batches of many tiles of pixels (64 rows at 1536 inputs), each transposed and widened in
    the kernel from x as it comes (float32, float16 or bfloat16, rows strided inside a wider
    tensor), forward and value gradient; 1024 is a batch whose x^T rows would lie 4 KB apart.
    (Small batches, whose rows the work is split by, are transposed whole: the other linear
    tests.)"""
    sw = SparseWeight.from_dense(torch.randn(40, 1536), sparsity=0.9)
    b = torch.randn(40)
    wide = torch.randn(B, 1552).to(dtype)
    for x in (wide[:, :1536].contiguous(), wide[:, 5:1541]):  # the second: row stride 1552
        y = sparse_linear(x, sw, b, "relu")
        assert y.dtype == dtype
        xr = x.float()
        r64, r32 = reference_pair(reference.sparse_linear, xr, sw, bias=b, activation="relu")
        if dtype == torch.float32:  # sums of ~150 products, whose float32 rounding the reference may dodge
            check_close(y, r64, r32, rtol=1e-6)
        else:  # the output rounded once to x's dtype
            t = 2e-3 if dtype == torch.float16 else 1e-2
            torch.testing.assert_close(y.float(), r32, rtol=t, atol=t)
    # the backward: grad_values reads x as it comes too (tiles transposed in the kernel)
    xg, v, gy = x.detach().clone().requires_grad_(), sw.values.clone().requires_grad_(), torch.randn(B, 40)
    got = torch.autograd.grad((sparse_linear(xg, sw.with_values(v), b).float() * gy).sum(), (xg, v))
    xr = xg.detach().float().requires_grad_()
    want = torch.autograd.grad((reference.sparse_linear(xr, sw.with_values(v), b) * gy).sum(), (xr, v))
    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]  # rounded to x's dtype
    torch.testing.assert_close(got[0].float(), want[0], rtol=tol, atol=tol)
    # grad_y reaches the kernel rounded to x's dtype: bfloat16's 8 bits make the value sums looser
    vtol = 1e-2 if dtype == torch.bfloat16 else 1e-3
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=vtol * B**0.5)


@pytest.mark.parametrize("shape", [(1, 5), (3, 17), (37, 29), (1024, 48), (130, 100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_widen(isa, shape, dtype):
    """sparse_widen: x (R, C) copied or transposed into float32, into a destination whose rows are
    padded (op._transposed_empty) or not; any other destination dtype is refused."""
    ext = _backend.ext()
    x = torch.randn(shape).to(dtype)
    for out in (torch.empty(shape[::-1]), op._transposed_empty(*shape[::-1])):
        ext.sparse_widen(x, out, True, 2)
        assert torch.equal(out, x.t().float())
    out = torch.empty(shape[0], shape[1] + 16, dtype=torch.float32)[:, : shape[1]]
    ext.sparse_widen(x, out, False, 2)
    assert torch.equal(out, x.float())
    with pytest.raises(ValueError, match="dst"):
        ext.sparse_widen(x, torch.empty(shape[::-1], dtype=torch.bfloat16), True, 2)


def test_transposed_rows_spread_over_cache_sets():
    for rows, cols in ((384, 1024), (8, 5120), (3, 4096), (5, 100)):
        t = op._transposed_empty(rows, cols)
        line = 16  # floats per 64-byte line
        assert t.shape == (rows, cols) and t.dtype == torch.float32 and t.stride(1) == 1
        assert t.stride(0) >= cols and t.stride(0) % line == 0 and (t.stride(0) // line) % 8 != 0
    assert op._transposed_empty(4096, 64).stride(0) == 64  # 4 lines spread already: no padding


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
        r64, r32 = reference_pair(reference.sparse_conv2d, x * 4, sw, bias=bias, activation=act, **geo)
        check_close(y, r64, r32)


def test_depthwise_channels_without_taps(isa):
    """At 95 % most depthwise channels keep no tap: those write act(bias) only."""
    torch.manual_seed(1)
    sw = SparseWeight.from_dense(torch.randn(40, 1, 3, 3), sparsity=0.95, groups=40)
    empty = sw.mask().flatten(1).sum(1) == 0
    assert empty.any() and not empty.all()
    x, b = torch.randn(3, 40, 6, 5), torch.randn(40)
    for act in (None, "relu6"):
        y = sparse_conv2d(x, sw, b, padding=1, activation=act)
        r64, r32 = reference_pair(reference.sparse_conv2d, x, sw, bias=b, padding=1, activation=act)
        check_close(y, r64, r32)
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


def test_batch1_row_tails_ignore_unread_inputs(isa):
    # A row's last 1 .. W - 1 non-zeros are loaded as one vector whose other lanes read input 0
    # and are then dropped: an inf there, in a column no row keeps, must not reach any output.
    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, 300, generator=g)
    for r in range(40):  # row r keeps 1 + r non-zeros among columns 1.., so every tail length occurs
        keep = torch.randperm(299, generator=g)[: 1 + r] + 1
        row = torch.zeros(300)
        row[keep] = w[r, keep]
        w[r] = row
    x = torch.randn(1, 300, generator=g)
    x[0, 0] = float("inf")
    y = sparse_linear(x, SparseWeight.from_dense(w))
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, x[:, 1:] @ w[:, 1:].T)


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
    r64, r32 = reference_pair(reference.sparse_conv2d, x, sw, stride=s, padding=p, dilation=d)
    check_close(y, r64, r32)


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
    r64, r32 = reference_pair(reference.sparse_conv2d, x, sw, bias=b, activation=act, **geo)
    check_close(sparse_conv2d(x, sw, b, activation=act, **geo), r64, r32)


# ------------------------------------------------------------------ torch.library


def _linear_args(requires_grad=False):
    sw = SparseWeight.from_dense(torch.randn(9, 13), sparsity=0.5)
    x = torch.randn(5, 13, requires_grad=requires_grad)
    v = sw.values.clone().requires_grad_(requires_grad)
    b = torch.randn(9, requires_grad=requires_grad)
    return (x, v, sw.rowptr, sw.colidx, sw.t_rowptr, sw.t_colidx, sw.t_perm, b, 13, "relu")


def _conv_args(requires_grad=False, name="grouped 3x3", activation="relu"):
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
    depthwise_relu6 = lambda grad: _conv_args(grad, "depthwise 3x3", activation="relu6")  # noqa: E731
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


# ------------------------------------------------------------------ the Triton BSR kernel


def _force_triton(monkeypatch):
    require_triton_runs()
    monkeypatch.setattr(
        op,
        "SPARSE_LINEAR_BACKENDS",
        (_backend.Backend("triton", lambda dev: None, op._triton_linear),),
    )
    monkeypatch.setattr(
        op,
        "SPARSE_LINEAR_BACKWARD_BACKENDS",
        (_backend.Backend("triton", lambda dev: None, op._triton_linear_backward),),
    )


@pytest.mark.parametrize("B,O,I", [(5, 40, 70), (33, 32, 32)])
def test_triton_bsr_linear_in_interpreter(monkeypatch, B, O, I):
    _force_triton(monkeypatch)
    sw = SparseWeight.from_dense(torch.randn(O, I), sparsity=0.8)
    x = torch.randn(B, I, requires_grad=True)
    v = sw.values.clone().requires_grad_()
    b = torch.randn(O, requires_grad=True)
    y = sparse_linear(x, sw.with_values(v), b, "relu")
    r64, r32 = reference_pair(reference.sparse_linear, x.detach(), sw, bias=b.detach(), activation="relu")
    check_close(y.detach(), r64, r32)
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
