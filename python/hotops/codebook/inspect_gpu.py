"""The codebook Triton kernels compiled for an NVIDIA GPU without one: Triton's NVIDIA backend
(TTGIR, PTX, ptxas) runs on any machine. Prints, per kernel and tuning config, the registers,
spills, shared memory and the SASS instructions and barriers of the main loop: what a GPU-less
change can still be judged by.

    python -m hotops.codebook.inspect_gpu [--arch 90] [--batch 1] [--activations fp16] [--codebooks fp16]

Run it without TRITON_INTERPRET (the interpreter replaces the kernels). Shapes are specialised as
the launcher does at Llama sizes: 16-byte aligned pointers, sizes and strides divisible by 16.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from hotops.codebook import triton as kernels

FORMAT = dict(M=2, G=8, CODE_MASK=255, LOG_GROUPS=2, HAS_PERM=True, HAS_BIAS=True, INTERPRETED=False)  # 2x8
NOT_DIVISIBLE = ("B", "num_groups", "BATCH_BUCKET")


def compile_kernel(fn, config, activations="fp16", codebooks="fp16", arch=90, **flags):
    """One kernel (a plain @triton.jit function of hotops.codebook.triton) at one tuning config."""
    pointers = dict(
        X=activations,
        OUT=activations,
        DY=activations,
        DX=activations,
        CODES="u8",
        CODEBOOKS=codebooks,
        SCALES=codebooks,
        BIAS=codebooks,
        GROUP_PTR="i64",
        PERM="i64",
    )
    consts = {n: v for n, v in dict(FORMAT, **flags, **config.kwargs).items() if n in fn.arg_names}
    sig = {
        n: "constexpr" if n in consts else ("*" + pointers[n] if n in pointers else "i32")
        for n in fn.arg_names
    }
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, n in enumerate(fn.arg_names)
        if sig[n] != "constexpr" and n not in NOT_DIVISIBLE
    }
    return triton.compile(
        ASTSource(fn, sig, consts, attrs),
        target=GPUTarget("cuda", arch, 32),
        options=dict(num_warps=config.num_warps, num_stages=config.num_stages),
    )


def _tool(name):
    found = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return found if os.path.exists(found) else shutil.which(name)


def sass_report(compiled) -> dict:
    """Registers and spills (ptxas -v), shared memory, and the main loop's SASS instructions and
    barriers (the longest backward branch), where Triton's bundled tools can read the cubin."""
    out = {"shared_bytes": compiled.metadata.shared}
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        arch = re.search(r"\.target\s+(sm_\w+)", compiled.asm["ptx"]).group(1)
        for ptxas in (_tool("ptxas-blackwell"), _tool("ptxas")):  # the newer one reads newer PTX
            run = ptxas and subprocess.run(
                [ptxas, f"-arch={arch}", "-v", ptx, "-o", os.devnull], capture_output=True, text=True
            )
            if run and run.returncode == 0:
                out["registers"] = int(re.search(r"Used (\d+) registers", run.stderr).group(1))
                out["spill_bytes"] = int(re.search(r"(\d+) bytes spill stores", run.stderr).group(1))
                break
        dump = _tool("cuobjdump")
        sass = subprocess.run([dump, "-sass", cubin], capture_output=True, text=True).stdout if dump else ""
    at = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*)$")
    code = [(int(m.group(1), 16), m.group(2)) for m in map(at.match, sass.splitlines()) if m]
    back = [
        (int(b.group(1), 16), a)
        for a, text in code
        for b in [re.search(r"BRA\s+.*?0x([0-9a-f]+)", text)]
        if b and int(b.group(1), 16) < a
    ]
    if back:
        lo, hi = max(back, key=lambda t: t[1] - t[0])
        loop = [text for a, text in code if lo <= a <= hi]
        out["loop_instructions"] = len(loop)
        out["loop_barriers"] = sum("BAR.SYNC" in text for text in loop)
    return out


def report(arch=90, batch=1, activations="fp16", codebooks="fp16"):
    """Every config of the kernel that serves `batch` rows, and of the input-gradient kernel."""
    if batch <= kernels.GEMV_MAX_BATCH:
        product = [
            (kernels._gemv_kernel, c, dict(BLOCK_B=triton.next_power_of_2(batch), SPLIT_K=2))
            for c in kernels._GEMV_CONFIGS
        ]
    else:
        product = [(kernels._gemm_kernel, c, {}) for c in kernels._GEMM_CONFIGS]
    rows = []
    for fn, config, flags in product + [(kernels._input_grad_kernel, c, {}) for c in kernels._GRAD_CONFIGS]:
        compiled = compile_kernel(fn, config, activations, codebooks, arch, **flags)
        rows.append(
            dict(
                kernel=fn.__name__,
                config=f"{config.kwargs} warps={config.num_warps} stages={config.num_stages}",
                **sass_report(compiled),
            )
        )
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m hotops.codebook.inspect_gpu", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--activations", default="fp16", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--codebooks", default="fp16", choices=["fp32", "fp16", "bf16"])
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        p.error("unset TRITON_INTERPRET: the interpreter replaces the kernels")
    print(
        f"sm_{args.arch}, 2x8 format, batch {args.batch}, {args.activations} activations, "
        f"{args.codebooks} codebooks"
    )
    for r in report(args.arch, args.batch, args.activations, args.codebooks):
        print(
            f"{r['kernel']:20s} {r['config']:58s} regs {r.get('registers', '?'):>3} spills "
            f"{r.get('spill_bytes', '?'):>3} B smem {r['shared_bytes']:>6} B | main loop: "
            f"{r.get('loop_instructions', '?')} SASS, {r.get('loop_barriers', '?')} barriers"
        )


if __name__ == "__main__":
    main()
