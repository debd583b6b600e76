"""`info_nce`: validation of every argument, then the call of ``hotops::info_nce``."""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from hotops import _backend
from hotops.infonce import op as _op

_REDUCTIONS = ("none", "mean", "sum")
# Weights up to 1e30: the weighted sum of C candidates (each term at most the weight) then stays
# inside float32 for any C below 3e8; larger ones overflowed it and zeroed the negatives' gradient.
WEIGHT_MAX = 1e30


def _temperature(temperature, device: torch.device) -> Tensor:
    """temperature as a 0-d float tensor on `device`: a positive finite number, NumPy scalar or
    one-element floating tensor (a tensor keeps its autograd graph)."""
    if isinstance(temperature, Tensor):
        if temperature.numel() != 1:
            raise ValueError(
                f"temperature must be a number or a 0-d tensor, got shape {tuple(temperature.shape)}"
            )
        if not temperature.is_floating_point():
            raise TypeError(f"temperature tensor must be floating point, got {temperature.dtype}")
        temperature = temperature.reshape(()).to(device)
        if not torch.compiler.is_compiling():
            value = temperature.detach().item()
            if not (0 < value < math.inf):
                raise ValueError(f"temperature must be positive and finite, got {value}")
        return temperature
    value = _backend.check_number(temperature, "temperature", low=0.0, low_open=True)
    return torch.tensor(value, dtype=torch.float32, device=device)


def check_tensors(q, d, hard) -> None:
    """q (B, D), d (Bd, D) and hard (N, D) / (B, K, D) or None: tensors of one float dtype on one
    device (the shapes' agreement is checked where the candidates are known)."""
    _backend.check_tensor(q, "q", ndim=2)
    _backend.check_tensor(d, "d", ndim=2)
    if hard is not None:
        _backend.check_tensor(hard, "hard", ndim=(2, 3))
    _backend.check_same_device(q=q, d=d, hard=hard)
    _backend.check_same_dtype(q=q, d=d, hard=hard)


def check_neg_weight(neg_weight, device: torch.device) -> Tensor:
    """neg_weight as the op takes it (detached contiguous float32) after every check but its length,
    which needs the candidates (InfoNCELoss(gather=True) checks it before gathering them)."""
    _backend.check_tensor(
        neg_weight,
        "neg_weight",
        ndim=1,
        dtypes=(torch.float32, torch.float64, torch.bfloat16, torch.float16),
    )
    if neg_weight.device != device:
        raise ValueError(f"neg_weight is on {neg_weight.device}, q on {device}")
    neg_weight = neg_weight.detach().float().contiguous()
    # NaN, Inf, negative and too large weights are refused (not propagated): one pass over C
    if not torch.compiler.is_compiling() and not bool(
        (neg_weight.abs() <= WEIGHT_MAX).all() & (neg_weight >= 0).all()
    ):
        bad = neg_weight[~((neg_weight >= 0) & (neg_weight <= WEIGHT_MAX))][0].item()
        raise ValueError(f"neg_weight must hold finite non-negative weights up to 1e30, found {bad}")
    return neg_weight


def info_nce(
    q: Tensor,
    d: Tensor,
    hard: Optional[Tensor] = None,
    *,
    temperature: Union[float, Tensor] = 0.05,
    label_smoothing: float = 0.0,
    neg_weight: Optional[Tensor] = None,
    reduction: str = "mean",
    pos_offset: int = 0,
) -> Tensor:
    """InfoNCE / contrastive cross-entropy without materialising the B × N logits.

    Args:
        q: (B, D) queries.
        d: (Bd, D) candidates; query i's positive is ``d[pos_offset + i]`` and every other row is
            an in-batch negative (Bd = B unless candidates were gathered across ranks).
        hard: None; (N, D) a pool of hard negatives every query sees; or (B, K, D), query i
            sees only its own K.
        temperature: float or 0-d tensor; a tensor that requires grad gets its gradient.
        label_smoothing: as in ``F.cross_entropy``.
        neg_weight: optional non-negative (C,) weights on the C = Bd + N (or Bd + K) candidate
            columns inside the softmax denominator; the positive always has weight 1.
        reduction: "none" | "mean" | "sum".

    Returns the float32 loss. Inputs may be float32, bfloat16 or float16 (float32
    accumulation); inside ``torch.autocast`` they are taken in autocast's dtype, as torch's
    matmul takes them. NaN inputs give a NaN loss.
    """
    q, d, hard = (_backend.autocast_input(t) for t in (q, d, hard))
    check_tensors(q, d, hard)
    pos_offset = _backend.check_number(pos_offset, "pos_offset", integer=True, low=0)
    label_smoothing = _backend.check_number(label_smoothing, "label_smoothing", low=0.0, high=1.0)
    if not isinstance(reduction, str) or reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    B, D = q.shape
    if B == 0:
        raise ValueError("info_nce needs a non-empty batch (q has 0 rows)")
    if d.shape[1] != D:
        raise ValueError(
            f"q and d must have the same dimension D, got q {tuple(q.shape)}, d {tuple(d.shape)}"
        )
    if pos_offset + B > d.shape[0]:
        raise ValueError(
            f"d has {d.shape[0]} rows; queries 0..{B - 1} need their positives at "
            f"rows {pos_offset}..{pos_offset + B - 1} (pos_offset={pos_offset})"
        )
    pool = own = None
    if hard is not None and hard.dim() == 2:
        if hard.shape[1] != D:
            raise ValueError(f"hard (N, D) must have D = {D}, got {tuple(hard.shape)}")
        pool = hard
    elif hard is not None:
        if hard.shape[0] != B or hard.shape[2] != D:
            raise ValueError(f"hard (B, K, D) must have B = {B} and D = {D}, got {tuple(hard.shape)}")
        own = hard
    temperature = _temperature(temperature, q.device)
    if neg_weight is not None:
        C = d.shape[0] + (pool.shape[0] if pool is not None else 0) + (own.shape[1] if own is not None else 0)
        neg_weight = check_neg_weight(neg_weight, q.device)
        if neg_weight.shape[0] != C:
            raise ValueError(
                f"neg_weight must have one weight per candidate column ({C}), got {neg_weight.shape[0]}"
            )
    need_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, d, hard, temperature)
    )
    out = _op.info_nce(
        q, d, pool, own, neg_weight, temperature, pos_offset, float(label_smoothing), reduction, need_grad
    )
    return out[0]
