"""Timing, memory and roofline helpers shared by every benchmark family (see BENCHMARKS.md).

* Side by side: hotops and its peer are timed alternately in one process; the result is the
  ratio of medians (peer / hotops) after warm-up.
* Memory: peak extra resident memory of one call beyond what it returns, each side in a fresh
  subprocess with glibc's mmap threshold pinned low so freed blocks go back to the OS and the
  high-water mark (reset through /proc/self/clear_refs) sees exactly the call's own allocations.
* Roofline: torch.mm's GFLOP/s and a large copy's GB/s, measured once per run on this machine.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, Optional

import torch


@dataclasses.dataclass
class Result:
    family: str
    case: str
    peer: str
    hotops_s: float  # median seconds per call
    peer_s: Optional[float]  # None when the peer could not run (say why in note)
    check: str  # "ok" or what failed
    work: str = ""  # "flops", "flops_bf16" or "bytes": what the roofline column measures
    amount: float = 0.0  # FLOPs or bytes moved by one hotops call
    note: str = ""
    extra: Dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def speedup(self) -> Optional[float]:
        return self.peer_s / self.hotops_s if self.peer_s else None

    def roofline_pct(self, machine: "Machine") -> Optional[float]:
        if not self.amount:
            return None
        peak = {"flops": machine.gflops, "flops_bf16": machine.gflops_bf16, "bytes": machine.gbps}[
            self.work
        ] * 1e9
        return 100.0 * self.amount / self.hotops_s / peak


def time_pair(
    hotops_fn: Callable[[], object],
    peer_fn: Optional[Callable[[], object]],
    repeats: int = 5,
    warmup: int = 1,
    min_time: float = 0.0,
    device: str = "cpu",
):
    """Median seconds of each side, interleaved call by call so drift hits both alike.
    On CUDA each call is bracketed by synchronisations."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed(fn):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    for _ in range(warmup):
        hotops_fn()
        if peer_fn:
            peer_fn()
    th, tp = [], []
    start = time.perf_counter()
    while len(th) < repeats or time.perf_counter() - start < min_time:
        th.append(timed(hotops_fn))
        if peer_fn:
            tp.append(timed(peer_fn))
    return statistics.median(th), (statistics.median(tp) if tp else None)


@dataclasses.dataclass
class Machine:
    cpu: str
    isa: str
    threads: int
    torch: str
    triton: str
    python: str
    gflops: float  # torch.mm float32, this thread count
    gflops_bf16: float  # torch.mm bfloat16
    gbps: float  # large memory copy (read + write bytes)
    peers: Dict[str, str]

    def describe(self) -> str:
        return (
            f"{self.cpu} | ISA {self.isa} | {self.threads} threads | torch {self.torch} | "
            f"triton {self.triton} | torch.mm fp32 {self.gflops:.0f}, bf16 {self.gflops_bf16:.0f} GFLOP/s | copy {self.gbps:.1f} GB/s"
        )


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str:
    """The installed version of a distribution (aqlm, for one, has no __version__)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


@functools.lru_cache(maxsize=1)
def machine(device: str = "cpu") -> Machine:
    from hotops import _backend

    n = 2048 if device == "cpu" else 8192
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    mm_s, _ = time_pair(lambda: torch.mm(a, b), None, repeats=5, device=device)
    a16, b16 = a.bfloat16(), b.bfloat16()
    mm16_s, _ = time_pair(lambda: torch.mm(a16, b16), None, repeats=5, device=device)
    big = torch.empty((64 if device == "cpu" else 2048) << 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(big)  # far beyond the caches
    cp_s, _ = time_pair(lambda: dst.copy_(big), None, repeats=5, device=device)
    name = _cpu_model() if device == "cpu" else torch.cuda.get_device_name()
    return Machine(
        cpu=name,
        isa=_backend.ext().isa() if device == "cpu" else "cuda",
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        triton=_version("triton"),
        python=platform.python_version(),
        gflops=2 * n**3 / mm_s / 1e9,
        gflops_bf16=2 * n**3 / mm16_s / 1e9,
        gbps=2 * big.numel() / cp_s / 1e9,
        peers={m: _version(m) for m in ("faiss-cpu", "hnswlib", "aqlm", "numba", "numpy")},
    )


# ------------------------------------------------------------------ memory

_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_extra_here(fn: Callable[[], object]) -> int:
    """Peak RSS growth of one call, less the bytes of the tensors it returns (the results both
    sides must produce, e.g. gradients): what remains is the working memory of the method."""
    fn()  # warm: lazy initialisation must not count
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the VmHWM high-water mark to the current RSS
    before = _rss_bytes("VmRSS")
    out = fn()
    outs = out if isinstance(out, (tuple, list)) else [out]
    returned = sum(t.numel() * t.element_size() for t in outs if isinstance(t, torch.Tensor))
    return _rss_bytes("VmHWM") - before - returned


def peak_extra_bytes(module: str, builder: str, side: str, params: dict, threads: int) -> Optional[int]:
    """Peak extra RSS of one call of ``getattr(module, builder)(side, **params)()`` in a fresh
    subprocess; None where /proc is unavailable."""
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    code = (
        f"import json, sys, torch; torch.set_num_threads({threads}); "
        f"import {module} as m; from hotops.bench.core import _peak_extra_here; "
        f"fn = m.{builder}({side!r}, **json.loads(sys.argv[1])); print(_peak_extra_here(fn))"
    )
    env = dict(os.environ, **_MEMORY_ENV)
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(params)], env=env, capture_output=True, text=True, timeout=900
    )
    if out.returncode != 0:
        raise RuntimeError(f"memory probe failed: {out.stderr.strip()[-2000:]}")
    return int(out.stdout.strip().splitlines()[-1])
