"""pytest-benchmark suite of the attention family: the cases of ``hotops bench --family attention``
(same builders), hotops and torch SDPA side by side in one group per case.

    pytest benchmarks/test_attention.py --benchmark-group-by=param:case
"""

import pytest
import torch

from hotops.bench import attention

pytest.importorskip("pytest_benchmark")

CASES = [c for c in attention.cases(quick=False) if "model" not in c and c["B"] == 1 and c["L"] <= 2048]


@pytest.fixture(autouse=True)
def _two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("side", ["hotops", "sdpa"])
@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"{c['passes']}-L{c['L']}-keep{c['keep']:g}-{c['dtype']}"
)
def test_attention(benchmark, case, side):
    benchmark.group = f"{case['passes']} L={case['L']} keep={case['keep']:g} {case['dtype']}"
    benchmark.pedantic(attention.build(side, **case), rounds=3, warmup_rounds=1)
