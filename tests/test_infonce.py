import math
import os

import _dist
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import assert_close_to_reference, require_triton_runs
from hypothesis import given, settings
from hypothesis import strategies as st

import hotops
from hotops import _backend
from hotops.infonce import op, reference

LOWP_ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-4}


def make(B, D, hard=None, N=0, K=0, dtype=torch.float32, scale=1.0):
    g = lambda *s: (torch.randn(*s) * scale).to(dtype).requires_grad_()  # noqa: E731
    q, d = g(B, D), g(B, D)
    h = g(N, D) if hard == "pool" else g(B, K, D) if hard == "own" else None
    return q, d, h


def grads(loss, inputs):
    return torch.autograd.grad(loss.sum(), [t for t in inputs if t is not None])


def check_against_reference(q, d, h, atol=None, **kw):
    """hotops vs the float64 reference and the reference in the inputs' dtype: loss and the
    gradients w.r.t. q, d, hard and a tensor temperature."""
    t = kw.get("temperature")
    inputs = [x for x in (q, d, h, t) if isinstance(x, torch.Tensor)]

    def run(fn, leaves):
        it = iter(leaves)
        q_, d_ = next(it), next(it)
        h_ = next(it) if h is not None else None
        kw_ = dict(kw, temperature=next(it)) if isinstance(t, torch.Tensor) else kw
        out = fn(q_, d_, h_, **kw_)
        return out, grads(out, leaves)

    out, g_out = run(hotops.info_nce, inputs)
    ref64, g64 = run(reference.info_nce, [x.detach().double().requires_grad_() for x in inputs])
    ref_lp, g_lp = run(reference.info_nce, inputs)
    atol = atol if atol is not None else LOWP_ATOL[q.dtype]
    assert out.dtype == torch.float32
    assert_close_to_reference(out, ref64, ref_lp, atol=atol, rtol=1e-6, name="loss")
    for i, (a, b, c) in enumerate(zip(g_out, g64, g_lp)):
        assert a.dtype == c.dtype
        assert_close_to_reference(a, b, c, atol=atol, rtol=1e-6, name=f"grad {i}")


@pytest.mark.parametrize("hard", [None, "pool", "own"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_reference(isa, hard, reduction):
    q, d, h = make(19, 24, hard, N=7, K=3)
    check_against_reference(q, d, h, temperature=0.3, reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hard", [None, "pool", "own"])
def test_low_precision(isa, dtype, hard):
    q, d, h = make(33, 40, hard, N=9, K=2, dtype=dtype)
    check_against_reference(q, d, h, temperature=0.5)


@pytest.mark.parametrize("transposed", [True, False])
@pytest.mark.parametrize("panel_bytes", [None, 1])  # one panel; 16-row panels
def test_bf16_gradients_either_way(monkeypatch, transposed, panel_bytes):
    """bf16 gradients computed directly (CPUs with AMX) or transposed (without), whichever this
    CPU picks, on one panel and on many."""
    monkeypatch.setattr(op, "transposed_bf16_grads", lambda: transposed)
    if panel_bytes is not None:
        monkeypatch.setitem(op.PANEL_BYTES, "cpu", panel_bytes)
        monkeypatch.setattr(op, "MIN_PANEL_ROWS", 16)
    for hard in (None, "pool", "own"):
        q, d, h = make(70, 40, hard, N=9, K=2, dtype=torch.bfloat16)
        check_against_reference(q, d, h, temperature=0.5)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_gemms_either_way(monkeypatch, native, dtype):
    """Low-precision panels through torch's GEMM in their dtype (CPUs where torch runs it
    natively) or in float32 (elsewhere), whichever this CPU picks; the gradients come back in
    the inputs' dtypes (checked by check_against_reference), forward-computed (mean) or
    recomputed (none)."""
    monkeypatch.setattr(_backend, "torch_gemm_is_fast", lambda dt: native)
    for hard in (None, "pool", "own"):
        q, d, h = make(37, 24, hard, N=9, K=2, dtype=dtype)
        for reduction in ("mean", "none"):
            check_against_reference(q, d, h, temperature=0.5, reduction=reduction)


@pytest.mark.parametrize("hard", [None, "pool", "own"])
def test_label_smoothing_and_weights(isa, hard):
    q, d, h = make(17, 8, hard, N=5, K=4)
    C = 17 + (5 if hard == "pool" else 4 if hard == "own" else 0)
    w = torch.rand(C) * 2
    w[3] = 0.0  # a zero weight drops that negative (but never the positive of row 3)
    check_against_reference(q, d, h, temperature=0.2, label_smoothing=0.1)
    check_against_reference(q, d, h, temperature=0.2, neg_weight=w)
    check_against_reference(q, d, h, temperature=0.2, neg_weight=w, label_smoothing=0.2, reduction="none")


def test_unweighted_reference_is_cross_entropy():
    q, d, h = make(6, 4, "pool", N=3)
    w = torch.ones(9)
    a = reference.info_nce(q, d, h, temperature=0.7, label_smoothing=0.3, neg_weight=w)
    b = reference.info_nce(q, d, h, temperature=0.7, label_smoothing=0.3)
    torch.testing.assert_close(a, b)


def test_learnable_temperature(isa):
    q, d, h = make(12, 16, "pool", N=4)
    t = torch.tensor(0.1, requires_grad=True)
    check_against_reference(q, d, h, temperature=t)
    check_against_reference(q, d, h, temperature=t, reduction="none")


def test_many_panels(monkeypatch, isa):
    # a tiny panel budget forces the multi-panel path (rows are processed 16 at a time)
    monkeypatch.setitem(op.PANEL_BYTES, "cpu", 1)
    monkeypatch.setattr(op, "MIN_PANEL_ROWS", 16)
    for hard in (None, "pool", "own"):
        q, d, h = make(150, 12, hard, N=30, K=2)
        check_against_reference(q, d, h, temperature=0.25)
    q, d, h = make(150, 12, "pool", N=30, dtype=torch.bfloat16)
    check_against_reference(q, d, h, temperature=0.25)


@pytest.mark.parametrize("B,D", [(1, 1), (1, 5), (2, 1), (17, 3), (64, 31)])
def test_odd_sizes(isa, B, D):
    q, d, h = make(B, D, "pool", N=1)
    check_against_reference(q, d, h, temperature=1.0)


def test_extreme_logits_stay_finite(isa):
    q, d, h = make(8, 16, "pool", N=4, scale=30.0)  # logits of order 1e5 / T
    out = hotops.info_nce(q, d, h, temperature=0.01)
    assert torch.isfinite(out)
    check_against_reference(q, d, h, temperature=0.01, atol=1e-3)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_large_logits_lose_nothing(isa, eps):
    # logits of 2^20 whose differences are 1 (exact in float32): a loss formed as lse - l_pos kept
    # only their rounding (0.375 for 0.3133); from differences to the row's max it is exact
    q = torch.tensor([[2.0**20, 1.0], [2.0**20, -1.0]], requires_grad=True)
    d = torch.tensor([[1.0, 0.0], [1.0, -1.0]])
    t = torch.tensor(1.0, requires_grad=True)
    loss = hotops.info_nce(q, d, temperature=t, label_smoothing=eps)
    exact = F.cross_entropy((q @ d.T).double() / t.double(), torch.arange(2), label_smoothing=eps)
    torch.testing.assert_close(loss.double(), exact, rtol=1e-6, atol=1e-6)
    (dt,) = torch.autograd.grad(loss, t)
    (dt_exact,) = torch.autograd.grad(exact, t)
    torch.testing.assert_close(dt.double(), dt_exact.double(), rtol=1e-5, atol=1e-6)


def test_nan_input_gives_nan_loss(isa):
    q, d, h = make(5, 8, "pool", N=2)
    with torch.no_grad():
        d[2, 3] = float("nan")
    assert torch.isnan(hotops.info_nce(q, d, h))
    assert torch.isnan(hotops.info_nce(q, d, h, reduction="none")).any()


def test_no_grad_forward_matches():
    q, d, h = make(20, 8, "own", K=3)
    with torch.no_grad():
        a = hotops.info_nce(q, d, h, reduction="none")
    b = reference.info_nce(q, d, h, reduction="none")
    torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 40),
    D=st.integers(1, 33),
    N=st.integers(0, 20),
    K=st.integers(1, 5),
    kind=st.sampled_from([None, "pool", "own"]),
    t=st.floats(0.05, 2.0),
    eps=st.sampled_from([0.0, 0.1]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
)
def test_property_random_shapes(B, D, N, K, kind, t, eps, reduction):
    q, d, h = make(B, D, kind if not (kind == "pool" and N == 0) else None, N=N, K=K)
    check_against_reference(q, d, h, temperature=t, label_smoothing=eps, reduction=reduction, atol=1e-4)


# ------------------------------------------------------------------ torch.library integration


def test_opcheck():
    q, d, h = make(9, 8, "pool", N=3)
    t = torch.tensor(0.2, requires_grad=True)
    for args in [
        (q, d, h, None, None, t, 0, 0.0, "mean", True),
        (q, d, None, None, None, t.detach(), 0, 0.1, "none", False),
        (q, d, None, make(9, 8, "own", K=2)[2], torch.rand(11), t, 0, 0.0, "sum", True),
    ]:
        torch.library.opcheck(op.info_nce, args)
    # the backward op is not itself differentiable (no double backward): check it on plain tensors
    plain = [x.detach() for x in (q, d, h, t)]
    torch.library.opcheck(op.info_nce_backward, (*plain[:3], None, None, plain[3], torch.rand(9), 0, 0.1))


def test_torch_compile_fullgraph():
    q, d, h = make(16, 8, "pool", N=4)

    def f(q, d, h):
        return hotops.info_nce(q * 2, d, h, temperature=0.1, label_smoothing=0.05) + q.sum() * 0

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out, ref = compiled(q, d, h), f(q, d, h)
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads(out, [q, d, h]), grads(ref, [q, d, h])):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_torch_compile_inductor():
    q, d, _ = make(16, 8)
    f = torch.compile(lambda q, d: hotops.info_nce(q, d, temperature=0.1), fullgraph=True)
    torch.testing.assert_close(f(q, d), hotops.info_nce(q, d, temperature=0.1))


# ------------------------------------------------------------------ the Triton row pass


def _use_triton_row_pass(monkeypatch):
    require_triton_runs()
    monkeypatch.setattr(
        op, "INFO_NCE_BACKENDS", (_backend.Backend("triton", lambda dev: None, op._triton_info_nce),)
    )
    monkeypatch.setattr(
        op,
        "INFO_NCE_BACKWARD_BACKENDS",
        (_backend.Backend("triton", lambda dev: None, op._triton_info_nce_backward),),
    )


@pytest.mark.parametrize("hard", [None, "pool", "own"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_row_pass_in_interpreter(monkeypatch, hard, dtype):
    _use_triton_row_pass(monkeypatch)
    monkeypatch.setitem(op.PANEL_BYTES, "cpu", 1)  # several panels
    monkeypatch.setattr(op, "MIN_PANEL_ROWS", 16)
    q, d, h = make(70, 12, hard, N=5, K=3, dtype=dtype)
    C = 70 + (5 if hard == "pool" else 3 if hard == "own" else 0)
    w = torch.rand(C)
    check_against_reference(
        q, d, h, temperature=torch.tensor(0.3, requires_grad=True), label_smoothing=0.1, neg_weight=w
    )
    check_against_reference(q, d, h, temperature=0.3, reduction="none")


def _large_logits_case(monkeypatch, backend, eps, weighted):
    """Logits of 2^20 + small even integers (exact in float32, and so is every partial sum of a
    row, whose offsets sum to 0 so that its mean is exact too) picked out of q by one-hot
    candidates. Hard negatives above the in-batch max move the row's max between the two sweeps,
    and (on the Triton row pass) blocks of 16 columns move it between the blocks of one sweep.
    Returns (loss, q, t) from hotops and (exact, logits, t64) in float64 on the same logits."""
    if backend == "triton":
        _use_triton_row_pass(monkeypatch)
        from hotops.infonce import triton as infonce_triton

        monkeypatch.setattr(infonce_triton.row_pass, "__defaults__", (16,))  # block = 16 columns
    B, K = 28, 2
    g = torch.Generator().manual_seed(0)
    offs = 2 * torch.randint(-3, 4, (B, B + K), generator=g).double()
    offs[:, 20:24] += 4  # a later block of the in-batch columns moves the max
    offs[:, B:] += 8  # and the own hard negatives hold each row's max
    offs[:, 1] -= offs.sum(1)  # each row's offsets sum to 0
    assert (offs.sum(1) == 0).all()
    logits = (2.0**20 + offs).requires_grad_()
    # one-hot candidates pick the logits out of q exactly: q @ e_j = logits[:, j], and dq is
    # dloss/dlogits itself
    q = logits.detach().float().requires_grad_()
    d = torch.eye(B, B + K)
    h = torch.eye(B + K)[B:].expand(B, K, B + K).contiguous()
    t = torch.tensor(1.0, requires_grad=True)
    w = torch.rand(B + K, generator=g) + 0.5 if weighted else torch.ones(B + K)
    loss = hotops.info_nce(q, d, h, temperature=t, label_smoothing=eps, neg_weight=w if weighted else None)
    # float64 reference on the exact logits
    t64 = t.detach().double().requires_grad_()
    z = logits / t64
    w64 = w.double().expand(B, -1).clone()
    w64[range(B), range(B)] = 1.0
    pos = z[range(B), range(B)]
    exact = (torch.logsumexp(z + w64.log(), 1) - (1 - eps) * pos - eps * z.mean(1)).mean()
    return loss, q, t, exact, logits, t64


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_large_logits_temperature_grad_is_exact(monkeypatch, backend, eps, weighted):
    """Loss and temperature gradient at logits of 2^20 against float64. The Triton row pass formed
    tdot as sum(e*l)/s - m, which kept only the rounding of e*l at 2^20 (dT off by 2e-3 to 3e-2);
    the C++ row pass, and now the Triton one, form it from l - m."""
    loss, _, t, exact, _, t64 = _large_logits_case(monkeypatch, backend, eps, weighted)
    torch.testing.assert_close(loss.double(), exact.detach(), rtol=1e-6, atol=1e-6)
    (dt,) = torch.autograd.grad(loss, t)
    (dt_exact,) = torch.autograd.grad(exact, t64)
    torch.testing.assert_close(dt.double(), dt_exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_large_logits_logit_grad_is_exact(monkeypatch, backend, eps, weighted):
    """Gradient of the logits at 2^20 against float64. The Triton gradient sweep formed
    p = exp(l - lse) with lse = m + log s rounded to float32 (ulp 0.125 at 2^20), so p was off
    by up to 6% relative (dlogit errors of 5e-3 before the 1/B); the C++ row pass, and now the
    Triton one, form p = w exp(l - m) / s with the row max m and s kept apart."""
    loss, q, _, exact, logits, _ = _large_logits_case(monkeypatch, backend, eps, weighted)
    (dq,) = torch.autograd.grad(loss, q)
    (dl_exact,) = torch.autograd.grad(exact, logits)
    assert dl_exact.abs().max() > 1e-2  # the gradients checked are not all negligible
    torch.testing.assert_close(dq.double(), dl_exact, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("weighted", [False, True])
def test_triton_row_pass_matches_cpu_on_infinite_logits(weighted):
    """A logit of -inf (an infinite input) adds e = 0 to tdot, as in the C++ row pass; the Triton
    pass once formed e * l = 0 * -inf = NaN there."""
    require_triton_runs()
    from hotops.infonce.triton import row_pass

    inf = float("inf")
    rows = torch.tensor([[1.0, -inf, 2.0, 3.0], [-inf, 0.0, 1.0, 2.0], [1.0, 5.0, 2.0, 3.0]])
    w = torch.tensor([0.0, 1.0, 0.5, 1.0]) if weighted else None
    outs = []
    for fn in (op._cpu_row_pass, row_pass):
        S, (loss, lse, tdot) = rows.clone(), (torch.empty(3) for _ in range(3))
        fn(S, None, w, None, loss, lse, tdot, 0, torch.tensor(1.0), 0.0, 1.0, True)
        outs.append((loss, lse, tdot, S))
    assert torch.isfinite(outs[0][2]).all()
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, equal_nan=True)


@pytest.mark.parametrize("own", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_triton_row_pass_matches_cpu_on_leading_neg_inf_block(own, weighted):
    """Rows whose first block of 16 weighted logits is all -inf (masked columns placed first),
    the positive among them or not, or (with own hard negatives) whose whole shared segment is
    -inf. The C++ pass takes the max over the whole row first; the Triton online sweep once had a
    running max of -inf there and formed exp(-inf - (-inf)) = NaN for loss, lse, tdot and every
    gradient, where the CPU gives loss = inf (a -inf positive) and finite gradients."""
    require_triton_runs()
    from hotops.infonce.triton import row_pass

    inf = float("inf")
    rows = torch.full((3, 20), -inf)
    rows[:, 16:] = torch.tensor([0.5, 1.0, 2.0, 3.0])
    rows[1, 1] = 2.0  # row 1's positive is finite, the rest of its first block -inf
    if own:
        rows[:, 16:] = -inf  # the whole shared segment is -inf, the own hard negatives are not
        rows[1, 1] = -inf
        rows[2, 2] = 2.0
    O = torch.tensor([[0.0, 1.0, -1.0, 4.0]]).expand(3, 4).contiguous() if own else None
    w = torch.linspace(0.5, 1.5, 20 + (4 if own else 0)) if weighted else None
    outs = []
    for fn in (op._cpu_row_pass, lambda *a: row_pass(*a, block=16)):
        S, Oc, (loss, lse, tdot) = (
            rows.clone(),
            O.clone() if own else None,
            (torch.empty(3) for _ in range(3)),
        )
        fn(S, Oc, w, None, loss, lse, tdot, 0, torch.tensor(1.0), 0.0, 1.0, True)
        outs.append((loss, lse, tdot, S) + ((Oc,) if own else ()))
    assert torch.isfinite(outs[0][1]).all() and torch.isfinite(outs[0][3]).all()
    assert outs[0][0][0] == inf  # a -inf positive: the loss is inf, not NaN
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, equal_nan=True)


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "bad,exc,match",
    [
        (lambda q, d: hotops.info_nce(q, d[:, :3]), ValueError, "same dimension"),
        (lambda q, d: hotops.info_nce(q, d[:3]), ValueError, "positives"),
        (lambda q, d: hotops.info_nce(q[0], d), ValueError, "2 dimensions"),
        (lambda q, d: hotops.info_nce(q, d, temperature=0.0), ValueError, "temperature must be > 0"),
        (lambda q, d: hotops.info_nce(q, d, temperature=-1.0), ValueError, "temperature must be > 0"),
        (lambda q, d: hotops.info_nce(q.long(), d.long()), TypeError, "dtype"),
        (lambda q, d: hotops.info_nce(q, d.double()), TypeError, "dtype"),
        (lambda q, d: hotops.info_nce(q, d.half()), TypeError, "share one dtype"),
        (lambda q, d: hotops.info_nce(q[:0], d[:0]), ValueError, "non-empty"),
        (
            lambda q, d: hotops.info_nce(q, d, neg_weight=torch.ones(3)),
            ValueError,
            "one weight per candidate",
        ),
        (lambda q, d: hotops.info_nce(q, d, neg_weight=-torch.ones(8)), ValueError, "non-negative"),
        (lambda q, d: hotops.info_nce(q, d, torch.randn(8, 2, 5)), ValueError, "hard"),
        (lambda q, d: hotops.info_nce(q, d, torch.randn(3, 5)), ValueError, "hard"),
        (lambda q, d: hotops.info_nce(q, d, reduction="max"), ValueError, "reduction"),
        (lambda q, d: hotops.info_nce(q, d, label_smoothing=1.5), ValueError, "label_smoothing"),
        (lambda q, d: hotops.info_nce(q, d, temperature=torch.ones(2)), ValueError, "0-d"),
        (lambda q, d: hotops.info_nce(q, "d"), TypeError, "torch.Tensor"),
        (lambda q, d: hotops.info_nce(q, d.to("meta")), ValueError, "one device"),
    ],
)
def test_bad_input(bad, exc, match):
    q, d = torch.randn(8, 4), torch.randn(8, 4)
    with pytest.raises(exc, match=match):
        bad(q, d)


def test_tensor_temperature_must_be_positive():
    q, d = torch.randn(8, 4), torch.randn(8, 4)
    with pytest.raises(ValueError, match="positive"):
        hotops.info_nce(q, d, temperature=torch.tensor(-0.5))


def test_no_backend_lists_reasons():
    with pytest.raises(RuntimeError, match=r"cpu \(C\+\+\): needs CPU tensors.*\n.*cuda \(Triton\)"):
        _backend.choose("info_nce", op.INFO_NCE_BACKENDS, torch.device("meta"))


def test_c_kernel_refuses_bad_views():
    ext = _backend.ext()
    S, r = torch.randn(4, 6), torch.empty(4)

    def rows(scores, pos_col=0):
        return ext.infonce_rows(
            scores,
            None,
            None,
            None,
            r,
            r,
            r,
            pos_col=pos_col,
            inv_t=1.0,
            smoothing=0.0,
            grad_scale=1.0,
            want_grad=False,
            threads=1,
        )

    with pytest.raises(ValueError, match="positive columns"):
        rows(S, pos_col=3)
    with pytest.raises(ValueError, match="dtype int64"):
        rows(S.long())
    with pytest.raises(ValueError, match="contiguous last dimension"):
        rows(S.T)


# ------------------------------------------------------------------ the module and gathering


def test_module_learnable_temperature_clamped():
    loss_fn = hotops.nn.InfoNCELoss(temperature=0.05, learnable_temperature=True)
    q, d, h = make(10, 8, "pool", N=3)
    loss = loss_fn(q, d, h)
    loss.backward()
    assert loss_fn.log_temperature.grad is not None and torch.isfinite(loss_fn.log_temperature.grad)
    with torch.no_grad():
        loss_fn.log_temperature.fill_(math.log(1e-4))
    assert loss_fn.temperature.item() == pytest.approx(0.01)


@pytest.mark.parametrize("T", [0.001, 5.0])
def test_module_fixed_temperature_is_used_as_given(T):
    """Only a learnable temperature is clamped; a fixed one outside [0.01, 1] was silently
    replaced by the bound (T=5 computed at T=1)."""
    q, d, h = make(10, 8, "pool", N=3)
    got = hotops.nn.InfoNCELoss(temperature=T)(q, d, h)
    torch.testing.assert_close(got, hotops.info_nce(q, d, h, temperature=T))
    with pytest.raises(ValueError, match="learnable temperature starts in"):
        hotops.nn.InfoNCELoss(temperature=T, learnable_temperature=True)


def _gather_worker(rank, world, port, q, d, h, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        B, N = q.shape[0] // world, h.shape[0] // world
        ql, dl = (t[rank * B : (rank + 1) * B].clone().requires_grad_() for t in (q, d))
        hl = h[rank * N : (rank + 1) * N].clone().requires_grad_()
        loss = hotops.nn.InfoNCELoss(temperature=0.1, gather=True)(ql, dl, hl)
        # each rank's loss is the mean over its own queries; their sum / world is the global mean
        (loss / world).backward()
        out[rank] = (loss.detach(), ql.grad, dl.grad, hl.grad)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_gather_two_gloo_ranks_equal_one_process():
    world, B, D, N = 2, 6, 8, 4
    q, d, h = torch.randn(world * B, D), torch.randn(world * B, D), torch.randn(world * N, D)
    manager = mp.get_context("spawn").Manager()
    out = manager.dict()
    mp.start_processes(
        _gather_worker,
        args=(world, _dist.free_port(), q, d, h, out),
        nprocs=world,
        start_method="spawn",
        join=True,
    )
    qa, da, ha = (t.clone().requires_grad_() for t in (q, d, h))
    ref = hotops.info_nce(qa, da, ha, temperature=0.1)
    ref.backward()
    torch.testing.assert_close(sum(out[r][0] for r in range(world)) / world, ref.detach())
    torch.testing.assert_close(torch.cat([out[r][1] for r in range(world)]), qa.grad)
    torch.testing.assert_close(torch.cat([out[r][2] for r in range(world)]), da.grad)
    torch.testing.assert_close(torch.cat([out[r][3] for r in range(world)]), ha.grad)


def test_second_backward_is_refused_clearly():
    q, d, _ = make(6, 4)
    loss = hotops.info_nce(q, d)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


# ------------------------------------------------------------------ on a GPU (gpu_check.sh)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("hard", [None, "pool", "own"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_reference(hard, dtype):
    q, d, h = make(300, 64, hard, N=50, K=3, dtype=dtype)
    q, d = (t.detach().cuda().requires_grad_() for t in (q, d))
    h = h.detach().cuda().requires_grad_() if h is not None else None
    check_against_reference(
        q, d, h, temperature=torch.tensor(0.1, device="cuda", requires_grad=True), label_smoothing=0.1
    )


def test_c_kernel_takes_numpy_and_refuses_read_only_outputs():
    np = pytest.importorskip("numpy")
    ext = _backend.ext()
    S = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    loss, lse, tdot = (np.empty(4, np.float32) for _ in range(3))
    ref = reference.info_nce(torch.from_numpy(S), torch.eye(6), None, temperature=1.0, reduction="none")
    args = dict(pos_col=0, inv_t=1.0, smoothing=0.0, grad_scale=1.0, want_grad=True, threads=1)
    ext.infonce_rows(S.copy(), None, None, None, loss, lse, tdot, **args)
    np.testing.assert_allclose(loss, ref.numpy(), rtol=1e-5)
    S.flags.writeable = False  # NumPy >= 2.1 flags it through DLPack 1.0; older cannot export it
    with pytest.raises(ValueError, match="read-only"):
        ext.infonce_rows(S, None, None, None, loss, lse, tdot, **args)


@settings(max_examples=30, deadline=None)
@given(
    Bq=st.integers(0, 6),
    Bd=st.integers(0, 6),
    Dq=st.integers(1, 5),
    Dd=st.integers(1, 5),
    hard_shape=st.sampled_from([None, (3,), (2, 4), (6, 2, 4), (5, 1, 3)]),
)
def test_property_bad_shapes_raise_value_error(Bq, Bd, Dq, Dd, hard_shape):
    q, d = torch.randn(Bq, Dq), torch.randn(Bd, Dd)
    hard = torch.randn(*hard_shape) if hard_shape else None
    valid = (
        Bq > 0
        and Dq == Dd
        and Bq <= Bd
        and (
            hard is None
            or (hard.dim() == 2 and hard.shape[1] == Dq)
            or (hard.dim() == 3 and hard.shape[0] == Bq and hard.shape[2] == Dq)
        )
    )
    if valid:
        assert torch.isfinite(hotops.info_nce(q, d, hard))
    else:
        with pytest.raises(ValueError):
            hotops.info_nce(q, d, hard)


def test_non_contiguous_inputs(isa):
    q = torch.randn(16, 20).T.requires_grad_()  # (20, 16), column-major
    d = torch.randn(20, 32)[:, ::2].requires_grad_()  # (20, 16), stride 2 in the last dim
    h = torch.randn(7, 16, requires_grad=True)
    check_against_reference(q, d, h, temperature=0.5)
