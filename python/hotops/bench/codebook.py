"""Codebook benchmark: y = x W^T with W in the codebook format at Llama-7B shapes, batch 1/4/16,
against torch's dense float32 F.linear (the layer it replaces) and against the aqlm package's
numba CPU kernel on the very same weight (2 codebooks of 256 codewords over 8 inputs: AQLM's
"2x8", 2 bits per weight). Weights are synthetic (random codes and codebooks: the time does not
depend on the values). The roofline column counts the bytes the hotops kernel must read (codes,
codebooks, scales, activations) and write, against the machine's copy bandwidth; `extra` also records the table
lookups (one per code and 16 batch rows) and their rate, the kernel's other bound (see
docs/codebook.md).

On CUDA (``--device cuda``, benchmarks/gpu_check.sh) the Triton kernels run against cuBLAS's
dense float16/bfloat16 F.linear; `extra` records the codeword bytes the kernels gather from L1,
their other bound there."""

from __future__ import annotations

import os
from typing import List, Optional

import torch
import torch.nn.functional as F

from hotops.bench.core import Result, time_pair

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (out_features, in_features): q/o, up/gate, down
CONFIGS = {"2x8": (8, 2), "1x8/4": (4, 1)}  # name: (in_group, num_codebooks), both 2 bits/weight
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_weight(N: int, K: int, config: str, seed: int = 0, device: str = "cpu", dtype=torch.float32):
    """dtype: of the codebooks and scales."""
    from hotops.codebook import CodebookWeight

    g, M = CONFIGS[config]
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (N, K // g, M), dtype=torch.uint8, generator=gen)
    codebooks = torch.randn(1, M, 256, g, generator=gen) / (M * K) ** 0.5
    scales = torch.rand(N, generator=gen) + 0.5
    return CodebookWeight(codes.to(device), codebooks.to(device, dtype), scales.to(device, dtype))


def build(
    side: str, N: int, K: int, B: int, config: str, dtype: str = "fp32", seed: int = 0, device: str = "cpu"
):
    """A closure computing x W^T once for `side`: "hotops", "dense" or "aqlm" (CPU only). On a GPU
    the codebooks are stored in the activations' dtype, as a deployed half-precision model has
    them (the kernels gather codewords of that size)."""
    import hotops

    w = make_weight(N, K, config, seed, device, torch.float32 if device == "cpu" else DTYPES[dtype])
    x = torch.randn(B, K, generator=torch.Generator().manual_seed(seed + 1)).to(device, DTYPES[dtype])
    if side == "hotops":
        return lambda: hotops.codebook_matmul(x, w)
    if side == "dense":
        dense = w.dequantize().to(x.dtype)
        return lambda: F.linear(x, dense)
    from aqlm.inference_kernels.numba_kernel import numba_gemm_lut

    codes = w.code_indices().permute(1, 0, 2).contiguous().view(torch.int8)  # aqlm's CPU layout
    codebooks = w.codebooks[0].unsqueeze(2).contiguous()  # (M, 256, out_group 1, in_group)
    scales = w.scales.reshape(-1, 1, 1, 1).contiguous()
    return lambda: numba_gemm_lut(x, codes, codebooks, scales, None)


def aqlm_missing() -> Optional[str]:
    try:
        import aqlm.inference_kernels.numba_kernel  # noqa: F401
    except Exception as exc:  # ImportError, or numba failing to load
        return f"aqlm's numba kernel is unavailable ({type(exc).__name__}: {exc})"
    return None


def cases(quick: bool, device: str = "cpu") -> List[dict]:
    if device == "cuda":  # gpu_check.sh's budget is minutes for every family (and each new dtype x
        # batch bucket compiles and tunes the kernels): fp16 at every shape, bf16 at one
        if quick:
            return [dict(N=4096, K=4096, B=B, config="2x8", peer="dense", dtype="fp16") for B in (1, 16)]
        out = [
            dict(N=N, K=K, B=B, config="2x8", peer="dense", dtype="fp16")
            for N, K in SHAPES
            for B in (1, 4, 16)
        ]
        return out + [dict(N=4096, K=4096, B=1, config="2x8", peer="dense", dtype="bf16")]
    if quick:
        out = [dict(N=4096, K=4096, B=B, config="2x8", peer=p) for B in (1, 16) for p in ("dense", "aqlm")]
        return out + [dict(N=4096, K=4096, B=16, config="2x8", peer="dense", dtype="bf16")]
    out = [
        dict(N=N, K=K, B=B, config="2x8", peer=p)
        for N, K in SHAPES
        for B in (1, 4, 16)
        for p in ("dense", "aqlm")
    ]
    out += [dict(N=4096, K=4096, B=B, config="1x8/4", peer="dense") for B in (1, 16)]
    out += [dict(N=4096, K=4096, B=B, config="2x8", peer="dense", dtype="bf16") for B in (1, 4, 16, 64, 256)]
    out += [dict(N=4096, K=4096, B=B, config="2x8", peer="dense") for B in (64, 256)]
    return out


def _check(a: torch.Tensor, b: torch.Tensor) -> str:
    err = (a.float() - b.float()).abs().max().item() / max(b.float().abs().max().item(), 1e-12)
    tol = 1e-4 if a.dtype == torch.float32 else 2e-2
    return "ok" if err <= tol else f"rel err {err:.2g}"


def run(params: dict, quick: bool, threads: int, device: str = "cpu") -> Result:
    if device == "cuda":
        return _run_gpu(params, quick, device)
    p = dict(params)
    peer = p.pop("peer")
    N, K, B, config, dtype = p["N"], p["K"], p["B"], p["config"], p.get("dtype", "fp32")
    g, M = CONFIGS[config]
    hot = build("hotops", **p)
    case = f"{N}x{K} B={B} {config} {dtype}"
    note, peer_fn = "", None
    if peer == "aqlm":
        note = aqlm_missing() or ""
        if not note:
            # numba runs on the system's libgomp, a second OpenMP runtime beside torch's: with the
            # default active wait its idle threads spin for milliseconds after each aqlm call and
            # take the cores from the next call of either side (measured at 2 threads: hotops 3-6 ms
            # instead of 1-2 ms, aqlm 13-20 ms instead of 6-7 ms). Passive waiting for the runtime
            # that loads now (torch's read its settings at import) removes that artifact for both.
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
            import numba

            numba.set_num_threads(threads)
            peer_fn = build("aqlm", **p)
        peer_name = "aqlm numba (same weight)"
    else:
        peer_fn = build("dense", **p)
        peer_name = f"torch F.linear {dtype} dense"
    out = hot()
    want = build("dense", **p)()
    check = _check(out, want)
    if peer == "aqlm" and peer_fn is not None:
        # its numba kernel accumulates into one output vector from a prange over input groups
        theirs = _check(peer_fn(), want)
        if theirs != "ok":
            note = f"aqlm's own output is off ({theirs}): a race with > 1 numba thread"
    th, tp = time_pair(hot, peer_fn, repeats=7 if B <= 16 else 5, warmup=1, min_time=1.0 if quick else 2.0)
    act = torch.finfo(DTYPES[dtype]).bits // 8
    w = make_weight(N, K, config)
    weight_bytes = w.codes.numel() + 4 * (w.codebooks.numel() + w.scales.numel())
    bytes_moved = weight_bytes + B * (K + N) * act  # the weight once, activations in and out
    bits = w.bits_per_weight
    lookups = N * K * M // g * -(-B // 16)  # table lookups: one per code per 16 batch rows
    return Result(
        family="codebook",
        case=case,
        peer=peer_name,
        hotops_s=th,
        peer_s=tp,
        check=check,
        note=note,
        work="bytes",
        amount=bytes_moved,
        extra={
            "bits_per_weight": bits,
            "weight_MB": bits * N * K / 8 / 2**20,
            "dense_fp32_MB": 4 * N * K / 2**20,
            "lookups": lookups,
            "glookups_per_s": lookups / th / 1e9,
        },
    )


def _run_gpu(params: dict, quick: bool, device: str) -> Result:
    """The Triton GEMV (B <= 8) or GEMM against cuBLAS's dense half-precision F.linear."""
    from hotops.codebook.triton import GEMV_MAX_BATCH

    p = dict(params, device=device)
    p.pop("peer")
    N, K, B, config, dtype = p["N"], p["K"], p["B"], p["config"], p["dtype"]
    g, M = CONFIGS[config]
    hot, peer_fn = build("hotops", **p), build("dense", **p)
    check = _check(hot(), peer_fn())  # also compiles and autotunes before the timing
    th, tp = time_pair(hot, peer_fn, repeats=20, warmup=3, min_time=0.3 if quick else 0.5, device=device)
    act = torch.finfo(DTYPES[dtype]).bits // 8
    bytes_moved = N * K * M // g + B * (K + N) * act  # codes once, activations in and out
    w = make_weight(N, K, config, dtype=DTYPES[dtype])
    extra = {
        "bits_per_weight": w.bits_per_weight,
        "weight_MB": w.bits_per_weight * N * K / 8 / 2**20,
        "dense_MB": act * N * K / 2**20,
    }
    if B <= GEMV_MAX_BATCH:  # the GEMV gathers every code's codeword once, from L1
        extra["l1_gather_GB_per_s"] = N * K * M * w.codebooks.element_size() / th / 1e9
    return Result(
        family="codebook",
        case=f"{N}x{K} B={B} {config} {dtype}",
        peer=f"torch F.linear {dtype} dense (cuBLAS)",
        hotops_s=th,
        peer_s=tp,
        check=check,
        work="bytes",
        amount=bytes_moved,
        extra=extra,
    )


def cpu_time_table(
    B: int = 1,
    isa: Optional[str] = None,
    rounds: int = 5,
    min_time: float = 0.3,
    dtype: str = "fp32",
    shapes=None,
) -> List[str]:
    """One line per Llama shape (2x8): hotops, torch's dense F.linear in the activations' dtype and
    (fp32) aqlm's kernel on one thread, CPU time per call (time.process_time), the sides called
    alternately in one process, best of `rounds` rounds of >= min_time s each. A machine shared
    with other work still gives these (a descheduled thread stalls any 2-way split, not one
    thread's CPU time). isa: "scalar", "avx2", "avx512" (without VBMI) or "avx512+vbmi"; default
    the best. dtype: of the activations, "fp32", "bf16" or "fp16"."""
    import time

    from hotops import _backend

    ext = _backend.ext()
    if isa:
        ext.set_isa(isa.split("+")[0])
        ext.set_feature("vbmi", isa.endswith("+vbmi"))
    torch.set_num_threads(1)
    sides = ["hotops", "dense"]
    if dtype == "fp32" and not aqlm_missing():
        import numba

        numba.set_num_threads(1)
        sides.append("aqlm")
    lines = [
        f"isa {ext.isa()}{'+vbmi' if ext.feature('vbmi') else ''}, {dtype} activations, batch {B}, "
        "one thread, CPU ms per call"
    ]
    for N, K in shapes or SHAPES:
        fns = {s: build(s, N, K, B, "2x8", dtype) for s in sides}
        best = dict.fromkeys(sides, float("inf"))
        for _ in range(rounds):
            for s, f in fns.items():
                f()
                calls, t0 = 0, time.process_time()
                while time.process_time() - t0 < min_time:
                    f()
                    calls += 1
                best[s] = min(best[s], (time.process_time() - t0) / calls)
        h = best["hotops"]
        lines.append(
            f"{N}x{K} B={B}: hotops {h * 1e3:.3f}"
            + "".join(f"  {s} {best[s] * 1e3:.2f} ({best[s] / h:.1f}x)" for s in sides[1:])
        )
    return lines


# ------------------------------------------ data for examples/compress_minilm.py (all-MiniLM-L6-v2)


def wordnet_glosses(limit: int, seed: int = 0) -> List[str]:
    """WordNet glosses (Debian wordnet-base), shuffled with a seed."""
    import os
    import random

    texts = []
    for pos in ("noun", "verb", "adj", "adv"):
        path = f"/usr/share/wordnet/data.{pos}"
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} is missing: apt-get install wordnet-base")
        with open(path, encoding="utf-8", errors="replace") as f:
            texts += [
                line.split("|", 1)[1].strip() for line in f if not line.startswith("  ") and "|" in line
            ]
    random.Random(seed).shuffle(texts)
    return texts[:limit]


def rtn_2bit_(model: torch.nn.Module, group: int = 64) -> float:
    """Round-to-nearest 2-bit scalar quantization of every Linear weight (but the unused pooler)
    in place: per group of `group` inputs, an fp16 minimum and step (2 + 32 / group bits/weight).
    Returns bits/weight."""
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and "pooler" not in name:
            w = mod.weight.data
            g = w.reshape(-1, group)
            lo = g.min(1, keepdim=True).values.half().float()
            step = ((g.max(1, keepdim=True).values - lo) / 3).half().float().clamp_min(1e-12)
            mod.weight.data = (((g - lo) / step).round().clamp(0, 3) * step + lo).reshape(w.shape)
    return 2 + 32 / group


if __name__ == "__main__":  # python -m hotops.bench.codebook [--batch B] [--isa ISA]
    import argparse

    ap = argparse.ArgumentParser(
        description="Llama shapes, one thread, CPU time per call: hotops, dense F.linear, aqlm (fp32)"
    )
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--isa", default=None, help="scalar | avx2 | avx512 | avx512+vbmi")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="of the activations")
    ap.add_argument("--shape", default=None, help="one shape, NxK (e.g. 4096x4096); default all three")
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in args.shape.split("x"))] if args.shape else None
    print("\n".join(cpu_time_table(args.batch, args.isa, dtype=args.dtype, shapes=shapes)))
