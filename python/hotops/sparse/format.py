"""SparseWeight: a pruned linear or convolution weight packed once into column-panelled CSR.

Rows are output channels; columns index the (C/groups * kh * kw) im2col view of one group, in the
order of ``weight.reshape(O, -1)``. Columns are cut into panels of PANEL_COLS and the non-zeros
ordered by (panel, row, column): ``rowptr`` has ``panels * O + 1`` entries and row r's non-zeros
in panel q are ``[rowptr[q * O + r], rowptr[q * O + r + 1])``. The CPU kernel runs a panel over
all rows before the next, so the activation rows a panel reads stay in cache (docs/notes/sparse.md, "Column panels");
with at most PANEL_COLS columns it is plain CSR. The transposed structure (CSR of W^T per group, and the
permutation that gathers the values into it) is packed alongside, because the input gradient is
the same sparse product with W^T and the convolution kernel skips im2col rows no weight uses.

Optionally the forward also gets an output-channel-blocked form: blocks of ``block`` (4 or 8)
consecutive output rows of one group, each stored over the union of its rows' columns with
``block`` values per stored column (zero where a row lacks it), in the same column panels
(``b_rowptr`` over (panel, block), ``b_colidx``, ``b_perm``: the blocked values are
``values`` gathered by ``b_perm``, the index ``nnz`` standing for a padding zero). One stored
column loads its activations once for ``block`` rows. It pays where the blocks are full (block
pruning, ``from_dense(..., block=b)``), not on unstructured masks, where the rows of a block
share few columns; the packer builds it where the fill (non-zeros over stored values) is at
least BLOCK_FILL_MIN, measured (docs/notes/sparse.md, "Blocked format: the fill threshold"). Training still runs on
the CSR (``values`` stays the parameter; the gradients are the CSR's).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch
from torch import Tensor

from hotops.sparse.tracking import _BUILD_LOCK, _quick_key

# 512 activation rows of 64 floats (the kernel's register tile) = 128 KB: L2-resident per panel;
# narrower panels park partial sums more often and cost batch-1 products whole gathers
PANEL_COLS = 512

BLOCK_SIZES = (4, 8)
# from this fill (non-zeros / stored values) on, the blocked forward beat the CSR one in every
# measured case; the first to lose below it, batched linear at 90 %, crosses over near 0.6
BLOCK_FILL_MIN = 0.65


def panel_count(cols: int) -> int:
    return max(1, -(-cols // PANEL_COLS))


def csr_rows(rowptr: Tensor, rows: int, nnz: Optional[int] = None) -> Tensor:
    """The row of every non-zero of a (column-panelled) CSR over ``rows`` rows. On the meta
    device (shapes only, no counts to repeat by) an int64 meta tensor of the ``nnz`` it is given."""
    if rowptr.device.type == "meta":
        if nnz is None:
            raise ValueError("csr_rows of a meta rowptr needs nnz (a meta tensor holds no counts)")
        return torch.empty(nnz, dtype=torch.int64, device="meta")
    ranges = torch.arange(rowptr.numel() - 1, device=rowptr.device) % rows
    return torch.repeat_interleave(ranges, rowptr.diff())


def magnitude_mask(w: Tensor, sparsity: float) -> Tensor:
    """Keeps the round((1 - sparsity) * numel) largest |w| (ties broken by position)."""
    sparsity = check_sparsity(sparsity)
    keep = int(round((1.0 - sparsity) * w.numel()))
    mask = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
    if keep > 0:
        mask[w.detach().abs().flatten().topk(keep, sorted=False).indices] = True
    return mask.view(w.shape)


def block_mask(w: Tensor, sparsity: float, block: int, groups: int) -> Tensor:
    """Block pruning: keeps the round((1 - sparsity) * blocks) blocks of ``block`` consecutive output
    channels of one group (x one column) with the largest L2 norm; a group's last block may be
    shorter. Structured pruning trades accuracy for speed (docs/sparse.md)."""
    sparsity = check_sparsity(sparsity)
    O, K = w.shape[0], w[0].numel()
    og = O // groups
    bpg = -(-og // block)
    w3 = w.detach().reshape(groups, og, K)
    padded = w3.new_zeros(groups, bpg * block, K)
    padded[:, :og] = w3
    norms = padded.view(groups, bpg, block, K).square().sum(2)  # (groups, blocks, K)
    keep = int(round((1.0 - sparsity) * norms.numel()))
    kept = torch.zeros(norms.numel(), dtype=torch.bool, device=w.device)
    if keep > 0:
        kept[norms.flatten().topk(keep, sorted=False).indices] = True
    mask = kept.view(groups, bpg, 1, K).expand(groups, bpg, block, K).reshape(groups, bpg * block, K)[:, :og]
    return mask.reshape(w.shape)


def block_structure(O: int, K: int, groups: int, block: int, rows: Tensor, cols: Tensor):
    """The blocked form's (b_rowptr, b_colidx, b_perm) from the CSR's non-zeros in storage order
    (see the module docstring)."""
    og = O // groups
    bpg = -(-og // block)
    blocks, panels = groups * bpg, panel_count(K)
    blk = (rows // og) * bpg + (rows % og) // block
    key = ((cols // PANEL_COLS) * blocks + blk) * K + cols  # (panel, block, column)
    stored, slot = torch.unique(key, return_inverse=True)  # sorted: panel-major, as the CSR
    dev = rows.device  # explicit: a torch.device("meta") context must not move the factories
    b_rowptr = torch.zeros(panels * blocks + 1, dtype=torch.int64, device=dev)
    torch.cumsum(torch.bincount(stored // K, minlength=panels * blocks), 0, out=b_rowptr[1:])
    b_perm = torch.full((stored.numel() * block,), rows.numel(), dtype=torch.int64, device=dev)
    b_perm[slot * block + (rows % og) % block] = torch.arange(rows.numel(), device=dev)
    return b_rowptr, (stored % K).to(torch.int32), b_perm


def _check_groups(groups) -> int:
    from hotops._backend import check_number

    return check_number(groups, "groups", integer=True, low=1)


def check_sparsity(sparsity: float) -> float:
    """sparsity as a float in [0, 1) (Python or NumPy numbers, 0-d tensors)."""
    from hotops._backend import check_number

    return check_number(sparsity, "sparsity", low=0.0, high=1.0, high_open=True)


@dataclasses.dataclass(frozen=True)
class SparseWeight:
    """A weight of shape ``shape`` ((O, I) for linear, (O, C/groups, kh, kw) for conv) stored as
    CSR over its O rows. ``values`` may be a leaf that requires grad (training under the mask)."""

    shape: Tuple[int, ...]
    groups: int
    rowptr: Tensor  # (panels * O + 1,) int64: column-panelled CSR (see the module docstring)
    colidx: Tensor  # (nnz,) int32, column within the group's im2col rows
    values: Tensor  # (nnz,) float32, in (panel, row, column) order
    t_rowptr: Tensor  # (groups * K + 1,) int64: CSR of W^T per group
    t_colidx: Tensor  # (nnz,) int32: output channel within the group
    t_perm: Tensor  # (nnz,) int64: values[t_perm] are W^T's values
    block: int = 0  # rows per block of the blocked form, 0 without one (see the module docstring)
    b_rowptr: Optional[Tensor] = None  # (panels * blocks + 1,) int64
    b_colidx: Optional[Tensor] = None  # (stored,) int32
    b_perm: Optional[Tensor] = None  # (stored * block,) int64 into values, nnz: a padding zero
    _block_cache: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @property
    def out_features(self) -> int:
        """Rows of the weight: output features (channels of a convolution)."""
        return self.shape[0]

    @property
    def cols(self) -> int:
        """Columns of one row, K: in_features, or in_channels / groups * kh * kw."""
        k = 1
        for s in self.shape[1:]:
            k *= s
        return k

    @property
    def nnz(self) -> int:
        """How many weights are kept (stored non-zeros)."""
        return self.colidx.numel()

    @property
    def density(self) -> float:
        """The fraction of weights kept, nnz / (rows * cols): 1 - sparsity."""
        return self.nnz / max(1, self.shape[0] * self.cols)

    @property
    def layout(self) -> str:
        """What the forward runs on: "csr" or "blocked bx1"."""
        return f"blocked {self.block}x1" if self.block else "csr"

    @property
    def blocked(self) -> tuple:
        """The forward's blocked form for the ops: (block, b_rowptr, b_colidx, block values), or
        (0, None, None, None)."""
        if not self.block:
            return 0, None, None, None
        return self.block, self.b_rowptr, self.b_colidx, self.block_values()

    def block_values(self) -> Tensor:
        """``values`` in the blocked order, zero-padded, float32 (the kernels' dtype): a copy
        kept with this SparseWeight and rebuilt when values or b_perm change (state_key: in
        place, ``.data`` swaps, and ``.data`` aliases of a TrackedParameter). A rebuild makes a
        new tensor and then publishes it, so a thread still reading the old one is unaffected
        (a fresh tensor while torch.compile traces)."""
        if torch.compiler.is_compiling():
            v = self.values.detach().float()
            return torch.cat([v, v.new_zeros(1)])[self.b_perm]
        cache = self._block_cache
        key = (_quick_key(self.values), _quick_key(self.b_perm))
        entry = cache.get("entry")
        if entry is not None and entry[0] == key:
            return entry[1]
        with _BUILD_LOCK:
            entry = cache.get("entry")
            if entry is not None and entry[0] == key:
                return entry[1]
            v = self.values
            # plain tensors, even when first made in inference mode; the key was taken before
            # the copy, so a change made while copying shows as a new key on the next call
            with torch.inference_mode(False), torch.no_grad():
                padded = torch.zeros(self.nnz + 1, dtype=torch.float32, device=v.device)
                padded[:-1].copy_(v.detach())
                out = torch.index_select(padded, 0, self.b_perm)
            cache["entry"] = (key, out)
            return out

    @staticmethod
    def from_dense(
        w: Tensor,
        sparsity: Optional[float] = None,
        mask: Optional[Tensor] = None,
        groups: int = 1,
        block: Optional[int] = None,
        layout: str = "auto",
    ) -> "SparseWeight":
        """Packs ``w * mask``. Give either ``mask`` (bool, w's shape) or ``sparsity`` (magnitude
        pruning to that fraction of zeros); with neither, w's own non-zeros are kept.

        ``block`` (4 or 8) with ``sparsity`` prunes whole blocks of ``block`` consecutive output
        channels x one column by their L2 norm instead (structured: faster, at some accuracy).
        ``layout`` picks the forward's format: "auto" adds the blocked form (of ``block`` rows,
        4 by default) where its fill is at least BLOCK_FILL_MIN, "blocked" always, "csr" never."""
        if not isinstance(w, Tensor):
            raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
        if w.dim() not in (2, 4):
            raise ValueError(
                f"w must be a linear (O, I) or conv (O, C/groups, kh, kw) weight, got shape {tuple(w.shape)}"
            )
        if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(
                f"w has dtype {str(w.dtype).replace('torch.', '')}; expected float32, bfloat16 or "
                "float16 (the values are kept in float32)"
            )
        w = w.float()
        if w.numel() == 0:
            raise ValueError(f"w is empty (shape {tuple(w.shape)})")
        if w.is_meta or (isinstance(mask, Tensor) and mask.is_meta):
            raise ValueError(
                "SparseWeight.from_dense cannot pack a weight on the meta device (torch.device('meta'), "
                "accelerate's init_empty_weights): which weights are kept depends on their values. "
                "Build the sparse layer from a real weight (then .to('meta') it), or from a packed "
                "SparseWeight moved there (sw.to('meta')); a checkpoint loads into a layer on meta "
                "with load_state_dict(assign=True)"
            )
        groups = _check_groups(groups)
        if w.shape[0] % groups:
            raise ValueError(
                f"groups must be a positive divisor of the {w.shape[0]} output channels, got {groups!r}"
            )
        if mask is not None and sparsity is not None:
            raise ValueError("give either mask or sparsity, not both")
        if block is not None and block not in BLOCK_SIZES:
            raise ValueError(
                f"block must be None or one of {BLOCK_SIZES} (output channels per block), got {block!r}"
            )
        if layout not in ("auto", "blocked", "csr"):
            raise ValueError(f"layout must be 'auto', 'blocked' or 'csr', got {layout!r}")
        if mask is None and sparsity is not None:
            mask = magnitude_mask(w, sparsity) if block is None else block_mask(w, sparsity, block, groups)
        elif mask is None:
            mask = w.detach() != 0
        if not isinstance(mask, Tensor) or mask.shape != w.shape:
            raise ValueError(
                f"mask must be a tensor of w's shape {tuple(w.shape)}, got "
                f"{tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}"
            )
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be bool, got {str(mask.dtype).replace('torch.', '')}")
        w2, m2 = w.detach().reshape(w.shape[0], -1), mask.reshape(w.shape[0], -1)
        rows, cols = m2.nonzero(as_tuple=True)  # row-major
        sw = SparseWeight.pack(tuple(w.shape), groups, rows, cols, w2[rows, cols].contiguous())
        return sw if layout == "csr" else sw.with_block(block or BLOCK_SIZES[0], layout == "auto")

    def with_block(self, block: int, only_if_faster: bool = False) -> "SparseWeight":
        """This weight with the blocked form of ``block`` rows added (replaced); with
        ``only_if_faster``, only where its fill reaches BLOCK_FILL_MIN (else it is returned as is)."""
        if block not in BLOCK_SIZES:
            raise ValueError(f"block must be one of {BLOCK_SIZES}, got {block!r}")
        b_rowptr, b_colidx, b_perm = block_structure(
            self.shape[0], self.cols, self.groups, block, self.row_indices(), self.colidx.long()
        )
        fill = self.nnz / max(1, b_perm.numel())
        if only_if_faster and (fill < BLOCK_FILL_MIN or self.nnz == 0):
            return self if not self.block else self.without_block()
        return SparseWeight(
            self.shape,
            self.groups,
            self.rowptr,
            self.colidx,
            self.values,
            self.t_rowptr,
            self.t_colidx,
            self.t_perm,
            block,
            b_rowptr,
            b_colidx,
            b_perm,
        )

    def without_block(self) -> "SparseWeight":
        """The same weight in CSR only (the blocked form dropped)."""
        return SparseWeight(
            self.shape,
            self.groups,
            self.rowptr,
            self.colidx,
            self.values,
            self.t_rowptr,
            self.t_colidx,
            self.t_perm,
        )

    @property
    def block_fill(self) -> float:
        """Non-zeros over the blocked form's stored values (1: full blocks); 0 without one."""
        return self.nnz / max(1, self.b_perm.numel()) if self.block else 0.0

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
        rowptr = torch.zeros(panels * O + 1, dtype=torch.int64, device=rows.device)  # (as in block_structure)
        torch.cumsum(counts, 0, out=rowptr[1:])
        og = O // groups
        t_rows = (rows // og) * K + cols  # W^T row: (group, column)
        t_cols = rows % og  # W^T column: output channel in the group
        t_perm = torch.argsort(t_rows * og + t_cols, stable=True)
        t_rowptr = torch.zeros(groups * K + 1, dtype=torch.int64, device=rows.device)
        torch.cumsum(torch.bincount(t_rows, minlength=groups * K), 0, out=t_rowptr[1:])
        return SparseWeight(
            tuple(int(s) for s in shape),
            int(groups),
            rowptr,
            cols.to(torch.int32),
            values,
            t_rowptr,
            t_cols[t_perm].to(torch.int32).contiguous(),
            t_perm,
        )

    def with_values(self, values: Tensor) -> "SparseWeight":
        """The same structure with other values (e.g. a trained Parameter)."""
        if values.shape != (self.nnz,):
            raise ValueError(f"values must have shape ({self.nnz},), got {tuple(values.shape)}")
        # spelled out rather than dataclasses.replace, which torch.compile < 2.5 cannot trace
        return SparseWeight(
            self.shape,
            self.groups,
            self.rowptr,
            self.colidx,
            values,
            self.t_rowptr,
            self.t_colidx,
            self.t_perm,
            self.block,
            self.b_rowptr,
            self.b_colidx,
            self.b_perm,
        )

    def to(self, device) -> "SparseWeight":
        """The same weight with every tensor on ``device`` (a new block-values cache)."""
        return SparseWeight(
            self.shape,
            self.groups,
            *(
                t.to(device)
                for t in (self.rowptr, self.colidx, self.values, self.t_rowptr, self.t_colidx, self.t_perm)
            ),
            self.block,
            *(t.to(device) if t is not None else None for t in (self.b_rowptr, self.b_colidx, self.b_perm)),
        )

    def mask(self) -> Tensor:
        """The bool mask of kept weights, in the dense weight's shape."""
        m = torch.zeros(self.shape[0], self.cols, dtype=torch.bool, device=self.values.device)
        m[self.row_indices(), self.colidx.long()] = True
        return m.view(self.shape)

    def row_indices(self) -> Tensor:
        """(nnz,) int64: the row of each stored non-zero (colidx gives its column)."""
        return csr_rows(self.rowptr, self.shape[0], self.nnz)

    def to_dense(self) -> Tensor:
        """The masked dense weight (differentiable w.r.t. ``values``)."""
        flat = torch.zeros(self.shape[0] * self.cols, dtype=self.values.dtype, device=self.values.device)
        idx = self.row_indices() * self.cols + self.colidx.long()
        return flat.index_put((idx,), self.values).view(self.shape)


def checked_structure(shape, groups: int, values, rowptr, colidx, t_rowptr, t_colidx, t_perm) -> SparseWeight:
    """A checkpoint's packed weight for a layer of ``shape`` and ``groups``, checked whole: the
    CSR's sizes, order and column range, and the transposed CSR against the one the CSR implies
    (rebuilt here: a corrupted or foreign checkpoint is refused, never run)."""
    O, K = shape[0], 1
    for d in shape[1:]:
        K *= d
    for name, t, dtype in (
        ("rowptr", rowptr, torch.int64),
        ("colidx", colidx, torch.int32),
        ("t_rowptr", t_rowptr, torch.int64),
        ("t_colidx", t_colidx, torch.int32),
        ("t_perm", t_perm, torch.int64),
    ):
        if not isinstance(t, Tensor) or t.dim() != 1 or t.dtype != dtype:
            raise ValueError(
                f"{name} must be a 1-d {str(dtype).replace('torch.', '')} tensor, got "
                f"{str(t.dtype).replace('torch.', '') + ' ' + str(tuple(t.shape)) if isinstance(t, Tensor) else t!r}"
            )
    if not isinstance(values, Tensor) or values.dim() != 1 or not values.is_floating_point():
        raise ValueError("values must be a 1-d floating-point tensor")
    panels, nnz = panel_count(K), colidx.numel()
    if rowptr.numel() != panels * O + 1:
        raise ValueError(
            f"rowptr has {rowptr.numel()} entries; a weight of shape {tuple(shape)} needs "
            f"{panels * O + 1} (the checkpoint is of a layer of another shape)"
        )
    if values.numel() != nnz:
        raise ValueError(f"values has {values.numel()} entries for {nnz} column indices")
    tensors = (values, rowptr, colidx, t_rowptr, t_colidx, t_perm)
    if any(t.is_meta for t in tensors):  # a checkpoint of a layer on meta: only its sizes exist
        if not all(t.is_meta for t in tensors):
            raise ValueError("the packed weight mixes meta tensors with real ones")
        if t_rowptr.numel() != groups * K + 1 or t_colidx.numel() != nnz or t_perm.numel() != nnz:
            raise ValueError(
                f"t_rowptr / t_colidx / t_perm have {t_rowptr.numel()} / {t_colidx.numel()} / "
                f"{t_perm.numel()} entries; expected {groups * K + 1} / {nnz} / {nnz}"
            )
        return SparseWeight(
            tuple(int(s) for s in shape),
            int(groups),
            rowptr,
            colidx,
            values.float(),
            t_rowptr,
            t_colidx,
            t_perm,
        )
    rp, cols = rowptr.cpu(), colidx.cpu().long()
    if rp[0] != 0 or rp[-1] != nnz or bool((rp.diff() < 0).any()):
        raise ValueError(f"rowptr must run from 0 to nnz = {nnz} without decreasing")
    seg = torch.repeat_interleave(torch.arange(panels * O, device=rp.device), rp.diff())
    if nnz and (
        int(cols.min()) < 0
        or int(cols.max()) >= K
        or bool(((cols // PANEL_COLS) != seg // O).any())
        or bool(((seg[1:] == seg[:-1]) & (cols[1:] <= cols[:-1])).any())
    ):
        raise ValueError(f"colidx must hold increasing columns in [0, {K}) within each row and column panel")
    rows = seg % O
    order = torch.argsort(rows * K + cols)
    sw = SparseWeight.pack(
        tuple(shape), groups, rows[order], cols[order], values.detach().cpu()[order].float()
    )
    for name, t in (("t_rowptr", t_rowptr), ("t_colidx", t_colidx), ("t_perm", t_perm)):
        if not torch.equal(t.cpu(), getattr(sw, name)):
            raise ValueError(f"{name} does not match the transposed structure of rowptr / colidx")
    return sw.to(values.device)
