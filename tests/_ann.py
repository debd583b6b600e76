"""Helpers the ann suites share (test_ann.py, test_ann_files.py, test_ann_triton.py,
test_ann_quantize_ste.py, test_ann_faults.py, test_ann_file_faults.py): clustered data and small
trained indexes."""

from __future__ import annotations

import functools

import numpy as np

from hotops.ann import IVFPQIndex, PQIndex


def data(n, d, seed=0, clusters=8):
    """Clustered float32 vectors, so PQ and IVF have structure to find."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, d)) * 3
    return (centers[rng.integers(0, clusters, n)] + rng.standard_normal((n, d))).astype(np.float32)


def pq(d=16, m=4, nbits=6, metric="l2", n=600, **kw):
    x = data(n, d)
    index = PQIndex(d, m, nbits, metric, verbose=False, **kw)
    index.train(x)
    index.add(x)
    return index, x


def ivf(d=16, nlist=8, m=4, nbits=6, metric="l2", n=800, **kw):
    x = data(n, d, seed=1)
    index = IVFPQIndex(d, nlist, m, nbits, metric, verbose=False, **kw)
    index.train(x)
    index.add(x)
    return index, x


def small(kind="pq", n=300, keep_vectors=False, nbits=5, metric="l2", seed=0):
    x = data(n, 16, seed=seed)
    index = (
        PQIndex(16, 4, nbits, metric, keep_vectors=keep_vectors, verbose=False)
        if kind == "pq"
        else IVFPQIndex(16, 4, 4, nbits, metric, keep_vectors=keep_vectors, verbose=False)
    )
    index.train(x)
    index.add(x)
    return index, x


@functools.lru_cache(maxsize=None)
def shared(kind="pq"):
    """small(kind), built once for tests that only read it (or whose changes are refused)."""
    return small(kind)
