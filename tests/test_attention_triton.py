"""hotops.attention's Triton kernels beyond tests/test_attention.py's interpreter runs: the tile
configuration per head dim, the one-dimensional grid, and what only a compile for the GPU shows
(float32 precision of the tensor-core products, shared memory per block), checked by Triton's
NVIDIA pipeline without a GPU."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import require_triton_runs

from hotops.attention import reference

H100_SHARED = 232_448  # bytes of shared memory one block may use on sm_90


def test_configs_cover_every_head_dim():
    """Every head dim gets tiles (smaller as it grows) and float32 inputs multiply at 3xTF32."""
    pytest.importorskip("triton")
    from hotops.attention import triton as kt

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        area = {}
        for D in (1, 16, 17, 64, 100, 128, 256, 512, 1024):
            for kernel in ("fwd", "dq", "dkv"):
                cfg = kt.launch_config(kernel, D, dtype)
                assert cfg["BLOCK_D"] >= max(D, 16) and cfg["BLOCK_M"] >= 16 and cfg["BLOCK_N"] >= 16
                tile = cfg["BLOCK_M"] * cfg["BLOCK_N"]
                assert tile <= area.get(kernel, tile), (kernel, D, dtype)
                area[kernel] = tile
    assert kt._f32_precision(torch.float32) == "tf32x3"


def test_grid_is_one_dimensional():
    """Local mode's windows are heads: B=64, H=32, keep=1/32 gives B·H = 65,536 rows of programs,
    past CUDA's 65,535 on grid y; all programs go on grid x."""
    pytest.importorskip("triton")
    from hotops.attention import triton as kt

    assert kt._grid(64 * 32 * 32, 32, 64) == (65_536,)
    assert kt._grid(65_536, 4, 16) == (65_536,)
    with pytest.raises(ValueError, match="grid"):
        kt._grid(2**26, 2**12, 16)


# a causal query that sees no sampled key has lse = log(0) = -inf by design; NumPy says so
@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [8, 40])
def test_programs_cover_every_block_and_head(monkeypatch, dtype, D):
    """16 x 16 tiles: several query blocks, slot blocks, batches and heads from one program id;
    forward and gradients against the reference."""
    require_triton_runs()
    from hotops.attention import triton as kt

    monkeypatch.setattr(kt, "_CONFIGS", {key: [(1 << 30, (16, 16, 4, 2))] for key in kt._CONFIGS})
    B, H, Hkv, Lq, Lk, S = 2, 4, 2, 37, 41, 35
    q, k, v = (torch.randn(B, h, L, D).to(dtype) for h, L in ((H, Lq), (Hkv, Lk), (Hkv, Lk)))
    idx = torch.randint(0, Lk, (B, Hkv, S))
    out, lse = torch.empty_like(q), torch.empty(B, H, Lq)
    scale = D**-0.5
    kt.forward(q, k, v, idx, None, None, out, lse, scale, True)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref = reference.attention_on_indices(q64, k64, v64, idx, causal=True, scale=scale)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(out.double(), ref.detach(), **tol)
    dout = torch.randn_like(q)
    grads = [torch.empty_like(t) for t in (q, k, v)]
    kt.backward(q, k, v, idx, None, None, out, lse, dout, *grads, scale, True)
    want = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    for g, w in zip(grads, want):
        torch.testing.assert_close(g.double(), w, **tol)


# ------------------------------------------------------------------ compiled for a GPU, without one

# The kernels compiled as the launcher would specialise them (the JIT's own binder on CPU tensors),
# for sm_90: each dot's input precision in the TTIR, shared memory and spills (ptxas -v).
_COMPILE_FOR_SM90 = r"""
import os, re, subprocess, sys, tempfile
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile as tcompile, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature
from hotops.attention import triton as kt

TARGET = GPUTarget("cuda", 90, 32)
BACKEND = make_backend(TARGET)
found = []


def spills(ptx):
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    for tool in ("ptxas-blackwell", "ptxas"):
        run = subprocess.run([os.path.join(tools, tool), "-arch=sm_90", "-v", f.name, "-o", os.devnull],
                             capture_output=True, text=True)
        if run.returncode == 0:
            return int(re.search(r"(\d+) bytes spill stores", run.stderr).group(1))
    return None


def compile_only(self, *args, grid, warmup=False, **kwargs):
    binder = create_function_from_signature(self.signature, self.params, BACKEND)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = self._pack_args(BACKEND, kwargs, bound, specialization, options)
    k = tcompile(ASTSource(self, signature, constexprs, attrs), target=TARGET, options=options.__dict__)
    dots = re.findall(r"tt\.dot [^\n]*", k.asm["ttir"])
    precisions = [m.group(1) if (m := re.search(r"inputPrecision = (\w+)", d)) else "tf32" for d in dots]
    found.append((self.fn.__name__, k.metadata.shared, spills(k.asm["ptx"]), precisions))


JITFunction.run = compile_only
for dtype, D in [(torch.float32, 128), (torch.bfloat16, 256)]:
    q = torch.randn(1, 4, 100, D).to(dtype)
    k = torch.randn(1, 2, 100, D).to(dtype)
    idx = torch.randint(0, 100, (1, 2, 70))
    out, lse = torch.empty_like(q), torch.empty(1, 4, 100)
    kt.forward(q, k, k, idx, None, None, out, lse, 0.1, False)
    kt.backward(q, k, k, idx, None, None, out, lse, out, torch.empty_like(q), torch.empty_like(k),
                torch.empty_like(k), 0.1, False)
    for name, shared, spill, precisions in found:
        print(name, dtype, D, shared, spill, precisions)
        assert shared <= H100_SHARED, (name, dtype, D, shared)
        assert spill is None or spill <= SPILL_MAX, (name, dtype, D, spill)
        if dtype == torch.float32:  # every product of float32 operands at 3xTF32, never plain tf32
            assert precisions and set(precisions) == {"tf32x3"}, (name, precisions)
    found.clear()
print("compiled")
"""


def test_kernels_compile_for_sm90():
    """Forward, dQ and dK/dV through Triton's NVIDIA pipeline for an H100, as the launcher would
    specialise them: float32 at head dim 128 (its dK/dV needed 262,656 B of shared memory with
    64 x 64 tiles) and bfloat16 at 256 fit one block's shared memory and barely spill, and
    every float32 product is 3xTF32 (tl.dot's default, tf32, is invisible to the interpreter)."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    code = f"H100_SHARED = {H100_SHARED}\nSPILL_MAX = 128\n" + _COMPILE_FOR_SM90
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "compiled" in run.stdout, run.stdout[-2000:] + run.stderr[-3000:]
