"""Triton kernels of subsampled attention (the GPU twin of csrc/attention/cpu.cpp).

* forward: one program per (block of queries, batch x head); it walks the sampled keys in
  blocks, loading K/V rows through the index (the gather happens in the load), with an online
  softmax; writes out and the log-sum-exp.
* backward, FlashAttention-2 style and without atomics: a dQ kernel with the forward's grid, and
  a dK/dV kernel with one program per (block of sampled slots, batch x index head) that walks
  every query of the heads sharing those slots and writes compact per-slot gradients; the
  compact rows are then added into dK/dV at the original key positions with
  ``index_put_(accumulate=True)`` (deterministic under ``torch.use_deterministic_algorithms``).

Scores (QK^T, dO V^T) multiply the inputs' dtype on the tensor cores; the products with P and dS
keep those in float32 (tf32 on the GPU): rounding them to bf16, as FlashAttention does, costs more
accuracy than the tests' tolerance (2x the bf16 reference's own error) allows.
Everything is made contiguous first (views of projections are copied: O(L) memory).
Runs on the CPU under TRITON_INTERPRET=1 for tests.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    """tl.dot; UPCAST (the CPU interpreter, whose bf16 dot is wrong) multiplies in float32 the
    same low-precision values the GPU's tensor cores would see."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b)


@triton.jit
def _load_slots(IDX, KPOS, idx_base, s0, S, HAS_KPOS: tl.constexpr, BLOCK_N: tl.constexpr):
    slots = s0 + tl.arange(0, BLOCK_N)
    inside = slots < S
    rows = tl.load(IDX + idx_base + slots, mask=inside, other=0)
    if HAS_KPOS:
        kp = tl.load(KPOS + idx_base + slots, mask=inside, other=-1)
    else:
        kp = tl.where(inside, rows, -1)
    return rows, kp, inside


@triton.jit
def _visible(kp, qp, CAUSAL: tl.constexpr):
    vis = (kp >= 0)[None, :] & (qp >= -1)[:, None]
    if CAUSAL:
        vis = vis & (kp[None, :] <= qp[:, None])
    return vis


@triton.jit
def _fwd_kernel(
    Q,
    K,
    V,
    IDX,
    KPOS,
    QPOS,
    OUT,
    LSE,
    scale,
    H,
    Hkv,
    Lq,
    Lk,
    S,
    D,
    PER_Q_HEAD: tl.constexpr,
    HAS_KPOS: tl.constexpr,
    HAS_QPOS: tl.constexpr,
    CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    hk = h // (H // Hkv)
    hi = h if PER_Q_HEAD else hk
    rq = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dd = tl.arange(0, BLOCK_D)
    qmask, dmask = rq < Lq, dd < D
    q_off = (bh * Lq + rq)[:, None] * D + dd[None, :]
    q = tl.load(Q + q_off, mask=qmask[:, None] & dmask[None, :], other=0.0)
    qp = tl.load(QPOS + bh * Lq + rq, mask=qmask, other=0) if HAS_QPOS else rq.to(tl.int64)
    kv_base = (b * Hkv + hk) * Lk * D
    idx_base = (b * (H if PER_Q_HEAD else Hkv) + hi) * S
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for s0 in range(0, S, BLOCK_N):
        rows, kp, inside = _load_slots(IDX, KPOS, idx_base, s0, S, HAS_KPOS, BLOCK_N)
        kv_off = kv_base + rows[:, None] * D + dd[None, :]
        kv_mask = (inside & (kp >= 0))[:, None] & dmask[None, :]  # hidden keys read as 0: their NaN stays out
        k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
        sc = _dot(q, tl.trans(k), UPCAST) * scale
        sc = tl.where(_visible(kp, qp, CAUSAL), sc, float("-inf"))
        m_new = tl.maximum(m, tl.max(sc, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing yet
        p = tl.exp(sc - m_safe[:, None])
        alpha = tl.exp(m - m_safe)
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p, v.to(tl.float32), UPCAST)
        m = m_new
    seen = (l > 0) | (l != l)  # a NaN score (NaN in q, k) made l NaN: the row is NaN, not unseen
    out = tl.where(seen[:, None], acc / tl.where(seen, l, 1.0)[:, None], 0.0)
    tl.store(OUT + q_off, out.to(OUT.dtype.element_ty), mask=qmask[:, None] & dmask[None, :])
    tl.store(LSE + bh * Lq + rq, tl.where(seen, m + tl.log(l), float("-inf")), mask=qmask)


@triton.jit
def _query_rows(Q, DOUT, OUT, LSE, QPOS, bh, rq, dd, Lq, D, HAS_QPOS: tl.constexpr):
    """q, dO, lse (+inf where nothing was seen, so exp(s - lse) = 0), D_i = dO·O, positions."""
    qmask, dmask = rq < Lq, dd < D
    off = (bh * Lq + rq)[:, None] * D + dd[None, :]
    mask = qmask[:, None] & dmask[None, :]
    q = tl.load(Q + off, mask=mask, other=0.0)
    do = tl.load(DOUT + off, mask=mask, other=0.0)
    o = tl.load(OUT + off, mask=mask, other=0.0)
    di = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    lse = tl.load(LSE + bh * Lq + rq, mask=qmask, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    qp = (
        tl.load(QPOS + bh * Lq + rq, mask=qmask, other=-2)
        if HAS_QPOS
        else tl.where(qmask, rq, -2).to(tl.int64)
    )
    return q, do, di, lse, qp, off, mask


@triton.jit
def _dq_kernel(
    Q,
    K,
    V,
    IDX,
    KPOS,
    QPOS,
    OUT,
    LSE,
    DOUT,
    DQ,
    scale,
    H,
    Hkv,
    Lq,
    Lk,
    S,
    D,
    PER_Q_HEAD: tl.constexpr,
    HAS_KPOS: tl.constexpr,
    HAS_QPOS: tl.constexpr,
    CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    hk = h // (H // Hkv)
    hi = h if PER_Q_HEAD else hk
    rq = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dd = tl.arange(0, BLOCK_D)
    q, do, di, lse, qp, off, mask = _query_rows(Q, DOUT, OUT, LSE, QPOS, bh, rq, dd, Lq, D, HAS_QPOS)
    kv_base = (b * Hkv + hk) * Lk * D
    idx_base = (b * (H if PER_Q_HEAD else Hkv) + hi) * S
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for s0 in range(0, S, BLOCK_N):
        rows, kp, inside = _load_slots(IDX, KPOS, idx_base, s0, S, HAS_KPOS, BLOCK_N)
        kv_off = kv_base + rows[:, None] * D + dd[None, :]
        kv_mask = (inside & (kp >= 0))[:, None] & (dd < D)[None, :]
        k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
        p = tl.exp(_dot(q, tl.trans(k), UPCAST) * scale - lse[:, None])
        p = tl.where(_visible(kp, qp, CAUSAL), p, 0.0)
        ds = p * (_dot(do, tl.trans(v), UPCAST) - di[:, None])
        dq += _dot(ds, k.to(tl.float32), UPCAST)
    tl.store(DQ + off, (dq * scale).to(DQ.dtype.element_ty), mask=mask)


@triton.jit
def _dkv_kernel(
    Q,
    K,
    V,
    IDX,
    KPOS,
    QPOS,
    OUT,
    LSE,
    DOUT,
    DK_S,
    DV_S,
    scale,
    H,
    Hkv,
    Lq,
    Lk,
    S,
    D,
    PER_Q_HEAD: tl.constexpr,
    HAS_KPOS: tl.constexpr,
    HAS_QPOS: tl.constexpr,
    CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    bi = tl.program_id(1).to(tl.int64)
    Hi = H if PER_Q_HEAD else Hkv
    b, hi = bi // Hi, bi % Hi
    group = H // Hkv
    hk = hi // group if PER_Q_HEAD else hi
    h0 = hi if PER_Q_HEAD else hi * group
    nh = 1 if PER_Q_HEAD else group
    dd = tl.arange(0, BLOCK_D)
    s0 = tl.program_id(0) * BLOCK_N
    rows, kp, inside = _load_slots(IDX, KPOS, bi * S, s0, S, HAS_KPOS, BLOCK_N)
    kv_off = (b * Hkv + hk) * Lk * D + rows[:, None] * D + dd[None, :]
    kv_mask = (inside & (kp >= 0))[:, None] & (dd < D)[None, :]
    k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
    v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for j in range(0, nh):
        bh = b * H + h0 + j
        for m0 in range(0, Lq, BLOCK_M):
            rq = m0 + tl.arange(0, BLOCK_M)
            q, do, di, lse, qp, off, mask = _query_rows(Q, DOUT, OUT, LSE, QPOS, bh, rq, dd, Lq, D, HAS_QPOS)
            p = tl.exp(_dot(q, tl.trans(k), UPCAST) * scale - lse[:, None])
            p = tl.where(_visible(kp, qp, CAUSAL), p, 0.0)
            dv += _dot(tl.trans(p), do.to(tl.float32), UPCAST)
            ds = p * (_dot(do, tl.trans(v), UPCAST) - di[:, None])
            dk += _dot(tl.trans(ds), q.to(tl.float32), UPCAST)
    s_off = (bi * S + s0 + tl.arange(0, BLOCK_N))[:, None] * BLOCK_D + dd[None, :]
    tl.store(DK_S + s_off, dk * scale, mask=inside[:, None])
    tl.store(DV_S + s_off, dv, mask=inside[:, None])


def _blocks(D: int):
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=max(16, triton.next_power_of_2(D)))


def _common(q, k, idx, kpos, qpos, causal):
    B, H, Lq, D = q.shape
    flags = dict(
        PER_Q_HEAD=idx.shape[1] == H,
        HAS_KPOS=kpos is not None,
        HAS_QPOS=qpos is not None,
        CAUSAL=bool(causal),
        UPCAST=os.environ.get("TRITON_INTERPRET") == "1",
    )
    dummy = idx  # stands in for absent positions (never read)
    c = lambda t: t.contiguous() if t is not None else dummy  # noqa: E731
    return (B, H, k.shape[1], Lq, k.shape[2], idx.shape[2], D), flags, c(idx), c(kpos), c(qpos)


def forward(q, k, v, idx, kpos, qpos, out, lse, scale, causal):
    (B, H, Hkv, Lq, Lk, S, D), flags, idx, kpos, qpos = _common(q, k, idx, kpos, qpos, causal)
    if out.numel() == 0:
        return
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    res = torch.empty_like(q)
    blk = _blocks(D)
    grid = (triton.cdiv(Lq, blk["BLOCK_M"]), B * H)
    _fwd_kernel[grid](q, k, v, idx, kpos, qpos, res, lse, scale, H, Hkv, Lq, Lk, S, D, **flags, **blk)
    out.copy_(res)


def backward(q, k, v, idx, kpos, qpos, out, lse, dout, dq, dk, dv, scale, causal):
    (B, H, Hkv, Lq, Lk, S, D), flags, idx, kpos, qpos = _common(q, k, idx, kpos, qpos, causal)
    dk.zero_()
    dv.zero_()
    if q.numel() == 0 or S == 0:
        dq.zero_()
        return
    q, k, v, out, dout = (t.contiguous() for t in (q, k, v, out, dout))
    blk = _blocks(D)
    res = torch.empty_like(q)
    _dq_kernel[(triton.cdiv(Lq, blk["BLOCK_M"]), B * H)](
        q, k, v, idx, kpos, qpos, out, lse, dout, res, scale, H, Hkv, Lq, Lk, S, D, **flags, **blk
    )
    dq.copy_(res)
    Hi = idx.shape[1]
    dk_s = torch.empty(B, Hi, S, blk["BLOCK_D"], dtype=torch.float32, device=q.device)
    dv_s = torch.empty_like(dk_s)
    _dkv_kernel[(triton.cdiv(S, blk["BLOCK_N"]), B * Hi)](
        q, k, v, idx, kpos, qpos, out, lse, dout, dk_s, dv_s, scale, H, Hkv, Lq, Lk, S, D, **flags, **blk
    )
    # compact per-slot rows -> original key rows of the KV head
    b_i = torch.arange(B, device=q.device)[:, None, None].expand(B, Hi, S)
    h_i = torch.arange(Hi, device=q.device)[None, :, None].expand(B, Hi, S) // (Hi // Hkv)
    for acc, grad, compact in (
        (torch.zeros(dk.shape, dtype=torch.float32, device=q.device), dk, dk_s),
        (torch.zeros(dv.shape, dtype=torch.float32, device=q.device), dv, dv_s),
    ):
        acc.index_put_((b_i, h_i, idx), compact[..., :D], accumulate=True)
        grad.copy_(acc)
