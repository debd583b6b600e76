"""AQLM checkpoints as hotops modules: ``from_aqlm(layer)`` converts one ``aqlm.QuantizedLinear``,
``convert_aqlm(model)`` swaps every one in a model. aqlm is imported only when these run.

AQLM stores a layer as codes (out_groups, in_groups, num_codebooks), int8 (up to 8 bits) or int16
(9 to 16 bits) with codes >= 2^(nbits - 1) stored as code - 2^nbits (negative); codebooks (num_codebooks, 2^nbits, out_group_size,
in_group_size); scales (out_groups, 1, 1, 1); and a bias. Row block o, input group j of the
weight is scales[o] * sum_m codebooks[m, codes[o, j, m]] (an out_group_size x in_group_size tile).

What each layer becomes:

* up to 8-bit codes ("1x8", "2x8", "1x4", ..., in_group 1, 2, 4 or 8): a ``CodebookLinear`` (the lookup-table
  kernel); with more than two codebooks ("4x8", "8x8") a ``CodebookLinearSum`` of one
  CodebookLinear per pair of codebooks (the product is linear in the codebooks);
* 9- to 16-bit codes ("1x16", "2x16", "1x12", ..., in_group 8): a ``WideCodebookLinear`` (the
  gather kernel).

out_group_size > 1 is converted exactly: output row o * out_group_size + t is stored in row
group t, whose codebook is the t-th row of every codeword; ``perm`` puts the rows back in order.
Refused (ValueError naming the reason): 16-bit codes over in_group != 8, up-to-8-bit codes over
in_group 16 or other sizes the lookup-table format lacks, and codes wider than 16 bits.

aqlm's CPU path reorders 8-bit codes in place to (in_groups, out_groups, num_codebooks) on its
first call; both orders convert. When in_groups == out_groups the shapes cannot tell: the layer
counts as reordered when aqlm prepared it (``gemv_op`` set) with 256 codewords and the codes now
on the CPU, which is when aqlm reorders.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from hotops.codebook.format import IN_GROUPS, CodebookWeight
from hotops.codebook.module import CodebookLinear, WideCodebookLinear
from hotops.codebook.wide import IN_GROUP as WIDE_IN_GROUP

__all__ = ["CodebookLinearSum", "convert_aqlm", "from_aqlm"]


def _quantized_linear_type():
    try:
        from aqlm import QuantizedLinear
    except ImportError as e:  # pragma: no cover - exercised only without aqlm
        raise ImportError("hotops.codebook.from_aqlm needs the aqlm package (pip install aqlm)") from e
    return QuantizedLinear


class CodebookLinearSum(nn.Module):
    """y = sum_p parts[p](x) (+ bias): an AQLM layer with more than two 8-bit codebooks as one
    CodebookLinear per pair of codebooks, all with the layer's scales (the product is linear in
    the codewords, so the sum is the layer's product)."""

    def __init__(self, parts: list[CodebookLinear], bias: Optional[Tensor] = None):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.in_features, self.out_features = parts[0].in_features, parts[0].out_features
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    @property
    def bits_per_weight(self) -> float:
        return sum(p.bits_per_weight for p in self.parts)

    def dequantize(self) -> Tensor:
        """The dense (out_features, in_features) float32 weight."""
        return sum(p.dequantize() for p in self.parts)

    def forward(self, x: Tensor) -> Tensor:
        y = self.parts[0](x)
        for p in self.parts[1:]:
            y = y + p(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def was_reordered(layer) -> bool:
    """Whether aqlm has reordered the layer's codes to (in_groups, out_groups, num_codebooks)."""
    out_groups = layer.out_features // layer.out_group_size
    in_groups = layer.in_features // layer.in_group_size
    shape = tuple(layer.codes.shape[:2])
    if out_groups != in_groups:
        if shape not in ((out_groups, in_groups), (in_groups, out_groups)):
            raise ValueError(
                f"aqlm codes of shape {tuple(layer.codes.shape)} fit neither ({out_groups}, "
                f"{in_groups}, M) nor the reordered ({in_groups}, {out_groups}, M)"
            )
        return shape == (in_groups, out_groups)
    return (
        getattr(layer, "gemv_op", None) is not None
        and layer.codebook_size == 256
        and layer.codes.device.type == "cpu"
    )


def unsigned_codes(codes: Tensor, nbits: int) -> Tensor:
    """AQLM's signed codes as the hotops kernels read them: uint8 for up to 8 bits, the bit
    pattern of uint16 in int16 above. aqlm stores codes >= 2^(nbits - 1) as negatives (its
    pack_int_data), so, as its unpack_int_data, a code is the stored value mod 2^nbits: a plain
    reinterpretation would be right only for nbits 8 and 16."""
    code = codes.long() % (1 << nbits)
    if nbits <= 8:
        return code.to(torch.uint8)
    return torch.where(code >= 1 << 15, code - (1 << 16), code).to(torch.int16)


def logical_codes(layer) -> Tensor:
    """The codes in AQLM's (out_groups, in_groups, num_codebooks) order, as stored (signed)."""
    codes = layer.codes.detach()
    return codes.permute(1, 0, 2) if was_reordered(layer) else codes


def from_aqlm(layer) -> nn.Module:
    """An ``aqlm.QuantizedLinear`` as a hotops module computing the same product (see the module
    docstring for what each format becomes). The result owns copies of the layer's tensors, on
    the layer's device, in the layer's dtypes."""
    QuantizedLinear = _quantized_linear_type()
    if not isinstance(layer, QuantizedLinear):
        raise TypeError(f"layer must be an aqlm.QuantizedLinear, got {type(layer).__name__}")
    nbits, M = layer.nbits_per_codebook, layer.num_codebooks
    og, ig = layer.out_group_size, layer.in_group_size
    fmt = f"{M}x{nbits} (in_group {ig}, out_group {og})"
    if nbits > 16:
        raise ValueError(
            f"AQLM {fmt}: codes wider than 16 bits are not supported (hotops kernels take "
            f"8- and 16-bit codes)"
        )
    if nbits > 8 and ig != WIDE_IN_GROUP:
        raise ValueError(
            f"AQLM {fmt}: {nbits}-bit codes are supported over in_group {WIDE_IN_GROUP} only "
            f"(the 16-bit gather kernel's codeword size)"
        )
    if nbits <= 8 and ig not in IN_GROUPS:
        raise ValueError(
            f"AQLM {fmt}: codes of up to 8 bits are supported over in_group {IN_GROUPS} (the "
            f"lookup-table format's codeword sizes)"
        )
    codes = logical_codes(layer)  # (out_groups, in_groups, M)
    out_groups = codes.shape[0]
    # rows stored t-major: stored row t * out_groups + o is output row o * og + t, in row group t
    # clone, not contiguous(): with og = 1 the permuted view is contiguous already and would
    # share the layer's storage (training the copy would change the aqlm layer)
    codebooks = layer.codebooks.detach().permute(2, 0, 1, 3).clone(memory_format=torch.contiguous_format)
    scales = layer.scales.detach().reshape(out_groups).repeat(og).clone()
    group_ptr = torch.arange(og + 1, dtype=torch.int64, device=codes.device) * out_groups
    perm = None
    if og > 1:
        o = torch.arange(out_groups, device=codes.device)
        perm = (o[None, :] * og + torch.arange(og, device=codes.device)[:, None]).reshape(-1)
    rows = unsigned_codes(codes, nbits)  # a new tensor: the module owns its codes
    rows = rows.repeat(og, 1, 1) if og > 1 else rows
    bias = None if layer.bias is None else layer.bias.detach().clone()
    if nbits > 8:
        return WideCodebookLinear(rows.contiguous(), codebooks, scales, group_ptr, perm, bias)
    parts = []
    for m0 in range(0, M, 2):
        w = CodebookWeight(
            rows[:, :, m0 : m0 + 2].contiguous(),
            codebooks[:, m0 : m0 + 2].contiguous(),
            scales,
            group_ptr,
            perm,
        )
        parts.append(CodebookLinear(w, None if M > 2 else bias))
    return parts[0] if M <= 2 else CodebookLinearSum(parts, bias)


def convert_aqlm(model: nn.Module) -> nn.Module:
    """Replaces every ``aqlm.QuantizedLinear`` in `model` (in place) by ``from_aqlm(layer)`` and
    returns the model (or the converted layer, when `model` is one)."""
    QuantizedLinear = _quantized_linear_type()
    if isinstance(model, QuantizedLinear):
        return from_aqlm(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, QuantizedLinear):
                setattr(parent, name, from_aqlm(child))
    return model
