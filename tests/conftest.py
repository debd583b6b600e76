import os
import random

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
