"""AQLM layers on the CPU: hotops.codebook.from_aqlm's module against aqlm's own forward and fp32
dense F.linear, at Llama-7B shapes, batch 1 and 16, for AQLM's 2x8 (lookup-table kernel) and 1x16
(the 16-bit gather kernel; codebooks in fp32 as aqlm's CPU path needs, and in fp16 as published
checkpoints store them).

aqlm's CPU forward runs its numba lookup-table kernel for Kx8 layers only; it parallelises over
input groups, so its threads add into the same outputs unsynchronised, and its output is right
only with one numba thread: it is timed there (and its error at the default thread count is
printed). For 1x16 aqlm's CPU forward dequantizes the whole weight and calls F.linear.

Every side of a row runs interleaved call by call (medians of --repeats), so drift on a shared
machine hits all alike. Weights are random codes. "codes 0" is the same hotops module with every
code 0: each gather then hits one cached codeword, so its time is the kernel's floor without the
cost of gathering from L2 (the gap to it is what the random gathers cost).

--cpu-time runs everything on one thread (torch, hotops and numba) and reports process CPU time
per call instead of wall time: on a machine shared with other jobs it measures the work, not the
time slices the call waited for.

    PYTHONPATH=python python benchmarks/aqlm_cpu.py [--repeats 7] [--shapes 4096x4096,11008x4096] [--cpu-time]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numba
import torch
import torch.nn.functional as F
from aqlm import QuantizedLinear
from aqlm.utils import _dequantize_weight, pack_int_data, unpack_int_data

import hotops.codebook as hc
from hotops.bench.core import machine


def make_layer(N, K, M, nbits, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    layer = QuantizedLinear(K, N, 8, 1, M, nbits, bias=False, dtype=dtype)
    with torch.no_grad():
        layer.codebooks.copy_(torch.randn(layer.codebooks.shape, generator=gen) / (M * K) ** 0.5)
        layer.codes.data = pack_int_data(torch.randint(0, 2**nbits, layer.codes.shape, generator=gen), nbits)
        layer.scales.copy_(torch.rand(layer.scales.shape, generator=gen) + 0.5)
    return layer


def interleaved(fns, repeats, clock=time.perf_counter):
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = clock()
            f()
            times[k].append(clock() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def with_numba_threads(n, fn):
    def run():
        before = numba.get_num_threads()
        numba.set_num_threads(n)
        try:
            return fn()
        finally:
            numba.set_num_threads(before)

    return run


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--shapes", default="4096x4096,11008x4096", help="out x in features")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--cpu-time", action="store_true", help="one thread, process CPU time per call")
    args = p.parse_args()
    clock = time.perf_counter
    if args.cpu_time:
        torch.set_num_threads(1)
        numba.set_num_threads(1)
        clock = time.process_time
    m = machine()
    print(
        f"# {m.cpu}, {m.threads} threads, isa {m.isa}, torch {m.torch}, aqlm {m.peers['aqlm']}, "
        f"numba {m.peers['numba']}; torch.mm fp32 {m.gflops:.0f} GFLOP/s, copy {m.gbps:.1f} GB/s"
    )
    print(f"# {'process CPU time, one thread' if args.cpu_time else 'wall time'}, median of {args.repeats}")
    print(
        "| shape | batch | format | hotops ms | hotops, codes 0 | aqlm CPU forward ms | dense fp32 ms | hotops err |"
    )
    print("|---|---|---|---|---|---|---|---|")
    torch.set_grad_enabled(False)
    for shape in args.shapes.split(","):
        N, K = map(int, shape.split("x"))
        dense = torch.randn(N, K) / K**0.5
        for fmt, M, nbits, cdt in (
            ("2x8", 2, 8, torch.float32),
            ("1x16", 1, 16, torch.float32),
            ("1x16 fp16 codebook", 1, 16, torch.float16),
        ):
            layer = make_layer(N, K, M, nbits, cdt)
            codes = layer.codes.detach().clone()
            mod = hc.from_aqlm(layer)
            mod0 = hc.from_aqlm(layer)
            mod0.codes.zero_()
            for B in map(int, args.batches.split(",")):
                x = torch.randn(B, K, generator=torch.Generator().manual_seed(1))
                w64 = _dequantize_weight(
                    unpack_int_data(codes, nbits), layer.codebooks.double(), layer.scales.double()
                )
                ref = F.linear(x.double(), w64)
                err = (mod(x).double() - ref).abs().max().item() / ref.abs().max().item()
                fns = {
                    "hotops": lambda: mod(x),
                    "codes 0": lambda: mod0(x),
                    "dense": lambda: F.linear(x, dense),
                }
                note = ""
                if nbits == 8:
                    fns["aqlm"] = with_numba_threads(1, lambda: layer(x))
                    n = numba.config.NUMBA_NUM_THREADS
                    racy = (
                        max(
                            (with_numba_threads(n, lambda: layer(x))().double() - ref).abs().max().item()
                            for _ in range(3)
                        )
                        / ref.abs().max().item()
                    )
                    note = f" (numba, 1 thread; {n} threads: error {racy:.1e} of max|y|)"
                elif cdt == torch.float32:
                    fns["aqlm"] = lambda: layer(x)
                    note = " (dequantize + F.linear)"
                t = interleaved(fns, args.repeats, clock)
                aq = f"{t['aqlm']:.2f}{note}" if "aqlm" in t else "-"
                print(
                    f"| {N}x{K} | {B} | {fmt} | {t['hotops']:.2f} | {t['codes 0']:.2f} | {aq} | {t['dense']:.2f} "
                    f"| {err:.1e} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
