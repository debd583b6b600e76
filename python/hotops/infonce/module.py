"""nn.Module front end of hotops.info_nce, with learnable temperature and cross-rank gathering."""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from hotops import _backend
from hotops._collective import all_gather_rows, exchange
from hotops.infonce.functional import check_neg_weight, check_tensors, info_nce


class InfoNCELoss(nn.Module):
    """InfoNCE with in-batch and hard negatives.

    Args:
        temperature: the temperature (fixed, used as given), or the learnable one's start.
        learnable_temperature: learn log(temperature); the temperature starts and is clamped in
            [min_temperature, 1] (CLIP-style: the logit scale never exceeds 1/min_temperature).
        label_smoothing: as in ``F.cross_entropy``.
        gather: all-gather d (and a shared hard pool) across ``torch.distributed`` ranks, with
            gradient, so each rank's queries see every rank's candidates (batch and pool sizes
            may differ between ranks, 0 rows included). Per-query hard negatives (B, K, D) stay
            local.
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
        temperature = self.temperature if self.learnable_temperature else float(self.temperature)
        if self.gather and torch.distributed.is_available() and torch.distributed.is_initialized():
            # in autocast's dtype, as info_nce takes them: q, d and hard may differ before the cast
            # (a bf16 encoder output beside a float32 cache), and the gather moves the smaller rows
            q, d, hard = (_backend.autocast_input(t) for t in (q, d, hard))
            d, hard, pos_offset = _gather_candidates(q, d, hard, neg_weight)
            if q.shape[0] == 0:
                # a rank with no queries contributes nothing, but its loss must reach the gathered
                # candidates: the backward's all_reduce waits for every rank
                zero = q.float().sum() + d[:0].float().sum() + (0.0 * temperature)
                return zero.reshape(1)[:0] if self.reduction == "none" else zero
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


_GATHER_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what check_tensor accepts
_HARD_KINDS = ("none", "pool", "per-query")


class _Holds(NamedTuple):
    """What one rank holds, exchanged before the gather (ints: one small all_gather)."""

    refused: int  # 1: this rank's arguments were refused (it raises its own error)
    queries: int
    rows: int  # of d
    dim: int
    dtype: int  # index in _GATHER_DTYPES
    hard_kind: int  # index in _HARD_KINDS
    pool_rows: int
    own_k: int  # K of per-query negatives
    grad: int  # the candidates need a gradient (this rank will run the backward's all_reduce)
    weights: int  # neg_weight's length, -1 without


def _check_local(q, d, hard, neg_weight) -> None:
    """What must hold on this rank before its rows are gathered: everything info_nce checks that
    does not need the gathered rows (a refusal after the gather would raise on this rank alone)."""
    check_tensors(q, d, hard)
    if q.shape[1] != d.shape[1] or (hard is not None and hard.shape[-1] != d.shape[1]):
        shapes = f"q {tuple(q.shape)}, d {tuple(d.shape)}" + (
            "" if hard is None else f", hard {tuple(hard.shape)}"
        )
        raise ValueError(f"q, d and hard must have the same dimension D, got {shapes}")
    if q.shape[0] > d.shape[0]:
        raise ValueError(
            f"d has {d.shape[0]} rows, fewer than the {q.shape[0]} queries whose positives it holds"
        )
    if hard is not None and hard.dim() == 3 and hard.shape[0] != q.shape[0]:
        raise ValueError(f"hard (B, K, D) must have B = {q.shape[0]}, got {tuple(hard.shape)}")
    if neg_weight is not None:
        check_neg_weight(neg_weight, q.device)


def _gather_candidates(q: Tensor, d: Tensor, hard: Optional[Tensor], neg_weight: Optional[Tensor]):
    """d and a shared hard pool gathered from every rank in rank order (row counts may differ, a
    rank may have none), per-query hard negatives kept; returns (d, hard, this rank's pos_offset).

    The ranks first exchange what they hold. Anything that would make them diverge (one rank
    refusing its arguments, different D or dtype, a pool on one rank and per-query negatives on
    another) raises on every rank: a rank that raised alone would leave the others waiting in the
    gather or in the backward's all_reduce, and tensors of different sizes or dtypes in one
    collective abort the process (gloo) or read garbage."""
    error = None
    try:
        _check_local(q, d, hard, neg_weight)
    except (TypeError, ValueError) as exc:
        error = exc
    if error is None:
        kind = 0 if hard is None else 1 if hard.dim() == 2 else 2
        mine = _Holds(
            refused=0,
            queries=q.shape[0],
            rows=d.shape[0],
            dim=d.shape[1],
            dtype=_GATHER_DTYPES.index(d.dtype),
            hard_kind=kind,
            pool_rows=hard.shape[0] if kind == 1 else 0,
            own_k=hard.shape[1] if kind == 2 else 0,
            grad=int(torch.is_grad_enabled() and (d.requires_grad or (kind == 1 and hard.requires_grad))),
            weights=-1 if neg_weight is None else neg_weight.shape[0],
        )
    else:
        mine = _Holds(1, *[0] * (len(_Holds._fields) - 1))
    if torch.compiler.is_compiling():
        # a graph cannot hold values read from tensors (the counts): under torch.compile every rank
        # is taken to hold what this one holds, as before the exchange (equal shapes on every rank)
        ranks = [mine] * torch.distributed.get_world_size()
    else:
        ranks = [_Holds(*h) for h in exchange(mine)]
    if error is not None:
        raise error
    refused = [r for r, h in enumerate(ranks) if h.refused]
    if refused:
        raise ValueError(f"InfoNCELoss(gather=True): rank(s) {refused} of the group refused their arguments")
    if len({h.dim for h in ranks}) > 1:
        raise ValueError(
            "InfoNCELoss(gather=True) needs the same dimension D of q and d on every rank, got "
            f"{[h.dim for h in ranks]} by rank"
        )
    if len({h.dtype for h in ranks}) > 1:
        names = [str(_GATHER_DTYPES[h.dtype]).replace("torch.", "") for h in ranks]
        raise TypeError(
            f"InfoNCELoss(gather=True): d has dtype {names} by rank; it must be the same on every rank"
        )
    kinds = {h.hard_kind for h in ranks} - {0}
    if len(kinds) > 1:
        raise ValueError(
            "InfoNCELoss(gather=True): hard must be of one kind on every rank, an (N, D) pool (gathered) "
            f"or (B, K, D) per-query negatives (kept local), or None; got "
            f"{[_HARD_KINDS[h.hard_kind] for h in ranks]} by rank"
        )
    if len({h.grad for h in ranks}) > 1:
        raise ValueError(
            f"InfoNCELoss(gather=True): the candidates need a gradient on ranks "
            f"{[r for r, h in enumerate(ranks) if h.grad]} and not on the others; every rank must "
            f"run the backward (its all_reduce waits for all of them)"
        )
    if sum(h.queries for h in ranks) == 0:
        raise ValueError("info_nce needs a non-empty batch (q has 0 rows on every rank)")
    rows, pools = [h.rows for h in ranks], [h.pool_rows for h in ranks]
    columns = sum(rows) + sum(pools)  # the gathered candidates, before each rank's own K
    wrong = [
        (r, h.weights, columns + h.own_k)
        for r, h in enumerate(ranks)
        if h.weights not in (-1, columns + h.own_k)
    ]
    if wrong:
        raise ValueError(
            "InfoNCELoss(gather=True): neg_weight must have one weight per gathered candidate column "
            f"(every rank's d and pool rows, plus its own K); (rank, got, expected): {wrong}"
        )
    pool = hard if hard is not None and hard.dim() == 2 else None
    if 1 in kinds and pool is None:  # other ranks hold a pool: this rank adds no rows to it
        pool = d.new_empty((0, d.shape[1]))
    if pool is None:
        (d,) = _AllGather.apply((rows,), d)
    else:
        d, pool = _AllGather.apply((rows, pools), d, pool)
    return d, (pool if pool is not None else hard), sum(rows[: torch.distributed.get_rank()])


class _AllGather(torch.autograd.Function):
    """Each part (rows[i][r] rows on rank r; counts may differ, 0 included) concatenated from all
    ranks in rank order. Backward sums the incoming gradients over ranks (every rank's loss used
    every slice) in one all_reduce and keeps this rank's rows of each part."""

    @staticmethod
    def forward(ctx, rows, *parts: Tensor):
        ctx.rows, ctx.rank = rows, torch.distributed.get_rank()
        return tuple(all_gather_rows(part, counts) for part, counts in zip(parts, rows))

    @staticmethod
    def backward(ctx, *grads: Tensor):
        # a new tensor (cat copies): all_reduce writes in place, and the incoming gradients are
        # autograd's, possibly seen by other consumers
        full = torch.cat(grads)
        torch.distributed.all_reduce(full)
        out, at = [], 0
        for counts in ctx.rows:
            start = at + sum(counts[: ctx.rank])
            out.append(full[start : start + counts[ctx.rank]])
            at += sum(counts)
        return (None, *out)
