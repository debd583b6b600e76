"""The nn.Module wrappers of every family, in one namespace (``hotops.nn.InfoNCELoss``, ...)."""
from hotops.infonce.module import InfoNCELoss
from hotops.sparse.module import SparseConv2d, SparseLinear
from hotops.attention.module import SubsampledSelfAttention

__all__ = ["InfoNCELoss", "SparseLinear", "SparseConv2d", "SubsampledSelfAttention"]
