"""What one sparse call computes besides its weight: the convolution geometry and the fused
activation. The geometry is the one struct the C++ kernels take (csrc/sparse/cpu.h, ConvGeom: the
bindings read these fields by name); the output size is derived here and nowhere else, and the
C++ only checks that the windows it reads lie inside the padded input. The activation travels by
name: the C++ maps it to its kernel code (csrc/sparse/check.cpp, act_from_name), the Triton
kernel takes it as a compile-time name."""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

# the activations the kernels fuse after the bias
ACTIVATIONS = (None, "relu", "relu6")


def activate(y: Tensor, activation: Optional[str]) -> Tensor:
    """The fused activation in torch, for the dense paths."""
    if activation == "relu6":
        return torch.nn.functional.relu6(y)
    return torch.nn.functional.relu(y) if activation == "relu" else y


def activation_grad(gy: Tensor, y: Tensor, activation: Optional[str]) -> Tensor:
    """gy through the fused activation, from its output y: it passes the gradient where it passed
    its input (0 < y, and y < 6 for relu6)."""
    if activation is None:
        return gy
    return gy * ((y > 0) & (y < 6) if activation == "relu6" else (y > 0))


def out_size(size: int, k: int, stride: int, padding: int, dilation: int) -> int:
    """Output length of a convolution along one dimension (the input must cover the dilated
    kernel once padded: the public functions check that)."""
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


@dataclasses.dataclass
class ConvGeometry:
    """An (N, C, H, W) input convolved by an (O, C/G, kh, kw) weight with strides (sh, sw),
    paddings (ph, pw) and dilations (dh, dw) into (N, O, Ho, Wo). A linear layer is a 1x1
    convolution of one "image" whose B pixels are the batch (``linear``)."""

    N: int
    C: int
    H: int
    W: int
    O: int
    G: int
    kh: int
    kw: int
    sh: int
    sw: int
    ph: int
    pw: int
    dh: int
    dw: int
    Ho: int
    Wo: int

    @classmethod
    def conv(
        cls,
        x_shape: Sequence[int],
        weight_shape: Sequence[int],
        stride: Sequence[int],
        padding: Sequence[int],
        dilation: Sequence[int],
        groups: int,
    ) -> "ConvGeometry":
        N, C, H, W = x_shape
        O, _, kh, kw = weight_shape
        Ho = out_size(H, kh, stride[0], padding[0], dilation[0])
        Wo = out_size(W, kw, stride[1], padding[1], dilation[1])
        return cls(N, C, H, W, O, groups, kh, kw, *stride, *padding, *dilation, Ho, Wo)

    @classmethod
    def linear(cls, B: int, I: int, O: int) -> "ConvGeometry":  # noqa: E741
        return cls(1, I, 1, B, O, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, B)

    @property
    def out_shape(self) -> Tuple[int, int, int, int]:
        return (self.N, self.O, self.Ho, self.Wo)

    @property
    def direct(self) -> bool:
        """The im2col matrix is the input itself (1x1, stride 1, no padding)."""
        return (self.kh, self.kw, self.sh, self.sw, self.ph, self.pw) == (1, 1, 1, 1, 0, 0)
