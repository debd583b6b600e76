"""How SSA picks the keys each head sees. Shared by the fused op and the reference, so both draw
exactly the same subsets from the same generator state.

* ``unbiased``: per (batch, head) a uniformly random subset of ceil(keep * Lk) key positions
  (a random permutation truncated and sorted); every query of that head sees the same subset.
  With key padding, ceil(keep * n) of the row's n real keys (at least one), so a short row in a
  padded batch sees the same share of its keys as it would alone.
* ``local`` (the paper's locally biased subsampling): per (batch, head) the token positions are
  shuffled *locally* -- each position i gets the sort key i + u * 2w with u ~ U(0, 1) and
  w = ceil(keep * L) -- and the shuffled sequence is cut into windows of w tokens; every token
  attends to the tokens of its own window (windowed attention over the shuffled order). Tokens
  close to each other are likely to share a window, far ones rarely: the attention keeps
  about keep * L keys per query, biased towards nearby keys.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

MODES = ("unbiased", "local")
# the local shuffle moves a token by up to LOCAL_SPREAD windows before the sequence is cut
LOCAL_SPREAD = 2.0


def sample_count(keep: float, L: int) -> int:
    """Keys kept out of L: ceil(keep * L), at least one when L > 0."""
    return 0 if L == 0 else min(L, max(1, math.ceil(keep * L - 1e-9)))


def unbiased_indices(
    B: int,
    heads: int,
    Lk: int,
    keep: float,
    generator: Optional[torch.Generator],
    device: torch.device,
    key_padding_mask: Optional[Tensor] = None,
) -> Tensor:
    """(B, heads, S) int64 sorted key positions, an independent uniform subset per (batch, head),
    S = sample_count(keep, Lk). With a (B, Lk) key_padding_mask (True = padding) each row's subset
    is drawn among its own real keys, sample_count(keep, real keys) of them; the slots left over
    hold a padding key, which the padding mask then hides (so a row with a real key always sees
    one). Without padding the draw is the same as with no mask."""
    S = sample_count(keep, Lk)
    noise = torch.rand(B, heads, Lk, generator=generator, device=device)
    if key_padding_mask is None:
        return noise.argsort(dim=-1)[..., :S].sort(dim=-1).values
    pad = key_padding_mask[:, None, :]
    order = noise.masked_fill(pad, 2.0).argsort(dim=-1)  # real keys first, in random order
    real = (~key_padding_mask).sum(dim=1)  # (B,)
    counts = (keep * real.double() - 1e-9).ceil().long().clamp(min=1).minimum(real)  # sample_count
    spare = torch.arange(S, device=device) >= counts[:, None, None]
    # a row with spare slots has padding, and its last key in `order` is padding
    return torch.where(spare, order[..., -1:], order[..., :S]).sort(dim=-1).values


def local_windows(
    B: int, heads: int, L: int, keep: float, generator: Optional[torch.Generator], device: torch.device
) -> Tuple[Tensor, int]:
    """Locally shuffled positions cut into windows: returns (pos, w) with pos (B, heads, nw * w)
    int64, window j = pos[..., j*w:(j+1)*w], and -1 marking the padding of the last window."""
    w = sample_count(keep, L)
    if L == 0:
        return torch.empty(B, heads, 0, dtype=torch.int64, device=device), 0
    jitter = torch.rand(B, heads, L, generator=generator, device=device) * (LOCAL_SPREAD * w)
    pos = (torch.arange(L, device=device) + jitter).argsort(dim=-1)
    pad = math.ceil(L / w) * w - L
    if pad:
        pos = torch.cat([pos, pos.new_full((B, heads, pad), -1)], dim=-1)
    return pos, w
