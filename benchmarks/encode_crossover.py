"""Where the codebook lookup tables and the sparse CSR kernel stop beating torch's dense GEMM
(issue 17): every path of each layer timed on the same input, against dense ``F.linear``, across
token counts, with the path each layer's rule picks.

    PYTHONPATH=python python benchmarks/encode_crossover.py [--threads 1 2] [--tokens 1 64 5120]
        [--shapes 384x384 1536x384] [--family codebook sparse] [--sparsity 0.6 0.9] [--rounds 5]
        [--min-time 0.1]

Shapes are out_features x in_features (default all-MiniLM-L6-v2's three Linear shapes). Codebook
formats 1x8/4 and 1x8/2 (what ``compress`` picks for MiniLM) and 2x8; sparse: a 90 % magnitude
mask (unstructured: CSR), or each of ``--sparsity``. Columns: CPU ms per call
(``time.process_time`` over the process's threads, the sides alternated in one process, best of
``--rounds`` rounds of >= ``--min-time`` s each: a machine shared with other jobs inflates wall
time much more than CPU time), the path the rule picks, and whether that is the faster of the
layer's two paths. Random weights: the time does not depend on the values.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from hotops.codebook import CodebookWeight
from hotops.codebook import op as cb_op
from hotops.sparse import SparseLinear
from hotops.sparse import dispatch as sp_dispatch

CODEBOOK_FORMATS = {"1x8/4": (4, 1), "1x8/2": (2, 1), "2x8": (8, 2)}  # name: (in_group, num_codebooks)
MINILM = ((384, 384), (1536, 384), (384, 1536))
TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


def best_times(fns: dict, rounds: int, min_time: float) -> dict:
    """CPU seconds per call of each closure, alternated, best of `rounds` rounds."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, f in fns.items():
            f()
            calls, t0 = 0, time.process_time()
            while True:
                f()
                calls += 1
                dt = time.process_time() - t0
                if dt >= min_time:
                    break
            best[name] = min(best[name], dt / calls)
    return best


def codebook_weight(N: int, K: int, g: int, M: int) -> CodebookWeight:
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 256, (N, K // g, M), dtype=torch.uint8, generator=gen)
    codebooks = torch.randn(1, M, 256, g, generator=gen) / (M * K) ** 0.5
    perm = torch.randperm(N, generator=gen)  # compress permutes rows: time the gather too
    return CodebookWeight(codes, codebooks, torch.rand(N, generator=gen) + 0.5, perm=perm)


def codebook_rows(N, K, tokens, rounds, min_time):
    bias = torch.randn(N)
    for name, (g, M) in CODEBOOK_FORMATS.items():
        w = codebook_weight(N, K, g, M)
        args = (w.codes, w.codebooks, w.scales, w.group_ptr, w.perm, bias)
        dense = w.dequantize()
        for T in tokens:
            x = torch.randn(T, K)

            def forced(tables: bool, x=x):
                def run():
                    saved = cb_op.use_tables
                    cb_op.use_tables = lambda *a, **k: tables
                    try:
                        return cb_op._cpu_matmul(x, *args)
                    finally:
                        cb_op.use_tables = saved

                return run

            ref = F.linear(x, dense, bias)
            for tables in (True, False):
                torch.testing.assert_close(forced(tables)(), ref, rtol=1e-3, atol=1e-3)
            t = best_times(
                {
                    "dense": lambda x=x: F.linear(x, dense, bias),
                    "tables": forced(True),
                    "gemm": forced(False),
                },
                rounds,
                min_time,
            )
            picked = "tables" if cb_op.use_tables(T, N, g, M) else "gemm"
            yield (name, T, t, picked)


def sparse_rows(N, K, tokens, rounds, min_time, sparsity=0.9):
    torch.manual_seed(0)
    lin = torch.nn.Linear(K, N)
    layers = {p: SparseLinear.from_dense(lin, sparsity=sparsity, policy=p) for p in ("sparse", "dense")}
    density = layers["sparse"].density
    for T in tokens:
        x = torch.randn(T, K)
        with torch.inference_mode():
            t = best_times(
                {
                    "dense": lambda x=x: F.linear(x, lin.weight, lin.bias),
                    "sparse": lambda x=x: layers["sparse"](x),
                    "dense path": lambda x=x: layers["dense"](x),
                },
                rounds,
                min_time,
            )
        picked = "sparse" if sp_dispatch.sparse_pays("linear", density, T) else "dense path"
        yield (f"CSR {sparsity:.0%}", T, t, picked)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    ap.add_argument("--shapes", nargs="+", default=[f"{n}x{k}" for n, k in MINILM], help="NxK")
    ap.add_argument("--family", nargs="+", default=["codebook", "sparse"], choices=["codebook", "sparse"])
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.9], help="sparse layers' sparsities")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-time", type=float, default=0.1)
    a = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes]
    for threads in a.threads:
        torch.set_num_threads(threads)
        print(f"\n{threads} thread(s), CPU ms per call (best of {a.rounds} alternated rounds)\n")
        print("| layer | N x K | tokens | dense F.linear | path A | path B | rule picks | faster path | ok |")
        print("|---|---|---|---|---|---|---|---|---|")
        for N, K in shapes:
            gens = []
            if "codebook" in a.family:
                gens.append(codebook_rows(N, K, a.tokens, a.rounds, a.min_time))
            if "sparse" in a.family:
                gens += [sparse_rows(N, K, a.tokens, a.rounds, a.min_time, s) for s in a.sparsity]
            for gen in gens:
                for name, T, t, picked in gen:
                    paths = [p for p in t if p != "dense"]
                    faster = min(paths, key=t.get)
                    cells = " | ".join(f"{p} {1e3 * t[p]:.3f}" for p in paths)
                    ok = "yes" if picked == faster or t[picked] <= 1.05 * t[faster] else "**no**"
                    print(
                        f"| {name} | {N}x{K} | {T} | {1e3 * t['dense']:.3f} | {cells} | {picked} | {faster} | {ok} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
