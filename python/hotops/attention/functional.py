"""`subsampled_attention`: validation, subset sampling and the call of ``hotops::ssa``."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from hotops import _backend
from hotops.attention import op as _op
from hotops.attention import sampling


def _check_inputs(q, k, v, keep, mode, indices, causal, generator, key_padding_mask):
    for name, t in (("q", q), ("k", k), ("v", v)):
        _backend.check_tensor(t, name, ndim=4)
    _backend.check_same_device(q=q, k=k, v=v, indices=indices, key_padding_mask=key_padding_mask)
    _backend.check_same_dtype(q=q, k=k, v=v)
    B, H, Lq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(
            f"k and v must be (B={B}, Hkv, Lk, D={D}) to match q {tuple(q.shape)}, got {tuple(k.shape)}"
        )
    Hkv, Lk = k.shape[1], k.shape[2]
    if Hkv == 0 or H % Hkv:
        raise ValueError(
            f"the number of query heads ({H}) must be a multiple of the number of key/value heads ({Hkv})"
        )
    if not isinstance(mode, str) or mode not in sampling.MODES:
        raise ValueError(f"mode must be one of {sampling.MODES}, got {mode!r}")
    if mode == "local" and indices is None and Lq != Lk:
        raise ValueError(f"mode='local' is self-attention: it needs Lq == Lk, got {Lq} and {Lk}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__} {causal!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if indices is not None:
        if not isinstance(indices, Tensor) or indices.dtype != torch.int64:
            raise TypeError(
                f"indices must be an int64 tensor, got "
                f"{indices.dtype if isinstance(indices, Tensor) else type(indices).__name__}"
            )
        # compared one by one, not with `in`: torch.compile(dynamic=True) traces sizes symbolically
        heads = indices.shape[1] if indices.dim() == 3 else -1
        if indices.dim() != 3 or indices.shape[0] != B or (heads != H and heads != Hkv):
            raise ValueError(f"indices must be (B={B}, H={H} or Hkv={Hkv}, S), got {tuple(indices.shape)}")
        if (
            not torch.compiler.is_compiling()
            and indices.numel()
            and (int(indices.min()) < 0 or int(indices.max()) >= Lk)
        ):
            raise ValueError(
                f"indices must lie in [0, Lk={Lk}), got values in "
                f"[{int(indices.min())}, {int(indices.max())}]"
            )
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError("key_padding_mask must be a bool tensor (True = padding, ignored)")
        if tuple(key_padding_mask.shape) != (B, Lk):
            raise ValueError(
                f"key_padding_mask must be (B={B}, Lk={Lk}), got {tuple(key_padding_mask.shape)}"
            )


def _masked_positions(pos: Tensor, key_padding_mask: Optional[Tensor]) -> Optional[Tensor]:
    """pos with -1 where the key is padding; None when nothing is masked."""
    if key_padding_mask is None:
        return None
    B, Hx, S = pos.shape
    pad = key_padding_mask[:, None, :].expand(B, Hx, key_padding_mask.shape[1]).gather(2, pos.clamp(min=0))
    return pos.masked_fill(pad | (pos < 0), -1)


def _local(q, k, v, keep, causal, generator, scale, key_padding_mask):
    """Locally biased SSA: windowed attention over a locally shuffled order (see sampling.py).
    The windows become extra heads of one fused call: (B, H, nw*w, D) viewed as (B, H*nw, w, D)."""
    B, H, L, D = q.shape
    group = H // k.shape[1]
    pos, w = sampling.local_windows(B, H, L, keep, generator, q.device)
    if L == 0:
        return q.new_zeros(q.shape)
    nw = pos.shape[-1] // w
    rows = pos.clamp(min=0)[..., None].expand(-1, -1, -1, D)
    per_head = (lambda t: t) if group == 1 else (lambda t: t.repeat_interleave(group, dim=1))
    qw, kw, vw = (t.gather(2, rows).view(B, H * nw, w, D) for t in (q, per_head(k), per_head(v)))
    kpos = _masked_positions(pos, key_padding_mask)
    kpos = (kpos if kpos is not None else pos).reshape(B, H * nw, w)
    idx = torch.arange(w, device=q.device).expand(B, H * nw, w)
    out_w, _ = _op.ssa(qw, kw, vw, idx, kpos, pos.reshape(B, H * nw, w) if causal else None, scale, causal)
    inverse = pos[..., :L].argsort(dim=-1)  # the first L entries are a permutation of 0..L-1
    return out_w.view(B, H, nw * w, D).gather(2, inverse[..., None].expand(-1, -1, -1, D))


def subsampled_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    keep: float = 0.25,
    *,
    mode: str = "unbiased",
    causal: bool = False,
    indices: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    scale: Optional[float] = None,
    key_padding_mask: Optional[Tensor] = None,
) -> Tensor:
    """Stochastically subsampled attention, fused: its compute and its buffers proportional to the
    keys kept (drawing the subsets takes one random number per key and head).

    Args:
        q: (B, H, Lq, Dh); k, v: (B, Hkv, Lk, Dh) with H % Hkv == 0 (grouped-query attention).
            float32, bfloat16 or float16 (float32 accumulation).
        keep: fraction of keys each head sees, in (0, 1]; keep=1 (unbiased) is full attention.
        mode: "unbiased" -- per (batch, head) a uniform random subset of ceil(keep * Lk) keys that
            every query of the head sees (with key_padding_mask: ceil(keep * n) of the row's n real
            keys, at least one); "local" -- the paper's locally biased variant: windowed
            attention (windows of ceil(keep * L)) over a locally shuffled order (see sampling.py).
        causal: a query sees only keys whose original position is <= its own; a query that sees
            no key gets zeros.
        indices: explicit (B, H or Hkv, S) int64 key positions (overrides keep and mode).
        generator: the torch.Generator the subsets are drawn from (reproducibility).
        scale: softmax scale, default 1 / sqrt(Dh); finite, its magnitude at most float32's max.
        key_padding_mask: (B, Lk) bool, True marks padding keys that no query sees.

    Returns (B, H, Lq, Dh) in q's dtype. Differentiable in q, k and v; backward uses the same
    subsets as forward. Inside ``torch.autocast``, q, k and v are taken in autocast's dtype, as
    torch's scaled_dot_product_attention takes them.
    """
    q, k, v = (_backend.autocast_input(t) for t in (q, k, v))
    keep = _backend.check_number(keep, "keep", low=0.0, low_open=True, high=1.0)
    scale = None if scale is None else _op.check_scale(scale)
    _check_inputs(q, k, v, keep, mode, indices, causal, generator, key_padding_mask)
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if scale is None:  # (head dim 0: no scores to scale)
        scale = 1.0 / math.sqrt(D) if D > 0 else 1.0
    if indices is None and mode == "local":
        return _local(q, k, v, keep, causal, generator, scale, key_padding_mask)
    if indices is None:
        indices = (
            torch.arange(Lk, device=q.device).expand(B, Hkv, Lk)
            if keep >= 1.0
            else sampling.unbiased_indices(B, H, Lk, keep, generator, q.device, key_padding_mask)
        )
    kpos = _masked_positions(indices, key_padding_mask)
    out, _ = _op.ssa(q, k, v, indices, kpos, None, scale, causal)
    return out
