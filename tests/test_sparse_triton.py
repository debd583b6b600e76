"""hotops.sparse's Triton BSR kernel: the launch grid (CUDA's limits) and the tile each program
takes, run under TRITON_INTERPRET=1 on the CPU (tests/test_sparse.py runs the op end to end)."""

import pytest
import torch
from conftest import require_triton_runs


def test_grid_is_one_dimensional_within_cuda_limits():
    """grid y stops at 65,535 on CUDA: 2.1M rows are 65,625 batch tiles, so every tile is on x."""
    pytest.importorskip("triton")
    from hotops.sparse.triton import BATCH_TILE, BLOCK, launch_grid

    for O, B in ((32, 2_100_000), (4096, 2_100_000), (1_000_000, 64), (1, 1)):
        grid = launch_grid(O, B)
        assert len(grid) == 1 and grid[0] <= 2**31 - 1
        assert grid[0] == -(-O // BLOCK[0]) * -(-B // BATCH_TILE)


@pytest.mark.parametrize("B,O,I", [(70, 70, 40), (1, 97, 33), (65, 1, 5)])
def test_every_tile_is_computed_once(B, O, I):
    """Several weight block rows and batch tiles (and one of each): each program's (block row,
    batch tile) from its one-dimensional id covers the output exactly."""
    require_triton_runs()
    from hotops.sparse.triton import bsr_linear

    w = torch.randn(O, I) * (torch.rand(O, I) < 0.4)
    nz = w.nonzero()
    rowptr = torch.zeros(O + 1, dtype=torch.int64)
    rowptr[1:] = torch.cumsum(torch.bincount(nz[:, 0], minlength=O), 0)
    x = torch.randn(B, I)
    bias = torch.randn(O)
    y = bsr_linear(x, rowptr, nz[:, 1].int(), w[nz[:, 0], nz[:, 1]], (O, I), bias, None)
    torch.testing.assert_close(
        y, x.double().matmul(w.double().T).add(bias.double()).float(), rtol=1e-5, atol=1e-5
    )
