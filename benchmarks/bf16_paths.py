"""bf16 attention and InfoNCE side by side (issue 15): each bf16 case with the CPU extensions on
(AMX tiles for attention) and off (float32 compute), against its torch peer in the same dtype,
with torch.mm's bf16 rate measured in the same run for the roofline column. 2 threads.

    PYTHONPATH=python python benchmarks/bf16_paths.py [--quick]
"""

from __future__ import annotations

import argparse

import torch

from hotops import _backend
from hotops.bench import attention, core, infonce


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="L = 2048, B = 1024 instead of 4096")
    args = ap.parse_args()
    torch.set_num_threads(2)
    ext = _backend.ext()
    flags = [f for f in ("avx512_bf16", "avx512_fp16", "amx_bf16", "vbmi") if ext.cpu_has(f)]
    m = core.machine()
    print(
        f"ISA {ext.isa()}, extensions {', '.join(flags) or 'none'}; torch.mm fp32 {m.gflops:.0f}, "
        f"bf16 {m.gflops_bf16:.0f} GFLOP/s (2048^2, 2 threads)"
    )
    L, B = (2048, 1024) if args.quick else (4096, 4096)
    paths = {"tiles": True, "fp32 compute": False}
    print("| case | hotops ms | peer | peer ms | speed-up | % of torch.mm rate | check |")
    print("|---|---|---|---|---|---|---|")

    def show(name, r):
        roof = r.roofline_pct(m)
        print(
            f"| {name} | {r.hotops_s * 1e3:.0f} | {r.peer} | {r.peer_s * 1e3:.0f} | {r.speedup:.2f}x | "
            f"{'' if roof is None else f'{roof:.0f}%'} | {r.check} |",
            flush=True,
        )

    for keep in (1.0, 0.25):
        for name, on in paths.items():
            ext.set_feature("amx_bf16", on and ext.cpu_has("amx_bf16"))
            r = attention.run(
                dict(B=1, L=L, keep=keep, dtype="bf16", passes="fwd+bwd"), quick=True, threads=2
            )
            show(f"attention fwd+bwd L={L} keep={keep:g} bf16 [{name}]", r)
        r = attention.run(dict(B=1, L=L, keep=keep, dtype="fp32", passes="fwd+bwd"), quick=True, threads=2)
        show(f"attention fwd+bwd L={L} keep={keep:g} fp32", r)
    ext.set_feature("amx_bf16", ext.cpu_has("amx_bf16"))
    for dt in ("bf16", "fp32"):
        r = infonce.run(dict(B=B, D=768, dtype=dt), quick=True, threads=2)
        show(f"infonce fwd+bwd B={B} D=768 {dt}", r)


if __name__ == "__main__":
    main()
