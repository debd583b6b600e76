"""The nn.Module wrappers of every family, in one namespace (``hotops.nn.InfoNCELoss``, ...)."""
from hotops.infonce.module import InfoNCELoss

__all__ = ["InfoNCELoss"]
