"""Helpers the sparse suites share (test_sparse.py, test_sparse_modules.py, test_sparse_blocked.py):
the reference in float64 and in the input's precision, and the tolerance idiom against them."""

from __future__ import annotations

from conftest import assert_close_to_reference


def reference_pair(fn, x, sw, *args, **kw):
    """The reference in float64 and in x's precision (the tolerance idiom)."""
    sw64 = sw.with_values(sw.values.double())
    b = kw.pop("bias", None)
    r64 = fn(x.double(), sw64, b.double() if b is not None else None, *args, **kw)
    return r64, fn(x, sw, b, *args, **kw)


def check_close(y, r64, r32, **kw):
    """y has the reference's shape and is within the tolerance idiom of it (kw: its atol, rtol)."""
    assert y.shape == r32.shape
    if y.numel():
        assert_close_to_reference(y, r64, r32, **kw)
