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


def sparse_pays(kind: str, density: float, rows: int = 0) -> bool:
    """The dispatch model: does the sparse kernel beat dense for this layer? ``kind`` is
    "linear" (with its batch ``rows``: fewer than 8 is a GEMV), "conv1x1", "conv" or
    "depthwise"."""
    if kind == "linear":
        kind = "gemv" if rows < 8 else "gemm"
    return density <= DENSITY_LIMIT[kind]


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


SIGNATURES_KEPT = 1024  # per layer: inputs of ever new shapes (token batches) must not grow it


def remember(table: dict, key, value) -> None:
    """table[key] = value (a layer's decision or check for one input signature), the oldest entry
    dropped past SIGNATURES_KEPT."""
    table[key] = value
    if len(table) > SIGNATURES_KEPT:
        del table[next(iter(table))]
