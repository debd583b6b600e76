"""Timing, memory and roofline helpers shared by every benchmark family (see BENCHMARKS.md).

* Side by side: hotops and its peer are timed alternately in one process; the result is the
  ratio of medians (peer / hotops) after warm-up.
* Memory: peak extra resident memory of one call beyond what it returns, each side in a fresh
  subprocess with glibc's mmap threshold pinned low so freed blocks go back to the OS and the
  high-water mark (reset through /proc/self/clear_refs) sees exactly the call's own allocations.
* Roofline: torch.mm's GFLOP/s and a large copy's GB/s, measured once per run on this machine.
* Contention (`hotops bench --contended`): one spinning process (`while True: pass`) beside the
  timing, paused during quiet blocks and resumed for contended ones; every side-by-side timing runs
  in alternated blocks (quiet, busy, busy, quiet, quiet, busy) and records both ratios.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import importlib.metadata
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, Iterator, List, Optional, Tuple

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
        # a bf16 product can always be computed in float32: where torch's bf16 GEMM is slower
        # (CPUs without AVX-512 or AMX), the float32 rate is the bf16 roofline
        bf16_peak = max(machine.gflops_bf16, machine.gflops)
        peak = {"flops": machine.gflops, "flops_bf16": bf16_peak, "bytes": machine.gbps}[self.work] * 1e9
        return 100.0 * self.amount / self.hotops_s / peak


def _pair_once(hotops_fn, peer_fn, repeats, warmup, min_time, sync):
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


def time_pair(
    hotops_fn: Callable[[], object],
    peer_fn: Optional[Callable[[], object]],
    repeats: int = 5,
    warmup: int = 1,
    min_time: float = 0.0,
    device: str = "cpu",
):
    """Median seconds of each side, interleaved call by call so drift hits both alike.
    On CUDA each call is bracketed by synchronisations.

    Inside `contention()` (CPU, with a peer) the pair is timed in 2 x BLOCKS alternated blocks, half
    of them beside the busy process, each block as above with half the min_time; the quiet blocks'
    medians are returned and both kinds are recorded (Contention.records)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    busy = _CONTENTION
    if busy is None or peer_fn is None or device != "cpu":
        return _pair_once(hotops_fn, peer_fn, repeats, warmup, min_time, sync)
    rec = PairRecord()
    for i, on in enumerate(busy.blocks()):
        th, tp = _pair_once(hotops_fn, peer_fn, repeats, warmup if i == 0 else 0, min_time / 2, sync)
        (rec.contended if on else rec.quiet).append((th, tp))
    busy.records.append(rec)
    return rec.medians(False)


# ------------------------------------------------------------------ contention

BLOCKS = 3  # quiet and contended blocks per timed pair (each kind)
SETTLE_S = 0.05  # after pausing or resuming the busy process, before a block's first call

# The busy process: spins in pure Python like `python3 -c "while True: pass"`; dies with its parent
# (PR_SET_PDEATHSIG: SIGKILL reaches it even while it is paused) and checks the parent now and then.
_BUSY_CODE = """
import ctypes, os, signal, sys
parent = int(sys.argv[1])
try:
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
except Exception:
    pass
if os.getppid() != parent:
    sys.exit(0)
sys.stdout.write("ready\\n")
sys.stdout.flush()
while True:
    for _ in range(1 << 20):
        pass
    if os.getppid() != parent:
        sys.exit(0)
"""


@dataclasses.dataclass
class PairRecord:
    """(hotops s, peer s) medians of each quiet and each contended block of one timed pair."""

    quiet: List[Tuple[float, float]] = dataclasses.field(default_factory=list)
    contended: List[Tuple[float, float]] = dataclasses.field(default_factory=list)

    def medians(self, contended: bool) -> Tuple[float, float]:
        blocks = self.contended if contended else self.quiet
        return statistics.median(b[0] for b in blocks), statistics.median(b[1] for b in blocks)

    def ratio(self, contended: bool) -> float:
        """Median over the blocks of peer / hotops."""
        return statistics.median(tp / th for th, tp in (self.contended if contended else self.quiet))


class Contention:
    """One busy process (a pure-Python spin loop, one core's worth) started beside the timing:
    paused (SIGSTOP) for quiet blocks, resumed (SIGCONT) for contended ones, killed by close()."""

    def __init__(self, blocks: int = BLOCKS):
        self.blocks_per_kind = blocks
        self.records: List[PairRecord] = []
        self.proc: Optional[subprocess.Popen] = None
        self.busy = False

    def start(self) -> "Contention":
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _BUSY_CODE, str(os.getpid())],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        try:
            if self.proc.stdout.readline().strip() != b"ready":
                raise RuntimeError("the busy process did not start")
        except BaseException:
            self.close()
            raise
        self.busy = True
        self.set_busy(False)
        return self

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    def set_busy(self, on: bool) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError("the busy process is gone")
        if on != self.busy:
            os.kill(self.proc.pid, signal.SIGCONT if on else signal.SIGSTOP)
            self.busy = on
            time.sleep(SETTLE_S)

    def blocks(self) -> Iterator[bool]:
        """Yields False (quiet) / True (contended) in the order quiet, busy, busy, quiet, quiet,
        busy, ... (each pair reversed from the last, so a drift does not favour one kind), with
        the busy process paused or running accordingly; paused again at the end."""
        try:
            for k in range(self.blocks_per_kind):
                for on in (False, True) if k % 2 == 0 else (True, False):
                    self.set_busy(on)
                    yield on
        finally:
            if self.proc is not None and self.proc.poll() is None:
                self.set_busy(False)

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()  # SIGKILL ends a stopped process too
        proc.wait()
        if proc.stdout:
            proc.stdout.close()


_CONTENTION: Optional[Contention] = None


@contextlib.contextmanager
def contention(blocks: int = BLOCKS) -> Iterator[Contention]:
    """While active, time_pair (and `blocks()`) alternate quiet and contended blocks. The busy
    process is killed on exit from the block, whatever ends it (error, KeyboardInterrupt)."""
    global _CONTENTION
    if _CONTENTION is not None:
        raise RuntimeError("contention() does not nest")
    c = Contention(blocks)
    try:
        c.start()
        _CONTENTION = c
        yield c
    finally:
        _CONTENTION = None
        c.close()


def blocks(n: int = BLOCKS) -> Iterator[bool]:
    """Rounds for a family that times its own loop (ann): n quiet rounds (False) when no contention
    is active, else the active Contention's alternated blocks (False quiet, True contended)."""
    if _CONTENTION is None or not _CONTENTION.blocks_per_kind:
        return iter([False] * n)
    return _CONTENTION.blocks()


def contended_figures(result: "Result", records: List[PairRecord]) -> Optional[Dict[str, float]]:
    """quiet_speedup, contended_speedup and kept (= contended / quiet) of a case: from its
    Result's extra when the family computed them itself (ann), else from the record of the timed
    pair whose quiet medians the Result reports (the last one when none matches)."""
    if "contended_speedup" in result.extra and "quiet_speedup" in result.extra:
        q, c = result.extra["quiet_speedup"], result.extra["contended_speedup"]
    else:
        recs = [r for r in records if r.quiet and r.contended]
        if not recs or not result.peer_s:
            return None
        match = [r for r in recs if r.medians(False) == (result.hotops_s, result.peer_s)]
        rec = (match or recs)[-1]
        q, c = rec.ratio(False), rec.ratio(True)
        th, tp = rec.medians(True)
        result.extra.update(contended_hotops_s=th, contended_peer_s=tp)
    out = {"quiet_speedup": q, "contended_speedup": c, "kept": c / q}
    result.extra.update(out)
    return out


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
            f"triton {self.triton} | torch.mm fp32 {self.gflops:.0f}, bf16 {self.gflops_bf16:.3g} GFLOP/s | copy {self.gbps:.1f} GB/s"
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
    # torch's bf16 GEMM runs at ~1 GFLOP/s on CPUs without AVX-512 or AMX (a generic loop): a
    # 512^2 probe first, so that such a machine does not spend minutes on the 2048^2 timing
    m16 = n
    if device == "cpu":
        small = a[:512, :512].bfloat16(), b[:512, :512].bfloat16()
        probe_s, _ = time_pair(lambda: torch.mm(*small), None, repeats=1, device=device)
        m16 = n if 2 * 512**3 / probe_s > 0.1 * 2 * n**3 / mm_s else 512
    a16, b16 = a[:m16, :m16].bfloat16(), b[:m16, :m16].bfloat16()
    mm16_s, _ = time_pair(lambda: torch.mm(a16, b16), None, repeats=5 if m16 == n else 1, device=device)
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
        gflops_bf16=2 * m16**3 / mm16_s / 1e9,
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
