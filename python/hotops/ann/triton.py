"""Triton ADC scan with a fused top-k: the GPU twin of ann_pq_scan / ann_ivf_scan (csrc/ann).

One program per (query, list): it walks the list's rows in tiles of BLOCK codes, scores a tile
with one gather per (row, sub-space) from the query's table (plus, for l2 IVF, the list's table:
faiss's precomputed-table identity ||q - c - b||^2 = ||q - c||^2 + [||b||^2 - 2<q, b>] + 2<c, b>,
summed per sub-space), and keeps its best KP in registers: a tile's top-KP is merged with the
running top-KP by one more bitonic top-k. Only KP candidates per (query, list) reach memory; a
last torch.topk merges them. A flat index is the same kernel over equal slices of its codes.

Score and row travel together as one int64 key: the score's bits made order-preserving as a
signed int32 (negative floats get their magnitude bits flipped) in the high half, the row in the
low half, so the bitonic top-k moves both and ties break by row. Runs on the CPU under
TRITON_INTERPRET=1 for tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 256  # codes per tile (fewer when m > 32: TILE_ELEMENTS codes per tile)
TILE_ELEMENTS = 8192
FLAT_SLICE = 4096  # rows per program in a flat scan (more programs than queries alone give)
MAX_CANDIDATE_BYTES = 256 << 20  # queries are processed in batches whose candidate keys fit this


@triton.jit
def _adc_topk_kernel(
    QT,
    LT,
    BIAS,
    PROBES,
    OFFSETS,
    CODES,
    ALLOW,
    OUT,
    nprobe,
    M: tl.constexpr,
    KSUB: tl.constexpr,
    MP: tl.constexpr,
    KP: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_LT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_ALLOW: tl.constexpr,
):
    # one-dimensional grid, the probes of a query side by side: CUDA caps grid y at 65,535, which
    # a flat index's slices (FLAT_SLICE rows each) pass from 268M codes
    pid = tl.program_id(0).to(tl.int64)
    q = pid // nprobe
    p = pid % nprobe
    lst = tl.load(PROBES + q * nprobe + p)
    start = tl.load(OFFSETS + tl.maximum(lst, 0))
    end = tl.load(OFFSETS + tl.maximum(lst, 0) + 1)
    end = tl.where(lst < 0, start, end)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(BIAS + q * nprobe + p)
    sub = tl.arange(0, MP)
    sub_in = sub < M
    worst = tl.full((KP,), 0x7FFFFFFFFFFFFFFF, tl.int64)
    best = worst
    for b in range(start, end, BLOCK):
        rows = b + tl.arange(0, BLOCK).to(tl.int64)
        inside = rows < end
        mask = inside[:, None] & sub_in[None, :]
        codes = tl.load(CODES + rows[:, None] * M + sub[None, :], mask=mask, other=0).to(tl.int32)
        at = sub[None, :] * KSUB + codes
        t = tl.load(QT + q * (M * KSUB) + at, mask=mask, other=0.0)
        if HAS_LT:
            t += tl.load(LT + lst * (M * KSUB) + at, mask=mask, other=0.0)
        score = tl.sum(t, axis=1) + bias
        keep = inside
        if HAS_ALLOW:
            keep = keep & (tl.load(ALLOW + rows, mask=inside, other=0) != 0)
        bits = score.to(tl.int32, bitcast=True)
        # -0.0 is +0.0 (equal scores, as the C++ scan compares them: the tie breaks by row) and
        # every NaN is the positive one, after +inf as torch.topk has it: a NaN's sign bit must
        # not rank it first. In the bits, where no float rule can fold the selects away.
        bits = tl.where(score == 0.0, 0, bits)
        bits = tl.where(score != score, 0x7FC00000, bits)
        bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # order-preserving as signed int32
        key = (bits.to(tl.int64) << 32) | rows
        key = tl.where(keep, key, 0x7FFFFFFFFFFFFFFF)
        tile = tl.topk(key, KP, descending=False)
        best = tl.topk(tl.reshape(tl.join(best, tile), (2 * KP,)), KP, descending=False)
    tl.store(OUT + (q * nprobe + p) * KP + tl.arange(0, KP), best)


def _decode(keys: torch.Tensor):
    """int64 keys -> (float32 scores, int64 rows); empty keys -> (+inf, -1)."""
    empty = keys == torch.iinfo(torch.int64).max
    hi = (keys >> 32).to(torch.int32)
    score = (hi ^ ((hi >> 31) & 0x7FFFFFFF)).view(torch.float32)
    rows = keys & 0xFFFFFFFF
    return score.masked_fill(empty, float("inf")), rows.masked_fill(empty, -1)


def adc_topk(
    qtables: torch.Tensor,
    codes: torch.Tensor,
    offsets: torch.Tensor,
    probes: torch.Tensor,
    k: int,
    list_tables=None,
    bias=None,
    allow=None,
):
    """The k lowest ADC scores per query and their rows (ascending; +inf / -1 past the last).

    qtables (nq, m, ksub) float32: per-query tables; codes (N, m) uint8 (< ksub), rows grouped by
    list; offsets (nlist + 1,) int64; probes (nq, nprobe) int64 lists to scan (-1 = none);
    list_tables (nlist, m, ksub) float32 added per list; bias (nq, nprobe) float32 per probe;
    allow (N,) uint8 row filter. All on one device (CUDA, or the CPU under TRITON_INTERPRET=1).
    score(row in list l, query q) = bias[q, p] + sum_s qtables[q, s, code_s] + list_tables[l, s, code_s].
    """
    qtables, codes, offsets, probes = (t.contiguous() for t in (qtables, codes, offsets, probes))
    list_tables, bias, allow = (t.contiguous() if t is not None else None for t in (list_tables, bias, allow))
    nq, m, ksub = qtables.shape
    N, nprobe = codes.shape[0], probes.shape[1]
    if N >= 1 << 32:
        raise ValueError(f"the GPU scan addresses rows with 32 bits; {N} codes are too many")
    kp, mp = max(triton.next_power_of_2(k), 16), triton.next_power_of_2(m)
    block = max(kp, min(BLOCK, TILE_ELEMENTS // mp))  # a (block, mp) tile of codes stays in registers
    score = torch.full((nq, k), float("inf"), dtype=torch.float32, device=qtables.device)
    rows = torch.full((nq, k), -1, dtype=torch.int64, device=qtables.device)
    batch = max(1, MAX_CANDIDATE_BYTES // (8 * kp * max(nprobe, 1)))
    for q0 in range(0, nq if N and nprobe else 0, batch):
        q1 = min(nq, q0 + batch)
        keys = torch.empty((q1 - q0, nprobe, kp), dtype=torch.int64, device=qtables.device)
        _adc_topk_kernel[((q1 - q0) * nprobe,)](
            qtables[q0:q1],
            list_tables if list_tables is not None else qtables,
            bias[q0:q1] if bias is not None else qtables,
            probes[q0:q1],
            offsets,
            codes,
            allow if allow is not None else codes,
            keys,
            nprobe,
            M=m,
            KSUB=ksub,
            MP=mp,
            KP=kp,
            BLOCK=block,
            HAS_LT=list_tables is not None,
            HAS_BIAS=bias is not None,
            HAS_ALLOW=allow is not None,
        )
        keys = keys.reshape(q1 - q0, -1)
        top = torch.topk(keys, min(k, keys.shape[1]), dim=1, largest=False, sorted=True).values
        s, r = _decode(top)
        score[q0:q1, : s.shape[1]], rows[q0:q1, : r.shape[1]] = s, r
    return score, rows


def flat_slices(N: int, nq: int, device) -> tuple:
    """A flat index as lists: (offsets, probes) cutting its N rows into FLAT_SLICE-row slices
    that every query scans."""
    n = max(1, -(-N // FLAT_SLICE))
    offsets = torch.arange(n + 1, device=device, dtype=torch.int64).mul_(FLAT_SLICE).clamp_(max=N)
    return offsets, torch.arange(n, device=device, dtype=torch.int64).expand(nq, n).contiguous()
