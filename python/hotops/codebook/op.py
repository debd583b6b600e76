"""torch.library ops of the codebook family: schema, fake impl, autograd, per-device backends.

Two code widths share every wrapper here; the codes' dtype tells them apart (uint8: the
lookup-table format of ``format.py``; int16: the 16-bit format of ``wide.py``):

* ``hotops::codebook_matmul`` / ``hotops::codebook_wide_matmul``: x (..., K) -> (..., N) in x's
  dtype. On the CPU the C++ kernel (lookup tables for uint8 codes, see ``use_tables``; codeword
  gathers for 16-bit codes up to ``WIDE_MAX_BATCH`` rows), else row tiles of the weight dequantized
  into cache and multiplied with torch's BLAS. On CUDA the Triton kernels (``triton.py``, uint8
  codes: a GEMV for small batches, a GEMM for larger ones, both dequantizing tiles in-kernel).
  Every other device takes the named torch backend (dequantize, then ``F.linear``).
* ``hotops::codebook_dequantize`` / ``hotops::codebook_wide_dequantize``: the dense (N, K) float32
  weight in output order.

Backward: dx = dy W, on CUDA by a Triton kernel on the same in-kernel tiles, elsewhere with W
dequantized (by the C++ kernel on the CPU); the codebooks' and scales' gradients come from
dW = dy^T x by a scatter-add of each code's slice into its codeword, in torch on every device.

Inputs are validated once, where users call in (``functional.py``, the modules); the C++ checks
guard memory safety.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from hotops import _backend
from hotops.codebook import format as fmt
from hotops.codebook import wide

# Lookup tables or dequantize + GEMM (torch.mm): a cost model of both paths, in units of one
# multiply-add of torch's dense GEMM, fitted to a single-thread batch sweep (1..8192 rows) of the
# 1x8/4, 1x8/2 and 2x8 formats at all-MiniLM-L6-v2's shapes (384x384, 1536x384, 384x1536) and at
# 4096x4096 and 11008x4096 (benchmarks/encode_crossover.py; docs/codebook.md "Which path"):
# * per row, every code costs one table lookup + add (LUT_LOOKUP_COST), and every table entry
#   (C per code slot and row group) one build (LUT_BUILD_COST), shared by the N / groups output
#   rows of its group: per weight and row (M / g) * (LUT_LOOKUP_COST + LUT_BUILD_COST * C * groups / N);
# * the GEMM path costs the dense product (1 per weight and row) plus, once per call,
#   dequantizing each weight into the tile and putting the rows in output order (LUT_DEQUANT_COST).
# The tables win up to batch DEQUANT / (tables - 1): always where a lookup replaces enough weights
# and N is large (2x8 and 1x8/4 at N >= 4096: tables <= 1), up to ~190 rows for 1x8/4 at N = 1536
# and ~33 at N = 384, where building 256 entries per slot is shared by few outputs. Up to
# LUT_MAX_BATCH rows the tables always run (the GEMM path's dequantization dominates there).
LUT_MAX_BATCH = 16
LUT_LOOKUP_COST = 3.0
LUT_BUILD_COST = 16.0
LUT_DEQUANT_COST = 80.0
WIDE_MAX_BATCH = 16  # 16-bit codes: the gather kernel up to here, dequantized tiles + torch.mm above


# bf16 activations in bf16 (AMX tiles or vdpbf16ps): the C++ kernel up to here, dequantized tiles +
# torch.mm above (decoding once per 64 batch rows costs more than dequantizing once from 256 rows;
# measured at 4096 x 4096 and all-MiniLM-L6-v2's shapes, docs/codebook.md).
BF16_MAX_BATCH = 128


def bf16_kernel(dtype: torch.dtype, in_group: int, in_features: int, num_codebooks: int = 1) -> bool:
    """Whether the C++ kernel multiplies bfloat16 activations in bf16 beyond LUT_MAX_BATCH rows
    (csrc/codebook/amx_tiles.h: the weight decoded into bf16 rows, no lookup tables): 4 or 8
    inputs per codeword, 1 or 2 codebooks, in_features a multiple of 32, AVX512_BF16 on and
    either AMX-BF16 (AMX tiles, which the kernel also takes from 2 rows) or fast_bf16_dot
    (vdpbf16ps at FMA's issue rate, from 17 rows; from 2 where out_features < 2048). The kernel
    then runs up to BF16_MAX_BATCH rows and the GEMM path above, whatever use_tables says (its
    costs are float32's)."""
    if dtype != torch.bfloat16 or in_group not in (4, 8) or num_codebooks > 2 or in_features % 32:
        return False
    ext = _backend.ext()
    fast = ext.feature("amx_bf16") or ext.feature("fast_bf16_dot")
    return ext.isa() == "avx512" and ext.feature("avx512_bf16") and fast


def tables_cost(
    out_features: int, in_group: int, num_codebooks: int, codebook_size: int = 256, num_groups: int = 1
) -> float:
    """The lookup tables' cost per weight and batch row, in dense multiply-adds (see above)."""
    entries = LUT_BUILD_COST * codebook_size * num_groups / max(1, out_features)
    return num_codebooks / in_group * (LUT_LOOKUP_COST + entries)


def use_tables(
    batch: int,
    out_features: int,
    in_group: int,
    num_codebooks: int,
    codebook_size: int = 256,
    num_groups: int = 1,
) -> bool:
    """Whether the lookup tables (rather than dequantized tiles + torch.mm) run a batch."""
    if batch <= LUT_MAX_BATCH:
        return True
    extra = tables_cost(out_features, in_group, num_codebooks, codebook_size, num_groups) - 1.0
    return extra <= 0 or batch * extra <= LUT_DEQUANT_COST


# Dequantized row tile for the GEMM path: large enough that torch.mm runs at full rate and its
# per-call threading cost is amortised, small beside the dense weight.
GEMM_TILE_BYTES = 8 << 20


# ----------------------------------------------------------------- the two code widths


def _wide(codes: Tensor) -> bool:
    return codes.dtype == torch.int16


def _in_features(codes: Tensor, codebooks: Tensor) -> int:
    if _wide(codes):
        return codes.shape[1] * wide.IN_GROUP
    return codes.shape[1] // codebooks.shape[1] * codebooks.shape[3]


def _kernel_args(codes, codebooks, scales):
    """codes, codebooks, scales as the C++ kernels take them (16-bit codes as uint16; their
    codebooks stay in float16 / bfloat16, the uint8 kernel's are float32)."""
    if _wide(codes):
        return codes.view(torch.uint16), codebooks.detach().contiguous(), scales.detach().float().contiguous()
    return codes, codebooks.detach().float().contiguous(), scales.detach().float().contiguous()


def _logical_codes(codes: Tensor, rows: int, num_codebooks: int) -> Tensor:
    """(N, J, M) int64 code values."""
    return wide.code_values(codes) if _wide(codes) else fmt.unpack_codes(codes, rows, num_codebooks).long()


def _output_order(stored: Tensor, perm: Optional[Tensor]) -> Tensor:
    # perm is applied here, in Python: a buffer changed behind the module's back must not
    # scramble the output silently (the C++ products check it themselves)
    fmt.check_perm(perm, stored.shape[0])
    return fmt.to_output_order(stored, perm)


# ----------------------------------------------------------------- backends


def _cpu_dequantize_rows(codes, codebooks, scales, group_ptr, r0, r1, out):
    kernel = _backend.ext().codebook_wide_dequantize if _wide(codes) else _backend.ext().codebook_dequantize
    kernel(*_kernel_args(codes, codebooks, scales), group_ptr, r0, r1, out, _backend.num_threads())


def _cpu_dequantize(codes, codebooks, scales, group_ptr, perm):
    out = torch.empty(scales.shape[0], _in_features(codes, codebooks))
    _cpu_dequantize_rows(codes, codebooks, scales, group_ptr, 0, scales.shape[0], out)
    return _output_order(out, perm)


def _torch_dequantize(codes, codebooks, scales, group_ptr, perm):
    if _wide(codes):
        return fmt.to_output_order(wide.dequantize_stored(codes, codebooks, scales, group_ptr), perm)
    return fmt.dequantize(codes, codebooks, scales, group_ptr, perm)


def _cpu_matmul(x, codes, codebooks, scales, group_ptr, perm, bias):
    x2 = _backend.cpu_view(x.reshape(-1, x.shape[-1]))
    B, K, N = x2.shape[0], x2.shape[1], scales.shape[0]
    O, M, C, g = codebooks.shape
    if _wide(codes):
        kernel_runs = B <= WIDE_MAX_BATCH
    else:
        bf16 = B > LUT_MAX_BATCH and bf16_kernel(x2.dtype, g, K, M)  # up to there the kernel runs anyway
        kernel_runs = B <= BF16_MAX_BATCH if bf16 else use_tables(B, N, g, M, C, O)
    if kernel_runs:
        out = torch.empty(B, N, dtype=x2.dtype)
        kernel = _backend.ext().codebook_wide_matmul if _wide(codes) else _backend.ext().codebook_matmul
        b32 = None if bias is None else bias.detach().float().contiguous()
        kernel(x2, *_kernel_args(codes, codebooks, scales), group_ptr, perm, b32, out, _backend.num_threads())
        return out.reshape(*x.shape[:-1], N)
    # the tiles in x's dtype where torch's GEMM runs it natively, else in float32 (as always for
    # float16: the dequantize kernel writes float32 or bfloat16)
    dtype = torch.float32 if x2.dtype == torch.float16 else _backend.gemm_dtype(x2.dtype, x2.device)
    xd = x2.to(dtype)
    b = None if bias is None else bias.detach().to(dtype)
    tile = max(16, GEMM_TILE_BYTES // max(1, K * xd.element_size()))
    w = torch.empty(min(tile, N), K, dtype=dtype)  # one tile buffer, reused (no page faults)
    if tile >= N:  # one tile: the whole weight, put in output order, then one GEMM with the bias
        _cpu_dequantize_rows(codes, codebooks, scales, group_ptr, 0, N, w)
        w = _output_order(w, perm)
        out = torch.mm(xd, w.T) if b is None else torch.addmm(b, xd, w.T)
        return out.to(x2.dtype).reshape(*x.shape[:-1], N)
    fmt.check_perm(perm, N)  # a buffer changed behind the module's back must not scramble rows
    out = torch.empty(B, N, dtype=dtype)
    for r0 in range(0, N, tile):
        r1 = min(N, r0 + tile)
        wt = w[: r1 - r0]
        _cpu_dequantize_rows(codes, codebooks, scales, group_ptr, r0, r1, wt)
        if perm is None:  # columns r0:r1 of out, written in place (a strided view BLAS takes)
            cols = out[:, r0:r1]
            torch.mm(xd, wt.T, out=cols) if b is None else torch.addmm(b[r0:r1], xd, wt.T, out=cols)
        else:
            idx = perm[r0:r1]
            part = torch.mm(xd, wt.T) if b is None else torch.addmm(b[idx], xd, wt.T)
            out.index_copy_(1, idx, part)
    return out.to(x2.dtype).reshape(*x.shape[:-1], N)


def _torch_matmul(x, codes, codebooks, scales, group_ptr, perm, bias):
    w = _torch_dequantize(codes, codebooks.detach(), scales.detach(), group_ptr, perm).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.detach().to(x.dtype))


def _unit_rows(t: Tensor) -> Tensor:
    """t as (rows, t.shape[-1]) with unit inner stride, detached: what the Triton kernels take."""
    t = t.detach().reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _triton_matmul(x, codes, codebooks, scales, group_ptr, perm, bias):
    from hotops.codebook import triton as kernels

    x2 = _unit_rows(x)
    out = kernels.matmul(
        x2,
        codes,
        codebooks.detach(),
        scales.detach(),
        group_ptr,
        perm,
        None if bias is None else bias.detach(),
    )
    return out.reshape(*x.shape[:-1], scales.shape[0])


def _triton_input_grad(dy, codes, codebooks, scales, group_ptr, perm):
    from hotops.codebook import triton as kernels

    dx = kernels.input_grad(_unit_rows(dy), codes, codebooks.detach(), scales.detach(), group_ptr, perm)
    return dx.reshape(*dy.shape[:-1], dx.shape[-1])


def _dense_input_grad(dy, codes, codebooks, scales, group_ptr, perm):
    """dy W with W from the dequantize op (differentiable: create_graph=True takes this path)."""
    dequantize = codebook_wide_dequantize if _wide(codes) else codebook_dequantize
    dtype = _backend.gemm_dtype(dy.dtype, dy.device)
    return (dy.to(dtype) @ dequantize(codes, codebooks, scales, group_ptr, perm).to(dtype)).to(dy.dtype)


def _any_device(device: torch.device) -> Optional[str]:
    return None


_CPU = "cpu (C++)"
_TORCH = "torch (dequantize + F.linear, any device)"
CODEBOOK_MATMUL_BACKENDS = (
    _backend.Backend(_CPU, _backend.cpu_refuses, _cpu_matmul),
    _backend.Backend("cuda (Triton)", _backend.triton_refuses, _triton_matmul),
    _backend.Backend(_TORCH, _any_device, _torch_matmul),
)
CODEBOOK_WIDE_MATMUL_BACKENDS = (
    _backend.Backend(_CPU, _backend.cpu_refuses, _cpu_matmul),
    _backend.Backend(_TORCH, _any_device, _torch_matmul),
)
CODEBOOK_DEQUANTIZE_BACKENDS = CODEBOOK_WIDE_DEQUANTIZE_BACKENDS = (
    _backend.Backend(_CPU, _backend.cpu_refuses, _cpu_dequantize),
    _backend.Backend("torch (any device)", _any_device, _torch_dequantize),
)
# dx of the products' backward
CODEBOOK_MATMUL_BACKWARD_BACKENDS = (
    _backend.Backend("cuda (Triton)", _backend.triton_refuses, _triton_input_grad),
    _backend.Backend("dequantize + matmul (any device)", _any_device, _dense_input_grad),
)
CODEBOOK_WIDE_MATMUL_BACKWARD_BACKENDS = CODEBOOK_MATMUL_BACKWARD_BACKENDS[1:]


# ----------------------------------------------------------------- ops


def _dequantize_impl(
    codes: Tensor, codebooks: Tensor, scales: Tensor, group_ptr: Tensor, perm: Optional[Tensor]
):
    backends = CODEBOOK_WIDE_DEQUANTIZE_BACKENDS if _wide(codes) else CODEBOOK_DEQUANTIZE_BACKENDS
    name = "codebook_wide_dequantize" if _wide(codes) else "codebook_dequantize"
    return _backend.choose(name, backends, codes.device).run(codes, codebooks, scales, group_ptr, perm)


@torch.library.custom_op("hotops::codebook_dequantize", mutates_args=())
def codebook_dequantize(
    codes: Tensor, codebooks: Tensor, scales: Tensor, group_ptr: Tensor, perm: Optional[Tensor]
) -> Tensor:
    """The dense (N, K) float32 weight in output order (uint8 codes)."""
    return _dequantize_impl(codes, codebooks, scales, group_ptr, perm)


@torch.library.custom_op("hotops::codebook_wide_dequantize", mutates_args=())
def codebook_wide_dequantize(
    codes: Tensor, codebooks: Tensor, scales: Tensor, group_ptr: Tensor, perm: Optional[Tensor]
) -> Tensor:
    """The dense (N, K) float32 weight in output order (16-bit codes)."""
    return _dequantize_impl(codes, codebooks, scales, group_ptr, perm)


def _matmul_impl(
    x: Tensor,
    codes: Tensor,
    codebooks: Tensor,
    scales: Tensor,
    group_ptr: Tensor,
    perm: Optional[Tensor],
    bias: Optional[Tensor],
) -> Tensor:
    """x (..., K) -> (..., N) in x's dtype: the ops' implementation, without the dispatcher."""
    backends = CODEBOOK_WIDE_MATMUL_BACKENDS if _wide(codes) else CODEBOOK_MATMUL_BACKENDS
    name = "codebook_wide_matmul" if _wide(codes) else "codebook_matmul"
    return _backend.choose(name, backends, x.device).run(x, codes, codebooks, scales, group_ptr, perm, bias)


codebook_matmul = torch.library.custom_op("hotops::codebook_matmul", mutates_args=())(_matmul_impl)
codebook_wide_matmul = torch.library.custom_op("hotops::codebook_wide_matmul", mutates_args=())(_matmul_impl)


def matmul(
    x: Tensor,
    codes: Tensor,
    codebooks: Tensor,
    scales: Tensor,
    group_ptr: Tensor,
    perm: Optional[Tensor],
    bias: Optional[Tensor],
) -> Tensor:
    """The products' entry point (validated inputs, either code width). Eager inference (plain
    tensors, nothing to differentiate, no tracing) calls the implementation directly: a custom
    op's dispatch costs tens of microseconds a call, as much as a whole batch-1 product of a small
    layer. Everything else goes through the op, so autograd and torch.compile see it."""
    if _backend.can_skip_dispatcher(x, codebooks, scales, bias):
        return _matmul_impl(x, codes, codebooks, scales, group_ptr, perm, bias)
    op = codebook_wide_matmul if _wide(codes) else codebook_matmul
    return op(x, codes, codebooks, scales, group_ptr, perm, bias)


def _fake_matmul(x, codes, codebooks, scales, group_ptr, perm, bias):
    return x.new_empty((*x.shape[:-1], scales.shape[0]))


@torch.library.custom_op("hotops::codebook_input_grad", mutates_args=())
def codebook_input_grad(
    dy: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor, group_ptr: Tensor, perm: Optional[Tensor]
) -> Tensor:
    """dy (..., N) -> dx (..., K) of either product, on the device's backend. An op of its own so
    that a traced backward (torch.compile of a training step) records it instead of launching a
    Triton kernel on placeholder tensors; not differentiable (create_graph takes the dense form)."""
    backends = CODEBOOK_WIDE_MATMUL_BACKWARD_BACKENDS if _wide(codes) else CODEBOOK_MATMUL_BACKWARD_BACKENDS
    name = "codebook_wide_matmul backward" if _wide(codes) else "codebook_matmul backward"
    return _backend.choose(name, backends, dy.device).run(dy, codes, codebooks, scales, group_ptr, perm)


@codebook_input_grad.register_fake
def _(dy, codes, codebooks, scales, group_ptr, perm):
    return dy.new_empty((*dy.shape[:-1], _in_features(codes, codebooks)))


def _fake_dequantize(codes, codebooks, scales, group_ptr, perm):
    return codes.new_empty((scales.shape[0], _in_features(codes, codebooks)), dtype=torch.float32)


# ----------------------------------------------------------------- autograd


def format_grads(
    dW: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor, group_ptr: Tensor, perm: Optional[Tensor]
) -> Tuple[Tensor, Tensor]:
    """Gradients of codebooks and scales from dW, the gradient of the dense (N, K) weight."""
    O, M, C, g = codebooks.shape
    N = scales.shape[0]
    J = _in_features(codes, codebooks) // g
    dWs = dW.float() if perm is None else dW.float()[perm]  # stored row order
    dequantize = codebook_wide_dequantize if _wide(codes) else codebook_dequantize
    unscaled = dequantize(codes, codebooks, torch.ones_like(scales), group_ptr, None)
    dscales = (dWs * unscaled).sum(1)
    dword = (dWs * scales.float()[:, None]).reshape(N, J, 1, g).expand(N, J, M, g)
    group = fmt.row_groups(group_ptr, N)
    slot = (group[:, None, None] * M + torch.arange(M, device=codes.device)) * C + _logical_codes(codes, N, M)
    dcb = dW.new_zeros(O * M * C, g, dtype=torch.float32).index_add_(
        0, slot.reshape(-1), dword.reshape(-1, g)
    )
    return dcb.reshape(codebooks.shape).to(codebooks.dtype), dscales.to(scales.dtype)


def _setup_dequantize(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward_dequantize(ctx, grad):
    codes, codebooks, scales, group_ptr, perm = ctx.saved_tensors
    if not (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]):
        return None, None, None, None, None
    dcb, ds = format_grads(grad, codes, codebooks, scales, group_ptr, perm)
    return None, dcb, ds, None, None


def _setup_matmul(ctx, inputs, output):
    x, codes, codebooks, scales, group_ptr, perm, bias = inputs
    ctx.save_for_backward(x, codes, codebooks, scales, group_ptr, perm)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward_matmul(ctx, dy):
    x, codes, codebooks, scales, group_ptr, perm = ctx.saved_tensors
    need_x, _, need_cb, need_s, _, _, need_b = ctx.needs_input_grad
    dy2 = dy.reshape(-1, dy.shape[-1])
    dx = dcb = ds = db = None
    if need_x:
        if torch.is_grad_enabled():  # create_graph=True: the differentiable form (not Triton's)
            dx = _dense_input_grad(dy, codes, codebooks, scales, group_ptr, perm)
        else:
            dx = codebook_input_grad(dy, codes, codebooks, scales, group_ptr, perm)
    if need_cb or need_s:
        dW = dy2.float().T @ x.reshape(-1, x.shape[-1]).float()
        dcb, ds = format_grads(dW, codes, codebooks, scales, group_ptr, perm)
    if ctx.bias_dtype is not None and need_b:
        db = dy2.sum(0, dtype=torch.float32).to(ctx.bias_dtype)  # a bf16 sum over many rows drifts
    return dx, None, dcb, ds, None, None, db


for _op in (codebook_dequantize, codebook_wide_dequantize):
    _op.register_fake(_fake_dequantize)
    _op.register_autograd(_backward_dequantize, setup_context=_setup_dequantize)
for _op in (codebook_matmul, codebook_wide_matmul):
    _op.register_fake(_fake_matmul)
    _op.register_autograd(_backward_matmul, setup_context=_setup_matmul)
del _op
