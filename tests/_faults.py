"""Helpers the per-family fault suites share (test_infonce_faults.py, test_codebook_faults.py,
test_attention_faults.py; test_sparse_state.py and test_ann_file_faults.py run threads with it):
the property-test settings, the non-finite comparisons, value and layout generators, and a thread
runner."""

from __future__ import annotations

import math
import os
import threading

import torch
from conftest import assert_close_to_reference
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

# 30 examples per property in CI; HOTOPS_FAULT_EXAMPLES=500 HYPOTHESIS_PROFILE=explore hunts wider
FAST = settings(
    max_examples=int(os.environ.get("HOTOPS_FAULT_EXAMPLES", "30")),
    deadline=None,
    suppress_health_check=list(HealthCheck),
)


def same_nonfinite(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """NaN exactly where the reference has NaN, +-inf exactly where it has +-inf."""
    out, ref = out.double(), ref.double()
    assert torch.equal(out.isnan(), ref.isnan()), (
        f"{what}: NaN at {out.isnan().nonzero().tolist()}, reference at {ref.isnan().nonzero().tolist()}"
    )
    inf = ref.isinf()
    assert torch.equal(out.isinf(), inf), f"{what}: inf pattern differs from the reference"
    assert torch.equal(out[inf], ref[inf]), f"{what}: inf signs differ from the reference"


def same_finite(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """Finite exactly where the reference is finite (where it is not, NaN and inf may differ:
    F.cross_entropy and logsumexp disagree on a +inf logit, NaN vs +inf)."""
    assert torch.equal(out.isfinite(), ref.isfinite()), (
        f"{what}: finite {out.isfinite().tolist()}, reference {ref.isfinite().tolist()}"
    )


def close_where_finite(out, ref64, ref_lp, atol, what, rtol=1e-5, may_be_finite=False):
    """Each output is finite where the float64 reference or the reference in the inputs' dtype
    is (low-precision logits overflow in both the kernel's GEMM and the reference's), and within
    the tolerance idiom of the float64 reference where both references are finite.
    may_be_finite: the output may also be finite where the references are not."""
    fin_out = out.isfinite()
    ok = (fin_out == ref64.isfinite()) | (fin_out == ref_lp.isfinite())
    if may_be_finite:
        ok |= fin_out
    assert ok.all(), (
        f"{what}: finite where the references are not (or not where they are) at {(~ok).nonzero().tolist()}"
    )
    fin = torch.isfinite(ref64) & torch.isfinite(ref_lp.double())
    if fin.any():
        assert_close_to_reference(
            out.double()[fin], ref64[fin], ref_lp.double()[fin], atol=atol, rtol=rtol, name=what
        )


def in_layout(t: torch.Tensor, how: str) -> torch.Tensor:
    """The same values in another memory layout."""
    if how == "transposed":
        return t.T.contiguous().T
    if how == "offset":
        big = torch.empty(t.shape[0] + 1, t.shape[1] + 3, dtype=t.dtype)
        big[1:, 2:-1] = t
        return big[1:, 2:-1]
    return t


VALUES = st.sampled_from(["normal", "huge", "tiny", "nan", "inf", "-inf"])


def make_values(kind: str, *shape, dtype=torch.float32, gen=None) -> torch.Tensor:
    x = torch.randn(*shape, generator=gen)
    if kind == "huge":
        x = x * 1e15 if dtype == torch.float32 else x * 1e4
    elif kind == "tiny":
        x = x * 1e-30
    x = x.to(dtype)
    if kind in ("nan", "inf", "-inf") and x.numel():
        x.view(-1)[int(torch.randint(0, x.numel(), (1,), generator=gen))] = {
            "nan": math.nan,
            "inf": math.inf,
            "-inf": -math.inf,
        }[kind]
    return x


def run_threads(fn, n=4):
    errors, results = [], [None] * n
    barrier = threading.Barrier(n)

    def work(i):
        try:
            barrier.wait()
            results[i] = fn(i)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    return results
