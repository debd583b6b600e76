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
    the run: a file path that is a folder (or ends in a slash), a missing folder (unless the
    caller makes the missing folders when it writes: `make_folders`), a broken link or a name too
    long on the way, or a place where no file can be created. Creates nothing, so a run refused
    later leaves no folder behind."""
    why = _cannot_write(path, folder, make_folders)
    if why:
        ap.error(f"{flag} {path!r}: cannot write there ({why})")


def _cannot_write(path: str, folder: bool, make_folders: bool) -> Optional[str]:
    if not path:
        return "an empty path"
    if not folder and (path.endswith(("/", os.sep)) or os.path.isdir(path)):
        return "a folder, not a file"
    if not folder and os.path.isfile(path):  # overwritten in place: only the file must be writable
        try:
            open(path, "a").close()  # opens, writes nothing
            return None
        except OSError as e:
            return f"cannot open it for writing: {e.strerror}"
    target = os.path.abspath(path) if folder else os.path.dirname(os.path.abspath(path))
    existing = target
    while make_folders and not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if os.path.islink(existing) and not os.path.exists(existing):
        return f"{existing} is a broken link"
    if not os.path.isdir(existing):
        return f"{existing} is not a folder" if os.path.exists(existing) else f"no folder {existing}"
    try:
        longest = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):
        longest = 255
    missing = os.path.relpath(os.path.abspath(path), existing).split(os.sep)
    if any(len(os.fsencode(part)) > longest for part in missing):
        return f"a name longer than {longest} bytes"
    try:  # os.access says yes to root even where nothing can be created (/proc)
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as e:
        return f"cannot create a file in {existing}: {e.strerror}"
    return None
