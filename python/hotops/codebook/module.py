"""CodebookLinear (uint8 codes, lookup tables) and WideCodebookLinear (16-bit codes): nn.Linear
layers whose weight is stored in a codebook format."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from hotops import _backend
from hotops.codebook import op, wide
from hotops.codebook.format import CodebookWeight
from hotops.codebook.functional import check_input
from hotops.codebook.kmeans import quantize_weight


class CodebookLinear(nn.Module):
    """y = x W^T + b with W a CodebookWeight. Codes, group boundaries and the permutation are
    buffers; codebooks and per-row scales are parameters (trainable through the op's backward).
    """

    def __init__(self, weight: CodebookWeight, bias: Optional[Tensor] = None):
        super().__init__()
        if not isinstance(weight, CodebookWeight):
            raise TypeError(f"weight must be a CodebookWeight, got {type(weight).__name__}")
        if bias is not None:
            if (
                not isinstance(bias, Tensor)
                or not bias.is_floating_point()
                or tuple(bias.shape) != (weight.out_features,)
            ):
                raise ValueError(
                    f"bias must be a floating ({weight.out_features},) tensor or None, got "
                    + (
                        f"{bias.dtype} {tuple(bias.shape)}"
                        if isinstance(bias, Tensor)
                        else type(bias).__name__
                    )
                )
            if bias.device != weight.codes.device:
                raise ValueError(f"bias is on {bias.device}, the weight on {weight.codes.device}")
        self.in_features, self.out_features = weight.in_features, weight.out_features
        self.register_buffer("codes", weight.codes)
        self.register_buffer("group_ptr", weight.group_ptr)
        self.register_buffer("perm", weight.perm)
        self.codebooks = nn.Parameter(weight.codebooks)
        self.scales = nn.Parameter(weight.scales)
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        bits_per_weight: float = 2,
        in_group: int = 8,
        num_codebooks: int = 2,
        num_groups: int = 1,
        iters: int = 25,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> "CodebookLinear":
        """Fast initialisation by k-means (see kmeans.quantize_weight); codebooks and scales are
        stored in `dtype`. The default is AQLM's "2x8": two codebooks of 256 over 8 inputs."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear takes an nn.Linear, got {type(linear).__name__}")
        bits_per_weight = _backend.check_number(bits_per_weight, "bits_per_weight", low=0.0, low_open=True)
        in_group = _backend.check_number(in_group, "in_group", integer=True, low=1)
        num_codebooks = _backend.check_number(num_codebooks, "num_codebooks", integer=True, low=1)
        num_groups = _backend.check_number(
            num_groups, "num_groups", integer=True, low=1, high=linear.out_features
        )
        iters = _backend.check_number(iters, "iters", integer=True, low=0)
        seed = _backend.check_number(seed, "seed", integer=True)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        if linear.in_features % in_group:
            raise ValueError(
                f"in_features ({linear.in_features}) must be a multiple of in_group ({in_group})"
            )
        w = quantize_weight(linear.weight, bits_per_weight, in_group, num_codebooks, num_groups, iters, seed)
        w = CodebookWeight.from_packed(
            w.codes, w.codebooks.to(dtype), w.scales.to(dtype), w.group_ptr, w.perm
        )
        return cls(w, linear.bias)

    @property
    def weight(self) -> CodebookWeight:
        return CodebookWeight.from_packed(
            self.codes, self.codebooks.detach(), self.scales.detach(), self.group_ptr, self.perm
        )

    @property
    def bits_per_weight(self) -> float:
        """Exact storage bits per weight: codes, codebooks, scales, boundaries, permutation."""
        return self.weight.bits_per_weight

    def dequantize(self) -> Tensor:
        """The dense (out_features, in_features) float32 weight it represents."""
        return op.codebook_dequantize(self.codes, self.codebooks, self.scales, self.group_ptr, self.perm)

    def forward(self, x: Tensor) -> Tensor:
        x = _backend.autocast_input(x)  # as nn.Linear takes x inside torch.autocast
        check_input(x, self.in_features)
        return op.matmul(x, self.codes, self.codebooks, self.scales, self.group_ptr, self.perm, self.bias)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        """Refuses a checkpoint whose codes, permutation or group boundaries do not form a valid
        weight (load_state_dict copies buffers in place, casting dtypes: int64 code -1 would land
        as 255, and a perm with a repeat would leave outputs unwritten)."""
        parts = {}
        for key in ("codes", "codebooks", "scales", "group_ptr", "perm"):
            if prefix + key in state_dict:
                value, own = state_dict[prefix + key], getattr(self, key)
                # validated where it will live (a CUDA checkpoint may load into a CPU layer)
                parts[key] = value.to(own.device) if isinstance(value, Tensor) and own is not None else value
        if parts:
            merged = {
                key: getattr(self, key) for key in ("codes", "codebooks", "scales", "group_ptr", "perm")
            }
            merged.update(parts)
            if merged["perm"] is not None and not isinstance(merged["perm"], Tensor):
                error_msgs.append(
                    f"{prefix}perm: expected a tensor or None, got {type(merged['perm']).__name__}"
                )
                return
            if not isinstance(merged["codes"], Tensor) or merged["codes"].dtype != torch.uint8:
                got = (
                    merged["codes"].dtype
                    if isinstance(merged["codes"], Tensor)
                    else type(merged["codes"]).__name__
                )
                error_msgs.append(f"{prefix}codes: expected packed uint8 codes, got {got}")
                return
            try:
                CodebookWeight.from_packed(
                    merged["codes"],
                    merged["codebooks"],
                    merged["scales"],
                    merged["group_ptr"],
                    merged["perm"],
                )
            except (TypeError, ValueError) as exc:
                error_msgs.append(
                    f"{prefix[:-1] or 'CodebookLinear'}: the checkpoint does not form a "
                    f"valid codebook weight: {exc}"
                )
                return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"in_group={self.codebooks.shape[3]}, num_codebooks={self.codebooks.shape[1]}, "
            f"codebook_size={self.codebooks.shape[2]}, groups={self.codebooks.shape[0]}, "
            f"bias={self.bias is not None}"
        )


class WideCodebookLinear(nn.Module):
    """y = x W^T + b with W in 16-bit codes (see hotops.codebook.wide). Codes, group boundaries
    and the permutation are buffers; codebooks and per-row scales are parameters."""

    def __init__(
        self,
        codes: Tensor,
        codebooks: Tensor,
        scales: Tensor,
        group_ptr: Optional[Tensor] = None,
        perm: Optional[Tensor] = None,
        bias: Optional[Tensor] = None,
    ):
        super().__init__()
        group_ptr = wide.validate(codes, codebooks, scales, group_ptr, perm, bias)
        self.in_features, self.out_features = codes.shape[1] * wide.IN_GROUP, codes.shape[0]
        self.register_buffer("codes", codes.contiguous())
        self.register_buffer("group_ptr", group_ptr)
        self.register_buffer("perm", perm)
        self.codebooks = nn.Parameter(codebooks.detach().contiguous())
        self.scales = nn.Parameter(scales.detach().contiguous())
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    @property
    def bits_per_weight(self) -> float:
        """Exact storage bits per weight: codes, codebooks, scales, boundaries, permutation."""
        parts = (self.codes, self.codebooks, self.scales, self.group_ptr, self.perm)
        return (
            8.0
            * sum(t.numel() * t.element_size() for t in parts if t is not None)
            / max(1, self.in_features * self.out_features)
        )

    def dequantize(self) -> Tensor:
        """The dense (out_features, in_features) float32 weight it represents."""
        return op.codebook_wide_dequantize(self.codes, self.codebooks, self.scales, self.group_ptr, self.perm)

    def forward(self, x: Tensor) -> Tensor:
        x = _backend.autocast_input(x)  # as nn.Linear takes x inside torch.autocast
        check_input(x, self.in_features)
        return op.matmul(x, self.codes, self.codebooks, self.scales, self.group_ptr, self.perm, self.bias)

    def extra_repr(self) -> str:
        O, M, C, g = self.codebooks.shape
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, in_group={g}, "
            f"num_codebooks={M}, codebook_size={C}, groups={O}, codebook_dtype="
            f"{str(self.codebooks.dtype).replace('torch.', '')}, bias={self.bias is not None}"
        )
