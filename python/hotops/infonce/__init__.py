"""Fused InfoNCE loss with in-batch and hard negatives (contrastive dense retrieval)."""

from hotops.infonce.functional import info_nce
from hotops.infonce.module import InfoNCELoss

__all__ = ["info_nce", "InfoNCELoss"]
