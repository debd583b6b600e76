"""Triton kernels of the codebook family (the GPU twin of csrc/codebook/cpu.cpp).

Every kernel dequantizes tiles of the weight where it uses them, from the packed codes (see
``format.pack_codes``): a tile of 16·b stored rows by BLOCK_J input groups is b runs of
BLOCK_J · num_codebooks · 16 contiguous bytes, so code loads are fully coalesced. A codeword is
gathered from its row group's codebook with one vector load: the codebooks of a layer are a few
KiB (256 codewords x in_group x num_codebooks per group), so after the first touch every gather
hits L1, the same SRAM and bandwidth as shared memory. The dense weight never exists in global
memory.

* ``_gemv_kernel`` (batch <= GEMV_MAX_BATCH): one program per 16-row block of stored rows and
  slice of the inputs (``gemv_splits``); float32 products and accumulators on the CUDA cores, one
  batch row at a time so registers hold one weight tile. Bound by instruction issue, then the L1
  gathers, then the code stream (docs/codebook.md, "GPU (Triton)"; docs/notes/codebook.md).
* ``_gemm_kernel``: one program per (block of batch rows, block of stored rows); the dequantized
  weight tile is cast to the activations' dtype and multiplied on the tensor cores (tl.dot, float32
  accumulators; float32 activations use 3xTF32, as accurate as float32 FMAs).
* ``_input_grad_kernel``: dx = dy W for the backward pass, one program per (block of batch rows,
  block of inputs) walking the stored rows: the same tiles, multiplied the other way.

Per-row scales are applied to the accumulators (forward) or to dy (backward); the row
permutation is applied where outputs are stored (forward) or dy is loaded (backward). The row
group of each stored row is found by a binary search of group_ptr inside the kernel: no extra
launch, no host synchronisation. Codes may be uint8 or int16 (read as unsigned 16-bit: codebooks
of up to 65536 codewords). Runs on the CPU under TRITON_INTERPRET=1 for tests, where the
autotuners are bypassed for one small configuration.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from hotops.codebook.format import ROW_BLOCK

GEMV_MAX_BATCH = 8  # above this the weight tile is reused enough for the tensor cores to pay
# The GEMV's programs are 16-row blocks (one run of packed codes); where they are too few to keep
# the GPU's loads in flight (4096 rows: 256 blocks on 132 SMs), the inputs are split as well,
# up to this many programs per SM, each slice at least GEMV_MIN_SPLIT inputs.
GEMV_PROGRAMS_PER_SM = 4
GEMV_MIN_SPLIT = 512
GEMV_MAX_SPLITS = 8


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ------------------------------------------------------------------ shared device functions


@triton.jit
def _row_groups(GROUP_PTR, rows, num_groups, LOG_GROUPS: tl.constexpr):
    """The row group of each stored row: the largest o < num_groups with group_ptr[o] <= row,
    by binary lifting (group_ptr rises; empty groups are skipped)."""
    grp = tl.zeros_like(rows)
    for i in tl.static_range(LOG_GROUPS):
        cand = grp + (1 << (LOG_GROUPS - 1 - i))
        ok = cand < num_groups
        start = tl.load(GROUP_PTR + cand, mask=ok, other=0)
        grp = tl.where(ok & (start <= rows), cand, grp)
    return grp


@triton.jit
def _codewords(
    CODES,
    CODEBOOKS,
    grp,
    n0,
    j0,
    num_blocks,
    J,
    C,
    M: tl.constexpr,
    G: tl.constexpr,
    CODE_MASK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    """Unscaled float32 weight of stored rows n0 .. n0 + BLOCK_N (n0 a multiple of 16), input
    groups j0 .. j0 + BLOCK_J: (BLOCK_N, BLOCK_J, G), zeros past the last input group."""
    local = tl.arange(0, BLOCK_N)
    blocks = (n0 + local) // 16
    groups = j0 + tl.arange(0, BLOCK_J)
    inside = groups < J
    code_mask = (blocks < num_blocks)[:, None] & inside[None, :]
    for m in tl.static_range(M):
        # packed[block, j * M + m, lane] holds the code of row 16 * block + lane: runs of 16 bytes
        off = (blocks.to(tl.int64)[:, None] * (J * M) + groups[None, :] * M + m) * 16 + (local % 16)[:, None]
        codes = tl.load(CODES + off, mask=code_mask, other=0).to(tl.int32) & CODE_MASK
        word = ((grp[:, None] * M + m) * C + codes) * G
        term = tl.load(
            CODEBOOKS + word[:, :, None] + tl.arange(0, G)[None, None, :],
            mask=inside[None, :, None],
            other=0.0,
        ).to(tl.float32)
        if m == 0:  # (not zeros + term: that is an add per element the compiler keeps)
            words = term
        else:
            words += term
    return words


@triton.jit
def _weight_tile(
    CODES,
    CODEBOOKS,
    grp,
    n0,
    j0,
    num_blocks,
    J,
    C,
    M: tl.constexpr,
    G: tl.constexpr,
    CODE_MASK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    """_codewords as a (BLOCK_N, BLOCK_J·G) matrix tile."""
    words = _codewords(CODES, CODEBOOKS, grp, n0, j0, num_blocks, J, C, M, G, CODE_MASK, BLOCK_N, BLOCK_J)
    return tl.reshape(words, (BLOCK_N, BLOCK_J * G))


@triton.jit
def _store_outputs(
    acc,
    SCALES,
    PERM,
    BIAS,
    OUT,
    batch,
    rows,
    B,
    N,
    stride_ob,
    add_bias,
    HAS_PERM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INTERPRETED: tl.constexpr,
    ATOMIC: tl.constexpr = False,
):
    """out[b, perm[r]] = acc[b, r] * scales[r] + bias[perm[r]] for a (batch, stored rows) tile;
    ATOMIC adds it to float32 outputs instead (a split of the input dimension), the bias only
    where add_bias is set (the first split)."""
    row_ok = rows < N
    y = acc * tl.load(SCALES + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
    col = tl.load(PERM + rows, mask=row_ok, other=0) if HAS_PERM else rows
    if HAS_BIAS:
        bias = tl.load(BIAS + col, mask=row_ok, other=0.0).to(tl.float32)
        if ATOMIC:
            bias = tl.where(add_bias, bias, 0.0)
        y += bias[None, :]
    where = OUT + batch.to(tl.int64)[:, None] * stride_ob + col[None, :]
    mask = (batch < B)[:, None] & row_ok[None, :]
    if ATOMIC:
        tl.atomic_add(where, y, mask=mask)
    else:
        tl.store(where, _to(y, OUT.dtype.element_ty, INTERPRETED), mask=mask)


@triton.jit
def _tile(per_batch_block):
    """(tile, batch block) of this program of a one-dimensional grid, per_batch_block tiles of one
    batch block side by side (they share its rows of x or dy): CUDA caps grid y at 65,535, which
    batch blocks alone pass from about a million rows; x goes to 2^31 - 1."""
    pid = tl.program_id(0)
    return pid % per_batch_block, pid // per_batch_block


@triton.jit
def _to(v, DTYPE: tl.constexpr, INTERPRETED: tl.constexpr):
    """float32 v in DTYPE, rounded to nearest even as the GPU does; the interpreter truncates
    float32 -> bfloat16 (whatever the rounding asked), so there the rounding is done in bits."""
    if DTYPE == tl.float32:
        return v
    if INTERPRETED and DTYPE == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(DTYPE)
    return v.to(DTYPE)


@triton.jit
def _dot(a, b, acc, INTERPRETED: tl.constexpr):
    """acc + a b on the tensor cores, 3xTF32 for float32 inputs (as accurate as float32 FMAs);
    in the interpreter, whose low-precision dot is wrong, in float32 on the same values."""
    if INTERPRETED:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="tf32x3")
    return tl.dot(a, b, acc)


# ------------------------------------------------------------------ kernels


@triton.jit
def _gemv_kernel(
    X,
    CODES,
    CODEBOOKS,
    SCALES,
    GROUP_PTR,
    PERM,
    BIAS,
    OUT,
    B,
    N,
    J,
    C,
    num_groups,
    stride_xb,
    stride_ob,
    SPLIT_K: tl.constexpr,
    M: tl.constexpr,
    G: tl.constexpr,
    CODE_MASK: tl.constexpr,
    LOG_GROUPS: tl.constexpr,
    HAS_PERM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INTERPRETED: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BATCH_BUCKET,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Program (i, s): stored rows i·BLOCK_N ... and the s-th of SPLIT_K slices of the inputs
    (SPLIT_K > 1: float32 outputs, added atomically)."""
    BLOCK_J: tl.constexpr = BLOCK_K // G
    n0 = tl.program_id(0) * BLOCK_N
    split = tl.program_id(1)
    rows = n0 + tl.arange(0, BLOCK_N)
    batch = tl.arange(0, BLOCK_B)
    grp = _row_groups(GROUP_PTR, rows, num_groups, LOG_GROUPS)
    num_blocks = tl.cdiv(N, 16)
    per_split = tl.cdiv(tl.cdiv(J, BLOCK_J), SPLIT_K) * BLOCK_J  # whole tiles: none straddles two slices
    # partial sums per (batch row, stored row, input group of the tile): the sum across input
    # groups (across threads) is taken once, after the loop, not per tile
    acc = tl.zeros((BLOCK_B, BLOCK_N, BLOCK_J), tl.float32)
    for j0 in range(split * per_split, tl.minimum(J, (split + 1) * per_split), BLOCK_J):
        w = _codewords(CODES, CODEBOOKS, grp, n0, j0, num_blocks, J, C, M, G, CODE_MASK, BLOCK_N, BLOCK_J)
        k = (j0 + tl.arange(0, BLOCK_J))[:, None] * G + tl.arange(0, G)[
            None, :
        ]  # (BLOCK_J, G), as w's last axes
        for b in tl.static_range(BLOCK_B):  # one batch row at a time: registers hold one tile
            row = tl.minimum(b, B - 1)  # rows past B repeat the last one; their outputs are not stored
            x = tl.load(X + row * stride_xb + k, mask=k < J * G, other=0.0).to(tl.float32)
            part = tl.sum(w * x[None, :, :], 2)
            acc = tl.where(batch[:, None, None] == b, acc + part[None, :, :], acc)
    acc = tl.sum(acc, 2)
    _store_outputs(
        acc,
        SCALES,
        PERM,
        BIAS,
        OUT,
        batch,
        rows,
        B,
        N,
        stride_ob,
        split == 0,
        HAS_PERM,
        HAS_BIAS,
        INTERPRETED,
        SPLIT_K > 1,
    )


@triton.jit
def _gemm_kernel(
    X,
    CODES,
    CODEBOOKS,
    SCALES,
    GROUP_PTR,
    PERM,
    BIAS,
    OUT,
    B,
    N,
    J,
    C,
    num_groups,
    stride_xb,
    stride_ob,
    M: tl.constexpr,
    G: tl.constexpr,
    CODE_MASK: tl.constexpr,
    LOG_GROUPS: tl.constexpr,
    HAS_PERM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INTERPRETED: tl.constexpr,
    BATCH_BUCKET,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    BLOCK_J: tl.constexpr = BLOCK_K // G
    pid_n, pid_b = _tile(tl.cdiv(N, BLOCK_N))
    n0 = pid_n * BLOCK_N
    rows = n0 + tl.arange(0, BLOCK_N)
    batch = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    grp = _row_groups(GROUP_PTR, rows, num_groups, LOG_GROUPS)
    num_blocks = tl.cdiv(N, 16)
    x_rows = X + batch.to(tl.int64)[:, None] * stride_xb
    acc = tl.zeros((BLOCK_B, BLOCK_N), tl.float32)
    for j0 in range(0, J, BLOCK_J):
        w = _weight_tile(CODES, CODEBOOKS, grp, n0, j0, num_blocks, J, C, M, G, CODE_MASK, BLOCK_N, BLOCK_J)
        k = j0 * G + tl.arange(0, BLOCK_J * G)
        x = tl.load(x_rows + k[None, :], mask=(batch < B)[:, None] & (k < J * G)[None, :], other=0.0)
        acc = _dot(x, tl.trans(_to(w, X.dtype.element_ty, INTERPRETED)), acc, INTERPRETED)
    _store_outputs(
        acc, SCALES, PERM, BIAS, OUT, batch, rows, B, N, stride_ob, True, HAS_PERM, HAS_BIAS, INTERPRETED
    )


@triton.jit
def _input_grad_kernel(
    DY,
    CODES,
    CODEBOOKS,
    SCALES,
    GROUP_PTR,
    PERM,
    DX,
    B,
    N,
    J,
    C,
    num_groups,
    stride_dyb,
    stride_dxb,
    M: tl.constexpr,
    G: tl.constexpr,
    CODE_MASK: tl.constexpr,
    LOG_GROUPS: tl.constexpr,
    HAS_PERM: tl.constexpr,
    INTERPRETED: tl.constexpr,
    BATCH_BUCKET,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """dx[b, k] = sum_r dy[b, perm[r]] scales[r] W_unscaled[r, k], over all stored rows r."""
    BLOCK_J: tl.constexpr = BLOCK_K // G
    pid_k, pid_b = _tile(tl.cdiv(J * G, BLOCK_K))
    j0 = pid_k * BLOCK_J
    batch = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    num_blocks = tl.cdiv(N, 16)
    dy_rows = DY + batch.to(tl.int64)[:, None] * stride_dyb
    acc = tl.zeros((BLOCK_B, BLOCK_J * G), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        grp = _row_groups(GROUP_PTR, rows, num_groups, LOG_GROUPS)
        w = _weight_tile(CODES, CODEBOOKS, grp, n0, j0, num_blocks, J, C, M, G, CODE_MASK, BLOCK_N, BLOCK_J)
        col = tl.load(PERM + rows, mask=row_ok, other=0) if HAS_PERM else rows
        s = tl.load(SCALES + rows, mask=row_ok, other=0.0).to(tl.float32)
        dy = tl.load(dy_rows + col[None, :], mask=(batch < B)[:, None] & row_ok[None, :], other=0.0)
        dy = _to(dy.to(tl.float32) * s[None, :], DY.dtype.element_ty, INTERPRETED)
        acc = _dot(dy, _to(w, DY.dtype.element_ty, INTERPRETED), acc, INTERPRETED)
    k = j0 * G + tl.arange(0, BLOCK_J * G)
    tl.store(
        DX + batch.to(tl.int64)[:, None] * stride_dxb + k[None, :],
        _to(acc, DX.dtype.element_ty, INTERPRETED),
        mask=(batch < B)[:, None] & (k < J * G)[None, :],
    )


# ------------------------------------------------------------------ autotuning


def _config(num_warps, num_stages=2, **blocks):
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)


# Few configs on purpose: each is a compile, and every (shape, format, batch bucket) tunes once.
# BLOCK_K counts inputs (BLOCK_K / in_group input groups a tile). None spills on sm_90 (ptxas -v,
# 2x8 format, fp16 and fp32 activations); the larger tiles dropped from these lists did. Other
# formats are not spill-free everywhere: with float32 activations the input gradient's configs
# spilled 1,028 B at in_group 1 and 8-140 B in 1x8 (sm_90; the autotuner picks among them by
# time, and the test of tests/test_codebook_triton.py covers 2x8 only).
_GEMV_CONFIGS = [_config(w, BLOCK_N=16, BLOCK_K=k) for w, k in ((2, 128), (4, 128), (4, 256), (8, 256))]
_GEMM_CONFIGS = [
    _config(w, 3, BLOCK_B=b, BLOCK_N=n, BLOCK_K=k)
    for b, n, w, k in ((16, 64, 4, 32), (16, 64, 4, 64), (64, 64, 4, 32), (64, 64, 4, 64), (128, 128, 8, 32))
]
_GRAD_CONFIGS = [
    _config(w, 3, BLOCK_B=b, BLOCK_N=n, BLOCK_K=k)
    for b, n, w, k in (
        (16, 64, 4, 64),
        (16, 64, 4, 128),
        (64, 64, 4, 64),
        (128, 64, 8, 64),
        (128, 64, 8, 128),
    )
]
_INTERPRETER = dict(BLOCK_B=16, BLOCK_N=16, BLOCK_K=16)  # tl.dot's smallest tiles: the interpreter is slow

_KEY = ["N", "J", "G", "M", "BATCH_BUCKET"]
_gemv = triton.autotune(_GEMV_CONFIGS, key=_KEY, reset_to_zero=["OUT"])(
    _gemv_kernel
)  # split: OUT accumulates
_gemm = triton.autotune(_GEMM_CONFIGS, key=_KEY)(_gemm_kernel)
_input_grad = triton.autotune(_GRAD_CONFIGS, key=_KEY)(_input_grad_kernel)


def _launch(tuned, plain, grid, *args, **meta):
    """The autotuned kernel on a GPU; in the interpreter, the plain kernel with tiny tiles."""
    if _interpreting():
        blocks = {k: v for k, v in _INTERPRETER.items() if k in plain.arg_names and k not in meta}
        plain[grid(blocks)](*args, **meta, **blocks)
    else:
        tuned[grid](*args, **meta)


# ------------------------------------------------------------------ host side


def _format_meta(codes, codebooks, batch):
    O, M, C, G = codebooks.shape
    # BATCH_BUCKET: read by the tuners' key only, so each power-of-two batch bucket tunes once
    return dict(
        M=M,
        G=G,
        CODE_MASK=(1 << (8 * codes.element_size())) - 1,
        LOG_GROUPS=(O - 1).bit_length(),
        BATCH_BUCKET=triton.next_power_of_2(batch),
        INTERPRETED=_interpreting(),
    ), (C, O)


def _contiguous(*tensors):
    """The kernels index every part densely (no-ops for a CodebookWeight's own tensors)."""
    return tuple(t.contiguous() if t is not None else None for t in tensors)


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def gemv_splits(N: int, K: int, device: torch.device) -> int:
    """Slices of the input dimension for the GEMV: 1 off the GPU."""
    if device.type != "cuda":
        return 1
    want = triton.cdiv(GEMV_PROGRAMS_PER_SM * _multiprocessors(device), triton.cdiv(N, ROW_BLOCK))
    return max(1, min(want, K // GEMV_MIN_SPLIT, GEMV_MAX_SPLITS))


def matmul(
    x: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    group_ptr: torch.Tensor,
    perm: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    splits: Optional[int] = None,
) -> torch.Tensor:
    """x (B, K) with unit inner stride -> (B, N) in x's dtype. ``splits`` overrides gemv_splits."""
    B, N = x.shape[0], scales.shape[0]
    J, G = codes.shape[1] // codebooks.shape[1], codebooks.shape[3]
    out = torch.empty(B, N, dtype=x.dtype, device=x.device)
    if B == 0 or N == 0:
        return out
    codes, codebooks, scales, group_ptr, perm, bias = _contiguous(
        codes, codebooks, scales, group_ptr, perm, bias
    )
    meta, (C, O) = _format_meta(codes, codebooks, B)
    meta.update(HAS_PERM=perm is not None, HAS_BIAS=bias is not None)
    operands = (
        x,
        codes,
        codebooks,
        scales,
        group_ptr,
        perm if perm is not None else scales,
        bias if bias is not None else scales,
    )
    if B <= GEMV_MAX_BATCH:
        splits = splits or gemv_splits(N, J * G, x.device)
        if splits > 1:  # the slices' partial sums meet in float32
            out = torch.zeros(B, N, dtype=torch.float32, device=x.device)
        _launch(
            _gemv,
            _gemv_kernel,
            lambda m: (triton.cdiv(N, m["BLOCK_N"]), splits),
            *operands,
            out,
            B,
            N,
            J,
            C,
            O,
            x.stride(0),
            out.stride(0),
            SPLIT_K=splits,
            BLOCK_B=triton.next_power_of_2(B),
            **meta,
        )
        return out.to(x.dtype)
    _launch(
        _gemm,
        _gemm_kernel,
        lambda m: (triton.cdiv(N, m["BLOCK_N"]) * triton.cdiv(B, m["BLOCK_B"]),),  # see _tile
        *operands,
        out,
        B,
        N,
        J,
        C,
        O,
        x.stride(0),
        out.stride(0),
        **meta,
    )
    return out


def input_grad(
    dy: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    group_ptr: torch.Tensor,
    perm: Optional[torch.Tensor],
) -> torch.Tensor:
    """dy (B, N) with unit inner stride -> dx = dy W, (B, K) in dy's dtype."""
    B, N = dy.shape
    J = codes.shape[1] // codebooks.shape[1]
    G = codebooks.shape[3]
    dx = torch.empty(B, J * G, dtype=dy.dtype, device=dy.device)
    if B == 0 or J == 0:
        return dx
    if N == 0:
        return dx.zero_()
    codes, codebooks, scales, group_ptr, perm = _contiguous(codes, codebooks, scales, group_ptr, perm)
    meta, (C, O) = _format_meta(codes, codebooks, B)
    meta.update(HAS_PERM=perm is not None)
    _launch(
        _input_grad,
        _input_grad_kernel,
        lambda m: (triton.cdiv(J * G, m["BLOCK_K"]) * triton.cdiv(B, m["BLOCK_B"]),),  # see _tile
        dy,
        codes,
        codebooks,
        scales,
        group_ptr,
        perm if perm is not None else scales,
        dx,
        B,
        N,
        J,
        C,
        O,
        dy.stride(0),
        dx.stride(0),
        **meta,
    )
    return dx
