"""sentence-transformers losses computed by ``hotops.info_nce``.

``MultipleNegativesRankingLoss`` and ``CachedMultipleNegativesRankingLoss`` subclass the library's
own losses, so they take the same constructor arguments and keep the same forward contract
(columns anchor, positive, negative_1..n; labels unused), ``get_config_dict``, ``citation`` and
GradCache machinery. Only the loss step changes: the library builds the B x B(1+n) score matrix
and its log-softmax; here ``hotops.info_nce`` computes the same loss and its gradients in panels,
with O(B·D) memory. As in the library, each anchor is scored against every positive *and every
row's* hard negatives (the candidates are all columns 1..n concatenated).

The fused path covers the library's defaults: ``directions=("query_to_doc",)``, any
``partition_mode`` (one direction makes them equal), no hardness weighting, and ``similarity_fct``
``util.cos_sim`` (embeddings normalised, temperature 1 / scale) or ``util.dot_score``. Any other
setting runs the library's own computation unchanged.

Extra option ``mask_duplicate_positives=True``: a candidate (another row's positive or any hard
negative) whose tokens equal the row's own positive is removed from that row's softmax, so
duplicate positives in a batch are no longer false negatives.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from sentence_transformers import util as _st_util
from torch import Tensor

try:  # sentence-transformers >= 6
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss as _LibCachedMNRL,
    )
    from sentence_transformers.sentence_transformer.losses import (
        MultipleNegativesRankingLoss as _LibMNRL,
    )
except ImportError:  # 3.x - 5.x
    from sentence_transformers.losses import (  # type: ignore[no-redef]
        CachedMultipleNegativesRankingLoss as _LibCachedMNRL,
    )
    from sentence_transformers.losses import (
        MultipleNegativesRankingLoss as _LibMNRL,
    )

import hotops

__all__ = ["CachedMultipleNegativesRankingLoss", "MultipleNegativesRankingLoss"]


def _embed(model, sentence_features: list[dict]) -> list[Tensor]:
    """The library's own column embedding (one merged forward over like-width columns in >= 6)."""
    try:
        from sentence_transformers.base.losses.merged_forward import embed_columns
    except ImportError:
        return [model(sf)["sentence_embedding"] for sf in sentence_features]
    return embed_columns(model, sentence_features)


def _fused(loss) -> bool:
    """Whether this loss's settings are the ones ``hotops.info_nce`` computes."""
    if tuple(getattr(loss, "directions", ("query_to_doc",))) != ("query_to_doc",):
        return False
    if getattr(loss, "hardness_mode", None) is not None and getattr(loss, "hardness_strength", 0.0) > 0.0:
        return False
    return loss.similarity_fct in (_st_util.cos_sim, _st_util.dot_score)


def _token_ids(sentence_features: list[dict]) -> Tensor:
    """One integer per row of columns 1..n (positive first, then the negatives, column-major):
    equal integers for equal token sequences, whatever the padding (side and width)."""
    rows = []
    for sf in sentence_features[1:]:
        if "input_ids" not in sf:
            raise ValueError(
                "mask_duplicate_positives=True compares token ids, and these features have no 'input_ids'"
            )
        ids = sf["input_ids"]
        mask = sf.get("attention_mask")
        if mask is not None:
            # each row's real tokens first, in order, then -1: left padding compares as right
            padding = mask == 0
            ids = ids.masked_fill(padding, -1).gather(1, torch.argsort(padding.byte(), dim=1, stable=True))
        rows.append(ids)
    width = max(r.shape[1] for r in rows)
    rows = torch.cat([F.pad(r, (0, width - r.shape[1]), value=-1) for r in rows])
    return torch.unique(rows, dim=0, return_inverse=True)[1]


def _duplicate_pairs(cand_ids: Tensor, B: int):
    """(rows, cols): candidate column ``col`` has the same tokens as row ``row``'s positive
    (column ``row``), col != row. Sort-based: no B x C matrix."""
    pos_ids = cand_ids[:B]
    order = torch.argsort(cand_ids, stable=True)
    srt = cand_ids[order]
    lo = torch.searchsorted(srt, pos_ids)
    cnt = torch.searchsorted(srt, pos_ids, right=True) - lo
    rows = torch.repeat_interleave(torch.arange(B, device=cand_ids.device), cnt)
    start = torch.cumsum(cnt, 0) - cnt
    cols = order[lo[rows] + torch.arange(rows.numel(), device=cand_ids.device) - start[rows]]
    keep = cols != rows
    return rows[keep], cols[keep]


def _float32(t: Tensor) -> Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _info_nce_loss(loss, queries: Tensor, docs: list[Tensor], cand_ids: Tensor | None) -> Tensor:
    """The library's query_to_doc MNRL, mean over this rank's anchors, via hotops.info_nce."""
    # The library's cos_sim / dot_score take float16 / bfloat16 embeddings in float32 (normalising
    # and scoring there); normalising in bf16 would round the unit vectors to 8 bits (loss errors
    # ~1e-3). The casts' backward hands the gradients back in the embeddings' own dtype.
    queries, docs = _float32(queries), [_float32(d) for d in docs]
    B = queries.shape[0]
    if loss.similarity_fct is _st_util.cos_sim:
        queries = F.normalize(queries, p=2, dim=1)
        docs = [F.normalize(d, p=2, dim=1) for d in docs]
    pos = docs[0]
    pool = torch.cat(docs[1:]) if len(docs) > 1 else None
    temperature = 1.0 / float(loss.scale)
    if getattr(loss, "gather_across_devices", False):  # absent before sentence-transformers 3.1
        if cand_ids is not None:
            raise ValueError("mask_duplicate_positives=True is not supported with gather_across_devices=True")
        # hotops' own gather: the library's all_gather_with_grad needs the same batch on every
        # rank (gloo aborts the process otherwise); this one takes any, 0 included, and other
        # column counts; a dimension or dtype that differs by rank raises on every rank. The
        # candidates come in another order than the library's (each rank's negative columns
        # together), which no softmax sees.
        return hotops.nn.InfoNCELoss(temperature, gather=True)(queries, pos, pool)
    pairs = _duplicate_pairs(cand_ids, B) if cand_ids is not None else None
    if pairs is None or pairs[0].numel() == 0:
        return hotops.info_nce(queries, pos, pool, temperature=temperature)
    # Remove each row's masked candidates from its softmax: with lse the full log-sum-exp,
    # lse' = lse + log(1 - sum_masked exp(l_rc - lse)); the few masked logits are dot products.
    rows, cols = pairs
    per_row = hotops.info_nce(queries, pos, pool, temperature=temperature, reduction="none")
    scale = float(loss.scale)
    cand = pos if pool is None else torch.cat([pos, pool])
    l_pos = (queries * pos).sum(1).float() * scale
    lse = per_row + l_pos
    l_masked = (queries[rows] * cand[cols]).sum(1).float() * scale
    share = torch.zeros_like(per_row).index_add(0, rows, torch.exp(l_masked - lse[rows]))
    # The kept share is at least the positive's own softmax share exp(-per_row) (never masked).
    kept = torch.maximum(1.0 - share, torch.exp(-per_row))
    return (per_row + torch.log(kept)).mean()


class MultipleNegativesRankingLoss(_LibMNRL):
    """The library's ``MultipleNegativesRankingLoss`` (same arguments, contract and config), with the
    loss and its embedding gradients computed by ``hotops.info_nce``.

    Extra keyword ``mask_duplicate_positives`` (default False): candidates whose tokens equal the
    row's positive are left out of that row's softmax (they are not negatives).
    """

    def __init__(self, model, *args, mask_duplicate_positives: bool = False, **kwargs) -> None:
        super().__init__(model, *args, **kwargs)
        self.mask_duplicate_positives = bool(mask_duplicate_positives)
        self._cand_ids: Tensor | None = None

    def forward(self, sentence_features: Iterable[dict], labels: Tensor | None = None) -> Tensor:
        sentence_features = list(sentence_features)
        if not _fused(self):
            if self.mask_duplicate_positives:
                raise ValueError(
                    "mask_duplicate_positives=True needs the fused settings (directions="
                    "('query_to_doc',), no hardness weighting, cos_sim or dot_score)"
                )
            return super().forward(sentence_features, labels)
        if len(sentence_features) < 2:
            raise ValueError(f"Expected at least 2 inputs, got {len(sentence_features)}")
        cand_ids = _token_ids(sentence_features) if self.mask_duplicate_positives else None
        embeddings = _embed(self.model, sentence_features)
        return _info_nce_loss(self, embeddings[0], list(embeddings[1:]), cand_ids)

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor | None = None) -> Tensor:
        if not _fused(self):
            if hasattr(_LibMNRL, "compute_loss_from_embeddings"):
                return super().compute_loss_from_embeddings(embeddings, labels)
            # sentence-transformers < 3.1: the library's formula, written out
            scores = self.similarity_fct(embeddings[0], torch.cat(embeddings[1:])) * self.scale
            return F.cross_entropy(scores, torch.arange(scores.shape[0], device=scores.device))
        if len(embeddings) < 2:
            raise ValueError(f"Expected at least 2 embeddings, got {len(embeddings)}")
        return _info_nce_loss(self, embeddings[0], list(embeddings[1:]), None)

    def get_config_dict(self) -> dict[str, Any]:
        cfg = super().get_config_dict()
        if self.mask_duplicate_positives:
            cfg["mask_duplicate_positives"] = True
        return cfg


class CachedMultipleNegativesRankingLoss(_LibCachedMNRL):
    """The library's ``CachedMultipleNegativesRankingLoss`` (GradCache: same arguments, mini-batched
    embedding passes, same result), with the loss step -- loss and gradients with respect to the
    cached embeddings -- computed over the whole batch by ``hotops.info_nce`` in O(B·D) memory
    instead of mini-batches of rows of the B x B(1+n) score matrix.

    Extra keyword ``mask_duplicate_positives`` as in :class:`MultipleNegativesRankingLoss`.
    """

    def __init__(self, model, *args, mask_duplicate_positives: bool = False, **kwargs) -> None:
        super().__init__(model, *args, **kwargs)
        self.mask_duplicate_positives = bool(mask_duplicate_positives)
        self._cand_ids = None

    def _settings(self):
        # >= 6 keeps the hyper-parameters on a wrapped loss; earlier versions on self
        return (
            getattr(self, "loss", None) if isinstance(getattr(self, "loss", None), torch.nn.Module) else self
        )

    def forward(self, sentence_features: Iterable[dict], labels: Tensor | None = None) -> Tensor:
        sentence_features = list(sentence_features)
        if self.mask_duplicate_positives:
            if not _fused(self._settings()):
                raise ValueError(
                    "mask_duplicate_positives=True needs the fused settings (directions="
                    "('query_to_doc',), no hardness weighting, cos_sim or dot_score)"
                )
            self._cand_ids = _token_ids(sentence_features)
        try:
            return super().forward(sentence_features, labels)
        finally:
            self._cand_ids = None

    def calculate_loss(self, reps, *args, with_backward: bool = False, **kwargs) -> Tensor:
        settings = self._settings()
        if not _fused(settings):
            return super().calculate_loss(reps, *args, with_backward=with_backward, **kwargs)
        queries = torch.cat(reps[0])
        docs = [torch.cat(r) for r in reps[1:]]
        loss = _info_nce_loss(settings, queries, docs, self._cand_ids)
        if with_backward:
            loss.backward()
            loss = loss.detach()
        return loss

    def get_config_dict(self) -> dict[str, Any]:
        cfg = super().get_config_dict()
        if self.mask_duplicate_positives:
            cfg["mask_duplicate_positives"] = True
        return cfg
