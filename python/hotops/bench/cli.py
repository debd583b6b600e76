"""`hotops bench [--family F] [--quick] [--contended] [--where KEY=VALUE] [--json PATH] [--plot DIR]
[--threads N]`."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import sys
import time

import torch

from hotops._argtypes import whole, writable
from hotops.bench import FAMILIES, core
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
    print_rows(table_rows(results, mach), out)


def _markdown(rows):
    return (
        "| "
        + " | ".join(rows[0])
        + " |\n|"
        + "---|" * len(rows[0])
        + "\n"
        + "".join("| " + " | ".join(str(c) for c in row) + " |\n" for row in rows[1:])
    )


def _markdown_path(json_path: str) -> str:
    return os.path.splitext(json_path)[0] + ".md"


def write_markdown(results, mach, path, command, contended=None):
    with open(path, "w") as f:
        f.write(f"Command: `{command}`\n\nMachine: {mach.describe()}\n\n")
        f.write(_markdown(table_rows(results, mach)))
        if contended:
            f.write(f"\nBeside one busy process ({contended}):\n\n")
            f.write(_markdown(contention_rows(results)))


def _loadavg() -> str:
    try:
        return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "load average unknown"


def contention_rows(results):
    rows = [("family", "case", "peer", "quiet", "one busy process", "kept")]
    for r in results:
        if "kept" not in r.extra:
            continue
        kept = r.extra["kept"]
        rows.append(
            (
                r.family,
                r.case,
                r.peer,
                f"{r.extra['quiet_speedup']:.2f}x",
                f"{r.extra['contended_speedup']:.2f}x",
                f"{kept:.2f}" + (" (< 0.7)" if kept < 0.7 else ""),
            )
        )
    return rows


def print_rows(rows, out=sys.stdout):
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip(), file=out)
        if i == 0:
            print("  ".join("-" * w for w in widths), file=out)


def _where(text: str) -> tuple:
    """One --where argument as (key, value); argparse reports a malformed one."""
    key, eq, value = text.partition("=")
    if not eq or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


def _equal(have, want: str) -> bool:
    """A case parameter against a --where value: as text, or as numbers (keep=1 is keep=1.0)."""
    if str(have) == want:
        return True
    try:
        return float(have) == float(want)
    except (TypeError, ValueError):
        return False


def _selected(params: dict, where) -> bool:
    """--where KEY=VALUE (repeatable): the case's parameters have every KEY, equal to VALUE."""
    return all(key in params and _equal(params[key], value) for key, value in where or ())


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
    b.add_argument("--threads", type=whole(1), default=None, help="threads for everyone (default: torch's)")
    b.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run the cases")
    b.add_argument(
        "--contended",
        action="store_true",
        help="also time every case beside one busy process (a spin loop), in alternated quiet and "
        "busy blocks; prints the quiet ratio, the contended ratio and kept = contended / quiet",
    )
    b.add_argument(
        "--where",
        action="append",
        type=_where,
        metavar="KEY=VALUE",
        help="repeatable: only the cases whose parameters have KEY equal to VALUE (e.g. N=11008)",
    )
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is visible to torch")
    if args.contended and args.device != "cpu":
        p.error("--contended: the busy process competes for CPU cores; use it with --device cpu")
    # all made, with their missing folders, when the results are written: the JSON, the markdown
    # table beside it, the plots' folder
    writable(p, args.json, "--json", make_folders=True)
    md = _markdown_path(args.json)
    if os.path.abspath(md) == os.path.abspath(args.json):
        p.error(f"--json {args.json!r}: the markdown table is written beside it as {md}; name it .json")
    if os.path.abspath(args.plot) in (os.path.abspath(args.json), os.path.abspath(md)):
        p.error(f"--plot {args.plot!r}: the folder of the plots cannot be the --json file or its table")
    writable(p, md, "--json (its markdown table)", make_folders=True)
    writable(p, args.plot, "--plot", folder=True, make_folders=True)
    # every family's selected cases, known before anything is timed
    plan, keys = [], set()
    for fam in args.family or list(FAMILIES):
        mod = importlib.import_module(FAMILIES[fam])
        cases = mod.cases(args.quick, args.device)
        keys.update(k for params in cases for k in params)
        plan.append((mod, [params for params in cases if _selected(params, args.where)]))
    if not any(cases for _, cases in plan):
        p.error(
            "--where: no case matches "
            + " ".join(f"{k}={v}" for k, v in args.where or ())
            + f" (the cases' keys: {', '.join(sorted(keys))})"
        )
    mach = machine(args.device)
    flags = "".join(f for f, on in ((" --quick", args.quick), (" --contended", args.contended)) if on)
    print(f"hotops bench{flags}: {mach.describe()}", flush=True)
    load_before = _loadavg()
    if args.contended:
        print(
            f"  {load_before} before the run; each pair is timed in {core.BLOCKS} quiet and "
            f"{core.BLOCKS} busy blocks, alternated",
            flush=True,
        )
    results, t0 = [], time.time()
    with core.contention() if args.contended else contextlib.nullcontext() as busy:
        for mod, cases in plan:
            for params in cases:
                first = len(busy.records) if busy else 0
                r = mod.run(params, args.quick, threads, args.device)
                results.append(r)
                sp = f"{r.speedup:.2f}x" if r.speedup else f"- ({r.note})"
                line = f"  {r.family:9s} {r.case:42s} speed-up {sp}  check {r.check}"
                if busy:
                    fig = core.contended_figures(r, busy.records[first:])
                    if fig:
                        line += (
                            f"  | quiet {fig['quiet_speedup']:.2f}x busy {fig['contended_speedup']:.2f}x"
                            f" kept {fig['kept']:.2f}"
                        )
                print(line, flush=True)
            if hasattr(mod, "plots"):
                mod.plots(results, args.plot)
    contended = None
    if args.contended:
        contended = f"{load_before} before, {_loadavg()} after"
    print()
    print_table(results, mach)
    if contended:
        print(f"\nbeside one busy process ({contended}):")
        print_rows(contention_rows(results))
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(
            {
                "machine": dataclasses.asdict(mach),
                "quick": args.quick,
                "contended": contended,
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
    md = _markdown_path(args.json)
    write_markdown(results, mach, md, "hotops " + " ".join(sys.argv[1:] if argv is None else argv), contended)
    png = plot(results, os.path.join(args.plot, "speedups.png"))
    print(f"\nwrote {args.json}, {md}" + (f" and {png}" if png else ""))
    return 0 if all(r.check == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
