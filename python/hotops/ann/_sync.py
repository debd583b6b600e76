"""A readers-writer lock for the indexes: searches share it (they run in parallel, the kernels
release the GIL), changes (train, add, reset, set_codebooks) take it alone, so a search sees an
index before or after a change, never halfway through. Writers go first: once one waits, new
readers wait behind it. A thread that already holds the lock (either way) may take it again."""
from __future__ import annotations

import contextlib
import threading


class RWLock:
    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = None  # ident of the thread holding it exclusively
        self._writers_waiting = 0
        self._mine = threading.local()

    def _depth(self) -> int:
        return getattr(self._mine, "depth", 0)

    @contextlib.contextmanager
    def shared(self):
        me = threading.get_ident()
        if self._writer == me or self._depth():
            self._mine.depth = self._depth() + 1
            try:
                yield
            finally:
                self._mine.depth -= 1
            return
        with self._cond:
            while self._writer is not None or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        self._mine.depth = 1
        try:
            yield
        finally:
            self._mine.depth = 0
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self):
        me = threading.get_ident()
        if self._writer == me:
            yield
            return
        if self._depth():
            raise RuntimeError("cannot change an index from inside one of its own searches")
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer is not None or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = me
        try:
            yield
        finally:
            with self._cond:
                self._writer = None
                self._cond.notify_all()
