"""nn.Module front end of hotops.info_nce, with learnable temperature and cross-rank gathering."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from hotops import _backend
from hotops.infonce.functional import info_nce


class InfoNCELoss(nn.Module):
    """InfoNCE with in-batch and hard negatives.

    Args:
        temperature: the temperature (fixed, used as given), or the learnable one's start.
        learnable_temperature: learn log(temperature); the temperature starts and is clamped in
            [min_temperature, 1] (CLIP-style: the logit scale never exceeds 1/min_temperature).
        label_smoothing: as in ``F.cross_entropy``.
        gather: all-gather d (and a shared hard pool) across ``torch.distributed`` ranks, with
            gradient, so each rank's queries see every rank's candidates. Per-query hard
            negatives (B, K, D) stay local.
    """

    def __init__(
        self,
        temperature: float = 0.05,
        learnable_temperature: bool = False,
        label_smoothing: float = 0.0,
        gather: bool = False,
        min_temperature: float = 0.01,
        reduction: str = "mean",
    ):
        super().__init__()
        temperature = _backend.check_number(temperature, "temperature", low=0.0, low_open=True)
        min_temperature = _backend.check_number(
            min_temperature, "min_temperature", low=0.0, low_open=True, high=1.0
        )
        if learnable_temperature and not min_temperature <= temperature <= 1.0:
            # outside the clamp the gradient of log_temperature is 0: it would never learn
            raise ValueError(
                f"a learnable temperature starts in [min_temperature, 1] = [{min_temperature}, 1], "
                f"got {temperature}"
            )
        label_smoothing = _backend.check_number(label_smoothing, "label_smoothing", low=0.0, high=1.0)
        for name, flag in (("learnable_temperature", learnable_temperature), ("gather", gather)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__} {flag!r}")
        if not isinstance(reduction, str) or reduction not in ("none", "mean", "sum"):
            raise ValueError(f"reduction must be one of ('none', 'mean', 'sum'), got {reduction!r}")
        self.learnable_temperature = learnable_temperature
        self.label_smoothing = label_smoothing
        self.gather = gather
        self.min_temperature = min_temperature
        self.reduction = reduction
        if learnable_temperature:
            self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))
        else:
            self.register_buffer("log_temperature", torch.tensor(math.log(temperature)), persistent=False)

    @property
    def temperature(self) -> Tensor:
        """The temperature in use: a learnable one clamped to [min_temperature, 1], a fixed one
        as given."""
        t = self.log_temperature.exp()
        return t.clamp(self.min_temperature, 1.0) if self.learnable_temperature else t

    def forward(
        self, q: Tensor, d: Tensor, hard: Optional[Tensor] = None, neg_weight: Optional[Tensor] = None
    ) -> Tensor:
        pos_offset = 0
        if self.gather and torch.distributed.is_available() and torch.distributed.is_initialized():
            rank = torch.distributed.get_rank()
            d, pos_offset = _all_gather(d), rank * d.shape[0]
            if hard is not None and hard.dim() == 2:
                hard = _all_gather(hard)
        temperature = self.temperature if self.learnable_temperature else float(self.temperature)
        return info_nce(
            q,
            d,
            hard,
            temperature=temperature,
            label_smoothing=self.label_smoothing,
            neg_weight=neg_weight,
            reduction=self.reduction,
            pos_offset=pos_offset,
        )


class _AllGather(torch.autograd.Function):
    """Concatenate x (same shape on every rank) from all ranks in rank order. Backward sums the
    incoming gradient over ranks (every rank's loss used every slice) and keeps this rank's."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        import torch.distributed as dist

        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def _all_gather(x: Tensor) -> Tensor:
    return _AllGather.apply(x)
