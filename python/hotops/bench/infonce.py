"""InfoNCE benchmark: forward + backward of hotops.info_nce against the eager reference
(``F.cross_entropy`` over materialised logits, autograd backward), D = 768, one hard negative per
query as a shared pool (N = B): time, % of torch.mm's rate, and peak extra memory."""

from __future__ import annotations

from typing import List

import torch

from hotops.bench.core import Result, peak_extra_bytes, time_pair

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(side: str, B: int, D: int, dtype: str, seed: int = 0, device: str = "cpu"):
    """A closure running forward + backward once for `side` ("hotops" or "eager")."""
    import hotops
    from hotops.infonce import reference

    g = torch.Generator().manual_seed(seed)
    dt = DTYPES[dtype]
    q, d, h = (torch.randn(B, D, generator=g).div_(D**0.5).to(device, dt).requires_grad_() for _ in range(3))
    fn = hotops.info_nce if side == "hotops" else reference.info_nce

    def step():
        loss = fn(q, d, h, temperature=0.05)
        loss.backward()
        out = (loss.detach(), q.grad, d.grad, h.grad)
        q.grad = d.grad = h.grad = None  # the caller owns the results; nothing stays behind
        return out

    return step


def _check(a, b, dtype: str) -> str:
    tol = 2e-4 if dtype == "fp32" else 3e-2
    for name, x, y in zip(("loss", "dq", "dd", "dhard"), a, b):
        err = (x.float() - y.float()).abs().max().item() / max(y.float().abs().max().item(), 1e-12)
        if not err <= tol:
            return f"{name} rel err {err:.2g}"
    return "ok"


def cases(quick: bool, device: str = "cpu") -> List[dict]:
    if device == "cuda":  # 65536: eager's logits alone are 34 GB in fp32 (x3 with softmax and grad)
        return [dict(B=B, D=768, dtype=dt) for dt in ("fp32", "bf16") for B in (16384, 65536)]
    sizes = [1024, 4096] if quick else [1024, 4096, 16384]
    return [
        dict(B=B, D=768, dtype=dt)
        for dt in ("fp32", "bf16")
        for B in sizes
        if not (quick and dt == "bf16" and B > 1024)
    ]


def run(params: dict, quick: bool, threads: int, device: str = "cpu") -> Result:
    B, D, dtype = params["B"], params["D"], params["dtype"]
    hot = build("hotops", **params, device=device)
    eager, note = build("eager", **params, device=device), ""
    try:
        ref = eager()
    except torch.cuda.OutOfMemoryError:
        eager, ref, note = None, None, "eager runs out of memory"
        torch.cuda.empty_cache()
    out = hot()
    check = _check(out, ref, dtype) if ref is not None else "ran (no peer to compare)"
    del out, ref
    big = B >= 16384 and device == "cpu"
    th, te = time_pair(
        hot, eager, repeats=3 if big else 5, warmup=0, min_time=0.0 if B >= 4096 else 2.0, device=device
    )
    flops = 3 * 2.0 * B * (2 * B) * D  # logits, dq, dC over B in-batch + B pooled candidates
    extra = {}
    if device == "cpu" and (not quick or B == 4096):
        mh = peak_extra_bytes("hotops.bench.infonce", "build", "hotops", params, threads)
        me = peak_extra_bytes("hotops.bench.infonce", "build", "eager", params, threads)
        if mh is not None:
            extra = {"mem_hotops_MB": mh / 2**20, "mem_peer_MB": me / 2**20}
    elif device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        hot()
        extra = {"cuda_peak_hotops_MB": (torch.cuda.max_memory_allocated() - base) / 2**20}
    return Result(
        family="infonce",
        case=f"fwd+bwd B={B} D={D} N={B} {dtype}",
        peer="torch eager",
        hotops_s=th,
        peer_s=te,
        check=check,
        note=note,
        work="flops" if dtype == "fp32" else "flops_bf16",
        amount=flops,
        extra=extra,
    )
