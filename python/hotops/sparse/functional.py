"""The public sparse functions: validation (messages name the argument), then the ops. The
modules call the *_unchecked entry points after validating once per input signature."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from hotops import _backend
from hotops.sparse import op
from hotops.sparse.format import SparseWeight
from hotops.sparse.spec import ACTIVATIONS
from hotops.sparse.tracking import _DATA, TrackedBuffer

# activations (and bias) may be bfloat16 / float16: the kernels read them widened to float32 (the
# bf16 linear forward with AVX512_BF16 reads them as they are and rounds the values to bf16),
# accumulate in float32 and round the output once to x's dtype
ACTIVATION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
IntPair = Union[int, Sequence[int]]


def check_activation(activation) -> Optional[str]:
    """``activation`` if it is one the kernels fuse (None, "relu" or "relu6")."""
    if not (activation is None or (isinstance(activation, str) and activation in ACTIVATIONS)):
        raise ValueError(f"activation must be None, 'relu' or 'relu6', got {activation!r}")
    return activation


def _check_common(x: Tensor, sw, bias: Optional[Tensor], ndim: int) -> None:
    if not isinstance(sw, SparseWeight):
        raise TypeError(f"sw must be a hotops.sparse.SparseWeight, got {type(sw).__name__}")
    _backend.check_tensor(x, "x", ndim=ndim, dtypes=ACTIVATION_DTYPES)
    values = plain(sw.values)
    if values.dtype not in ACTIVATION_DTYPES or values.shape != sw.colidx.shape:  # one cheap test per call
        _backend.check_tensor(values, "sw.values", ndim=1, dtypes=ACTIVATION_DTYPES)
        raise ValueError(
            f"sw.values has shape {tuple(values.shape)}, but sw's structure has {sw.nnz} non-zeros"
        )
    if bias is not None:
        _backend.check_tensor(bias, "bias", ndim=1, dtypes=ACTIVATION_DTYPES)
        if bias.shape[0] != sw.out_features:
            raise ValueError(
                f"bias has {bias.shape[0]} entries, expected {sw.out_features} (one per output channel)"
            )
    _backend.check_same_device(x=x, values=values, bias=bias)


def pair(v: IntPair, name: str, minimum: int) -> list:
    """An int argument that may also be a pair (h, w): Python or NumPy ints, 0-d tensors, a tuple
    or list of two; each checked by _backend.check_number."""
    if (
        isinstance(v, (tuple, list))
        or (isinstance(v, Tensor) and v.dim() == 1)
        or (hasattr(v, "shape") and hasattr(v, "dtype") and len(getattr(v, "shape", ())) == 1)
    ):
        items = list(v)
        if len(items) != 2:
            raise ValueError(
                f"{name} must be an int >= {minimum} or a pair of them, got {len(items)} values: {v!r}"
            )
    else:
        items = [v, v]
    return [_backend.check_number(i, name, integer=True, low=minimum) for i in items]


def sparse_linear(
    x: Tensor, sw: SparseWeight, bias: Optional[Tensor] = None, activation: Optional[str] = None
) -> Tensor:
    """``act(F.linear(x, W, bias))`` with W the packed sparse (O, I) weight; x is (..., I) float32,
    bfloat16 or float16 (the output has x's dtype).
    Differentiable w.r.t. x, ``sw.values`` and bias."""
    return linear_unchecked(x, sw, bias, check_linear(x, sw, bias, activation))


def check_linear(x: Tensor, sw: SparseWeight, bias: Optional[Tensor], activation: Optional[str]):
    """sparse_linear's argument checks (raising as it does), without computing; the activation."""
    _check_common(x, sw, bias, ndim=None)
    act = check_activation(activation)
    if len(sw.shape) != 2:
        raise ValueError(f"sparse_linear needs a linear (O, I) SparseWeight, got shape {sw.shape}")
    if x.dim() == 0 or x.shape[-1] != sw.shape[1]:
        raise ValueError(f"x must end in the {sw.shape[1]} input features, got shape {tuple(x.shape)}")
    return act


def plain(t: Optional[Tensor]) -> Optional[Tensor]:
    """A module's nn.Parameter (tracking.TrackedParameter) as a plain tensor alias, without counting
    it as a .data read."""
    return _DATA.__get__(t) if isinstance(t, (nn.Parameter, TrackedBuffer)) else t


def _blocked(x: Tensor, sw: SparseWeight) -> tuple:
    """The op arguments of sw's blocked form (a CPU kernel: none on other devices)."""
    return sw.blocked if x.device.type == "cpu" else (0, None, None, None)


def linear_unchecked(x: Tensor, sw: SparseWeight, bias: Optional[Tensor], act: Optional[str]) -> Tensor:
    """sparse_linear after validation (the modules validate once per input signature)."""
    # plain aliases: cheaper for the C++ to read than Parameters. Meta tensors (shapes only) go
    # through the dispatcher to the op's fake implementation: no backend runs on them
    if not x.is_meta and _backend.can_skip_dispatcher(x, sw.values, bias):
        fn, values, bias = op.linear_forward, plain(sw.values), plain(bias)
    else:
        fn, values = op.sparse_linear_op, sw.values
    y = fn(
        x.reshape(-1, sw.shape[1]),
        values,
        sw.rowptr,
        sw.colidx,
        sw.t_rowptr,
        sw.t_colidx,
        sw.t_perm,
        bias,
        sw.shape[1],
        act,
        *_blocked(x, sw),
    )
    return y.reshape(*x.shape[:-1], sw.out_features)


def sparse_conv2d(
    x: Tensor,
    sw: SparseWeight,
    bias: Optional[Tensor] = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: Optional[int] = None,
    activation: Optional[str] = None,
) -> Tensor:
    """``act(F.conv2d(x, W, bias, stride, padding, dilation, groups))`` with W the packed sparse
    (O, C/groups, kh, kw) weight; x is (N, C, H, W) float32, bfloat16 or float16. ``groups`` defaults to the one W was
    packed with. Differentiable w.r.t. x, ``sw.values`` and bias."""
    return conv2d_unchecked(
        x, sw, bias, *check_conv2d(x, sw, bias, stride, padding, dilation, groups, activation)
    )


def check_conv2d(x, sw, bias, stride, padding, dilation, groups, activation):
    """sparse_conv2d's argument checks (raising as it does), without computing; (stride,
    padding, dilation) as pairs and the activation, conv2d_unchecked's last arguments."""
    _check_common(x, sw, bias, ndim=4)
    act = check_activation(activation)
    if len(sw.shape) != 4:
        raise ValueError(
            f"sparse_conv2d needs a conv (O, C/groups, kh, kw) SparseWeight, got shape {sw.shape}"
        )
    groups = sw.groups if groups is None else _backend.check_number(groups, "groups", integer=True, low=1)
    if groups != sw.groups:
        raise ValueError(
            f"sw was packed for groups={sw.groups}, called with groups={groups}; pack with "
            f"SparseWeight.from_dense(w, ..., groups={groups})"
        )
    stride, padding = pair(stride, "stride", 1), pair(padding, "padding", 0)
    dilation = pair(dilation, "dilation", 1)
    C = x.shape[1]
    if C != sw.shape[1] * groups:
        raise ValueError(
            f"x has {C} channels; the weight {sw.shape} with groups={groups} expects {sw.shape[1] * groups}"
        )
    for d, name in ((2, "height"), (3, "width")):
        k = sw.shape[d]
        if x.shape[d] + 2 * padding[d - 2] < dilation[d - 2] * (k - 1) + 1:
            raise ValueError(
                f"input {name} {x.shape[d]} (padded by {padding[d - 2]}) is smaller than the "
                f"dilated kernel ({dilation[d - 2] * (k - 1) + 1})"
            )
    return stride, padding, dilation, act


def conv2d_unchecked(
    x: Tensor,
    sw: SparseWeight,
    bias: Optional[Tensor],
    stride: list,
    padding: list,
    dilation: list,
    act: Optional[str],
) -> Tensor:
    """sparse_conv2d after validation, with (h, w) pairs (the modules validate once per input
    signature)."""
    # plain aliases: cheaper for the C++ to read than Parameters. Meta tensors (shapes only) go
    # through the dispatcher to the op's fake implementation: no backend runs on them
    if not x.is_meta and _backend.can_skip_dispatcher(x, sw.values, bias):
        fn, values, bias = op.conv2d_forward, plain(sw.values), plain(bias)
    else:
        fn, values = op.sparse_conv2d_op, sw.values
    return fn(
        x,
        values,
        sw.rowptr,
        sw.colidx,
        sw.t_rowptr,
        sw.t_colidx,
        sw.t_perm,
        bias,
        list(sw.shape),
        stride,
        padding,
        dilation,
        sw.groups,
        act,
        *_blocked(x, sw),
    )
