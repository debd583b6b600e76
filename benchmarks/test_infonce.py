"""pytest-benchmark suite for InfoNCE (not part of the default test run):

    pytest benchmarks/test_infonce.py --benchmark-group-by=param:B,param:dtype

Each case times forward + backward for hotops and for the eager reference at the same shape;
compare the two rows of a group. `hotops bench --family infonce` prints the same comparison as
ratios with memory and roofline.
"""

import pytest
import torch

from hotops.bench.infonce import build

torch.set_num_threads(2)


@pytest.mark.parametrize("side", ["hotops", "eager"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("B", [1024, 4096])
def test_infonce_fwd_bwd(benchmark, side, dtype, B):
    step = build(side, B=B, D=768, dtype=dtype)
    step()
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
