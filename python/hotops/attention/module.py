"""SSA as modules: a self-attention layer, and a patch for Hugging Face BERT-style encoders.

Both subsample in training only. In eval they run full attention (``ensemble=1``), or average the
attention outputs of ``ensemble`` independently sampled pathways -- a per-layer, cheap form of the
paper's self-ensemble (the paper averages whole-model predictions over sampled sub-models; do that
by running a model in train mode several times and averaging).
"""

from __future__ import annotations

import types
from typing import Optional

import torch
from torch import Tensor, nn

from hotops import _backend
from hotops.attention.functional import subsampled_attention
from hotops.attention.sampling import MODES


class SubsampledSelfAttention(nn.Module):
    """Multi-head self-attention with SSA: (B, L, E) -> (B, L, E).

    Args:
        embed_dim, num_heads: as in ``nn.MultiheadAttention`` (head dim = embed_dim // num_heads).
        keep: fraction of keys each head sees in training.
        mode: "unbiased" or "local" (see ``hotops.subsampled_attention``).
        num_kv_heads: key/value heads (grouped-query attention); default num_heads.
        causal: causal self-attention.
        ensemble: eval-time pathways averaged; 1 = full attention in eval.
        generator: optional torch.Generator for the subsets.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        keep: float = 0.25,
        *,
        mode: str = "unbiased",
        num_kv_heads: Optional[int] = None,
        causal: bool = False,
        ensemble: int = 1,
        bias: bool = True,
        generator: Optional[torch.Generator] = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        embed_dim = _backend.check_number(embed_dim, "embed_dim", integer=True, low=1)
        num_heads = _backend.check_number(num_heads, "num_heads", integer=True, low=1)
        num_kv_heads = (
            num_heads
            if num_kv_heads is None
            else _backend.check_number(num_kv_heads, "num_kv_heads", integer=True, low=1)
        )
        keep = _backend.check_number(keep, "keep", low=0.0, low_open=True, high=1.0)
        ensemble = _backend.check_number(ensemble, "ensemble", integer=True, low=1)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be a multiple of num_heads ({num_heads})")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if not isinstance(mode, str) or mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        for name, flag in (("causal", causal), ("bias", bias)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__} {flag!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, embed_dim // num_heads
        self.keep, self.mode, self.causal, self.ensemble, self.generator = (
            keep,
            mode,
            causal,
            ensemble,
            generator,
        )
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.q_proj = nn.Linear(embed_dim, embed_dim, **kw)
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, **kw)
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, **kw)
        self.out_proj = nn.Linear(embed_dim, embed_dim, **kw)

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """x (B, L, E); key_padding_mask (B, L) bool, True = padding."""
        _backend.check_tensor(x, "x", ndim=3)
        B, L, E = x.shape
        if E != self.num_heads * self.head_dim:
            raise ValueError(
                f"x must be (B, L, embed_dim={self.num_heads * self.head_dim}), got {tuple(x.shape)}"
            )
        if x.dtype != self.q_proj.weight.dtype:
            raise TypeError(
                f"x has dtype {x.dtype} and the projections {self.q_proj.weight.dtype}: "
                f"convert one to the other (e.g. module.to(x.dtype))"
            )
        split = lambda t, h: t.view(B, L, h, self.head_dim).transpose(1, 2)  # noqa: E731
        q = split(self.q_proj(x), self.num_heads)
        k = split(self.k_proj(x), self.num_kv_heads)
        v = split(self.v_proj(x), self.num_kv_heads)
        out = ssa_or_full(
            q,
            k,
            v,
            self.training,
            self.keep,
            self.mode,
            self.ensemble,
            self.causal,
            key_padding_mask,
            None,
            self.generator,
        )
        return self.out_proj(out.transpose(1, 2).reshape(B, L, E))


def ssa_or_full(q, k, v, training, keep, mode, ensemble, causal, key_padding_mask, scale, generator):
    """Subsampled attention in training; full attention or the ensemble average in eval."""
    kw = dict(causal=causal, key_padding_mask=key_padding_mask, scale=scale)
    if not training and ensemble == 1:
        return subsampled_attention(q, k, v, 1.0, **kw)
    runs = 1 if training else ensemble
    out = sum(subsampled_attention(q, k, v, keep, mode=mode, generator=generator, **kw) for _ in range(runs))
    return out / runs if runs > 1 else out


# ------------------------------------------------------------------ Hugging Face BERT


def _key_padding_from(mask: Optional[Tensor], B: int, L: int) -> Optional[Tensor]:
    """The (B, L) key-padding mask behind an HF extended attention mask (bool: True = attend,
    or additive float), refusing masks that are not pure key padding (e.g. causal)."""
    if mask is None:
        return None
    if mask.dim() == 2:
        keys = mask
    else:
        if mask.dim() != 4 or not bool((mask == mask[:, :, :1, :]).all()):
            raise ValueError("patch_bert supports key-padding attention masks only (no per-query masks)")
        keys = mask[:, 0, 0, :]
    pad = ~keys.bool() if keys.dtype == torch.bool else keys < -1e4 if keys.is_floating_point() else keys == 0
    return pad.expand(B, L) if pad.any() else None


def _bert_ssa_forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None, *args, **kwargs):
    cfg = self.ssa_config
    if not self.training and cfg["ensemble"] == 1:  # eval: the model's own full attention, unchanged
        return type(self).forward(self, hidden_states, attention_mask, *args, **kwargs)
    if args or kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
        raise ValueError("patch_bert's subsampled attention does not support a KV cache")
    B, L, _ = hidden_states.shape
    split = lambda t: t.view(B, L, -1, self.attention_head_size).transpose(1, 2)  # noqa: E731
    q, k, v = (
        split(self.query(hidden_states)),
        split(self.key(hidden_states)),
        split(self.value(hidden_states)),
    )
    out = ssa_or_full(
        q,
        k,
        v,
        self.training,
        cfg["keep"],
        cfg["mode"],
        cfg["ensemble"],
        False,
        _key_padding_from(attention_mask, B, L),
        self.scaling,
        cfg["generator"],
    )
    return out.transpose(1, 2).reshape(B, L, -1), None


def patch_bert(
    model: nn.Module,
    keep: float = 0.25,
    *,
    mode: str = "unbiased",
    ensemble: int = 1,
    generator: Optional[torch.Generator] = None,
) -> nn.Module:
    """Swap the self-attention of a Hugging Face BERT-style model (BertModel, the encoder of
    sentence-transformers/all-MiniLM-L6-v2, ...) for SSA, in place; returns the model.

    Training mode subsamples (keep, mode); eval mode with ensemble=1 runs the model's own attention
    unchanged, so eval outputs are identical to the unpatched model. Parameters and state_dict
    keys are untouched. Attention-probability dropout is not applied on the subsampled path.

    For transformers < 4.51, which has no attention interface. With transformers >= 4.51 use
    ``import hotops.integrations.transformers`` and ``attn_implementation="hotops_ssa"`` instead:
    it covers any model that routes through the interface (decoders, GQA), and its settings save
    with the model's config.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_bert takes an nn.Module, got {type(model).__name__}")
    keep = _backend.check_number(keep, "keep", low=0.0, low_open=True, high=1.0)
    ensemble = _backend.check_number(ensemble, "ensemble", integer=True, low=1)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    from transformers.models.bert.modeling_bert import BertSelfAttention

    patched = 0
    for m in model.modules():
        if isinstance(m, BertSelfAttention):
            if getattr(m, "is_causal", False) or getattr(m, "is_decoder", False):
                raise ValueError("patch_bert patches encoder self-attention only (found a decoder layer)")
            m.ssa_config = dict(keep=keep, mode=mode, ensemble=ensemble, generator=generator)
            m.forward = types.MethodType(_bert_ssa_forward, m)
            patched += 1
    if not patched:
        raise ValueError("patch_bert found no BertSelfAttention module in this model")
    return model
