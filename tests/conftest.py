import contextlib
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

# Triton kernels run in the interpreter wherever there is no GPU; must be set before triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import settings  # noqa: E402

from hotops import _backend  # noqa: E402

# Property tests draw the same examples on every run: CI stays reproducible, and a failure seen
# once is seen again. HYPOTHESIS_PROFILE=explore draws new examples for local bug hunting.
settings.register_profile("ci", derandomize=True, deadline=None)
settings.register_profile("explore", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

_ORDER = ("scalar", "avx2", "avx512")
ISAS = _ORDER[: _ORDER.index(_backend.ext().best_isa()) + 1]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (runs in benchmarks/gpu_check.sh)")
    # raised inside torch's own opcheck / compile machinery, not by hotops
    config.addinivalue_line(
        "filterwarnings", "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"
    )


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(params=ISAS)
def isa(request):
    """Runs a test once per SIMD variant this CPU supports, then restores the best one."""
    ext = _backend.ext()
    ext.set_isa(request.param)
    yield request.param
    ext.set_isa(ext.best_isa())


_BF16_FEATURES = ("amx_bf16", "avx512_bf16", "fast_bf16_dot")
# which features each bf16 product path turns on (the rest off); "float32": the inputs converted
_BF16_PATHS = {
    "float32": (),
    "vdpbf16ps": ("avx512_bf16", "fast_bf16_dot"),
    "amx": ("amx_bf16", "avx512_bf16"),
}


@pytest.fixture(params=[p for p, on in _BF16_PATHS.items() if all(_backend.ext().cpu_has(f) for f in on)])
def bf16_path(request):
    """Runs a test once per bf16 product path this CPU has (AMX tiles, vdpbf16ps alone, or the
    inputs converted to float32), at the best ISA, then restores the features as they were."""
    ext = _backend.ext()
    before = {f: ext.feature(f) for f in _BF16_FEATURES}
    ext.set_isa(ext.best_isa())
    for f in before:
        ext.set_feature(f, f in _BF16_PATHS[request.param])
    yield request.param
    for f, on in before.items():
        ext.set_feature(f, on)


@contextlib.contextmanager
def busy_processes():
    """One spinning process per core for the duration (killed on the way out, whatever happens)."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        yield
    finally:
        for p in busy:
            p.kill()
            p.wait()


def assert_close_to_reference(out, ref64, ref_lp, atol=1e-5, name="output", rtol=0.0):
    """DESIGN.md's tolerance idiom: the kernel's error against a float64 reference is at most
    twice the error the reference itself makes in the input's precision, plus a small atol
    (and rtol times the largest reference magnitude, for sums whose float32 rounding the
    reference may happen to dodge)."""
    out, ref64, ref_lp = out.double(), ref64.double(), ref_lp.double()
    err = (out - ref64).abs().max().item()
    ref_err = (ref_lp - ref64).abs().max().item()
    tol = 2 * ref_err + atol + rtol * (ref64.abs().max().item() if ref64.numel() else 0.0)
    assert err <= tol, f"{name}: error {err:.3g} > 2 × reference error {ref_err:.3g} + {atol:g} (+ rtol)"


def require_triton_runs():
    """Skip unless Triton kernels can run here: on a GPU, or in the CPU interpreter of
    triton >= 3.2 (older interpreters reject constexpr arguments of nested jit functions)."""
    if not _backend.triton_available():
        pytest.skip("triton is not installed")
    if torch.cuda.is_available():
        return
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    import triton

    if tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 2):
        pytest.skip(
            f"the interpreter of triton {triton.__version__} cannot run these kernels "
            "(nested jit functions lose constexpr arguments); the GPU path is unaffected"
        )
