"""torch.library ops of the codebook family: schema, fake impl, autograd, per-device kernels.

``hotops::codebook_matmul`` (x (..., K) -> (..., N)) and ``hotops::codebook_dequantize`` (the
dense float32 weight). On the CPU the product runs the C++ lookup-table kernel (see
``use_tables``); otherwise it dequantizes row tiles of the weight into cache and multiplies them
with torch's BLAS. On CUDA it runs the Triton kernels (``triton.py``: a GEMV for small batches, a
GEMM for larger ones, both dequantizing tiles in-kernel). Other devices dequantize and multiply
with torch.

Backward: dx = dy W, on CUDA by a Triton kernel on the same in-kernel tiles, elsewhere with W
dequantized (by the C++ kernel on the CPU); the codebooks' and scales' gradients come from
dW = dy^T x by a scatter-add of each code's slice into its codeword, in torch on every device.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from hotops import _backend
from hotops.codebook import format as fmt
from hotops.codebook.format import check_perm, unpack_codes

# When the lookup tables beat dequantize + GEMM (measured, docs/notes/codebook.md). A table lookup adds
# in_group / num_codebooks weights' worth of products at once: from 2 on (AQLM's 2x8 and 1x8/4
# give 4) the tables win at every batch size, one vector add per 16 batch rows replacing 4 FMAs;
# below that they only win for small batches.
LUT_MIN_WEIGHTS_PER_LOOKUP = 2
LUT_MAX_BATCH = 16


def use_tables(batch: int, in_group: int, num_codebooks: int) -> bool:
    return batch <= LUT_MAX_BATCH or in_group >= LUT_MIN_WEIGHTS_PER_LOOKUP * num_codebooks


# Dequantized row tile for the GEMM path: large enough that torch.mm runs at full rate and its
# per-call threading cost is amortised, small beside the dense weight.
GEMM_TILE_BYTES = 8 << 20


ACTIVATION_DTYPES = (torch.float32, torch.bfloat16)  # on the CPU; other devices also take float16


def check_input(x, in_features: int) -> None:
    """x for a product with a weight of in_features inputs: a floating tensor (float32 or
    bfloat16 on the CPU, also float16 elsewhere) ending in in_features."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    allowed = (
        ACTIVATION_DTYPES if x.dtype in ACTIVATION_DTYPES or x.device.type == "cpu" else _backend.FLOAT_DTYPES
    )
    if x.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(
            f"x has dtype {str(x.dtype).replace('torch.', '')}; codebook products on "
            f"{x.device.type} take {names} (convert x, e.g. x.float())"
        )
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"x must end in in_features = {in_features}, got shape {tuple(x.shape)}")


def _kernel_args(codes, codebooks, scales):
    return codes, codebooks.detach().float().contiguous(), scales.detach().float().contiguous()


def _cpu_dequantize_stored(codes, codebooks, scales, group_ptr, dtype=torch.float32, rows=None):
    r0, r1 = rows if rows is not None else (0, scales.shape[0])
    out = torch.empty(r1 - r0, _in_features(codes, codebooks), dtype=dtype)
    c, cb, s = _kernel_args(codes, codebooks, scales)
    _backend.ext().codebook_dequantize(c, cb, s, group_ptr, r0, r1, out, _backend.num_threads())
    return out


def _in_features(codes, codebooks):
    return codes.shape[1] // codebooks.shape[1] * codebooks.shape[3]


def _cpu_matmul(x2, codes, codebooks, scales, group_ptr, perm, bias):
    B, N = x2.shape[0], scales.shape[0]
    if use_tables(B, codebooks.shape[3], codebooks.shape[1]):
        out = torch.empty(B, N, dtype=x2.dtype)
        c, cb, s = _kernel_args(codes, codebooks, scales)
        _backend.ext().codebook_matmul(
            x2,
            c,
            cb,
            s,
            group_ptr,
            perm,
            None if bias is None else bias.detach().float().contiguous(),
            out,
            _backend.num_threads(),
        )
        return out
    check_perm(perm, N)  # (the table kernel checks it in C++; here argsort would take anything)
    K = x2.shape[1]
    tile = max(16, GEMM_TILE_BYTES // max(1, K * x2.element_size()))
    out_t = torch.empty(N, B, dtype=x2.dtype)  # stored order, transposed: each tile writes whole rows
    w = torch.empty(min(tile, N), K, dtype=x2.dtype)  # one tile buffer, reused (no page faults)
    c, cb, s = _kernel_args(codes, codebooks, scales)
    for r0 in range(0, N, tile):
        r1 = min(N, r0 + tile)
        _backend.ext().codebook_dequantize(c, cb, s, group_ptr, r0, r1, w[: r1 - r0], _backend.num_threads())
        torch.mm(w[: r1 - r0], x2.T, out=out_t[r0:r1])
    out = fmt.to_output_order(out_t, perm).T
    return out + bias.to(out.dtype) if bias is not None else out.contiguous()


def _torch_matmul(x2, codes, codebooks, scales, group_ptr, perm, bias):
    w = fmt.dequantize(codes, codebooks, scales, group_ptr, perm).to(x2.dtype)
    return torch.nn.functional.linear(x2, w, None if bias is None else bias.to(x2.dtype))


def _triton_matmul(x2, codes, codebooks, scales, group_ptr, perm, bias):
    from hotops.codebook import triton as kernels

    return kernels.matmul(
        x2,
        codes,
        codebooks.detach(),
        scales.detach(),
        group_ptr,
        perm,
        None if bias is None else bias.detach(),
    )


MATMUL_BACKENDS = (
    _backend.Backend("cpu (C++)", _backend.cpu_refuses, _cpu_matmul),
    _backend.Backend("cuda (Triton)", _backend.triton_refuses, _triton_matmul),
    _backend.Backend("torch (dequantize + matmul)", lambda device: None, _torch_matmul),
)


@torch.library.custom_op("hotops::codebook_dequantize", mutates_args=())
def codebook_dequantize(
    codes: Tensor, codebooks: Tensor, scales: Tensor, group_ptr: Tensor, perm: Optional[Tensor]
) -> Tensor:
    """The dense (N, K) float32 weight in output order."""
    check_perm(perm, scales.shape[0])
    if codes.device.type == "cpu" and _backend.cpu_refuses(codes.device) is None:
        return fmt.to_output_order(_cpu_dequantize_stored(codes, codebooks, scales, group_ptr), perm)
    return fmt.dequantize(codes, codebooks, scales, group_ptr, perm)


@codebook_dequantize.register_fake
def _(codes, codebooks, scales, group_ptr, perm):
    return codes.new_empty((scales.shape[0], _in_features(codes, codebooks)), dtype=torch.float32)


def matmul_impl(
    x: Tensor,
    codes: Tensor,
    codebooks: Tensor,
    scales: Tensor,
    group_ptr: Tensor,
    perm: Optional[Tensor],
    bias: Optional[Tensor],
) -> Tensor:
    """x (..., K) -> (..., N) in x's dtype: the op's implementation, without the dispatcher."""
    run = _backend.choose("codebook_matmul", MATMUL_BACKENDS, x.device).run
    x2 = _backend.cpu_view(x.reshape(-1, x.shape[-1]))
    return run(x2, codes, codebooks, scales, group_ptr, perm, bias).reshape(*x.shape[:-1], scales.shape[0])


codebook_matmul = torch.library.custom_op("hotops::codebook_matmul", mutates_args=())(matmul_impl)


def matmul(
    x: Tensor,
    codes: Tensor,
    codebooks: Tensor,
    scales: Tensor,
    group_ptr: Tensor,
    perm: Optional[Tensor],
    bias: Optional[Tensor],
) -> Tensor:
    """The entry point of the public API. Eager inference (plain tensors, nothing to
    differentiate, no tracing) calls the implementation directly: the custom op's dispatch costs
    ~80 us a call, as much as a whole batch-1 product of a small layer. Everything else goes
    through the op, so autograd and torch.compile see it."""
    if _backend.can_skip_dispatcher(x, codebooks, scales, bias):
        return matmul_impl(x, codes, codebooks, scales, group_ptr, perm, bias)
    return codebook_matmul(x, codes, codebooks, scales, group_ptr, perm, bias)


@codebook_matmul.register_fake
def _(x, codes, codebooks, scales, group_ptr, perm, bias):
    return x.new_empty((*x.shape[:-1], scales.shape[0]))


def format_grads(
    dW: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor, group_ptr: Tensor, perm: Optional[Tensor]
) -> Tuple[Tensor, Tensor]:
    """Gradients of codebooks and scales from dW, the gradient of the dense (N, K) weight."""
    O, M, C, g = codebooks.shape
    N, J = scales.shape[0], _in_features(codes, codebooks) // g
    dWs = dW.float() if perm is None else dW.float()[perm]  # stored row order
    unscaled = codebook_dequantize(codes, codebooks, torch.ones_like(scales), group_ptr, None)
    dscales = (dWs * unscaled).sum(1)
    dword = (dWs * scales.float()[:, None]).reshape(N, J, 1, g).expand(N, J, M, g)
    group = fmt.row_groups(group_ptr, N)
    logical = unpack_codes(codes, N, M).long()
    slot = (group[:, None, None] * M + torch.arange(M, device=codes.device)) * C + logical
    dcb = dW.new_zeros(O * M * C, g, dtype=torch.float32).index_add_(
        0, slot.reshape(-1), dword.reshape(-1, g)
    )
    return dcb.reshape(codebooks.shape).to(codebooks.dtype), dscales.to(scales.dtype)


def _setup_dequantize(ctx, inputs, output):
    codes, codebooks, scales, group_ptr, perm = inputs
    ctx.save_for_backward(codes, codebooks, scales, group_ptr, perm)


def _backward_dequantize(ctx, grad):
    codes, codebooks, scales, group_ptr, perm = ctx.saved_tensors
    if not (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]):
        return None, None, None, None, None
    dcb, ds = format_grads(grad, codes, codebooks, scales, group_ptr, perm)
    return None, dcb, ds, None, None


codebook_dequantize.register_autograd(_backward_dequantize, setup_context=_setup_dequantize)


def _setup_matmul(ctx, inputs, output):
    x, codes, codebooks, scales, group_ptr, perm, bias = inputs
    ctx.save_for_backward(x, codes, codebooks, scales, group_ptr, perm)
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _triton_input_grad(dy2, codes, codebooks, scales, group_ptr, perm):
    from hotops.codebook import triton as kernels

    return kernels.input_grad(
        _backend.cpu_view(dy2), codes, codebooks.detach(), scales.detach(), group_ptr, perm
    )


def _dense_input_grad(dy2, codes, codebooks, scales, group_ptr, perm):
    w = codebook_dequantize(codes, codebooks, scales, group_ptr, perm)
    return dy2 @ w.to(dy2.dtype)


INPUT_GRAD_BACKENDS = (
    _backend.Backend("cuda (Triton)", _backend.triton_refuses, _triton_input_grad),
    _backend.Backend("dequantize + matmul", lambda device: None, _dense_input_grad),
)


def _backward_matmul(ctx, dy):
    x, codes, codebooks, scales, group_ptr, perm = ctx.saved_tensors
    need_x, _, need_cb, need_s, _, _, need_b = ctx.needs_input_grad
    dy2 = dy.reshape(-1, dy.shape[-1])
    dx = dcb = ds = db = None
    if need_x:
        # create_graph=True: the dense path, made of differentiable ops (the Triton kernel is not)
        backends = INPUT_GRAD_BACKENDS[1:] if torch.is_grad_enabled() else INPUT_GRAD_BACKENDS
        input_grad = _backend.choose("codebook_matmul backward", backends, dy.device).run
        dx = input_grad(dy2, codes, codebooks, scales, group_ptr, perm).reshape(x.shape)
    if need_cb or need_s:
        dW = dy2.float().T @ x.reshape(-1, x.shape[-1]).float()
        dcb, ds = format_grads(dW, codes, codebooks, scales, group_ptr, perm)
    if ctx.has_bias and need_b:
        db = dy2.sum(0).to(ctx.bias_dtype)
    return dx, None, dcb, ds, None, None, db


codebook_matmul.register_autograd(_backward_matmul, setup_context=_setup_matmul)
