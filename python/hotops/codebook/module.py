"""CodebookLinear: an nn.Linear whose weight is stored in the codebook format."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from hotops.codebook import op
from hotops.codebook.format import CodebookWeight
from hotops.codebook.kmeans import quantize_weight


class CodebookLinear(nn.Module):
    """y = x W^T + b with W a CodebookWeight. Codes, group boundaries and the permutation are
    buffers; codebooks and per-row scales are parameters (trainable through the op's backward).
    """

    def __init__(self, weight: CodebookWeight, bias: Optional[Tensor] = None):
        super().__init__()
        self.in_features, self.out_features = weight.in_features, weight.out_features
        self.register_buffer("codes", weight.codes)
        self.register_buffer("group_ptr", weight.group_ptr)
        self.register_buffer("perm", weight.perm)
        self.codebooks = nn.Parameter(weight.codebooks)
        self.scales = nn.Parameter(weight.scales)
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits_per_weight: float = 2, in_group: int = 8,
                    num_codebooks: int = 2, num_groups: int = 1, iters: int = 25, seed: int = 0,
                    dtype: torch.dtype = torch.float32) -> "CodebookLinear":
        """Fast initialisation by k-means (see kmeans.quantize_weight); codebooks and scales are
        stored in `dtype`. The default is AQLM's "2x8": two codebooks of 256 over 8 inputs."""
        w = quantize_weight(linear.weight, bits_per_weight, in_group, num_codebooks, num_groups,
                            iters, seed)
        w = CodebookWeight.from_packed(w.codes, w.codebooks.to(dtype), w.scales.to(dtype), w.group_ptr, w.perm)
        return cls(w, linear.bias)

    @property
    def weight(self) -> CodebookWeight:
        return CodebookWeight.from_packed(self.codes, self.codebooks.detach(), self.scales.detach(),
                                          self.group_ptr, self.perm)

    @property
    def bits_per_weight(self) -> float:
        """Exact storage bits per weight: codes, codebooks, scales, boundaries, permutation."""
        return self.weight.bits_per_weight

    def dequantize(self) -> Tensor:
        """The dense (out_features, in_features) float32 weight it represents."""
        return op.codebook_dequantize(self.codes, self.codebooks, self.scales, self.group_ptr, self.perm)

    def forward(self, x: Tensor) -> Tensor:
        return op.matmul(x, self.codes, self.codebooks, self.scales, self.group_ptr, self.perm,
                                  self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"in_group={self.codebooks.shape[3]}, num_codebooks={self.codebooks.shape[1]}, "
                f"codebook_size={self.codebooks.shape[2]}, groups={self.codebooks.shape[0]}, "
                f"bias={self.bias is not None}")
