"""hotops.sparse under hostile use: property tests against reference.py over dtypes, shapes, strides
and value ranges (NaN, +-Inf, huge, tiny, empty); fully pruned layers on every kernel and ISA;
threads sharing modules and weights; parameter mutation (.data swaps, in-place ops, copy_,
load_state_dict, .to / .half / .bfloat16); arguments that must be refused with a clear error."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_to_reference
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hotops import _backend
from hotops.sparse import (
    SparseConv2d,
    SparseLinear,
    SparseWeight,
    op,
    reference,
    sparse_conv2d,
    sparse_linear,
)
from hotops.sparse.spec import ConvGeometry

LOW = (torch.bfloat16, torch.float16)


def _structural(x64: torch.Tensor, sw: SparseWeight, bias, act, conv=None) -> torch.Tensor:
    """The product over the kept weights only, in float64: a pruned weight is absent, not a zero,
    so an Inf input meets only the kept weights (the dense masked reference would give
    Inf * 0 = NaN where Inf meets a pruned one)."""
    O, K = sw.shape[0], sw.cols
    idx = torch.stack([sw.row_indices(), sw.colidx.long()])
    W = torch.sparse_coo_tensor(idx, sw.values.detach().double(), (O, K), check_invariants=True).coalesce()
    if conv is None:
        y = torch.sparse.mm(W, x64.reshape(-1, K).t()).t().reshape(*x64.shape[:-1], O)
        bshape = (O,)
    else:
        stride, padding, dilation = conv
        N, C, H, Wd = x64.shape
        g = sw.groups
        cols = F.unfold(
            x64, sw.shape[2:], dilation=dilation, padding=padding, stride=stride
        )  # (N, C*kh*kw, L)
        Og, Kg = O // g, K
        ys = []
        for gi in range(g):
            Wg = torch.sparse_coo_tensor(
                idx[:, (idx[0] >= gi * Og) & (idx[0] < (gi + 1) * Og)] - torch.tensor([[gi * Og], [0]]),
                sw.values.detach().double()[(idx[0] >= gi * Og) & (idx[0] < (gi + 1) * Og)],
                (Og, Kg),
                check_invariants=True,
            ).coalesce()
            ys.append(
                torch.stack([torch.sparse.mm(Wg, cols[n, gi * Kg : (gi + 1) * Kg]) for n in range(N)])
                if N
                else cols.new_zeros(0, Og, cols.shape[2])
            )
        y = torch.cat(ys, 1)
        Ho, Wo = ConvGeometry.conv(x64.shape, sw.shape, stride, padding, dilation, g).out_shape[2:]
        y = y.reshape(N, O, Ho, Wo)
        bshape = (1, O, 1, 1)
    if bias is not None:
        y = y + bias.double().reshape(bshape)
    return reference._act(y, act)


def _assert_matches(y, x, sw, bias, act, conv=None, blocked_or_dense=False):
    """Outputs the structural float64 reference (kept weights only) makes NaN or +-Inf are so
    exactly; the others are within the tolerance idiom of the dense reference where x is finite,
    or close to the structural reference otherwise. One exception, where an Inf in x meets a
    stored zero: the blocked form's padding (``blocked_or_dense``) may give NaN there, as the
    dense masked reference (F.linear / F.conv2d with the pruned weights as zeros) does."""
    ref_fn = reference.sparse_linear if conv is None else reference.sparse_conv2d
    kw = {} if conv is None else dict(zip(("stride", "padding", "dilation"), conv))
    s64 = _structural(x.double(), sw, bias, act, conv).to(y.dtype).double()  # overflow as y's dtype would
    assert y.shape == s64.shape
    yd = y.double()
    sw64 = sw.with_values(sw.values.detach().double())
    d64 = ref_fn(x.double(), sw64, bias.double() if bias is not None else None, activation=act, **kw)
    nan_y, nan_s = torch.isnan(yd), torch.isnan(s64)
    assert not (nan_s & ~nan_y).any(), "a NaN of the reference is missing"
    extra = nan_y & ~nan_s
    if blocked_or_dense:
        assert not (extra & ~torch.isnan(d64)).any(), "NaN where neither reference has one"
    else:
        assert not extra.any(), "NaN where the structural reference has none"
    keep = ~nan_y
    inf_s = torch.isinf(s64) & keep
    assert torch.equal(yd[inf_s], s64[inf_s]), "Inf differs"
    fin = keep & torch.isfinite(s64)
    assert torch.isfinite(yd[fin]).all(), "Inf where the reference is finite"
    if not y.numel():
        return
    if torch.isfinite(x).all():
        assert_close_to_reference(
            y,
            d64,
            ref_fn(x, sw, bias, activation=act, **kw),
            atol=1e-4 if y.dtype == torch.float32 else 1e-2,
            rtol=1e-6,
        )
    else:
        tol = 1e-4 if y.dtype == torch.float32 else 5e-2
        torch.testing.assert_close(yd[fin], s64[fin], rtol=tol, atol=tol)


def _layout(x: torch.Tensor, how: str) -> torch.Tensor:
    """x (same values) laid out as: contiguous, transposed (last dim not contiguous), offset into a
    larger buffer, or expanded (a stride-0 dimension; then x's values repeat along dim 0)."""
    if how == "transposed":
        return x.transpose(0, -1).contiguous().transpose(0, -1)
    if how == "offset":
        big = torch.empty(x.numel() + 7, dtype=x.dtype)
        return big[7:].view(x.shape).copy_(x)
    if how == "expanded" and x.shape[0] > 0:
        return x[:1].expand(x.shape)
    return x


VALUES = st.sampled_from(["normal", "huge", "tiny", "nan", "inf", "zero"])


def _fill(x: torch.Tensor, kind: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "huge":
        x = x * 1e18
    elif kind == "tiny":
        x = x * 1e-30
    elif kind == "zero":
        x = torch.zeros_like(x)
    elif kind in ("nan", "inf") and x.numel():
        pick = torch.rand(x.shape, generator=g) < 0.1
        bad = float("nan") if kind == "nan" else float("inf")
        sign = torch.where(torch.rand(x.shape, generator=g) < 0.5, -1.0, 1.0).to(x.dtype)
        x = torch.where(pick, torch.full_like(x, bad) * sign, x)
    return x


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(0, 9),
    I=st.integers(1, 40),
    O=st.integers(1, 20),
    sparsity=st.sampled_from([0.0, 0.5, 0.9, 0.99]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    how=st.sampled_from(["contiguous", "transposed", "offset", "expanded"]),
    values=VALUES,
    layout=st.sampled_from(["csr", "blocked"]),
    bias=st.booleans(),
    act=st.sampled_from([None, "relu", "relu6"]),
    seed=st.integers(0, 2**16),
)
def test_property_linear(B, I, O, sparsity, dtype, how, values, layout, bias, act, seed):
    torch.manual_seed(seed)
    sw = SparseWeight.from_dense(torch.randn(O, I), sparsity=sparsity, layout=layout)
    x = _layout(_fill(torch.randn(B, I), values, seed).to(dtype), how)
    b = torch.randn(O).to(dtype) if bias else None
    with torch.no_grad():
        y = sparse_linear(x, sw, b, act)
    assert y.dtype == dtype
    _assert_matches(y, x, sw, b, act, blocked_or_dense=layout == "blocked")


@settings(max_examples=30, deadline=None)
@given(
    N=st.integers(0, 2),
    C=st.sampled_from([1, 2, 4]),
    O=st.sampled_from([1, 4, 8]),
    k=st.integers(1, 3),
    hw=st.integers(1, 7),
    stride=st.integers(1, 2),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    groups=st.sampled_from([1, 2, 4]),
    sparsity=st.sampled_from([0.0, 0.5, 0.9]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    how=st.sampled_from(["contiguous", "transposed", "offset", "expanded"]),
    values=VALUES,
    layout=st.sampled_from(["csr", "blocked"]),
    act=st.sampled_from([None, "relu"]),
    seed=st.integers(0, 2**16),
)
def test_property_conv2d(
    N, C, O, k, hw, stride, padding, dilation, groups, sparsity, dtype, how, values, layout, act, seed
):
    if C % groups or O % groups or hw + 2 * padding < dilation * (k - 1) + 1:
        return
    torch.manual_seed(seed)
    sw = SparseWeight.from_dense(
        torch.randn(O, C // groups, k, k), sparsity=sparsity, groups=groups, layout=layout
    )
    x = _layout(_fill(torch.randn(N, C, hw, hw), values, seed).to(dtype), how)
    b = torch.randn(O).to(dtype)
    with torch.no_grad():
        y = sparse_conv2d(x, sw, b, stride, padding, dilation, activation=act)
    assert y.dtype == dtype
    _assert_matches(
        y, x, sw, b, act, ([stride] * 2, [padding] * 2, [dilation] * 2), blocked_or_dense=layout == "blocked"
    )


@settings(max_examples=15, deadline=None)
@given(
    B=st.integers(1, 6),
    I=st.integers(1, 30),
    O=st.integers(1, 12),
    sparsity=st.sampled_from([0.0, 0.7, 0.99]),
    layout=st.sampled_from(["csr", "blocked"]),
    seed=st.integers(0, 2**16),
)
def test_property_linear_gradients(B, I, O, sparsity, layout, seed):
    torch.manual_seed(seed)
    sw = SparseWeight.from_dense(torch.randn(O, I), sparsity=sparsity, layout=layout)
    x = torch.randn(B, I, requires_grad=True)
    v = sw.values.clone().requires_grad_()
    b = torch.randn(O, requires_grad=True)
    gy = torch.randn(B, O)
    got = torch.autograd.grad((sparse_linear(x, sw.with_values(v), b) * gy).sum(), (x, v, b))
    want = torch.autograd.grad((reference.sparse_linear(x, sw.with_values(v), b) * gy).sum(), (x, v, b))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ fully pruned layers (nnz = 0)


@pytest.mark.parametrize("layout", ["csr", "blocked"])
@pytest.mark.parametrize("kind", ["linear", "conv", "conv1x1", "depthwise"])
def test_fully_pruned_layer(isa, kind, layout):
    """Forward (the bias, through the activation) and backward (zero grad_x, empty grad_values,
    the bias gradient) with no non-zero at all, on every kernel and ISA."""
    if kind == "linear":
        w, x = torch.zeros(6, 9), torch.randn(4, 9)
        run, ref = sparse_linear, reference.sparse_linear
    else:
        shape = {"conv": (6, 2, 3, 3), "conv1x1": (6, 2, 1, 1), "depthwise": (6, 1, 3, 3)}[kind]
        groups = 6 if kind == "depthwise" else 1
        w, x = torch.zeros(shape), torch.randn(2, 2 * groups if kind != "depthwise" else 6, 5, 5)
        run = lambda x, sw, b, act=None: sparse_conv2d(x, sw, b, padding=1, activation=act)  # noqa: E731
        ref = lambda x, sw, b, act=None: reference.sparse_conv2d(x, sw, b, padding=1, activation=act)  # noqa: E731
    sw = SparseWeight.from_dense(w, groups=6 if kind == "depthwise" else 1, layout=layout)
    assert sw.nnz == 0
    for act in (None, "relu"):
        b = torch.randn(6, requires_grad=True)
        xg = x.clone().requires_grad_()
        v = sw.values.clone().requires_grad_()
        y = run(xg, sw.with_values(v), b, act)
        torch.testing.assert_close(y, ref(x, sw, b, act))
        gy = torch.randn_like(y)
        gx, gv, gb = torch.autograd.grad((y * gy).sum(), (xg, v, b), allow_unused=True)
        assert gx is None or not gx.any()
        assert gv is None or gv.shape == (0,)
        _, _, gb_ref = torch.autograd.grad(
            (ref(xg, sw.with_values(v), b, act) * gy).sum(), (xg, v, b), allow_unused=True
        )
        torch.testing.assert_close(gb, gb_ref)
        with torch.no_grad():  # the direct (dispatcher-free) path
            torch.testing.assert_close(run(x, sw, b, act), ref(x, sw, b, act))


def test_fully_pruned_kernels_direct(isa):
    """The C++ entry points themselves take nnz = 0 (an empty grad_values of any strides)."""
    ext = _backend.ext()
    sw = SparseWeight.from_dense(torch.zeros(3, 2, 1, 1))
    geom = ConvGeometry.conv((1, 2, 4, 4), sw.shape, [1, 1], [0, 0], [1, 1], 1)
    x3, gy3 = torch.randn(1, 2, 16), torch.randn(1, 3, 16)
    for gv in (torch.zeros(0), torch.zeros(0, 3)[:, 1]):
        ext.sparse_conv_bwd_values(geom, sw.rowptr, sw.colidx, sw.values, sw.t_rowptr, x3, gy3, gv, 2)
    y = torch.empty(1, 3, 16)
    ext.sparse_conv_fwd(geom, sw.rowptr, sw.colidx, sw.values, sw.t_rowptr, x3, torch.ones(3), y, None, 1)
    assert torch.equal(y, torch.ones(1, 3, 16))


@pytest.mark.parametrize("cls", ["linear", "conv"])
def test_fully_pruned_module_trains(cls):
    """The issue's case: Conv2d(1, 1, 1) at sparsity 0.5 keeps round(0.5) = 0 weights."""
    dense = nn.Conv2d(1, 1, 1) if cls == "conv" else nn.Linear(1, 1)
    layer = (SparseConv2d if cls == "conv" else SparseLinear).from_dense(dense, sparsity=0.5, policy="sparse")
    assert layer.values.numel() == 0
    x = torch.randn(2, 1, 3, 3) if cls == "conv" else torch.randn(2, 1)
    layer(x.requires_grad_()).sum().backward()
    assert layer.bias.grad is not None and layer.values.grad.shape == (0,)


# ------------------------------------------------------------------ arguments


@pytest.mark.parametrize(
    "value",
    [1, 1.0, np.int64(1), np.int32(1), torch.tensor(1), (1, 1), [1, 1], (np.int64(1), 1), np.array([1, 1])],
)
def test_int_pair_arguments_accept_numbers(value):
    sw = SparseWeight.from_dense(torch.randn(4, 2, 3, 3), sparsity=0.5)
    x = torch.randn(1, 2, 6, 6)
    want = reference.sparse_conv2d(x, sw)
    for name in ("stride", "dilation"):
        torch.testing.assert_close(sparse_conv2d(x, sw, **{name: value}), want, rtol=1e-4, atol=1e-4)
    layer = SparseConv2d(sw, stride=value, padding=value, dilation=value, policy="sparse")
    with torch.no_grad():
        layer(x)


@pytest.mark.parametrize(
    "name,value,err,msg",
    [
        ("stride", "1", TypeError, "stride must be a number"),
        ("stride", 1.5, ValueError, "stride must be an integer"),
        ("stride", 0, ValueError, "stride must be >= 1"),
        ("stride", (1, 2, 3), ValueError, "stride must be an int >= 1 or a pair"),
        ("stride", None, TypeError, "stride must be a number"),
        ("stride", True, TypeError, "stride must be a number"),
        ("padding", -1, ValueError, "padding must be >= 0"),
        ("padding", float("nan"), ValueError, "padding must be an integer"),
        ("dilation", torch.tensor([1.0, 2.0, 3.0]), ValueError, "dilation must be an int >= 1 or a pair"),
        ("groups", 1.5, ValueError, "groups must be an integer"),
        ("groups", "2", TypeError, "groups must be a number"),
        ("groups", 2, ValueError, "packed for groups=1"),
        ("activation", "gelu", ValueError, "activation must be None, 'relu' or 'relu6'"),
    ],
)
def test_conv_arguments_refused_by_name(name, value, err, msg):
    sw = SparseWeight.from_dense(torch.randn(4, 2, 3, 3), sparsity=0.5)
    with pytest.raises(err, match=msg):
        sparse_conv2d(torch.randn(1, 2, 6, 6), sw, **{name: value})
    if name != "groups":
        with pytest.raises(err, match=msg):
            SparseConv2d(sw, **{name: value})


@pytest.mark.parametrize(
    "case,err,msg",
    [
        ("x float64", TypeError, "x has dtype float64"),
        ("x int", TypeError, "x has dtype int64"),
        ("x list", TypeError, "x must be a torch.Tensor"),
        ("x wrong features", ValueError, "x must end in the 8 input features"),
        ("x 0-d", ValueError, "x must end in the 8 input features"),
        ("bias shape", ValueError, "bias has 3 entries, expected 4"),
        ("bias 2-d", ValueError, "bias must have 1 dimensions"),
        ("bias int", TypeError, "bias has dtype int64"),
        ("sw", TypeError, "sw must be a hotops.sparse.SparseWeight"),
        ("conv weight", ValueError, "needs a linear"),
        ("values f64", TypeError, "sw.values has dtype float64"),
        ("activation", ValueError, "activation must be"),
    ],
)
def test_linear_arguments_refused_by_name(case, err, msg):
    sw = SparseWeight.from_dense(torch.randn(4, 8), sparsity=0.5)
    x, b, act = torch.randn(2, 8), None, None
    if case == "x float64":
        x = x.double()
    elif case == "x int":
        x = x.long()
    elif case == "x list":
        x = [[1.0] * 8]
    elif case == "x wrong features":
        x = torch.randn(2, 7)
    elif case == "x 0-d":
        x = torch.tensor(1.0)
    elif case == "bias shape":
        b = torch.randn(3)
    elif case == "bias 2-d":
        b = torch.randn(4, 1)
    elif case == "bias int":
        b = torch.ones(4, dtype=torch.long)
    elif case == "sw":
        sw = torch.randn(4, 8)
    elif case == "conv weight":
        sw = SparseWeight.from_dense(torch.randn(4, 8, 1, 1), sparsity=0.5)
    elif case == "values f64":
        sw = sw.with_values(sw.values.double())
    else:
        act = "tanh"
    with pytest.raises(err, match=msg):
        sparse_linear(x, sw, b, act)


@pytest.mark.parametrize(
    "case,err,msg",
    [
        ("x 3-d", ValueError, "x must have 4 dimensions"),
        ("channels", ValueError, "x has 3 channels"),
        ("too small", ValueError, "smaller than the dilated kernel"),
        ("linear weight", ValueError, "needs a conv"),
    ],
)
def test_conv_inputs_refused_by_name(case, err, msg):
    sw = SparseWeight.from_dense(torch.randn(4, 2, 3, 3), sparsity=0.5)
    x = {
        "x 3-d": torch.randn(2, 6, 6),
        "channels": torch.randn(1, 3, 6, 6),
        "too small": torch.randn(1, 2, 2, 2),
    }.get(case, torch.randn(1, 2, 6, 6))
    if case == "linear weight":
        sw = SparseWeight.from_dense(torch.randn(4, 8), sparsity=0.5)
    with pytest.raises(err, match=msg):
        sparse_conv2d(x, sw)


@pytest.mark.parametrize(
    "case,err,msg",
    [
        ("policy", ValueError, "policy must be one of"),
        ("bias shape", ValueError, r"bias must be a floating-point tensor of shape \(4,\)"),
        ("bias type", TypeError, "bias must be a torch.Tensor or None"),
        ("sw", TypeError, "sw must be a hotops.sparse.SparseWeight"),
        ("activation", ValueError, "activation must be None"),
    ],
)
def test_module_constructors_refuse_by_name(case, err, msg):
    sw = SparseWeight.from_dense(torch.randn(4, 8), sparsity=0.5)
    kw = dict(policy="auto", bias=None, activation=None)
    if case == "policy":
        kw["policy"] = "fast"
    elif case == "bias shape":
        kw["bias"] = torch.randn(5)
    elif case == "bias type":
        kw["bias"] = [0.0] * 4
    elif case == "sw":
        sw = torch.randn(4, 8)
    else:
        kw["activation"] = "tanh"
    with pytest.raises(err, match=msg):
        SparseLinear(sw, **kw)


@pytest.mark.parametrize("value", [0.5, np.float32(0.5), np.float64(0.5), torch.tensor(0.5)])
def test_sparsity_and_groups_accept_numbers(value):
    w = torch.randn(8, 2, 3, 3)
    ref = SparseWeight.from_dense(w, sparsity=0.5, groups=2)
    sw = SparseWeight.from_dense(w, sparsity=value, groups=np.int64(2))
    assert torch.equal(sw.colidx, ref.colidx) and sw.groups == 2 and type(sw.groups) is int


@pytest.mark.parametrize(
    "value,err",
    [("0.5", TypeError), (1.0, ValueError), (-0.1, ValueError), (float("nan"), ValueError), (None, None)],
)
def test_sparsity_refused_by_name(value, err):
    if err is None:  # None: keep w's own non-zeros
        assert SparseWeight.from_dense(torch.randn(4, 4), sparsity=value).nnz == 16
        return
    with pytest.raises(err, match="sparsity"):
        SparseWeight.from_dense(torch.randn(4, 4), sparsity=value)


def test_corrupt_structure_is_caught_by_the_kernel():
    sw = SparseWeight.from_dense(torch.randn(4, 6), sparsity=0.5)
    bad_col = sw.colidx.clone()
    bad_col[0] = 6
    with pytest.raises(ValueError, match="column index out of range"):
        op.sparse_linear_op(
            torch.randn(2, 6),
            sw.values,
            sw.rowptr,
            bad_col,
            sw.t_rowptr,
            sw.t_colidx,
            sw.t_perm,
            None,
            6,
            None,
        )
    bad_ptr = sw.rowptr.clone()
    bad_ptr[2] = bad_ptr[3] + 1
    with pytest.raises(ValueError, match="rowptr"):
        op.sparse_linear_op(
            torch.randn(2, 6),
            sw.values,
            bad_ptr,
            sw.colidx,
            sw.t_rowptr,
            sw.t_colidx,
            sw.t_perm,
            None,
            6,
            None,
        )
    dw = SparseWeight.from_dense(torch.randn(4, 1, 3, 3), sparsity=0.5, groups=4)

    def depthwise(colidx, activation=None):
        return op.sparse_conv2d_op(
            torch.randn(1, 4, 5, 5),
            dw.values,
            dw.rowptr,
            colidx,
            dw.t_rowptr,
            dw.t_colidx,
            dw.t_perm,
            None,
            list(dw.shape),
            [1, 1],
            [1, 1],
            [1, 1],
            4,
            activation,
        )

    bad_col = dw.colidx.clone()
    bad_col[-1] = 9
    with pytest.raises(ValueError, match="column index out of range"):  # the depthwise kernel checks too
        depthwise(bad_col)
    with pytest.raises(ValueError, match="activation must be"):
        depthwise(dw.colidx, "gelu")


@pytest.mark.parametrize("B", [1, 3, 70])
@pytest.mark.parametrize("bad", [-1, 1100, 2**31 - 1])
def test_corrupt_index_anywhere_is_caught(isa, B, bad):
    """A column index out of range in any panel and any row (the batch-1 product checks its rows
    in chunks, just before it reads them) is refused before it is read, forward and input grad;
    so is a t_perm entry out of range (the input gradient reads W's values through it)."""
    from hotops.sparse.format import PANEL_COLS, csr_rows

    I = 2 * PANEL_COLS + 76  # three column panels
    sw = SparseWeight.from_dense(torch.randn(150, I), sparsity=0.9)
    rows = csr_rows(sw.rowptr, 150)

    def grad_input(t_colidx, t_perm):
        structure = (sw.values, sw.rowptr, sw.colidx, sw.t_rowptr, t_colidx, t_perm)
        return op.sparse_linear_backward(torch.randn(B, 150), torch.randn(B, I), *structure, I, True, False)

    for where in (0, int(torch.nonzero(rows == 130)[-1]), sw.colidx.numel() - 1):
        col = sw.colidx.clone()
        col[where] = bad
        args = (sw.values, sw.rowptr, col, sw.t_rowptr, sw.t_colidx, sw.t_perm, None, I, None)
        with pytest.raises(ValueError, match="column index out of range"):
            op.sparse_linear_op(torch.randn(B, I), *args)
        t_col, t_perm = sw.t_colidx.clone(), sw.t_perm.clone()
        t_col[where] = 150 if bad == 1100 else bad
        with pytest.raises(ValueError, match="column index out of range"):
            grad_input(t_col, sw.t_perm)
        t_perm[where] = sw.nnz if bad > 0 else bad
        with pytest.raises(ValueError, match="t_perm holds an index outside"):
            grad_input(sw.t_colidx, t_perm)
