"""torch.library registration of the fused InfoNCE loss: schema, fake impl, autograd, kernels.

The loss is computed in row panels. For each panel of P queries:

    S = q_p · [d; pool]^T                 (GEMM 1, P × Na, never the whole B × Na)
    row pass: lse, loss and G = dloss/dS  (C++ on the CPU, Triton on the GPU, in place over S)
    dq_p = G · [d; pool]                  (GEMM 2)
    d[d; pool] += G^T · q_p               (GEMM 3)

so forward and backward together cost three GEMMs and O(P × Na) scratch. When the loss is
reduced to a scalar (mean/sum) the gradients are computed in the forward call and only scaled
in backward; for reduction="none" backward recomputes (four GEMMs in all).
"""

import functools
from typing import Optional, Tuple

import torch
from torch import Tensor

from hotops import _backend

# scratch for one panel of logits: large enough that the GEMMs run at full speed, small enough
# to be a rounding error beside the B × Na logits eager materialises
PANEL_BYTES = {"cpu": 16 << 20, "cuda": 512 << 20}
# on the CPU, accumulating low-precision candidate gradients in float32 costs a pass over
# them per panel; fewer, larger panels amortise it
LOW_PRECISION_PANEL_FACTOR = 4
# below this many rows the rank-P update dC += G^T q_p loses BLAS efficiency (measured at
# B = 16384: 128 rows 21.2 s, 256 rows 17.2 s per forward + backward)
MIN_PANEL_ROWS = 256


def panel_rows(B: int, Na: int, dtype: torch.dtype, device: torch.device) -> int:
    budget = PANEL_BYTES.get(device.type, PANEL_BYTES["cpu"])
    if dtype != torch.float32 and device.type == "cpu":
        budget *= LOW_PRECISION_PANEL_FACTOR
    rows = budget // max(1, Na * torch.finfo(dtype).bits // 8)
    rows = max(MIN_PANEL_ROWS, rows // 64 * 64)
    return int(min(B, rows))


def transposed_bf16_grads() -> bool:
    """Whether bf16 gradients on the CPU are computed transposed, dq^T = C^T G^T and dC^T = q^T G
    (D x P and D x Na outputs), and transposed back once. Without AMX, torch's bf16 GEMMs with a
    narrow (D-column) output and a long reduction run at a third of the rate of the wide-output
    ones (AVX512_BF16 EPYC); on AMX tiles (oneDNN) the direct products are faster and the
    transposes only cost: fwd+bwd B = 1024 13.4 vs 24.0 ms, B = 4096 264 vs 310 ms (one thread,
    Xeon with AMX-BF16)."""
    return not _backend.ext().cpu_has("amx_bf16")


def _cpu_row_pass(
    shared, own, weight, row_scale, loss, lse, tdot, pos_col, temperature, smoothing, grad_scale, want_grad
):
    _backend.ext().infonce_rows(
        shared,
        own,
        weight,
        row_scale,
        loss,
        lse,
        tdot,
        pos_col=pos_col,
        inv_t=1.0 / float(temperature),
        smoothing=smoothing,
        grad_scale=grad_scale,
        want_grad=want_grad,
        threads=_backend.num_threads(),
    )


def _triton_row_pass(*args, **kwargs):
    from hotops.infonce.triton import row_pass

    row_pass(*args, **kwargs)


def run_panels(
    row_pass,
    q: Tensor,
    d: Tensor,
    pool: Optional[Tensor],
    own: Optional[Tensor],
    weight: Optional[Tensor],
    temperature: Tensor,
    pos_offset: int,
    smoothing: float,
    grad_scale: float,
    row_scale: Optional[Tensor],
    want_grad: bool,
):
    """The fused loop around row_pass (the device's row kernel). Returns per-row loss, lse, tdot
    and (if want_grad) dq, dd, dpool, down."""
    q, d = _backend.cpu_view(q), _backend.cpu_view(d)
    pool = _backend.cpu_view(pool) if pool is not None else None
    own = own.detach() if own is not None else None
    B, Nd = q.shape[0], d.shape[0]
    Na = Nd + (pool.shape[0] if pool is not None else 0)
    f32 = dict(dtype=torch.float32, device=q.device)
    loss, lse, tdot = (torch.empty(B, **f32) for _ in range(3))
    dq = dd = dpool = down = None
    P = panel_rows(B, Na, q.dtype, q.device)
    # candidate gradients accumulate over panels: in the inputs' dtype when that is float32 or
    # there is a single panel, else in float32 (rounded once at the end)
    acc_dtype = q.dtype if q.dtype == torch.float32 or P >= B else torch.float32
    if want_grad:
        dq = torch.empty_like(q)
        dd = torch.empty(d.shape, dtype=acc_dtype, device=q.device)
        dpool = torch.empty(pool.shape, dtype=acc_dtype, device=q.device) if pool is not None else None
        down = torch.empty_like(own) if own is not None else None
    buf = torch.empty(P, Na, dtype=q.dtype, device=q.device)
    blocks = [(d, 0, dd)] + ([(pool, Nd, dpool)] if pool is not None else [])
    wide = want_grad and q.dtype == torch.bfloat16 and q.device.type == "cpu" and transposed_bf16_grads()
    if wide:
        cand_t = torch.empty(q.shape[1], Na, dtype=q.dtype, device=q.device)  # [d; pool]^T, D x Na
        cand_t[:, :Nd].copy_(d.T)
        if pool is not None:
            cand_t[:, Nd:].copy_(pool.T)
        acc_t = torch.empty(cand_t.shape, dtype=acc_dtype, device=q.device)
    for r0 in range(0, B, P):
        r1 = min(B, r0 + P)
        qp, S = q[r0:r1], buf[: r1 - r0]
        for blk, c0, _ in blocks:
            torch.mm(qp, blk.T, out=S[:, c0 : c0 + blk.shape[0]])
        O = torch.einsum("pd,pkd->pk", qp, own[r0:r1]) if own is not None else None
        row_pass(
            S,
            O,
            weight,
            row_scale[r0:r1] if row_scale is not None else None,
            loss[r0:r1],
            lse[r0:r1],
            tdot[r0:r1],
            pos_offset + r0,
            temperature,
            smoothing,
            grad_scale,
            want_grad,
        )
        if not want_grad:
            continue
        if wide:
            dq[r0:r1].copy_(torch.mm(cand_t, S.T).T)
            qp_t = qp.T.contiguous()
            if r0 == 0 and acc_dtype == q.dtype:
                torch.mm(qp_t, S, out=acc_t)
            elif r0 == 0:
                acc_t.copy_(torch.mm(qp_t, S))
            else:
                acc_t.add_(torch.mm(qp_t, S))
        for i, (blk, c0, acc) in enumerate(blocks if not wide else ()):
            G = S[:, c0 : c0 + blk.shape[0]]
            if i == 0:
                torch.mm(G, blk, out=dq[r0:r1])
            else:
                dq[r0:r1].addmm_(G, blk)
            if r0 == 0 and acc.dtype == q.dtype:
                torch.mm(G.T, qp, out=acc)
            elif acc.dtype == q.dtype:
                acc.addmm_(G.T, qp)
            elif r0 == 0:
                acc.copy_(torch.mm(G.T, qp))
            else:
                acc.add_(torch.mm(G.T, qp))
        if O is not None:
            dq[r0:r1] += torch.einsum("pk,pkd->pd", O, own[r0:r1])
            torch.mul(O[:, :, None], qp[:, None, :], out=down[r0:r1])
    if wide:
        dd.copy_(acc_t[:, :Nd].T)
        if pool is not None:
            dpool.copy_(acc_t[:, Nd:].T)
    if want_grad:
        dd = dd.to(d.dtype)
        dpool = dpool.to(pool.dtype) if pool is not None else None
    return loss, lse, tdot, dq, dd, dpool, down


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _temperature_grad(tdot: Tensor, temperature: Tensor, scale) -> Tensor:
    # l = S / T, so dloss/dT = sum_ij G_ij * (-l_ij / T) = -(1/T) sum_i scale_i * tdot_i
    return (-(tdot * scale).sum() / temperature.float()).to(temperature.dtype)


def _info_nce(
    row_pass, q, d, pool, own, neg_weight, temperature, pos_offset, smoothing, reduction, need_grad
):
    """Returns (loss, lse, dq, dd, dpool, down, dtemperature); the gradients are those of the
    reduced loss (empty when need_grad is False or reduction is "none")."""
    B = q.shape[0]
    want_grad = need_grad and reduction != "none"
    scale = 1.0 / B if reduction == "mean" else 1.0
    loss, lse, tdot, dq, dd, dpool, down = run_panels(
        row_pass, q, d, pool, own, neg_weight, temperature, pos_offset, smoothing, scale, None, want_grad
    )
    out = {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[reduction]
    if not want_grad:
        return out, lse, _empty(q), _empty(d), _empty(d), _empty(q), _empty(temperature)
    return (
        out,
        lse,
        dq,
        dd,
        dpool if dpool is not None else _empty(d),
        down if down is not None else _empty(q),
        _temperature_grad(tdot, temperature, scale),
    )


def _info_nce_backward(row_pass, q, d, pool, own, neg_weight, temperature, grad_rows, pos_offset, smoothing):
    """Gradients of sum_i grad_rows[i] * loss_i, recomputing the logits panel by panel."""
    g = grad_rows.float().contiguous()
    _, _, tdot, dq, dd, dpool, down = run_panels(
        row_pass, q, d, pool, own, neg_weight, temperature, pos_offset, smoothing, 1.0, g, True
    )
    return (
        dq,
        dd,
        dpool if dpool is not None else _empty(d),
        down if down is not None else _empty(q),
        _temperature_grad(tdot, temperature, g),
    )


def _in_float32(fn, first_grad: int, q, d, pool, own, *rest):
    """Run fn with q, d, pool and own in float32 when torch has no fast CPU GEMM in their dtype
    (`_backend.gemm_dtype`), the gradients handed back in the inputs' dtypes: the copies cost
    O((B + Na) x D), the GEMMs they save run 100x slower than float32 there."""
    if _backend.gemm_dtype(q.dtype, q.device) == q.dtype:
        return fn(q, d, pool, own, *rest)
    up = [t.float() if t is not None else None for t in (q, d, pool, own)]
    out = list(fn(*up, *rest))
    # fn's outputs from first_grad on: the gradients of q, d, pool, own (empty where absent)
    for i, like in enumerate((q, d, d if pool is None else pool, q if own is None else own)):
        out[first_grad + i] = out[first_grad + i].to(like.dtype)
    return tuple(out)


def _cpu_info_nce(*args):
    return _in_float32(functools.partial(_info_nce, _cpu_row_pass), 2, *args)


def _cpu_info_nce_backward(*args):
    return _in_float32(functools.partial(_info_nce_backward, _cpu_row_pass), 0, *args)


def _triton_info_nce(*args):
    return _info_nce(_triton_row_pass, *args)


def _triton_info_nce_backward(*args):
    return _info_nce_backward(_triton_row_pass, *args)


INFO_NCE_BACKENDS = (
    _backend.Backend("cpu (C++)", _backend.cpu_refuses, _cpu_info_nce),
    _backend.Backend("cuda (Triton)", _backend.triton_refuses, _triton_info_nce),
)
INFO_NCE_BACKWARD_BACKENDS = (
    _backend.Backend("cpu (C++)", _backend.cpu_refuses, _cpu_info_nce_backward),
    _backend.Backend("cuda (Triton)", _backend.triton_refuses, _triton_info_nce_backward),
)


@torch.library.custom_op("hotops::info_nce", mutates_args=())
def info_nce(
    q: Tensor,
    d: Tensor,
    pool: Optional[Tensor],
    own: Optional[Tensor],
    neg_weight: Optional[Tensor],
    temperature: Tensor,
    pos_offset: int,
    smoothing: float,
    reduction: str,
    need_grad: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (loss, lse, dq, dd, dpool, down, dtemperature); the gradients are those of the
    reduced loss (empty when need_grad is False or reduction is "none")."""
    run = _backend.choose("info_nce", INFO_NCE_BACKENDS, q.device).run
    return run(q, d, pool, own, neg_weight, temperature, pos_offset, smoothing, reduction, need_grad)


@info_nce.register_fake
def _(q, d, pool, own, neg_weight, temperature, pos_offset, smoothing, reduction, need_grad):
    B = q.shape[0]
    loss = q.new_empty((B,) if reduction == "none" else (), dtype=torch.float32)
    lse = q.new_empty((B,), dtype=torch.float32)
    if not (need_grad and reduction != "none"):
        return loss, lse, _empty(q), _empty(d), _empty(d), _empty(q), _empty(temperature)
    return (  # as run_panels allocates them: dd and dpool contiguous, dq and down like q and own
        loss,
        lse,
        torch.empty_like(q),
        d.new_empty(d.shape),
        pool.new_empty(pool.shape) if pool is not None else _empty(d),
        torch.empty_like(own) if own is not None else _empty(q),
        torch.empty_like(temperature),
    )


@torch.library.custom_op("hotops::info_nce_backward", mutates_args=())
def info_nce_backward(
    q: Tensor,
    d: Tensor,
    pool: Optional[Tensor],
    own: Optional[Tensor],
    neg_weight: Optional[Tensor],
    temperature: Tensor,
    grad_rows: Tensor,
    pos_offset: int,
    smoothing: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of sum_i grad_rows[i] * loss_i, recomputing the logits panel by panel."""
    run = _backend.choose("info_nce", INFO_NCE_BACKWARD_BACKENDS, q.device).run
    return run(q, d, pool, own, neg_weight, temperature, grad_rows, pos_offset, smoothing)


@info_nce_backward.register_fake
def _(q, d, pool, own, neg_weight, temperature, grad_rows, pos_offset, smoothing):
    return (  # as run_panels allocates them (see info_nce's fake)
        torch.empty_like(q),
        d.new_empty(d.shape),
        pool.new_empty(pool.shape) if pool is not None else _empty(d),
        torch.empty_like(own) if own is not None else _empty(q),
        torch.empty_like(temperature),
    )


def _is_eager(tensors) -> bool:
    """Plain tensors outside any tracer: the case where memory tricks below are safe."""
    return not torch.compiler.is_compiling() and all(type(t) is torch.Tensor for t in tensors)


def _setup_context(ctx, inputs, output):
    q, d, pool, own, neg_weight, temperature, pos_offset, smoothing, reduction, need_grad = inputs
    ctx.set_materialize_grads(False)  # the gradient outputs get no incoming grad: no zero tensors
    ctx.fused = need_grad and reduction != "none"
    ctx.reduction, ctx.pos_offset, ctx.smoothing = reduction, pos_offset, smoothing
    ctx.has_pool, ctx.has_own = pool is not None, own is not None
    grads = output[2:]
    ctx.owned_grads = None
    # the inputs themselves (references, no copies) for a backward with create_graph=True,
    # which recomputes through info_nce_backward so that the first gradient carries a graph
    ctx.inputs = (q, d, pool, own, neg_weight, temperature) if ctx.fused and _is_eager(grads) else None
    if ctx.fused and _is_eager(grads):
        # In eager mode the gradients computed by the forward are handed to backward as sole
        # owner (detached, so no reference cycle through grad_fn): backward scales them in
        # place and autograd can adopt them as .grad without a copy. A second backward through
        # the same graph then finds them gone and says so.
        ctx.owned_grads = [g.detach() for g in grads]
    elif ctx.fused:
        ctx.save_for_backward(*grads)  # traced graphs stay functional
    else:
        ctx.save_for_backward(q, d, pool, own, neg_weight, temperature)


def _backward(ctx, g_loss, _g_lse, *_unused):
    if g_loss is None:  # only lse or the gradient outputs were used: nothing flows back
        return (None,) * 10
    if ctx.fused and torch.is_grad_enabled() and ctx.inputs is not None:
        # create_graph=True: the fused gradients were computed without a graph; recompute them
        # through info_nce_backward, whose own backward says that there is no second derivative
        ctx.owned_grads = None
        q, d, pool, own, neg_weight, temperature = ctx.inputs
        B = q.shape[0]
        g_rows = g_loss.expand(B) / B if ctx.reduction == "mean" else g_loss.expand(B)
        dq, dd, dpool, down, dtemp = info_nce_backward(
            q, d, pool, own, neg_weight, temperature, g_rows, ctx.pos_offset, ctx.smoothing
        )
        return (
            dq,
            dd,
            dpool if ctx.has_pool else None,
            down if ctx.has_own else None,
            None,
            dtemp,
            None,
            None,
            None,
            None,
        )
    if ctx.fused and ctx.owned_grads is None and not ctx.saved_tensors:
        raise RuntimeError(
            "hotops.info_nce: the fused gradients were already consumed by an "
            "earlier backward; a second backward (retain_graph=True) is not supported"
        )
    if ctx.fused and ctx.owned_grads is not None:
        grads, ctx.owned_grads = ctx.owned_grads, None
        if g_loss.device.type != "cpu" or g_loss.item() != 1.0:  # 1: loss.backward(), no pass
            grads = [t.mul_(g_loss.to(t.dtype)) for t in grads]
    elif ctx.fused:
        grads = [t * g_loss.to(t.dtype) for t in ctx.saved_tensors]
    else:
        q, d, pool, own, neg_weight, temperature = ctx.saved_tensors
        B = q.shape[0]
        g_rows = {"none": g_loss, "mean": g_loss.expand(B) / B, "sum": g_loss.expand(B)}[ctx.reduction]
        grads = list(
            info_nce_backward(q, d, pool, own, neg_weight, temperature, g_rows, ctx.pos_offset, ctx.smoothing)
        )
    dq, dd, dpool, down, dtemp = grads
    return (
        dq,
        dd,
        dpool if ctx.has_pool else None,
        down if ctx.has_own else None,
        None,
        dtemp,
        None,
        None,
        None,
        None,
    )


info_nce.register_autograd(_backward, setup_context=_setup_context)


def _no_second_order(ctx, *grads):
    raise RuntimeError(
        "hotops.info_nce has no second derivative: a gradient taken with create_graph=True "
        "cannot be differentiated again (e.g. a gradient penalty through the loss). Use "
        "hotops.infonce.reference.info_nce, plain torch, where double backward is needed."
    )


info_nce_backward.register_autograd(_no_second_order, setup_context=lambda ctx, inputs, output: None)
