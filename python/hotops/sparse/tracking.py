"""Cache keys for the sparse modules: tracked parameters and buffers that count every change.

The blocked values, a module's dense weight and its prepared call are copies derived from
tensors a user may change: in place (bumps ``_version``), by ``.data = new`` (new storage, same
object and version) or through a ``.data`` alias (``p.data.mul_(2)``: the alias has a version
counter of its own, so neither p's version nor its storage changes). A tracked tensor (what the
modules' parameters and buffers are: TrackedParameter, TrackedBuffer) counts its ``.data``
reads and writes, keeps weak references to its live ``.data`` aliases, and bumps the "cells"
of the modules that hold it (a cell: [generation, live aliases]). ``state_key`` combines all
of it for one tensor. Writes that bypass torch (a NumPy view, DLPack, ctypes) are not seen.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Optional

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

_DATA = torch._C.TensorBase.data
_BUILD_LOCK = threading.RLock()  # serialises cache builds; published caches are read without it
if hasattr(os, "register_at_fork"):  # a fork waits for a build in progress: the child gets it free
    os.register_at_fork(
        before=_BUILD_LOCK.acquire, after_in_parent=_BUILD_LOCK.release, after_in_child=_BUILD_LOCK.release
    )


def _bump(t) -> None:
    d = t.__dict__
    d["_hotops_gen"] = d.get("_hotops_gen", 0) + 1
    for cell in d.get("_hotops_cells", ()):
        cell[0] += 1


def _after_optimizer_step(optimizer, args, kwargs) -> None:
    """torch's fused optimizers (``fused=True``: Adam, AdamW, SGD, Adagrad) write the parameters
    in place without bumping their version counters, so every step counts as a change of the
    tracked ones: without it, caches keyed on versions (the blocked values, a module's dense
    weight, its prepared call) kept the weights from before the step, in training too."""
    for group in optimizer.param_groups:
        if group.get("fused"):  # the others bump versions, which the caches check already
            for p in group["params"]:
                if isinstance(p, _Tracked):
                    _bump(p)


def _note_alias(t, alias) -> None:
    """alias = t.data: the change is counted now, and the alias's writes while it lives."""
    d = t.__dict__
    ref = weakref.ref(alias, _alias_died(t))
    d.setdefault("_hotops_aliases", []).append(ref)
    for cell in d.get("_hotops_cells", ()):
        cell[1].append(ref)
    _bump(t)


def _alias_died(t):
    owner = weakref.ref(t)

    def died(ref):
        q = owner()
        if q is None:
            return
        _bump(q)  # the alias may have been written to just before it died
        d = q.__dict__
        for lst in [d.get("_hotops_aliases", [])] + [c[1] for c in d.get("_hotops_cells", ())]:
            try:
                lst.remove(ref)
            except ValueError:
                pass

    return died


class _Tracked:
    """``.data`` reads and writes counted (see above); mixed into a Parameter or Tensor class."""

    @property
    def data(self):
        d = _DATA.__get__(self)
        _note_alias(self, d)
        return d

    @data.setter
    def data(self, new):
        _DATA.__set__(self, new)
        _bump(self)

    def __repr__(self):
        text = repr(_DATA.__get__(self))
        return "Parameter containing:\n" + text if isinstance(self, nn.Parameter) else text


class TrackedParameter(_Tracked, nn.Parameter):
    """An nn.Parameter whose ``.data`` reads and writes are counted, so caches derived from it
    notice ``p.data = new`` and ``p.data.mul_(2)`` (which bump no version counter). Everything
    else is nn.Parameter's; ``track`` turns an existing Parameter into one in place (its identity,
    and so an optimizer's reference to it, is kept)."""

    def __new__(cls, data=None, requires_grad=True, **kwargs):
        # accelerate's init_empty_weights re-creates a registered Parameter as
        # type(p)(p.to("meta"), **p.__dict__): the old one's bookkeeping (_hotops_*) is not the new
        # one's (whatever registers it tracks it), and p.to("meta") of a meta p is p itself, which
        # Parameter.__new__ takes for a tensor subclass; other keywords fail as Parameter's do
        kwargs = {k: v for k, v in kwargs.items() if not k.startswith("_hotops_")}
        if isinstance(data, _Tracked):
            data = _DATA.__get__(data)
        return super().__new__(cls, data, requires_grad, **kwargs)

    def __deepcopy__(self, memo):
        if id(self) not in memo:
            memo[id(self)] = TrackedParameter(
                _DATA.__get__(self).clone(memory_format=torch.preserve_format), self.requires_grad
            )
        return memo[id(self)]

    def __reduce_ex__(self, proto):  # pickles as a plain Parameter; the module tracks it again
        return nn.Parameter(_DATA.__get__(self), self.requires_grad).__reduce_ex__(proto)


class TrackedBuffer(_Tracked, torch.Tensor):
    """A plain tensor (ops on it return plain tensors) whose ``.data`` reads and writes are counted."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __deepcopy__(self, memo):
        if id(self) not in memo:
            memo[id(self)] = _DATA.__get__(self).clone(memory_format=torch.preserve_format)
        return memo[id(self)]

    def __reduce_ex__(self, proto):  # pickles as a plain tensor; the module tracks it again
        return _DATA.__get__(self).__reduce_ex__(proto)


register_optimizer_step_post_hook(_after_optimizer_step)  # every optimizer, once


def traceable(t: Optional[Tensor]) -> Optional[Tensor]:
    """t as a plain tensor while torch.compile traces (the tracked subclasses are not traceable;
    as_subclass is a view that stays attached to autograd), else t itself."""
    return t.as_subclass(Tensor) if t is not None and torch.compiler.is_compiling() else t


def track(t, cell: Optional[list] = None):
    """t as a tracked tensor (the same object: TrackedParameter for an nn.Parameter,
    TrackedBuffer for a plain tensor), reporting to ``cell`` too; None stays None."""
    if t is None:
        return t
    if type(t) is nn.Parameter:
        t.__class__ = TrackedParameter
    elif type(t) is Tensor:
        t.__class__ = TrackedBuffer
    if cell is not None and isinstance(t, _Tracked):
        cells = t.__dict__.setdefault("_hotops_cells", [])
        if not any(c is cell for c in cells):
            cells.append(cell)
    return t


def alias_versions(aliases: list) -> tuple:
    """The in-place versions of the live ``.data`` aliases in a list of weak references."""
    return tuple(a._version for a in (r() for r in aliases) if a is not None)


def _version(t: Tensor) -> Optional[int]:
    try:
        return t._version
    except RuntimeError:  # an inference tensor keeps no version: it changes only by replacement
        return None


def state_key(t: Optional[Tensor]) -> tuple:
    """What a copy derived from t depends on: its storage, shape, strides and dtype, its in-place
    version, and for a tracked tensor its ``.data`` reads, writes and live aliases."""
    if t is None:
        return ()
    v = _version(t)
    if isinstance(t, _Tracked):
        d = t.__dict__
        v = (v, d.get("_hotops_gen", 0), alias_versions(d.get("_hotops_aliases", ())))
    return (t.data_ptr(), v, t.shape, t.stride(), t.dtype)


def _quick_key(t: Tensor) -> tuple:
    """state_key without shape, strides and dtype, for tensors checked elsewhere on every call
    (values: dtype and length by the ops' validation; b_perm: never swapped but by the layer):
    a storage change shows in data_ptr, or for a tracked tensor in its .data count."""
    v = _version(t)
    if isinstance(t, _Tracked):
        d = t.__dict__
        aliases = d.get("_hotops_aliases")
        return t.data_ptr(), v, d.get("_hotops_gen", 0), alias_versions(aliases) if aliases else ()
    return t.data_ptr(), v
