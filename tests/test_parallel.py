"""The kernels' threads: on torch's OpenMP team when torch uses one, else hotops' own pool; both
give the same results."""

import os
import re

import pytest
import torch
from conftest import busy_processes

import hotops
from hotops import _backend
from hotops.sparse import SparseWeight


def _openmp_loaded() -> bool:
    try:
        with open("/proc/self/maps") as f:
            return re.search(r"lib(gomp|iomp5|omp)\b", f.read()) is not None
    except OSError:
        return False


@pytest.mark.skipif(not _openmp_loaded(), reason="no OpenMP runtime in this process")
def test_kernels_share_torchs_openmp_team():
    if os.environ.get("HOTOPS_POOL") == "own":
        assert not _backend.ext().uses_openmp()
    else:
        assert _backend.ext().uses_openmp()


def test_own_pool_and_openmp_team_agree():
    C = _backend.ext()
    sw = SparseWeight.from_dense(
        torch.randn(300, 200, generator=torch.Generator().manual_seed(0)), sparsity=0.7
    )
    x = torch.randn(70, 200, generator=torch.Generator().manual_seed(1))
    q = torch.randn(2, 4, 200, 32, generator=torch.Generator().manual_seed(2))
    before = _backend._torch_openmp_parallel()
    outs = []
    try:
        for addr in (before, 0):
            C.set_openmp_parallel(addr)
            outs.append((hotops.sparse_linear(x, sw), hotops.subsampled_attention(q, q, q, keep=1.0)))
    finally:
        C.set_openmp_parallel(before)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def _work():
    """Calls that run parallel_for (InfoNCE's row pass, the IVF scan) and parallel_claim (sparse,
    attention), with more items than chunks and fewer."""
    g = torch.Generator().manual_seed(3)
    sw = SparseWeight.from_dense(torch.randn(130, 70, generator=g), sparsity=0.8)
    x = torch.randn(37, 70, generator=g)
    q = torch.randn(1, 2, 65, 16, generator=g)
    a, b = torch.randn(45, 24, generator=g), torch.randn(45, 24, generator=g)
    return (
        hotops.sparse_linear(x, sw),
        hotops.subsampled_attention(q, q, q, keep=1.0),
        hotops.info_nce(a, b, reduction="none"),
    )


def test_thread_counts_and_pools_agree():
    """Every thread count on both pools gives the same results; the own pool, once it has started
    workers for 4 threads, still runs a 2-thread call (it seats at most `threads` of them)."""
    C = _backend.ext()
    before, threads = _backend._torch_openmp_parallel(), torch.get_num_threads()
    want = None
    try:
        for addr in (before, 0):
            C.set_openmp_parallel(addr)
            for n in (1, 4, 2, 3, 2):
                torch.set_num_threads(n)
                got = _work()
                if want is None:
                    want = got
                for a, b in zip(got, want):
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    finally:
        C.set_openmp_parallel(before)
        torch.set_num_threads(threads)


def test_passive_wait_gives_the_same_results():
    """HOTOPS_SPIN_US=0: threads that run out of chunks sleep at once (the futex path)."""
    import subprocess
    import sys

    code = (
        "import torch, sys; sys.path[:0] = sys.argv[1:]; torch.set_num_threads(2)\n"
        "import test_parallel as t\n"
        "torch.save(t._work(), sys.stdout.buffer)"
    )
    env = dict(os.environ, HOTOPS_SPIN_US="0")
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run(
        [sys.executable, "-c", code, here, *sys.path], env=env, capture_output=True, timeout=300
    )
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    import io

    got = torch.load(io.BytesIO(out.stdout))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        want = _work()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_results_hold_beside_busy_processes():
    """With every core busy, calls move between torch's team and the own pool (a region that saw
    a late or preempted teammate sends the next 100 ms to the pool); results stay the same."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        want = _work()
        with busy_processes():
            for _ in range(40):
                for a, b in zip(_work(), want):
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    finally:
        torch.set_num_threads(threads)
