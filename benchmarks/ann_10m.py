"""Out-of-core IVF-PQ at 10M x 64 (docs/ann.md, "Past RAM"): a clustered synthetic corpus kept as
a .npy file (memory-mapped, never loaded whole), hotops IVFPQIndex and faiss IndexIVFPQ built from it
with the same nlist / m / nbits / training sample / threads, each in its own process (so each peak
RSS is its own), saved, opened again memory-mapped (hotops load(mmap=True); faiss read_index with
IO_FLAG_MMAP, its inverted lists mapped from the file), and searched at the same nprobe values.

    PYTHONPATH=python python benchmarks/ann_10m.py --n 10000000 --data /work/data --out ann_10m.json

Reports per library: train and add seconds, peak RSS of the build process, file size, RSS after
opening the index mapped, and per nprobe QPS and recall@10 (the share of the true 10 nearest found
in the 10 returned, exact ground truth by brute force). --n 20000 runs in seconds (tests use it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

K = 10


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM: anonymous memory and mapped file pages alike).
    Not ru_maxrss, which keeps the parent's resident set at fork across the exec."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def paths(a):
    stem = os.path.join(a.data, f"clustered_{a.n}x{a.dim}")
    return dict(base=stem + ".npy", queries=stem + "_queries.npy", gt=stem + "_gt.npy", stem=stem)


def make_data(a) -> None:
    """The corpus (written chunk by chunk into a .npy memmap), queries, and exact top-10."""
    p = paths(a)
    os.makedirs(a.data, exist_ok=True)
    rng = np.random.default_rng(a.seed)
    centers = rng.normal(size=(a.clusters, a.dim)).astype(np.float32)
    scale = rng.uniform(0.3, 0.7, a.clusters).astype(np.float32)

    def draw(m):
        c = rng.integers(0, a.clusters, m)
        return centers[c] + scale[c, None] * rng.standard_normal((m, a.dim), dtype=np.float32)

    if not os.path.exists(p["base"]):
        tmp = p["base"] + ".part.npy"
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(a.n, a.dim))
        for b in range(0, a.n, 1 << 18):
            out[b : b + (1 << 18)] = draw(min(1 << 18, a.n - b))
        out.flush()
        del out
        os.replace(tmp, p["base"])
    if not os.path.exists(p["gt"]):
        q = draw(a.nq)
        np.save(p["queries"], q)
        np.save(p["gt"], ground_truth(np.load(p["base"], mmap_mode="r"), q))


def ground_truth(x, q, k=K):
    import torch

    qt = torch.from_numpy(q)
    best_d = torch.full((q.shape[0], k), float("inf"))
    best_i = torch.zeros((q.shape[0], k), dtype=torch.int64)
    step = 1 << 18
    for b in range(0, x.shape[0], step):
        xt = torch.from_numpy(np.array(x[b : b + step]))  # a copy: x may be a read-only memmap
        d = (xt * xt).sum(1)[None] - 2 * qt @ xt.T
        dd, ii = torch.topk(d, min(k, d.shape[1]), dim=1, largest=False)
        cat_d, cat_i = torch.cat([best_d, dd], 1), torch.cat([best_i, ii + b], 1)
        best_d, at = torch.topk(cat_d, k, dim=1, largest=False)
        best_i = torch.gather(cat_i, 1, at)
    return best_i.numpy()


def read_rows(a, start: int, count: int) -> np.ndarray:
    """Rows of the corpus read with plain file reads: no mapping, so no file pages count in RSS."""
    if getattr(a, "header", None) is None:
        a.header = np.load(paths(a)["base"], mmap_mode="r").offset
    with open(paths(a)["base"], "rb") as f:
        f.seek(a.header + start * a.dim * 4)
        return np.frombuffer(f.read(count * a.dim * 4), np.float32).reshape(-1, a.dim).copy()


def train_sample(a) -> np.ndarray:
    """a.train random rows (read one by one: a mapping would fault the whole file in around them)."""
    rows = np.sort(np.random.default_rng(a.seed + 1).choice(a.n, min(a.train, a.n), replace=False))
    return np.concatenate([read_rows(a, int(r), 1) for r in rows])


def recall(ids, gt) -> float:
    return float(np.mean([len(set(i) & set(g)) / K for i, g in zip(ids.tolist(), gt.tolist())]))


def search_sweep(search, q, gt, nprobes):
    rows = []
    for nprobe in nprobes:  # nprobe values past nlist are skipped by the caller
        search(q[:50], nprobe)  # warm the mapped pages and caches
        t = time.perf_counter()
        ids = search(q, nprobe)
        dt = time.perf_counter() - t
        rows.append(dict(nprobe=nprobe, qps=round(q.shape[0] / dt, 1), recall=round(recall(ids, gt), 4)))
    return rows


def run_hotops(a) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    from hotops.ann import IVFPQIndex

    p, out = paths(a), {}
    index = IVFPQIndex(a.dim, a.nlist, m=a.m, nbits=a.nbits, verbose=False)
    t = time.perf_counter()
    index.train(train_sample(a))
    out["train_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    index.add(p["base"])  # the .npy path: read in chunks from the file
    out["add_s"] = round(time.perf_counter() - t, 1)
    out["build_peak_rss_mb"] = round(peak_rss_mb())
    fname = p["stem"] + f"_hotops_ivf{a.nlist}_pq{a.m}x{a.nbits}.idx"
    index.save(fname)
    out["file_mb"] = round(os.path.getsize(fname) / 2**20)
    del index
    before = rss_mb()
    index = IVFPQIndex.load(fname, mmap=True)
    out["open_rss_mb"] = round(rss_mb() - before)
    q, gt = np.load(p["queries"]), np.load(p["gt"])
    out["search"] = search_sweep(lambda q, n: index.search(q, K, nprobe=n)[1], q, gt, a.nprobe)
    out["search_rss_mb"] = round(rss_mb())
    return out


def run_faiss(a) -> dict:
    import faiss

    faiss.omp_set_num_threads(a.threads)
    p, out = paths(a), {}
    index = faiss.IndexIVFPQ(faiss.IndexFlatL2(a.dim), a.dim, a.nlist, a.m, a.nbits)
    index.cp.niter = 10  # hotops' coarse k-means runs 10 iterations too
    t = time.perf_counter()
    index.train(train_sample(a))
    out["train_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    for b in range(0, a.n, 1 << 16):  # faiss adds from memory: read the file chunk by chunk
        index.add(read_rows(a, b, min(1 << 16, a.n - b)))
    out["add_s"] = round(time.perf_counter() - t, 1)
    out["build_peak_rss_mb"] = round(peak_rss_mb())
    fname = p["stem"] + f"_faiss_ivf{a.nlist}_pq{a.m}x{a.nbits}.index"
    faiss.write_index(index, fname)
    out["file_mb"] = round(os.path.getsize(fname) / 2**20)
    del index
    before = rss_mb()
    try:
        index = faiss.read_index(fname, faiss.IO_FLAG_MMAP)
        out["lists"] = "mmap (IO_FLAG_MMAP)"
    except RuntimeError as exc:
        index = faiss.read_index(fname)
        out["lists"] = f"in RAM (IO_FLAG_MMAP refused: {str(exc).splitlines()[0]})"
    out["open_rss_mb"] = round(rss_mb() - before)
    q, gt = np.load(p["queries"]), np.load(p["gt"])

    def search(q, nprobe):
        index.nprobe = nprobe
        return index.search(q, K)[1]

    out["search"] = search_sweep(search, q, gt, a.nprobe)
    out["search_rss_mb"] = round(rss_mb())
    return out


def run_side_by_side(a) -> dict:
    """Both saved indexes opened memory-mapped in one process and searched in interleaved rounds
    at each nprobe (best of 3): wall QPS and CPU time per query (this process, all threads)."""
    import faiss
    import torch

    torch.set_num_threads(a.threads)
    faiss.omp_set_num_threads(a.threads)
    from hotops.ann import IVFPQIndex

    p = paths(a)
    tag = f"_ivf{a.nlist}_pq{a.m}x{a.nbits}"
    mine = IVFPQIndex.load(p["stem"] + "_hotops" + tag + ".idx", mmap=True)
    theirs = faiss.read_index(p["stem"] + "_faiss" + tag + ".index", faiss.IO_FLAG_MMAP)
    q, gt = np.load(p["queries"]), np.load(p["gt"])

    def faiss_search(q, nprobe):
        theirs.nprobe = nprobe
        return theirs.search(q, K)[1]

    libs = {"hotops": lambda q, n: mine.search(q, K, nprobe=n)[1], "faiss": faiss_search}
    out = {lib: [] for lib in libs}
    for nprobe in a.nprobe:
        best = {lib: (np.inf, np.inf, None) for lib in libs}
        for search in libs.values():  # warm the mapped pages and caches
            search(q[:50], nprobe)
        for _ in range(3):
            for lib, search in libs.items():
                t, c = time.perf_counter(), time.process_time()
                ids = search(q, nprobe)
                t, c = time.perf_counter() - t, time.process_time() - c
                best[lib] = min(best[lib], (t, c, ids), key=lambda b: b[0])
        for lib, (t, c, ids) in best.items():
            out[lib].append(
                dict(
                    nprobe=nprobe,
                    qps=round(q.shape[0] / t, 1),
                    cpu_us_per_query=round(1e6 * c / q.shape[0], 1),
                    recall=round(recall(ids, gt), 4),
                )
            )
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--clusters", type=int, default=4096)
    ap.add_argument("--nq", type=int, default=1000)
    ap.add_argument("--nlist", type=int, default=2048)
    ap.add_argument("--m", type=int, default=32)
    ap.add_argument("--nbits", type=int, default=8)
    ap.add_argument("--train", type=int, default=131072)
    ap.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--data", default="/work/data", help="folder for the corpus, ground truth and indexes")
    ap.add_argument(
        "--only",
        choices=["data", "hotops", "faiss", "side-by-side"],
        help="one stage; side-by-side: search both saved indexes in one process, interleaved",
    )
    ap.add_argument("--out", help="write the JSON report here")
    a = ap.parse_args(argv)
    a.nprobe = sorted({min(p, a.nlist) for p in a.nprobe})
    # faiss calls OpenBLAS, whose thread pool omp_set_num_threads does not cap: pin both before
    # faiss loads (the per-library processes inherit this), or "1 thread" runs on every core
    os.environ["OMP_NUM_THREADS"] = os.environ["OPENBLAS_NUM_THREADS"] = str(a.threads)
    if a.only == "data":
        return make_data(a)
    if a.only:
        run = {"hotops": run_hotops, "faiss": run_faiss, "side-by-side": run_side_by_side}[a.only]
        print(json.dumps(run(a)))
        return
    t = time.perf_counter()
    make_data(a)
    report = dict(args=vars(a), data_s=round(time.perf_counter() - t, 1))
    procs = {}  # one process each, side by side (the same contention): its own peak RSS
    for lib in ("hotops", "faiss"):
        cmd = [sys.executable, os.path.abspath(__file__), *(argv or sys.argv[1:]), "--only", lib]
        procs[lib] = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    for lib, proc in procs.items():
        out, _ = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"the {lib} run failed (exit {proc.returncode})")
        report[lib] = json.loads(out.strip().splitlines()[-1])
        print(lib, json.dumps(report[lib]), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
