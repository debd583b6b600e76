"""The 16-bit-code format: codebooks of up to 65536 codewords over 8 inputs (AQLM's "1x16").

A lookup table per input group would hold 65536 entries, so these weights do not go through the
lookup-table kernel of the uint8 format (``format.py``). On the CPU, ``hotops::codebook_wide_matmul``
(``op.py``) runs a kernel of its own (csrc/codebook/wide.cpp): it streams each row's 2-byte codes,
gathers the addressed codewords from the codebook (2 MiB in float32, 1 MiB in float16 / bfloat16:
L2-resident) and multiplies them with x; a chunk of up to 16 batch rows shares each gather. Larger
batches dequantize row tiles and multiply with torch's BLAS.

Format (``WideCodebookLinear``'s buffers): codes (N, K // 8, M) int16 (a code c >= 2^15 stored as
c - 2^16, as AQLM stores it), codebooks (num_groups, M, C, 8) float32 | float16 | bfloat16 with
C <= 65536, per-row scales (N,), row-group boundaries ``group_ptr`` and ``perm`` as in
``CodebookWeight``: row r of the stored order is

    scales[r] * concat_j sum_m codebooks[group(r), m, codes[r, j, m]]

and is output feature perm[r].
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from hotops.codebook import format as fmt

IN_GROUP = 8
CODEBOOK_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def code_values(codes: Tensor) -> Tensor:
    """The int16 codes as their unsigned values 0..65535 (int64)."""
    return codes.long() & 0xFFFF


def dequantize_stored(codes: Tensor, codebooks: Tensor, scales: Tensor, group_ptr: Tensor) -> Tensor:
    """The dense (N, K) float32 weight in stored row order, in torch (differentiable in codebooks
    and scales): the path of devices without a kernel."""
    N, J, M = codes.shape
    group = fmt.row_groups(group_ptr, N)
    words = codebooks.float()[group[:, None, None], torch.arange(M, device=codes.device), code_values(codes)]
    return words.sum(2).reshape(N, J * codebooks.shape[-1]) * scales.float()[:, None]


def validate(
    codes: Tensor,
    codebooks: Tensor,
    scales: Tensor,
    group_ptr: Optional[Tensor],
    perm: Optional[Tensor],
    bias: Optional[Tensor],
) -> Tensor:
    """Checks a 16-bit-code weight's parts (errors name the argument); returns group_ptr (one
    group when None)."""
    if not isinstance(codes, Tensor) or codes.dtype != torch.int16 or codes.dim() != 3:
        got = f"{codes.dtype} {tuple(codes.shape)}" if isinstance(codes, Tensor) else type(codes).__name__
        raise TypeError(f"codes must be a (N, K // 8, num_codebooks) int16 tensor, got {got}")
    N, J, M = codes.shape
    if not isinstance(codebooks, Tensor) or codebooks.dtype not in CODEBOOK_DTYPES or codebooks.dim() != 4:
        raise TypeError(
            "codebooks must be a (num_groups, num_codebooks, codebook_size, 8) float32, float16 "
            "or bfloat16 tensor"
        )
    O, Mc, C, g = codebooks.shape
    if g != IN_GROUP:
        raise ValueError(f"16-bit codes take codewords of {IN_GROUP} inputs (in_group 8), got in_group {g}")
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
    group_ptr = fmt.check_group_ptr(group_ptr, O, N, codes.device)
    fmt.check_perm(perm, N)
    if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (N,)):
        raise ValueError(f"bias must be a ({N},) tensor")
    return group_ptr
