"""torch.library registration of the sparse linear and convolution ops: schema, fake impl,
autograd, and the C++ kernels (csrc/sparse).

Both ops take the packed SparseWeight as plain tensors (values, CSR, transposed CSR) so that
torch.compile and opcheck see ordinary tensor arguments; the forward runs on the blocked form
when one is given (block > 0: b_rowptr, b_colidx and the blocked values, see format.py), the
gradients always on the CSR. Gradients:

    grad_x      = the same sparse product with W^T (col2im for convolutions)
    grad_values = grad_y . im2col(x)^T sampled at W's non-zeros (never a dense weight gradient)
    grad_bias   = grad_y summed over batch and pixels
"""

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from hotops import _backend
from hotops.sparse.format import csr_rows, panel_count

# the activation fused after the bias, as the kernels' code (csrc/sparse/cpu.h, Act)
ACTIVATIONS = {None: 0, "relu": 1, "relu6": 2}


def activate(y: Tensor, activation: Optional[str]) -> Tensor:
    """The fused activation in torch, for the dense paths."""
    if activation == "relu6":
        return torch.nn.functional.relu6(y)
    return torch.nn.functional.relu(y) if activation == "relu" else y


# convolutions run on the CPU kernels only (the GPU has the BSR linear kernel, see triton.py)
CONV_BACKENDS = (_backend.Backend("cpu (C++)", _backend.cpu_refuses, _backend.ext),)


def out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def out_shape(
    x_shape: Sequence[int], weight_shape: Sequence[int], stride, padding, dilation
) -> Tuple[int, ...]:
    """(N, O, Ho, Wo) of the convolution of x (N, C, H, W) by a (O, C/groups, kh, kw) weight."""
    return (
        x_shape[0],
        weight_shape[0],
        *(out_size(x_shape[2 + d], weight_shape[2 + d], stride[d], padding[d], dilation[d]) for d in (0, 1)),
    )


def conv_geometry(
    x_shape: Sequence[int], w_shape: Sequence[int], stride, padding, dilation, groups: int
) -> List[int]:
    N, C, H, W = x_shape
    O, _, kh, kw = w_shape
    return [
        N,
        C,
        H,
        W,
        O,
        groups,
        kh,
        kw,
        stride[0],
        stride[1],
        padding[0],
        padding[1],
        dilation[0],
        dilation[1],
    ]


def out_features(rowptr: Tensor, in_features: int) -> int:
    return (rowptr.shape[0] - 1) // panel_count(in_features)  # rowptr: one entry per (panel, row)


def linear_geometry(B: int, I: int, O: int) -> List[int]:
    # a linear layer is a 1x1 convolution of one "image" whose B pixels are the batch
    return [1, I, 1, B, O, 1, 1, 1, 1, 1, 0, 0, 1, 1]


def _f32(t: Tensor) -> Tensor:
    """t detached, as the contiguous float32 the kernels read (the same tensor when it is one):
    values and bias may be bfloat16 / float16 (a module after .half())."""
    t = t.detach()
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.float().contiguous()


def _forward(geom, values, rowptr, colidx, t_rowptr, x3, bias, y3, act, blocked):
    ext = _backend.choose("sparse_conv2d", CONV_BACKENDS, x3.device).run()
    ext.sparse_conv_fwd(
        geom,
        rowptr,
        colidx,
        _f32(values),
        t_rowptr,
        x3,
        bias.detach().float().contiguous() if bias is not None else None,
        y3,
        act,
        _backend.num_threads(),
        *blocked,
    )


def _widened(x: Tensor, transpose: bool = False) -> Tensor:
    """x (R, C), or x^T, as a contiguous float32 tensor. The kernels run in float32: bfloat16 /
    float16 activations are widened on the way in and the output rounded once on the way out.
    The copy runs on hotops' threads, not as a torch op: torch's OpenMP workers spin for
    milliseconds after every op and would take a core from the kernel that follows."""
    x = _backend.cpu_view(x)
    if not transpose and x.dtype == torch.float32 and x.is_contiguous():
        return x
    out = torch.empty(x.shape[::-1] if transpose else x.shape, dtype=torch.float32)
    ext = _backend.choose("sparse_conv2d", CONV_BACKENDS, x.device).run()
    ext.sparse_widen(x, out, transpose, _backend.num_threads())
    return out


def _grad_input(geom, values, t_rowptr, t_colidx, t_perm, gy3, gx3):
    ext = _backend.choose("sparse_conv2d", CONV_BACKENDS, gy3.device).run()
    if values.numel() == 0:  # a fully pruned layer: no input reaches the output
        gx3.zero_()
        return
    ext.sparse_conv_bwd_input(
        geom, t_rowptr, t_colidx, _f32(values)[t_perm].contiguous(), gy3, gx3, _backend.num_threads()
    )


def _grad_values(geom, values, rowptr, colidx, t_rowptr, x3, gy3):
    ext = _backend.choose("sparse_conv2d", CONV_BACKENDS, gy3.device).run()
    threads = _backend.num_threads()
    if values.numel() == 0:  # a fully pruned layer has no value to differentiate
        return torch.zeros(0, dtype=torch.float32)
    partial = torch.zeros(threads, values.numel(), dtype=torch.float32)
    ext.sparse_conv_bwd_values(geom, rowptr, colidx, _f32(values), t_rowptr, x3, gy3, partial, threads)
    return partial.sum(0) if threads > 1 else partial[0]


# ------------------------------------------------------------------ linear


def _cpu_linear(x, values, rowptr, colidx, t_rowptr, bias, in_features, act, blocked):
    B, O = x.shape[0], out_features(rowptr, in_features)
    y = x.new_empty(B, O)
    xt = _widened(x, transpose=True).unsqueeze(0)  # (1, I, B): each feature a batch row
    _forward(
        linear_geometry(B, in_features, O),
        values,
        rowptr,
        colidx,
        t_rowptr,
        xt,
        bias,
        y.t().unsqueeze(0),
        act,
        blocked,
    )
    return y


def _cpu_linear_grads(
    gy, x, values, rowptr, colidx, t_rowptr, t_colidx, t_perm, in_features, need_x, need_values
):
    B, O = gy.shape
    geom = linear_geometry(B, in_features, O)
    gyt = _widened(gy, transpose=True).unsqueeze(0)  # (1, O, B)
    gx = gv = None
    if need_x:
        gx = x.new_empty(B, in_features, dtype=torch.float32)
        _grad_input(geom, values, t_rowptr, t_colidx, t_perm, gyt, gx.t().unsqueeze(0))
        gx = gx.to(x.dtype)
    if need_values:
        gv = _grad_values(
            geom, values, rowptr, colidx, t_rowptr, _widened(x, transpose=True).unsqueeze(0), gyt
        )
    return gx, gv


def _triton_linear(x, values, rowptr, colidx, t_rowptr, bias, in_features, act, blocked):
    from hotops.sparse.triton import bsr_linear

    y = bsr_linear(x, rowptr, colidx, values, (out_features(rowptr, in_features), in_features), bias, act)
    return y.to(x.dtype)


def _triton_linear_grads(
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


LINEAR_BACKENDS = (
    _backend.Backend("cpu (C++)", _backend.cpu_refuses, (_cpu_linear, _cpu_linear_grads)),
    _backend.Backend("cuda (Triton BSR)", _backend.triton_refuses, (_triton_linear, _triton_linear_grads)),
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
    activation: int,
    block: int = 0,
    b_rowptr: Optional[Tensor] = None,
    b_colidx: Optional[Tensor] = None,
    b_values: Optional[Tensor] = None,
) -> Tensor:
    """y = act(x W^T + bias) for x (B, I), W the (O, I) CSR weight (its blocked form when block > 0:
    the CPU kernels; the GPU's BSR kernel ignores it); ``activation`` is an ACTIVATIONS code."""
    if x.shape[0] == 0:
        return x.new_empty(0, out_features(rowptr, in_features))
    forward, _ = _backend.choose("sparse_linear", LINEAR_BACKENDS, x.device).run
    return forward(
        x,
        values,
        rowptr,
        colidx,
        t_rowptr,
        bias,
        in_features,
        activation,
        (block, b_rowptr, b_colidx, b_values),
    )


def _detached(blocked) -> tuple:
    return tuple(t.detach() if isinstance(t, Tensor) else t for t in blocked)


def prepared_linear(
    x: Tensor,
    values: Tensor,
    rowptr: Tensor,
    colidx: Tensor,
    t_rowptr: Tensor,
    bias: Optional[Tensor],
    in_features: int,
    activation: int,
    blocked=(0, None, None, None),
):
    """linear_forward for inputs shaped like x (..., I) (float32, contiguous, on the CPU, nothing
    to differentiate) with everything but the allocations and x's transposition done once:
    fn(x) -> y (see prepared_conv2d)."""
    B, O = x.numel() // in_features, out_features(rowptr, in_features)
    shape = (*x.shape[:-1], O)
    ext = _backend.choose("sparse_linear", CONV_BACKENDS, x.device).run()  # the C++ kernels
    bias = _f32(bias) if bias is not None else None
    # detached aliases: the plan keeps these storages alive even if a .data swap replaces them
    plan = ext.SparseConvPlan(
        linear_geometry(B, in_features, O),
        rowptr.detach(),
        colidx.detach(),
        _f32(values),
        t_rowptr.detach(),
        bias,
        activation,
        *_detached(blocked),
    )
    forward, widen, threads, empty = plan.forward, ext.sparse_widen, torch.get_num_threads, torch.empty

    def run(x: Tensor) -> Tensor:
        x2 = x.view(B, in_features)
        if B == 1:  # x^T is x
            xt = x2.view(1, in_features, 1)
        else:
            xt = empty(in_features, B)
            widen(x2, xt, True, threads())
            xt = xt.unsqueeze(0)
        y = empty(B, O)
        forward(xt, y.t().unsqueeze(0), threads())
        return y.view(shape)

    return run


sparse_linear_op = torch.library.custom_op("hotops::sparse_linear", linear_forward, mutates_args=())


@sparse_linear_op.register_fake
def _(
    x,
    values,
    rowptr,
    colidx,
    t_rowptr,
    t_colidx,
    t_perm,
    bias,
    in_features,
    activation,
    block=0,
    b_rowptr=None,
    b_colidx=None,
    b_values=None,
):
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
        _, grads = _backend.choose("sparse_linear", LINEAR_BACKENDS, gy.device).run
        gx, gv = grads(
            gy, x, values, rowptr, colidx, t_rowptr, t_colidx, t_perm, in_features, need_x, need_values
        )
    return (gx if need_x else x.new_empty(0)), (gv if need_values else values.new_empty(0))


@sparse_linear_backward.register_fake
def _(gy, x, values, rowptr, colidx, t_rowptr, t_colidx, t_perm, in_features, need_x, need_values):
    return (
        x.new_empty(x.shape) if need_x else x.new_empty(0),
        values.new_empty(values.shape) if need_values else values.new_empty(0),
    )


# ------------------------------------------------------------------ conv2d


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
    activation: int,
    block: int = 0,
    b_rowptr: Optional[Tensor] = None,
    b_colidx: Optional[Tensor] = None,
    b_values: Optional[Tensor] = None,
) -> Tensor:
    """y = act(conv2d(x, W, bias)) for the (O, C/groups, kh, kw) CSR weight W (its blocked form
    when block > 0)."""
    geom = conv_geometry(x.shape, weight_shape, stride, padding, dilation, groups)
    y = x.new_empty(out_shape(x.shape, weight_shape, stride, padding, dilation))
    if y.numel() == 0:
        return y
    N, C, H, W = x.shape
    x3 = _widened(x.contiguous().view(N * C, H * W)).view(N, C, H * W)
    _forward(
        geom,
        values,
        rowptr,
        colidx,
        t_rowptr,
        x3,
        bias,
        y.flatten(2),
        activation,
        (block, b_rowptr, b_colidx, b_values),
    )
    return y


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
    activation: int,
    blocked=(0, None, None, None),
):
    """conv2d_forward for inputs shaped like x (float32, contiguous, on the CPU, nothing to
    differentiate) with everything but the output's allocation done once: fn(x) -> y. It reads
    values and bias in place (updates in place show; a replaced tensor needs a new one)."""
    y_shape = out_shape(x.shape, weight_shape, stride, padding, dilation)
    ext = _backend.choose("sparse_conv2d", CONV_BACKENDS, x.device).run()
    bias = _f32(bias) if bias is not None else None
    plan = ext.SparseConvPlan(
        conv_geometry(x.shape, weight_shape, stride, padding, dilation, groups),
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
    x,
    values,
    rowptr,
    colidx,
    t_rowptr,
    t_colidx,
    t_perm,
    bias,
    weight_shape,
    stride,
    padding,
    dilation,
    groups,
    activation,
    block=0,
    b_rowptr=None,
    b_colidx=None,
    b_values=None,
):
    return x.new_empty(out_shape(x.shape, weight_shape, stride, padding, dilation))


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
    geom = conv_geometry(x.shape, weight_shape, stride, padding, dilation, groups)
    N, C, H, W = x.shape
    O, P = gy.shape[1], gy.shape[2] * gy.shape[3]
    gx, gv = x.new_empty(0), values.new_empty(0)
    if gy.numel() == 0:
        return (x.new_zeros(x.shape) if need_x else gx), (
            values.new_zeros(values.shape) if need_values else gv
        )
    gy3 = _widened(gy.detach().contiguous().view(N * O, P)).view(N, O, P)
    if need_x:
        direct = weight_shape[2:] == [1, 1] and stride == [1, 1] and padding == [0, 0]
        gx = (
            x.new_empty(x.shape, dtype=torch.float32) if direct else x.new_zeros(x.shape, dtype=torch.float32)
        )
        _grad_input(geom, values, t_rowptr, t_colidx, t_perm, gy3, gx.view(N, C, H * W))
        gx = gx.to(x.dtype)
    if need_values:
        x3 = _widened(x.contiguous().view(N * C, H * W)).view(N, C, H * W)
        gv = _grad_values(geom, values, rowptr, colidx, t_rowptr, x3, gy3)
    return gx, gv


@sparse_conv2d_backward.register_fake
def _(
    gy,
    x,
    values,
    rowptr,
    colidx,
    t_rowptr,
    t_colidx,
    t_perm,
    weight_shape,
    stride,
    padding,
    dilation,
    groups,
    need_x,
    need_values,
):
    return (
        x.new_empty(x.shape) if need_x else x.new_empty(0),
        values.new_empty(values.shape) if need_values else values.new_empty(0),
    )


# ------------------------------------------------------------------ autograd


def _setup(ctx, inputs, output, extra: int):
    x, values = inputs[0], inputs[1]
    ctx.extra = inputs[8 : 8 + extra]  # in_features, or (weight_shape, stride, padding, dilation, groups)
    act = inputs[8 + extra]  # then the blocked form, which the gradients do not use
    ctx.has_bias = inputs[7] is not None
    ctx.bias_dtype = inputs[7].dtype if ctx.has_bias else None
    ctx.act = act
    ctx.save_for_backward(x, values, *inputs[2:7], output if act else None)


def _grads(ctx, gy, backward_op, bias_dims):
    x, values, rowptr, colidx, t_rowptr, t_colidx, t_perm, y = ctx.saved_tensors
    if ctx.act:  # the activation passes the gradient where it passed its input: 0 < y (< 6 for relu6)
        gy = gy * ((y > 0) & (y < 6) if ctx.act == ACTIVATIONS["relu6"] else (y > 0))
    need_x, need_values = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gx = gv = None
    if need_x or need_values:
        gx, gv = backward_op(
            gy, x, values, rowptr, colidx, t_rowptr, t_colidx, t_perm, *ctx.extra, need_x, need_values
        )
    gb = gy.float().sum(bias_dims).to(ctx.bias_dtype) if ctx.has_bias and ctx.needs_input_grad[7] else None
    return (gx if need_x else None, gv if need_values else None, None, None, None, None, None, gb)


BLOCKED_ARGS = 4  # block, b_rowptr, b_colidx, b_values: no gradients
sparse_linear_op.register_autograd(
    lambda ctx, gy: _grads(ctx, gy, sparse_linear_backward, (0,)) + (None,) * (2 + BLOCKED_ARGS),
    setup_context=lambda ctx, inputs, output: _setup(ctx, inputs, output, 1),
)
sparse_conv2d_op.register_autograd(
    lambda ctx, gy: _grads(ctx, gy, sparse_conv2d_backward, (0, 2, 3)) + (None,) * (6 + BLOCKED_ARGS),
    setup_context=lambda ctx, inputs, output: _setup(ctx, inputs, output, 5),
)
