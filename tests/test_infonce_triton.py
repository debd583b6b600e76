"""hotops.info_nce's Triton row pass compiled for the GPU without one: Triton turns integer
arguments equal to 1 into constants, which the interpreter never does, so shapes of one row, one
in-batch column or one hard negative are compiled as the launcher would specialise them."""

import os
import subprocess
import sys

import pytest

_COMPILE_FOR_SM90 = r"""
import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile as tcompile, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature
from hotops.infonce.triton import row_pass

BACKEND = make_backend(GPUTarget("cuda", 90, 32))
compiled = []


def compile_only(self, *args, grid, warmup=False, **kwargs):
    binder = create_function_from_signature(self.signature, self.params, BACKEND)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = self._pack_args(BACKEND, kwargs, bound, specialization, options)
    tcompile(ASTSource(self, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
             options=options.__dict__)
    compiled.append(sorted(k for (k,), v in constexprs.items() if v == 1))


JITFunction.run = compile_only
f = lambda n: torch.empty(n)
# (rows, in-batch columns, own columns (hard negatives), weights, row scales, positive column)
for P, Na, K, w, rs, pos in [(1, 1, 1, False, False, 0), (1, 1, 1, True, True, 1), (1, 1, 0, False, False, 0),
                             (2, 1, 1, False, True, 1), (3, 5, 1, True, False, 0)]:
    S = torch.randn(P, Na)
    O = torch.randn(P, K) if K else None
    for want_grad in (False, True):
        row_pass(S, O, torch.rand(Na + K) if w else None, torch.rand(P) if rs else None, f(P), f(P), f(P),
                 pos, torch.tensor(0.1), 0.1, 1.0, want_grad)
print("compiled", len(compiled))
"""


def test_row_pass_compiles_with_arguments_of_one():
    """info_nce(q (1, D), d (1, D), hard (1, 1, D)): Na = K = 1 become constants; the kernel once
    called a tensor method on their sum and did not compile."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run(
        [sys.executable, "-c", _COMPILE_FOR_SM90], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0 and "compiled 10" in run.stdout, run.stdout[-2000:] + run.stderr[-3000:]
