"""Modules pruned with torch.nn.utils.prune, as hotops.sparse reads them.

torch's pruning re-parametrizes a tensor ``weight`` as ``weight_orig`` (the trained Parameter) and
``weight_mask`` (a buffer), and a forward pre-hook recomputes ``weight = weight_orig * weight_mask``
before each forward. Between an optimizer step and the next forward the ``weight`` attribute is
therefore stale. hotops takes the pattern from ``weight_mask`` and the values from ``weight_orig``.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Optional, Tuple

from torch import Tensor, nn
from torch.nn.utils import prune


def is_pruned(module: nn.Module, name: str = "weight") -> bool:
    """Whether ``module.<name>`` is re-parametrized by torch.nn.utils.prune."""
    return (
        any(
            isinstance(h, prune.BasePruningMethod) and getattr(h, "_tensor_name", None) == name
            for h in module._forward_pre_hooks.values()
        )
        and hasattr(module, name + "_orig")
        and hasattr(module, name + "_mask")
    )


def current(module: nn.Module, name: str) -> Optional[Tensor]:
    """The tensor the module's next forward will use: ``<name>_orig * <name>_mask`` for a pruned
    tensor (computed now, not the possibly stale attribute), else the attribute itself."""
    if is_pruned(module, name):
        return getattr(module, name + "_orig").detach() * getattr(module, name + "_mask")
    t = getattr(module, name, None)
    return None if t is None else t.detach()


def weight_bias_mask(module: nn.Module) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """(weight, bias, mask) of a Linear / Conv2d: current values, and the pruning mask of the
    weight as bool (None when the weight is not pruned). The module is left as it is."""
    mask = module.weight_mask.detach() != 0 if is_pruned(module, "weight") else None
    return current(module, "weight"), current(module, "bias"), mask


def remove(module: nn.Module) -> Optional[Tensor]:
    """Makes the pruning of the module's weight and bias permanent (torch's prune.remove: the
    hooks go, ``weight`` becomes a Parameter holding ``weight_orig * weight_mask``) and returns the
    weight's mask as bool (None when the weight was not pruned)."""
    mask = weight_bias_mask(module)[2]
    for name in ("weight", "bias"):
        if is_pruned(module, name):
            prune.remove(module, name)
    return mask


def deepcopy(model: nn.Module) -> nn.Module:
    """copy.deepcopy that also copies pruned modules: their computed ``weight`` (weight_orig *
    weight_mask, not a graph leaf) refuses to be deep-copied, so it is detached for the copy and
    put back after. The model is otherwise untouched."""
    saved = []
    with contextlib.ExitStack() as undo:
        for module in model.modules():
            for name in ("weight", "bias"):
                t = module.__dict__.get(name)
                if isinstance(t, Tensor) and is_pruned(module, name) and not t.is_leaf:
                    saved.append((module, name, t))
                    module.__dict__[name] = t.detach()
        undo.callback(lambda: [m.__dict__.__setitem__(n, t) for m, n, t in saved])
        return copy.deepcopy(model)
