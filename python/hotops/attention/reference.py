"""Plain-torch definition of subsampled attention: the kernels are tested against this.

``attention_on_indices`` is scaled-dot-product attention (``F.scaled_dot_product_attention``) on
the gathered keys and values, with the visibility rule of csrc/attention/cpu.h; queries that see
no key give zeros. ``subsampled_attention`` draws the subsets exactly as the fused op does.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from hotops.attention import sampling


def _per_query_head(t: Tensor, H: int) -> Tensor:
    """(B, Hx, ...) indexed by KV head -> (B, H, ...) indexed by query head."""
    return t if t.shape[1] == H else t.repeat_interleave(H // t.shape[1], dim=1)


def attention_on_indices(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    idx: Tensor,
    kpos: Optional[Tensor] = None,
    qpos: Optional[Tensor] = None,
    causal: bool = False,
    scale: Optional[float] = None,
) -> Tensor:
    B, H, Lq, D = q.shape
    idx_h = _per_query_head(idx, H)
    rows = idx_h[..., None].expand(-1, -1, -1, D)
    kg = _per_query_head(k, H).gather(2, rows)
    vg = _per_query_head(v, H).gather(2, rows)
    kp = _per_query_head(kpos if kpos is not None else idx, H)[:, :, None, :]  # (B, H, 1, S)
    qp = (qpos if qpos is not None else torch.arange(Lq, device=q.device).expand(B, H, Lq))[..., None]
    visible = (kp >= 0) & ((kp <= qp) if causal else True)
    seen = visible.any(dim=-1, keepdim=True)
    # rows that see nothing attend to everything (finite, no NaN) and are zeroed afterwards
    out = F.scaled_dot_product_attention(q, kg, vg, attn_mask=visible | ~seen, scale=scale)
    return out.masked_fill(~seen, 0.0)  # zeros, even where q holds NaN (no product ever used it)


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
    """Same contract as ``hotops.subsampled_attention``, in plain torch (materialises the gathered
    keys and the scores)."""
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if mode == "local" and indices is None:
        pos, w = sampling.local_windows(B, H, Lq, keep, generator, q.device)
        out = torch.zeros_like(q)
        for j in range(0, pos.shape[-1], max(w, 1)):  # one window at a time, as SDPA on its tokens
            win = pos[..., j : j + w]
            src = win.clamp(min=0)
            hidden = win < 0
            if key_padding_mask is not None:
                hidden = hidden | key_padding_mask[:, None, :].expand(B, H, Lk).gather(2, src)
            kpos = win.masked_fill(hidden, -1)
            qw = q.gather(2, src[..., None].expand(-1, -1, -1, D))
            ow = attention_on_indices(
                qw,
                _per_query_head(k, H),
                _per_query_head(v, H),
                src,
                kpos,
                win if causal else None,
                causal,
                scale,
            )
            out = _place(out, win, ow)
        return out
    if indices is None:
        indices = (
            torch.arange(Lk, device=q.device).expand(B, Hkv, Lk)
            if keep >= 1.0
            else sampling.unbiased_indices(B, H, Lk, keep, generator, q.device, key_padding_mask)
        )
    kpos = None
    if key_padding_mask is not None:
        pad = key_padding_mask[:, None, :].expand(B, indices.shape[1], Lk).gather(2, indices)
        kpos = indices.masked_fill(pad, -1)
    return attention_on_indices(q, k, v, indices, kpos, None, causal, scale)


def _place(out: Tensor, win: Tensor, ow: Tensor) -> Tensor:
    """out with the rows at positions win (>= 0) replaced by ow's rows (differentiable)."""
    D = out.shape[-1]
    valid = win >= 0
    src = torch.where(valid, win, out.shape[2])  # padding rows go to a spill row, then dropped
    spill = torch.cat([out, out.new_zeros(out.shape[0], out.shape[1], 1, D)], dim=2)
    return spill.scatter(2, src[..., None].expand(-1, -1, -1, D), ow)[:, :, :-1]
