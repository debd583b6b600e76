"""The nn.Module wrappers of every family, in one namespace (``hotops.nn.InfoNCELoss``, ...)."""
from hotops.infonce.module import InfoNCELoss
from hotops.attention.module import SubsampledSelfAttention

__all__ = ["InfoNCELoss", "SubsampledSelfAttention"]
