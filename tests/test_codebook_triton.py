"""The codebook family's Triton kernels (python/hotops/codebook/triton.py): run on CPU tensors in
the interpreter (TRITON_INTERPRET=1, set by conftest) on tiny shapes, against the plain-torch
reference; the same kernels on a GPU in the `gpu` tests (benchmarks/gpu_check.sh)."""

import pytest
import torch
from conftest import assert_close_to_reference, require_triton_runs
from hypothesis import given, settings
from hypothesis import strategies as st

from hotops import _backend
from hotops.codebook import CodebookWeight, codebook_matmul, op, reference
from hotops.codebook import format as fmt

ATOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def weight_parts(N, K, in_group, num_codebooks, C=256, groups=1, permuted=True):
    """(packed codes, codebooks, scales, group_ptr, perm) with uneven row groups (some may be
    empty) crossing the 16-row blocks. Codes past 256 come as int32 (what the reference reads)."""
    codes = torch.randint(
        0, C, (N, K // in_group, num_codebooks), dtype=torch.int32 if C > 256 else torch.uint8
    )
    codebooks = torch.randn(groups, num_codebooks, C, in_group)
    cuts = sorted(torch.randint(0, N + 1, (groups - 1,)).tolist())
    group_ptr = torch.tensor([0, *cuts, N], dtype=torch.int64)
    perm = torch.randperm(N) if permuted else None
    return fmt.pack_codes(codes), codebooks, torch.rand(N) + 0.5, group_ptr, perm


def check_forward(x, parts, bias=None, kernel_codes=None, splits=None):
    """kernel_codes: the codes as the kernel reads them, when the reference reads other ones;
    splits: slices of the GEMV's input dimension (default: one off the GPU)."""
    from hotops.codebook import triton as kernels

    codes, codebooks, scales, group_ptr, perm = parts
    out = kernels.matmul(x, codes if kernel_codes is None else kernel_codes, *parts[1:], bias, splits)
    ref64 = reference.codebook_matmul(
        x.double(),
        codes,
        codebooks.double(),
        scales.double(),
        group_ptr,
        perm,
        None if bias is None else bias.double(),
    )
    ref_lp = reference.codebook_matmul(x, *parts, bias)
    assert out.dtype == x.dtype and out.shape == ref64.shape
    assert_close_to_reference(out, ref64, ref_lp, atol=ATOL[x.dtype], name="y")


def check_input_grad(dy, parts):
    from hotops.codebook import triton as kernels

    codes, codebooks, scales, group_ptr, perm = parts
    dx = kernels.input_grad(dy, *parts)
    w64 = reference.dequantize(codes, codebooks.double(), scales.double(), group_ptr, perm).double()
    w_lp = reference.dequantize(*parts).to(dy.dtype)
    assert dx.dtype == dy.dtype and dx.shape == (dy.shape[0], w64.shape[1])
    assert_close_to_reference(dx, dy.double() @ w64, dy @ w_lp, atol=ATOL[dy.dtype], name="dx")


@pytest.fixture
def interpreted():
    require_triton_runs()


# B = 1 and 3: the GEMV; 11: the GEMM. 37 rows: three 16-row blocks, the last partial; 3 row
# groups cross the blocks; K = 40 is not a multiple of the 16-input tiles.
@pytest.mark.parametrize(
    "in_group,num_codebooks,C", [(1, 1, 4), (2, 2, 16), (4, 1, 256), (8, 2, 256), (8, 1, 37), (8, 3, 256)]
)
@pytest.mark.parametrize("B", [1, 3, 11])
def test_matches_reference(interpreted, in_group, num_codebooks, C, B):
    parts = weight_parts(37, 40, in_group, num_codebooks, C, groups=3)
    check_forward(torch.randn(B, 40), parts, torch.randn(37))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,splits", [(1, 3), (4, 2)])
def test_gemv_split_inputs(interpreted, dtype, B, splits):
    """The GEMV with its inputs cut into slices whose float32 partial sums meet by atomic adds
    (what a GPU gets where the 16-row blocks are too few for its SMs)."""
    check_forward(
        torch.randn(B, 80).to(dtype), weight_parts(37, 80, 4, 2, groups=3), torch.randn(37), splits=splits
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B", [2, 9])
def test_half_activations(interpreted, dtype, B):
    check_forward(torch.randn(B, 48).to(dtype), weight_parts(20, 48, 8, 2, groups=2), torch.randn(20))


@pytest.mark.parametrize("B", [1, 17])
def test_int16_codes_and_many_groups(interpreted, B):
    """int16 codes (the kernels read them as unsigned 16-bit: codebooks of up to 65536 words; the
    CodebookWeight format holds uint8 only, so far), five row groups, one of them empty."""
    parts = weight_parts(40, 16, 4, 1, C=40000, groups=5)
    parts[3][2] = parts[3][1]  # an empty group
    int16 = parts[0].to(torch.int16)  # codes past 32767 wrap to negative values
    assert int(int16.min()) < 0
    check_forward(torch.randn(B, 16), parts, torch.randn(40), kernel_codes=int16)


def test_identity_order_strided_rows_and_empty(interpreted):
    from hotops.codebook import triton as kernels

    parts = weight_parts(16, 32, 4, 1, permuted=False)
    check_forward(torch.randn(5, 64)[:, :32], parts)  # a row stride of 64
    assert kernels.matmul(torch.randn(0, 32), *parts, None).shape == (0, 16)
    assert kernels.input_grad(torch.randn(0, 16), *parts).shape == (0, 32)


@pytest.mark.parametrize("B", [2, 12])
def test_nan_stays_in_its_row(interpreted, B):
    from hotops.codebook import triton as kernels

    x = torch.randn(B, 32)
    x[0, 5] = float("nan")
    out = kernels.matmul(x, *weight_parts(20, 32, 8, 1), None)
    assert out[0].isnan().all() and out[1:].isfinite().all()


@settings(max_examples=25, deadline=None)
@given(
    N=st.integers(1, 40),
    J=st.integers(1, 5),
    in_group=st.sampled_from([1, 2, 4, 8]),
    M=st.integers(1, fmt.MAX_CODEBOOKS),
    C=st.integers(1, 256),
    groups=st.integers(1, 4),
    B=st.integers(1, 20),
    permuted=st.booleans(),
    bias=st.booleans(),
)
def test_property_matches_reference(N, J, in_group, M, C, groups, B, permuted, bias):
    require_triton_runs()
    parts = weight_parts(N, J * in_group, in_group, M, C, groups, permuted)
    check_forward(torch.randn(B, J * in_group), parts, torch.randn(N) if bias else None)
    check_input_grad(torch.randn(B, N), parts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_group,num_codebooks,B", [(8, 2, 1), (1, 1, 18), (4, 1, 5)])
def test_input_grad_matches_reference(interpreted, dtype, in_group, num_codebooks, B):
    parts = weight_parts(37, 40 if in_group != 8 else 48, in_group, num_codebooks, groups=3)
    check_input_grad(torch.randn(B, 37).to(dtype), parts)


def test_tiles_of_a_one_dimensional_grid(interpreted):
    """The GEMM's and the input gradient's (tile, batch block) come from one program id (CUDA caps
    grid y at 65,535, which batch blocks alone pass from about a million rows): 40 rows are three
    16-row batch blocks, 37 stored rows three row tiles, 48 inputs three input tiles."""
    parts = weight_parts(37, 48, 4, 1, groups=3)
    check_forward(torch.randn(40, 48), parts, torch.randn(37))
    check_input_grad(torch.randn(40, 37), parts)


# ------------------------------------------------------------------ through the op


@pytest.fixture
def triton_backend(monkeypatch, interpreted):
    """The op's CUDA backends, on CPU tensors: the Triton kernels in the interpreter."""
    monkeypatch.setattr(
        op, "CODEBOOK_MATMUL_BACKENDS", (_backend.Backend("triton", lambda dev: None, op._triton_matmul),)
    )
    monkeypatch.setattr(
        op,
        "CODEBOOK_MATMUL_BACKWARD_BACKENDS",
        (_backend.Backend("triton", lambda dev: None, op._triton_input_grad),),
    )


def public_weight(N, K, in_group, num_codebooks, groups=2):
    codes, codebooks, scales, group_ptr, perm = weight_parts(N, K, in_group, num_codebooks, groups=groups)
    return CodebookWeight.from_packed(codes, codebooks, scales, group_ptr, perm)


@pytest.mark.parametrize("B", [(), (2, 5)])
def test_op_forward_and_gradients(triton_backend, B):
    """Leading dimensions (a GEMV for (), a GEMM for 10 rows) and every gradient against autograd
    through the reference."""
    w = public_weight(21, 32, 4, 2)
    x = torch.randn(*B, 32, requires_grad=True)
    bias = torch.randn(21, requires_grad=True)
    cb, s = w.codebooks.requires_grad_(), w.scales.requires_grad_()
    out = codebook_matmul(x, w, bias)
    ref = reference.codebook_matmul(x, w.codes, cb, s, w.group_ptr, w.perm, bias)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    dy = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, cb, s, bias), dy)
    want = torch.autograd.grad(ref, (x, cb, s, bias), dy)
    for name, g, r in zip(("x", "codebooks", "scales", "bias"), got, want):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4, msg=lambda m: f"d{name}: {m}")


def test_op_empty_batch(triton_backend):
    w = public_weight(16, 16, 8, 1)
    x = torch.randn(0, 16, requires_grad=True)
    out = codebook_matmul(x, w)
    assert out.shape == (0, 16)
    out.sum().backward()
    assert x.grad.shape == (0, 16)


def test_op_opcheck_and_compile(triton_backend):
    w = public_weight(18, 16, 2, 1)
    args = (
        torch.randn(9, 16, requires_grad=True),
        w.codes,
        w.codebooks.requires_grad_(),
        w.scales,
        w.group_ptr,
        w.perm,
        torch.randn(18),
    )
    torch.library.opcheck(
        op.codebook_matmul, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor")
    )
    compiled = torch.compile(lambda x: codebook_matmul(x, w), fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 16, requires_grad=True)
    out, ref = compiled(x), reference.codebook_matmul(x, *args[1:6])
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    # a compiled training step: the traced backward records the input-gradient op (it used to
    # launch the Triton kernel on the trace's placeholder tensors)
    got, want = (torch.autograd.grad(y.square().sum(), x)[0] for y in (out, ref))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.library.opcheck(
        op.codebook_input_grad, (torch.randn(9, 18), *args[1:6]), test_utils="test_faketensor"
    )


def test_cuda_backend_is_chosen_for_cuda():
    names = [b.name for b in op.CODEBOOK_MATMUL_BACKENDS]
    assert names.index("cuda (Triton)") < names.index("torch (dequantize + F.linear, any device)")
    assert op.CODEBOOK_MATMUL_BACKWARD_BACKENDS[0].refuses(torch.device("cpu")) is not None


# ------------------------------------------------------------------ compiled for a GPU, without one

_COMPILE_FOR_SM90 = """
from hotops.codebook import inspect_gpu as g, triton as k

cases = [(k._gemv_kernel, k._GEMV_CONFIGS[-1], "fp16", dict(BLOCK_B=1, SPLIT_K=3)),
         (k._gemv_kernel, k._GEMV_CONFIGS[0], "bf16", dict(BLOCK_B=8, SPLIT_K=1, HAS_BIAS=False)),
         (k._gemm_kernel, k._GEMM_CONFIGS[0], "fp32", {}),
         (k._gemm_kernel, k._GEMM_CONFIGS[-1], "fp16", {}),
         (k._input_grad_kernel, k._GRAD_CONFIGS[-1], "bf16", {})]
for fn, config, activations, flags in cases:
    report = g.sass_report(g.compile_kernel(fn, config, activations, "fp32", **flags))
    assert report.get("spill_bytes", 0) == 0, (fn.__name__, config, report)
print("compiled", len(cases))
"""


def test_kernels_compile_for_sm90():
    """The kernels and tuning configs through Triton's whole NVIDIA pipeline (TTGIR, PTX, ptxas)
    for an H100/H200, in a process without the interpreter: what the interpreter cannot check
    (layouts, tensor-core dots, 3xTF32, atomics) compiles, without register spills, even where
    no GPU is present (hotops.codebook.inspect_gpu)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences triton 3.9's notice; fusion is its default
    run = subprocess.run(
        [sys.executable, "-c", _COMPILE_FOR_SM90], env=env, capture_output=True, text=True, timeout=240
    )
    assert run.returncode == 0 and "compiled 5" in run.stdout, run.stderr[-3000:]


# ------------------------------------------------------------------ on a GPU (gpu_check.sh)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    "dtype,B",
    [(torch.float32, 1), (torch.float16, 1), (torch.bfloat16, 4), (torch.float32, 33), (torch.bfloat16, 33)],
)
def test_cuda_matches_reference(dtype, B):
    """On the GPU, autotuned: the GEMV (B <= 8) with its inputs split, the GEMM, dx, and every
    gradient through the public op (a few dtype x batch pairs: every one compiles and tunes the
    kernels anew, and gpu_check.sh gives all families' GPU tests minutes)."""
    from hotops.codebook import triton as kernels

    parts = [t.cuda() if t is not None else None for t in weight_parts(1000, 2048, 8, 2, groups=3)]
    x = torch.randn(B, 2048, device="cuda").to(dtype)
    assert kernels.gemv_splits(1000, 2048, x.device) > 1  # 63 row blocks: split on any GPU of >= 16 SMs
    check_forward(x, parts, torch.randn(1000, device="cuda"))
    check_input_grad(torch.randn(B, 1000, device="cuda").to(dtype), parts)
    w = CodebookWeight.from_packed(*parts)
    x.requires_grad_()
    cb, s = w.codebooks.requires_grad_(), w.scales.requires_grad_()
    out = codebook_matmul(x, w)
    dy = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, cb, s), dy)
    ref = reference.codebook_matmul(x.double(), w.codes, cb.double(), s.double(), w.group_ptr, w.perm)
    want = torch.autograd.grad(ref, (x, cb, s), dy.double())
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for name, g, r in zip(("x", "codebooks", "scales"), got, want):
        err = (g.double() - r).abs().max().item() / r.abs().max().item()
        assert g.is_cuda and err <= tol, f"d{name}: relative error {err:.3g}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("B", [1, 24])
def test_cuda_half_module(B):
    """The deployed form: a CodebookLinear moved to the GPU in fp16 (codebooks, scales and bias
    in fp16, codes uint8), against the reference on the same fp16 parts."""
    from hotops.codebook import CodebookLinear

    layer = CodebookLinear(
        CodebookWeight.from_packed(*weight_parts(300, 256, 8, 2, groups=2)), torch.randn(300)
    )
    layer = layer.cuda().half()
    x = torch.randn(B, 256, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        out = layer(x)
    w = layer.weight
    ref64 = reference.codebook_matmul(
        x.double(), w.codes, w.codebooks.double(), w.scales.double(), w.group_ptr, w.perm, layer.bias.double()
    )
    ref_lp = reference.codebook_matmul(x, w.codes, w.codebooks, w.scales, w.group_ptr, w.perm, layer.bias)
    assert out.dtype == torch.float16 and out.is_cuda
    assert_close_to_reference(out, ref64, ref_lp, atol=1e-2, name="y")
