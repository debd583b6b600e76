"""Plain-torch definitions the sparse kernels are tested against: the dense masked weight."""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from hotops.sparse.format import SparseWeight


def _params(x: Tensor, sw: SparseWeight, bias: Optional[Tensor]):
    # the weight and bias in the activations' dtype (bfloat16 / float16 / float64 references)
    return sw.to_dense().to(x.dtype), (bias.to(x.dtype) if bias is not None else None)


def _act(y: Tensor, activation: Optional[str]) -> Tensor:
    if activation == "relu6":
        return F.relu6(y)
    return F.relu(y) if activation == "relu" else y


def sparse_linear(
    x: Tensor, sw: SparseWeight, bias: Optional[Tensor] = None, activation: Optional[str] = None
) -> Tensor:
    return _act(F.linear(x, *_params(x, sw, bias)), activation)


def sparse_conv2d(
    x: Tensor,
    sw: SparseWeight,
    bias: Optional[Tensor] = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: Optional[int] = None,
    activation: Optional[str] = None,
) -> Tensor:
    return _act(F.conv2d(x, *_params(x, sw, bias), stride, padding, dilation, sw.groups), activation)
