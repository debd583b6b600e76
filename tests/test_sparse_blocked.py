"""hotops.sparse, the output-channel-blocked format: block pruning, the packer's choice, the
blocked forward kernel vs the dense masked reference, gradients, ops, modules, bad input."""

import pytest
import torch
import torch.nn.functional as F
from _sparse_ref import check_close, reference_pair
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
    sparsify,
)
from hotops.sparse.format import BLOCK_FILL_MIN, PANEL_COLS, block_mask
from hotops.sparse.spec import ConvGeometry


def _close(y, fn, x, sw, *args, **kw):
    """y against the reference in float64 and in x's precision (the tolerance idiom)."""
    r64, r = reference_pair(fn, x, sw, *args, **kw)
    assert y.dtype == x.dtype
    check_close(y, r64, r, rtol=1e-6)  # long float32 sums: the order differs


def _masks(w: torch.Tensor, block: int, groups: int = 1):
    """Block-pruned, unstructured, and block-pruned with whole blocks and a row emptied."""
    pruned = block_mask(w, 0.6, block, groups)
    holes = pruned.clone()
    holes[: min(block, w.shape[0])] = False  # the first block empty
    holes[-1] = False  # a row with no non-zero in the last block
    return {"block-pruned": pruned, "unstructured": torch.rand(w.shape) < 0.3, "empty blocks": holes}


# ------------------------------------------------------------------ format


def test_block_mask_keeps_whole_blocks():
    w = torch.randn(2 * 7, 10, 3, 3)  # 2 groups of 7 rows: blocks of 4 and a last block of 3
    m = block_mask(w, 0.75, 4, groups=2).reshape(2, 7, -1)
    for grp in range(2):
        for r0, r1 in ((0, 4), (4, 7)):
            blk = m[grp, r0:r1]
            assert (blk == blk[0]).all()  # every row of a block keeps the same columns
    assert abs(m.float().mean().item() - 0.25) < 0.05
    # the blocks kept are the largest by L2 norm
    w2 = torch.zeros(8, 4)
    w2[4:8, 1] = 1.0
    w2[0, 2] = 1.5  # one large entry, but its block's norm (1.5) is below 2
    m2 = block_mask(w2, 0.875, 4, 1)
    assert m2[4:8, 1].all() and m2.sum() == 4


def test_packer_chooses_the_layout():
    w = torch.randn(64, 96)
    blocked = SparseWeight.from_dense(w, sparsity=0.9, block=4)
    assert blocked.layout == "blocked 4x1" and blocked.block_fill == 1.0
    assert SparseWeight.from_dense(w, sparsity=0.9, block=8).layout == "blocked 8x1"
    unstructured = SparseWeight.from_dense(w, sparsity=0.9)
    assert unstructured.layout == "csr"  # fill ~0.3 < BLOCK_FILL_MIN: the CSR kernel is faster
    forced = SparseWeight.from_dense(w, sparsity=0.9, layout="blocked")
    assert forced.layout == "blocked 4x1" and forced.block_fill < BLOCK_FILL_MIN
    assert SparseWeight.from_dense(w, sparsity=0.9, block=4, layout="csr").layout == "csr"
    # a block-structured mask given as a mask is found blocked too
    assert SparseWeight.from_dense(w, mask=blocked.mask()).layout == "blocked 4x1"
    # the blocked form is the same weight: values gathered, padding zeros
    torch.testing.assert_close(blocked.to_dense(), w * blocked.mask())
    bv = forced.block_values()
    assert bv.numel() == forced.b_colidx.numel() * 4 and (bv != 0).sum() == forced.nnz


def test_block_values_follow_in_place_updates():
    sw = SparseWeight.from_dense(torch.randn(16, 20), sparsity=0.5, block=4)
    x = torch.randn(3, 20)
    before = sparse_linear(x, sw)
    with torch.no_grad():
        sw.values.mul_(2)
    torch.testing.assert_close(sparse_linear(x, sw), 2 * before)


# ------------------------------------------------------------------ forward vs reference


@pytest.mark.parametrize("B", [0, 1, 3, 17, 64, 100])
@pytest.mark.parametrize("block", [4, 8])
def test_linear_matches_reference(isa, B, block):
    for O, I in ((37, 53), (13, 2 * PANEL_COLS + 9)):  # O not a multiple of the block; column panels
        w = torch.randn(O, I)
        for name, mask in _masks(w, block).items():
            sw = SparseWeight.from_dense(w, mask=mask, block=block, layout="blocked")
            assert sw.block == block, name
            x, b = torch.randn(B, I), torch.randn(O)
            for bias, act in ((None, None), (b, "relu"), (b, "relu6")):
                _close(
                    sparse_linear(x, sw, bias, act), reference.sparse_linear, x, sw, bias=bias, activation=act
                )


CONVS = {  # name: (N, C, H, W, O, kh, kw, stride, padding, dilation, groups)
    "1x1": (2, 16, 7, 9, 13, 1, 1, 1, 0, 1, 1),
    "3x3 shifted": (2, 8, 9, 10, 12, 3, 3, 1, 1, 1, 1),
    "3x3 strided": (1, 8, 11, 9, 10, 3, 3, 2, 1, 1, 1),
    "3x3 grouped": (2, 12, 8, 8, 18, 3, 3, 1, 1, 1, 3),
    "3x3 dilated": (1, 6, 12, 11, 9, 3, 3, 1, 2, 2, 1),
    "1x7": (1, 5, 6, 14, 8, 1, 7, 1, (0, 3), 1, 1),
    "5x5 strided grouped": (2, 8, 13, 13, 12, 5, 5, 2, 2, 1, 2),
    "depthwise": (1, 8, 9, 9, 8, 3, 3, 1, 1, 1, 8),
}


@pytest.mark.parametrize("name", list(CONVS))
def test_conv_matches_reference(isa, name):
    N, C, H, Wd, O, kh, kw, s, p, d, g = CONVS[name]
    w = torch.randn(O, C // g, kh, kw)
    x, b = torch.randn(N, C, H, Wd), torch.randn(O)
    for block in (4, 8):
        for mask in _masks(w, block, g).values():
            sw = SparseWeight.from_dense(w, mask=mask, groups=g, block=block, layout="blocked")
            for bias, act in ((None, None), (b, "relu6")):
                y = sparse_conv2d(x, sw, bias, s, p, d, activation=act)
                _close(y, reference.sparse_conv2d, x, sw, s, p, d, g, bias=bias, activation=act)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_activations(isa, dtype):
    sw = SparseWeight.from_dense(torch.randn(24, 40), sparsity=0.7, block=4)
    assert sw.layout == "blocked 4x1"
    for B in (1, 33):
        x, b = torch.randn(B, 40).to(dtype), torch.randn(24).to(dtype)
        _close(sparse_linear(x, sw, b, "relu"), reference.sparse_linear, x, sw, bias=b, activation="relu")
    swc = SparseWeight.from_dense(torch.randn(8, 4, 3, 3), sparsity=0.5, block=4)
    x = torch.randn(1, 4, 6, 6).to(dtype)
    _close(sparse_conv2d(x, swc, padding=1), reference.sparse_conv2d, x, swc, 1, 1)


def test_nan_propagates_and_fully_pruned_gives_bias():
    sw = SparseWeight.from_dense(torch.randn(8, 12), sparsity=0.5, block=4)
    x = torch.randn(2, 12)
    x[0, sw.colidx[0]] = float("nan")
    y = sparse_linear(x, sw)
    assert torch.isnan(y[0]).any() and not torch.isnan(y[1]).any()
    empty = SparseWeight.from_dense(
        torch.randn(8, 12), mask=torch.zeros(8, 12, dtype=torch.bool), layout="blocked"
    )
    b = torch.randn(8)
    torch.testing.assert_close(sparse_linear(x, empty, b), b.expand(2, 8))


@settings(max_examples=25, deadline=None)
@given(
    O=st.integers(1, 19),
    I=st.integers(1, 40),
    B=st.integers(1, 70),
    block=st.sampled_from([4, 8]),
    sparsity=st.floats(0.0, 0.95),
    seed=st.integers(0, 2**16),
)
def test_linear_property(O, I, B, block, sparsity, seed):
    g = torch.Generator().manual_seed(seed)
    w, x = torch.randn(O, I, generator=g), torch.randn(B, I, generator=g)
    sw = SparseWeight.from_dense(w, sparsity=sparsity, block=block, layout="blocked")
    _close(sparse_linear(x, sw), reference.sparse_linear, x, sw)


# ------------------------------------------------------------------ gradients, ops, compile


def test_gradients_match_dense_masked_reference():
    """Training under the mask: the forward runs blocked, the gradients on the CSR."""
    for kind in ("linear", "conv"):
        if kind == "linear":
            w, x = torch.randn(20, 30), torch.randn(7, 30)
            run = lambda xx, sw, b: sparse_linear(xx, sw, b, "relu")  # noqa: E731
            dense = lambda xx, wd, b: F.relu(F.linear(xx, wd, b))  # noqa: E731
        else:
            w, x = torch.randn(12, 6, 3, 3), torch.randn(2, 6, 8, 8)
            run = lambda xx, sw, b: sparse_conv2d(xx, sw, b, padding=1, activation="relu6")  # noqa: E731
            dense = lambda xx, wd, b: F.relu6(F.conv2d(xx, wd, b, padding=1))  # noqa: E731
        sw = SparseWeight.from_dense(w, sparsity=0.5, block=4)
        assert sw.block == 4
        v = sw.values.clone().requires_grad_()
        b = torch.randn(w.shape[0], requires_grad=True)
        xg = x.clone().requires_grad_()
        y = run(xg, sw.with_values(v), b)
        gy = torch.randn_like(y)
        got = torch.autograd.grad(y, (xg, v, b), gy)
        mask = sw.mask()
        wd = (w * mask).requires_grad_()
        xr = x.clone().requires_grad_()
        want = torch.autograd.grad(dense(xr, wd, b), (xr, wd, b), gy)
        torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(sw.with_values(got[1]).to_dense(), want[1] * mask, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got[2], want[2], rtol=1e-4, atol=1e-4)


def test_opcheck():
    sw = SparseWeight.from_dense(torch.randn(9, 13), sparsity=0.5, block=4)
    for grad in (False, True):
        x = torch.randn(5, 13, requires_grad=grad)
        v = sw.values.clone().requires_grad_(grad)
        torch.library.opcheck(
            op.sparse_linear_op,
            (
                x,
                v,
                sw.rowptr,
                sw.colidx,
                sw.t_rowptr,
                sw.t_colidx,
                sw.t_perm,
                torch.randn(9),
                13,
                "relu",
                *sw.blocked,
            ),
        )
    swc = SparseWeight.from_dense(torch.randn(12, 4, 3, 3), sparsity=0.5, block=4)
    for grad in (False, True):
        x = torch.randn(2, 4, 7, 7, requires_grad=grad)
        v = swc.values.clone().requires_grad_(grad)
        torch.library.opcheck(
            op.sparse_conv2d_op,
            (
                x,
                v,
                swc.rowptr,
                swc.colidx,
                swc.t_rowptr,
                swc.t_colidx,
                swc.t_perm,
                None,
                [12, 4, 3, 3],
                [1, 1],
                [1, 1],
                [1, 1],
                1,
                "relu6",
                *swc.blocked,
            ),
        )


def test_compile_with_backward():
    sw = SparseWeight.from_dense(torch.randn(12, 6, 3, 3), sparsity=0.5, block=4)
    v = sw.values.clone().requires_grad_()
    x = torch.randn(2, 6, 8, 8, requires_grad=True)

    def f(x, v):
        return sparse_conv2d(x, sw.with_values(v), padding=1, activation="relu").square().sum()

    got = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(x, v), (x, v))
    want = torch.autograd.grad(f(x, v), (x, v))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    swl = SparseWeight.from_dense(torch.randn(16, 13), sparsity=0.5, block=8)
    fl = torch.compile(lambda x: sparse_linear(x, swl, None, "relu") * 2, fullgraph=True, backend="aot_eager")
    xl = torch.randn(4, 13)
    torch.testing.assert_close(fl(xl), reference.sparse_linear(xl, swl, None, "relu") * 2)


# ------------------------------------------------------------------ modules, sparsify


def test_modules_run_blocked():
    lin = nn.Linear(40, 24)
    layer = SparseLinear.from_dense(lin, sparsity=0.8, block=4, policy="sparse")
    assert layer.layout == "blocked 4x1" and "blocked 4x1" in repr(layer)
    x = torch.randn(6, 40)
    with torch.no_grad():
        for _ in range(2):  # the first call binds the prepared call, the second runs it
            torch.testing.assert_close(layer(x), F.linear(x, layer.to_dense(), layer.bias))
        layer.values.mul_(0.5)  # an in-place update rebinds (and regathers the blocked values)
        torch.testing.assert_close(layer(x), F.linear(x, layer.to_dense(), layer.bias))
    conv = SparseConv2d.from_dense(
        nn.Conv2d(8, 16, 3, padding=1), sparsity=0.8, block=8, activation="relu", policy="sparse"
    )
    assert conv.layout == "blocked 8x1"
    xc = torch.randn(1, 8, 9, 9)
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(
                conv(xc), F.relu(F.conv2d(xc, conv.to_dense(), conv.bias, padding=1)), rtol=1e-4, atol=1e-5
            )
    # training through the module: the values' gradient is the masked dense one
    conv.zero_grad()
    conv(xc).sum().backward()
    wd = conv.to_dense().detach().requires_grad_()
    F.relu(F.conv2d(xc, wd, conv.bias, padding=1)).sum().backward()
    torch.testing.assert_close(
        SparseWeight.from_dense(wd.grad * conv.mask(), mask=conv.mask()).to_dense(),
        conv.sparse_weight.with_values(conv.values.grad).to_dense(),
        rtol=1e-4,
        atol=1e-4,
    )
    # state_dict round trip keeps the blocked form
    twin = SparseConv2d.from_dense(nn.Conv2d(8, 16, 3, padding=1), sparsity=0.8, block=8, activation="relu")
    twin.load_state_dict(conv.state_dict())
    torch.testing.assert_close(twin.sparse_weight.block_values(), conv.sparse_weight.block_values())


def test_sparsify_block():
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=2),
        nn.Flatten(),
        nn.Linear(16 * 25, 12),
    )
    sparse = sparsify(model, sparsity=0.75, block=4)
    layers = [m for m in sparse.modules() if isinstance(m, (SparseConv2d, SparseLinear))]
    assert [m.layout for m in layers] == ["blocked 4x1"] * 3
    for m in layers:
        rows = m.mask().reshape(m.groups, -1, m.mask()[0].numel())
        for grp in rows:  # whole 4 x 1 blocks
            assert (grp.view(-1, 4, grp.shape[-1]) == grp.view(-1, 4, grp.shape[-1])[:, :1]).all()
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        h = F.relu(F.conv2d(x, layers[0].to_dense(), model[0].bias, padding=1))
        h = F.conv2d(h, layers[1].to_dense(), model[2].bias, padding=1, groups=2)
        torch.testing.assert_close(
            sparse(x), F.linear(h.flatten(1), layers[2].to_dense(), model[4].bias), rtol=1e-4, atol=1e-4
        )


# ------------------------------------------------------------------ bad input


def test_bad_inputs():
    w = torch.randn(8, 6)
    with pytest.raises(ValueError, match="block must be"):
        SparseWeight.from_dense(w, sparsity=0.5, block=3)
    with pytest.raises(ValueError, match="layout must be"):
        SparseWeight.from_dense(w, sparsity=0.5, layout="bsr")
    with pytest.raises(ValueError, match="block must be"):
        SparseWeight.from_dense(w, sparsity=0.5).with_block(2)
    with pytest.raises(ValueError, match="block must be"):
        sparsify(
            nn.Sequential(nn.Linear(6, 8)),
            sparsity=0.5,
            block=4,
            method="learned",
            data=[],
            loss_fn=F.mse_loss,
        )
    with pytest.raises(ValueError, match="sparsity"):
        SparseWeight.from_dense(w, sparsity=1.0, block=4)
    sw = SparseWeight.from_dense(w, sparsity=0.5, block=4)
    x = torch.randn(3, 6)
    ext = _backend.ext()
    args = lambda **kw: dict(dict(zip(("block", "b_rowptr", "b_colidx", "b_values"), sw.blocked)), **kw)  # noqa: E731

    def call(**kw):
        a = args(**kw)
        y = torch.empty(1, 8, 3)
        ext.sparse_conv_fwd(
            ConvGeometry.linear(3, 6, 8),
            sw.rowptr,
            sw.colidx,
            sw.values,
            sw.t_rowptr,
            x.t().contiguous().unsqueeze(0),
            None,
            y,
            None,
            1,
            a["block"],
            a["b_rowptr"],
            a["b_colidx"],
            a["b_values"],
        )

    call()  # the well-formed call runs
    bad_col = sw.b_colidx.clone()
    bad_col[0] = 99
    with pytest.raises(ValueError, match="column index out of range"):
        call(b_colidx=bad_col)
    with pytest.raises(ValueError, match="blocked rowptr has"):
        call(b_rowptr=sw.b_rowptr[:-1].contiguous())
    with pytest.raises(ValueError, match="blocked values has"):
        call(b_values=sw.block_values()[:-1].contiguous())
    with pytest.raises(ValueError, match="block must be 4 or 8"):
        call(block=5)
    with pytest.raises(ValueError, match="blocked rowptr must run"):
        rp = sw.b_rowptr.clone()
        rp[-1] += 1
        call(b_rowptr=rp)


def test_block_values_buffer_survives_inference_mode():
    """The blocked values' buffer made under inference_mode is refilled later in training."""
    sw = SparseWeight.from_dense(torch.randn(8, 12), sparsity=0.5, block=4)
    x = torch.randn(3, 12)
    with torch.inference_mode():
        sparse_linear(x, sw)
    v = sw.values.clone().requires_grad_()
    trained = sw.with_values(v)
    with torch.no_grad():
        sw.values.add_(1.0)
    torch.testing.assert_close(sparse_linear(x, sw), reference.sparse_linear(x, sw))
    sparse_linear(x, trained).sum().backward()
    assert v.grad is not None
