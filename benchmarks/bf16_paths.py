"""bf16 attention, InfoNCE and codebook products side by side (issue 15): each bf16 case with the
CPU's bf16 products on (attention and the codebook kernel: AMX tiles, or vdpbf16ps where
fast_bf16_dot) and off (float32 compute), against its torch peer in the same dtype, with
torch.mm's bf16 rate measured in the same run for the roofline column. 2 threads (--threads).

    PYTHONPATH=python python benchmarks/bf16_paths.py [--quick] [--family codebook] [--threads 1]

The codebook table times, per shape and batch, the bf16 kernel and the product with the bf16
products off (the float32 tables, or dequantized tiles + torch.mm where op.use_tables says so)
and torch's bf16 F.linear on the dense weight, the three interleaved call by call; each figure is
the best of 3 such medians.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from hotops import _backend
from hotops.bench import attention, core, infonce
from hotops.bench.codebook import make_weight
from hotops.codebook import codebook_matmul

# (N, K, format): Llama's 2x8 shapes and all-MiniLM-L6-v2's 1x8/4 ones
CODEBOOK_SHAPES = [(4096, 4096, "2x8"), (11008, 4096, "2x8"), (1536, 384, "1x8/4"), (384, 1536, "1x8/4")]


BF16_FEATURES = ("amx_bf16", "avx512_bf16", "fast_bf16_dot")


def bf16_product_name(ext):
    """The bf16 product this CPU takes (attention, codebook), by the features on now."""
    if ext.feature("amx_bf16"):
        return "AMX tiles"
    return "vdpbf16ps" if ext.feature("fast_bf16_dot") else "float32 (no fast bf16 products here)"


def set_bf16(ext, on, was):
    """The bf16 products on as they were (on) or all off: converted to float32."""
    for f in BF16_FEATURES:
        ext.set_feature(f, on and was[f])


def codebook_table(batches, threads):
    ext = _backend.ext()
    was = {f: ext.feature(f) for f in BF16_FEATURES}
    print(f"bf16 kernel: {bf16_product_name(ext)}")
    print(
        "| shape | B | bf16 kernel ms | off ms | torch bf16 F.linear ms | kernel vs torch | kernel vs off |"
    )
    print("|---|---|---|---|---|---|---|")
    for N, K, config in CODEBOOK_SHAPES:
        gen = torch.Generator().manual_seed(1)
        w = make_weight(N, K, config)
        dense = w.dequantize().bfloat16()
        for B in batches:
            x = torch.randn(B, K, generator=gen).bfloat16()

            def side(on):
                def run():
                    set_bf16(ext, on, was)
                    return codebook_matmul(x, w)

                return run

            sides = {"kernel": side(True), "off": side(False), "torch": lambda: F.linear(x, dense)}
            best = {k: float("inf") for k in sides}
            for _ in range(3):
                th, tp = core.time_pair(sides["kernel"], sides["off"], repeats=5, min_time=0.2)
                _, tt = core.time_pair(sides["kernel"], sides["torch"], repeats=5, min_time=0.2)
                best = {k: min(best[k], v) for k, v in zip(sides, (th, tp, tt))}
            set_bf16(ext, True, was)
            ms = {k: v * 1e3 for k, v in best.items()}
            print(
                f"| {N}x{K} {config} | {B} | {ms['kernel']:.3f} | {ms['off']:.3f} | {ms['torch']:.3f} | "
                f"{ms['torch'] / ms['kernel']:.2f}x | {ms['off'] / ms['kernel']:.2f}x |",
                flush=True,
            )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="L = 2048, B = 1024 instead of 4096")
    ap.add_argument("--family", choices=("attention", "infonce", "codebook"), action="append")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    families = args.family or ["attention", "infonce", "codebook"]
    torch.set_num_threads(args.threads)
    ext = _backend.ext()
    flags = [f for f in ("avx512_bf16", "avx512_fp16", "amx_bf16", "vbmi") if ext.cpu_has(f)]
    flags += ["fast_bf16_dot"] if ext.feature("fast_bf16_dot") else []
    m = core.machine()
    print(
        f"ISA {ext.isa()}, extensions {', '.join(flags) or 'none'}; torch.mm fp32 {m.gflops:.0f}, "
        f"bf16 {m.gflops_bf16:.0f} GFLOP/s (2048^2, {args.threads} threads)"
    )
    if "codebook" in families:
        codebook_table((1, 4, 16, 64, 128) if args.quick else (1, 4, 16, 32, 64, 128, 256), args.threads)
    if families == ["codebook"]:
        return
    L, B = (2048, 1024) if args.quick else (4096, 4096)
    was = {f: ext.feature(f) for f in BF16_FEATURES}
    paths = {bf16_product_name(ext): True, "fp32 compute": False}
    print("| case | hotops ms | peer | peer ms | speed-up | % of torch.mm rate | check |")
    print("|---|---|---|---|---|---|---|")

    def show(name, r):
        roof = r.roofline_pct(m)
        print(
            f"| {name} | {r.hotops_s * 1e3:.0f} | {r.peer} | {r.peer_s * 1e3:.0f} | {r.speedup:.2f}x | "
            f"{'' if roof is None else f'{roof:.0f}%'} | {r.check} |",
            flush=True,
        )

    for keep in (1.0, 0.25) if "attention" in families else ():
        for name, on in paths.items():
            set_bf16(ext, on, was)
            r = attention.run(
                dict(B=1, L=L, keep=keep, dtype="bf16", passes="fwd+bwd"), quick=True, threads=args.threads
            )
            show(f"attention fwd+bwd L={L} keep={keep:g} bf16 [{name}]", r)
        r = attention.run(
            dict(B=1, L=L, keep=keep, dtype="fp32", passes="fwd+bwd"), quick=True, threads=args.threads
        )
        show(f"attention fwd+bwd L={L} keep={keep:g} fp32", r)
    set_bf16(ext, True, was)
    for dt in ("bf16", "fp32") if "infonce" in families else ():
        r = infonce.run(dict(B=B, D=768, dtype=dt), quick=True, threads=args.threads)
        show(f"infonce fwd+bwd B={B} D=768 {dt}", r)
    if "infonce" in families:
        gemm_floor(B, 768)


def gemm_floor(B, D):
    """The three bf16 GEMMs of InfoNCE fwd+bwd (B queries, 2B candidates) alone, as torch runs
    them: the time the loss cannot beat on torch's GEMMs."""
    q, c, S = (torch.randn(*shape).bfloat16() for shape in ((B, D), (2 * B, D), (B, 2 * B)))
    products = {"S = q C^T": lambda: q @ c.T, "dq = S C": lambda: S @ c, "dC = S^T q": lambda: S.T @ q}
    flops = 2.0 * B * 2 * B * D
    total = 0.0
    for name, f in products.items():
        f()
        t, _ = core.time_pair(f, None, repeats=3)
        total += t
        print(f"torch bf16 {name}: {t * 1e3:.1f} ms ({flops / t / 1e9:.0f} GFLOP/s)")
    print(f"the three GEMMs of InfoNCE B={B}: {total * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
