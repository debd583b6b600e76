"""Fault suite of the attention family (issue 12): what a hostile user tries -- wrong scalars, dtypes,
ranks and strides, NaN/Inf, empty and huge inputs, corrupt checkpoints, threads, parameter
mutation, second-order gradients -- each either matches the plain-torch reference or raises an
error that names the argument. docs/reliability.md says which test checks which promise."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _faults import FAST, VALUES, close_where_finite, make_values, run_threads, same_nonfinite
from conftest import require_triton_runs
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import hotops
from hotops import _backend
from hotops.attention import SubsampledSelfAttention
from hotops.attention import reference as attn_ref

# ====================================================================== attention


def _qkv(B=1, H=2, L=8, D=4, dtype=torch.float32, requires_grad=False):
    return [torch.randn(B, H, L, D, dtype=dtype, requires_grad=requires_grad) for _ in range(3)]


def _forward_on(kind, isa, monkeypatch):
    """kind "triton": the forward runs the Triton kernel, once (on the avx512 run: it does not
    depend on the C++ ISA); kind "cpu": the C++ kernel of this isa."""
    if kind == "triton":
        if isa != "avx512":
            pytest.skip("the Triton kernel does not depend on the C++ ISA")
        require_triton_runs()
        from hotops.attention import op as attn_op

        monkeypatch.setattr(
            attn_op, "SSA_BACKENDS", (_backend.Backend("triton", lambda dev: None, attn_op._triton_ssa),)
        )


@pytest.mark.parametrize("kind", ["cpu", "triton"])
@pytest.mark.parametrize("where", ["q", "k"])
def test_attention_nan_scores_are_not_unseen_keys(monkeypatch, isa, kind, where):
    """A query whose every score is NaN (NaN in q, or in the one key it sees) once got zeros, as
    if it saw no key: the online softmax's max skipped the NaNs. Found by the property test."""
    _forward_on(kind, isa, monkeypatch)
    q, k, v = _qkv(L=3, D=2)
    if where == "q":
        q[0, 1, 2, 0] = math.nan
    else:
        k[0, 0, 0, 1] = math.nan
    idx = torch.tensor([[[0], [0]]]) if where == "k" else torch.arange(3).expand(1, 2, 3)
    out = hotops.subsampled_attention(q, k, v, indices=idx)
    same_nonfinite(out, attn_ref.attention_on_indices(q, k, v, idx), "out")
    assert out.isnan().any()


@pytest.mark.parametrize("kind", ["cpu", "triton"])
def test_attention_nan_in_a_hidden_key_stays_out(monkeypatch, isa, kind):
    """A query that sees no key gets zeros even when the keys it does not see hold NaN (it got
    NaN: P = 0 times the NaN value row); a padding key's NaN reaches no output. Found by the
    property test (explore profile)."""
    _forward_on(kind, isa, monkeypatch)
    q, k, v = _qkv(H=1, L=3, D=2)
    v[0, 0, 2] = math.nan
    out = hotops.subsampled_attention(q, k, v, indices=torch.tensor([[[2]]]), causal=True)
    assert torch.equal(out[0, 0, :2], torch.zeros(2, 2)) and out[0, 0, 2].isnan().all()
    k[0, 0, 1] = math.nan
    pad = torch.tensor([[False, True, True]])
    out = hotops.subsampled_attention(q, k, v, keep=1.0, key_padding_mask=pad)
    clean_k, clean_v = k.nan_to_num(0.0), v.nan_to_num(0.0)
    torch.testing.assert_close(
        out, attn_ref.subsampled_attention(q, clean_k, clean_v, 1.0, key_padding_mask=pad)
    )


def test_attention_create_graph_first_gradient_then_clear_error():
    q, k, v = _qkv(requires_grad=True)
    idx = torch.arange(8).expand(1, 2, 8)
    out = hotops.subsampled_attention(q, k, v, indices=idx)
    plain = torch.autograd.grad(out.sum(), [q, k, v], retain_graph=True)
    g = torch.autograd.grad(out.sum(), [q, k, v], create_graph=True)
    for a, b in zip(g, plain):
        torch.testing.assert_close(a, b)
    with pytest.raises(RuntimeError, match="subsampled_attention has no second derivative"):
        g[0].pow(2).sum().backward()


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: SubsampledSelfAttention(16, 0), ValueError, "num_heads must be >= 1"),
        (lambda: SubsampledSelfAttention(16, 2.5), ValueError, "num_heads must be an integer"),
        (lambda: SubsampledSelfAttention("16", 2), TypeError, "embed_dim must be a number"),
        (lambda: SubsampledSelfAttention(16, 4, num_kv_heads=0), ValueError, "num_kv_heads must be >= 1"),
        (lambda: SubsampledSelfAttention(16, 4, num_kv_heads=3), ValueError, "multiple of num_kv_heads"),
        (lambda: SubsampledSelfAttention(15, 4), ValueError, "multiple of num_heads"),
        (lambda: SubsampledSelfAttention(16, 2, keep=0.0), ValueError, "keep must be > 0.0"),
        (lambda: SubsampledSelfAttention(16, 2, keep=math.nan), ValueError, "keep must be finite"),
        (lambda: SubsampledSelfAttention(16, 2, keep="0.5"), TypeError, "keep must be a number"),
        (lambda: SubsampledSelfAttention(16, 2, ensemble=0), ValueError, "ensemble must be >= 1"),
        (lambda: SubsampledSelfAttention(16, 2, mode="random"), ValueError, "mode must be one of"),
        (lambda: SubsampledSelfAttention(16, 2, causal="yes"), TypeError, "causal must be a bool"),
        (
            lambda: SubsampledSelfAttention(16, 2, generator=0),
            TypeError,
            "generator must be a torch.Generator",
        ),
        (lambda: SubsampledSelfAttention(16, 2)(torch.randn(3, 16)), ValueError, "x must have 3 dimensions"),
        (lambda: SubsampledSelfAttention(16, 2)(torch.randn(1, 3, 12)), ValueError, "embed_dim=16"),
        (
            lambda: SubsampledSelfAttention(16, 2)(torch.randn(1, 3, 16).long()),
            TypeError,
            "x has dtype int64",
        ),
        (
            lambda: SubsampledSelfAttention(16, 2)(torch.randn(1, 3, 16).double()),
            TypeError,
            "x has dtype float64",
        ),
        (lambda: hotops.subsampled_attention(*_qkv(), keep=1.5), ValueError, "keep must be > 0.0 and <= 1.0"),
        (lambda: hotops.subsampled_attention(*_qkv(), keep=None), TypeError, "keep must be a number"),
        (lambda: hotops.subsampled_attention(*_qkv(), scale="1"), TypeError, "scale must be a number"),
        (lambda: hotops.subsampled_attention(*_qkv(), scale=math.inf), ValueError, "scale must be finite"),
        (lambda: hotops.subsampled_attention(*_qkv(), causal=1), TypeError, "causal must be a bool"),
        (lambda: hotops.subsampled_attention(*_qkv(), mode=None), ValueError, "mode must be one of"),
        (lambda: hotops.attention.patch_bert(nn.Linear(2, 2), generator=3), TypeError, "generator must be"),
        (lambda: hotops.attention.patch_bert("bert"), TypeError, "patch_bert takes an nn.Module"),
        (
            lambda: hotops.attention.patch_bert(nn.Linear(2, 2), keep=np.float32(2)),
            ValueError,
            "keep must be",
        ),
    ],
)
def test_attention_bad_arguments(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("keep", [np.float32(0.5), np.float64(0.5), torch.tensor(0.5), 1])
def test_attention_numbers_of_every_kind(keep):
    q, k, v = _qkv()
    g = torch.Generator().manual_seed(0)
    out = hotops.subsampled_attention(q, k, v, keep=keep, generator=g, scale=np.float32(0.5))
    g = torch.Generator().manual_seed(0)
    ref = attn_ref.subsampled_attention(q, k, v, keep=float(keep), generator=g, scale=0.5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    SubsampledSelfAttention(np.int64(16), torch.tensor(2), keep=np.float32(0.5), ensemble=np.int32(1))


@FAST
@given(
    B=st.integers(1, 2),
    Hkv=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 2]),
    Lq=st.integers(0, 9),
    Lk=st.integers(0, 11),
    D=st.sampled_from([1, 4, 8]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    values=VALUES,
    layout=st.sampled_from(["contiguous", "transposed", "offset", "expanded"]),
    causal=st.booleans(),
    keep=st.sampled_from([0.3, 1.0]),
    target=st.sampled_from(["q", "k", "v"]),
    seed=st.integers(0, 2**16),
)
def test_attention_property_matches_reference(
    B, Hkv, group, Lq, Lk, D, dtype, values, layout, causal, keep, target, seed
):
    H = Hkv * group
    gen = torch.Generator().manual_seed(seed)
    q = make_values(values if target == "q" else "normal", B, H, Lq, D, dtype=dtype, gen=gen)
    k = make_values(values if target == "k" else "normal", B, Hkv, Lk, D, dtype=dtype, gen=gen)
    v = make_values(values if target == "v" else "normal", B, Hkv, Lk, D, dtype=dtype, gen=gen)
    if layout == "transposed":  # (B, L, H, D) memory, the layout of a fused projection
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    elif layout == "offset":
        q, k, v = (torch.cat([t, t[..., :1]], dim=-1)[..., :D] for t in (q, k, v))
    elif layout == "expanded" and Lk:
        k, v = k[:, :, :1].expand(B, Hkv, Lk, D), v[:, :, :1].expand(B, Hkv, Lk, D)
    kw = dict(causal=causal, mode="unbiased")
    out = hotops.subsampled_attention(q, k, v, keep, generator=torch.Generator().manual_seed(seed), **kw)
    ref64 = attn_ref.subsampled_attention(
        q.double(), k.double(), v.double(), keep, generator=torch.Generator().manual_seed(seed), **kw
    )
    ref_lp = attn_ref.subsampled_attention(q, k, v, keep, generator=torch.Generator().manual_seed(seed), **kw)
    assert out.dtype == dtype and out.shape == q.shape
    # causal: the reference (SDPA with a mask) adds -inf to a hidden key's NaN score and gets NaN;
    # the kernel never reads a hidden score, so that query's output stays finite. +-Inf: a query
    # whose every visible score is -inf gets the zeros of a query that sees nothing, where SDPA
    # gives NaN (docs/reliability.md, a known difference)
    close_where_finite(
        out,
        ref64,
        ref_lp,
        atol={torch.float32: 1e-5}.get(dtype, 1e-2),
        what="out",
        rtol=1e-4,
        may_be_finite=causal and target != "q" or values in ("inf", "-inf"),
    )


def test_attention_threads_share_a_module_while_one_trains():
    torch.manual_seed(0)
    m = SubsampledSelfAttention(32, 4, keep=0.5)
    x = torch.randn(2, 24, 32)
    m.eval()
    with torch.no_grad():
        expect = m(x)

    def work(i):
        for _ in range(5):
            if i == 0:  # a training replica's forward/backward on the shared parameters
                m(x).sum().backward()
            else:
                with torch.no_grad():
                    torch.testing.assert_close(m(x), expect, rtol=1e-5, atol=1e-5)
        return True

    assert all(run_threads(work))


def test_attention_threads_explicit_generators_are_reproducible():
    """Subsets drawn in threads from their own generators equal the single-threaded ones."""
    q, k, v = _qkv(B=2, H=4, L=32, D=8)

    def run(seed):
        return hotops.subsampled_attention(q, k, v, 0.25, generator=torch.Generator().manual_seed(seed))

    expect = [run(i) for i in range(4)]
    got = run_threads(run)
    for a, b in zip(got, expect):
        assert torch.equal(a, b)


def test_attention_module_parameter_mutation():
    torch.manual_seed(0)
    m = SubsampledSelfAttention(16, 2).eval()
    x = torch.randn(2, 5, 16)

    def reference_forward(x):
        B, L, E = x.shape
        p = {n: t.detach().to(x.dtype) for n, t in m.named_parameters()}
        split = lambda t: t.view(B, L, 2, 8).transpose(1, 2)
        q = split(torch.nn.functional.linear(x, p["q_proj.weight"], p["q_proj.bias"]))
        k = split(torch.nn.functional.linear(x, p["k_proj.weight"], p["k_proj.bias"]))
        v = split(torch.nn.functional.linear(x, p["v_proj.weight"], p["v_proj.bias"]))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return torch.nn.functional.linear(
            out.transpose(1, 2).reshape(B, L, E), p["out_proj.weight"], p["out_proj.bias"]
        )

    def check(xx=x, tol=1e-5):
        with torch.no_grad():
            torch.testing.assert_close(m(xx), reference_forward(xx), rtol=tol, atol=tol)

    check()
    m.q_proj.weight.data = torch.randn(16, 16)
    check()
    with torch.no_grad():
        m.k_proj.weight.mul_(2)
    check()
    m.v_proj.bias.data.copy_(torch.randn(16))
    check()
    m.load_state_dict(SubsampledSelfAttention(16, 2).state_dict())
    check()
    m.load_state_dict({"out_proj.bias": torch.zeros(16)}, strict=False)
    check()
    m.half()
    check(x.half(), tol=1e-2)
    m.bfloat16()
    check(x.bfloat16(), tol=5e-2)
    with pytest.raises(TypeError, match="convert one to the other"):
        m(x)
    m.to(torch.float32)
    check()


def test_repeated_calls_are_bitwise_identical():
    """Same inputs, same generator seed, same thread count: the same bits, call after call."""
    qa, ka, va = _qkv(B=2, H=4, L=40, D=8)
    first = hotops.subsampled_attention(qa, ka, va, 0.5, generator=torch.Generator().manual_seed(3))
    for _ in range(3):
        again = hotops.subsampled_attention(qa, ka, va, 0.5, generator=torch.Generator().manual_seed(3))
        assert torch.equal(again, first)
