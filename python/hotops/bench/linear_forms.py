"""A Linear layer's CPU time in each form hotops gives it: dense (F.linear), codebook-compressed
(the formats `compress` picks: 1x8/4 = 2 bits and 1x8/2 = 4 bits per weight) and 90 % sparse on
each of SparseLinear's paths (CSR, 4x1 blocks, the dense path), at given shapes and token counts.

    python -m hotops.bench.linear_forms [--threads 1] [--reps 7]

The defaults are all-MiniLM-L6-v2's Linear shapes (attention projections 384 -> 384, FFN
384 -> 1536 and 1536 -> 384) at the token counts of encoding (texts per call x tokens per text);
docs/retrieval.md reads the table.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Sequence, Tuple

import torch

MINILM_SHAPES = ((384, 384), (384, 1536), (1536, 384))
HEADER = (
    "| tokens | in -> out | dense F.linear | codebook 1x8/4 | codebook 1x8/2 | sparse CSR "
    "| sparse 4x1 blocks | sparse layer, dense path |"
)


def _cpu_ms(f, x, reps: int) -> float:
    """One call's CPU time in ms (best of `reps`, after two warm-up calls), inference mode."""
    with torch.inference_mode():
        f(x)
        f(x)
        best = math.inf
        for _ in range(reps):
            c = time.process_time()
            f(x)
            best = min(best, time.process_time() - c)
    return 1e3 * best


def table(
    tokens: Sequence[int] = (64, 512, 5120),
    reps: int = 7,
    shapes: Sequence[Tuple[int, int]] = MINILM_SHAPES,
    progress: bool = True,
) -> str:
    """A markdown table, one row per (tokens, shape): one call's CPU time (best of `reps`, on this
    process's threads) of each form. Random weights (seed 0): time does not depend on the values.
    progress: print each row as it is measured."""
    from hotops.codebook import CodebookLinear
    from hotops.sparse import SparseLinear

    torch.manual_seed(0)
    rows = [
        f"{torch.get_num_threads()} thread(s), CPU ms per call (best of {reps})",
        "",
        HEADER,
        "|---|---|---|---|---|---|---|---|",
    ]
    for T in tokens:
        for K, N in shapes:
            lin, x = torch.nn.Linear(K, N), torch.randn(T, K)
            r = [_cpu_ms(lin, x, reps)]
            for g in (4, 2):
                cb = CodebookLinear.from_linear(
                    lin, bits_per_weight=8 / g, in_group=g, num_codebooks=1, iters=2
                )
                r.append(_cpu_ms(cb, x, reps))
            for kw in (dict(policy="sparse"), dict(policy="sparse", block=4), dict(policy="dense")):
                r.append(_cpu_ms(SparseLinear.from_dense(lin, sparsity=0.9, **kw), x, reps))
            rows.append(f"| {T} | {K} -> {N} | " + " | ".join(f"{v:.3f}" for v in r) + " |")
            if progress:
                print(rows[-1], flush=True)
    return "\n".join(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--reps", type=int, default=7, help="timed calls per form; the best counts")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    print(table(reps=a.reps))


if __name__ == "__main__":
    main()
