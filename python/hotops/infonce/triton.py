"""Triton row pass of the fused InfoNCE loss (the GPU twin of csrc/infonce/cpu.cpp).

One program per query row: an online-softmax sweep over the row's logits (max, weighted sum of
exponentials, sum of logits, sum of e·(l - max) for the temperature gradient), then, when
gradients are wanted, a second sweep that overwrites the logits with dloss/dlogits. The GEMMs around it are
cuBLAS (see op.py). Runs on the CPU under TRITON_INTERPRET=1 for tests.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dropped(w, l):
    """What a column of weight w <= 0 (or NaN) adds, exp(l + log w) as the reference has it: 0, or
    NaN where w is NaN or l is +inf or NaN."""
    return w * 0.0 + tl.where(l < float("inf"), 0.0, float("nan"))


@triton.jit
def _sweep_stats(
    ptr, stride, n, w_ptr, w_off, pos, r, inv_t, m, s, el, sl, HAS_W: tl.constexpr, BLOCK: tl.constexpr
):
    for j in range(0, n, BLOCK):
        cols = j + tl.arange(0, BLOCK)
        inside = cols < n
        l = tl.load(ptr + r * stride + cols, mask=inside, other=0.0).to(tl.float32) * inv_t
        if HAS_W:
            w = tl.load(w_ptr + w_off + cols, mask=inside, other=0.0)
        else:
            w = tl.where(inside, 1.0, 0.0)
        w = tl.where(cols == pos, 1.0, w)  # the positive always has weight 1
        sl += tl.sum(tl.where(inside, l, 0.0))
        m_new = tl.maximum(m, tl.max(tl.where(w > 0, l, float("-inf"))))
        # While every weighted logit so far is -inf (a leading block of masked columns, the
        # positive among them) the running max is -inf and exp(l - m_new) would be
        # exp(-inf + inf) = NaN: those columns add e = 0, as they do in the C++ pass, whose max
        # is the whole row's. Subtracting 0 instead gives exactly that (exp(-inf) = 0).
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        e = tl.where(w > 0, w * tl.exp(l - m_ref), _dropped(w, l))
        alpha = tl.where(
            m_new == float("-inf"), 1.0, tl.exp(m - m_new)
        )  # no exp(-inf + inf) before a weighted column
        # el = sum e * (l - m), never sum e * l: at logits of 2^20 the products keep only their
        # rounding and el / s - m cancels (as csrc/infonce/cpu.cpp forms it). When the max moves,
        # the old terms' l - m_old become l - m_new = (l - m_old) + (m_old - m_new): both <= 0, no
        # cancellation. Before the first weighted column s = el = 0 (and m = -inf): no shift.
        shift = tl.where(m == float("-inf"), 0.0, m - m_new)
        s_old = s
        s = s_old * alpha + tl.sum(e)
        el = (el + s_old * shift) * alpha + tl.sum(
            e * tl.where((w > 0) & (l > float("-inf")), l - m_new, 0.0)
        )
        m = m_new
    return m, s, el, sl


@triton.jit
def _sweep_grad(
    ptr,
    stride,
    n,
    w_ptr,
    w_off,
    pos,
    r,
    inv_t,
    m,
    inv_s,
    eps_c,
    eps,
    scale,
    HAS_W: tl.constexpr,
    BLOCK: tl.constexpr,
):
    for j in range(0, n, BLOCK):
        cols = j + tl.arange(0, BLOCK)
        inside = cols < n
        raw = tl.load(ptr + r * stride + cols, mask=inside, other=0.0)
        l = raw.to(tl.float32) * inv_t
        if HAS_W:
            w = tl.load(w_ptr + w_off + cols, mask=inside, other=0.0)
        else:
            w = tl.full((BLOCK,), 1.0, tl.float32)
        w = tl.where(cols == pos, 1.0, w)
        # p = w exp(l - m) / s, never exp(l - lse): lse = m + log s rounded to float32 carries an
        # error of up to half an ulp of m (1/16 at logits of 2^20), which exp turns into a relative
        # error of p (as csrc/infonce/cpu.cpp forms it: e * (1 / s)).
        p = tl.where(w > 0, w * tl.exp(l - m) * inv_s, _dropped(w, l))
        g = p - eps_c - tl.where(cols == pos, 1.0 - eps, 0.0)
        tl.store(ptr + r * stride + cols, (g * scale).to(raw.dtype), mask=inside)


@triton.jit
def _rows_kernel(
    S,
    stride_s,
    Na,
    O,
    stride_o,
    K,
    Wt,
    RS,
    LOSS,
    LSE,
    TDOT,
    pos_col,
    T,
    eps,
    grad_scale,
    HAS_OWN: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_RS: tl.constexpr,
    WANT_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    inv_t = 1.0 / tl.load(T).to(tl.float32)
    pos = pos_col + r
    m = -float("inf")
    s = 0.0
    el = 0.0
    sl = 0.0
    m, s, el, sl = _sweep_stats(S, stride_s, Na, Wt, 0, pos, r, inv_t, m, s, el, sl, HAS_W, BLOCK)
    if HAS_OWN:
        m, s, el, sl = _sweep_stats(O, stride_o, K, Wt, Na, -1, r, inv_t, m, s, el, sl, HAS_W, BLOCK)
    C = tl.cast(Na + K, tl.float32)  # Na and K may both be 1, which Triton passes as Python ints
    lse = m + tl.log(s)
    l_pos = tl.load(S + r * stride_s + pos).to(tl.float32) * inv_t
    tl.store(LSE + r, lse)
    # eps * (m - mean(l)): at eps = 0 an infinite logit must not give 0 * inf. Loss and tdot are
    # formed from differences to m, never from m itself (as on the CPU: logits of 1e6 would leave
    # only their rounding); el already holds sum e * (l - m).
    smooth = tl.where(eps > 0, eps * (m - sl / C), 0.0)
    tl.store(LOSS + r, (1.0 - eps) * (m - l_pos) + smooth + tl.log(s))
    tl.store(TDOT + r, el / s + smooth + (1.0 - eps) * (m - l_pos))
    if WANT_GRAD:
        scale = grad_scale * inv_t
        if HAS_RS:
            scale = scale * tl.load(RS + r)
        inv_s = 1.0 / s
        _sweep_grad(S, stride_s, Na, Wt, 0, pos, r, inv_t, m, inv_s, eps / C, eps, scale, HAS_W, BLOCK)
        if HAS_OWN:
            _sweep_grad(O, stride_o, K, Wt, Na, -1, r, inv_t, m, inv_s, eps / C, eps, scale, HAS_W, BLOCK)


def row_pass(
    shared,
    own,
    weight,
    row_scale,
    loss,
    lse,
    tdot,
    pos_col,
    temperature,
    smoothing,
    grad_scale,
    want_grad,
    block: int = 1024,
):
    """Same contract as the C++ row pass (csrc/infonce/cpu.h); temperature stays on the device."""
    P, Na = shared.shape
    K = own.shape[1] if own is not None else 0
    if P == 0:
        return
    block = min(block, triton.next_power_of_2(max(Na, K, 16)))
    _rows_kernel[(P,)](
        shared,
        shared.stride(0),
        Na,
        own if own is not None else shared,
        own.stride(0) if own is not None else 0,
        K,
        weight if weight is not None else loss,
        row_scale if row_scale is not None else loss,
        loss,
        lse,
        tdot,
        pos_col,
        temperature,
        float(smoothing),
        float(grad_scale),
        HAS_OWN=own is not None,
        HAS_W=weight is not None,
        HAS_RS=row_scale is not None,
        WANT_GRAD=bool(want_grad),
        BLOCK=block,
    )
