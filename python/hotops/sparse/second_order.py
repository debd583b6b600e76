"""Second-order one-shot pruning (OBS with SparseGPT's column sweep): each layer's surviving
weights absorb the error of the ones it prunes, in the metric of the layer's calibration inputs,
and layer by layer the pruned model's inputs are compensated too. ``sparsify(...,
method="second_order", calib=...)`` runs it."""

from __future__ import annotations

import copy
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from hotops._calibration import _check_untied, _damped, _eval_mode, _layer_grams, input_groups


def prune_layer(target: Tensor, hessian: Tensor, sparsity: float, block: int = 128) -> Tuple[Tensor, Tensor]:
    """`target` (N, K) with round(sparsity * N * b) of each block of b = `block` columns set to
    zero, the others moved to (greedily) minimise tr((W - target) H (W - target)^T), H =
    `hessian` (K, K, positive definite: damp it first).

    With H^-1 = U^T U (U upper triangular), the columns go left to right; zeroing w_ij costs
    w_ij^2 / U_jj^2 once the columns before j are fixed, and (w_j - q_j) / U_jj @ U[j, later]
    taken off the later columns is the change that compensates it best (OBS; GPTQ's order). Each
    block's pruned set is the block's smallest costs, chosen after the compensation from the
    blocks before it (SparseGPT's adaptive mask), so rows need not share one sparsity.

    Returns the weight (float64) and its mask (True where kept)."""
    N, K = target.shape
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian.double())), upper=True)
    w = target.double().clone()
    d = u.diagonal()
    kept = torch.ones(N, K, dtype=torch.bool, device=w.device)
    for c0 in range(0, K, block):
        c1 = min(c0 + block, K)
        cost = w[:, c0:c1].pow(2) / d[c0:c1].pow(2)
        pruned = torch.zeros(cost.numel(), dtype=torch.bool, device=w.device)
        pruned[cost.flatten().argsort(stable=True)[: int(round(sparsity * cost.numel()))]] = True
        pruned = pruned.view_as(cost)
        err = pruned.to(torch.float64) / d[c0:c1]  # becomes the columns' errors, one at a time
        for j in range(c0, c1):
            e = err[:, j - c0].mul_(w[:, j])
            w[:, j:c1].sub_(torch.outer(e, u[j, j:c1]))
        w[:, c0:c1].masked_fill_(pruned, 0.0)  # exact zeros: the update left rounding residue
        w[:, c1:] -= err @ u[c0:c1, c1:]
        kept[:, c0:c1] = ~pruned
    return w, kept


# Rows keeping more weights than this keep the sweep's compensation: an exact refit costs
# k^3 / 3 per row (a 4096-row layer keeping 1024 per row: 1.5 TFLOP).
REFIT_MAX_KEPT = 1024


def refit(
    weight: Tensor, target: Tensor, hessian: Tensor, kept: Tensor, max_kept: int = REFIT_MAX_KEPT
) -> Tensor:
    """`weight` with each row that keeps at most `max_kept` weights replaced by the row zero
    outside `kept` nearest `target` in the metric H: its kept weights solve H[k, k] w_k =
    (target H)_k exactly (k the row's kept inputs). The column sweep fixes each weight once,
    before the later columns are pruned, so the later pruning is compensated only by later
    columns. Solving again with the mask known lifted all-MiniLM-L6-v2's one-shot embedding cosine
    to dense at 90 % from 0.42 to 0.48 (docs/notes/sparse.md).

    Rows go in batched Cholesky solves of rows with similar counts (sorted), each batch padded to
    its largest count with identity rows, at most 2^24 float64 entries (128 MB) per batch."""
    h = hessian.double()
    rhs = target.double() @ h
    out = weight.double().clone()
    counts = kept.sum(1)
    order = torch.argsort(counts, stable=True)
    order = order[counts[order] <= max_kept].tolist()
    c = counts.tolist()
    budget = 1 << 24
    i = 0
    while i < len(order):
        n = 1
        while i + n < len(order) and (n + 1) * c[order[i + n]] ** 2 <= budget:
            n += 1
        rows = torch.tensor(order[i : i + n], device=out.device)
        i += n
        k = c[int(rows[-1])]
        if k == 0:
            out[rows] = 0
            continue
        idx = torch.argsort((~kept[rows]).to(torch.uint8), dim=1, stable=True)[:, :k]  # kept first
        valid = torch.arange(k, device=out.device) < counts[rows, None]
        eye = torch.eye(k, dtype=torch.float64, device=out.device)
        systems = torch.where(valid[:, :, None] & valid[:, None, :], h[idx[:, :, None], idx[:, None, :]], eye)
        b = torch.where(valid, rhs[rows].gather(1, idx), 0.0)
        x = torch.cholesky_solve(b[..., None], torch.linalg.cholesky(systems))[..., 0]
        out[rows] = torch.zeros_like(out[rows]).scatter_(1, idx, torch.where(valid, x, 0.0))
    return out


def check_layers(layers: Sequence[Tuple[str, nn.Module]]) -> None:
    """Refuse, before any weight changes, layers second-order pruning cannot take: grouped
    convolutions, and layers tied to one weight tensor."""
    for name, m in layers:
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            raise ValueError(
                f"second-order pruning takes convolutions with groups=1; {name} has groups={m.groups} "
                "(skip it, or use method='magnitude')"
            )
    _check_untied(dict(layers), "second-order pruning")


def prune_model(
    model: nn.Module,
    layers: Sequence[Tuple[str, nn.Module]],
    sparsity: float,
    calib: List,
    token_mask: Optional[Callable] = None,
    damp: float = 0.01,
) -> Dict[str, Tensor]:
    """Prune `layers` (name, nn.Linear or nn.Conv2d with groups 1) of `model` in place, in the
    order given (that of the forward pass: each layer then sees the inputs of the model pruned
    before it), and return their masks (True where kept).

    Each layer's target is the weight V that best maps its inputs in the pruned model, X_q, to its
    outputs in the dense one, X W^T (V^T = W^T + (X_q^T X_q)^-1 X_q^T (X - X_q) W^T,
    token-weighted, as JLCM's layer-wise stage), and V is pruned in the metric H = X_q^T X_q (``prune_layer``), damped by
    `damp` x its mean diagonal; then the rows that keep at most ``REFIT_MAX_KEPT`` weights are
    solved again exactly for that mask (``refit``).

    Layers are pruned one after the other: an error at a layer (e.g. calibration inputs that are
    not finite there) leaves the layers before it pruned."""
    check_layers(layers)
    with _eval_mode(model):  # no dropout: the Grams are of the model's deterministic inputs
        dense = copy.deepcopy(model)
        masks = {}
        modules = dict(layers)
        for group in input_groups(model, list(modules), calib[0]):  # e.g. query, key and value: one pass
            for name, grams in zip(
                group, _layer_grams(dense, model, group, calib, token_mask, dense_gram=False)
            ):
                m = modules[name]
                h = _damped(grams.qq, damp)
                target = grams.target(m.weight.detach().flatten(1), h)  # at sparsity 0 nothing changes
                weight, kept = prune_layer(target, h, sparsity)
                weight = refit(weight, target, h, kept)
                with torch.no_grad():
                    m.weight.copy_(weight.view_as(m.weight))
                masks[name] = kept.view_as(m.weight)
    return masks
