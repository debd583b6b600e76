"""The dense-or-sparse dispatch of the sparse modules: where the sparse kernels beat torch's
dense ones (the "model" policy) and the measurement the "auto" policy takes once per input
signature."""

from __future__ import annotations

import time
from typing import Callable, Tuple

import torch
from torch import Tensor

SPARSE, DENSE = "sparse (C++)", "dense (torch)"
POLICIES = ("auto", "model", "sparse", "dense")

# Densities (non-zeros / weight size) up to which the sparse kernels beat torch's dense ones on
# the CPU, read off the single-thread crossover table in docs/notes/sparse.md: a GEMV reads 4 bytes per
# weight densely against 8 per non-zero sparsely and gathers its inputs; batched products and 1x1
# convolutions turn each non-zero into vector FMAs over contiguous rows and win from about half
# sparse; k x k convolutions also pay for their im2col tiles; a depthwise convolution is cheap
# densely (9 FMAs per pixel, memory-bound): its direct sparse kernel, ~1 tap per channel at 90 %,
# wins from about 80 % sparse.
DENSITY_LIMIT = {"gemm": 0.4, "gemv": 0.2, "conv1x1": 0.4, "conv": 0.2, "depthwise": 0.2}

# Batched linear layers of many rows. The kernel multiplies x^T (in_features rows of `rows`
# floats, transposed on every call) in tiles of pixels that stay in L2 only while the rows of x^T
# are short: from a 4 KB page per row of x^T (LINEAR_PAGE_ROWS = 1024 float32 rows) each of a
# tile's source rows lies on its own page, a multiple of 4 KB apart at the batch sizes that are
# round numbers, and the rows alias in the caches' sets. There the sparse path's time per row
# grows 1.4-2x while dense GEMM's stays flat (one thread, 90 % sparse, all-MiniLM-L6-v2's
# 384 -> 384 and 1536 -> 384: 1.1-1.9x faster than dense up to 512 rows, 1.5-1.9x slower from
# 1024; benchmarks/encode_crossover.py, docs/sparse.md "Dense or sparse"). A cost model per row,
# in units of one dense multiply-add, decides those: a non-zero costs 1 / DENSITY_LIMIT["gemm"]
# (the in-cache crossover), every input feature LINEAR_XT_COST (its transposition and its reads
# of x^T) and every output LINEAR_Y_COST (the kernel's strided writes of y), against N * K
# for dense. Fitted at 90 and 98 % on MiniLM's shapes at 5120 rows: the N = 384 layers stay dense
# even at 98 %, 384 -> 1536 ties at 90 % and goes sparse from 95 %, and 4096 x 4096 and wider
# layers stay sparse (per-row costs of a few hundred multiply-adds against 16 M).
LINEAR_PAGE_ROWS = 4096 // 4
LINEAR_XT_COST = 350.0
LINEAR_Y_COST = 100.0


def sparse_pays(
    kind: str, density: float, rows: int = 0, in_features: int = 0, out_features: int = 0
) -> bool:
    """The dispatch model: does the sparse kernel beat dense for this layer? ``kind`` is
    "linear" (with its batch ``rows`` and its ``in_features`` and ``out_features``), "conv1x1",
    "conv" or "depthwise"."""
    if kind != "linear":
        return density <= DENSITY_LIMIT[kind]
    if rows < 8:
        return density <= DENSITY_LIMIT["gemv"]
    if rows < LINEAR_PAGE_ROWS or in_features <= 0 or out_features <= 0:
        return density <= DENSITY_LIMIT["gemm"]
    per_weight = density / DENSITY_LIMIT["gemm"] + LINEAR_XT_COST / out_features + LINEAR_Y_COST / in_features
    return per_weight < 1.0


def measure_pair(
    run_sparse: Callable[[], Tensor], run_dense: Callable[[], Tensor], repeats: int = 3
) -> Tuple[float, float]:
    """Seconds per call of each path, best of ``repeats`` taken alternately after one warm-up
    call each (the warm-up builds the dense weight cache and touches the buffers)."""
    best = [float("inf"), float("inf")]
    with torch.no_grad():
        run_sparse(), run_dense()
        for _ in range(repeats):
            for i, fn in enumerate((run_sparse, run_dense)):
                t0 = time.perf_counter()
                fn()
                best[i] = min(best[i], time.perf_counter() - t0)
    return best[0], best[1]
