"""Plain-torch definition of hotops.info_nce: the kernels are tested against this.

Row i's logits are [q_i·d_j for all j] ++ [q_i·h for its hard negatives], divided by the
temperature. With per-candidate weights w (the positive's weight is always 1) the loss is

    loss_i = lse_i - (1 - eps) * l_ii - eps * mean_j l_ij,   lse_i = log sum_j w_j exp(l_ij)

which is exactly ``F.cross_entropy(logits, arange(B), label_smoothing=eps)`` when w is all ones.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def logits(q: torch.Tensor, d: torch.Tensor, hard: Optional[torch.Tensor], temperature) -> torch.Tensor:
    parts = [q @ d.T]
    if hard is not None and hard.dim() == 2:
        parts.append(q @ hard.T)
    elif hard is not None:
        parts.append(torch.einsum("bd,bkd->bk", q, hard))
    return torch.cat(parts, dim=1) / temperature


def info_nce(
    q,
    d,
    hard=None,
    *,
    temperature=0.05,
    label_smoothing=0.0,
    neg_weight=None,
    reduction="mean",
    pos_offset: int = 0,
) -> torch.Tensor:
    """Materialises the B×C logits in the inputs' dtype; the loss in float32."""
    z = logits(q, d, hard, temperature).float()
    target = torch.arange(q.shape[0], device=q.device) + pos_offset
    if neg_weight is None:
        return F.cross_entropy(z, target, label_smoothing=label_smoothing, reduction=reduction)
    w = neg_weight.float().expand(z.shape[0], -1).clone()
    w[torch.arange(z.shape[0], device=z.device), target] = 1.0
    lse = torch.logsumexp(z + torch.log(w), dim=1)
    pos = z.gather(1, target[:, None])[:, 0]
    loss = lse - (1 - label_smoothing) * pos
    if label_smoothing:  # (at 0 the term is absent, not 0 * mean: an infinite logit gives no NaN)
        loss = loss - label_smoothing * z.mean(dim=1)
    return {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[reduction]
