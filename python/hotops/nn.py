"""The nn.Module wrappers of every family, in one namespace (``hotops.nn.InfoNCELoss``, ...)."""
from hotops.infonce.module import InfoNCELoss
from hotops.codebook.module import CodebookLinear

__all__ = ["InfoNCELoss", "CodebookLinear"]
