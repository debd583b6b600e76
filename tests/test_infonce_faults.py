"""Fault suite of the infonce family (issue 12): what a hostile user tries -- wrong scalars, dtypes,
ranks and strides, NaN/Inf, empty and huge inputs, corrupt checkpoints, threads, parameter
mutation, second-order gradients -- each either matches the plain-torch reference or raises an
error that names the argument. docs/reliability.md says which test checks which promise."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _faults import (
    FAST,
    VALUES,
    close_where_finite,
    in_layout,
    make_values,
    run_threads,
    same_finite,
    same_nonfinite,
)
from conftest import require_triton_runs
from hypothesis import given
from hypothesis import strategies as st

import hotops
from hotops import _backend
from hotops.infonce import InfoNCELoss
from hotops.infonce import op as nce_op
from hotops.infonce import reference as nce_ref

# ====================================================================== infonce


def _row_pass(kind):
    if kind == "triton":
        require_triton_runs()
        return (_backend.Backend("triton", lambda dev: None, nce_op._triton_info_nce),)
    return nce_op.INFO_NCE_BACKENDS


@pytest.mark.parametrize("kind", ["cpu", "triton"])
@pytest.mark.parametrize("w", [1e5, 3.3e6, 3.3e7, 1e30])
def test_infonce_large_weight_on_positive_column_is_exact(monkeypatch, isa, kind, w):
    """Defect 5: w on a column that is also a row's positive. The row pass once added w e and
    then (1 - w) e: 3e-3 off at 1e5, -inf loss from 3.3e7 on."""
    if kind == "triton" and isa != "avx512":
        pytest.skip("the Triton row pass does not depend on the C++ ISA")
    monkeypatch.setattr(nce_op, "INFO_NCE_BACKENDS", _row_pass(kind))
    q, d = torch.randn(8, 16), torch.randn(8, 16)
    nw = torch.full((8,), w)
    out = hotops.info_nce(q, d, neg_weight=nw, temperature=0.5, reduction="none")
    ref = nce_ref.info_nce(q.double(), d.double(), neg_weight=nw.double(), temperature=0.5, reduction="none")
    assert torch.isfinite(out).all()
    assert (out.double() - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("kind", ["cpu", "triton"])
def test_infonce_nan_weight_propagates_in_the_kernels(monkeypatch, kind):
    """Defect 5, NaN weights: the public function refuses them (below); the row pass itself (what
    torch.compile reaches, where the check cannot look at values) gives NaN in every row that
    sees the weight, as the reference does."""
    monkeypatch.setattr(nce_op, "INFO_NCE_BACKENDS", _row_pass(kind))
    q, d = torch.randn(6, 8), torch.randn(6, 8)
    nw = torch.ones(6)
    nw[2] = math.nan
    out = nce_op.info_nce(q, d, None, None, nw, torch.tensor(0.5), 0, 0.0, "none", False)[0]
    ref = nce_ref.info_nce(q, d, neg_weight=nw, temperature=0.5, reduction="none")
    same_nonfinite(out, ref, "loss")
    assert out.isnan().sum() == 5 and not out[2].isnan()  # row 2's positive has weight 1 whatever


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0, 1e31])  # 1e31: C of them overflow the sum
def test_infonce_refuses_nan_inf_negative_weights(bad):
    nw = torch.ones(6)
    nw[4] = bad
    with pytest.raises(ValueError, match="neg_weight must hold finite non-negative weights"):
        hotops.info_nce(torch.randn(6, 4), torch.randn(6, 4), neg_weight=nw)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("hard", [None, "pool", "own"])
def test_infonce_create_graph_first_gradient_then_clear_error(reduction, hard):
    """Defect 6: under create_graph=True the first gradient is right and carries a graph; using it
    (a gradient penalty) raises instead of silently adding 0."""
    q, d = torch.randn(5, 6, requires_grad=True), torch.randn(5, 6, requires_grad=True)
    h = {"pool": torch.randn(3, 6), "own": torch.randn(5, 2, 6), None: None}[hard]
    t = torch.tensor(0.3, requires_grad=True)
    plain = torch.autograd.grad(hotops.info_nce(q, d, h, temperature=t, reduction=reduction).sum(), [q, d, t])
    loss = hotops.info_nce(q, d, h, temperature=t, reduction=reduction).sum()
    g = torch.autograd.grad(loss, [q, d, t], create_graph=True)
    for a, b in zip(g, plain):
        torch.testing.assert_close(a, b)
    assert g[0].requires_grad
    with pytest.raises(RuntimeError, match="info_nce has no second derivative"):
        g[0].pow(2).sum().backward()


def test_infonce_module_create_graph_raises_clearly():
    loss_fn = InfoNCELoss(learnable_temperature=True)
    q = torch.randn(4, 8, requires_grad=True)
    (g,) = torch.autograd.grad(loss_fn(q, torch.randn(4, 8)), q, create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        g.norm().backward()


# --- argument validation: every public entry names the argument and what it expected

_q, _d = torch.randn(4, 8), torch.randn(4, 8)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: hotops.info_nce(_q, _d, temperature=math.inf), ValueError, "temperature must be finite"),
        (lambda: hotops.info_nce(_q, _d, temperature=math.nan), ValueError, "temperature must be finite"),
        (lambda: hotops.info_nce(_q, _d, temperature="0.1"), TypeError, "temperature must be a number"),
        (lambda: hotops.info_nce(_q, _d, temperature=None), TypeError, "temperature must be a number"),
        (
            lambda: hotops.info_nce(_q, _d, temperature=torch.tensor(math.inf)),
            ValueError,
            "positive and finite",
        ),
        (lambda: hotops.info_nce(_q, _d, temperature=torch.tensor(1)), TypeError, "floating point"),
        (lambda: hotops.info_nce(_q, _d, pos_offset=1.5), ValueError, "pos_offset must be an integer"),
        (lambda: hotops.info_nce(_q, _d, pos_offset="0"), TypeError, "pos_offset must be a number"),
        (lambda: hotops.info_nce(_q, _d, pos_offset=-1), ValueError, "pos_offset must be >= 0"),
        (
            lambda: hotops.info_nce(_q, _d, label_smoothing="0.1"),
            TypeError,
            "label_smoothing must be a number",
        ),
        (
            lambda: hotops.info_nce(_q, _d, label_smoothing=math.nan),
            ValueError,
            "label_smoothing must be finite",
        ),
        (lambda: hotops.info_nce(_q, _d, reduction=None), ValueError, "reduction must be one of"),
        (
            lambda: hotops.info_nce(_q, _d, neg_weight=torch.ones(4, dtype=torch.int64)),
            TypeError,
            "neg_weight has dtype",
        ),
        (
            lambda: hotops.info_nce(_q, _d, neg_weight=torch.ones(2, 2)),
            ValueError,
            "neg_weight must have 1 dim",
        ),
        (
            lambda: hotops.info_nce(_q.to(torch.float64), _d.to(torch.float64)),
            TypeError,
            "q has dtype float64",
        ),
        (lambda: InfoNCELoss(temperature="a"), TypeError, "temperature must be a number"),
        (lambda: InfoNCELoss(temperature=0.0), ValueError, "temperature must be > 0"),
        (lambda: InfoNCELoss(min_temperature=0.0), ValueError, "min_temperature must be > 0"),
        (lambda: InfoNCELoss(label_smoothing=2), ValueError, "label_smoothing must be >= 0.0 and <= 1.0"),
        (lambda: InfoNCELoss(learnable_temperature="yes"), TypeError, "learnable_temperature must be a bool"),
        (lambda: InfoNCELoss(reduction="avg"), ValueError, "reduction must be one of"),
    ],
)
def test_infonce_bad_arguments(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("value", [np.float32(0.1), np.float64(0.1), torch.tensor(0.1), 1])
def test_infonce_numbers_of_every_kind(value):
    """NumPy scalars and 0-d tensors are numbers (temperature, label_smoothing, pos_offset)."""
    ref = hotops.info_nce(_q, _d, temperature=1.0 if isinstance(value, int) else 0.1)
    torch.testing.assert_close(hotops.info_nce(_q, _d, temperature=value), ref)
    hotops.info_nce(_q, _d, label_smoothing=np.float32(0.1), pos_offset=np.int64(0))
    hotops.info_nce(_q, _d, pos_offset=torch.tensor(0))


# --- property test against the reference: dtypes, shapes, strides, value ranges


@FAST
@given(
    B=st.integers(1, 6),
    extra=st.integers(0, 3),
    D=st.integers(1, 9),
    hard=st.sampled_from([None, "pool", "own"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    values=VALUES,
    layout=st.sampled_from(["contiguous", "transposed", "offset", "expanded"]),
    weighted=st.booleans(),
    eps=st.sampled_from([0.0, 0.1]),
    t=st.sampled_from([0.05, 1.0]),
    target=st.sampled_from(["q", "d"]),
    seed=st.integers(0, 2**16),
)
def test_infonce_property_matches_reference(
    B, extra, D, hard, dtype, values, layout, weighted, eps, t, target, seed
):
    gen = torch.Generator().manual_seed(seed)
    q = make_values(values if target == "q" else "normal", B, D, dtype=dtype, gen=gen)
    d = make_values(values if target == "d" else "normal", B + extra, D, dtype=dtype, gen=gen)
    if layout == "expanded":  # every candidate the same row, broadcast (stride 0)
        d = d[:1].expand(B + extra, D)
    else:
        q, d = in_layout(q, layout), in_layout(d, layout)
    h = None
    if hard == "pool":
        h = make_values("normal", 3, D, dtype=dtype, gen=gen)
    elif hard == "own":
        h = make_values("normal", B, 2, D, dtype=dtype, gen=gen)
    C = B + extra + (3 if hard == "pool" else 2 if hard == "own" else 0)
    nw = (
        (torch.rand(C, generator=gen) * 2).where(torch.rand(C, generator=gen) > 0.3, torch.zeros(()))
        if weighted
        else None
    )
    kw = dict(temperature=t, label_smoothing=eps, neg_weight=nw, reduction="none")
    out = hotops.info_nce(q, d, h, **kw)
    ref64 = nce_ref.info_nce(q.double(), d.double(), None if h is None else h.double(), **kw)
    ref_lp = nce_ref.info_nce(q, d, h, **kw)
    # the kernel scales the logits by 1/t in float32, the reference divides them in the inputs'
    # dtype: a rounding of the largest logit apart
    z = nce_ref.logits(q.double(), d.double(), None if h is None else h.double(), t).nan_to_num(0, 0, 0)
    atol = 1e-4 + 4 * torch.finfo(dtype).eps * (z.abs().max().item() if z.numel() else 0.0)
    close_where_finite(out, ref64, ref_lp, atol=atol, what="loss")
    if values == "nan" and (target == "q" or layout != "expanded"):
        assert out.isnan().any()


@pytest.mark.parametrize("weighted", [False, True])
def test_infonce_inf_logits_follow_the_reference(isa, weighted):
    """A +inf logit in a row makes its loss non-finite (NaN, as F.cross_entropy's log_softmax
    gives; the weighted reference's logsumexp says +inf), never a finite number; -inf logits
    without label smoothing leave the loss finite (they once met 0 * -inf). C++ on every ISA."""
    q, d = torch.randn(4, 3), torch.randn(4, 3)
    q[1, 0] = math.inf
    d[3, 2] = -math.inf
    nw = torch.rand(4) + 0.5 if weighted else None
    for eps in (0.0, 0.2):
        out = hotops.info_nce(q, d, label_smoothing=eps, neg_weight=nw, reduction="none")
        ref = nce_ref.info_nce(q, d, label_smoothing=eps, neg_weight=nw, reduction="none")
        same_finite(out, ref, f"eps={eps}")
        torch.testing.assert_close(out[ref.isfinite()], ref[ref.isfinite()])
    q[1, 0] = 1.0
    d[3, 2] = -math.inf
    q[:, 2] = torch.tensor([1.0, 2.0, 3.0, 4.0])  # every row's logit of column 3 is -inf
    out = hotops.info_nce(q, d, neg_weight=nw, reduction="none")
    assert torch.isfinite(out[:3]).all()  # row 3's positive is the -inf column: +inf
    torch.testing.assert_close(out, nce_ref.info_nce(q, d, neg_weight=nw, reduction="none"))


# --- concurrency and parameter mutation


def test_infonce_threads_share_a_module_while_one_trains():
    loss_fn = InfoNCELoss(learnable_temperature=True)
    q, d, h = torch.randn(64, 32), torch.randn(64, 32), torch.randn(16, 32)
    with torch.no_grad():
        expect = nce_ref.info_nce(q, d, h, temperature=loss_fn.temperature)

    def work(i):
        out = []
        for _ in range(10):
            if i == 0:  # trains: gradients only, parameters untouched, so the others stay exact
                qq = q.clone().requires_grad_()
                loss_fn(qq, d, h).backward()
                assert torch.isfinite(qq.grad).all()
            else:
                with torch.no_grad():
                    out.append(loss_fn(q, d, h))
        return out

    for outs in run_threads(work)[1:]:
        for o in outs:
            torch.testing.assert_close(o, expect.float(), rtol=1e-5, atol=1e-5)


def test_infonce_module_parameter_mutation():
    loss_fn = InfoNCELoss(temperature=0.1, learnable_temperature=True)
    q, d = torch.randn(6, 8), torch.randn(6, 8)

    def check():
        t = loss_fn.temperature.detach().float()
        torch.testing.assert_close(loss_fn(q, d), nce_ref.info_nce(q, d, temperature=t), rtol=1e-5, atol=1e-5)

    check()
    loss_fn.log_temperature.data = torch.tensor(math.log(0.2))  # .data swap
    check()
    with torch.no_grad():
        loss_fn.log_temperature.mul_(1.1)  # in place
    check()
    loss_fn.log_temperature.data.copy_(torch.tensor(math.log(0.3)))  # copy_ through .data
    check()
    sd = {"log_temperature": torch.tensor(math.log(0.5))}
    loss_fn.load_state_dict(sd)  # strict
    check()
    loss_fn.load_state_dict({}, strict=False)
    check()
    for conv in (
        lambda m: m.to(torch.float64),
        lambda m: m.half(),
        lambda m: m.bfloat16(),
        lambda m: m.float(),
    ):
        conv(loss_fn)
        check()
    loss_fn.log_temperature.data = torch.tensor(math.nan)
    with pytest.raises(ValueError, match="temperature must be positive and finite"):
        loss_fn(q, d)
    fixed = InfoNCELoss(temperature=0.1)  # a buffer, not a parameter
    fixed.half()
    torch.testing.assert_close(fixed(q, d), nce_ref.info_nce(q, d, temperature=float(fixed.temperature)))


def test_repeated_calls_are_bitwise_identical():
    """Same inputs, same thread count: the same bits, call after call."""
    q, d, h = torch.randn(300, 16), torch.randn(300, 16), torch.randn(7, 16)
    first = hotops.info_nce(q, d, h, reduction="none")
    assert all(torch.equal(hotops.info_nce(q, d, h, reduction="none"), first) for _ in range(3))
