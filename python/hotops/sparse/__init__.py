"""Sparse linear and convolution for pruned networks (DASS): the packed weight, the ops, the
modules, the pruning entry point and a pruning schedule for training."""

from hotops.sparse.format import SparseWeight
from hotops.sparse.functional import sparse_conv2d, sparse_linear
from hotops.sparse.fuse import fuse
from hotops.sparse.gradual import GradualPruner
from hotops.sparse.module import SparseConv2d, SparseLinear
from hotops.sparse.sparsify import sparsify

__all__ = [
    "SparseWeight",
    "sparse_linear",
    "sparse_conv2d",
    "SparseLinear",
    "SparseConv2d",
    "sparsify",
    "fuse",
    "GradualPruner",
]
