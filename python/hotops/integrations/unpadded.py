"""A BERT-family encoder (Hugging Face ``BertModel`` and its kin: MiniLM, all-MiniLM-L6-v2, ...)
run on its real tokens only.

A padded batch of short texts is mostly padding: WordNet's usage examples average 9 tokens, and
16 of them padded to the longest hold about twice that, so the Linears, which are nearly all of
an encoder's work, spend half their multiply-adds on positions the mask then throws away.
``encoder_states`` gathers the real tokens into one (T, hidden) matrix, runs every Linear,
LayerNorm, activation and dropout of the model's own modules on it, and scatters the tokens
back into (batch, length) rows only for the attention product itself (``F.scaled_dot_product_attention``
with the key-padding mask: at a few dozen tokens a small share of the work). The result equals
``bert(...).last_hidden_state[attention_mask]`` up to float rounding, in training mode as well
(the same dropouts with the same rates), and autograd runs through it. Replaced Linears
(``SparseLinear``, ``CodebookLinear``) run on the packed tokens as they are.

``enable(bert)`` makes the model's own call (``bert(input_ids, attention_mask, ...)``, and so
sentence-transformers' ``SentenceTransformer`` and its losses, which call it) run this way and
return the usual output with zeros at the padded positions; ``disable(bert)`` undoes it.

The model's modules are called, not copied: training the model trains what this forward runs.
Models whose layers are not BERT's (pre-LayerNorm, rotary or relative positions, decoders, cross
attention) and an attention implementation other than transformers' "sdpa" or "eager" are
refused with a ValueError.
"""

from __future__ import annotations

import types
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["check_encoder", "disable", "enable", "encoder_states", "mean_pooled"]

_LAYER_PARTS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.self.dropout",
    "attention.output.dense",
    "attention.output.LayerNorm",
    "intermediate",
    "output.dense",
    "output.LayerNorm",
)


def check_encoder(bert: nn.Module) -> None:
    """Raises ValueError (with the reason) unless `bert` is an encoder `encoder_states` runs."""
    config = getattr(bert, "config", None)
    emb, enc = getattr(bert, "embeddings", None), getattr(bert, "encoder", None)
    if config is None or emb is None or enc is None or not hasattr(enc, "layer"):
        raise ValueError(
            f"an unpadded forward takes a BERT-style encoder (BertModel), got {type(bert).__name__}"
        )
    for part in ("word_embeddings", "position_embeddings", "token_type_embeddings", "LayerNorm", "dropout"):
        if not hasattr(emb, part):
            raise ValueError(f"{type(bert).__name__}.embeddings has no {part}: not a BERT-style encoder")
    for i, layer in enumerate(enc.layer):
        for part in _LAYER_PARTS:
            try:
                layer.get_submodule(part)
            except AttributeError:
                raise ValueError(f"encoder.layer[{i}] has no {part}: not a BERT-style layer") from None
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise ValueError(
            "an unpadded forward is for encoders: this config is a decoder or has cross attention"
        )
    positions = getattr(config, "position_embedding_type", "absolute")
    if positions != "absolute":
        raise ValueError(f"an unpadded forward supports absolute positions only, not {positions!r}")
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in (None, "sdpa", "eager"):
        raise ValueError(
            f"the model's attention is {implementation!r}; the unpadded forward computes full softmax "
            "attention, which only 'sdpa' and 'eager' do"
        )


def encoder_states(
    bert: nn.Module, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Optional[Tensor] = None
) -> Tensor:
    """The last hidden states (T, hidden) of the real tokens (attention_mask != 0, in row-major
    order: ``last_hidden_state[attention_mask.bool()]``) of `bert` on a padded (B, L) batch.
    Positions are the columns, as the model's own forward numbers them. Every row needs at
    least one real token."""
    check_encoder(bert)
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids and attention_mask must both be (batch, length), got {tuple(input_ids.shape)} "
            f"and {tuple(attention_mask.shape)}"
        )
    keep = attention_mask.to(torch.bool)
    if not keep.any(1).all():
        raise ValueError("every row of the batch needs at least one real token (attention_mask all zero)")
    B, L = keep.shape
    emb = bert.embeddings
    if L > emb.position_embeddings.num_embeddings:
        raise ValueError(
            f"{L} tokens per row exceed the model's {emb.position_embeddings.num_embeddings} positions "
            "(truncate with the tokenizer's max_length)"
        )
    positions = torch.arange(L, device=input_ids.device).expand(B, L)[keep]
    types = torch.zeros_like(positions) if token_type_ids is None else token_type_ids[keep]
    x = (
        emb.word_embeddings(input_ids[keep])
        + emb.token_type_embeddings(types)
        + emb.position_embeddings(positions)
    )
    x = emb.dropout(emb.LayerNorm(x))
    key_padding = keep[:, None, None, :]  # (B, 1, 1, L): every query row sees its own real tokens

    def heads(t: Tensor, H: int) -> Tensor:  # packed (T, H d) -> (B, H, L, d), zeros at padding
        rows = t.new_zeros(B, L, t.shape[-1])
        rows[keep] = t
        return rows.view(B, L, H, -1).transpose(1, 2)

    for layer in bert.encoder.layer:
        sa = layer.attention.self
        H = sa.num_attention_heads
        context = F.scaled_dot_product_attention(
            heads(sa.query(x), H),
            heads(sa.key(x), H),
            heads(sa.value(x), H),
            attn_mask=key_padding,
            dropout_p=sa.dropout.p if sa.training else 0.0,
            scale=getattr(sa, "scaling", None),
        )
        context = context.transpose(1, 2).reshape(B, L, -1)[keep]
        x = layer.attention.output(context, x)
        x = layer.output(layer.intermediate(x), x)
    return x


def mean_pooled(bert: nn.Module, batch: Dict[str, Tensor]) -> Tensor:
    """L2-normalised mean of the real tokens' last states per text (all-MiniLM-L6-v2's pooling),
    from ``encoder_states``: equal to ``hotops.retrieval.mean_pooled`` on the padded forward up
    to float rounding."""
    mask = batch["attention_mask"]
    states = encoder_states(bert, batch["input_ids"], mask, batch.get("token_type_ids"))
    rows = torch.arange(mask.shape[0], device=states.device).repeat_interleave(mask.to(torch.bool).sum(1))
    sums = states.new_zeros(mask.shape[0], states.shape[1]).index_add(0, rows, states)
    return F.normalize(sums / mask.to(torch.bool).sum(1, keepdim=True).to(states.dtype), dim=-1)


# Arguments that change what BertModel.forward computes or returns: a call setting one runs that
# forward. Any other keyword is ignored, as the model's forward ignores it (sentence-transformers
# passes back the feature dicts its modules wrote into: token_embeddings, sentence_embedding).
_MODEL_FORWARD_ONLY = (
    "position_ids",
    "inputs_embeds",
    "head_mask",
    "encoder_hidden_states",
    "encoder_attention_mask",
    "cache",
    "past_key_values",
    "use_cache",
    "output_hidden_states",
    "output_attentions",
)


def _forward(self, input_ids=None, attention_mask=None, token_type_ids=None, return_dict=None, **kwargs):
    """BertModel.forward through ``encoder_states``; a call asking for what only the model's own
    forward gives (``_MODEL_FORWARD_ONLY``: inputs_embeds, position_ids, hidden states or
    attentions of every layer, a cache) runs that forward unchanged."""
    if (
        input_ids is None
        or attention_mask is None
        or any(kwargs.get(k) is not None and kwargs.get(k) is not False for k in _MODEL_FORWARD_ONLY)
    ):
        if return_dict is not None:
            kwargs["return_dict"] = return_dict
        return type(self).forward(
            self, input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, **kwargs
        )
    from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

    keep = attention_mask.to(torch.bool)
    states = encoder_states(self, input_ids, attention_mask, token_type_ids)
    padded = states.new_zeros(*keep.shape, states.shape[-1])
    padded[keep] = states
    pooled = self.pooler(padded) if getattr(self, "pooler", None) is not None else None
    if return_dict is False:
        return (padded, pooled)
    return BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state=padded, pooler_output=pooled)


def enable(bert: nn.Module) -> nn.Module:
    """Make `bert`'s own forward run on the real tokens only (in place; returns `bert`).
    ``last_hidden_state`` holds zeros at the padded positions (the padded forward leaves values
    there that every pooling masks out). A bound method, so ``copy.deepcopy`` binds the copy's
    forward to the copy; the instance attribute does not survive pickling the whole module
    (``torch.save(model)``): save the state_dict, or ``disable`` first."""
    check_encoder(bert)
    bert.forward = types.MethodType(_forward, bert)
    return bert


def disable(bert: nn.Module) -> nn.Module:
    """Undo ``enable``: the model's class forward again (in place; returns `bert`)."""
    if isinstance(bert.__dict__.get("forward"), types.MethodType) and bert.forward.__func__ is _forward:
        del bert.forward
    return bert
