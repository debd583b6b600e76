"""`hotops bench --contended`: the busy process beside the timing (paused for quiet blocks, running
for contended ones, always gone afterwards) and the per-case quiet / contended / kept figures."""

import os
import subprocess
import sys
import time
import types

import pytest

from hotops.bench import FAMILIES, cli, core


def _state(pid: int) -> str:
    """The process's state letter from /proc (R running, S sleeping, T stopped, ...), or "gone"."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return "gone"


def _gone(pid: int, timeout: float = 5.0) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if _state(pid) in ("gone", "Z", "X"):
            return True
        time.sleep(0.02)
    return False


pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs Linux /proc")


def test_busy_process_paused_running_and_killed():
    with core.contention(blocks=2) as busy:
        pid = busy.pid
        assert _state(pid) == "T"  # paused until a contended block
        seen = []
        for on in core.blocks():
            seen.append((on, _state(pid)))
        assert [on for on, _ in seen] == [False, True, True, False]
        assert all((st == "T") == (not on) for on, st in seen), seen
        assert _state(pid) == "T"
    assert _gone(pid)
    assert core._CONTENTION is None


def test_busy_process_killed_on_error_and_interrupt():
    for exc in (ValueError, KeyboardInterrupt):
        with pytest.raises(exc):
            with core.contention() as busy:
                pid = busy.pid
                busy.set_busy(True)
                raise exc()
        assert _gone(pid)


def test_busy_process_dies_with_its_parent():
    code = (
        "import os, sys; from hotops.bench import core\n"
        "c = core.Contention().start(); print(c.pid, flush=True); os._exit(0)"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    pid = int(out.stdout.split()[-1])
    assert _gone(pid)  # paused when its parent died, killed all the same


def test_time_pair_alternates_blocks():
    calls = []
    with core.contention(blocks=3) as busy:
        pid = busy.pid
        th, tp = core.time_pair(
            lambda: calls.append(("h", _state(pid))), lambda: calls.append(("p", 0)), repeats=3
        )
        assert len(busy.records) == 1
        rec = busy.records[0]
        assert len(rec.quiet) == 3 and len(rec.contended) == 3
        assert (th, tp) == rec.medians(False)
        # the busy process ran only during contended blocks: hotops' calls saw it stopped or running
        states = {st for side, st in calls if side == "h"}
        assert "T" in states and states - {"T"}
        # without a peer (the roofline probes), no blocks
        core.time_pair(lambda: None, None, repeats=2)
        assert len(busy.records) == 1
    assert _gone(pid)
    # outside contention(): plain timing, nothing recorded
    core.time_pair(lambda: None, lambda: None, repeats=2)


def _tiny_family(monkeypatch):
    """A family of two tiny cases, timed with core.time_pair like the real ones."""
    mod = types.ModuleType("hotops_tiny_bench")

    def cases(quick, device):
        return [dict(n=1), dict(n=2)]

    def run(params, quick, threads, device):
        xs = list(range(2000 * params["n"]))
        th, tp = core.time_pair(lambda: sum(xs), lambda: sorted(xs), repeats=3)
        return core.Result("tiny", f"n={params['n']}", "sorted", th, tp, "ok")

    mod.cases, mod.run = cases, run
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setitem(FAMILIES, "tiny", mod.__name__)
    fake = core.Machine("cpu", "avx512", 2, "t", "t", "3", 1.0, 1.0, 1.0, {})
    monkeypatch.setattr(cli, "machine", lambda device="cpu": fake)


def test_cli_contended(tmp_path, monkeypatch, capsys):
    _tiny_family(monkeypatch)
    seen = []
    real = core.Contention.start

    def start(self):
        out = real(self)
        seen.append(self.pid)
        return out

    monkeypatch.setattr(core.Contention, "start", start)
    js = tmp_path / "r.json"
    args = ["bench", "--family", "tiny", "--contended", "--where", "n=2", "--json", str(js)]
    assert cli.main(args + ["--plot", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "load average" in out and "kept" in out
    assert "n=2" in out and "n=1" not in out  # --where
    assert len(seen) == 1 and _gone(seen[0])
    md = (tmp_path / "r.md").read_text()
    assert "one busy process" in md
    import json

    res = json.loads(js.read_text())["results"]
    assert len(res) == 1
    ex = res[0]["extra"]
    assert ex["kept"] == pytest.approx(ex["contended_speedup"] / ex["quiet_speedup"])


def test_cli_refuses_what_it_cannot_honour_before_timing(tmp_path, monkeypatch, capsys):
    """A --where that matches nothing, a bad --threads, an output path that cannot be written:
    each an argparse error before any case runs (they used to time everything first, or print
    an empty table and exit 0)."""
    _tiny_family(monkeypatch)
    ran = []
    monkeypatch.setattr(sys.modules["hotops_tiny_bench"], "run", lambda *a: ran.append(a))
    base = ["bench", "--family", "tiny", "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path)]
    (tmp_path / "r.json").write_text("")
    (tmp_path / "broken").symlink_to(tmp_path / "missing")
    for extra, says in [
        (["--where", "n"], "expected KEY=VALUE"),
        (["--where", "m=1"], "no case matches m=1 (the cases' keys: n)"),
        (["--where", "n=3"], "no case matches n=3"),
        (["--threads", "0"], "must be at least 1"),
        (["--json", str(tmp_path)], "cannot write there"),
        (["--plot", "/proc/hotops-no-such-dir"], "cannot write there"),
        (["--json", str(tmp_path / "r.json" / "x.json")], "cannot write there"),
        (["--json", str(tmp_path / "new" / "r.json"), "--where", "n=3"], "no case matches"),
        (["--plot", str(tmp_path / "plots"), "--where", "n=3"], "no case matches"),
        (["--json", str(tmp_path / "new") + "/"], "a folder, not a file"),
        (["--json", str(tmp_path / "r.md")], "the markdown table is written beside it"),
        (["--plot", str(tmp_path / "r.json")], "cannot be the --json file"),
        (["--json", str(tmp_path / "broken" / "r.json")], "is a broken link"),
        (["--plot", str(tmp_path / ("x" * 300))], "a name longer than"),
    ]:
        with pytest.raises(SystemExit):
            cli.main(base + extra)
        assert says in capsys.readouterr().err
    assert not ran
    # a refused run leaves no folder behind (they were made at parsing)
    assert not (tmp_path / "new").exists() and not (tmp_path / "plots").exists()
    assert cli._selected({"keep": 1.0}, [cli._where("keep=1")])  # numbers compare as numbers


def test_writable_accepts_an_existing_file_and_leaves_it(tmp_path):
    """An existing file is overwritten in place: it is checked by opening it, and left as it was."""
    import argparse

    from hotops._argtypes import writable

    f = tmp_path / "kept.json"
    f.write_text("old")
    before = f.stat().st_mtime_ns
    writable(argparse.ArgumentParser(), str(f), "--json")
    assert f.read_text() == "old" and f.stat().st_mtime_ns == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.json"]  # no probe file left
