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
Only the models whose embeddings and layers this file reproduces exactly (``_VERIFIED``: BERT,
RoBERTa, XLM-RoBERTa, CamemBERT, each tested) are run; any other, decoders, cross attention and
an attention implementation other than transformers' "sdpa" or "eager" are refused with a
ValueError.
"""

from __future__ import annotations

import functools
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["check_encoder", "disable", "enable", "encoder_states", "mean_pooled"]

# The embeddings classes encoder_states reproduces exactly, each tested against its model's own
# forward, with the layer class that goes with them and how the model numbers positions:
# "columns" (BERT: the column index), "after_padding" (RoBERTa and its copies: padding_idx + 1,
# + 2, ... over the tokens that are not padding_idx; padding_idx at those). Anything else (ELECTRA
# projects its embeddings, ERNIE adds task types, ...) is refused rather than guessed at.
_VERIFIED = {
    "transformers.models.bert.modeling_bert.BertEmbeddings": ("BertLayer", "columns"),
    "transformers.models.roberta.modeling_roberta.RobertaEmbeddings": ("RobertaLayer", "after_padding"),
    "transformers.models.xlm_roberta.modeling_xlm_roberta.XLMRobertaEmbeddings": (
        "XLMRobertaLayer",
        "after_padding",
    ),
    "transformers.models.camembert.modeling_camembert.CamembertEmbeddings": (
        "CamembertLayer",
        "after_padding",
    ),
}

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


def _qualname(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def check_encoder(bert: nn.Module) -> None:
    """Raises ValueError (with the reason) unless `bert` is an encoder `encoder_states` runs."""
    config = getattr(bert, "config", None)
    emb, enc = getattr(bert, "embeddings", None), getattr(bert, "encoder", None)
    if config is None or emb is None or enc is None or not hasattr(enc, "layer"):
        raise ValueError(
            f"an unpadded forward takes a BERT-style encoder (BertModel), got {type(bert).__name__}"
        )
    verified = _VERIFIED.get(_qualname(emb))
    if verified is None:
        names = ", ".join(name.rsplit(".", 1)[1] for name in _VERIFIED)
        raise ValueError(
            f"{type(bert).__name__}'s embeddings are {type(emb).__name__}, which the unpadded forward "
            f"does not reproduce (it is verified on {names}); run the model's own forward"
        )
    layer_class = f"{type(emb).__module__}.{verified[0]}"
    for i, layer in enumerate(enc.layer):
        if _qualname(layer) != layer_class:
            raise ValueError(
                f"encoder.layer[{i}] is {type(layer).__name__}, not the {verified[0]} the unpadded "
                "forward is verified on"
            )
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


def _position_ids(emb: nn.Module, input_ids: Tensor) -> Tensor:
    """(B, L) position ids as the model's embeddings number them when given no position_ids."""
    if _VERIFIED[_qualname(emb)][1] == "columns":
        return torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape)
    # RobertaEmbeddings.create_position_ids_from_input_ids: counted over input_ids, not the mask
    real = input_ids.ne(emb.padding_idx).long()
    return real.cumsum(1) * real + emb.padding_idx


def _to_rows(t: Tensor, rows: Tensor, H: int) -> Tensor:
    """Packed (T, H d) -> (B, H, L, d) with zeros outside `rows`."""
    out = t.new_zeros(*rows.shape, t.shape[-1])
    out[rows] = t
    return out.view(*rows.shape, H, -1).transpose(1, 2)


def _layer(layer: nn.Module, x: Tensor, rows: Tensor, keys: Tensor) -> Tensor:
    """One BERT layer on the packed tokens `rows`; attention sees the keys `keys` (B, 1, 1, L)."""
    sa = layer.attention.self
    H = sa.num_attention_heads
    context = F.scaled_dot_product_attention(
        _to_rows(sa.query(x), rows, H),
        _to_rows(sa.key(x), rows, H),
        _to_rows(sa.value(x), rows, H),
        attn_mask=keys,
        dropout_p=sa.dropout.p if sa.training else 0.0,
        scale=getattr(sa, "scaling", None),
    )
    context = context.transpose(1, 2).reshape(*rows.shape, -1)[rows]
    x = layer.attention.output(context, x)
    return layer.output(layer.intermediate(x), x)


def _states(bert: nn.Module, input_ids: Tensor, keep: Tensor, token_type_ids, rows: Tensor) -> Tensor:
    """Last states (T, hidden) of the tokens `rows` (a superset of the real tokens `keep`), each
    computed as the padded forward computes it: attending to the real tokens only."""
    emb = bert.embeddings
    numbered = _position_ids(emb, input_ids)
    # columns: the shape says it (no device sync); RoBERTa's numbering depends on the ids
    by_columns = _VERIFIED[_qualname(emb)][1] == "columns"
    last = input_ids.shape[1] - 1 if by_columns else int(numbered.max())
    if last >= emb.position_embeddings.num_embeddings:
        raise ValueError(
            f"position {last} is past the model's {emb.position_embeddings.num_embeddings} position "
            "embeddings (truncate with the tokenizer's max_length)"
        )
    positions = numbered[rows]
    types = torch.zeros_like(positions) if token_type_ids is None else token_type_ids[rows]
    x = (
        emb.word_embeddings(input_ids[rows])
        + emb.token_type_embeddings(types)
        + emb.position_embeddings(positions)
    )
    x = emb.dropout(emb.LayerNorm(x))
    keys = keep[:, None, None, :]  # (B, 1, 1, L): every query row sees its own real tokens
    for layer in bert.encoder.layer:
        run = functools.partial(_layer, layer, rows=rows, keys=keys)
        # as transformers' GradientCheckpointingLayer decides (its function, its settings)
        if getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled():
            x = layer._gradient_checkpointing_func(run, x)
        else:
            x = run(x)
    return x


def _checked_keep(bert: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    check_encoder(bert)
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids and attention_mask must both be (batch, length), got {tuple(input_ids.shape)} "
            f"and {tuple(attention_mask.shape)}"
        )
    keep = attention_mask.to(torch.bool)
    if not keep.any(1).all():
        raise ValueError("every row of the batch needs at least one real token (attention_mask all zero)")
    return keep


def encoder_states(
    bert: nn.Module, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Optional[Tensor] = None
) -> Tensor:
    """The last hidden states (T, hidden) of the real tokens (attention_mask != 0, in row-major
    order: ``last_hidden_state[attention_mask.bool()]``) of `bert` on a padded (B, L) batch.
    Positions are numbered as the model's own forward numbers them. Every row needs at least one
    real token."""
    keep = _checked_keep(bert, input_ids, attention_mask)
    return _states(bert, input_ids, keep, token_type_ids, keep)


def mean_pooled(bert: nn.Module, batch: Dict[str, Tensor]) -> Tensor:
    """L2-normalised mean of the real tokens' last states per text (all-MiniLM-L6-v2's pooling),
    from ``encoder_states``: equal to ``hotops.retrieval.mean_pooled`` on the padded forward up
    to float rounding."""
    mask = batch["attention_mask"]
    states = encoder_states(bert, batch["input_ids"], mask, batch.get("token_type_ids"))
    rows = torch.arange(mask.shape[0], device=states.device).repeat_interleave(mask.to(torch.bool).sum(1))
    sums = states.new_zeros(mask.shape[0], states.shape[1]).index_add(0, rows, states)
    return F.normalize(sums / mask.to(torch.bool).sum(1, keepdim=True).to(states.dtype), dim=-1)


# Arguments that change what the model's forward computes or returns: a call setting one runs
# that forward (output_hidden_states and output_attentions also when the config sets them, as
# the model's forward reads them from there). Any other keyword is ignored, as the model's
# forward ignores it (sentence-transformers passes back the feature dicts its modules wrote
# into: token_embeddings, sentence_embedding).
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


def _asks_model_forward(config, kwargs) -> bool:
    for name in _MODEL_FORWARD_ONLY:
        value = kwargs.get(name, getattr(config, name, None) if name.startswith("output_") else None)
        if value is not None and value is not False:
            return True
    return False


def _forward(model, input_ids=None, attention_mask=None, token_type_ids=None, *args, **kwargs):
    """The model's forward through ``encoder_states``. A call with more positional arguments
    (position_ids, inputs_embeds, ... in the model's own order) or asking for what only the
    model's forward gives (``_MODEL_FORWARD_ONLY``) runs that forward unchanged."""
    if args or input_ids is None or attention_mask is None or _asks_model_forward(model.config, kwargs):
        return type(model).forward(model, input_ids, attention_mask, token_type_ids, *args, **kwargs)
    from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

    keep = _checked_keep(model, input_ids, attention_mask)
    pooler = getattr(model, "pooler", None)
    rows = keep
    if pooler is not None:
        # the pooler reads column 0, padding in a left-padded row: compute it as the model does
        # (right-padded rows hold a real token there already; no device sync to find out)
        rows = keep.clone()
        rows[:, 0] = True
    states = _states(model, input_ids, keep, token_type_ids, rows)
    padded = states.new_zeros(*keep.shape, states.shape[-1])
    padded[rows] = states
    out = BaseModelOutputWithPoolingAndCrossAttentions(
        last_hidden_state=padded, pooler_output=None if pooler is None else pooler(padded)
    )
    # as transformers' own forward: the argument, else the config's return_dict
    return_dict = kwargs.get("return_dict", getattr(model.config, "return_dict", True))
    return out.to_tuple() if return_dict is False else out


def enable(bert: nn.Module) -> nn.Module:
    """Make `bert`'s own forward run on the real tokens only (in place; returns `bert`).
    ``last_hidden_state`` holds zeros at the padded positions (the padded forward leaves values
    there that every pooling masks out), except at column 0 of left-padded rows when the model
    has a pooler: the pooler reads that position, so it is computed as the model computes it.
    The forward is ``functools.partial(_forward, bert)``, an instance attribute: ``copy.deepcopy``
    binds the copy's forward to the copy, and an unpickled model (``torch.load``,
    sentence-transformers' multi-process pool) runs unpadded too."""
    check_encoder(bert)
    bert.forward = functools.partial(_forward, bert)
    return bert


def disable(bert: nn.Module) -> nn.Module:
    """Undo ``enable``: the model's class forward again (in place; returns `bert`)."""
    forward = bert.__dict__.get("forward")
    if isinstance(forward, functools.partial) and forward.func is _forward:
        del bert.forward
    return bert
