"""Pieces of a dense-retrieval pipeline that the examples share: sentence encoding with
length-sorted batches, exact top-k search, rank metrics and the evaluation that combines them,
false-negative lists for mining, model bytes, and a peak-memory probe. Plain torch / NumPy; the
kernels live in the op families.

Submodules: ``hotops.retrieval.training`` (ContrastiveTrainer: contrastive fine-tuning with
``hotops.info_nce`` and mined hard negatives) and ``hotops.retrieval.mining`` (PQ indexes built
from vectors in one call, HardNegativeRefresh: ANCE's periodic re-mining).
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from hotops._backend import check_number

__all__ = [
    "tokenize",
    "mean_pooled",
    "encode",
    "exact_search",
    "rank_metrics",
    "evaluate",
    "topk_overlap",
    "duplicate_key",
    "false_negatives",
    "exclusion_matrix",
    "state_bytes",
    "encode_speed",
    "PeakRSS",
]


def tokenize(tokenizer, texts: Sequence[str], max_length: int = 32) -> Dict[str, torch.Tensor]:
    """A Hugging Face tokenizer's padded, truncated batch of `texts` as a dict of tensors."""
    # max_length 0 or None turns a Hugging Face tokenizer's truncation off: texts past the model's
    # positions would then fail inside it
    check_number(max_length, "max_length", integer=True, low=1)
    return dict(
        tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    )


def _check_vocabulary(bert: torch.nn.Module, tokenizer) -> None:
    """A tokenizer whose ids pass the model's embedding table fails deep in the model with an
    index error: refused here, naming both sizes."""
    table = bert.get_input_embeddings() if hasattr(bert, "get_input_embeddings") else None
    rows = getattr(table, "num_embeddings", None)
    if rows is not None and hasattr(tokenizer, "__len__") and len(tokenizer) > rows:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens, the model's embedding table {rows} rows: "
            "they do not belong together"
        )


def mean_pooled(bert: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Sentence embedding of a BERT-style encoder: the mean of the last hidden states over the
    attention mask, L2-normalised (all-MiniLM-L6-v2's pooling)."""
    states = bert(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].to(states.dtype)
    return F.normalize((states * mask).sum(1) / mask.sum(1).clamp_min(1), dim=-1)


def encode(
    bert: torch.nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 256, max_length: int = 32
) -> torch.Tensor:
    """(len(texts), dim) float32 embeddings in input order, computed in inference mode over
    batches of texts of similar token counts (shuffled texts would be mostly padding)."""
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of str, got one str (its characters would be the texts)")
    if len(texts) == 0:
        raise ValueError("texts is empty")
    batch_size = check_number(batch_size, "batch_size", integer=True, low=1)
    check_number(max_length, "max_length", integer=True, low=1)
    _check_vocabulary(bert, tokenizer)
    lengths = [len(t) for t in tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]]
    order = np.argsort(lengths, kind="stable")
    was_training = bert.training
    bert.eval()
    out = None
    try:
        with torch.inference_mode():
            for i in range(0, len(order), batch_size):
                idx = order[i : i + batch_size]
                emb = mean_pooled(bert, tokenize(tokenizer, [texts[j] for j in idx], max_length)).float()
                if out is None:
                    out = torch.empty(len(texts), emb.shape[1])
                out[torch.from_numpy(idx)] = emb
    finally:
        bert.train(was_training)
    return out


def exact_search(q, corpus, k: int = 100, chunk: int = 1024) -> torch.Tensor:
    """(nq, min(k, len(corpus))) ids of the k largest inner products, by brute force in chunks
    of queries. q and corpus: tensors or NumPy arrays (read-only ones too: they are only read);
    of two floating dtypes, both are scored in the more precise one (torch.promote_types: float32
    queries against a bfloat16 corpus are scored in float32, as its reference should be), and
    float16 / bfloat16 in float32 (a bfloat16 score holds 8 bits: most top-10 orders would be
    ties broken at random). NaN or inf in either side raises (topk would rank a NaN first)."""
    k = check_number(k, "k", integer=True, low=0)
    chunk = check_number(chunk, "chunk", integer=True, low=1)
    with warnings.catch_warnings():  # torch warns that a read-only array is not writable: never written
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        q, corpus = torch.as_tensor(q), torch.as_tensor(corpus)
    if q.dim() != 2 or corpus.dim() != 2 or q.shape[1] != corpus.shape[1]:
        raise ValueError(
            f"q (nq, dim) and corpus (n, dim) must share dim, got {tuple(q.shape)}, {tuple(corpus.shape)}"
        )
    if q.dtype != corpus.dtype:
        if not (q.dtype.is_floating_point and corpus.dtype.is_floating_point):
            raise TypeError(f"q ({q.dtype}) and corpus ({corpus.dtype}) must be of one dtype")
        common = torch.promote_types(q.dtype, corpus.dtype)
        q, corpus = q.to(common), corpus.to(common)
    if q.dtype in (torch.float16, torch.bfloat16):
        q, corpus = q.float(), corpus.float()
    if not (torch.isfinite(q).all() and torch.isfinite(corpus).all()):
        raise ValueError("exact_search: the embeddings hold NaN or inf")
    k = min(k, corpus.shape[0])
    parts = [torch.topk(q[i : i + chunk] @ corpus.T, k, dim=1).indices for i in range(0, q.shape[0], chunk)]
    return torch.cat(parts) if parts else torch.empty(0, k, dtype=torch.int64)


def _check_ks(ks) -> tuple:
    """ks as a tuple of positive ints (recall@0 would always be 0)."""
    try:
        ks = tuple(ks)
    except TypeError:
        raise TypeError(f"ks must be a sequence of cutoffs (e.g. (10, 100)), got {ks!r}") from None
    return tuple(check_number(k, "each of ks", integer=True, low=1) for k in ks)


def _integer_ids(x, name: str) -> torch.Tensor:
    a = np.asarray(x)
    if a.dtype.kind not in "iu":  # float ids (distances passed by mistake) would be truncated
        if a.size or a.dtype.kind not in "f":
            raise TypeError(f"{name} must hold integer rows, got {a.dtype}")
        a = a.astype(np.int64)  # an empty list arrives as float64
    return torch.as_tensor(a).long()


def _gold_rows(gold, nq: int, n_docs: Optional[int]) -> torch.Tensor:
    """gold as (nq,) int64 corpus rows: each >= 0 (-1 would match the rankings' padding) and, where
    the corpus size n_docs is known, below it."""
    gold = _integer_ids(gold, "gold")
    if gold.dim() != 1 or len(gold) != nq:
        raise ValueError(
            f"gold (nq,) must hold one corpus row per query ({nq}), got shape {tuple(gold.shape)}"
        )
    span = "rows of the corpus" + ("" if n_docs is None else f", in [0, {n_docs})")
    if len(gold) and int(gold.min()) < 0:
        raise ValueError(f"gold holds a negative row: every query needs its relevant document ({span})")
    if len(gold) and n_docs is not None and int(gold.max()) >= n_docs:
        raise ValueError(f"gold holds row {int(gold.max())}, outside the corpus: gold must be {span}")
    return gold


def rank_metrics(
    ids,
    gold: Sequence[int],
    doc_key: Optional[Sequence[int]] = None,
    ks: Sequence[int] = (10, 100),
    n_docs: Optional[int] = None,
) -> Dict[str, float]:
    """MRR@10 and recall@k for one relevant document per query. ids (nq, >= max ks) integer
    ranked results (-1 = none); fewer columns than max(ks) are refused unless `n_docs` (the
    corpus size; default len(doc_key) where doc_key is given) says the corpus holds no more (ids
    then has one column per document). MRR@10 counts the first min(10, columns) results. gold
    (nq,) the relevant row, in [0, n_docs) where n_docs is known. doc_key maps a row to a key
    that decides relevance (e.g. the row of the first identical text: duplicate documents count
    as the same answer); default: the row itself. Zero queries raise ValueError (a mean over no
    query is not a score)."""
    ks = _check_ks(ks)
    ids = _integer_ids(ids, "ids")
    if ids.dim() != 2:
        raise ValueError(f"ids must be (nq, k) ranked rows, got shape {tuple(ids.shape)}")
    key = None if doc_key is None else _integer_ids(doc_key, "doc_key")
    if key is not None and key.numel() and int(key.min()) < 0:
        # a negative key would match the -1 of an empty result: a ranking of nothing scored a hit
        raise ValueError(f"doc_key must hold keys >= 0, got {int(key.min())}")
    if n_docs is None and key is not None:
        n_docs = len(key)
    if n_docs is not None:
        n_docs = check_number(n_docs, "n_docs", integer=True, low=1)
    if key is not None and n_docs is not None and len(key) < n_docs:
        raise ValueError(f"doc_key has {len(key)} keys, fewer than the corpus's {n_docs} rows")
    gold = _gold_rows(gold, len(ids), n_docs)
    if not len(gold):
        raise ValueError("rank_metrics: no queries (ids and gold have no rows)")
    if n_docs is not None:
        if ids.numel() and int(ids.max()) >= n_docs:
            raise ValueError(f"ids holds row {int(ids.max())}, outside the corpus's {n_docs} rows")
    need = min(max(ks, default=0), n_docs if n_docs is not None else 1 << 62)
    if ids.shape[1] < need:
        raise ValueError(
            f"ids has {ids.shape[1]} columns, recall@{max(ks)} needs {need}"
            + ("" if n_docs is not None else " (pass n_docs where the corpus holds fewer documents)")
        )
    if key is not None:
        ids = torch.where(ids >= 0, key[ids.clamp_min(0)], -1)
        gold = key[gold]
    hit = ids == gold[:, None]
    first = torch.where(hit.any(1), hit.float().argmax(1), torch.full_like(gold, 1 << 30))
    out = {"mrr@10": torch.where(first < 10, 1.0 / (first.double() + 1), torch.zeros(())).mean().item()}
    for k in ks:
        out[f"recall@{k}"] = (first < k).double().mean().item()
    return out


def evaluate(
    bert: torch.nn.Module,
    tokenizer,
    corpus: Sequence[str],
    queries: Sequence[str],
    gold: Sequence[int],
    doc_key: Optional[Sequence[int]] = None,
    batch_size: int = 256,
    max_length: int = 32,
    k: int = 100,
    ks: Sequence[int] = (10, 100),
):
    """The corpus and the queries encoded (`encode`), each query's best k by exact search, scored
    by `rank_metrics` (MRR@10 and recall at each of `ks`, so k >= 10 and every ks; ks=() gives
    MRR@10 alone) against `gold` (each query's relevant corpus row, in [0, len(corpus))). Returns
    (metrics, corpus embeddings, query embeddings); the metrics also hold corpus_encode_s,
    corpus_docs_per_s and query_encode_per_s (wall time)."""
    ks = _check_ks(ks)
    k = check_number(k, "k", integer=True, low=1)
    if k < max((10, *ks)):
        raise ValueError(f"k ({k}) must be at least 10 and every ks {ks}: the metrics look that deep")
    if len(queries) == 0:
        raise ValueError("evaluate: no queries")
    g = _gold_rows(gold, len(queries), len(corpus))  # before the encoding, which takes the time
    if doc_key is not None and len(doc_key) != len(corpus):
        raise ValueError(f"doc_key must hold one key per corpus row ({len(corpus)}), got {len(doc_key)}")
    t = time.perf_counter()
    C = encode(bert, tokenizer, corpus, batch_size, max_length)
    t_corpus = time.perf_counter() - t
    t = time.perf_counter()
    Q = encode(bert, tokenizer, queries, batch_size, max_length)
    t_query = time.perf_counter() - t
    m = rank_metrics(exact_search(Q, C, k), g, doc_key, ks, n_docs=len(corpus))
    m.update(
        corpus_encode_s=round(t_corpus, 1),
        corpus_docs_per_s=round(len(corpus) / t_corpus, 1),
        query_encode_per_s=round(len(queries) / t_query, 1),
    )
    return m, C, Q


def topk_overlap(ids, reference) -> float:
    """The mean over rows of the fraction of `reference`'s ids (e.g. exact search's top k) that
    `ids` (an index's answer, same rows) holds too; -1 (no result) is never an id."""
    ids, reference = np.asarray(ids), np.asarray(reference)
    if ids.ndim != 2 or reference.ndim != 2 or len(ids) != len(reference):
        raise ValueError(
            f"ids and reference must be (nq, k) of the same nq, got {ids.shape} and {reference.shape}"
        )
    if not len(ids):
        raise ValueError("topk_overlap: no rows")
    shares = []
    for a, b in zip(ids.tolist(), reference.tolist()):
        valid = set(b) - {-1}  # a repeated id is one id
        shares.append(len((set(a) - {-1}) & valid) / max(1, len(valid)))
    return float(np.mean(shares))


def duplicate_key(texts: Sequence[str]) -> List[int]:
    """For each text the row of its first occurrence: as rank_metrics' doc_key, a retrieved
    duplicate of the relevant document counts as the answer."""
    first: Dict[str, int] = {}
    return [first.setdefault(t, i) for i, t in enumerate(texts)]


def false_negatives(rows: Sequence[int], related: Dict[int, List[int]], texts: Sequence[str]):
    """{row: sorted ids} for each of `rows`: its `related` rows (e.g. the other senses of a
    word) and every other row whose text is the same as its own; what a miner must not return as
    a negative of a query whose answer is that row (see exclusion_matrix)."""
    same_text: Dict[str, List[int]] = {}
    for i, t in enumerate(texts):
        same_text.setdefault(t, []).append(i)
    rows = {int(r) for r in rows}  # tensor elements hash by identity
    bad = [r for r in rows if not 0 <= r < len(texts)]
    if bad:
        raise ValueError(f"rows {sorted(bad)[:5]} are not rows of texts (0..{len(texts) - 1})")
    related = _int_keys(related)
    return {r: sorted(({int(i) for i in related.get(r, [])} | set(same_text[texts[r]])) - {r}) for r in rows}


def _int_keys(related: Dict) -> Dict[int, List[int]]:
    """`related` with int keys: tensor or NumPy keys hash by identity (or type), so a lookup by
    row would find nothing and silently exclude nothing."""
    return {int(k): v for k, v in related.items()}


def exclusion_matrix(rows: Sequence[int], related: Dict[int, List[int]]) -> torch.Tensor:
    """(len(rows), E) int64 of each row's related ids padded with -1 (E >= 1): a miner's exclude."""
    related = _int_keys(related)
    lists = [related.get(int(r), []) for r in rows]
    E = max(1, max((len(x) for x in lists), default=1))
    out = torch.full((len(rows), E), -1, dtype=torch.int64)
    for i, x in enumerate(lists):
        if len(x):
            out[i, : len(x)] = torch.as_tensor(x)
    return out


def state_bytes(module: torch.nn.Module) -> int:
    """Bytes of the module's state_dict tensors (each storage once): what a checkpoint holds."""
    seen, total = set(), 0
    for t in module.state_dict().values():
        if isinstance(t, torch.Tensor) and t.layout != torch.strided:  # sparse: its parts hold the bytes
            total += _sparse_bytes(t)
        elif isinstance(t, torch.Tensor):
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return total


def _sparse_bytes(t: torch.Tensor) -> int:
    if t.layout == torch.sparse_coo:
        parts = (t._values(), t._indices())
    elif t.layout in (torch.sparse_csr, torch.sparse_bsr):
        parts = (t.values(), t.crow_indices(), t.col_indices())
    else:
        parts = (t.values(), t.ccol_indices(), t.row_indices())
    return sum(p.numel() * p.element_size() for p in parts)


def encode_speed(
    models: Dict[str, torch.nn.Module],
    tokenizer,
    texts: Sequence[str],
    batch_size: int = 256,
    max_length: int = 32,
):
    """({name: docs per CPU second}, {name: docs per wall second}) of each model encoding the same
    `texts`, `batch_size` per call, one model after another; the first model (the baseline) runs
    first and last and keeps the better of its two. CPU time is this process's (all threads),
    which other jobs on a shared machine disturb far less than wall time. Warm the models up
    first (one `encode` each): first calls pay for thread pools and kernel binding."""
    order = list(models.items())
    cpu: Dict[str, float] = {}
    wall: Dict[str, float] = {}
    for name, model in order + order[:1]:
        t, c = time.perf_counter(), time.process_time()
        encode(model, tokenizer, texts, batch_size, max_length)
        t, c = time.perf_counter() - t, time.process_time() - c
        cpu[name] = max(cpu.get(name, 0.0), round(len(texts) / c, 1))
        wall[name] = max(wall.get(name, 0.0), round(len(texts) / t, 1))
    return cpu, wall


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Context manager sampling this process's resident memory every `interval` seconds (Linux
    /proc): `.peak` bytes while inside, `.start` bytes on entry; `.seconds` of wall time and
    `.cpu_seconds` of this process's CPU time (all threads) inside, which other jobs on the
    machine inflate much less than the wall time."""

    def __init__(self, interval: float = 0.05):
        # 0, negative or NaN made the sampler spin, its CPU time counted in cpu_seconds
        interval = check_number(interval, "interval", low=0.0, low_open=True)
        self.interval, self.peak, self.start = interval, 0, 0
        self._stop = threading.Event()

    def _watch(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss())

    def __enter__(self):
        self.start = self.peak = _rss()
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.cpu_seconds = time.process_time() - self.c0
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())
        return False
