"""pytest-benchmark suite of the codebook family: the same cases as `hotops bench --family
codebook` (hotops/bench/codebook.py), each side in its own benchmark so the suite's table shows
them side by side. Not part of the default test run:

    python -m pytest benchmarks/test_codebook.py --benchmark-only
"""

import pytest
import torch

from hotops.bench import codebook as cases

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]


@pytest.mark.parametrize("B", [1, 4, 16])
@pytest.mark.parametrize("N,K", SHAPES)
@pytest.mark.parametrize("side", ["hotops", "dense", "aqlm"])
def test_codebook_matmul(benchmark, side, N, K, B):
    if side == "aqlm" and cases.aqlm_missing():
        pytest.skip(cases.aqlm_missing())
    fn = cases.build(side, N=N, K=K, B=B, config="2x8")
    benchmark.group = f"{N}x{K} B={B} 2 bits/weight (2x8)"
    benchmark(fn)


@pytest.mark.parametrize("B", [1, 4, 16])
@pytest.mark.parametrize("side", ["hotops", "dense"])
def test_codebook_bf16(benchmark, side, B):
    benchmark.group = f"4096x4096 B={B} bf16"
    benchmark(cases.build(side, N=4096, K=4096, B=B, config="2x8", dtype="bf16"))


def test_same_output_as_aqlm():
    """Same weight, same product. One numba thread: aqlm's kernel adds into one output vector
    from a prange over input groups, which races (wrong outputs now and then) with more."""
    if cases.aqlm_missing():
        pytest.skip(cases.aqlm_missing())
    import numba

    numba.set_num_threads(1)
    ours = cases.build("hotops", N=256, K=512, B=2, config="2x8")()
    theirs = cases.build("aqlm", N=256, K=512, B=2, config="2x8")()
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
