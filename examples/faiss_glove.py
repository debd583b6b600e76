"""Convert faiss indexes built on GloVe 6B 50-d to hotops and compare answers and speed.

For each faiss index (IndexIVFPQ 8-bit by_residual true/false, IndexIVFPQFastScan 4-bit, IndexPQ),
convert with hotops (`IVFPQIndex.from_faiss` / `PQIndex.from_faiss`) and report recall@10 of hotops'
answers against faiss's own at the same nprobe, then search time of both, alternated.

For the fast-scan index, faiss rounds its lookup tables to 8 bits; the float-table baseline is the
same codes scored with float tables (the converted index exported with `to_faiss(fast_scan=False)`,
an IndexIVFPQ), so the report also shows how well faiss's fast scan agrees with that.

    python examples/faiss_glove.py [--nq 1000] [--nb 0 (all)] [--nprobe 16] [--repeat 5]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from hotops._argtypes import whole


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each row of `truth` (k ids) that `found` also holds."""
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def timed(fn, *args, **kw) -> float:
    t = time.perf_counter()
    fn(*args, **kw)
    return time.perf_counter() - t


def main(argv=None) -> dict:
    import faiss

    from hotops.ann import IVFPQIndex, PQIndex
    from hotops.bench import ann_data

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nq", type=whole(1), default=1000)
    ap.add_argument("--nb", type=whole(0), default=0, help="base vectors (0: all 399k others)")
    ap.add_argument("--nt", type=whole(1), default=100_000, help="training vectors")
    ap.add_argument("--nlist", type=whole(1), default=1024)
    ap.add_argument("--nprobe", type=whole(1), default=16)
    ap.add_argument("--k", type=whole(1), default=10)
    ap.add_argument("--repeat", type=whole(1), default=5)
    ap.add_argument("--m", type=whole(1), default=25, help="PQ sub-spaces (a divisor of 50)")
    ap.add_argument("--only", default="", help="run the cases whose name contains this")
    args = ap.parse_args(argv)
    if 50 % args.m:
        ap.error(f"--m {args.m}: not a divisor of 50 (GloVe's dimension): 1, 2, 5, 10, 25 or 50")
    base, train, q, _ = ann_data.load("glove", args.nq, args.nb or None, args.nt)
    if len(train) < max(args.nlist, 256):  # faiss's k-means needs a point per centroid
        ap.error(
            f"--nt {args.nt} (--nb {args.nb}): {len(train)} training vectors, fewer than --nlist "
            f"{args.nlist} or the 256 codewords of a PQ sub-space"
        )
    d, k = base.shape[1], args.k
    print(
        f"GloVe 6B 50-d: {base.shape[0]} base, {q.shape[0]} queries, k = {k}, nprobe = {args.nprobe}, "
        f"{faiss.omp_get_max_threads()} faiss threads"
    )

    def ivf(fast: bool, by_residual: bool, metric=faiss.METRIC_L2):
        quantizer = faiss.IndexFlat(d, metric)
        if fast:
            index = faiss.IndexIVFPQFastScan(quantizer, d, args.nlist, args.m, 4, metric)
        else:
            index = faiss.IndexIVFPQ(quantizer, d, args.nlist, args.m, 8, metric)
        index.by_residual = by_residual
        index.train(train)
        index.add(base)
        index.nprobe = args.nprobe
        return index

    def flat(fast: bool):
        index = faiss.IndexPQFastScan(d, args.m, 4) if fast else faiss.IndexPQ(d, args.m, 8)
        index.train(train)
        index.add(base)
        return index

    cases = [
        ("IndexIVFPQ m{m}x8 by_residual", lambda: ivf(False, True), IVFPQIndex, True),
        ("IndexIVFPQ m{m}x8 not by_residual", lambda: ivf(False, False), IVFPQIndex, True),
        (
            "IndexIVFPQ m{m}x8 IP by_residual",
            lambda: ivf(False, True, faiss.METRIC_INNER_PRODUCT),
            IVFPQIndex,
            True,
        ),
        ("IndexIVFPQFastScan m{m}x4 by_residual", lambda: ivf(True, True), IVFPQIndex, True),
        ("IndexIVFPQFastScan m{m}x4 not by_residual", lambda: ivf(True, False), IVFPQIndex, True),
        ("IndexPQ m{m}x8", lambda: flat(False), PQIndex, False),
        ("IndexPQFastScan m{m}x4", lambda: flat(True), PQIndex, False),
    ]
    cases = [(name.format(m=args.m), *rest) for name, *rest in cases]
    if not any(args.only in name for name, *_ in cases):
        ap.error(f"--only {args.only!r} matches none of the cases: {'; '.join(name for name, *_ in cases)}")
    rows, recalls = [], {}
    for name, build, cls, is_ivf in cases:
        if args.only not in name:
            continue
        index = build()
        converted = cls.from_faiss(index)
        kw = {"nprobe": args.nprobe} if is_ivf else {}
        _, f_ids = index.search(q, k)
        _, h_ids = converted.search(q, k, **kw)
        recalls[name] = {"hotops vs faiss": recall(h_ids, f_ids)}
        line = f"{name}: recall@{k} of hotops vs faiss {recalls[name]['hotops vs faiss']:.4f}"
        if converted.fast_scan:  # the float-table scoring of the same codes
            float_index = converted.to_faiss(fast_scan=False)
            faiss.ParameterSpace().set_index_parameter(float_index, "nprobe", args.nprobe) if is_ivf else None
            _, exact_ids = float_index.search(q, k)
            recalls[name].update(
                {"faiss vs float": recall(f_ids, exact_ids), "hotops vs float": recall(h_ids, exact_ids)}
            )
            line += (
                f"; against float-table scoring of the same codes: faiss {recall(f_ids, exact_ids):.4f}, "
                f"hotops {recall(h_ids, exact_ids):.4f}"
            )
        print(line, flush=True)
        tf = th = np.inf
        for _ in range(args.repeat):  # alternate, best of each
            tf = min(tf, timed(index.search, q, k))
            th = min(th, timed(converted.search, q, k, **kw))
        rows.append((name, tf, th))
    print(f"\n| index | faiss ms / {q.shape[0]} queries | hotops ms | faiss / hotops |")
    print("|---|---|---|---|")
    for name, tf, th in rows:
        print(f"| {name} | {1e3 * tf:.1f} | {1e3 * th:.1f} | {tf / th:.2f}x |")
    return recalls


if __name__ == "__main__":
    main()
