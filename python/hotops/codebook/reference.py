"""Plain-torch definition of the codebook format's dense weight and product: what the kernels
are tested against. It reads the packed layout with its own index arithmetic and imports nothing
from the code it checks (format.py keeps the production unpacking).

Row r of the stored (grouped) order, input group j, is

    W_stored[r, j*g:(j+1)*g] = scales[r] * sum_m codebooks[group(r), m, codes[r, j, m]]

where group(r) is the o with group_ptr[o] <= r < group_ptr[o+1], the code of (r, j, m) is stored at
packed[r // 16, j*M + m, r % 16], and stored row r is output feature perm[r] (identity when perm
is None).

16-bit codes (``wide.py``): codes (N, J, M) int16 hold the values c mod 2^16, codewords have 8
inputs, and W_stored[r, 8j:8j+8] = scales[r] * sum_m codebooks[group(r), m, codes[r, j, m]].
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def dequantize(
    codes: Tensor, codebooks: Tensor, scales: Tensor, group_ptr: Tensor, perm: Optional[Tensor] = None
) -> Tensor:
    """The dense (out_features, in_features) float32 weight (differentiable in codebooks, scales),
    from packed uint8 codes or (N, J, M) int16 codes."""
    N = scales.shape[0]
    M, g = codebooks.shape[1], codebooks.shape[3]
    dev = codes.device
    r = torch.arange(N, device=dev)[:, None, None]
    m = torch.arange(M, device=dev)[None, None, :]
    if codes.dtype == torch.int16:
        code = codes.long() % 65536  # the int16 bit pattern as its unsigned value
        J = codes.shape[1]
    else:
        block = codes.shape[2]
        J = codes.shape[1] // M
        j = torch.arange(J, device=dev)[None, :, None]
        code = codes[r // block, j * M + m, r % block].long()  # (N, J, M)
    group = torch.bucketize(torch.arange(N, device=dev), group_ptr[1:].to(dev), right=True)
    words = codebooks.float()[group[:, None, None], m, code]  # (N, J, M, g)
    stored = words.sum(2).reshape(N, J * g) * scales.float()[:, None]
    if perm is None:
        return stored
    out = torch.empty_like(stored)
    out[perm.to(dev)] = stored
    return out


def codebook_matmul(
    x: Tensor,
    codes: Tensor,
    codebooks: Tensor,
    scales: Tensor,
    group_ptr: Tensor,
    perm: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
) -> Tensor:
    """x (..., in) -> (..., out) in x's dtype: F.linear with the dense weight (either code width)."""
    w = dequantize(codes, codebooks, scales, group_ptr, perm).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))
