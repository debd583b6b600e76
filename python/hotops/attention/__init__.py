"""Stochastically subsampled self-attention (SSA, "The Information Pathways Hypothesis:
Transformers are Dynamic Self-Ensembles"): each head attends to a random subset of the keys, at a
cost proportional to the subset, as one fused kernel (never a mask on full attention)."""

from hotops.attention.functional import subsampled_attention
from hotops.attention.module import SubsampledSelfAttention, patch_bert

__all__ = ["subsampled_attention", "SubsampledSelfAttention", "patch_bert"]
