"""Sparse benchmark: pruned linear and convolution layers (DASS) against torch dense
(``F.linear`` / ``F.conv2d`` on the masked weight) and torch.sparse CSR, at 50-99 % sparsity;
training steps under a fixed mask; and end to end, a MobileNetV2-style CIFAR network and
all-MiniLM-L6-v2 (WordNet glosses) with 90 %-sparse layers against their dense twins.

Roofline column: effective sparse FLOPs (2 x nnz x pixels) against torch.mm's rate; for batch-1
linear (a sparse GEMV, memory-bound) the bytes of values, indices and activations against copy
bandwidth."""

from __future__ import annotations

import os
import warnings
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from hotops.bench.core import Result, time_pair
from hotops.bench.sparse_models import DENSE_FOLDED, DENSE_TWIN, e2e_fns, twins_mobilenet

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")

SPARSITIES = (0.5, 0.7, 0.9, 0.95, 0.99)
LAYERS = {  # name: (kind, shape args)
    "linear 4096x4096 B=1": ("linear", dict(I=4096, O=4096, B=1)),
    "linear 4096x4096 B=64": ("linear", dict(I=4096, O=4096, B=64)),
    "linear 4096x4096 B=64 bf16": ("linear", dict(I=4096, O=4096, B=64, dtype=torch.bfloat16)),
    "conv 3x3 64->64 56x56": ("conv", dict(C=64, O=64, k=3, H=56, groups=1)),
    "conv 1x1 256->64 56x56": ("conv", dict(C=256, O=64, k=1, H=56, groups=1)),
    "dwconv 3x3 32ch 112x112": ("conv", dict(C=32, O=32, k=3, H=112, groups=32)),
}


def _layer(name: str, sparsity: float, seed: int = 0, device: str = "cpu", block=None, layout: str = "auto"):
    """(kind, shape args, packed weight, input): magnitude pruning, or with ``block`` whole
    block x 1 blocks; ``layout`` as in SparseWeight.from_dense."""
    from hotops.sparse import SparseWeight

    kind, a = LAYERS[name]
    g = torch.Generator().manual_seed(seed)
    pack = dict(sparsity=sparsity, block=block, layout=layout)
    if kind == "linear":
        w, x = torch.randn(a["O"], a["I"], generator=g), torch.randn(a["B"], a["I"], generator=g)
        x = x.to(a.get("dtype", torch.float32))
        return kind, a, SparseWeight.from_dense(w, **pack).to(device), x.to(device)
    w = torch.randn(a["O"], a["C"] // a["groups"], a["k"], a["k"], generator=g)
    x = torch.randn(1, a["C"], a["H"], a["H"], generator=g)
    return kind, a, SparseWeight.from_dense(w, groups=a["groups"], **pack), x


def _weight_bytes(sw) -> float:
    """Bytes of the weight a forward streams: values and indices of the format it runs on."""
    if sw.block:
        return sw.b_perm.numel() * 4.0 + sw.b_colidx.numel() * 4.0
    return sw.nnz * 8.0


def _fns(
    name: str, sparsity: float, peer: str, train: bool, device: str = "cpu", block=None, layout: str = "auto"
):
    """(hotops closure, peer closure, amount, work) for one layer case; peer "hotops CSR" is the
    same weight run by the CSR kernel (against its blocked form)."""
    from hotops.sparse import sparse_conv2d, sparse_linear

    kind, a, sw, x = _layer(name, sparsity, device=device, block=block, layout=layout)
    wd = sw.to_dense().to(x.dtype)
    pad = a.get("k", 1) // 2
    if train:  # forward + backward w.r.t. input and the non-zero values (dense: masked weight)
        x.requires_grad_()
        v = sw.values.clone().requires_grad_()
        mask = sw.mask().float()
        wv = wd.clone().requires_grad_()
        if kind == "linear":
            hot = lambda: torch.autograd.grad(sparse_linear(x, sw.with_values(v)).sum(), (x, v))
            other = lambda: torch.autograd.grad(F.linear(x, wv * mask).sum(), (x, wv))
        else:
            hot = lambda: torch.autograd.grad(sparse_conv2d(x, sw.with_values(v), padding=pad).sum(), (x, v))
            other = lambda: torch.autograd.grad(
                F.conv2d(x, wv * mask, padding=pad, groups=a["groups"]).sum(), (x, wv)
            )
        return hot, other, 3 * 2.0 * sw.nnz * _pixels(kind, a), "flops"
    if kind == "linear":
        hot = lambda: sparse_linear(x, sw)
        if peer == "hotops CSR":
            csr_sw = sw.without_block()
            other = lambda: sparse_linear(x, csr_sw)
        elif peer == "torch dense":
            other = lambda: F.linear(x, wd)
        else:
            csr = wd.to_sparse_csr()
            other = lambda: (csr @ x.t()).t()
    else:
        hot = lambda: sparse_conv2d(x, sw, padding=pad)
        if peer == "hotops CSR":
            csr_sw = sw.without_block()
            other = lambda: sparse_conv2d(x, csr_sw, padding=pad)
        elif peer == "torch dense":
            other = lambda: F.conv2d(x, wd, padding=pad, groups=a["groups"])
        else:  # block-diagonal CSR over all channels x im2col columns
            full = torch.zeros(a["O"], a["C"], a["k"], a["k"])
            og, cg = a["O"] // a["groups"], a["C"] // a["groups"]
            for grp in range(a["groups"]):
                full[grp * og : (grp + 1) * og, grp * cg : (grp + 1) * cg] = wd[grp * og : (grp + 1) * og]
            csr = full.reshape(a["O"], -1).to_sparse_csr()
            H = a["H"]
            other = lambda: (csr @ F.unfold(x, a["k"], padding=pad)[0]).view(1, a["O"], H, H)
    if kind == "linear" and a["B"] == 1:
        return hot, other, _weight_bytes(sw) + 4.0 * (a["I"] + a["O"]), "bytes"
    work = "flops_bf16" if x.dtype == torch.bfloat16 else "flops"
    return hot, other, 2.0 * sw.nnz * _pixels(kind, a), work


def _pixels(kind, a):
    return a["B"] if kind == "linear" else a["H"] * a["H"]


def _check(hot, other) -> str:
    a, b = hot(), other()
    a, b = (a[0], b[0]) if isinstance(a, tuple) else (a, b)
    err = (a.double() - b.double()).abs().max().item() / max(b.abs().max().item(), 1e-12)
    return "ok" if err <= (1e-4 if a.dtype == torch.float32 else 2e-2) else f"rel err {err:.2g}"


def _module_choice(name: str, sparsity: float, block=None) -> str:
    """What SparseLinear / SparseConv2d (policy "auto": measured) run for this layer and input."""
    from hotops.sparse import SparseConv2d, SparseLinear

    kind, a, sw, x = _layer(name, sparsity, block=block)
    if kind == "linear":
        layer = SparseLinear(sw)
    else:
        layer = SparseConv2d(sw, padding=a["k"] // 2)
    with torch.inference_mode():
        layer(x)
    ((_, ts, td),) = layer.dispatch.values()
    layout = f" {layer.layout}" if layer.backend.startswith("sparse") else ""
    return f"module runs {layer.backend.split()[0]}{layout} (measured {td / ts:.2f}x)"


def _dispatch_summary(model: nn.Module) -> str:
    from hotops.sparse import SparseConv2d, SparseLinear

    ran = [m.backend for m in model.modules() if isinstance(m, (SparseConv2d, SparseLinear))]
    return f"{sum(b.startswith('sparse') for b in ran)} layers sparse, {sum(b.startswith('dense') for b in ran)} dense"


# ------------------------------------------------------------------ cases

BLOCKED_LAYERS = ("linear 4096x4096 B=64", "linear 4096x4096 B=1", "conv 3x3 64->64 56x56")


def _blocked_cases(layers, sparsities) -> List[dict]:
    """The blocked format (forced) against the CSR kernel on unstructured and on 4x1-block-pruned
    masks, and on block-pruned masks against torch dense."""
    return [
        dict(layer=n, sparsity=s, peer=p, block=b, layout="blocked")
        for n in layers
        for s in sparsities
        for b, p in ((None, "hotops CSR"), (4, "hotops CSR"), (4, "torch dense"))
    ]


def cases(quick: bool, device: str = "cpu") -> List[dict]:
    if device == "cuda":  # the Triton BSR linear kernel (convolutions are CPU kernels)
        return [
            dict(layer=n, sparsity=s, peer=p)
            for n in LAYERS
            if n.startswith("linear")
            for s in (0.9, 0.99)
            for p in ("torch dense", "torch.sparse CSR")
        ]
    if quick:
        out = [
            dict(layer=n, sparsity=0.9, peer=p)
            for n in LAYERS
            for p in ("torch dense", "torch.sparse CSR")
            if p == "torch dense" or not (n.startswith("dw") or "bf16" in n)
        ]
        out += [dict(layer="linear 4096x4096 B=64", sparsity=0.9, peer="torch dense", train=True)]
        out += _blocked_cases(BLOCKED_LAYERS[:1], (0.9,))[:2]
        out += [dict(layer=BLOCKED_LAYERS[2], sparsity=0.9, peer="torch dense", block=4, layout="blocked")]
        out += [
            dict(e2e="mobilenetv2-cifar", batch=b, sparsity=0.9, peer=p)
            for b in (1, 32)
            for p in (DENSE_TWIN, DENSE_FOLDED)
        ]
        out += [dict(e2e="all-MiniLM-L6-v2", batch=32, sparsity=0.9)]
        return out
    out = [
        dict(layer=n, sparsity=s, peer=p)
        for n in LAYERS
        for s in SPARSITIES
        for p in ("torch dense", "torch.sparse CSR")
        if p == "torch dense" or "bf16" not in n
    ]
    out += [
        dict(layer=n, sparsity=0.9, peer="torch dense", train=True)
        for n in ("linear 4096x4096 B=64", "conv 3x3 64->64 56x56")
    ]
    out += _blocked_cases(BLOCKED_LAYERS, (0.7, 0.9, 0.95))
    out += [
        dict(e2e="mobilenetv2-cifar", batch=b, sparsity=0.9, peer=p)
        for b in (1, 32)
        for p in (DENSE_TWIN, DENSE_FOLDED)
    ]
    out += [dict(e2e="all-MiniLM-L6-v2", batch=b, sparsity=0.9) for b in (1, 32)]
    return out


def run(params: dict, quick: bool, threads: int, device: str = "cpu") -> Result:
    sparsity = params["sparsity"]
    if "e2e" in params:
        name, batch, peer = params["e2e"], params["batch"], params.get("peer", DENSE_TWIN)
        try:
            hot, other, note, model = e2e_fns(name, batch, sparsity, peer)
        except ImportError as exc:
            return Result(
                "sparse",
                f"{name} batch {batch} @{sparsity:.0%}",
                peer,
                0.0,
                None,
                check="skipped",
                note=f"needs {exc.name}",
            )
        with torch.inference_mode():
            check = _check(hot, other)  # the first call also measures each layer's dispatch
            th, tp = time_pair(hot, other, repeats=5, warmup=1, min_time=0.0 if quick else 1.0)
        note = ", ".join(n for n in (note, _dispatch_summary(model)) if n)
        if name != "mobilenetv2-cifar":
            note += f", {batch / th:.0f} vs {batch / tp:.0f} sentences/s"
        return Result("sparse", f"{name} batch {batch} @{sparsity:.0%}", peer, th, tp, check, note=note)
    name, peer, train = params["layer"], params["peer"], params.get("train", False)
    block, layout = params.get("block"), params.get("layout", "auto")
    hot, other, amount, work = _fns(name, sparsity, peer, train, device, block, layout)
    ctx = torch.enable_grad() if train else torch.inference_mode()
    with ctx:
        check = _check(hot, other)
        th, tp = time_pair(hot, other, repeats=5, warmup=1, min_time=0.0 if quick else 0.5, device=device)
    what = "fwd+bwd " if train else ""
    if layout == "blocked":  # which format ran on which mask
        name = f"{name} blocked 4x1, {'4x1 block-pruned' if block else 'unstructured'}"
    note = (
        _module_choice(params["layer"], sparsity, block)
        if peer == "torch dense" and not train and device == "cpu"
        else ""
    )
    return Result(
        "sparse",
        f"{what}{name} @{sparsity:.0%}",
        peer,
        th,
        tp,
        check,
        work=work,
        amount=amount,
        note=note,
        extra={"sparsity": sparsity},
    )


def crossover(results) -> dict:
    """Per layer and peer: the lowest measured sparsity from which sparse wins at every level."""
    table = {}
    for r in results:
        if r.family != "sparse" or "sparsity" not in r.extra or r.case.startswith("fwd+bwd") or not r.speedup:
            continue
        table.setdefault((r.case.rsplit(" @", 1)[0], r.peer), []).append((r.extra["sparsity"], r.speedup))
    out = {}
    for key, pts in table.items():
        pts.sort()
        wins = [s for i, (s, _) in enumerate(pts) if all(sp > 1.0 for _, sp in pts[i:])]
        out[key] = min(wins) if wins else None
    return out


def plots(results, folder: str) -> None:
    cross = crossover(results)
    if not cross:
        return
    print("\nsparse: lowest sparsity from which hotops wins (speed-up > 1 at it and above)")
    for (layer, peer), s in sorted(cross.items()):
        print(f"  {layer:28s} vs {peer:17s} {'never (up to 99 %)' if s is None else f'{s:.0%}'}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    series = {}
    for r in results:
        if (
            r.family == "sparse"
            and "sparsity" in r.extra
            and r.speedup
            and r.peer == "torch dense"
            and not r.case.startswith("fwd+bwd")
        ):
            series.setdefault(r.case.rsplit(" @", 1)[0], []).append((r.extra["sparsity"], r.speedup))
    for layer, pts in series.items():
        pts.sort()
        ax.plot([100 * s for s, _ in pts], [sp for _, sp in pts], marker="o", label=layer)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("speed-up over torch dense")
    ax.legend()
    fig.tight_layout()
    os.makedirs(folder, exist_ok=True)
    fig.savefig(os.path.join(folder, "sparse_speedup_vs_sparsity.png"), dpi=120)
    plt.close(fig)


def cpu_time_table(sparsities=SPARSITIES, repeats: int = 7) -> None:
    """Every layer case on one thread, timed by the thread's CPU time (time.thread_time) rather
    than the wall clock: on a shared machine this is the ratio that survives other processes
    (and torch's OpenMP workers spinning between calls). Prints speed-ups and the crossover."""
    torch.set_num_threads(1)

    def cpu(fn):
        return _cpu_time(fn, repeats)

    print("single thread, CPU time (ms); speed-up = peer / hotops")
    with torch.inference_mode():
        for layer in LAYERS:
            wins = []
            for s in sparsities:
                hot, dense, _, _ = _fns(layer, s, "torch dense", False)
                _, csr, _, _ = _fns(layer, s, "torch.sparse CSR", False)
                th, td = cpu(hot), cpu(dense)
                tc = float("nan") if "bf16" in layer else cpu(csr)  # no bfloat16 CSR product in torch
                wins.append((s, td / th))
                print(
                    f"  {layer:26s} @{s:4.0%}  hotops {th * 1e3:7.2f}  dense {td * 1e3:7.2f}  CSR {tc * 1e3:7.2f}"
                    f"  | {td / th:6.2f}x dense  {tc / th:6.2f}x CSR",
                    flush=True,
                )
            first = [s for i, (s, _) in enumerate(wins) if all(sp > 1.0 for _, sp in wins[i:])]
            print(
                f"  {layer}: beats dense from {f'{min(first):.0%}' if first else 'never'} sparsity",
                flush=True,
            )


def _cpu_time(fn, repeats: int) -> float:
    """Median seconds of the calling thread's CPU time per call, after one warm-up call."""
    import statistics
    import time

    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.thread_time()
        fn()
        ts.append(time.thread_time() - t0)
    return statistics.median(ts)


def e2e_cpu_time_table(batches=(1, 32), rounds: int = 3) -> None:
    """MobileNetV2-CIFAR at 90 %, one thread, CPU time: the fused sparse network against its dense
    twin as-is and with BN folded by torch (best of ``rounds`` medians, the three alternated)."""
    torch.set_num_threads(1)
    print("MobileNetV2-CIFAR @90 %, single thread, CPU time (ms)")
    with torch.inference_mode():
        for batch in batches:
            hot, dense, _, model = e2e_fns("mobilenetv2-cifar", batch, 0.9, DENSE_TWIN)
            _, folded, _, _ = e2e_fns("mobilenetv2-cifar", batch, 0.9, DENSE_FOLDED)
            reps = 21 if batch == 1 else 5
            best = [
                min(ts)
                for ts in zip(*[[_cpu_time(f, reps) for f in (hot, dense, folded)] for _ in range(rounds)])
            ]
            th, td, tf = best
            print(
                f"  batch {batch:3d}: sparse {th * 1e3:8.2f}  {DENSE_TWIN} {td * 1e3:8.2f} ({td / th:.2f}x)  "
                f"{DENSE_FOLDED} {tf * 1e3:8.2f} ({tf / th:.2f}x)  [{_dispatch_summary(model)}]",
                flush=True,
            )


def mobilenet_layers(batch: int, repeats: int = 5) -> None:
    """Per convolution of the fused 90 %-sparse MobileNetV2-CIFAR, one thread, CPU time: the sparse
    layer (forced sparse, its prepared call) against torch's F.conv2d + activation on the same
    folded masked weight, and the sums per kind of layer."""
    from hotops.sparse import SparseConv2d

    torch.set_num_threads(1)
    sparse, _ = twins_mobilenet(0.9, DENSE_FOLDED)
    inputs = {}
    hooks = [
        m.register_forward_hook(lambda m, i, o: inputs.update({m: i[0]}))  # returns None: output kept
        for m in sparse.modules()
        if isinstance(m, SparseConv2d)
    ]
    acts = {None: lambda y: y, "relu": F.relu, "relu6": F.relu6}
    sums = {}
    print(f"MobileNetV2-CIFAR @90 %, batch {batch}, single thread, CPU time (us)")
    with torch.inference_mode():
        sparse(torch.randn(batch, 3, 32, 32))
        for h in hooks:
            h.remove()
        for name, m in sparse.named_modules():
            if not isinstance(m, SparseConv2d):
                continue
            x, m.policy = inputs[m], "sparse"
            w, act = m.to_dense(), acts[m.activation]
            ts = _cpu_time(lambda: m(x), repeats)
            td = _cpu_time(
                lambda: act(F.conv2d(x, w, m.bias, m.stride, m.padding, m.dilation, m.groups)), repeats
            )
            s = sums.setdefault(m.kind, [0, 0.0, 0.0])
            s[0], s[1], s[2] = s[0] + 1, s[1] + ts, s[2] + td
            print(
                f"  {name:12s} {m.kind:9s} {tuple(x.shape[1:])!s:15s} -> {m.out_channels:4d}  nnz {m.values.numel():6d}"
                f"  sparse {ts * 1e6:8.1f}  dense {td * 1e6:8.1f}  {td / ts:5.2f}x",
                flush=True,
            )
    for kind, (n, ts, td) in sums.items():
        print(f"  {kind:9s} x{n:2d}: sparse {ts * 1e3:7.2f} ms  dense {td * 1e3:7.2f} ms  {td / ts:5.2f}x")


def blocked_table(
    sparsities=(0.7, 0.9, 0.95), threads: int = 2, rounds: int = 3, clock: str = "wall"
) -> None:
    """The blocked-format cases (_blocked_cases), each timed side by side ``rounds`` times at
    ``threads`` threads, printing the range over the rounds (on a shared machine one round can land
    on a busy moment). clock="wall": time_pair, as `hotops bench`; clock="cpu": the process's CPU
    time per call, both sides alternated (median of 7): on a machine whose other processes take
    cores the wall clock of a 2-thread call waits for scheduler slices (run with
    OMP_WAIT_POLICY=PASSIVE, or torch's spinning OpenMP workers are counted too)."""
    import statistics
    import time

    def cpu_pair(a, b, repeats=7):
        a(), b()
        ts = ([], [])
        for _ in range(repeats):
            for t, fn in zip(ts, (a, b)):
                t0 = time.process_time()
                fn()
                t.append(time.process_time() - t0)
        return statistics.median(ts[0]), statistics.median(ts[1])

    torch.set_num_threads(threads)
    print(
        f"blocked 4x1 format, {threads} threads, {clock} clock, {rounds} rounds: hotops ms / peer ms, speed-up range"
    )
    with torch.inference_mode():
        for params in _blocked_cases(BLOCKED_LAYERS, sparsities):
            hot, other, _, _ = _fns(
                params["layer"],
                params["sparsity"],
                params["peer"],
                False,
                block=params["block"],
                layout=params["layout"],
            )
            check = _check(hot, other)
            times = [
                time_pair(hot, other, repeats=7, warmup=1) if clock == "wall" else cpu_pair(hot, other)
                for _ in range(rounds)
            ]
            th, tp = zip(*times)
            sp = sorted(p / h for h, p in times)
            ms = lambda xs: "-".join(f"{1e3 * v:.2f}" for v in (min(xs), max(xs)))  # noqa: E731
            case = f"{params['layer']} @{params['sparsity']:.0%} {'4x1 block-pruned' if params['block'] else 'unstructured'}"
            print(
                f"  {case:50s} blocked vs {params['peer']:11s}  {ms(th):>11s} / {ms(tp):>11s}  "
                f"{sp[0]:.2f}-{sp[-1]:.2f}x  [{check}]",
                flush=True,
            )


def bf16_table(threads: int = 1, clock: str = "cpu", sparsities=(0.5, 0.7, 0.9), rounds: int = 7) -> None:
    """linear 4096x4096 B=64 on bfloat16 activations: hotops with AVX512_BF16 (vdpbf16ps) and its
    convert path (x widened to float32) against torch's bf16 F.linear, and the float32 pair, per
    sparsity; medians of ``rounds`` alternated rounds, wall clock or CPU time per call."""
    import statistics
    import time

    from hotops import _backend
    from hotops.sparse import SparseWeight, sparse_linear

    torch.set_num_threads(threads)
    ext, now = _backend.ext(), time.perf_counter if clock == "wall" else time.process_time
    has = ext.cpu_has("avx512_bf16")
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(4096, 4096, generator=g), torch.randn(64, 4096, generator=g)
    xb, dense_flops = x.bfloat16(), 2.0 * 4096 * 4096 * 64
    print(f"{threads} thread(s), {clock} time per call; avx512_bf16 on this CPU: {has}")

    def per_call(f, n=5):
        f()
        t0 = now()
        for _ in range(n):
            f()
        return (now() - t0) / n

    def bf16(sw, on):
        def f():
            if has:
                ext.set_feature("avx512_bf16", on)
            return sparse_linear(xb, sw)

        return f

    with torch.no_grad():
        for s in sparsities:
            sw = SparseWeight.from_dense(w, sparsity=s)
            wd = sw.to_dense()
            wdb = wd.bfloat16()
            cases = {
                "torch bf16": lambda: F.linear(xb, wdb),
                "vdpbf16ps": bf16(sw, True),
                "convert": bf16(sw, False),
                "torch fp32": lambda: F.linear(x, wd),
                "hotops fp32": lambda: sparse_linear(x, sw),
            }
            times = {k: [] for k in cases}
            for _ in range(rounds):
                for k, f in cases.items():
                    times[k].append(per_call(f))
            if has:
                ext.set_feature("avx512_bf16", True)
            m = {k: statistics.median(v) for k, v in times.items()}
            eff = 2.0 * sw.nnz * 64 / m["vdpbf16ps"]
            print(
                f"  {s:.0%}: "
                + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in m.items())
                + f" | bf16 vs torch bf16: {m['torch bf16'] / m['vdpbf16ps']:.2f}x (convert "
                f"{m['torch bf16'] / m['convert']:.2f}x), fp32 {m['torch fp32'] / m['hotops fp32']:.2f}x"
                f" | {eff / 1e9:.0f} GFLOP/s effective = {100 * eff * m['torch bf16'] / dense_flops:.0f} % of "
                f"torch's bf16 rate ({dense_flops / m['torch bf16'] / 1e9:.0f} GFLOP/s)",
                flush=True,
            )


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m hotops.bench.sparse",
        description="The sparse kernels' tables in docs/sparse.md (no table named: the per-layer "
        "single-thread CPU-time table).",
    )
    parser.add_argument("table", nargs="?", choices=["e2e", "layers", "blocked", "bf16"])
    parser.add_argument(
        "arg", nargs="*", help="layers: BATCH; blocked: [THREADS] [wall|cpu]; bf16: [THREADS] [cpu|wall]"
    )
    a = parser.parse_args()
    if a.table in ("blocked", "bf16"):
        table = blocked_table if a.table == "blocked" else bf16_table
        default_threads, default_clock = (2, "wall") if a.table == "blocked" else (1, "cpu")
        table(
            threads=int(a.arg[0]) if a.arg else default_threads,
            clock=a.arg[1] if len(a.arg) > 1 else default_clock,
        )
    elif a.table == "e2e":
        e2e_cpu_time_table()
    elif a.table == "layers":
        mobilenet_layers(int(a.arg[0]) if a.arg else 1)
    else:
        cpu_time_table()
