"""``attn_implementation="hotops_ssa"`` for Hugging Face transformers (>= 4.51, the attention interface).

Importing this module registers

* ``"hotops_ssa"`` with ``transformers.AttentionInterface``: subsampled attention
  (``hotops.subsampled_attention``) while the module is training; in eval mode the model's
  attention is transformers' own SDPA path, unchanged (or, with ``hotops_ssa_ensemble = n > 1``,
  the average of n subsampled attentions per layer);
* its mask function with ``transformers.masking_utils.AttentionMaskInterface``: transformers'
  SDPA mask (a boolean ``(B, 1, Lq, Lk)`` mask, or None when ``is_causal`` / no padding suffice).
  Without a registered mask function transformers would pass ``attention_mask=None`` and padding
  would be silently ignored.

So ``AutoModel.from_pretrained(path, attn_implementation="hotops_ssa")`` (or
``model.set_attn_implementation("hotops_ssa")``) works for encoders (BERT, MiniLM, ...) and
decoders (Llama, Qwen2, ...; causal, grouped-query attention).

Per-model settings are config attributes, so they save and load with the model
(``save_pretrained`` writes them to config.json); set them with :func:`configure` or directly:

* ``hotops_ssa_keep`` (real number in (0, 1], default 0.25): the fraction of a row's real keys each
  head sees in training;
* ``hotops_ssa_mode`` ("unbiased" or "local", default "unbiased"): how keys are drawn (see
  ``hotops.subsampled_attention``);
* ``hotops_ssa_ensemble`` (int >= 1, default 1): eval mode averages this many subsampled
  attentions per layer; 1 means full (SDPA) attention in eval.

In training the mask must be key padding, optionally with causal order (what transformers builds
for encoders and decoders on padded batches); causality is read from the mask, and without one
from ``is_causal`` (a module without the attribute is causal only when its config is a decoder).
``configure`` refuses a model whose attention does not call the attention interface (MPNet,
DeBERTa-v2: "hotops_ssa" would never run there). Masks of any other pattern (sliding windows,
packed sequences, chunked attention, attention bias), softcapping, and a KV cache in training (in
eval with ``hotops_ssa_ensemble > 1``, a static cache or a continuation of several tokens; one-token
decode steps run) are refused with a ValueError. A ``sliding_window``
argument (Mistral passes one on every call) is accepted while the window covers every key
(at most ``sliding_window`` keys: the mask is then plain causal), refused beyond. The subsampled path applies no attention-probability dropout: the
subsampling is the regulariser.
"""

from __future__ import annotations

import numbers
import warnings

import torch
from torch import Tensor
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from hotops.attention import sampling as _sampling
from hotops.attention import subsampled_attention

__all__ = ["DEFAULTS", "NAME", "configure", "hotops_ssa_attention", "hotops_ssa_mask"]

NAME = "hotops_ssa"
DEFAULTS = {"hotops_ssa_keep": 0.25, "hotops_ssa_mode": "unbiased", "hotops_ssa_ensemble": 1}


def _check(keep, mode, ensemble):
    if isinstance(keep, bool) or not (isinstance(keep, numbers.Real) and 0.0 < float(keep) <= 1.0):
        raise ValueError(f"hotops_ssa_keep must be a fraction in (0, 1], got {keep!r}")
    if mode not in _sampling.MODES:
        raise ValueError(f"hotops_ssa_mode must be one of {_sampling.MODES}, got {mode!r}")
    if isinstance(ensemble, bool) or not isinstance(ensemble, numbers.Integral) or ensemble < 1:
        raise ValueError(f"hotops_ssa_ensemble must be an integer >= 1, got {ensemble!r}")


def _check_reaches(model) -> None:
    """Refuse a model whose attention does not call transformers' attention interface (MPNet,
    DeBERTa-v2, ...): "hotops_ssa" would never run there, and transformers only logs that."""
    from transformers import PreTrainedModel

    for m in model.modules():
        can_set = getattr(type(m), "_can_set_attn_implementation", None)  # transformers' own test
        if isinstance(m, PreTrainedModel) and can_set is not None and not can_set():
            raise ValueError(
                f"{type(m).__name__}'s attention does not go through transformers' attention "
                "interface, so hotops_ssa would never run in it; use a model whose attention does "
                "(BERT, RoBERTa, DistilBERT, Llama, ...), or hotops.subsampled_attention directly"
            )


def configure(model, keep: float | None = None, mode: str | None = None, ensemble: int | None = None):
    """Set the SSA settings on ``model.config`` and on every sub-module's config (composite
    models); the arguments left None keep their current value (or the default). Returns the model.
    They are plain config attributes, so ``save_pretrained`` stores them. A model whose attention
    does not go through transformers' attention interface is refused (ValueError)."""
    _check_reaches(model)
    configs = {
        id(c): c
        for c in [getattr(model, "config", None)] + [getattr(m, "config", None) for m in model.modules()]
        if c is not None and hasattr(c, "to_dict")
    }
    for cfg in configs.values():
        k = keep if keep is not None else getattr(cfg, "hotops_ssa_keep", DEFAULTS["hotops_ssa_keep"])
        md = mode if mode is not None else getattr(cfg, "hotops_ssa_mode", DEFAULTS["hotops_ssa_mode"])
        e = (
            ensemble
            if ensemble is not None
            else getattr(cfg, "hotops_ssa_ensemble", DEFAULTS["hotops_ssa_ensemble"])
        )
        _check(k, md, e)
        cfg.hotops_ssa_keep, cfg.hotops_ssa_mode, cfg.hotops_ssa_ensemble = float(k), md, int(e)
    used = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if used is not None and used != NAME:
        # legitimate before set_attn_implementation, but a model trained as it is would never
        # subsample: said once here, where transformers would say nothing
        warnings.warn(
            f"the SSA settings are stored, but the model's attention implementation is {used!r}: "
            f'set_attn_implementation("{NAME}") (or load it with attn_implementation="{NAME}") '
            "for them to take effect",
            UserWarning,
            stacklevel=2,
        )
    return model


def _settings(module):
    cfg = getattr(module, "config", None)
    keep, mode, ensemble = (getattr(cfg, name, default) for name, default in DEFAULTS.items())
    _check(keep, mode, ensemble)
    return float(keep), mode, int(ensemble)


def _declared_causal(module, is_causal: bool | None) -> bool:
    """Causality when transformers passes no mask: the call's is_causal, else the module's; a
    module without the attribute (Splinter, LayoutLM: bidirectional BERT copies) is causal only
    when its config is a decoder."""
    if is_causal is not None:
        return bool(is_causal)
    if hasattr(module, "is_causal"):
        return bool(module.is_causal)
    return bool(getattr(getattr(module, "config", None), "is_decoder", False))


def _mask_pattern(mask: Tensor, B: int, Lq: int, Lk: int) -> tuple[bool, Tensor | None]:
    """(causal, (B, Lk) key-padding mask or None; True = padding) behind a transformers attention
    mask, read from the mask itself as SDPA reads it: key padding, or key padding with causal
    order (bottom-right aligned). Anything else is refused."""
    if mask.dim() != 4:
        raise ValueError(f"hotops_ssa expects a 4-D attention mask, got shape {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        allowed = mask
    else:  # additive float mask: 0 = attend, very negative = masked
        allowed = mask == 0
        if bool(((mask != 0) & (mask > -1e4)).any()):
            raise ValueError("hotops_ssa supports masking masks only, not an additive attention bias")
    allowed = allowed[..., -Lq:, -Lk:].expand(B, allowed.shape[1], Lq, Lk)
    seen = allowed[:, :1].any(dim=2)  # (B, 1, Lk): keys some query may see
    padding = seen[:, :, None, :]
    pad = ~seen[:, 0]
    pad = pad if bool(pad.any()) else None
    if bool((allowed == padding).all()):
        return False, pad
    order = torch.ones(Lq, Lk, dtype=torch.bool, device=mask.device).tril(Lk - Lq)
    if bool((allowed == (padding & order)).all()):
        return True, pad
    raise ValueError(
        "hotops_ssa's subsampled attention supports key-padding masks, with or without causal "
        "order; this mask is neither (sliding window, packed sequences, chunks, ...)"
    )


def _kv_cache_refusal(module, ensemble: int, Lq: int, Lk: int) -> str:
    """Why fewer queries than keys (a KV cache) are refused: in training, or in eval because of
    the ensemble (eval with ensemble 1 runs SDPA and never gets here)."""
    if module.training:
        return (
            "hotops_ssa's subsampled attention runs on whole sequences: causal attention with "
            f"{Lq} queries over {Lk} keys (a KV cache) is not supported in training mode"
        )
    return (
        f"hotops_ssa_ensemble = {ensemble} (> 1) averages subsampled attentions over whole "
        f"sequences and does not support a KV cache beyond one-token steps: {Lq} queries over {Lk} "
        "keys (a static cache, or a continuation of several tokens on past_key_values); set hotops_ssa_ensemble=1 (eval then "
        "runs SDPA, KV cache included) or call without a cache (use_cache=False, the whole "
        "sequence at once)"
    )


def _check_sliding_window(window, Lk: int) -> None:
    """A sliding window (Mistral passes config.sliding_window, default 4096, on every call) is
    plain causal attention while it covers every key a query may see: query i sees keys
    i - window + 1 .. i (transformers' sliding_window_overlay), so all its causal keys whenever
    there are at most `window` keys. Longer sequences would need the window, which the subsampled
    attention does not draw from: refused."""
    if window is None or Lk <= int(window):
        return
    raise ValueError(
        f"hotops_ssa's subsampled attention does not support a sliding window shorter than the "
        f"sequence: sliding_window = {int(window)} with {Lk} keys; use sequences of at most "
        f"{int(window)} tokens, or set config.sliding_window = None (full causal attention) before "
        "building the model"
    )


def hotops_ssa_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
):
    """The ``AttentionInterface`` function: query (B, H, Lq, Dh), key/value (B, Hkv, Lk, Dh);
    returns ((B, Lq, H, Dh), None) like transformers' own attention functions."""
    keep, mode, ensemble = _settings(module)
    if not module.training and ensemble == 1:
        # SDPA itself takes a module without is_causal as causal when there is no mask
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=_declared_causal(module, is_causal),
            **kwargs,
        )
    for name in ("softcap", "position_bias", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(f"hotops_ssa's subsampled attention does not support {name}")
    if kwargs.get("output_attentions"):
        raise ValueError("hotops_ssa's subsampled attention cannot return attention weights")
    B, _, Lq, _ = query.shape
    Lk = key.shape[2]
    _check_sliding_window(kwargs.get("sliding_window"), Lk)
    if attention_mask is None:
        causal, pad = _declared_causal(module, is_causal), None
    else:
        try:
            causal, pad = _mask_pattern(attention_mask, B, Lq, Lk)
        except ValueError as exc:
            if Lq < Lk:  # e.g. a static cache's mask: causal over the first keys, the rest unused
                raise ValueError(f"{_kv_cache_refusal(module, ensemble, Lq, Lk)} ({exc})") from None
            raise
    causal = causal and Lq > 1
    if causal and Lq != Lk:
        raise ValueError(_kv_cache_refusal(module, ensemble, Lq, Lk))
    runs = 1 if module.training else ensemble
    out = sum(
        subsampled_attention(
            query, key, value, keep, mode=mode, causal=causal, scale=scaling, key_padding_mask=pad
        )
        for _ in range(runs)
    )
    if runs > 1:
        out = out / runs
    return out.transpose(1, 2).contiguous(), None


def hotops_ssa_mask(*args, **kwargs):
    """The mask function registered for ``"hotops_ssa"``: transformers' SDPA mask, so that eval
    mode gets exactly what ``attn_implementation="sdpa"`` gets."""
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(NAME, hotops_ssa_attention)
AttentionMaskInterface.register(NAME, hotops_ssa_mask)
