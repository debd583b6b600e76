"""The nn.Module wrappers of every family, in one namespace (``hotops.nn.InfoNCELoss``, ...)."""

from hotops.attention.module import SubsampledSelfAttention
from hotops.codebook.module import CodebookLinear
from hotops.infonce.module import InfoNCELoss
from hotops.sparse.module import SparseConv2d, SparseLinear

__all__ = ["InfoNCELoss", "CodebookLinear", "SparseLinear", "SparseConv2d", "SubsampledSelfAttention"]
