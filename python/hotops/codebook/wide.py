"""16-bit codes: codebooks of up to 65536 codewords over 8 inputs (AQLM's "1x16").

A lookup table per input group would hold 65536 entries, so these weights do not go through the
lookup-table kernel of ``op.py``. On the CPU, ``hotops::codebook_wide_matmul`` runs a kernel of
its own (csrc/codebook/wide.cpp): it streams each row's 2-byte codes, gathers the addressed
codewords from the codebook (2 MiB in float32, 1 MiB in float16 / bfloat16: L2-resident) and
multiplies them with x; a chunk of up to 16 batch rows shares each gather. Larger batches
dequantize row tiles and multiply with torch's BLAS.

Format (``WideCodebookLinear``'s buffers): codes (N, K // 8, M) int16 (a code c >= 2^15 stored as
c - 2^16, as AQLM stores it), codebooks (num_groups, M, C, 8) float32 | float16 | bfloat16 with
C <= 65536, per-row scales (N,), row-group boundaries ``group_ptr`` and ``perm`` as in
``CodebookWeight``: row r of the stored order is

    scales[r] * concat_j sum_m codebooks[group(r), m, codes[r, j, m]]

and is output feature perm[r]. Differentiable in x, the codebooks, the scales and the bias.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hotops import _backend
from hotops.codebook import format as fmt

IN_GROUP = 8
MAX_BATCH = 16  # the gather kernel up to here; dequantized tiles + torch.mm above
GEMM_TILE_BYTES = 8 << 20
CODEBOOK_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def code_values(codes: Tensor) -> Tensor:
    """The int16 codes as their unsigned values 0..65535 (int64)."""
    return codes.long() & 0xFFFF


# ----------------------------------------------------------------- reference


def dequantize_reference(
    codes: Tensor, codebooks: Tensor, scales: Tensor, group_ptr: Tensor, perm: Optional[Tensor] = None
) -> Tensor:
    """The dense (N, K) float32 weight in output order, in plain torch (differentiable in
    codebooks and scales)."""
    N, J, M = codes.shape
    group = fmt.row_groups(group_ptr, N)
    words = codebooks.float()[group[:, None, None], torch.arange(M, device=codes.device), code_values(codes)]
    stored = words.sum(2).reshape(N, J * codebooks.shape[-1]) * scales.float()[:, None]
    return fmt.to_output_order(stored, perm)


# ----------------------------------------------------------------- ops


def _kernel_args(codes, codebooks, scales):
    return (codes.view(torch.uint16), codebooks.detach().contiguous(), scales.detach().float().contiguous())


def _cpu_dequantize_stored(codes, codebooks, scales, group_ptr, rows=None, out=None):
    r0, r1 = rows if rows is not None else (0, codes.shape[0])
    if out is None:
        out = torch.empty(r1 - r0, codes.shape[1] * IN_GROUP)
    c, cb, s = _kernel_args(codes, codebooks, scales)
    _backend.ext().codebook_wide_dequantize(c, cb, s, group_ptr, r0, r1, out, _backend.num_threads())
    return out


@torch.library.custom_op("hotops::codebook_wide_dequantize", mutates_args=())
def wide_dequantize(
    codes: Tensor, codebooks: Tensor, scales: Tensor, group_ptr: Tensor, perm: Optional[Tensor]
) -> Tensor:
    """The dense (N, K) float32 weight in output order."""
    if codes.device.type == "cpu" and _backend.cpu_refuses(codes.device) is None:
        return fmt.to_output_order(_cpu_dequantize_stored(codes, codebooks, scales, group_ptr), perm)
    return dequantize_reference(codes, codebooks, scales, group_ptr, perm)


@wide_dequantize.register_fake
def _(codes, codebooks, scales, group_ptr, perm):
    return codes.new_empty((codes.shape[0], codes.shape[1] * IN_GROUP), dtype=torch.float32)


def _cpu_matmul(x2, codes, codebooks, scales, group_ptr, perm, bias):
    B, N, K = x2.shape[0], codes.shape[0], x2.shape[1]
    if B <= MAX_BATCH:
        out = torch.empty(B, N, dtype=x2.dtype)
        c, cb, s = _kernel_args(codes, codebooks, scales)
        _backend.ext().codebook_wide_matmul(
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
    tile = max(16, GEMM_TILE_BYTES // max(1, K * 4))
    out_t = torch.empty(N, B, dtype=x2.dtype)
    w = torch.empty(min(tile, N), K)
    for r0 in range(0, N, tile):
        r1 = min(N, r0 + tile)
        _cpu_dequantize_stored(codes, codebooks, scales, group_ptr, (r0, r1), w[: r1 - r0])
        torch.mm(w[: r1 - r0].to(x2.dtype), x2.T, out=out_t[r0:r1])
    out = fmt.to_output_order(out_t, perm).T
    return out + bias.to(out.dtype) if bias is not None else out.contiguous()


def _torch_matmul(x2, codes, codebooks, scales, group_ptr, perm, bias):
    w = dequantize_reference(codes, codebooks.detach(), scales.detach(), group_ptr, perm).to(x2.dtype)
    return F.linear(x2, w, None if bias is None else bias.detach().to(x2.dtype))


MATMUL_BACKENDS = (
    _backend.Backend("cpu (C++)", _backend.cpu_refuses, _cpu_matmul),
    _backend.Backend("torch (dequantize + matmul)", lambda device: None, _torch_matmul),
)


def matmul_impl(
    x: Tensor,
    codes: Tensor,
    codebooks: Tensor,
    scales: Tensor,
    group_ptr: Tensor,
    perm: Optional[Tensor],
    bias: Optional[Tensor],
) -> Tensor:
    """x (..., K) -> (..., N) in x's dtype, without the dispatcher."""
    run = _backend.choose("codebook_wide_matmul", MATMUL_BACKENDS, x.device).run
    x2 = _backend.cpu_view(x.reshape(-1, x.shape[-1]))
    return run(x2, codes, codebooks, scales, group_ptr, perm, bias).reshape(*x.shape[:-1], codes.shape[0])


wide_matmul = torch.library.custom_op("hotops::codebook_wide_matmul", mutates_args=())(matmul_impl)


@wide_matmul.register_fake
def _(x, codes, codebooks, scales, group_ptr, perm, bias):
    return x.new_empty((*x.shape[:-1], codes.shape[0]))


def matmul(
    x: Tensor,
    codes: Tensor,
    codebooks: Tensor,
    scales: Tensor,
    group_ptr: Tensor,
    perm: Optional[Tensor],
    bias: Optional[Tensor],
) -> Tensor:
    """Eager inference calls the implementation directly (see op.matmul); the rest goes through
    the op, so autograd and torch.compile see it."""
    if _backend.can_skip_dispatcher(x, codebooks, scales, bias):
        return matmul_impl(x, codes, codebooks, scales, group_ptr, perm, bias)
    return wide_matmul(x, codes, codebooks, scales, group_ptr, perm, bias)


def format_grads(
    dW: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor, group_ptr: Tensor, perm: Optional[Tensor]
):
    """Gradients of codebooks and scales from dW, the gradient of the dense (N, K) weight."""
    O, M, C, g = codebooks.shape
    N, J = codes.shape[0], codes.shape[1]
    dWs = dW.float() if perm is None else dW.float()[perm]  # stored row order
    unscaled = wide_dequantize(codes, codebooks, torch.ones_like(scales), group_ptr, None)
    dscales = (dWs * unscaled).sum(1)
    dword = (dWs * scales.float()[:, None]).reshape(N, J, 1, g).expand(N, J, M, g)
    group = fmt.row_groups(group_ptr, N)
    slot = (group[:, None, None] * M + torch.arange(M, device=codes.device)) * C + code_values(codes)
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


wide_dequantize.register_autograd(_backward_dequantize, setup_context=_setup_dequantize)


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
        w = wide_dequantize(codes, codebooks, scales, group_ptr, perm)
        dx = (dy2 @ w.to(dy2.dtype)).reshape(x.shape)
    if need_cb or need_s:
        dW = dy2.float().T @ x.reshape(-1, x.shape[-1]).float()
        dcb, ds = format_grads(dW, codes, codebooks, scales, group_ptr, perm)
    if ctx.bias_dtype is not None and need_b:
        db = dy2.sum(0).to(ctx.bias_dtype)
    return dx, None, dcb, ds, None, None, db


wide_matmul.register_autograd(_backward_matmul, setup_context=_setup_matmul)


# ----------------------------------------------------------------- module


class WideCodebookLinear(nn.Module):
    """y = x W^T + b with W in 16-bit codes (see the module docstring). Codes, group boundaries
    and the permutation are buffers; codebooks and per-row scales are parameters."""

    def __init__(
        self,
        codes: Tensor,
        codebooks: Tensor,
        scales: Tensor,
        group_ptr: Optional[Tensor] = None,
        perm: Optional[Tensor] = None,
        bias: Optional[Tensor] = None,
    ):
        super().__init__()
        if not isinstance(codes, Tensor) or codes.dtype != torch.int16 or codes.dim() != 3:
            raise TypeError(
                "codes must be a (N, K // 8, num_codebooks) int16 tensor, got "
                + (
                    f"{codes.dtype} {tuple(codes.shape)}"
                    if isinstance(codes, Tensor)
                    else type(codes).__name__
                )
            )
        N, J, M = codes.shape
        if (
            not isinstance(codebooks, Tensor)
            or codebooks.dtype not in CODEBOOK_DTYPES
            or codebooks.dim() != 4
        ):
            raise TypeError(
                "codebooks must be a (num_groups, num_codebooks, codebook_size, 8) float32, float16 "
                "or bfloat16 tensor"
            )
        O, Mc, C, g = codebooks.shape
        if g != IN_GROUP:
            raise ValueError(
                f"16-bit codes take codewords of {IN_GROUP} inputs (in_group 8), got in_group {g}"
            )
        if Mc != M:
            raise ValueError(f"codes address {M} codebooks and codebooks hold {Mc}; expected the same number")
        if not 1 <= C <= 65536:
            raise ValueError(f"16-bit codes address at most 65536 codewords, got codebook_size {C}")
        if codes.numel() and int(code_values(codes).max()) >= C:
            raise ValueError(
                f"codes must be smaller than codebook_size {C}; found {int(code_values(codes).max())}"
            )
        if not isinstance(scales, Tensor) or not scales.is_floating_point() or tuple(scales.shape) != (N,):
            raise ValueError(f"scales must be a floating ({N},) tensor, one per row")
        if group_ptr is None:
            group_ptr = torch.tensor([0, N], dtype=torch.int64, device=codes.device)
        if (
            not isinstance(group_ptr, Tensor)
            or group_ptr.dtype != torch.int64
            or tuple(group_ptr.shape) != (O + 1,)
        ):
            raise ValueError(f"group_ptr must be a ({O + 1},) int64 tensor (num_groups + 1 boundaries)")
        gp = group_ptr.tolist()
        if gp[0] != 0 or gp[-1] != N or any(a > b for a, b in zip(gp, gp[1:])):
            raise ValueError(f"group_ptr must rise from 0 to {N}, got {gp}")
        if perm is not None and (
            not isinstance(perm, Tensor)
            or perm.dtype != torch.int64
            or tuple(perm.shape) != (N,)
            or not torch.equal(perm.sort().values, torch.arange(N, device=perm.device))
        ):
            raise ValueError(f"perm must be a ({N},) int64 permutation of the output features")
        if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (N,)):
            raise ValueError(f"bias must be a ({N},) tensor")
        self.in_features, self.out_features = J * IN_GROUP, N
        self.register_buffer("codes", codes.contiguous())
        self.register_buffer("group_ptr", group_ptr)
        self.register_buffer("perm", perm)
        self.codebooks = nn.Parameter(codebooks.detach().contiguous())
        self.scales = nn.Parameter(scales.detach().contiguous())
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    @property
    def bits_per_weight(self) -> float:
        """Exact storage bits per weight: codes, codebooks, scales, boundaries, permutation."""
        parts = (self.codes, self.codebooks, self.scales, self.group_ptr, self.perm)
        return (
            8.0
            * sum(t.numel() * t.element_size() for t in parts if t is not None)
            / max(1, self.in_features * self.out_features)
        )

    def dequantize(self) -> Tensor:
        """The dense (out_features, in_features) float32 weight it represents."""
        return wide_dequantize(self.codes, self.codebooks, self.scales, self.group_ptr, self.perm)

    def forward(self, x: Tensor) -> Tensor:
        on_cpu = x.device.type == "cpu"
        _backend.check_tensor(
            x, "x", dtypes=(torch.float32, torch.bfloat16) if on_cpu else _backend.FLOAT_DTYPES
        )
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must end in in_features = {self.in_features}, got shape {tuple(x.shape)}")
        return matmul(x, self.codes, self.codebooks, self.scales, self.group_ptr, self.perm, self.bias)

    def extra_repr(self) -> str:
        O, M, C, g = self.codebooks.shape
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, in_group={g}, "
            f"num_codebooks={M}, codebook_size={C}, groups={O}, codebook_dtype="
            f"{str(self.codebooks.dtype).replace('torch.', '')}, bias={self.bias is not None}"
        )
