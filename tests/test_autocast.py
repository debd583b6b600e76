"""Inside torch.autocast the modules, info_nce and subsampled_attention take float inputs in
autocast's dtype, as torch's own linear, convolution, matmul and scaled_dot_product_attention do:
the same output dtype whichever path runs, and mixed input dtypes (a Llama's rotary q and k in
float32 beside a bfloat16 v) accepted where torch accepts them."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hotops
from hotops.codebook import CodebookLinear
from hotops.sparse import SparseConv2d, SparseLinear

DTYPES = [torch.bfloat16, torch.float16]


def _close(y, ref, dtype):
    tol = 3e-2 if dtype == torch.bfloat16 else 4e-3
    torch.testing.assert_close(y.float(), ref.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("policy", ["sparse", "dense", "model", "auto"])
def test_sparse_modules_under_autocast(policy, dtype):
    torch.manual_seed(0)
    lin, conv = nn.Linear(48, 24), nn.Conv2d(6, 8, 3, padding=1)
    layers = [
        SparseLinear.from_dense(lin, 0.8, policy=policy),
        SparseConv2d.from_dense(conv, 0.8, policy=policy),
    ]
    for layer, x, dense in [
        (layers[0], torch.randn(1, 48), lambda x, m: F.linear(x, m.to_dense(), m.bias)),
        (layers[0], torch.randn(64, 48), lambda x, m: F.linear(x, m.to_dense(), m.bias)),
        (layers[1], torch.randn(2, 6, 9, 9), lambda x, m: F.conv2d(x, m.to_dense(), m.bias, padding=1)),
    ]:
        x.requires_grad_()
        with torch.autocast("cpu", dtype=dtype):
            y = layer(x)
            ref = dense(x, layer)
        assert y.dtype == ref.dtype == dtype, (layer.backend, y.dtype)
        _close(y, ref, dtype)
        y.float().sum().backward()
        assert x.grad.dtype == torch.float32 and layer.values.grad.dtype == torch.float32
        layer.zero_grad()
    for layer, x, dense in [  # the bound inference calls too
        (layers[0], torch.randn(4, 48), lambda x, m: F.linear(x, m.to_dense(), m.bias)),
        (layers[1], torch.randn(2, 6, 9, 9), lambda x, m: F.conv2d(x, m.to_dense(), m.bias, padding=1)),
    ]:
        with torch.autocast("cpu", dtype=dtype), torch.no_grad():
            ref = dense(x, layer)
            for _ in range(3):
                y = layer(x)
                assert y.dtype == dtype
                _close(y, ref, dtype)
        # SparseLinear binds the autocast dtype (not the full path each call); the convolution
        # kernels take float32 x, so a SparseConv2d's calls take the full path there
        assert (layer._prepared is not None) == (layer is layers[0])
        assert layer(x).dtype == torch.float32  # and nothing stays cast after


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 40])
def test_codebook_linear_under_autocast(rows, dtype):
    torch.manual_seed(0)
    layer = CodebookLinear.from_linear(nn.Linear(64, 32), iters=2)
    x = torch.randn(rows, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=dtype):
        y = layer(x)
        ref = F.linear(x, layer.dequantize().detach(), layer.bias.detach())
    assert y.dtype == ref.dtype == dtype
    _close(y, ref, dtype)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.codebooks.grad is not None


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_takes_mixed_inputs_as_sdpa_does(dtype):
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 12, 16), torch.randn(1, 2, 12, 16)
    v = torch.randn(1, 2, 12, 16).to(dtype)  # q, k float32 (rotary), v from an autocast Linear
    with torch.autocast("cpu", dtype=dtype):
        y = hotops.subsampled_attention(q, k, v, 1.0)
        ref = F.scaled_dot_product_attention(q, k, v)
    assert y.dtype == ref.dtype == dtype
    _close(y, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_info_nce_takes_mixed_inputs_as_matmul_does(dtype):
    torch.manual_seed(0)
    q = torch.randn(8, 16, requires_grad=True)
    d = torch.randn(8, 16).to(dtype).requires_grad_()  # cached float32 queries beside autocast documents
    with torch.autocast("cpu", dtype=dtype):
        loss = hotops.info_nce(q, d, temperature=0.1)
    ref = F.cross_entropy(q.detach().to(dtype).float() @ d.detach().float().T / 0.1, torch.arange(8))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-4)
    loss.backward()
    assert q.grad.dtype == torch.float32 and d.grad.dtype == dtype


def test_float64_passes_unchanged():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = torch.randn(4, 8, dtype=torch.float64)
        with pytest.raises(TypeError, match="float64"):  # refused as outside autocast, not cast
            hotops.info_nce(q, q)


def test_meta_tensors_pass_unchanged():
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast knows no meta device: left as they are
        q = torch.randn(3, 4, device="meta")
        assert hotops.info_nce(q, q).device.type == "meta"
