"""Codebook-quantized linear layers (JLCM: jointly learnable codebooks and mappings)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from hotops import _backend
from hotops.codebook import op as _op
from hotops.codebook.format import CodebookWeight
from hotops.codebook.jlcm import compress, load_compressed
from hotops.codebook.module import CodebookLinear
from hotops.codebook.wide import WideCodebookLinear

__all__ = [
    "codebook_matmul",
    "CodebookWeight",
    "CodebookLinear",
    "WideCodebookLinear",
    "compress",
    "load_compressed",
    "from_aqlm",
    "convert_aqlm",
]

ACTIVATION_DTYPES = _op.ACTIVATION_DTYPES


def codebook_matmul(x: Tensor, weight: CodebookWeight, bias: Optional[Tensor] = None) -> Tensor:
    """x (..., in_features) -> (..., out_features): ``F.linear(x, weight.dequantize(), bias)``
    without materialising the dense weight. x is float32 or bfloat16, or off the CPU also float16
    (float32 accumulation); differentiable in x, the codebooks, the scales and bias."""
    if not isinstance(weight, CodebookWeight):
        raise TypeError(f"weight must be a CodebookWeight, got {type(weight).__name__}")
    _op.check_input(x, weight.in_features)
    if bias is not None:
        _backend.check_tensor(
            bias, "bias", ndim=1, dtypes=(torch.float32, torch.bfloat16, torch.float16, torch.float64)
        )
        if bias.shape[0] != weight.out_features:
            raise ValueError(
                f"bias must have out_features = {weight.out_features} entries, got {bias.shape[0]}"
            )
    _backend.check_same_device(x=x, codes=weight.codes, bias=bias)
    return _op.matmul(x, weight.codes, weight.codebooks, weight.scales, weight.group_ptr, weight.perm, bias)


def from_aqlm(layer):
    """An ``aqlm.QuantizedLinear`` as a hotops module (see hotops.integrations.aqlm)."""
    from hotops.integrations.aqlm import from_aqlm as convert

    return convert(layer)


def convert_aqlm(model):
    """Swaps every ``aqlm.QuantizedLinear`` in `model` for a hotops module, in place (see
    hotops.integrations.aqlm)."""
    from hotops.integrations.aqlm import convert_aqlm as convert

    return convert(model)
