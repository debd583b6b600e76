"""The codebook family's public functions: they validate their arguments (errors name the
argument and what was expected) and call the ops of ``op.py``, which check nothing again."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from hotops import _backend
from hotops.codebook import op
from hotops.codebook.format import CodebookWeight

ACTIVATION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BIAS_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_input(x, in_features: int) -> None:
    """x for a product with a weight of in_features inputs: a float32, bfloat16 or float16
    tensor ending in in_features."""
    _backend.check_tensor(x, "x", dtypes=ACTIVATION_DTYPES)
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"x must end in in_features = {in_features}, got shape {tuple(x.shape)}")


def codebook_matmul(x: Tensor, weight: CodebookWeight, bias: Optional[Tensor] = None) -> Tensor:
    """x (..., in_features) -> (..., out_features): ``F.linear(x, weight.dequantize(), bias)``
    without materialising the dense weight. x is float32, bfloat16 or float16 (float32
    accumulation); differentiable in x, the codebooks, the scales and bias."""
    if not isinstance(weight, CodebookWeight):
        raise TypeError(f"weight must be a CodebookWeight, got {type(weight).__name__}")
    check_input(x, weight.in_features)
    if bias is not None:
        _backend.check_tensor(bias, "bias", ndim=1, dtypes=BIAS_DTYPES)
        if bias.shape[0] != weight.out_features:
            raise ValueError(
                f"bias must have out_features = {weight.out_features} entries, got {bias.shape[0]}"
            )
    _backend.check_same_device(x=x, codes=weight.codes, bias=bias)
    return op.matmul(x, weight.codes, weight.codebooks, weight.scales, weight.group_ptr, weight.perm, bias)


def from_aqlm(layer):
    """An ``aqlm.QuantizedLinear`` as a hotops module (see hotops.integrations.aqlm)."""
    from hotops.integrations.aqlm import from_aqlm as convert

    return convert(layer)


def convert_aqlm(model):
    """Swaps every ``aqlm.QuantizedLinear`` in `model` for a hotops module, in place (see
    hotops.integrations.aqlm)."""
    from hotops.integrations.aqlm import convert_aqlm as convert

    return convert(model)
