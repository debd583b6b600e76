"""torch.library registration of the sparse linear and convolution ops: schema, fake impl,
autograd, and the C++ kernels (csrc/sparse).

Both ops take the packed SparseWeight as plain tensors (values, CSR, transposed CSR) so that
torch.compile and opcheck see ordinary tensor arguments; the forward runs on the blocked form
when one is given (block > 0: b_rowptr, b_colidx and the blocked values, see format.py), the
gradients always on the CSR. The arguments are validated by the public functions
(functional.py); the C++ check()s guard memory only. Gradients:

    grad_x      = the same sparse product with W^T (col2im for convolutions)
    grad_values = grad_y . im2col(x)^T sampled at W's non-zeros (never a dense weight gradient)
    grad_bias   = grad_y summed over batch and pixels
"""

import inspect
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from hotops import _backend
from hotops.sparse.format import csr_rows, panel_count
from hotops.sparse.spec import ConvGeometry, activation_grad


def out_features(rowptr: Tensor, in_features: int) -> int:
    return (rowptr.shape[0] - 1) // panel_count(in_features)  # rowptr: one entry per (panel, row)


def _f32(t: Tensor) -> Tensor:
    """t detached, as the contiguous float32 the kernels read (the same tensor when it is one):
    values and bias may be bfloat16 / float16 (a module after .half())."""
    t = t.detach()
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.float().contiguous()


# The C++ steps below run once the CPU backend was chosen (its refusal test found _C).


def _forward(geom: ConvGeometry, values, rowptr, colidx, t_rowptr, x3, bias, y3, activation, blocked):
    _backend.ext().sparse_conv_fwd(
        geom,
        rowptr,
        colidx,
        _f32(values),
        t_rowptr,
        x3,
        bias.detach().float().contiguous() if bias is not None else None,
        y3,
        activation,
        _backend.num_threads(),
        *blocked,
    )


def _widened(x: Tensor, transpose: bool = False) -> Tensor:
    """x (R, C), or x^T (rows padded: _transposed_empty), as a float32 tensor. The kernels run in
    float32: bfloat16 / float16 activations are widened on the way in and the output rounded once
    on the way out.
    The copy runs on hotops' threads, not as a torch op: torch's OpenMP workers spin for
    milliseconds after every op and would take a core from the kernel that follows."""
    x = _backend.cpu_view(x)
    if not transpose and x.dtype == torch.float32 and x.is_contiguous():
        return x
    out = _transposed_empty(*x.shape[::-1]) if transpose else torch.empty(x.shape, dtype=torch.float32)
    _backend.ext().sparse_widen(x, out, transpose, _backend.num_threads())
    return out


def _linear_input(x: Tensor) -> Tensor:
    """A linear layer's x (B, I) as the kernels' (1, I, B) input, as it comes: they transpose
    (and widen) one L2-sized tile of rows at a time, never writing x^T to memory (the bfloat16
    forward on AVX512_BF16 transposes it whole, still bfloat16)."""
    return _backend.cpu_view(x).t().unsqueeze(0)


def _transposed_empty(rows: int, cols: int) -> Tensor:
    """An empty (rows, cols) float32 tensor for a transposed input, its rows whole 64-byte lines
    apart and never a multiple of 8 lines (csrc/sparse/kernel.h's tile_ld, the same rule). The
    kernels read a tile of pixels from every row; rows a multiple of 4 KB apart (any batch of 1024
    float32 rows or a multiple of it) would all fall in the same cache sets and evict each other,
    which made a 90 % sparse 384 -> 384 layer 2x slower at 5,120 rows."""
    lines = -(-max(cols, 1) // 16)  # 16 floats a line
    return torch.empty(rows, (lines if lines % 8 else lines + 1) * 16)[:, :cols]


def _grad_input(geom: ConvGeometry, values, t_rowptr, t_colidx, t_perm, gy3, gx3):
    if values.numel() == 0:  # a fully pruned layer: no input reaches the output
        gx3.zero_()
        return
    _backend.ext().sparse_conv_bwd_input(
        geom, t_rowptr, t_colidx, _f32(values), t_perm, gy3, gx3, _backend.num_threads()
    )


def _grad_values(geom: ConvGeometry, values, rowptr, colidx, t_rowptr, x3, gy3):
    if values.numel() == 0:  # a fully pruned layer has no value to differentiate
        return torch.zeros(0, dtype=torch.float32)
    gv = torch.empty(values.numel(), dtype=torch.float32)
    threads = _backend.num_threads()
    _backend.ext().sparse_conv_bwd_values(geom, rowptr, colidx, _f32(values), t_rowptr, x3, gy3, gv, threads)
    return gv


def _detached(blocked) -> tuple:
    return tuple(t.detach() if isinstance(t, Tensor) else t for t in blocked)


# ------------------------------------------------------------------ linear
#
# Each op's implementation chooses its backend once; a Backend's run takes the op's arguments.


def _cpu_linear(
    x, values, rowptr, colidx, t_rowptr, t_colidx, t_perm, bias, in_features, activation, *blocked
):
    B, O = x.shape[0], out_features(rowptr, in_features)
    y = x.new_empty(B, O)
    xt = _linear_input(x)
    geom = ConvGeometry.linear(B, in_features, O)
    _forward(geom, values, rowptr, colidx, t_rowptr, xt, bias, y.t().unsqueeze(0), activation, blocked)
    return y


def _triton_linear(
    x, values, rowptr, colidx, t_rowptr, t_colidx, t_perm, bias, in_features, activation, *blocked
):
    from hotops.sparse.triton import bsr_linear  # the GPU's BSR kernel ignores the blocked form

    shape = (out_features(rowptr, in_features), in_features)
    return bsr_linear(x, rowptr, colidx, values, shape, bias, activation).to(x.dtype)


def _cpu_linear_backward(
    gy, x, values, rowptr, colidx, t_rowptr, t_colidx, t_perm, in_features, need_x, need_values
):
    B, O = gy.shape
    geom = ConvGeometry.linear(B, in_features, O)
    gyt = _widened(gy, transpose=True).unsqueeze(0)  # (1, O, B)
    gx = gv = None
    if need_x:
        gx = x.new_empty(B, in_features, dtype=torch.float32)
        _grad_input(geom, values, t_rowptr, t_colidx, t_perm, gyt, gx.t().unsqueeze(0))
        gx = gx.to(x.dtype)
    if need_values:
        gv = _grad_values(geom, values, rowptr, colidx, t_rowptr, _linear_input(x), gyt)
    return gx, gv


def _triton_linear_backward(
    gy, x, values, rowptr, colidx, t_rowptr, t_colidx, t_perm, in_features, need_x, need_values
):
    from hotops.sparse.triton import bsr_linear

    O = out_features(rowptr, in_features)
    gx = gv = None
    if need_x:  # the same block-sparse product with W^T
        gx = bsr_linear(gy, t_rowptr, t_colidx, values.detach().float()[t_perm], (in_features, O)).to(x.dtype)
    if need_values:  # gy^T x on the tensor cores, read at the non-zeros
        rows = csr_rows(rowptr.to(gy.device), O)
        gv = (gy.detach().t().float() @ x.detach().float())[rows, colidx.to(gy.device).long()]
    return gx, gv


SPARSE_LINEAR_BACKENDS = (
    _backend.Backend("cpu (C++)", _backend.cpu_refuses, _cpu_linear),
    _backend.Backend("cuda (Triton BSR)", _backend.triton_refuses, _triton_linear),
)
SPARSE_LINEAR_BACKWARD_BACKENDS = (
    _backend.Backend("cpu (C++)", _backend.cpu_refuses, _cpu_linear_backward),
    _backend.Backend("cuda (Triton BSR)", _backend.triton_refuses, _triton_linear_backward),
)


def linear_forward(
    x: Tensor,
    values: Tensor,
    rowptr: Tensor,
    colidx: Tensor,
    t_rowptr: Tensor,
    t_colidx: Tensor,
    t_perm: Tensor,
    bias: Optional[Tensor],
    in_features: int,
    activation: Optional[str],
    block: int = 0,
    b_rowptr: Optional[Tensor] = None,
    b_colidx: Optional[Tensor] = None,
    b_values: Optional[Tensor] = None,
) -> Tensor:
    """y = act(x W^T + bias) for x (B, I), W the (O, I) CSR weight (its blocked form when block > 0:
    the CPU kernels; the GPU's BSR kernel ignores it); ``activation`` None, "relu" or "relu6"."""
    if x.shape[0] == 0:
        return x.new_empty(0, out_features(rowptr, in_features))
    run = _backend.choose("sparse_linear", SPARSE_LINEAR_BACKENDS, x.device).run
    return run(
        x, values, rowptr, colidx, t_rowptr, t_colidx, t_perm, bias, in_features, activation,
        block, b_rowptr, b_colidx, b_values,
    )  # fmt: skip


def prepared_linear(
    x: Tensor,
    values: Tensor,
    rowptr: Tensor,
    colidx: Tensor,
    t_rowptr: Tensor,
    bias: Optional[Tensor],
    in_features: int,
    activation: Optional[str],
    blocked=(0, None, None, None),
):
    """linear_forward for inputs shaped like x (..., I) (float32, bfloat16 or float16, contiguous,
    on the CPU, nothing to differentiate) with everything but the output's allocation done once:
    fn(x) -> y in x's dtype (see prepared_conv2d)."""
    B, O = x.numel() // in_features, out_features(rowptr, in_features)
    shape = (*x.shape[:-1], O)
    ext = _backend.ext()
    bias = _f32(bias) if bias is not None else None
    # detached aliases: the plan keeps these storages alive even if a .data swap replaces them
    plan = ext.SparseConvPlan(
        ConvGeometry.linear(B, in_features, O),
        rowptr.detach(),
        colidx.detach(),
        _f32(values),
        t_rowptr.detach(),
        bias,
        activation,
        *_detached(blocked),
    )
    forward, threads, empty, dtype = plan.forward, torch.get_num_threads, torch.empty, x.dtype

    def run(x: Tensor) -> Tensor:
        y = empty(B, O, dtype=dtype)
        forward(x.view(B, in_features).t().unsqueeze(0), y.t().unsqueeze(0), threads())
        return y.view(shape)

    return run


sparse_linear_op = torch.library.custom_op("hotops::sparse_linear", linear_forward, mutates_args=())


@sparse_linear_op.register_fake
def _(x, values, rowptr, colidx, t_rowptr, t_colidx, t_perm, bias, in_features, activation, *blocked):
    return x.new_empty(x.shape[0], out_features(rowptr, in_features))


@torch.library.custom_op("hotops::sparse_linear_backward", mutates_args=())
def sparse_linear_backward(
    gy: Tensor,
    x: Tensor,
    values: Tensor,
    rowptr: Tensor,
    colidx: Tensor,
    t_rowptr: Tensor,
    t_colidx: Tensor,
    t_perm: Tensor,
    in_features: int,
    need_x: bool,
    need_values: bool,
) -> Tuple[Tensor, Tensor]:
    """(grad_x, grad_values); each is empty when not needed."""
    gx = gv = None
    if gy.shape[0] == 0:
        gx, gv = x.new_zeros(x.shape), values.new_zeros(values.shape)
    elif need_x or need_values:
        run = _backend.choose("sparse_linear_backward", SPARSE_LINEAR_BACKWARD_BACKENDS, gy.device).run
        gx, gv = run(
            gy, x, values, rowptr, colidx, t_rowptr, t_colidx, t_perm, in_features, need_x, need_values
        )
    # values' gradient in their dtype on every path (the CPU kernel accumulates it in float32)
    return (gx if need_x else x.new_empty(0)), (gv.to(values.dtype) if need_values else values.new_empty(0))


@sparse_linear_backward.register_fake
def _(gy, x, values, rowptr, colidx, t_rowptr, t_colidx, t_perm, in_features, need_x, need_values):
    return (
        x.new_empty(x.shape) if need_x else x.new_empty(0),
        values.new_empty(values.shape) if need_values else values.new_empty(0),
    )


# ------------------------------------------------------------------ conv2d


def _cpu_conv2d(
    x, values, rowptr, colidx, t_rowptr, t_colidx, t_perm, bias, weight_shape, stride, padding, dilation,
    groups, activation, *blocked,
):  # fmt: skip
    geom = ConvGeometry.conv(x.shape, weight_shape, stride, padding, dilation, groups)
    y = x.new_empty(geom.out_shape)
    if y.numel() == 0:
        return y
    N, C, H, W = x.shape
    x3 = _widened(x.contiguous().view(N * C, H * W)).view(N, C, H * W)
    _forward(geom, values, rowptr, colidx, t_rowptr, x3, bias, y.flatten(2), activation, blocked)
    return y


def _cpu_conv2d_backward(
    gy, x, values, rowptr, colidx, t_rowptr, t_colidx, t_perm, weight_shape, stride, padding, dilation,
    groups, need_x, need_values,
):  # fmt: skip
    geom = ConvGeometry.conv(x.shape, weight_shape, stride, padding, dilation, groups)
    N, C, H, W = x.shape
    O, P = gy.shape[1], gy.shape[2] * gy.shape[3]
    gx = gv = None
    gy3 = _widened(gy.detach().contiguous().view(N * O, P)).view(N, O, P)
    if need_x:  # col2im adds into grad_x unless the im2col matrix is x itself
        new = x.new_empty if geom.direct else x.new_zeros
        gx = new(x.shape, dtype=torch.float32)
        _grad_input(geom, values, t_rowptr, t_colidx, t_perm, gy3, gx.view(N, C, H * W))
        gx = gx.to(x.dtype)
    if need_values:
        x3 = _widened(x.contiguous().view(N * C, H * W)).view(N, C, H * W)
        gv = _grad_values(geom, values, rowptr, colidx, t_rowptr, x3, gy3)
    return gx, gv


# convolutions run on the CPU kernels only (the GPU has the BSR linear kernel, see triton.py)
SPARSE_CONV2D_BACKENDS = (_backend.Backend("cpu (C++)", _backend.cpu_refuses, _cpu_conv2d),)
SPARSE_CONV2D_BACKWARD_BACKENDS = (_backend.Backend("cpu (C++)", _backend.cpu_refuses, _cpu_conv2d_backward),)


def conv2d_forward(
    x: Tensor,
    values: Tensor,
    rowptr: Tensor,
    colidx: Tensor,
    t_rowptr: Tensor,
    t_colidx: Tensor,
    t_perm: Tensor,
    bias: Optional[Tensor],
    weight_shape: List[int],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
    activation: Optional[str],
    block: int = 0,
    b_rowptr: Optional[Tensor] = None,
    b_colidx: Optional[Tensor] = None,
    b_values: Optional[Tensor] = None,
) -> Tensor:
    """y = act(conv2d(x, W, bias)) for the (O, C/groups, kh, kw) CSR weight W (its blocked form
    when block > 0)."""
    run = _backend.choose("sparse_conv2d", SPARSE_CONV2D_BACKENDS, x.device).run
    return run(
        x, values, rowptr, colidx, t_rowptr, t_colidx, t_perm, bias, weight_shape, stride, padding, dilation,
        groups, activation, block, b_rowptr, b_colidx, b_values,
    )  # fmt: skip


def prepared_conv2d(
    x: Tensor,
    values: Tensor,
    rowptr: Tensor,
    colidx: Tensor,
    t_rowptr: Tensor,
    bias: Optional[Tensor],
    weight_shape: List[int],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
    activation: Optional[str],
    blocked=(0, None, None, None),
):
    """conv2d_forward for inputs shaped like x (float32, contiguous, on the CPU, nothing to
    differentiate) with everything but the output's allocation done once: fn(x) -> y. It reads
    values and bias in place (updates in place show; a replaced tensor needs a new one)."""
    geom = ConvGeometry.conv(x.shape, weight_shape, stride, padding, dilation, groups)
    y_shape = geom.out_shape
    bias = _f32(bias) if bias is not None else None
    plan = _backend.ext().SparseConvPlan(
        geom,
        rowptr.detach(),
        colidx.detach(),
        _f32(values),
        t_rowptr.detach(),
        bias,
        activation,
        *_detached(blocked),
    )
    forward, threads, empty = plan.forward, torch.get_num_threads, torch.empty

    def run(x: Tensor) -> Tensor:
        y = empty(y_shape)
        forward(x.flatten(2), y.flatten(2), threads())
        return y

    return run


sparse_conv2d_op = torch.library.custom_op("hotops::sparse_conv2d", conv2d_forward, mutates_args=())


@sparse_conv2d_op.register_fake
def _(
    x, values, rowptr, colidx, t_rowptr, t_colidx, t_perm, bias, weight_shape, stride, padding, dilation,
    groups, activation, *blocked,
):  # fmt: skip
    return x.new_empty(ConvGeometry.conv(x.shape, weight_shape, stride, padding, dilation, groups).out_shape)


@torch.library.custom_op("hotops::sparse_conv2d_backward", mutates_args=())
def sparse_conv2d_backward(
    gy: Tensor,
    x: Tensor,
    values: Tensor,
    rowptr: Tensor,
    colidx: Tensor,
    t_rowptr: Tensor,
    t_colidx: Tensor,
    t_perm: Tensor,
    weight_shape: List[int],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
    need_x: bool,
    need_values: bool,
) -> Tuple[Tensor, Tensor]:
    """(grad_x, grad_values); each is empty when not needed."""
    gx = gv = None
    if gy.numel() == 0:
        gx, gv = x.new_zeros(x.shape), values.new_zeros(values.shape)
    elif need_x or need_values:
        run = _backend.choose("sparse_conv2d_backward", SPARSE_CONV2D_BACKWARD_BACKENDS, gy.device).run
        gx, gv = run(
            gy, x, values, rowptr, colidx, t_rowptr, t_colidx, t_perm, weight_shape, stride, padding,
            dilation, groups, need_x, need_values,
        )  # fmt: skip
    # values' gradient in their dtype on every path (the CPU kernel accumulates it in float32)
    return (gx if need_x else x.new_empty(0)), (gv.to(values.dtype) if need_values else values.new_empty(0))


@sparse_conv2d_backward.register_fake
def _(
    gy, x, values, rowptr, colidx, t_rowptr, t_colidx, t_perm, weight_shape, stride, padding, dilation,
    groups, need_x, need_values,
):  # fmt: skip
    return (
        x.new_empty(x.shape) if need_x else x.new_empty(0),
        values.new_empty(values.shape) if need_values else values.new_empty(0),
    )


# ------------------------------------------------------------------ autograd
#
# The forward ops' arguments by name: what the backward ops need of them (the structure tensors,
# the geometry) and which of them get a gradient (x, values, bias; never the blocked form).

_STRUCTURE = ("rowptr", "colidx", "t_rowptr", "t_colidx", "t_perm")


def _autograd(forward_op, forward_fn, backward_op, geometry: Tuple[str, ...], bias_dims: Tuple[int, ...]):
    names = tuple(inspect.signature(forward_fn).parameters)

    def setup_context(ctx, inputs, output):
        a = dict(zip(names, inputs))
        ctx.geometry = tuple(a[n] for n in geometry)
        ctx.activation = a["activation"]
        ctx.bias_dtype = a["bias"].dtype if a["bias"] is not None else None
        saved_y = output if a["activation"] is not None else None
        ctx.save_for_backward(a["x"], a["values"], *(a[n] for n in _STRUCTURE), saved_y)

    def backward(ctx, gy):
        x, values, *structure, y = ctx.saved_tensors
        gy = activation_grad(gy, y, ctx.activation)
        need = dict(zip(names, ctx.needs_input_grad))
        grads = {}
        if need["x"] or need["values"]:
            gx, gv = backward_op(gy, x, values, *structure, *ctx.geometry, need["x"], need["values"])
            grads["x"], grads["values"] = (gx if need["x"] else None), (gv if need["values"] else None)
        if ctx.bias_dtype is not None and need["bias"]:
            grads["bias"] = gy.float().sum(bias_dims).to(ctx.bias_dtype)
        return tuple(grads.get(n) for n in names)

    forward_op.register_autograd(backward, setup_context=setup_context)


_autograd(sparse_linear_op, linear_forward, sparse_linear_backward, ("in_features",), (0,))
_autograd(
    sparse_conv2d_op,
    conv2d_forward,
    sparse_conv2d_backward,
    ("weight_shape", "stride", "padding", "dilation", "groups"),
    (0, 2, 3),
)
