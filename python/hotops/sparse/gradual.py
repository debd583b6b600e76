"""GradualPruner: pruning while training (Zhu & Gupta's cubic schedule), by magnitude or by the
second-order rule, whose patterns ``sparsify(model, None)`` then packs as they are."""

from __future__ import annotations

from typing import Callable, Iterable, List, Optional

import torch
from torch import Tensor, nn

from hotops._backend import check_number
from hotops.integrations.torch_prune import is_pruned
from hotops.sparse.format import check_sparsity, magnitude_mask
from hotops.sparse.second_order import prune_model
from hotops.sparse.sparsify import _prunable

__all__ = ["GradualPruner"]


class GradualPruner:
    """GradualPruner(model, target, steps, every, ramp=0.75, skip=..., calib=None, token_mask=None)

    Every layer ``sparsify`` would prune (each nn.Linear / nn.Conv2d for which ``skip(name,
    module)`` is false) keeps its own largest-|w| fraction; the sparsity rises on a cubic ramp
    from 0 to ``target`` over the first ``ramp`` of ``steps`` steps. Call the pruner after every
    optimizer step with the step's number (1-based): it recomputes the masks every ``every``
    steps (and at the ramp's end) and re-applies them after every step, so the pruned weights
    stay zero. With ``calib`` (model inputs, as ``sparsify(method="second_order")`` takes) each
    mask update is a second-order pruning of the model as it stands (the surviving weights move
    to compensate, towards its outputs before the update) instead of a magnitude cut. Afterwards
    ``sparsify(model, None)`` packs exactly these patterns::

        pruner = GradualPruner(model, 0.9, steps=150, every=10)
        for step in range(1, 151):
            loss_fn(model).backward(); opt.step(); opt.zero_grad()
            pruner(step)
        model = sparsify(model, None)
    """

    def __init__(
        self,
        model: nn.Module,
        target: float,
        steps: int,
        every: int,
        ramp: float = 0.75,
        skip: Callable[[str, nn.Module], bool] = lambda name, m: False,
        calib: Optional[Iterable] = None,
        token_mask: Optional[Callable] = None,
    ):
        self.target = check_sparsity(target)
        steps = check_number(steps, "steps", integer=True, low=1)
        self.every = check_number(every, "every", integer=True, low=1)
        ramp = check_number(
            ramp, "ramp (the share of steps the sparsity rises over)", low=0.0, low_open=True, high=1.0
        )
        self.model = model
        self.named = _prunable(model, skip)
        for name, m in self.named:
            if is_pruned(m):
                # torch's forward recomputes weight = weight_orig * weight_mask: this pruner's
                # masks on `weight` would be undone at the next forward
                raise ValueError(
                    f"GradualPruner: layer {name} is pruned with torch.nn.utils.prune (weight_orig, "
                    "weight_mask); make that permanent first (prune.remove(module, 'weight')), or "
                    "pack torch's own masks with sparsify(model, None)"
                )
        self.layers: List[nn.Module] = [m for _, m in self.named]
        self.calib = list(calib) if calib is not None else None
        if self.calib is not None and not self.calib:
            raise ValueError("calib is empty: give model inputs, or None for magnitude pruning")
        self.token_mask = token_mask
        self.ramp_end = max(1, int(ramp * steps))
        self.masks: Optional[List[Tensor]] = None

    def sparsity(self, step: int) -> float:
        """The sparsity the masks have after step `step`: target * (1 - (1 - t)^3), t the
        fraction of the ramp done (1 from the ramp's end on)."""
        t = min(1.0, step / self.ramp_end)
        return self.target * (1 - (1 - t) ** 3)

    @torch.no_grad()
    def __call__(self, step: int) -> None:
        """After optimizer step `step` (1-based)."""
        if self.masks is None or step % self.every == 0 or step == self.ramp_end:
            s = self.sparsity(step)
            if self.calib is None:
                self.masks = [magnitude_mask(m.weight, s) for m in self.layers]
            else:
                kept = prune_model(self.model, self.named, s, self.calib, self.token_mask)
                self.masks = [kept[name] for name, _ in self.named]
        for m, mask in zip(self.layers, self.masks):
            m.weight.mul_(mask)
