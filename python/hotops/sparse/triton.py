"""Triton block-sparse (BSR) kernel for sparse_linear on the GPU.

The CSR weight is regrouped into BO x BI blocks (every block holding at least one non-zero is
stored dense, zeros included); one program computes a BB x BO tile of y = x W^T by running over
its block row's stored blocks, each a tensor-core ``tl.dot`` of an x tile and a weight block.
Unstructured masks at high sparsity leave many blocks empty only when the pruning is block-wise
or the blocks are small, so the block size is an argument. The input gradient is the same kernel
on W^T; the values' gradient is gy^T x (cuBLAS) gathered at the non-zeros.
Runs on the CPU under TRITON_INTERPRET=1 for tests.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from hotops.sparse.format import csr_rows

BLOCK = (32, 32)  # (BO, BI): weight block rows x columns
BATCH_TILE = 32


@triton.jit
def _bsr_linear_kernel(
    X,
    CROW,
    CCOL,
    BLK,
    BIAS,
    Y,
    B,
    O,
    I,
    stride_x,
    stride_y,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    BB: tl.constexpr,
    BO: tl.constexpr,
    BI: tl.constexpr,
):
    # one-dimensional grid, block rows of the weight fastest (programs side by side share their x
    # tile): CUDA caps grid y at 65,535, which the batch tiles alone pass at 2.1M rows
    n_o = tl.cdiv(O, BO)
    pid_o = tl.program_id(0) % n_o
    pid_b = tl.program_id(0) // n_o
    rows_b = pid_b * BB + tl.arange(0, BB)
    outs = pid_o * BO + tl.arange(0, BO)
    local = tl.arange(0, BO)
    ins = tl.arange(0, BI)
    acc = tl.zeros((BB, BO), dtype=tl.float32)
    start = tl.load(CROW + pid_o)
    end = tl.load(CROW + pid_o + 1)
    for j in range(start, end):  # start and end are int64 (crow), so the offsets are too
        cols = tl.load(CCOL + j) * BI + ins
        x = tl.load(
            X + rows_b[:, None].to(tl.int64) * stride_x + cols[None, :],
            mask=(rows_b[:, None] < B) & (cols[None, :] < I),
            other=0.0,
        )
        w = tl.load(BLK + j * BO * BI + local[:, None] * BI + ins[None, :])
        acc += tl.dot(x, tl.trans(w), input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(BIAS + outs, mask=outs < O, other=0.0)[None, :]
    if ACT != "none":  # relu, and relu6; NaN stays NaN
        acc = tl.where(acc > 0, acc, tl.where(acc != acc, acc, 0.0))
    if ACT == "relu6":
        acc = tl.where(acc > 6.0, 6.0, acc)
    tl.store(
        Y + rows_b[:, None].to(tl.int64) * stride_y + outs[None, :],
        acc,
        mask=(rows_b[:, None] < B) & (outs[None, :] < O),
    )


def to_bsr(
    rowptr: Tensor, colidx: Tensor, values: Tensor, shape: Tuple[int, int], block: Tuple[int, int] = BLOCK
) -> Tuple[Tensor, Tensor, Tensor]:
    """(crow (O/BO + 1,), ccol (nblocks,), blocks (nblocks, BO, BI)) of the CSR matrix."""
    O, I = shape
    BO, BI = block
    dev = values.device
    rows = csr_rows(rowptr.to(dev), O)
    cols = colidx.to(dev).long()
    n_bcols = -(-I // BI)
    key = (rows // BO) * n_bcols + cols // BI
    uniq, slot = torch.unique(key, return_inverse=True)  # sorted: block-row major
    blocks = torch.zeros(uniq.numel(), BO, BI, dtype=torch.float32, device=dev)
    blocks[slot, rows % BO, cols % BI] = values.detach().float()
    crow = torch.zeros(-(-O // BO) + 1, dtype=torch.int64, device=dev)
    torch.cumsum(torch.bincount(uniq // n_bcols, minlength=crow.numel() - 1), 0, out=crow[1:])
    return crow, (uniq % n_bcols).to(torch.int32), blocks


def launch_grid(O: int, B: int) -> Tuple[int]:
    """The kernel's grid for an (O, I) weight and B rows: one dimension (see the kernel), since
    CUDA caps grid y at 65,535 and x at 2^31 - 1."""
    return (triton.cdiv(O, BLOCK[0]) * triton.cdiv(B, BATCH_TILE),)


def bsr_linear(
    x: Tensor,
    rowptr: Tensor,
    colidx: Tensor,
    values: Tensor,
    shape: Tuple[int, int],
    bias: Optional[Tensor] = None,
    activation: Optional[str] = None,
) -> Tensor:
    """act(x W^T + bias) for x (B, I) float32 and the (O, I) CSR weight W; ``activation`` is
    None, "relu" or "relu6"."""
    O, I = shape
    B = x.shape[0]
    y = torch.empty(B, O, dtype=torch.float32, device=x.device)
    if B == 0:
        return y
    x = x.detach().float().contiguous()
    crow, ccol, blocks = to_bsr(rowptr, colidx, values, shape)
    BO, BI = BLOCK
    grid = launch_grid(O, B)
    _bsr_linear_kernel[grid](
        x,
        crow,
        ccol,
        blocks,
        bias.detach().contiguous() if bias is not None else x,
        y,
        B,
        O,
        I,
        x.stride(0),
        y.stride(0),
        HAS_BIAS=bias is not None,
        ACT=activation or "none",
        BB=BATCH_TILE,
        BO=BO,
        BI=BI,
    )
    return y
