"""Hard negatives re-mined as training moves the embeddings (ANCE): the corpus and the training
queries re-encoded by the model being trained, the index rebuilt, and ``hotops.ann.mining.
HardNegativeMiner`` run over it; plus PQ indexes built from vectors in one call."""

from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from hotops._backend import check_number
from hotops.ann import IVFPQIndex, PQIndex
from hotops.ann.mining import HardNegativeMiner, _as_id_matrix
from hotops.retrieval import encode

__all__ = ["build_pq_index", "HardNegativeRefresh"]


def build_pq_index(
    x: np.ndarray, m: int, nlist: Optional[int] = None, keep_vectors: bool = False
) -> Union[PQIndex, IVFPQIndex]:
    """An inner-product index of 8-bit PQ codes (m bytes per vector) trained on and filled with
    the rows of x (ids 0..n-1): an IVFPQIndex of `nlist` lists, or with nlist None a flat PQIndex
    (every code scanned)."""
    if nlist is None:
        index = PQIndex(x.shape[1], m, 8, "ip", keep_vectors=keep_vectors, verbose=False)
    else:
        index = IVFPQIndex(
            x.shape[1], nlist=nlist, m=m, nbits=8, metric="ip", keep_vectors=keep_vectors, verbose=False
        )
    index.train(x)
    index.add(x)
    return index


class HardNegativeRefresh:
    """HardNegativeRefresh(corpus, queries, positives, exclude, build, n=1, depth=20, seed=0,
    fill_generator=None, batch_size=256, max_length=32, name="", verbose=False, **search_kwargs)

    Called with the model being trained (``model[0].auto_model`` a BERT-style encoder,
    ``model.tokenizer``; a SentenceTransformer), it encodes the corpus (or takes
    `corpus_embeddings` already computed) and the training queries, builds an index over the
    corpus with ``build(x)`` (x: (len(corpus), dim) float32; any index with hotops' ``search(q,
    k, **search_kwargs) -> (distances, ids)``, e.g. ``lambda x: build_pq_index(x, 48, nlist)``),
    and returns (len(queries), n) int64 corpus rows: HardNegativeMiner's n negatives per query
    among the best `depth` (sample=True: STAR's random hard negatives, from a generator seeded
    with `seed` afresh on each call), never a query's positive or one of its `exclude` row
    ids ((len(queries), E), -1 = none, or None; see hotops.retrieval.exclusion_matrix). positives
    is (len(queries),) or (len(queries), P) and exclude (len(queries),) or (len(queries), E):
    one row per query, else ValueError (a transposed list would skip the wrong rows). Where
    fewer than n are found, random corpus rows drawn from `fill_generator` fill in (repeating a
    query's negatives only where fewer than n corpus rows are allowed for it).

    `timings` gets one dict per call (encode_s, index_build_s, mine_s, mine_queries_per_s);
    `last` is the last call's answer. Pass it to ContrastiveTrainer.run as `refresh`.
    """

    def __init__(
        self,
        corpus: Sequence[str],
        queries: Sequence[str],
        positives,
        exclude,
        build: Callable[[np.ndarray], object],
        *,
        n: int = 1,
        depth: int = 20,
        seed: int = 0,
        fill_generator: Optional[torch.Generator] = None,
        batch_size: int = 256,
        max_length: int = 32,
        name: str = "",
        verbose: bool = False,
        **search_kwargs,
    ):
        self.corpus, self.queries, self.build = corpus, queries, build
        # one row per query, checked before anything is reshaped: an (E, Q) exclude list or 2Q
        # positives would otherwise be read as other queries' rows
        self.positives = _corpus_rows(positives, len(queries), len(corpus), "positives")
        self.exclude = (
            None if exclude is None else _corpus_rows(exclude, len(queries), len(corpus), "exclude")
        )
        # n and depth as the miner checks them, here rather than after the first refresh has
        # encoded the corpus and built the index (minutes into training)
        HardNegativeMiner(None, n=n, depth=depth)
        batch_size = check_number(batch_size, "batch_size", integer=True, low=1)
        check_number(max_length, "max_length", integer=True, low=1)
        self.n, self.depth, self.seed, self.search_kwargs = n, depth, seed, search_kwargs
        self.fill_generator = fill_generator or torch.Generator().manual_seed(seed + 1)
        self.batch_size, self.max_length = batch_size, max_length
        self.name, self.verbose = name, verbose
        self.timings: List[Dict[str, float]] = []
        self.last: Optional[torch.Tensor] = None

    def __call__(self, model, corpus_embeddings: Optional[torch.Tensor] = None) -> torch.Tensor:
        bert, tok = model[0].auto_model, model.tokenizer
        t = time.perf_counter()
        C = corpus_embeddings
        if C is None:
            C = encode(bert, tok, self.corpus, self.batch_size, self.max_length)
        else:
            C = self._corpus_embeddings(C)
        Q = encode(bert, tok, self.queries, self.batch_size, self.max_length)
        t_enc = time.perf_counter() - t
        t = time.perf_counter()
        index = self.build(C.numpy())
        t_build = time.perf_counter() - t
        t = time.perf_counter()
        miner = HardNegativeMiner(
            index, n=self.n, depth=self.depth, sample=True, seed=self.seed, **self.search_kwargs
        )
        mined = miner.mine(Q, self.positives, self.exclude).ids
        absent = mined < 0  # fewer than n found (tiny lists): a random other document
        for col in range(mined.shape[1]):  # column by column: a fill never repeats the row's negatives
            rows = absent[:, col].nonzero()[:, 0]
            if len(rows):
                mined[rows, col] = self._fill(rows, mined[rows])
        t_mine = time.perf_counter() - t
        self.last = mined
        self.timings.append(
            {
                "encode_s": round(t_enc, 1),
                "index_build_s": round(t_build, 2),
                "mine_s": round(t_mine, 2),
                "mine_queries_per_s": round(len(Q) / t_mine, 1),
            }
        )
        if self.verbose:
            print(
                f"  refresh {self.name}: encode {t_enc:.0f} s, build {t_build:.1f} s, mine {t_mine:.1f} s",
                flush=True,
            )
        return mined

    def _corpus_embeddings(self, C) -> torch.Tensor:
        """Given corpus embeddings as the (len(corpus), dim) float32 CPU tensor `build` gets."""
        C = torch.as_tensor(C).detach()
        if C.dim() != 2 or C.shape[0] != len(self.corpus):
            raise ValueError(
                f"corpus_embeddings must be ({len(self.corpus)}, dim), one row per corpus text, got "
                f"shape {tuple(C.shape)}"
            )
        if not C.dtype.is_floating_point:
            raise TypeError(f"corpus_embeddings must be floating point, got {C.dtype}")
        return C.to("cpu", torch.float32)

    def _fill(self, rows: torch.Tensor, taken: torch.Tensor) -> torch.Tensor:
        """A random corpus row for each query row in `rows`, never that query's positive or one
        of its exclusions (a filled-in false negative would train against the answer), and not
        one of its negatives so far (`taken`, a row each) unless every allowed row is one (fewer
        allowed rows than n). 32 rounds of draws over the corpus; a query whose draws all failed
        (exclusions covering almost the whole corpus) draws among its enumerated allowed rows.
        Raises only for a query with no allowed row at all."""
        banned = self.positives[rows]
        if self.exclude is not None:
            banned = torch.cat([banned, self.exclude[rows]], 1)
        avoid = torch.cat([banned, taken], 1)
        N, gen = len(self.corpus), self.fill_generator
        draw = torch.randint(N, (len(rows),), generator=gen)
        for _ in range(32):  # redraw the banned ones; each round keeps most rows of a real corpus
            bad = (draw[:, None] == avoid).any(1)
            if not bad.any():
                return draw
            draw[bad] = torch.randint(N, (int(bad.sum()),), generator=gen)
        for i in bad.nonzero()[:, 0].tolist():
            allowed = torch.ones(N, dtype=torch.bool)
            allowed[banned[i][banned[i] >= 0]] = False
            fresh = allowed.clone()
            fresh[taken[i][taken[i] >= 0]] = False
            pool = (fresh if fresh.any() else allowed).nonzero()[:, 0]
            if not len(pool):
                raise ValueError(
                    f"HardNegativeRefresh: query {int(rows[i])} has no corpus row that is neither its "
                    f"positive nor excluded (corpus of {N})"
                )
            draw[i] = pool[torch.randint(len(pool), (1,), generator=gen)]
        return draw


def _corpus_rows(ids, n_queries: int, n_corpus: int, name: str) -> torch.Tensor:
    """(n_queries, P) int64 corpus rows (-1 = none) of one row per query, or ValueError."""
    if not isinstance(ids, (torch.Tensor, np.ndarray)):  # lists (the miner takes arrays only)
        try:
            ids = np.asarray(ids)
        except ValueError as exc:  # ragged rows
            raise ValueError(f"{name} must be one row of ids per query (pad with -1): {exc}") from None
    a = _as_id_matrix(ids, n_queries, name)
    if a.numel() and (int(a.min()) < -1 or int(a.max()) >= n_corpus):
        raise ValueError(
            f"{name} must be corpus rows in [0, {n_corpus}) or -1 (none), got {int(a.min())}..{int(a.max())}"
        )
    return a
