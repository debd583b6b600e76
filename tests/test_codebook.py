import math

import pytest
import torch
from _faults import same_nonfinite
from conftest import ISAS, assert_close_to_reference
from hypothesis import given, settings
from hypothesis import strategies as st

import hotops
from hotops import _backend
from hotops.codebook import CodebookLinear, CodebookWeight, codebook_matmul, op, reference
from hotops.codebook import format as fmt
from hotops.codebook.format import code_bits

ATOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}
# conftest's ISAs, plus the avx512 kernels with AVX512_VBMI where the CPU has it ("avx512" alone
# then runs without it: both batch-1 paths are tested)
KERNELS = [*ISAS, *(["avx512+vbmi"] if _backend.ext().cpu_has("vbmi") else [])]


@pytest.fixture(params=KERNELS)
def isa(request):
    """Overrides conftest's: runs a test once per kernel variant; yields "scalar", "avx2",
    "avx512" or "avx512+vbmi"."""
    ext = _backend.ext()
    vbmi_before = ext.feature("vbmi")
    ext.set_isa(request.param.split("+")[0])
    ext.set_feature("vbmi", request.param.endswith("+vbmi"))
    yield request.param
    ext.set_isa(ext.best_isa())
    ext.set_feature("vbmi", vbmi_before)


def random_weight(N, K, in_group=4, num_codebooks=1, C=256, groups=1, permuted=False, scale=1.0):
    codes = torch.randint(0, C, (N, K // in_group, num_codebooks), dtype=torch.uint8)
    codebooks = torch.randn(groups, num_codebooks, C, in_group) * scale
    cuts = sorted(torch.randint(0, N + 1, (groups - 1,)).tolist())
    group_ptr = torch.tensor([0, *cuts, N], dtype=torch.int64)
    perm = torch.randperm(N) if permuted else None
    return CodebookWeight(codes, codebooks, torch.rand(N) + 0.5, group_ptr, perm)


def parts(w):
    return w.codes, w.codebooks, w.scales, w.group_ptr, w.perm


def int16_table_bound(x, w):
    """Worst-case error of the AVX-512 kernel's int16 tables, used for a lone batch row (the
    last row when rows % 16 == 1): half a step, max|table| / 32767, per slot, times the scale."""
    K = w.in_features
    if _backend.ext().isa() != "avx512" or x.numel() // max(1, K) % 16 != 1:
        return 0.0
    row = x.reshape(-1, K)[-1].double().reshape(-1, w.in_group)
    tables = torch.einsum("jt,omct->ojmc", row, w.codebooks.double())
    slots = tables.shape[1] * tables.shape[2]
    return (w.scales.abs().max() * slots * tables.abs().max() / 65534).item()


def check_product(x, w, bias=None):
    out = codebook_matmul(x, w, bias)
    cb64, s64 = w.codebooks.double(), w.scales.double()
    ref64 = reference.codebook_matmul(
        x.double(), w.codes, cb64, s64, w.group_ptr, w.perm, None if bias is None else bias.double()
    )
    ref_lp = reference.codebook_matmul(x, *parts(w), bias)
    assert out.dtype == x.dtype and out.shape == (*x.shape[:-1], w.out_features)
    if out.numel():
        assert_close_to_reference(out, ref64, ref_lp, atol=ATOL[x.dtype] + int16_table_bound(x, w))


@pytest.mark.parametrize(
    "in_group,num_codebooks,C",
    [(1, 1, 4), (2, 1, 16), (4, 1, 256), (8, 2, 256), (8, 1, 37), (8, 3, 256), (4, 4, 37)],
)
@pytest.mark.parametrize("B", [1, 3, 16, 21])
def test_matches_reference(isa, in_group, num_codebooks, C, B):
    w = random_weight(37, 8 * 5, in_group, num_codebooks, C, groups=3, permuted=True)
    check_product(torch.randn(B, 40), w, torch.randn(37))


@pytest.mark.parametrize("in_group,num_codebooks", [(2, 1), (4, 1), (8, 2), (8, 3)])
@pytest.mark.parametrize("B", [17, 40])
def test_tables_above_max_batch(monkeypatch, isa, in_group, num_codebooks, B):
    """The tables past LUT_MAX_BATCH rows (16-row blocks and a remainder), which the path rule
    picks for large layers only: forced here on a small one."""
    monkeypatch.setattr(op, "use_tables", lambda *a, **k: True)
    w = random_weight(37, 8 * 5, in_group, num_codebooks, groups=3, permuted=True)
    check_product(torch.randn(B, 40), w, torch.randn(37))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B", [1, 2, 5, 16])
def test_half_precision_activations(isa, dtype, B):
    w = random_weight(50, 64, 8, 2)
    check_product(torch.randn(B, 64).to(dtype), w)


@pytest.mark.parametrize(
    "in_group,num_codebooks,C", [(4, 1, 256), (4, 2, 37), (8, 1, 37), (8, 2, 256), (8, 3, 256)]
)
@pytest.mark.parametrize("B", [2, 5, 16, 17, 64, 65, 130])
def test_bf16_tile_products(bf16_path, in_group, num_codebooks, C, B):
    """bf16 activations in bf16 (AMX tiles or vdpbf16ps): 32-input tiles, passes of up to 64 batch
    rows (a partial one), a row block past N = 37, three row groups, permuted rows and a bias; error within twice
    the bf16 reference's own. Three codebooks take the float32 tables (the tiles decode one or two)."""
    w = random_weight(37, 96, in_group, num_codebooks, C, groups=3, permuted=True)
    tiles = bf16_path != "float32" and num_codebooks <= 2
    assert op.bf16_kernel(torch.bfloat16, in_group, 96, num_codebooks) == tiles
    check_product(torch.randn(B, 96).bfloat16(), w, torch.randn(37))
    check_product(torch.randn(B, 96).bfloat16() * 1e4, w)  # large products stay in float32
    check_product(torch.randn(B, 160).bfloat16()[:, 32:128], w)  # rows 160 apart


@pytest.mark.parametrize("B", [2, 17])
def test_bf16_tile_products_propagate_nonfinite_x(bf16_path, B):
    """The tiles multiply x as F.linear does: inf and NaN in x land where the dense product puts
    them, and a finite row beside them is unaffected."""
    w = random_weight(20, 64, 8, 2)
    x = torch.randn(B, 64)
    x[0, 3] = math.inf
    x[1, 5] = -math.inf
    x[-1, 7] = math.nan
    xb = x.bfloat16()
    out = codebook_matmul(xb, w)
    same_nonfinite(out, reference.codebook_matmul(xb.double(), *parts(w)), "y")
    if B > 2:
        check_product(xb[2:3], w)


@pytest.mark.parametrize("native", [True, False])  # torch's GEMM in bf16/fp16, or float32 tiles
@pytest.mark.parametrize("permuted", [True, False])
@pytest.mark.parametrize("tile_bytes", [64 * 4 * 16, 8 << 20])  # several row tiles, one
def test_gemm_path(monkeypatch, native, permuted, tile_bytes):
    monkeypatch.setattr(_backend, "torch_gemm_is_fast", lambda dtype: native)
    monkeypatch.setattr(op, "use_tables", lambda *a, **k: False)
    monkeypatch.setattr(op, "GEMM_TILE_BYTES", tile_bytes)
    w = random_weight(70, 64, 4, 1, groups=2, permuted=permuted)
    check_product(torch.randn(9, 64), w, torch.randn(70))
    check_product(torch.randn(2, 3, 64), w)
    check_product(torch.randn(9, 64).bfloat16(), w, torch.randn(70))
    check_product(torch.randn(9, 64).half(), w)
    check_product(torch.randn(0, 64), w, torch.randn(70))


# The path rule (op.use_tables), at the shapes it was fitted on: (out_features, in_group,
# num_codebooks, largest batch on the tables, smallest on the GEMM path); None: tables at every batch.
PATH_RULE = [
    (384, 4, 1, 32, 64),  # all-MiniLM-L6-v2 1x8/4: attention and FFN-out (N = 384)
    (1536, 4, 1, 128, 256),  # FFN-in (N = 1536)
    (384, 2, 1, 16, 32),  # 1x8/2
    (1536, 2, 1, 32, 64),
    (384, 8, 2, 32, 64),  # 2x8
    (1536, 8, 2, 128, 256),
    (4096, 2, 1, 64, 128),  # 1x8/2 at a Llama shape
    (4096, 1, 1, 16, 32),  # one lookup per weight: tables only for small batches
    (4096, 8, 2, None, None),  # 2x8 and 1x8/4 at Llama shapes: the tables at every batch
    (11008, 8, 2, None, None),
    (4096, 4, 1, None, None),
    (11008, 4, 1, None, None),
]


@pytest.mark.parametrize("N,g,M,last_tables,first_gemm", PATH_RULE)
def test_path_rule(N, g, M, last_tables, first_gemm):
    batches = [1, 2, 8, 16, 32, 64, 128, 256, 512, 1024, 5120, 8192]
    picks = {B: op.use_tables(B, N, g, M) for B in batches}
    assert all(picks[B] for B in batches if B <= op.LUT_MAX_BATCH)  # small batches: always tables
    if last_tables is None:
        assert all(picks.values())
    else:
        assert picks[last_tables] and not picks[first_gemm]
        assert [B for B in batches if picks[B]] == [B for B in batches if B <= last_tables]  # one crossover


def test_path_rule_table_build_per_group():
    """Every row group builds its own tables: with 12 groups of 32 rows the tables' build is
    shared by fewer outputs and the GEMM path takes over at a smaller batch."""
    assert op.use_tables(32, 384, 4, 1, 256, 1) and not op.use_tables(32, 384, 4, 1, 256, 12)
    assert op.use_tables(128, 1536, 4, 1, 256, 1) and not op.use_tables(128, 1536, 4, 1, 256, 4)
    assert op.use_tables(64, 1536, 4, 1, 16, 1)  # 16 codewords: a sixteenth of the entries


@pytest.mark.parametrize("B,tables", [(16, True), (64, False)])
def test_path_taken(monkeypatch, B, tables):
    """The product runs the path use_tables names (1x8/4 at 384 x 384: the GEMM path from 64
    rows), and both paths match the reference there."""
    calls = []
    dequantize = op._cpu_dequantize_rows
    monkeypatch.setattr(op, "_cpu_dequantize_rows", lambda *a: calls.append(1) or dequantize(*a))
    w = random_weight(384, 384, 4, 1, permuted=True, scale=0.05)
    assert op.use_tables(B, 384, 4, 1) == tables
    check_product(torch.randn(B, 384), w, torch.randn(384))
    assert bool(calls) != tables


@pytest.mark.parametrize("threads", [1, 3, 5])
@pytest.mark.parametrize("B", [1, 6, 16])
def test_thread_splits(isa, threads, B):
    """Tasks split the code slots (each table built once) and the row blocks; partial sums meet
    in a last pass. Several groups, a permutation and C < 256 cross the task boundaries."""
    w = random_weight(70, 512, 8, 2, C=200, groups=3, permuted=True)
    x, bias = torch.randn(B, 512), torch.randn(70)
    out = torch.empty(B, 70)
    _backend.ext().codebook_matmul(x, *parts(w)[:4], w.perm, bias, out, threads)
    ref64 = reference.codebook_matmul(
        x.double(), w.codes, w.codebooks.double(), w.scales.double(), w.group_ptr, w.perm, bias.double()
    )
    ref_lp = reference.codebook_matmul(x, *parts(w), bias)
    assert_close_to_reference(out, ref64, ref_lp, atol=1e-4 + int16_table_bound(x, w))


def test_int16_tables_precision(isa):
    """The batch-1 int16 tables of the AVX-512 kernel (as int16 or, with VBMI, as byte planes)
    on a layer of real size: the error stays within 1e-4 of the output's largest magnitude
    (measured ~4e-5, the RMS error alike; float tables on the other ISAs: ~1e-7)."""
    from hotops.bench.codebook import make_weight

    w = make_weight(512, 2048, "2x8")
    x = torch.randn(1, 2048)
    ref = reference.codebook_matmul(x.double(), w.codes, w.codebooks.double(), w.scales.double(), w.group_ptr)
    err = (codebook_matmul(x, w).double() - ref).abs().max() / ref.abs().max()
    assert err < (1e-4 if isa.startswith("avx512") else 1e-6)


def test_batch1_nan_takes_the_float_tables(isa):
    w = random_weight(40, 64, 8, 2)
    x = torch.randn(1, 64)
    x[0, 3] = float("nan")
    assert torch.isnan(codebook_matmul(x, w)).all()
    x[0, 3] = float("inf")
    assert not torch.isfinite(codebook_matmul(x, w)).any()


def test_leading_dims_and_empty():
    w = random_weight(19, 16, 2, 1, C=16)
    check_product(torch.randn(2, 3, 16), w)
    assert codebook_matmul(torch.randn(0, 16), w).shape == (0, 19)
    one = random_weight(1, 8, 8, 1)
    check_product(torch.randn(4, 8), one)


def test_nan_propagates():
    w = random_weight(20, 16, 4, 1)
    x = torch.randn(3, 16)
    x[1, 5] = float("nan")
    y = codebook_matmul(x, w)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()


def test_dequantize_and_bits():
    w = random_weight(33, 24, 4, 2, groups=2, permuted=True)
    dense = w.dequantize()
    torch.testing.assert_close(dense, reference.dequantize(*parts(w)))
    x = torch.randn(5, 24)
    torch.testing.assert_close(codebook_matmul(x, w), x @ dense.T, rtol=1e-5, atol=1e-5)
    # codes 3 blocks x 12 slots x 16 bytes, codebooks, scales, group_ptr, perm: all as stored
    stored = 3 * 12 * 16 + 2 * 2 * 256 * 4 * 4 + 33 * 4 + 3 * 8 + 33 * 8
    assert w.bits_per_weight == pytest.approx(8 * stored / (33 * 24))
    assert torch.equal(w.code_indices(), fmt.unpack_codes(w.codes, 33, 2))


def test_pack_roundtrip():
    codes = torch.randint(0, 256, (35, 6, 2), dtype=torch.uint8)
    packed = fmt.pack_codes(codes)
    assert packed.shape == (3, 12, 16)
    assert torch.equal(fmt.unpack_codes(packed, 35, 2), codes)


def grads_of(fn, leaves):
    out = fn(*leaves)
    g = torch.randn_like(out)
    return torch.autograd.grad(out, leaves, g), g


@pytest.mark.parametrize("permuted,num_codebooks", [(False, 2), (True, 2), (True, 3)])
def test_gradients(permuted, num_codebooks):
    w = random_weight(29, 32, 4, num_codebooks, C=64, groups=2, permuted=permuted)
    x = torch.randn(6, 32, requires_grad=True)
    cb = w.codebooks.clone().requires_grad_()
    s = w.scales.clone().requires_grad_()
    b = torch.randn(29, requires_grad=True)
    fn = lambda x_, cb_, s_, b_: op.codebook_matmul(x_, w.codes, cb_, s_, w.group_ptr, w.perm, b_)  # noqa: E731
    got, g = grads_of(fn, [x, cb, s, b])
    leaves64 = [t.detach().double().requires_grad_() for t in (x, cb, s, b)]
    out64 = reference.codebook_matmul(leaves64[0], w.codes, *leaves64[1:3], w.group_ptr, w.perm, leaves64[3])
    want = torch.autograd.grad(out64, leaves64, g.double())
    for a, e in zip(got, want):
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("native", [True, False])  # dy W in bf16 (torch's GEMM) or in float32
def test_bf16_input_gradient(monkeypatch, native):
    monkeypatch.setattr(_backend, "torch_gemm_is_fast", lambda dtype: native)
    w = random_weight(29, 32, 4, 2, C=64, groups=2, permuted=True)
    x = torch.randn(6, 32).bfloat16().requires_grad_()
    fn = lambda x_: op.codebook_matmul(x_, w.codes, w.codebooks, w.scales, w.group_ptr, w.perm, None)  # noqa: E731
    (dx,), g = grads_of(fn, [x])
    assert dx.dtype == torch.bfloat16
    want = g.double() @ reference.dequantize(w.codes, w.codebooks, w.scales, w.group_ptr, w.perm).double()
    torch.testing.assert_close(dx.double(), want, rtol=2e-2, atol=2e-2)


def test_dequantize_gradients():
    w = random_weight(21, 16, 2, 1, C=16, groups=2, permuted=True)
    cb = w.codebooks.clone().requires_grad_()
    s = w.scales.clone().requires_grad_()
    got, g = grads_of(lambda cb_, s_: op.codebook_dequantize(w.codes, cb_, s_, w.group_ptr, w.perm), [cb, s])
    cb64, s64 = cb.detach().double().requires_grad_(), s.detach().double().requires_grad_()
    want = torch.autograd.grad(
        reference.dequantize(w.codes, cb64, s64, w.group_ptr, w.perm), [cb64, s64], g.double()
    )
    for a, e in zip(got, want):
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-5)


def test_opcheck():
    w = random_weight(18, 16, 4, 2, C=32, groups=2, permuted=True)
    x = torch.randn(3, 16, requires_grad=True)
    cb, s = w.codebooks.clone().requires_grad_(), w.scales.clone().requires_grad_()
    torch.library.opcheck(op.codebook_matmul, (x, w.codes, cb, s, w.group_ptr, w.perm, torch.randn(18)))
    torch.library.opcheck(
        op.codebook_matmul, (x.detach(), w.codes, w.codebooks, w.scales, w.group_ptr, None, None)
    )
    torch.library.opcheck(op.codebook_dequantize, (w.codes, cb, s, w.group_ptr, w.perm))


def test_compile_fullgraph():
    layer = CodebookLinear(random_weight(24, 16, 4, 1, C=64, permuted=True), torch.randn(24))
    x = torch.randn(5, 16, requires_grad=True)

    def step(x_):
        return torch.relu(layer(x_)).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(x)
    loss.backward()
    gx, gcb = x.grad.clone(), layer.codebooks.grad.clone()
    x.grad = layer.codebooks.grad = None
    step(x).backward()
    torch.testing.assert_close(loss, step(x))
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gcb, layer.codebooks.grad)


@settings(max_examples=25, deadline=None)
@given(
    N=st.integers(1, 40),
    J=st.integers(1, 6),
    in_group=st.sampled_from([1, 2, 4, 8]),
    M=st.integers(1, fmt.MAX_CODEBOOKS),
    C=st.integers(1, 256),
    groups=st.integers(1, 3),
    B=st.integers(0, 20),
    permuted=st.booleans(),
)
def test_property_matches_reference(N, J, in_group, M, C, groups, B, permuted):
    w = random_weight(N, J * in_group, in_group, M, C, groups, permuted)
    check_product(torch.randn(B, J * in_group), w)


# ------------------------------------------------------------------ layers and initialisation


def test_from_linear_reconstructs_and_is_seeded():
    lin = torch.nn.Linear(64, 48)
    a = CodebookLinear.from_linear(lin, bits_per_weight=2, in_group=4, num_codebooks=1, num_groups=2)
    b = CodebookLinear.from_linear(lin, bits_per_weight=2, in_group=4, num_codebooks=1, num_groups=2)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.codebooks, b.codebooks)
    err = (a.dequantize() - lin.weight).norm() / lin.weight.norm()
    assert err < 0.3
    x = torch.randn(7, 64)
    torch.testing.assert_close(
        a(x), torch.nn.functional.linear(x, a.dequantize(), lin.bias), rtol=1e-5, atol=1e-5
    )
    assert a.bits_per_weight == a.weight.bits_per_weight


def test_layer_state_dict_roundtrip():
    lin = torch.nn.Linear(32, 20)
    a = CodebookLinear.from_linear(lin, bits_per_weight=2, in_group=8, num_codebooks=2, num_groups=2, iters=3)
    b = CodebookLinear(random_weight(20, 32, 8, 2, groups=2, permuted=True), torch.zeros(20))
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 32)
    torch.testing.assert_close(a(x), b(x))


# ------------------------------------------------------------------ bad input


def test_refuses_out_of_range_codes():
    codes = torch.full((4, 2, 1), 16, dtype=torch.uint8)
    with pytest.raises(ValueError, match="smaller than codebook_size 16"):
        CodebookWeight(codes, torch.randn(1, 1, 16, 4), torch.ones(4))
    w = random_weight(4, 8, 4, 1, C=16)
    bad = w.codes.clone()
    bad[0, 0, 0] = 200  # bypassing the constructor: the C++ kernels still refuse
    x, out = torch.randn(1, 8), torch.empty(1, 4)
    ext = _backend.ext()
    with pytest.raises(ValueError, match="smaller than the codebook size"):
        ext.codebook_matmul(x, bad, w.codebooks, w.scales, w.group_ptr, None, None, out, 1)
    with pytest.raises(ValueError, match="smaller than the codebook size"):
        ext.codebook_dequantize(bad, w.codebooks, w.scales, w.group_ptr, 0, 4, torch.empty(4, 8), 1)


def test_bf16_tile_products_refuse_out_of_range_codes(bf16_path):
    w = random_weight(40, 64, 8, 2, C=37)
    bad = w.codes.clone()
    bad[2, 1, 0] = 37  # the third row block, past the constructor's check
    x, out = torch.randn(5, 64).bfloat16(), torch.empty(5, 40, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="smaller than the codebook size"):
        _backend.ext().codebook_matmul(x, bad, w.codebooks, w.scales, w.group_ptr, None, None, out, 2)


def test_bad_inputs():
    w = random_weight(6, 16, 4, 1)
    with pytest.raises(ValueError, match="in_features = 16"):
        codebook_matmul(torch.randn(2, 12), w)
    with pytest.raises(TypeError, match="dtype float64"):
        codebook_matmul(torch.randn(2, 16).double(), w)
    with pytest.raises(TypeError, match="dtype int64"):
        codebook_matmul(torch.ones(2, 16, dtype=torch.long), w)
    with pytest.raises(ValueError, match="bias must have"):
        codebook_matmul(torch.randn(2, 16), w, torch.randn(5))
    with pytest.raises(TypeError, match="CodebookWeight"):
        codebook_matmul(torch.randn(2, 16), torch.randn(6, 16))
    with pytest.raises(ValueError, match="in_group must be one of"):
        CodebookWeight(torch.zeros(6, 4, 1, dtype=torch.uint8), torch.randn(1, 1, 16, 3), torch.ones(6))
    with pytest.raises(ValueError, match="group_ptr must rise"):
        CodebookWeight(
            torch.zeros(6, 4, 1, dtype=torch.uint8),
            torch.randn(2, 1, 16, 4),
            torch.ones(6),
            torch.tensor([0, 7, 6]),
        )
    with pytest.raises(ValueError, match="permutation"):
        CodebookWeight(
            torch.zeros(6, 4, 1, dtype=torch.uint8),
            torch.randn(1, 1, 16, 4),
            torch.ones(6),
            perm=torch.tensor([0, 0, 1, 2, 3, 4]),
        )
    with pytest.raises(ValueError, match="one per row"):
        CodebookWeight(torch.zeros(6, 4, 1, dtype=torch.uint8), torch.randn(1, 1, 16, 4), torch.ones(5))
    with pytest.raises(ValueError, match="x has 12 features"):
        _backend.ext().codebook_matmul(torch.randn(1, 12), *parts(w)[:4], None, None, torch.empty(1, 6), 1)


@pytest.mark.parametrize(
    "bits,in_group,M,msg",
    [
        (2, 8, 1, "16-bit codes"),
        (3, 1, 2, "whole number"),
        (2, 3, 1, "in_group must be one of"),
        (2, 4, 3, "whole number"),
        (5, 8, 5, "num_codebooks must be 1 to 4"),
    ],
)
def test_refuses_combinations_that_do_not_fit(bits, in_group, M, msg):
    with pytest.raises(ValueError, match=msg):
        code_bits(bits, in_group, M)
    with pytest.raises(ValueError, match=msg):
        CodebookLinear.from_linear(
            torch.nn.Linear(24, 8), bits_per_weight=bits, in_group=in_group, num_codebooks=M
        )


def test_exports():
    assert hotops.codebook_matmul is codebook_matmul
    assert hotops.nn.CodebookLinear is CodebookLinear


def test_bias_gradient_of_bfloat16_activations_is_summed_in_float32():
    """The bias gradient sums dy over every row: a bfloat16 sum over 4096 rows was off by 1.5e-3."""
    torch.manual_seed(0)
    layer = CodebookLinear.from_linear(torch.nn.Linear(64, 32), iters=2)
    x = torch.randn(4096, 64).bfloat16()
    dy = torch.randn(4096, 32).bfloat16()
    layer(x).backward(dy)
    torch.testing.assert_close(layer.bias.grad, dy.double().sum(0).float(), rtol=1e-6, atol=1e-4)
