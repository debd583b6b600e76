"""The run-time CPU feature switches (csrc/common/cpu_features.h): names, the environment
override, refusals, and fast_bf16_dot's measured rate."""

import json
import os
import subprocess
import sys

import pytest
from conftest import busy_processes

from hotops import _backend

FEATURES = ("vbmi", "avx512_bf16", "avx512_fp16", "amx_bf16", "fast_bf16_dot")


def test_unknown_feature_names_the_known_ones():
    with pytest.raises(ValueError, match="fast_bf16_dot"):
        _backend.ext().feature("avx1024")


@pytest.mark.parametrize("name", FEATURES)
def test_switch_refuses_what_the_cpu_lacks(name):
    ext = _backend.ext()
    before = ext.feature(name)
    try:
        ext.set_feature(name, False)
        assert not ext.feature(name)
        if ext.cpu_has(name):
            ext.set_feature(name, True)
            assert ext.feature(name)
        else:
            with pytest.raises(ValueError, match=name):
                ext.set_feature(name, True)
    finally:
        ext.set_feature(name, before)


def test_fast_bf16_dot_needs_avx512_bf16():
    ext = _backend.ext()
    assert ext.cpu_has("fast_bf16_dot") == ext.cpu_has("avx512_bf16")
    assert not ext.feature("fast_bf16_dot") or ext.cpu_has("avx512_bf16")


def _features_in_child(env):
    code = (
        "import json; from hotops import _backend; e = _backend.ext(); "
        f"print(json.dumps([e.feature(f) for f in {FEATURES!r}]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, check=True
    )
    return dict(zip(FEATURES, json.loads(out.stdout)))


def test_environment_turns_features_off():
    assert not any(_features_in_child({f"HOTOPS_{name.upper()}": "0" for name in FEATURES}).values())


def test_fast_bf16_dot_decides_the_same_under_load():
    """The rate is measured at detection (best of five alternated runs): a busy core beside it
    does not flip the decision."""
    if not _backend.ext().cpu_has("fast_bf16_dot") or "HOTOPS_FAST_BF16_DOT" in os.environ:
        pytest.skip("no AVX512_BF16, or the decision is forced")
    quiet = _features_in_child({})["fast_bf16_dot"]
    with busy_processes():
        decisions = {_features_in_child({})["fast_bf16_dot"] for _ in range(2)}
    assert decisions == {quiet}


_ONE_CALL = (
    "import torch, hotops; from hotops.sparse import SparseWeight; "
    "sw = SparseWeight.from_dense(torch.ones(8, 8)); x = torch.ones(2, 8); "
    "assert torch.equal(hotops.sparse_linear(x, sw), torch.full((2, 8), 8.0)); "
    "print(hotops._backend.ext().isa())"
)


def _run_child(env):
    return subprocess.run(
        [sys.executable, "-c", _ONE_CALL], env={**os.environ, **env}, capture_output=True, text=True
    )


def test_isa_environment_variable_is_checked():
    ext = _backend.ext()
    best = ext.best_isa()
    out = _run_child({"HOTOPS_ISA": f" {best.upper()} "})  # any case, spaces ignored
    assert out.returncode == 0 and out.stdout.split()[-1] == best, out.stderr
    out = _run_child({"HOTOPS_ISA": "avx1024"})
    assert out.returncode != 0 and "HOTOPS_ISA='avx1024' names no ISA" in out.stderr
    order = ["scalar", "avx2", "avx512"]
    if best != order[-1]:  # a variant this CPU cannot run is refused, not silently replaced
        out = _run_child({"HOTOPS_ISA": order[-1]})
        assert out.returncode != 0 and "cannot run the" in out.stderr


@pytest.mark.parametrize(
    "name,value",
    [("HOTOPS_SPIN_US", "abc"), ("HOTOPS_SPIN_US", "9223372036854775807"), ("HOTOPS_CONTENDED_MS", "-1")],
)
def test_tuning_variables_out_of_range_fall_back_and_say_so(name, value):
    out = _run_child({name: value})
    assert out.returncode == 0, out.stderr
    assert f"{name}={value} is not a whole number" in out.stderr
