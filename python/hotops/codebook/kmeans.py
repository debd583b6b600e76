"""Seeded k-means and the k-means initialisation of the codebook format from a dense weight."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from hotops.codebook.format import CodebookWeight, code_bits

ASSIGN_CHUNK = 2048  # points per distance block: the (chunk, k) matrix stays in cache


def nearest(points: Tensor, centroids: Tensor) -> Tensor:
    """Index of the nearest centroid (squared Euclidean) of every point, chunked."""
    out = torch.empty(points.shape[0], dtype=torch.long, device=points.device)
    c2 = centroids.pow(2).sum(1)
    for i in range(0, points.shape[0], ASSIGN_CHUNK):
        dist = torch.addmm(c2, points[i : i + ASSIGN_CHUNK], centroids.T, alpha=-2)
        out[i : i + ASSIGN_CHUNK] = dist.argmin(1)
    return out


def kmeans(
    points: Tensor, k: int, iters: int, generator: torch.Generator, sample: int = 1 << 14
) -> Tuple[Tensor, Tensor]:
    """Centroids (k, d) fitted on at most `sample` points, and every point's assignment."""
    P = points.shape[0]
    fit = points[torch.randperm(P, generator=generator)[:sample]] if P > sample else points
    pick = (
        torch.randint(fit.shape[0], (k,), generator=generator)
        if fit.shape[0] < k
        else torch.randperm(fit.shape[0], generator=generator)[:k]
    )
    centroids = fit[pick].clone()
    for _ in range(iters):
        assign = nearest(fit, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, assign, fit)
        counts = torch.bincount(assign, minlength=k).to(fit.dtype)[:, None]
        centroids = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)  # empty: keep
    return centroids, nearest(points, centroids)


def group_rows(w: Tensor, num_groups: int, generator: torch.Generator) -> Tuple[Optional[Tensor], Tensor]:
    """JLCM's neuron grouping: rows whose (scale-normalised) value distributions look alike share
    codebooks. Clusters rows by their quantiles; returns (perm, group_ptr) in stored order."""
    N = w.shape[0]
    if num_groups <= 1 or N < 2 * num_groups:
        return None, torch.tensor([0, N], dtype=torch.int64)
    qs = torch.linspace(0.02, 0.98, 9, dtype=w.dtype)
    signature = torch.quantile(w, qs, dim=1).T  # (N, 9) distribution of each row
    _, label = kmeans(signature, num_groups, 20, generator)
    perm = torch.argsort(label, stable=True)
    counts = torch.bincount(label, minlength=num_groups)
    group_ptr = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    return perm, group_ptr


def quantize_weight(
    weight: Tensor,
    bits_per_weight: float = 2,
    in_group: int = 8,
    num_codebooks: int = 1,
    num_groups: int = 1,
    iters: int = 25,
    seed: int = 0,
) -> CodebookWeight:
    """A CodebookWeight close to the dense (N, K) `weight`: per-row RMS scales, rows grouped by
    distribution, then per group residual k-means (one codebook after another) on the
    in_group-long slices of the normalised rows. Codebooks and scales are float32."""
    C = 1 << code_bits(bits_per_weight, in_group, num_codebooks)
    N, K = weight.shape
    if K % in_group:
        raise ValueError(f"in_features = {K} is not a multiple of in_group = {in_group}")
    g = torch.Generator().manual_seed(seed)
    w = weight.detach().float().cpu()
    scales = w.pow(2).mean(1).sqrt().clamp_min(torch.finfo(torch.float32).tiny)
    w = w / scales[:, None]
    perm, group_ptr = group_rows(w, num_groups, g)
    if perm is not None:
        w, scales = w[perm], scales[perm]
    O, J = group_ptr.numel() - 1, K // in_group
    codes = torch.zeros(N, J, num_codebooks, dtype=torch.uint8)
    codebooks = torch.zeros(O, num_codebooks, C, in_group)
    for o in range(O):
        r0, r1 = group_ptr[o].item(), group_ptr[o + 1].item()
        residual = w[r0:r1].reshape(-1, in_group).clone()
        for m in range(num_codebooks):
            if residual.shape[0] == 0:
                break
            cb, assign = kmeans(residual, C, iters, g)
            codebooks[o, m], codes[r0:r1, :, m] = cb, assign.reshape(r1 - r0, J).to(torch.uint8)
            residual -= cb[assign]
    dev = weight.device
    return CodebookWeight(
        codes.to(dev),
        codebooks.to(dev),
        scales.to(dev),
        group_ptr.to(dev),
        perm.to(dev) if perm is not None else None,
    )
