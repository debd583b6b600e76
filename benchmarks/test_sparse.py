"""pytest-benchmark suite for hotops.sparse: the `hotops bench --family sparse` layer cases, each
side by side with torch dense and torch.sparse CSR (run: pytest benchmarks/test_sparse.py)."""

import pytest
import torch

from hotops.bench.sparse import BLOCKED_LAYERS, LAYERS, SPARSITIES, _fns
from hotops.bench.sparse_models import DENSE_FOLDED, DENSE_TWIN, e2e_fns

pytest.importorskip("pytest_benchmark")


@pytest.fixture(autouse=True)
def _two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("side", ["hotops", "torch dense", "torch.sparse CSR"])
def test_layer(benchmark, layer, sparsity, side):
    peer = "torch dense" if side == "hotops" else side
    if "bf16" in layer and peer != "torch dense":
        pytest.skip("torch.sparse CSR has no bfloat16 product on the CPU")
    hot, other, _, _ = _fns(layer, sparsity, peer, train=False)
    benchmark.group = f"{layer} @{sparsity:.0%}"
    with torch.inference_mode():
        benchmark(hot if side == "hotops" else other)


@pytest.mark.parametrize("sparsity", [0.7, 0.9, 0.95])
@pytest.mark.parametrize("layer", BLOCKED_LAYERS)
@pytest.mark.parametrize("mask", ["unstructured", "4x1 block-pruned"])
@pytest.mark.parametrize("side", ["hotops blocked", "hotops CSR", "torch dense"])
def test_blocked(benchmark, layer, sparsity, mask, side):
    """The output-channel-blocked format (forced) against the CSR kernel and torch dense, same mask."""
    block = 4 if mask != "unstructured" else None
    peer = "torch dense" if side == "hotops blocked" else side
    hot, other, _, _ = _fns(layer, sparsity, peer, train=False, block=block, layout="blocked")
    benchmark.group = f"{layer} @{sparsity:.0%} {mask}"
    with torch.inference_mode():
        benchmark(hot if side == "hotops blocked" else other)


@pytest.mark.parametrize("layer", ["linear 4096x4096 B=64", "conv 3x3 64->64 56x56"])
@pytest.mark.parametrize("side", ["hotops", "torch dense"])
def test_train_step(benchmark, layer, side):
    hot, other, _, _ = _fns(layer, 0.9, "torch dense", train=True)
    benchmark.group = f"fwd+bwd {layer} @90%"
    benchmark(hot if side == "hotops" else other)


@pytest.mark.parametrize("batch", [1, 32])
@pytest.mark.parametrize("side", ["hotops", DENSE_TWIN, DENSE_FOLDED])
def test_mobilenet(benchmark, batch, side):
    """MobileNetV2-CIFAR at 90 %: fuse(sparsify(net)) against its dense twin as-is and BN-folded."""
    hot, other, _, _ = e2e_fns("mobilenetv2-cifar", batch, 0.9, DENSE_TWIN if side == "hotops" else side)
    benchmark.group = f"mobilenetv2-cifar batch {batch} @90%"
    with torch.inference_mode():
        (hot if side == "hotops" else other)()  # the sparse layers measure their dispatch
        benchmark(hot if side == "hotops" else other)
