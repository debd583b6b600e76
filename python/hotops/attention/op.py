"""torch.library registration of subsampled attention: schema, fake impl, autograd, kernels.

``hotops::ssa_fwd`` returns (out, lse); ``hotops::ssa_bwd`` recomputes the scores tile by tile
from q, k, v, out and lse and returns (dq, dk, dv), dk/dv scattered back to the original key rows.
The sampled subset travels as ``idx`` (and optional positions), so forward and backward see
exactly the same keys.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from hotops import _backend


def _cpu_forward(q, k, v, idx, kpos, qpos, out, lse, scale, causal):
    _backend.ext().ssa_forward(
        q, k, v, idx, kpos, qpos, out, lse, scale=scale, causal=causal, threads=_backend.num_threads()
    )


def _cpu_backward(q, k, v, idx, kpos, qpos, out, lse, dout, dq, dk, dv, scale, causal):
    _backend.ext().ssa_backward(
        q,
        k,
        v,
        idx,
        kpos,
        qpos,
        out,
        lse,
        dout,
        dq,
        dk,
        dv,
        scale=scale,
        causal=causal,
        threads=_backend.num_threads(),
    )


def _triton_forward(*args):
    from hotops.attention.triton import forward

    forward(*args)


def _triton_backward(*args):
    from hotops.attention.triton import backward

    backward(*args)


FORWARD = (
    _backend.Backend("cpu (C++)", _backend.cpu_refuses, _cpu_forward),
    _backend.Backend("cuda (Triton)", _backend.triton_refuses, _triton_forward),
)
BACKWARD = (
    _backend.Backend("cpu (C++)", _backend.cpu_refuses, _cpu_backward),
    _backend.Backend("cuda (Triton)", _backend.triton_refuses, _triton_backward),
)


def _views(*ts):
    return [_backend.cpu_view(t) if t is not None else None for t in ts]


@torch.library.custom_op("hotops::ssa_fwd", mutates_args=())
def ssa_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    idx: Tensor,
    kpos: Optional[Tensor],
    qpos: Optional[Tensor],
    scale: float,
    causal: bool,
) -> Tuple[Tensor, Tensor]:
    """Attention of every query of head h over the keys idx[b, h or h // group]; (out, lse)."""
    run = _backend.choose("subsampled_attention", FORWARD, q.device).run
    B, H, Lq, _ = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, Lq, dtype=torch.float32, device=q.device)
    run(*_views(q, k, v, idx, kpos, qpos), out, lse, float(scale), bool(causal))
    return out, lse


@ssa_fwd.register_fake
def _(q, k, v, idx, kpos, qpos, scale, causal):
    B, H, Lq, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, Lq), dtype=torch.float32)


@torch.library.custom_op("hotops::ssa_bwd", mutates_args=())
def ssa_bwd(
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
    run = _backend.choose("subsampled_attention", BACKWARD, q.device).run
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    run(
        *_views(q, k, v, idx, kpos, qpos, out, lse.contiguous(), dout), dq, dk, dv, float(scale), bool(causal)
    )
    return dq, dk, dv


@ssa_bwd.register_fake
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
    dq, dk, dv = ssa_bwd(q, k, v, idx, kpos, qpos, out, lse, dout, ctx.scale, ctx.causal)
    return dq, dk, dv, None, None, None, None, None


ssa_fwd.register_autograd(_backward, setup_context=_setup_context)


def _no_second_order(ctx, *grads):
    raise RuntimeError(
        "hotops.subsampled_attention has no second derivative: a gradient taken with "
        "create_graph=True cannot be differentiated again (e.g. a gradient penalty). Use "
        "hotops.attention.reference where double backward is needed."
    )


ssa_bwd.register_autograd(_no_second_order, setup_context=lambda ctx, inputs, output: None)
