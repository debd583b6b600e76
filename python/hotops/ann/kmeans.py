"""Seeded, multi-threaded k-means: the C++ assignment kernel (ann_nearest with one sub-space) and
update step, driven from here so a progress bar can follow long runs."""

from __future__ import annotations

import sys

import numpy as np
import torch

from hotops import _backend
from hotops.ann import _arrays


def codebook_layout(centroids: np.ndarray):
    """(m, ksub, dsub) centroids -> the kernels' (ct (m, dsub, ksub), cterm (m, ksub) = ||c||^2)."""
    ct = np.ascontiguousarray(centroids.transpose(0, 2, 1), dtype=np.float32)
    cterm = np.ascontiguousarray((centroids.astype(np.float32) ** 2).sum(-1), dtype=np.float32)
    return ct, cterm


def nearest(x: np.ndarray, centroids: np.ndarray, k: int = 1, metric: str = "l2"):
    """Indices (n, m, k) and scores of the k best centroids of each row's m sub-vectors, for
    centroids (m, ksub, dsub); lower score is better (negated inner product for ip)."""
    ct, cterm = codebook_layout(centroids)
    return _backend.choose("nearest", NEAREST_BACKENDS, _CPU).run(x, ct, cterm, k, metric)


def kmeans(
    x, k: int, *, niter: int = 25, seed: int = 1234, max_points_per_centroid: int = 256, verbose: bool = True
) -> np.ndarray:
    """k centroids (k, d) of the rows of x (NumPy or torch, float32). At most
    k * max_points_per_centroid rows, drawn with `seed`, are used; a tqdm bar shows progress on
    large inputs when stderr is a terminal and verbose is set."""
    k = _arrays.check_k(k, "k")
    niter = _backend.check_number(niter, "niter", integer=True, low=0)
    seed = _backend.check_number(seed, "seed", integer=True, low=0)
    max_points_per_centroid = _backend.check_number(
        max_points_per_centroid, "max_points_per_centroid", integer=True, low=1
    )
    a = _arrays.as_numpy(x, "x")
    if a.ndim != 2:
        raise ValueError(f"k-means needs a 2-d (n, d) array, got shape {a.shape}")
    x = _arrays.as_vectors(a, "training vectors", a.shape[1])
    n = x.shape[0]
    if n < k:
        raise ValueError(f"k-means with k = {k} needs at least {k} training vectors, got {n}")
    rng = np.random.default_rng(seed)
    if n > k * max_points_per_centroid:
        x = x[np.sort(rng.choice(n, k * max_points_per_centroid, replace=False))]
    centroids = x[rng.choice(x.shape[0], k, replace=False)].copy()
    steps = range(niter)
    if verbose and sys.stderr.isatty() and x.shape[0] * k * x.shape[1] * niter > 2e10:
        from tqdm import tqdm

        steps = tqdm(steps, desc=f"k-means k={k}", leave=False)
    for _ in steps:
        _backend.choose("kmeans", KMEANS_STEP_BACKENDS, _CPU).run(x, centroids)
    return centroids


def _nearest_cpu(x, ct, cterm, k, metric):
    """The C++ kernel (NumPy arrays)."""
    n, m = x.shape[0], ct.shape[0]
    idx = np.empty((n, m, k), dtype=np.int64)
    score = np.empty((n, m, k), dtype=np.float32)
    _backend.ext().ann_nearest(x, ct, cterm, metric, idx, score, _arrays.threads())
    return idx, score


def _kmeans_step_cpu(x, centroids):
    """One Lloyd step in place: assignment (the C++ nearest kernel), then the C++ update."""
    idx, _score = nearest(x, centroids[None])
    _backend.ext().ann_kmeans_update(x, idx.reshape(-1), centroids)


_CPU = torch.device("cpu")  # NumPy arrays
NEAREST_BACKENDS = (_backend.Backend("cpu (C++)", _backend.cpu_refuses, _nearest_cpu),)
KMEANS_STEP_BACKENDS = (_backend.Backend("cpu (C++)", _backend.cpu_refuses, _kmeans_step_cpu),)
