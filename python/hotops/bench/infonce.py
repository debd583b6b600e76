"""InfoNCE benchmark: forward + backward of hotops.info_nce against the eager reference
(``F.cross_entropy`` over materialised logits, autograd backward), D = 768, one hard negative per
query as a shared pool (N = B), time and peak extra memory."""
from __future__ import annotations

from typing import List

import torch

from hotops.bench.core import Result, peak_extra_bytes, time_pair

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(side: str, B: int, D: int, dtype: str, seed: int = 0):
    """A closure running forward + backward once for `side` ("hotops" or "eager")."""
    import hotops
    from hotops.infonce import reference

    g = torch.Generator().manual_seed(seed)
    dt = DTYPES[dtype]
    q, d, h = (torch.randn(B, D, generator=g).div_(D ** 0.5).to(dt).requires_grad_() for _ in range(3))
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


def cases(quick: bool) -> List[dict]:
    sizes = [1024, 4096] if quick else [1024, 4096, 16384]
    dtypes = ["fp32", "bf16"]
    return [dict(B=B, D=768, dtype=dt) for dt in dtypes for B in sizes
            if not (quick and dt == "bf16" and B > 1024)]


def run(params: dict, quick: bool, threads: int) -> Result:
    B, D, dtype = params["B"], params["D"], params["dtype"]
    hot, eager = build("hotops", **params), build("eager", **params)
    check = _check(hot(), eager(), dtype)
    repeats = 3 if B >= 16384 else 5
    th, te = time_pair(hot, eager, repeats=repeats, warmup=0, min_time=0.0 if B >= 4096 else 2.0)
    Nc = 2 * B  # B in-batch candidates + B pooled hard negatives
    flops = 3 * 2.0 * B * Nc * D  # logits, dq, dC
    extra = {}
    if not quick or B == 4096:
        mh = peak_extra_bytes("hotops.bench.infonce", "build", "hotops", params, threads)
        me = peak_extra_bytes("hotops.bench.infonce", "build", "eager", params, threads)
        if mh is not None:
            extra = {"mem_hotops_MB": mh / 2 ** 20, "mem_peer_MB": me / 2 ** 20}
    return Result(family="infonce", case=f"fwd+bwd B={B} D={D} N={B} {dtype}", peer="torch eager",
                  hotops_s=th, peer_s=te, check=check,
                  work="flops" if dtype == "fp32" else "flops_bf16", amount=flops, extra=extra)
