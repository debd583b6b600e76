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
