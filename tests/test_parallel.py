"""The kernels' threads: on torch's OpenMP team when torch uses one, else hotops' own pool; both
give the same results."""

import os
import re

import pytest
import torch

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
