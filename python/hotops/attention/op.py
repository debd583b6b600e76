"""torch.library registration of subsampled attention: schema, fake impl, autograd, kernels.

``hotops::ssa`` returns (out, lse); ``hotops::ssa_backward`` recomputes the scores tile by tile
from q, k, v, out and lse and returns (dq, dk, dv), dk/dv scattered back to the original key rows.
The sampled subset travels as ``idx`` (and optional positions), so forward and backward see
exactly the same keys.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from hotops import _backend

FLOAT32_MAX = torch.finfo(torch.float32).max
_SCALE_RANGE = f"scale must fit float32 (|scale| <= {FLOAT32_MAX:.8g}; the kernels compute in float32)"


def check_scale(scale):
    """scale as a float the kernels can take: finite, and of a magnitude float32 holds (the
    kernels compute in float32, where 1e39 is inf: every score would be inf or NaN). Compares
    only, so it works on the floats torch.compile traces, as ``_backend.check_number`` does."""
    scale = _backend.check_number(scale, "scale")
    if not abs(scale) <= FLOAT32_MAX:
        raise ValueError(f"{_SCALE_RANGE}, got {scale!r}")  # (no format spec: compile traces this)
    return scale


def _views(*ts):
    return [_backend.cpu_view(t) if t is not None else None for t in ts]


def _forward_outputs(q):
    B, H, Lq, _ = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    return out, torch.empty(B, H, Lq, dtype=torch.float32, device=q.device)


def _backward_outputs(q, k, v):
    return (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))


def _cpu_ssa(q, k, v, idx, kpos, qpos, scale, causal):
    out, lse = _forward_outputs(q)
    _backend.ext().ssa_forward(
        *_views(q, k, v, idx, kpos, qpos),
        out,
        lse,
        scale=scale,
        causal=causal,
        threads=_backend.num_threads(),
    )
    return out, lse


def _cpu_ssa_backward(q, k, v, idx, kpos, qpos, out, lse, dout, scale, causal):
    dq, dk, dv = _backward_outputs(q, k, v)
    _backend.ext().ssa_backward(
        *_views(q, k, v, idx, kpos, qpos, out, lse.contiguous(), dout),
        dq,
        dk,
        dv,
        scale=scale,
        causal=causal,
        threads=_backend.num_threads(),
    )
    return dq, dk, dv


def _check_gpu_head_dim(q: Tensor, backward: bool) -> None:
    """The head dims whose kernels compile within an H100's shared memory (launch_config): up to
    512, and up to 256 for a float32 backward (its dK/dV tiles need 262 KB at 512)."""
    limit = 256 if backward and q.dtype == torch.float32 else 512
    if q.shape[-1] > limit:
        kind = "float32 backward" if limit == 256 else "kernels"
        raise ValueError(
            f"subsampled attention on the GPU takes head dims up to {limit} (its {kind} would not fit "
            f"the shared memory of one block); got {q.shape[-1]}"
        )


def _triton_ssa(q, k, v, idx, kpos, qpos, scale, causal):
    from hotops.attention.triton import forward

    _check_gpu_head_dim(q, backward=False)
    out, lse = _forward_outputs(q)
    forward(*_views(q, k, v, idx, kpos, qpos), out, lse, scale, causal)
    return out, lse


def _triton_ssa_backward(q, k, v, idx, kpos, qpos, out, lse, dout, scale, causal):
    from hotops.attention.triton import backward

    _check_gpu_head_dim(q, backward=True)
    dq, dk, dv = _backward_outputs(q, k, v)
    backward(*_views(q, k, v, idx, kpos, qpos, out, lse.contiguous(), dout), dq, dk, dv, scale, causal)
    return dq, dk, dv


SSA_BACKENDS = (
    _backend.Backend("cpu (C++)", _backend.cpu_refuses, _cpu_ssa),
    _backend.Backend("cuda (Triton)", _backend.triton_refuses, _triton_ssa),
)
SSA_BACKWARD_BACKENDS = (
    _backend.Backend("cpu (C++)", _backend.cpu_refuses, _cpu_ssa_backward),
    _backend.Backend("cuda (Triton)", _backend.triton_refuses, _triton_ssa_backward),
)


@torch.library.custom_op("hotops::ssa", mutates_args=())
def ssa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    idx: Tensor,
    kpos: Optional[Tensor],
    qpos: Optional[Tensor],
    scale: float,
    causal: bool,
) -> Tuple[Tensor, Tensor]:
    """Attention of every query of head h over the keys idx[b, h or h // group]; (out, lse).

    lse is the float32 log-sum-exp of each row's scaled scores, -inf for a row that sees no key.
    On the CPU, a row whose float32 scores left float32's range (computed again in double, see
    docs/attention.md) has lse +inf, whatever its true log-sum-exp (finite, or below -3.4e38):
    +inf marks the row for the backward, which takes the same double path for it. The Triton
    kernels have no double path: their lse is float32's (NaN where a score overflowed to +inf).
    A scale whose magnitude float32 does not hold is a ValueError."""
    scale = check_scale(scale)
    run = _backend.choose("subsampled_attention", SSA_BACKENDS, q.device).run
    return run(q, k, v, idx, kpos, qpos, float(scale), bool(causal))


@ssa.register_fake
def _(q, k, v, idx, kpos, qpos, scale, causal):
    B, H, Lq, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, Lq), dtype=torch.float32)


@torch.library.custom_op("hotops::ssa_backward", mutates_args=())
def ssa_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    idx: Tensor,
    kpos: Optional[Tensor],
    qpos: Optional[Tensor],
    out: Tensor,
    lse: Tensor,
    dout: Tensor,
    scale: float,
    causal: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv): the scores recomputed tile by tile from q, k, v, out and lse (ssa's, whose
    +inf rows the CPU kernel computes in double)."""
    scale = check_scale(scale)
    run = _backend.choose("subsampled_attention", SSA_BACKWARD_BACKENDS, q.device).run
    return run(q, k, v, idx, kpos, qpos, out, lse, dout, float(scale), bool(causal))


@ssa_backward.register_fake
def _(q, k, v, idx, kpos, qpos, out, lse, dout, scale, causal):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, idx, kpos, qpos, scale, causal = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, idx, kpos, qpos, out, lse)
    ctx.scale, ctx.causal = scale, causal


def _backward(ctx, dout, _dlse):
    q, k, v, idx, kpos, qpos, out, lse = ctx.saved_tensors
    if dout is None:
        return (None,) * 8
    dq, dk, dv = ssa_backward(q, k, v, idx, kpos, qpos, out, lse, dout, ctx.scale, ctx.causal)
    return dq, dk, dv, None, None, None, None, None


ssa.register_autograd(_backward, setup_context=_setup_context)


def _no_second_order(ctx, *grads):
    raise RuntimeError(
        "hotops.subsampled_attention has no second derivative: a gradient taken with "
        "create_graph=True cannot be differentiated again (e.g. a gradient penalty). Use "
        "hotops.attention.reference where double backward is needed."
    )


ssa_backward.register_autograd(_no_second_order, setup_context=lambda ctx, inputs, output: None)
