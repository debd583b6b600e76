"""Plain-torch definition of the codebook format's dense weight and product: what the kernels
are tested against, and (being differentiable in codebooks and scales) what ``compress`` trains.

Row r of the stored (grouped) order, input group j, is

    W_stored[r, j*g:(j+1)*g] = scales[r] * sum_m codebooks[group(r), m, codes[r, j, m]]

and stored row r is output feature perm[r] (identity when perm is None). codes[r, j, m] are the
logical codes; they are stored interleaved by blocks of ROW_BLOCK rows (``pack_codes``), so one
input group of a block is ROW_BLOCK contiguous bytes: the indices of one SIMD gather.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

ROW_BLOCK = 16


def pack_codes(codes: Tensor) -> Tensor:
    """(N, J, M) codes -> (ceil(N / 16), J * M, 16): code (r, j, m) at [r // 16, j * M + m, r % 16];
    rows past N are code 0."""
    N, J, M = codes.shape
    Nb = -(-N // ROW_BLOCK)
    padded = codes.new_zeros(Nb * ROW_BLOCK, J * M)
    padded[:N] = codes.reshape(N, J * M)
    return padded.reshape(Nb, ROW_BLOCK, J * M).transpose(1, 2).contiguous()


def unpack_codes(packed: Tensor, rows: int, num_codebooks: int) -> Tensor:
    """The inverse of pack_codes: (N, J, M) codes."""
    Nb, L, _ = packed.shape
    return (
        packed.transpose(1, 2)
        .reshape(Nb * ROW_BLOCK, L)[:rows]
        .reshape(rows, L // num_codebooks, num_codebooks)
    )


def row_groups(group_ptr: Tensor, rows: int) -> Tensor:
    """The row group of every stored row, (N,) int64."""
    sizes = group_ptr.diff()
    return torch.repeat_interleave(
        torch.arange(sizes.numel(), device=group_ptr.device), sizes, output_size=rows
    )


def dequantize_stored(packed: Tensor, codebooks: Tensor, scales: Tensor, group_ptr: Tensor) -> Tensor:
    """The dense (N, K) weight in stored (grouped) row order, float32, from the packed codes."""
    codes = unpack_codes(packed, scales.shape[0], codebooks.shape[1])
    N, J, M = codes.shape
    g = codebooks.shape[-1]
    group = row_groups(group_ptr, N)
    words = codebooks.float()[group[:, None, None], torch.arange(M, device=codes.device), codes.long()]
    return words.sum(2).reshape(N, J * g) * scales.float()[:, None]


def to_output_order(stored: Tensor, perm: Optional[Tensor]) -> Tensor:
    if perm is None:
        return stored
    return stored[torch.argsort(perm)]


def dequantize(
    codes: Tensor, codebooks: Tensor, scales: Tensor, group_ptr: Tensor, perm: Optional[Tensor] = None
) -> Tensor:
    """The dense (out_features, in_features) float32 weight."""
    return to_output_order(dequantize_stored(codes, codebooks, scales, group_ptr), perm)


def codebook_matmul(
    x: Tensor,
    codes: Tensor,
    codebooks: Tensor,
    scales: Tensor,
    group_ptr: Tensor,
    perm: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
) -> Tensor:
    """x (..., in) -> (..., out) in x's dtype: F.linear with the dense weight."""
    w = dequantize(codes, codebooks, scales, group_ptr, perm).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))
