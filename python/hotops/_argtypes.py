"""argparse types and checks shared by `hotops bench` and the example scripts (examples/*.py).

A bad size or path must stop the command at parsing, naming the flag: otherwise it surfaces
minutes or hours later, deep in the package (an empty calibration after the training stages), or
never (a NaN speed-up printed as a result)."""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from typing import Callable, Optional


def whole(low: int) -> Callable[[str], int]:
    """A whole number >= low."""

    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {n}")
        return n

    return parse


def number(low: float, low_open: bool = False, high: Optional[float] = None, high_open: bool = False):
    """A finite float >= low (> low with low_open), and <= high (< high with high_open)."""
    below = f"{'above' if low_open else 'at least'} {low}"
    above = "" if high is None else f" and {'below' if high_open else 'at most'} {high}"

    def parse(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        fits = math.isfinite(x) and (x > low if low_open else x >= low)
        if high is not None:
            fits = fits and (x < high if high_open else x <= high)
        if not fits:
            raise argparse.ArgumentTypeError(f"must be a finite number {below}{above}, got {text}")
        return x

    return parse


def listed(item: Callable[[str], object]) -> Callable[[str], list]:
    """Comma-separated values, each parsed by `item` (another type of this module)."""

    def parse(text: str) -> list:
        return [item(t.strip()) for t in text.split(",")]

    return parse


def writable(
    ap: argparse.ArgumentParser, path: str, flag: str, folder: bool = False, make_folders: bool = False
) -> None:
    """Refuses, at parsing, an output path that could only fail when it is written at the end of
    the run: a file path that is a folder, a missing folder (unless the caller makes the missing
    folders when it writes: `make_folders`), or one where no file can be created. Creates nothing,
    so a run refused later leaves no folder behind."""
    target = os.path.abspath(path) if folder else os.path.dirname(os.path.abspath(path))
    existing = target
    while make_folders and not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not path or (not folder and os.path.isdir(path)):
        why = "a folder, not a file"
    elif not os.path.isdir(existing):
        why = f"{existing} is not a folder" if os.path.exists(existing) else f"no folder {existing}"
    else:
        try:  # os.access says yes to root even where nothing can be created (/proc)
            tempfile.TemporaryFile(dir=existing).close()
            return
        except OSError as e:
            why = f"cannot create a file in {existing}: {e.strerror}"
    ap.error(f"{flag} {path!r}: cannot write there ({why})")
