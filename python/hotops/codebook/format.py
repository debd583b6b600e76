"""CodebookWeight: the JLCM storage format of one linear layer's weight.

* output rows re-ordered into groups of similarly distributed rows: ``perm`` (stored row r is
  output feature perm[r]; None when the order is the identity) and ``group_ptr`` boundaries;
* per row group, ``num_codebooks`` (1 to 4) additive codebooks of ``codebook_size`` (<= 256)
  codewords over ``in_group`` (1, 2, 4 or 8) consecutive inputs;
* uint8 codes, logically (N, K / in_group, num_codebooks), stored interleaved by blocks of
  ROW_BLOCK rows (see ``pack_codes``) so one input group of a block is ROW_BLOCK contiguous bytes:
  the indices of one SIMD gather in the CPU kernel; per-row ``scales``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
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


IN_GROUPS = (1, 2, 4, 8)
MAX_CODEBOOKS = 4


class CodebookWeight:
    """A validated codebook-quantized (out_features, in_features) weight.

    Args:
        codes: (N, K // in_group, num_codebooks) uint8.
        codebooks: (num_groups, num_codebooks, codebook_size, in_group) float.
        scales: (N,) float, by stored row.
        group_ptr: (num_groups + 1,) int64 row-group boundaries in stored order; default one group.
        perm: (N,) int64 output feature of each stored row, or None (identity).
    """

    def __init__(
        self,
        codes: Tensor,
        codebooks: Tensor,
        scales: Tensor,
        group_ptr: Optional[Tensor] = None,
        perm: Optional[Tensor] = None,
    ):
        if not isinstance(codes, Tensor) or codes.dtype != torch.uint8 or codes.dim() != 3:
            raise TypeError(
                "codes must be a (N, K // in_group, num_codebooks) uint8 tensor, got "
                + (
                    f"{codes.dtype} {tuple(codes.shape)}"
                    if isinstance(codes, Tensor)
                    else type(codes).__name__
                )
            )
        self._validate(codes.shape, codes, codebooks, scales, group_ptr, perm)
        self._store(pack_codes(codes), codebooks, scales, group_ptr, perm)

    @classmethod
    def from_packed(
        cls,
        packed: Tensor,
        codebooks: Tensor,
        scales: Tensor,
        group_ptr: Optional[Tensor] = None,
        perm: Optional[Tensor] = None,
    ) -> "CodebookWeight":
        """From codes already in the stored (pack_codes) layout, e.g. a CodebookLinear's buffer."""
        if (
            not isinstance(packed, Tensor)
            or packed.dtype != torch.uint8
            or packed.dim() != 3
            or packed.shape[2] != ROW_BLOCK
        ):
            got = (
                f"{packed.dtype} {tuple(packed.shape)}"
                if isinstance(packed, Tensor)
                else type(packed).__name__
            )
            raise TypeError(f"packed codes must be a (blocks, slots, {ROW_BLOCK}) uint8 tensor, got {got}")
        _check_codebooks(codebooks)
        if not isinstance(scales, Tensor) or not scales.is_floating_point() or scales.dim() != 1:
            raise ValueError(
                "scales must be a floating (N,) tensor, one per output row, got " + _describe(scales)
            )
        N, M = scales.shape[0], codebooks.shape[1]
        if packed.shape[0] != -(-N // ROW_BLOCK) or packed.shape[1] % M:
            raise ValueError(
                f"packed codes {tuple(packed.shape)} do not fit {N} rows (scales has {N} "
                f"entries) of {M} codebook(s): expected ({-(-N // ROW_BLOCK)}, J * {M}, {ROW_BLOCK})"
            )
        self = cls.__new__(cls)
        self._validate((N, packed.shape[1] // M, M), packed, codebooks, scales, group_ptr, perm)
        self._store(packed, codebooks, scales, group_ptr, perm)
        return self

    def _store(self, packed, codebooks, scales, group_ptr, perm):
        packed = packed.contiguous()  # the kernels read the packed layout densely
        if group_ptr is None:
            group_ptr = torch.tensor(
                [0, packed.shape[0] and scales.shape[0]], dtype=torch.int64, device=packed.device
            )
        self.codes, self.codebooks, self.scales = packed, codebooks, scales
        self.group_ptr, self.perm = group_ptr, perm

    @staticmethod
    def _validate(shape, codes, codebooks, scales, group_ptr, perm):
        _check_codebooks(codebooks)
        N, J, M = shape
        O, Mc, C, g = codebooks.shape
        if g not in IN_GROUPS:
            raise ValueError(f"in_group must be one of {IN_GROUPS}, got {g}")
        if not 1 <= M <= MAX_CODEBOOKS or Mc != M:
            raise ValueError(
                f"codes address {M} codebooks and codebooks hold {Mc}; expected the same number, "
                f"1 to {MAX_CODEBOOKS}"
            )
        if not 1 <= C <= 256:
            raise ValueError(f"uint8 codes address at most 256 codewords, got codebook_size {C}")
        if N == 0:
            raise ValueError("a CodebookWeight needs at least one output row (codes have 0 rows)")
        if J == 0:
            raise ValueError("a CodebookWeight needs at least one input group (codes have 0 input groups)")
        if not isinstance(scales, Tensor) or not scales.is_floating_point() or tuple(scales.shape) != (N,):
            raise ValueError(f"scales must be a floating ({N},) tensor, one per row, got {_describe(scales)}")
        check_group_ptr(group_ptr, O, N, codes.device)
        if codes.numel() and int(codes.max()) >= C:
            raise ValueError(f"codes must be smaller than codebook_size {C}; found {int(codes.max())}")
        check_perm(perm, N)
        devices = {t.device for t in (codes, codebooks, scales, group_ptr, perm) if t is not None}
        if len(devices) > 1:
            raise ValueError(f"all parts of the weight must live on one device, got {devices}")

    # ------------------------------------------------------------- shape
    @property
    def out_features(self) -> int:
        return self.scales.shape[0]

    @property
    def in_group(self) -> int:
        return self.codebooks.shape[3]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1] // self.num_codebooks * self.in_group

    def code_indices(self) -> Tensor:
        """The codes in logical (N, K // in_group, num_codebooks) order."""
        return unpack_codes(self.codes, self.out_features, self.num_codebooks)

    @property
    def num_codebooks(self) -> int:
        return self.codebooks.shape[1]

    @property
    def codebook_size(self) -> int:
        return self.codebooks.shape[2]

    @property
    def num_groups(self) -> int:
        return self.codebooks.shape[0]

    # ------------------------------------------------------------- size
    @property
    def nbytes(self) -> int:
        """Bytes of everything stored: codes, codebooks, scales, group boundaries, permutation."""
        parts = (self.codes, self.codebooks, self.scales, self.group_ptr, self.perm)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    @property
    def bits_per_weight(self) -> float:
        """Exact storage bits per weight (as stored, not the nominal code bits)."""
        return 8.0 * self.nbytes / max(1, self.out_features * self.in_features)

    def dequantize(self) -> Tensor:
        """The dense (out_features, in_features) float32 weight."""
        from hotops.codebook import op

        return op.codebook_dequantize(self.codes, self.codebooks, self.scales, self.group_ptr, self.perm)

    def __repr__(self) -> str:
        return (
            f"CodebookWeight({self.out_features}x{self.in_features}, in_group={self.in_group}, "
            f"num_codebooks={self.num_codebooks}, codebook_size={self.codebook_size}, "
            f"groups={self.num_groups}, {self.bits_per_weight:.3f} bits/weight)"
        )


def _describe(t) -> str:
    return (
        f"{str(t.dtype).replace('torch.', '')} {tuple(t.shape)}"
        if isinstance(t, Tensor)
        else type(t).__name__
    )


def _check_codebooks(codebooks) -> None:
    if not isinstance(codebooks, Tensor) or not codebooks.is_floating_point() or codebooks.dim() != 4:
        raise TypeError(
            "codebooks must be a floating (num_groups, num_codebooks, codebook_size, in_group) "
            f"tensor, got {_describe(codebooks)}"
        )


def check_group_ptr(group_ptr: Optional[Tensor], num_groups: int, N: int, device) -> Tensor:
    """group_ptr: num_groups + 1 int64 boundaries rising from 0 to N (one group when None, created
    on `device`); returns it."""
    if group_ptr is None:
        return torch.tensor([0, N], dtype=torch.int64, device=device)
    if (
        not isinstance(group_ptr, Tensor)
        or group_ptr.dtype != torch.int64
        or tuple(group_ptr.shape) != (num_groups + 1,)
    ):
        raise ValueError(
            f"group_ptr must be a ({num_groups + 1},) int64 tensor (num_groups + 1 boundaries), "
            f"got {_describe(group_ptr)}"
        )
    gp = group_ptr.tolist()
    if gp[0] != 0 or gp[-1] != N or any(a > b for a, b in zip(gp, gp[1:])):
        raise ValueError(f"group_ptr must rise from 0 to {N}, got {gp}")
    return group_ptr


def check_perm(perm, N: int) -> None:
    """perm is None or a (N,) int64 permutation of range(N); anything else is a ValueError
    that says what is wrong (out of range, or which output appears twice)."""
    if perm is None:
        return
    if not isinstance(perm, Tensor) or perm.dtype != torch.int64 or tuple(perm.shape) != (N,):
        raise ValueError(f"perm must be a ({N},) int64 tensor, got {_describe(perm)}")
    if N == 0:
        return
    lo, hi = int(perm.min()), int(perm.max())
    if lo < 0 or hi >= N:
        raise ValueError(f"perm must be a permutation of range({N}); it holds {lo if lo < 0 else hi}")
    counts = torch.bincount(perm, minlength=N)
    if not bool((counts == 1).all()):
        twice = int(counts.argmax())
        raise ValueError(
            f"perm must be a permutation of range({N}); output feature {twice} appears "
            f"{int(counts[twice])} times"
        )


def code_bits(bits_per_weight: float, in_group: int, num_codebooks: int) -> int:
    """Bits per code for a nominal code budget; refuses combinations uint8 codes cannot hold."""
    if in_group not in IN_GROUPS:
        raise ValueError(f"in_group must be one of {IN_GROUPS}, got {in_group}")
    if not 1 <= num_codebooks <= MAX_CODEBOOKS:
        raise ValueError(f"num_codebooks must be 1 to {MAX_CODEBOOKS}, got {num_codebooks}")
    bits = bits_per_weight * in_group / num_codebooks
    if not (bits > 0 and math.isclose(bits, round(bits))):
        raise ValueError(
            f"{bits_per_weight} bits/weight over in_group={in_group} with {num_codebooks} "
            f"codebook(s) gives {bits:g} bits per code; it must be a whole number of at least 1"
        )
    if round(bits) > 8:
        raise ValueError(
            f"{bits_per_weight} bits/weight over in_group={in_group} with {num_codebooks} "
            f"codebook(s) needs {round(bits)}-bit codes; uint8 codes hold at most 8 "
            f"(use a smaller in_group or more codebooks)"
        )
    return int(round(bits))
