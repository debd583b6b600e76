"""Hard negatives re-mined as training moves the embeddings (ANCE): the corpus and the training
queries re-encoded by the model being trained, the index rebuilt, and ``hotops.ann.mining.
HardNegativeMiner`` run over it; plus PQ indexes built from vectors in one call."""

from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from hotops.ann import IVFPQIndex, PQIndex
from hotops.ann.mining import HardNegativeMiner
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
    ids ((len(queries), E), -1 = none, or None; see hotops.retrieval.exclusion_matrix). Where fewer than
    n are found, random corpus rows drawn from `fill_generator` fill in.

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
        self.positives = torch.as_tensor(positives).reshape(len(queries), -1)
        self.exclude = None if exclude is None else torch.as_tensor(exclude).reshape(len(queries), -1)
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

    def _fill(self, rows: torch.Tensor, taken: torch.Tensor) -> torch.Tensor:
        """A random corpus row for each query row in `rows`, never that query's positive or one
        of its exclusions (a filled-in false negative would train against the answer), and not
        one of its negatives so far (`taken`, a row each) unless 32 draws found nothing else (a
        corpus with fewer allowed rows than n)."""
        banned = self.positives[rows]
        if self.exclude is not None:
            banned = torch.cat([banned, self.exclude[rows]], 1)
        draw = torch.randint(len(self.corpus), (len(rows),), generator=self.fill_generator)
        for attempt in range(64):  # redraw the banned ones; each round keeps most rows of a real corpus
            bad = (draw[:, None] == (banned if attempt >= 32 else torch.cat([banned, taken], 1))).any(1)
            if not bad.any():
                return draw
            draw[bad] = torch.randint(len(self.corpus), (int(bad.sum()),), generator=self.fill_generator)
        raise ValueError(
            "HardNegativeRefresh: 64 draws found no corpus row that is neither a positive nor excluded"
        )
