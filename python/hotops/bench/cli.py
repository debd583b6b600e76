"""`hotops bench [--family F] [--quick] [--json PATH] [--plot DIR] [--threads N]`."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
import time

import torch

from hotops.bench import FAMILIES
from hotops.bench.core import machine


def _fmt_ms(s):
    return "-" if s is None else f"{s * 1e3:.1f}"


def table_rows(results, mach):
    rows = [
        (
            "family",
            "case",
            "peer",
            "hotops ms",
            "peer ms",
            "speed-up",
            "% roofline",
            "memory (hotops/peer)",
            "check",
        )
    ]
    for r in results:
        sp = r.speedup
        roof = r.roofline_pct(mach)
        mem = (
            f"{r.extra['mem_hotops_MB']:.0f}/{r.extra['mem_peer_MB']:.0f} MB"
            if "mem_hotops_MB" in r.extra
            else ""
        )
        rows.append(
            (
                r.family,
                r.case,
                r.peer,
                _fmt_ms(r.hotops_s),
                _fmt_ms(r.peer_s),
                "-" if sp is None else f"{sp:.2f}x",
                "-" if roof is None else f"{roof:.0f}%",
                mem,
                r.check + (f" ({r.note})" if r.note else ""),
            )
        )
    return rows


def print_table(results, mach, out=sys.stdout):
    rows = table_rows(results, mach)
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip(), file=out)
        if i == 0:
            print("  ".join("-" * w for w in widths), file=out)


def write_markdown(results, mach, path, command):
    rows = table_rows(results, mach)
    with open(path, "w") as f:
        f.write(f"Command: `{command}`\n\nMachine: {mach.describe()}\n\n")
        f.write("| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]) + "\n")
        for row in rows[1:]:
            f.write("| " + " | ".join(str(c) for c in row) + " |\n")


def plot(results, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'hotops[bench]')")
        return None
    rs = [r for r in results if r.speedup]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rs) + 1.5))
    labels = [f"{r.family}: {r.case} vs {r.peer}" for r in rs]
    # log axis: bars grow from 1x either way, so a 0.5x slowdown is as long as a 2x speed-up and
    # the largest ratios (tens of x) do not flatten the rest
    ax.barh(
        labels,
        [r.speedup - 1.0 for r in rs],
        left=1.0,
        color=["tab:green" if r.speedup >= 1 else "tab:red" for r in rs],
    )
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("speed-up (peer time / hotops time, log scale)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(prog="hotops")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="time hotops side by side against the peers")
    b.add_argument("--family", action="append", choices=sorted(FAMILIES), help="repeatable; default all")
    b.add_argument("--quick", action="store_true", help="a few minutes on 2 cores")
    b.add_argument("--json", default="bench-results/results.json", help="where to write raw results")
    b.add_argument("--plot", default="bench-results", help="folder for the PNG plots")
    b.add_argument("--threads", type=int, default=None, help="threads for everyone (default: torch's)")
    b.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run the cases")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is visible to torch")
    mach = machine(args.device)
    print(f"hotops bench{' --quick' if args.quick else ''}: {mach.describe()}", flush=True)
    results, t0 = [], time.time()
    for fam in args.family or list(FAMILIES):
        mod = importlib.import_module(FAMILIES[fam])
        for params in mod.cases(args.quick, args.device):
            r = mod.run(params, args.quick, threads, args.device)
            results.append(r)
            sp = f"{r.speedup:.2f}x" if r.speedup else f"- ({r.note})"
            print(f"  {r.family:9s} {r.case:42s} speed-up {sp}  check {r.check}", flush=True)
        if hasattr(mod, "plots"):
            mod.plots(results, args.plot)
    print()
    print_table(results, mach)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(
            {
                "machine": dataclasses.asdict(mach),
                "quick": args.quick,
                "seconds": time.time() - t0,
                "results": [
                    dict(dataclasses.asdict(r), speedup=r.speedup, roofline_pct=r.roofline_pct(mach))
                    for r in results
                ],
            },
            f,
            indent=1,
        )
    os.makedirs(args.plot, exist_ok=True)
    md = os.path.splitext(args.json)[0] + ".md"
    write_markdown(results, mach, md, "hotops " + " ".join(sys.argv[1:] if argv is None else argv))
    png = plot(results, os.path.join(args.plot, "speedups.png"))
    print(f"\nwrote {args.json}, {md}" + (f" and {png}" if png else ""))
    return 0 if all(r.check == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
