"""A readers-writer lock for the indexes: searches share it (they run in parallel, the kernels
release the GIL), changes (train, add, reset, set_codebooks) take it alone, so a search sees an
index before or after a change, never halfway through. Writers go first: once one waits, new
readers wait behind it. A thread that already holds the lock (either way) may take it again.

os.fork() (a DataLoader's workers, multiprocessing) waits until every index is between changes
and searches, holding them all, so that the child gets each index whole and its lock free: the
threads that held or awaited the lock in the parent do not exist in the child."""

from __future__ import annotations

import os
import threading
import weakref


class _Shared:
    __slots__ = ("lock", "nested")

    def __init__(self, lock: "RWLock"):
        self.lock = lock

    def __enter__(self):
        lock, mine = self.lock, self.lock._mine
        depth = getattr(mine, "depth", 0)
        self.nested = bool(depth) or lock._writer == threading.get_ident()
        if not self.nested:
            with lock._cond:
                while lock._writer is not None or lock._writers_waiting:
                    lock._cond.wait()
                lock._readers += 1
        mine.depth = depth + 1
        return self

    def __exit__(self, *exc):
        lock = self.lock
        lock._mine.depth -= 1
        if not self.nested:
            with lock._cond:
                lock._readers -= 1
                if not lock._readers:
                    lock._cond.notify_all()
        return False


class _Exclusive:
    __slots__ = ("lock", "nested")

    def __init__(self, lock: "RWLock"):
        self.lock = lock

    def __enter__(self):
        lock, me = self.lock, threading.get_ident()
        self.nested = lock._writer == me
        if self.nested:
            return self
        if getattr(lock._mine, "depth", 0):
            raise RuntimeError("cannot change an index from inside one of its own searches")
        with lock._cond:
            lock._writers_waiting += 1
            try:
                while lock._writer is not None or lock._readers:
                    lock._cond.wait()
            finally:
                lock._writers_waiting -= 1
            lock._writer = me
        return self

    def __exit__(self, *exc):
        if not self.nested:
            lock = self.lock
            with lock._cond:
                lock._writer = None
                lock._cond.notify_all()
        return False


class RWLock:
    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = None  # ident of the thread holding it exclusively
        self._writers_waiting = 0
        self._mine = threading.local()  # this thread's shared depth
        _LOCKS.add(self)

    def shared(self) -> _Shared:
        return _Shared(self)

    def exclusive(self) -> _Exclusive:
        return _Exclusive(self)


_LOCKS: "weakref.WeakSet[RWLock]" = weakref.WeakSet()
_FORKING = threading.Lock()  # one fork at a time holds the indexes
_HELD_ACROSS_FORK: list = []


def _before_fork() -> None:
    _FORKING.acquire()
    for lock in list(_LOCKS):
        if getattr(lock._mine, "depth", 0):  # forked from inside one of its searches: left as it is
            continue
        hold = lock.exclusive()
        hold.__enter__()
        _HELD_ACROSS_FORK.append(hold)


def _after_fork_in_parent() -> None:
    for hold in reversed(_HELD_ACROSS_FORK):
        hold.__exit__(None, None, None)
    _HELD_ACROSS_FORK.clear()
    _FORKING.release()


def _after_fork_in_child() -> None:
    """Every lock starts afresh, held only as this thread held it: the parent's other threads (and
    the condition's mutex, which one of them may have held) are not here."""
    me = threading.get_ident()
    for lock in list(_LOCKS):
        lock._cond = threading.Condition(threading.Lock())
        lock._readers = 1 if getattr(lock._mine, "depth", 0) else 0
        lock._writer = me if lock._writer == me and not _held(lock) else None
        lock._writers_waiting = 0
    _HELD_ACROSS_FORK.clear()
    global _FORKING
    _FORKING = threading.Lock()


def _held(lock: RWLock) -> bool:
    """Whether this thread's exclusive hold of lock is the one taken for the fork."""
    return any(hold.lock is lock and not hold.nested for hold in _HELD_ACROSS_FORK)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child
    )
