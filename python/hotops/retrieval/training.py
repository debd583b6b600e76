"""Contrastive fine-tuning of a sentence-transformers bi-encoder on (query, document) pairs, with
in-batch negatives and optional mined hard negatives, the loss computed by ``hotops.info_nce`` or,
for comparison, by sentence-transformers' own MultipleNegativesRankingLoss.

sentence-transformers is imported only for the 'mnrl' loss; the model only needs to be indexable
like a SentenceTransformer: ``model[0].auto_model`` a BERT-style encoder (mean pooled, as
all-MiniLM-L6-v2), ``model.tokenizer`` its tokenizer.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from hotops._backend import check_number
from hotops.infonce import info_nce
from hotops.integrations import unpadded as _unpadded
from hotops.retrieval import _check_vocabulary, mean_pooled, tokenize

__all__ = ["ContrastiveTrainer", "batch_schedule", "contrastive_loss", "encoder_calls", "LOSSES"]

LOSSES = ("info_nce", "mnrl")
HF_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def batch_schedule(order: torch.Tensor, steps: int, batch: int) -> List[torch.Tensor]:
    """`steps` batches of `batch` query indices taken in turn from `order` (a permutation),
    wrapping around; a batch the end of `order` would cut short is order's first batch."""
    if len(torch.unique(torch.as_tensor(order))) != len(order):
        raise ValueError("batch_schedule: order repeats a query (it must be a permutation)")
    if batch < 1 or steps < 0 or len(order) < batch:
        raise ValueError(
            f"batch_schedule needs 1 <= batch <= len(order) and steps >= 0, got batch {batch}, "
            f"len(order) {len(order)}, steps {steps}"
        )
    schedule = [order[(s * batch) % len(order) :][:batch] for s in range(steps)]
    return [s if len(s) == batch else order[:batch] for s in schedule]


def contrastive_loss(
    emb: Sequence[torch.Tensor],
    temperature: float,
    teacher: Optional[Sequence[torch.Tensor]] = None,
    distill: float = 0.0,
) -> torch.Tensor:
    """emb: [queries (B, D), their documents (B, D), then any number of negative columns (B, D)].
    hotops.info_nce of each query against the batch's documents and every negative of the batch
    (one shared pool: MNRL's loss at scale 1 / temperature). With `teacher` (the same columns
    embedded by a teacher model) and distill > 0, adds distill x (the KL divergence from the
    teacher's to the student's query-candidate score distribution, plus the mean 1 - cosine
    between the two models' embeddings of every text)."""
    loss = info_nce(emb[0], emb[1], torch.cat(emb[2:]) if len(emb) > 2 else None, temperature=temperature)
    if teacher is not None and distill > 0:
        pool, tpool = torch.cat(emb[1:]), torch.cat(teacher[1:])
        kl = F.kl_div(
            torch.log_softmax(emb[0] @ pool.T / temperature, 1),
            torch.log_softmax(teacher[0] @ tpool.T / temperature, 1),
            log_target=True,
            reduction="batchmean",
        )
        cos = 1 - (torch.cat(emb) * torch.cat(teacher)).sum(1).mean()
        loss = loss + distill * (kl + cos)
    return loss


def _mnrl(model, temperature: float):
    try:  # sentence-transformers >= 6 moved the losses
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    except ImportError:
        from sentence_transformers.losses import MultipleNegativesRankingLoss

    return MultipleNegativesRankingLoss(model, scale=1.0 / temperature)


def encoder_calls(
    batch: Dict[str, torch.Tensor], rows: int, hidden: int, extra: float = 0.1
) -> List[Dict[str, torch.Tensor]]:
    """How the unpadded encoder takes one step's columns (`rows` texts each, tokenized together
    into `batch`): in one call, so the word-embedding table's dense gradient is built once and
    the GEMMs are larger, unless padding every column to the call's longest text would add more
    attention work (2 x hidden multiply-adds per row per padded position², per layer) than
    `extra` x the Linears' work on the real tokens (12 x hidden² per token: a BERT layer): short
    queries beside long passages. Then one call per column, each without the padding positions
    its rows do not use."""
    mask = batch["attention_mask"].to(torch.bool)
    if rows < 1 or mask.shape[0] % rows:
        raise ValueError(f"{mask.shape[0]} texts are not whole columns of {rows}")
    used = mask.view(-1, rows, mask.shape[1]).any(1)  # (columns, length): positions a row uses
    longest = used.sum(1).to(torch.float64)
    added = 2 * hidden * rows * float(len(longest) * longest.max() ** 2 - (longest**2).sum())
    if added <= extra * 12 * hidden**2 * int(mask.sum()):
        return [batch]
    return [
        {k: v[c * rows : (c + 1) * rows][:, used[c]] for k, v in batch.items()} for c in range(len(longest))
    ]


def _adamw(params, lr: float) -> torch.optim.Optimizer:
    """AdamW, weight decay 0.01, with torch's fused kernel where the parameters allow it (CPU
    since torch 2.4; transformers' Trainer default from torch 2.8): on MiniLM's 22.7 M parameters
    it steps in ~25 ms where the default per-tensor loop takes ~180 ms on one CPU thread."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype the fused kernel lacks
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)


class ContrastiveTrainer:
    """ContrastiveTrainer(queries, positives, corpus, schedule, lr=5e-5, temperature=0.05,
    max_length=32, verbose=False, unpadded=True)

    queries: the training query texts; positives[i]: the corpus row answering queries[i]; corpus:
    the document texts; schedule: the batches of query indices (see batch_schedule), the same
    for every run, so runs with different losses see the same data. Each run: AdamW (weight decay
    0.01; torch's fused kernel where the parameters allow it) with linear warm-up over 10 % of
    the steps, then linear decay; dropout on.
    unpadded: the 'info_nce' loss runs the encoder (and the teacher) on the batch's real tokens
    only, a step's columns in one call unless that would pad attention far beyond the rest
    (encoder_calls; hotops.integrations.unpadded: the same embeddings, about half the work on
    short texts); False runs the model's own padded forward, one call per column, which models
    other than BERT-style encoders need. 'mnrl' always runs sentence-transformers' forward.
    `losses` holds the last run's loss per step."""

    def __init__(
        self,
        queries: Sequence[str],
        positives: Sequence[int],
        corpus: Sequence[str],
        schedule: Sequence[torch.Tensor],
        *,
        lr: float = 5e-5,
        temperature: float = 0.05,
        max_length: int = 32,
        verbose: bool = False,
        unpadded: bool = True,
    ):
        if len(queries) != len(positives):
            raise ValueError(f"queries ({len(queries)}) and positives ({len(positives)}) differ in length")
        if len(schedule) == 0:
            raise ValueError("schedule is empty")
        _check_rows(_as_rows(positives), len(corpus), "positives")
        for b in schedule:
            b = torch.as_tensor(b)
            if b.dim() != 1 or not len(b):
                raise ValueError(
                    f"a schedule batch must be a non-empty 1-d list of query rows, got shape {tuple(b.shape)}"
                )
            _check_rows(b, len(queries), "a schedule batch")
        lr = check_number(lr, "lr", low=0.0)
        check_number(max_length, "max_length", integer=True, low=1)
        self.queries, self.positives, self.corpus = queries, positives, corpus
        self.schedule = schedule
        self.lr, self.temperature, self.max_length, self.verbose = lr, temperature, max_length, verbose
        self.unpadded = unpadded
        self.losses: List[float] = []

    def run(
        self,
        model,
        loss: str,
        steps: int,
        negatives: Optional[torch.Tensor] = None,
        refresh: Optional[Callable] = None,
        refresh_every: int = 100,
        lr: Optional[float] = None,
        log: str = "",
        teacher: Optional[torch.nn.Module] = None,
        distill: float = 0.0,
        after_step: Optional[Callable[[int], None]] = None,
        step0: int = 0,
    ):
        """`steps` optimizer steps on `model` (trained in place and returned in eval mode).

        loss: 'info_nce' (contrastive_loss: hotops.info_nce) or 'mnrl' (sentence-transformers'
        MultipleNegativesRankingLoss, scale 1 / temperature; the same loss computed by the
        library). negatives: (len(queries), n) corpus rows, each column one more candidate per
        query (MNRL's layout; one pool for info_nce). refresh(model) -> new negatives, called
        every `refresh_every` steps after the first (ANCE; see mining.HardNegativeRefresh).
        teacher (a BERT-style encoder) with distill > 0 adds contrastive_loss's distillation
        terms ('info_nce' only). after_step(step) runs after each optimizer step (1-based, e.g.
        a GradualPruner). The batches are the schedule's from `step0` on; each run builds its own
        optimizer and warm-up, so a run from step0 = s is not the continuation of an earlier one.
        The teacher runs in eval mode (no dropout in the targets) and gets its mode back after.
        A step whose loss is not finite raises FloatingPointError before it changes the weights."""
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if lr is not None:
            lr = check_number(lr, "lr", low=0.0)
        distill = check_number(distill, "distill", low=0.0)
        if distill > 0 and teacher is None:
            raise ValueError("distill > 0 needs a teacher")
        if teacher is not None and distill > 0 and loss != "info_nce":
            raise ValueError(f"distillation from a teacher runs with loss='info_nce' only, got {loss!r}")
        if refresh is not None and refresh_every < 1:
            raise ValueError(f"refresh_every must be at least 1, got {refresh_every}")
        if negatives is None and min(len(b) for b in self.schedule) < 2:
            raise ValueError(
                "a batch of one query and no negatives has nothing to contrast its document with"
            )
        negatives = self._checked(negatives)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = _adamw(params, self.lr if lr is None else lr)
        warm = max(1, steps // 10)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm)))
        )
        mnrl = _mnrl(model, self.temperature) if loss == "mnrl" else None
        bert, tok = model[0].auto_model, model.tokenizer
        _check_vocabulary(bert, tok)
        pooled = mean_pooled
        distilling = teacher is not None and distill > 0
        if mnrl is None and self.unpadded:
            for m in (bert, teacher) if distilling else (bert,):
                try:
                    _unpadded.check_encoder(m)
                except ValueError as e:
                    raise ValueError(
                        f"{e} (ContrastiveTrainer(unpadded=False) runs its padded forward)"
                    ) from None
            pooled = _unpadded.mean_pooled
        teacher_was = distilling and teacher.training
        if distilling:
            teacher.eval()
        model.train()
        t0, self.losses = time.perf_counter(), []
        try:
            for step in range(steps):
                if refresh is not None and step > 0 and step % refresh_every == 0:
                    negatives = self._checked(refresh(model))
                    model.train()
                qi = self.schedule[(step0 + step) % len(self.schedule)]
                cols = [[self.queries[i] for i in qi], [self.corpus[self.positives[i]] for i in qi]]
                if negatives is not None:  # one column per mined negative (MNRL's layout)
                    for col in negatives[qi].T.tolist():
                        cols.append([self.corpus[j] for j in col])
                if mnrl is not None:
                    value = mnrl([tokenize(tok, c, self.max_length) for c in cols], None)
                else:
                    if pooled is mean_pooled:  # padded: one call per column, each padded to its own longest
                        inputs = [tokenize(tok, c, self.max_length) for c in cols]
                    else:  # unpadded: the columns in one call where attention allows (encoder_calls)
                        together = tokenize(tok, [t for c in cols for t in c], self.max_length)
                        inputs = encoder_calls(together, len(qi), bert.config.hidden_size)
                    inputs = [{k: f[k] for k in HF_KEYS if k in f} for f in inputs]
                    emb = torch.cat([pooled(bert, x) for x in inputs]).split(len(qi))
                    ref = None
                    if distilling:
                        with torch.no_grad():
                            ref = torch.cat([pooled(teacher, x) for x in inputs]).split(len(qi))
                        if ref[0].shape[1] != emb[0].shape[1]:
                            raise ValueError(
                                f"the teacher embeds in {ref[0].shape[1]} dimensions, the model in "
                                f"{emb[0].shape[1]}: distillation compares them one to one"
                            )
                    value = contrastive_loss(emb, self.temperature, ref, distill)
                self.losses.append(value.item())
                if not np.isfinite(self.losses[-1]):  # raised before the step spreads it to the weights
                    raise FloatingPointError(
                        f"{log or 'training'}: the loss of step {step + 1} is {self.losses[-1]} "
                        f"(lr {opt.param_groups[0]['lr']:.3g}); the model holds the previous step's weights"
                    )
                opt.zero_grad(set_to_none=True)
                value.backward()
                opt.step()
                sched.step()
                if after_step is not None:
                    after_step(step + 1)
                if self.verbose and (step + 1) % max(1, steps // 5) == 0:
                    print(
                        f"  {log} step {step + 1}/{steps} loss {np.mean(self.losses[-20:]):.4f} "
                        f"{time.perf_counter() - t0:.0f} s",
                        flush=True,
                    )
        finally:  # an interrupted run too leaves both models as they were meant to be
            model.eval()
            if teacher_was:
                teacher.train()
        return model

    def _checked(self, negatives):
        """negatives as (len(queries), n) corpus rows; a -1 (a miner's "none found") or a row
        outside the corpus would silently train against another document."""
        if negatives is None:
            return None
        n = _as_rows(negatives)
        if n.dim() != 2 or n.shape[0] != len(self.queries):
            raise ValueError(
                f"negatives must be ({len(self.queries)}, n) corpus rows, got shape {tuple(n.shape)}"
            )
        _check_rows(n, len(self.corpus), "negatives")
        return n


def _as_rows(ids) -> torch.Tensor:
    """A tensor (on any device) as it is, anything else (lists, NumPy) as a tensor."""
    return ids if isinstance(ids, torch.Tensor) else torch.as_tensor(np.asarray(ids))


def _check_rows(ids: torch.Tensor, n: int, what: str) -> None:
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(f"{what} must hold integer rows, got {ids.dtype}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n):
        raise ValueError(f"{what} must be rows in [0, {n}), got {int(ids.min())}..{int(ids.max())}")
