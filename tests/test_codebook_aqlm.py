"""AQLM checkpoints -> hotops (hotops.codebook.from_aqlm / convert_aqlm) and the 16-bit-code
gather kernel, against aqlm's own dequantize -> F.linear on layers built from random codes."""

import pytest
import torch
import torch.nn.functional as F

aqlm = pytest.importorskip("aqlm")
from aqlm import QuantizedLinear
from aqlm.utils import _dequantize_weight, pack_int_data, unpack_int_data
from conftest import assert_close_to_reference

import hotops.codebook as hc
from hotops import _backend
from hotops.codebook import CodebookLinear, WideCodebookLinear, op, reference
from hotops.integrations.aqlm import CodebookLinearSum

# (num_codebooks, nbits, in_group, out_group): AQLM's 1x8, 2x8, 4x8, 8x8, 1x16, 2x16, a small
# in_group, and out_group > 1 for both code widths
FORMATS = [
    (1, 8, 8, 1),
    (2, 8, 8, 1),
    (4, 8, 8, 1),
    (8, 8, 8, 1),
    (1, 16, 8, 1),
    (2, 16, 8, 1),
    (2, 8, 4, 1),
    (1, 8, 8, 2),
    (1, 16, 8, 4),
]
KINDS = {8: (CodebookLinear, CodebookLinearSum), 16: (WideCodebookLinear,)}


def make_layer(in_features, out_features, M, nbits, in_group, out_group, bias=True, dtype=torch.float32):
    layer = QuantizedLinear(in_features, out_features, in_group, out_group, M, nbits, bias=bias, dtype=dtype)
    with torch.no_grad():
        layer.codebooks.normal_()
        layer.codes.data = pack_int_data(torch.randint(0, 2**nbits, layer.codes.shape), nbits)
        layer.scales.uniform_(0.5, 1.5)
        if bias:
            layer.bias.normal_()
    return layer


def aqlm_reference(layer, codes, x, dtype=torch.float32):
    """aqlm's dequantize -> F.linear from the layer's codes in AQLM's own order, in `dtype`."""
    w = _dequantize_weight(
        unpack_int_data(codes, layer.nbits_per_codebook), layer.codebooks.to(dtype), layer.scales.to(dtype)
    )
    return F.linear(x.to(dtype), w, None if layer.bias is None else layer.bias.to(dtype))


def lut_bound(x, module):
    """Worst-case error of the AVX-512 lookup-table kernel's int16 tables at batch 1 (see
    test_codebook.int16_table_bound), summed over a CodebookLinearSum's parts."""
    parts = module.parts if isinstance(module, CodebookLinearSum) else [module]
    if (
        not isinstance(parts[0], CodebookLinear)
        or _backend.ext().isa() != "avx512"
        or x.reshape(-1, x.shape[-1]).shape[0] % 16 != 1
    ):
        return 0.0
    bound = 0.0
    for p in parts:
        w = p.weight
        row = x.reshape(-1, w.in_features)[-1].double().reshape(-1, w.in_group)
        tables = torch.einsum("jt,omct->ojmc", row, w.codebooks.double())
        bound += (
            w.scales.abs().max() * tables.shape[1] * tables.shape[2] * tables.abs().max() / 65534
        ).item()
    return bound


def check(module, layer, codes, x, atol=1e-5):
    out = module(x)
    assert out.shape == (*x.shape[:-1], layer.out_features) and out.dtype == x.dtype
    ref64 = aqlm_reference(layer, codes, x.double(), torch.float64)
    assert_close_to_reference(out, ref64, aqlm_reference(layer, codes, x), atol=atol + lut_bound(x, module))


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: "{}x{}-g{}-o{}".format(*f))
@pytest.mark.parametrize("batch", [1, 5, 20])
def test_from_aqlm_equals_aqlm(fmt, batch, isa):
    M, nbits, in_group, out_group = fmt
    layer = make_layer(64, 48, M, nbits, in_group, out_group)
    module = hc.from_aqlm(layer)
    assert isinstance(module, KINDS[nbits]) and module.in_features == 64 and module.out_features == 48
    check(module, layer, layer.codes.detach(), torch.randn(batch, 64))
    assert isinstance(module, CodebookLinearSum) == (nbits == 8 and M > 2)


@pytest.mark.parametrize(
    "fmt",
    [(1, 4, 8, 1), (2, 4, 8, 1), (1, 6, 4, 1), (3, 7, 8, 2), (1, 10, 8, 1), (1, 12, 8, 2), (2, 15, 8, 1)],
    ids=lambda f: "{}x{}-g{}-o{}".format(*f),
)
def test_from_aqlm_other_code_widths_equal_aqlms_forward(fmt):
    """aqlm stores codes >= 2^(nbits - 1) as negatives for every width: 4- to 15-bit layers
    convert too, and equal aqlm's own forward."""
    M, nbits, in_group, out_group = fmt
    layer = make_layer(64, 48, M, nbits, in_group, out_group)
    assert (layer.codes < 0).any()  # the wrapped codes the conversion must unwrap
    module = hc.from_aqlm(layer)
    assert isinstance(module, (CodebookLinear, CodebookLinearSum) if nbits <= 8 else WideCodebookLinear)
    x = torch.randn(5, 64)
    check(module, layer, layer.codes.detach(), x)
    with torch.no_grad():
        torch.testing.assert_close(module(x), layer(x), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("shape, M", [((64, 48), 2), ((64, 8), 1)], ids=["tall-2x8", "square-groups-1x8"])
def test_layers_aqlm_has_run(shape, M):
    """aqlm reorders 8-bit codes in place on its first CPU call; layers convert before and after,
    also when in_groups == out_groups (64 / 8 == 8) so that the shapes cannot tell."""
    numba = pytest.importorskip("numba")
    layer = make_layer(*shape, M, 8, 8, 1)
    codes = layer.codes.detach().clone()
    x = torch.randn(2, shape[0])
    before = hc.from_aqlm(layer)
    threads = numba.get_num_threads()
    numba.set_num_threads(1)  # aqlm's CPU kernel races on its output above one numba thread
    try:
        with torch.no_grad():
            ran = layer(x)
    finally:
        numba.set_num_threads(threads)
    assert not torch.equal(layer.codes.detach(), codes) or shape[0] // 8 == shape[1]
    torch.testing.assert_close(ran, aqlm_reference(layer, codes, x), rtol=1e-5, atol=1e-5)
    after = hc.from_aqlm(layer)
    for module in (before, after):
        check(module, layer, codes, x)
    assert torch.equal(before.codes, after.codes)


def test_convert_aqlm_swaps_every_layer():
    model = torch.nn.Sequential(
        make_layer(64, 40, 2, 8, 8, 1),
        torch.nn.ReLU(),
        torch.nn.Sequential(make_layer(40, 24, 1, 16, 8, 1, bias=False), torch.nn.GELU()),
        make_layer(24, 16, 4, 8, 8, 1),
    )
    x = torch.randn(3, 64)
    with torch.no_grad():
        h = torch.relu(aqlm_reference(model[0], model[0].codes, x))
        h = F.gelu(aqlm_reference(model[2][0], model[2][0].codes, h))
        expected = aqlm_reference(model[3], model[3].codes, h)
    converted = hc.convert_aqlm(model)
    assert converted is model
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())
    assert [type(m) for m in (model[0], model[2][0], model[3])] == [
        CodebookLinear,
        WideCodebookLinear,
        CodebookLinearSum,
    ]
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)
    single = make_layer(16, 8, 1, 16, 8, 1)
    assert isinstance(hc.convert_aqlm(single), WideCodebookLinear)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoint(dtype):
    """fp16/bf16 checkpoints keep their codebooks' dtype (the gather kernel reads them as they
    are: 1 MiB for 65536 x 8); products run in float32, bfloat16 or float16 activations."""
    layer = make_layer(64, 32, 1, 16, 8, 1, dtype=dtype)
    module = hc.from_aqlm(layer)
    assert module.codebooks.dtype == dtype
    x = torch.randn(4, 64)
    ref64 = aqlm_reference(layer, layer.codes, x.double(), torch.float64)
    assert_close_to_reference(module(x), ref64, aqlm_reference(layer, layer.codes, x), atol=1e-5)
    for half in (torch.bfloat16, torch.float16):
        y = module(x.to(half))
        assert y.dtype == half
        torch.testing.assert_close(y.float(), ref64.float(), rtol=2e-2, atol=2e-2 * ref64.abs().max().item())


def test_wide_gradients():
    layer = make_layer(64, 24, 2, 16, 8, 2)
    module = hc.from_aqlm(layer)
    x = torch.randn(3, 64, requires_grad=True)
    dy = torch.randn(3, 24)
    (module(x) * dy).sum().backward()
    cb = module.codebooks.detach().clone().requires_grad_()
    s = module.scales.detach().clone().requires_grad_()
    b = module.bias.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    w = reference.dequantize(module.codes, cb, s, module.group_ptr, module.perm)
    (F.linear(x2, w, b) * dy).sum().backward()
    for got, want in (
        (x.grad, x2.grad),
        (module.codebooks.grad, cb.grad),
        (module.scales.grad, s.grad),
        (module.bias.grad, b.grad),
    ):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_lookup_table_input_gradient():
    layer = make_layer(64, 24, 2, 8, 8, 1)
    module = hc.from_aqlm(layer)
    x = torch.randn(2, 64, requires_grad=True)
    module(x).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    aqlm_reference(layer, layer.codes, x2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)


def test_wide_opcheck():
    layer = make_layer(32, 20, 1, 16, 8, 1)
    m = hc.from_aqlm(layer)
    x = torch.randn(3, 32, requires_grad=True)
    args = (
        m.codes,
        m.codebooks.detach().requires_grad_(),
        m.scales.detach().requires_grad_(),
        m.group_ptr,
        m.perm,
    )
    torch.library.opcheck(op.codebook_wide_matmul, (x, *args, m.bias.detach()))
    torch.library.opcheck(op.codebook_wide_dequantize, args)


@pytest.mark.parametrize("fmt", [(1, 8, 8, 1), (2, 8, 8, 1), (4, 8, 8, 1), (1, 16, 8, 1), (2, 8, 8, 2)])
def test_from_aqlm_owns_its_tensors(fmt):
    """With out_group 1 the permuted codebooks were contiguous already and shared the aqlm
    layer's storage (and the bias always did): training the copy changed the original."""
    layer = make_layer(64, 48, *fmt)
    before = {k: v.detach().clone() for k, v in layer.state_dict().items()}
    module = hc.from_aqlm(layer)
    with torch.no_grad():
        for p in module.parameters():
            if p.is_floating_point():
                p.add_(1.0)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_refusals():
    with pytest.raises(ValueError, match="in_group 8 only"):
        hc.from_aqlm(make_layer(64, 16, 1, 16, 4, 1))
    with pytest.raises(ValueError, match="lookup-table format"):
        hc.from_aqlm(make_layer(64, 16, 2, 8, 16, 1))
    with pytest.raises(TypeError, match="aqlm.QuantizedLinear"):
        hc.from_aqlm(torch.nn.Linear(8, 8))


def test_wide_codes_past_the_codebook():
    codes = torch.randint(0, 1000, (16, 4, 1)).to(torch.int16)
    cb = torch.randn(1, 1, 1000, 8)
    bad = codes.clone()
    bad[5, 2, 0] = 1000
    with pytest.raises(ValueError, match="smaller than codebook_size 1000"):
        WideCodebookLinear(bad, cb, torch.ones(16))
    module = WideCodebookLinear(codes, cb, torch.ones(16))
    module.codes[3, 1, 0] = 1001  # past the constructor's check: the kernels refuse it
    with pytest.raises(ValueError, match="smaller than the codebook size"):
        module(torch.randn(2, 32))
    with pytest.raises(ValueError, match="in_features = 32"):
        module(torch.randn(2, 31))
