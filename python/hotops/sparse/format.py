"""SparseWeight: a pruned linear or convolution weight packed once into column-panelled CSR.

Rows are output channels; columns index the (C/groups * kh * kw) im2col view of one group, in the
order of ``weight.reshape(O, -1)``. Columns are cut into panels of PANEL_COLS and the non-zeros
ordered by (panel, row, column): ``rowptr`` has ``panels * O + 1`` entries and row r's non-zeros
in panel q are ``[rowptr[q * O + r], rowptr[q * O + r + 1])``. The CPU kernel runs a panel over
all rows before the next, so the activation rows a panel reads stay in cache (docs/sparse.md);
with at most PANEL_COLS columns it is plain CSR. The transposed structure (CSR of W^T per group, and the
permutation that gathers the values into it) is packed alongside, because the input gradient is
the same sparse product with W^T and the convolution kernel skips im2col rows no weight uses.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch
from torch import Tensor


# 512 activation rows of 64 floats (the kernel's register tile) = 128 KB: L2-resident per panel;
# narrower panels park partial sums more often and cost batch-1 products whole gathers
PANEL_COLS = 512


def panel_count(cols: int) -> int:
    return max(1, -(-cols // PANEL_COLS))


def csr_rows(rowptr: Tensor, rows: int) -> Tensor:
    """The row of every non-zero of a (column-panelled) CSR over ``rows`` rows."""
    ranges = torch.arange(rowptr.numel() - 1, device=rowptr.device) % rows
    return torch.repeat_interleave(ranges, rowptr.diff())


def magnitude_mask(w: Tensor, sparsity: float) -> Tensor:
    """Keeps the round((1 - sparsity) * numel) largest |w| (ties broken by position)."""
    check_sparsity(sparsity)
    keep = int(round((1.0 - sparsity) * w.numel()))
    mask = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
    if keep > 0:
        mask[w.detach().abs().flatten().topk(keep, sorted=False).indices] = True
    return mask.view(w.shape)


def check_sparsity(sparsity: float) -> None:
    if not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")


@dataclasses.dataclass(frozen=True)
class SparseWeight:
    """A weight of shape ``shape`` ((O, I) for linear, (O, C/groups, kh, kw) for conv) stored as
    CSR over its O rows. ``values`` may be a leaf that requires grad (training under the mask)."""

    shape: Tuple[int, ...]
    groups: int
    rowptr: Tensor     # (panels * O + 1,) int64: column-panelled CSR (see the module docstring)
    colidx: Tensor     # (nnz,) int32, column within the group's im2col rows
    values: Tensor     # (nnz,) float32, in (panel, row, column) order
    t_rowptr: Tensor   # (groups * K + 1,) int64: CSR of W^T per group
    t_colidx: Tensor   # (nnz,) int32: output channel within the group
    t_perm: Tensor     # (nnz,) int64: values[t_perm] are W^T's values

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def cols(self) -> int:  # K: columns of one row
        k = 1
        for s in self.shape[1:]:
            k *= s
        return k

    @property
    def nnz(self) -> int:
        return self.colidx.numel()

    @property
    def density(self) -> float:
        return self.nnz / max(1, self.shape[0] * self.cols)

    @staticmethod
    def from_dense(w: Tensor, sparsity: Optional[float] = None, mask: Optional[Tensor] = None,
                   groups: int = 1) -> "SparseWeight":
        """Packs ``w * mask``. Give either ``mask`` (bool, w's shape) or ``sparsity`` (magnitude
        pruning to that fraction of zeros); with neither, w's own non-zeros are kept."""
        if not isinstance(w, Tensor):
            raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
        if w.dim() not in (2, 4):
            raise ValueError(f"w must be a linear (O, I) or conv (O, C/groups, kh, kw) weight, got shape {tuple(w.shape)}")
        if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"w has dtype {str(w.dtype).replace('torch.', '')}; expected float32, bfloat16 or "
                            "float16 (the values are kept in float32)")
        w = w.float()
        if w.numel() == 0:
            raise ValueError(f"w is empty (shape {tuple(w.shape)})")
        if not isinstance(groups, int) or groups < 1 or w.shape[0] % groups:
            raise ValueError(f"groups must be a positive divisor of the {w.shape[0]} output channels, got {groups!r}")
        if mask is not None and sparsity is not None:
            raise ValueError("give either mask or sparsity, not both")
        if mask is None:
            mask = magnitude_mask(w, sparsity) if sparsity is not None else w.detach() != 0
        if not isinstance(mask, Tensor) or mask.shape != w.shape:
            raise ValueError(f"mask must be a tensor of w's shape {tuple(w.shape)}, got "
                             f"{tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be bool, got {str(mask.dtype).replace('torch.', '')}")
        w2, m2 = w.detach().reshape(w.shape[0], -1), mask.reshape(w.shape[0], -1)
        rows, cols = m2.nonzero(as_tuple=True)  # row-major
        return SparseWeight.pack(tuple(w.shape), groups, rows, cols, w2[rows, cols].contiguous())

    @staticmethod
    def pack(shape, groups: int, rows: Tensor, cols: Tensor, values: Tensor) -> "SparseWeight":
        """Column-panelled CSR (and W^T's CSR) from row-major sorted coordinates."""
        O = shape[0]
        K = 1
        for s in shape[1:]:
            K *= s
        panels = panel_count(K)
        if panels > 1:  # (panel, row, column) order; the sort is stable, so columns stay sorted
            order = torch.argsort((cols // PANEL_COLS) * O + rows, stable=True)
            rows, cols, values = rows[order], cols[order], values[order]
        counts = torch.bincount((cols // PANEL_COLS) * O + rows, minlength=panels * O)
        rowptr = torch.zeros(panels * O + 1, dtype=torch.int64)
        torch.cumsum(counts, 0, out=rowptr[1:])
        og = O // groups
        t_rows = (rows // og) * K + cols      # W^T row: (group, column)
        t_cols = rows % og                    # W^T column: output channel in the group
        t_perm = torch.argsort(t_rows * og + t_cols, stable=True)
        t_rowptr = torch.zeros(groups * K + 1, dtype=torch.int64)
        torch.cumsum(torch.bincount(t_rows, minlength=groups * K), 0, out=t_rowptr[1:])
        return SparseWeight(tuple(int(s) for s in shape), int(groups), rowptr, cols.to(torch.int32),
                            values, t_rowptr, t_cols[t_perm].to(torch.int32).contiguous(), t_perm)

    def with_values(self, values: Tensor) -> "SparseWeight":
        """The same structure with other values (e.g. a trained Parameter)."""
        if values.shape != (self.nnz,):
            raise ValueError(f"values must have shape ({self.nnz},), got {tuple(values.shape)}")
        # spelled out rather than dataclasses.replace, which torch.compile < 2.5 cannot trace
        return SparseWeight(self.shape, self.groups, self.rowptr, self.colidx, values,
                            self.t_rowptr, self.t_colidx, self.t_perm)

    def to(self, device) -> "SparseWeight":
        """The same weight with every tensor on ``device``."""
        return SparseWeight(self.shape, self.groups, *(t.to(device) for t in (
            self.rowptr, self.colidx, self.values, self.t_rowptr, self.t_colidx, self.t_perm)))

    def mask(self) -> Tensor:
        m = torch.zeros(self.shape[0], self.cols, dtype=torch.bool, device=self.values.device)
        m[self.row_indices(), self.colidx.long()] = True
        return m.view(self.shape)

    def row_indices(self) -> Tensor:
        return csr_rows(self.rowptr, self.shape[0])

    def to_dense(self) -> Tensor:
        """The masked dense weight (differentiable w.r.t. ``values``)."""
        flat = torch.zeros(self.shape[0] * self.cols, dtype=self.values.dtype, device=self.values.device)
        idx = self.row_indices() * self.cols + self.colidx.long()
        return flat.index_put((idx,), self.values).view(self.shape)
