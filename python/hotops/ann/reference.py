"""Plain NumPy definitions the PQ kernels are tested against (float64, written for clarity).
NumPy rather than torch because the indexes are NumPy-native; scores are lower-is-better, as in
the kernels: squared L2 distance, or the negated inner product."""

from __future__ import annotations

import numpy as np


def sub_vectors(x: np.ndarray, m: int) -> np.ndarray:
    return x.reshape(x.shape[0], m, x.shape[1] // m).astype(np.float64)  # -1 fails on zero rows


def tables(q: np.ndarray, codebooks: np.ndarray, metric: str) -> np.ndarray:
    """(nq, m, ksub): score of each query sub-vector against each centroid of its sub-space."""
    qs, cb = sub_vectors(q, codebooks.shape[0]), codebooks.astype(np.float64)
    if metric == "l2":
        return ((qs[:, :, None, :] - cb[None]) ** 2).sum(-1)
    return -(qs[:, :, None, :] * cb[None]).sum(-1)


def encode(x: np.ndarray, codebooks: np.ndarray) -> np.ndarray:
    """(n, m) index of the nearest centroid (L2) of each sub-vector."""
    return tables(x, codebooks, "l2").argmin(-1)


def decode(codes: np.ndarray, codebooks: np.ndarray) -> np.ndarray:
    m = codebooks.shape[0]
    return np.concatenate([codebooks[s][codes[:, s]] for s in range(m)], axis=1)


def scores(q: np.ndarray, x: np.ndarray, metric: str) -> np.ndarray:
    """(nq, n) exact scores."""
    q, x = q.astype(np.float64), x.astype(np.float64)
    if metric == "l2":
        return ((q[:, None, :] - x[None]) ** 2).sum(-1)
    return -(q @ x.T)


def search(q: np.ndarray, x: np.ndarray, k: int, metric: str):
    """Brute force: (scores, rows) of the k best rows per query, ascending score."""
    s = scores(q, x, metric)
    rows = np.argsort(s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, rows, 1), rows


def quantize_ste(x, codebooks, temperature: float):
    """The straight-through quantizer with plain torch autograd: hard value, soft gradient."""
    import torch

    m, ksub, dsub = codebooks.shape
    xs = x.reshape(x.shape[0], m, dsub)
    d2 = ((xs[:, :, None, :] - codebooks[None]) ** 2).sum(-1)
    soft = torch.einsum("nsj,sjd->nsd", torch.softmax(-d2 / temperature, -1), codebooks)
    hard = codebooks[torch.arange(m), d2.argmin(-1)]
    return (soft + (hard - soft).detach()).reshape(x.shape)
