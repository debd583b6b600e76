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
keep those in float32 (tf32 on the GPU for 16-bit inputs): rounding them to bf16, as FlashAttention
does, costs more accuracy than the tests' tolerance (2x the bf16 reference's own error) allows.
Float32 inputs multiply every product at 3xTF32 (_f32_precision). Tile sizes and warps depend on
the head dim and dtype (launch_config); the grid is one-dimensional (_program).
Everything is made contiguous first (views of projections are copied: O(L) memory).
Runs on the CPU under TRITON_INTERPRET=1 for tests.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, F32_PRECISION: tl.constexpr):
    """tl.dot; UPCAST (the CPU interpreter, whose bf16 dot is wrong) multiplies in float32 the
    same low-precision values the GPU's tensor cores would see. F32_PRECISION is how float32
    operands are multiplied on the GPU (see _f32_precision): always named, since tl.dot's default
    for them is plain tf32 (10-bit mantissas), which the interpreter never shows."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    if a.dtype == tl.float32:
        return tl.dot(a, b, input_precision=F32_PRECISION)
    return tl.dot(a, b)


@triton.jit
def _program(n, BLOCK: tl.constexpr):
    """(row r, first item i0) of this program: the grid is one-dimensional, cdiv(n, BLOCK) programs
    per row (batch x head) of n items, blocks of a row adjacent. CUDA caps grid y and z at 65,535
    (B·H passes that: local mode's windows are heads), x at 2^31 - 1 (see _grid)."""
    per_row = tl.cdiv(n, BLOCK)
    pid = tl.program_id(0)
    return (pid // per_row).to(tl.int64), (pid % per_row) * BLOCK


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
def _visible_t(kp, qp, CAUSAL: tl.constexpr):
    """_visible transposed: (slots, queries)."""
    vis = (kp >= 0)[:, None] & (qp >= -1)[None, :]
    if CAUSAL:
        vis = vis & (kp[:, None] <= qp[None, :])
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
    F32_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    bh, m0 = _program(Lq, BLOCK_M)
    b, h = bh // H, bh % H
    hk = h // (H // Hkv)
    hi = h if PER_Q_HEAD else hk
    rq = m0 + tl.arange(0, BLOCK_M)
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
        sc = _dot(q, tl.trans(k), UPCAST, F32_PRECISION) * scale
        sc = tl.where(_visible(kp, qp, CAUSAL), sc, float("-inf"))
        m_new = tl.maximum(m, tl.max(sc, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing yet
        p = tl.exp(sc - m_safe[:, None])
        alpha = tl.exp(m - m_safe)
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p, v.to(tl.float32), UPCAST, F32_PRECISION)
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
    F32_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    bh, m0 = _program(Lq, BLOCK_M)
    b, h = bh // H, bh % H
    hk = h // (H // Hkv)
    hi = h if PER_Q_HEAD else hk
    rq = m0 + tl.arange(0, BLOCK_M)
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
        p = tl.exp(_dot(q, tl.trans(k), UPCAST, F32_PRECISION) * scale - lse[:, None])
        p = tl.where(_visible(kp, qp, CAUSAL), p, 0.0)
        ds = p * (_dot(do, tl.trans(v), UPCAST, F32_PRECISION) - di[:, None])
        dq += _dot(ds, k.to(tl.float32), UPCAST, F32_PRECISION)
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
    F32_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    bi, s0 = _program(S, BLOCK_N)
    Hi = H if PER_Q_HEAD else Hkv
    b, hi = bi // Hi, bi % Hi
    group = H // Hkv
    hk = hi // group if PER_Q_HEAD else hi
    h0 = hi if PER_Q_HEAD else hi * group
    nh = 1 if PER_Q_HEAD else group
    dd = tl.arange(0, BLOCK_D)
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
            # P^T and dS^T (slots x queries) straight from K Q^T and V dO^T: transposing the
            # loaded q and dO is free, transposing P and dS in registers is not (float32 spills)
            pt = tl.exp(_dot(k, tl.trans(q), UPCAST, F32_PRECISION) * scale - lse[None, :])
            pt = tl.where(_visible_t(kp, qp, CAUSAL), pt, 0.0)
            dv += _dot(pt, do.to(tl.float32), UPCAST, F32_PRECISION)
            dst = pt * (_dot(v, tl.trans(do), UPCAST, F32_PRECISION) - di[None, :])
            dk += _dot(dst, q.to(tl.float32), UPCAST, F32_PRECISION)
    s_off = (bi * S + s0 + tl.arange(0, BLOCK_N))[:, None] * BLOCK_D + dd[None, :]
    tl.store(DK_S + s_off, dk * scale, mask=inside[:, None])
    tl.store(DV_S + s_off, dv, mask=inside[:, None])


GRID_X_MAX = 2**31 - 1  # CUDA's limit on grid x (y and z stop at 65,535)

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, for float32 or 16-bit inputs, by the
# padded head dim: the largest tiles whose shared memory fits an H100's 232,448 bytes per block
# (and an A100's 166,912) and whose registers do not spill badly. Measured with ptxas for sm_90
# (tests/test_attention_triton.py compiles a sample of them without a GPU).
_CONFIGS = {
    # (kernel, float32 inputs): [(largest BLOCK_D, (BLOCK_M, BLOCK_N, num_warps, num_stages)), ...]
    ("fwd", False): [(128, (64, 64, 4, 3)), (256, (64, 32, 8, 3)), (1 << 30, (16, 16, 4, 3))],
    ("dq", False): [(128, (64, 64, 4, 3)), (256, (64, 32, 8, 3)), (1 << 30, (16, 16, 4, 3))],
    ("dkv", False): [
        (32, (64, 64, 4, 3)),
        (64, (64, 64, 8, 3)),
        (128, (64, 32, 8, 3)),
        (256, (32, 32, 8, 3)),
        (1 << 30, (16, 16, 4, 3)),
    ],
    # float32: 3xTF32 splits every operand in two, so the tiles are smaller
    ("fwd", True): [(64, (64, 64, 4, 3)), (128, (32, 32, 4, 3)), (1 << 30, (16, 16, 4, 3))],
    ("dq", True): [
        (32, (64, 64, 4, 3)),
        (64, (64, 32, 4, 3)),
        (128, (16, 32, 4, 3)),
        (1 << 30, (16, 16, 4, 3)),
    ],
    ("dkv", True): [
        (16, (64, 64, 4, 3)),
        (32, (32, 32, 4, 3)),
        (64, (32, 16, 4, 3)),
        (128, (16, 16, 4, 3)),
        (1 << 30, (16, 16, 8, 3)),
    ],
}


def _f32_precision(dtype: torch.dtype) -> str:
    """How the kernels multiply float32 operands on the GPU. Float32 inputs: "tf32x3" (three tf32
    tensor-core products with the low halves: as accurate as float32 FMAs, as the codebook's
    GEMM has it), not plain tf32, whose 10-bit mantissas put errors of 1e-3 into attention that
    float32 callers do not expect. 16-bit inputs: their scores are products of the inputs' dtype
    already; P and dS are float32 and multiply at tf32 (error 2^-11, below bf16/fp16 output
    rounding; the tests' tolerance is 2x the reference's own error in that dtype)."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def launch_config(kernel: str, D: int, dtype: torch.dtype) -> dict:
    """Tile sizes and launch options of one kernel ("fwd", "dq", "dkv") for head dim D."""
    block_d = max(16, triton.next_power_of_2(D))
    bm, bn, warps, stages = next(
        c for largest, c in _CONFIGS[kernel, dtype == torch.float32] if block_d <= largest
    )
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, num_warps=warps, num_stages=stages)


def _grid(rows: int, n: int, block: int) -> tuple:
    """cdiv(n, block) programs per row, on grid x (see _program)."""
    programs = rows * triton.cdiv(n, block)
    if programs > GRID_X_MAX:
        raise ValueError(f"subsampled_attention on the GPU: {programs} programs exceed CUDA's grid")
    return (programs,)


def _common(q, k, idx, kpos, qpos, causal):
    B, H, Lq, D = q.shape
    flags = dict(
        PER_Q_HEAD=idx.shape[1] == H,
        HAS_KPOS=kpos is not None,
        HAS_QPOS=qpos is not None,
        CAUSAL=bool(causal),
        UPCAST=os.environ.get("TRITON_INTERPRET") == "1",
        F32_PRECISION=_f32_precision(q.dtype),
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
    cfg = launch_config("fwd", D, q.dtype)
    _fwd_kernel[_grid(B * H, Lq, cfg["BLOCK_M"])](
        q, k, v, idx, kpos, qpos, res, lse, scale, H, Hkv, Lq, Lk, S, D, **flags, **cfg
    )
    out.copy_(res)


def backward(q, k, v, idx, kpos, qpos, out, lse, dout, dq, dk, dv, scale, causal):
    (B, H, Hkv, Lq, Lk, S, D), flags, idx, kpos, qpos = _common(q, k, idx, kpos, qpos, causal)
    dk.zero_()
    dv.zero_()
    if q.numel() == 0 or S == 0:
        dq.zero_()
        return
    q, k, v, out, dout = (t.contiguous() for t in (q, k, v, out, dout))
    res = torch.empty_like(q)
    cfg = launch_config("dq", D, q.dtype)
    _dq_kernel[_grid(B * H, Lq, cfg["BLOCK_M"])](
        q, k, v, idx, kpos, qpos, out, lse, dout, res, scale, H, Hkv, Lq, Lk, S, D, **flags, **cfg
    )
    dq.copy_(res)
    Hi = idx.shape[1]
    cfg = launch_config("dkv", D, q.dtype)
    dk_s = torch.empty(B, Hi, S, cfg["BLOCK_D"], dtype=torch.float32, device=q.device)
    dv_s = torch.empty_like(dk_s)
    _dkv_kernel[_grid(B * Hi, S, cfg["BLOCK_N"])](
        q, k, v, idx, kpos, qpos, out, lse, dout, dk_s, dv_s, scale, H, Hkv, Lq, Lk, S, D, **flags, **cfg
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
