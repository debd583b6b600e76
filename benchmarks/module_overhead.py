"""Per-call cost of every hotops module at batch 1 (eager inference, torch.no_grad): what a small
layer pays around its kernel. One thread, CPU time per call, median of rounds.

    PYTHONPATH=python python benchmarks/module_overhead.py [--rounds 15] [--calls 2000]

Run it against two checkouts (PYTHONPATH=other/python ...) in alternation to compare them."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import hotops
from hotops.nn import CodebookLinear, InfoNCELoss, SparseConv2d, SparseLinear, SubsampledSelfAttention


def cases():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    yield (
        "CodebookLinear 256x256 2x8",
        CodebookLinear.from_linear(torch.nn.Linear(256, 256)),
        torch.randn(1, 256, generator=g),
    )
    yield (
        "SparseLinear 64x64 90%",
        SparseLinear.from_dense(torch.nn.Linear(64, 64), sparsity=0.9),
        torch.randn(1, 64, generator=g),
    )
    conv = SparseConv2d.from_dense(torch.nn.Conv2d(16, 16, 3, padding=1), sparsity=0.9)
    yield "SparseConv2d 16->16 3x3 4x4px", conv, torch.randn(1, 16, 4, 4, generator=g)
    attn = SubsampledSelfAttention(64, 4, keep=0.5).eval()
    yield "SubsampledSelfAttention d64 L16 (eval)", attn, torch.randn(1, 16, 64, generator=g)
    loss = InfoNCELoss(temperature=0.05)
    q, d = torch.randn(8, 64, generator=g), torch.randn(8, 64, generator=g)
    yield "InfoNCELoss B8 D64", lambda _: loss(q, d), None


def per_call_us(fn, x, calls: int) -> float:
    t0 = time.process_time()
    for _ in range(calls):
        fn(x)
    return (time.process_time() - t0) / calls * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"hotops from {hotops.__file__}")
    with torch.no_grad():
        for name, fn, x in cases():
            for _ in range(50):
                fn(x)
            times = [per_call_us(fn, x, args.calls) for _ in range(args.rounds)]
            print(f"{name:40s} {statistics.median(times):8.1f} us/call")


if __name__ == "__main__":
    main()
