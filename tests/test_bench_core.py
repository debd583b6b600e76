"""`hotops bench`'s own arithmetic: the roofline column."""

import dataclasses

import pytest

from hotops.bench import core


def test_bf16_roofline_is_the_faster_of_torchs_two_gemm_rates():
    """A bf16 product can always run in float32: where torch's bf16 GEMM is a generic loop (CPUs
    without AVX-512 or AMX), the float32 rate is the bf16 roofline, never 1 GFLOP/s."""
    slow_bf16 = core.Machine("cpu", "avx2", 2, "", "", "", gflops=100.0, gflops_bf16=1.0, gbps=10.0, peers={})
    fast_bf16 = dataclasses.replace(slow_bf16, gflops_bf16=400.0)
    r = core.Result("f", "case", "peer", 1.0, 2.0, "ok", work="flops_bf16", amount=50e9)
    assert r.roofline_pct(slow_bf16) == pytest.approx(50.0)
    assert r.roofline_pct(fast_bf16) == pytest.approx(12.5)
    fp32 = dataclasses.replace(r, work="flops")
    assert fp32.roofline_pct(fast_bf16) == pytest.approx(50.0)
