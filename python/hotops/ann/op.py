"""quantize_ste: BiDR's contrastive quantization as a torch op with autograd.

Per sub-space s, the soft assignment p = softmax(-||x_s - c_j||^2 / T) and the soft reconstruction
sum_j p_j c_j; the output is the hard reconstruction (nearest centroid per sub-space) whose
gradient is the soft one's (straight-through), so codebooks (and the encoder) learn through the
contrastive loss (e.g. hotops.info_nce) and `index.set_codebooks` loads the result.

The op saves only p (N, m, ksub) for backward and computes both gradients in closed form:
  a_j = p_j (g.c_j - g.soft)                         (gradient at the logits)
  dx  = 2/T (sum_j a_j c_j - x sum_j a_j)
  dc_j = sum_n p_j g + 2/T (a_j x - a_j c_j)
It is plain torch (einsum / softmax), so it runs on every device torch does."""

from typing import Tuple

import torch
from torch import Tensor

from hotops import _backend


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)  # float32 accumulation, float64 kept


def _sub(x: Tensor, codebooks: Tensor) -> Tensor:
    return x.reshape(x.shape[0], codebooks.shape[0], codebooks.shape[2]).to(_compute_dtype(x))


@torch.library.custom_op("hotops::quantize_ste", mutates_args=())
def quantize_ste_fwd(x: Tensor, codebooks: Tensor, temperature: float) -> Tuple[Tensor, Tensor]:
    xs, cb = _sub(x, codebooks), codebooks.to(_compute_dtype(x))
    d2 = (xs * xs).sum(-1, keepdim=True) - 2 * torch.einsum("nsd,sjd->nsj", xs, cb) + (cb * cb).sum(-1)[None]
    p = torch.softmax(-d2 / temperature, dim=-1)
    hard = cb[torch.arange(cb.shape[0], device=cb.device), d2.argmin(-1)]  # (N, m, dsub)
    # A sub-vector holding NaN or +-Inf has no nearest centroid: NaN out, as the reference's
    # soft + (hard - soft).detach() gives (argmin over NaN distances would pick an arbitrary one).
    hard = torch.where(torch.isfinite(xs).all(-1, keepdim=True), hard, float("nan"))
    return hard.reshape(x.shape).to(x.dtype), p


@quantize_ste_fwd.register_fake
def _(x, codebooks, temperature):
    return x.new_empty(x.shape), x.new_empty(  # the reshape above is contiguous, whatever x's strides
        (x.shape[0], codebooks.shape[0], codebooks.shape[1]), dtype=_compute_dtype(x)
    )


def _setup(ctx, inputs, output):
    x, codebooks, temperature = inputs
    ctx.save_for_backward(x, codebooks, output[1])
    ctx.temperature = temperature


def _backward(ctx, g_hard, _g_p):
    """Linear in g_hard. Under create_graph (grad mode on) p is recomputed from x and the
    codebooks with differentiable torch ops, so the gradient itself has a gradient (double
    backward: e.g. a gradient penalty); the saved p, an output of the opaque op, would not."""
    x, codebooks, p = ctx.saved_tensors
    xs, cb, g = _sub(x, codebooks), codebooks.to(p.dtype), _sub(g_hard.to(x.dtype), codebooks)
    if torch.is_grad_enabled():
        d2 = (
            (xs * xs).sum(-1, keepdim=True)
            - 2 * torch.einsum("nsd,sjd->nsj", xs, cb)
            + (cb * cb).sum(-1)[None]
        )
        p = torch.softmax(-d2 / ctx.temperature, dim=-1)
    soft = torch.einsum("nsj,sjd->nsd", p, cb)
    a = p * (torch.einsum("nsd,sjd->nsj", g, cb) - (g * soft).sum(-1, keepdim=True))
    k = 2.0 / ctx.temperature
    dx = k * (torch.einsum("nsj,sjd->nsd", a, cb) - a.sum(-1, keepdim=True) * xs)
    dc = torch.einsum("nsj,nsd->sjd", p, g) + k * (
        torch.einsum("nsj,nsd->sjd", a, xs) - a.sum(0)[..., None] * cb
    )
    return dx.reshape(x.shape).to(x.dtype), dc.to(codebooks.dtype), None


quantize_ste_fwd.register_autograd(_backward, setup_context=_setup)


def quantize_ste(x: Tensor, codebooks: Tensor, temperature: float = 1.0) -> Tensor:
    """Hard PQ reconstruction of x (N, D) with codebooks (m, ksub, D / m), differentiable through
    the soft assignment softmax(-||x_s - c||^2 / temperature) (straight-through estimator)."""
    if not isinstance(x, Tensor) or not isinstance(codebooks, Tensor):
        raise TypeError("quantize_ste takes torch tensors x and codebooks")
    if x.dim() != 2 or codebooks.dim() != 3:
        raise ValueError(
            f"x must be (N, D) and codebooks (m, ksub, dsub), got {tuple(x.shape)} and "
            f"{tuple(codebooks.shape)}"
        )
    if not x.is_floating_point() or not codebooks.is_floating_point():
        raise TypeError(f"x and codebooks must be floating point, got {x.dtype} and {codebooks.dtype}")
    m, ksub, dsub = codebooks.shape
    if m * dsub != x.shape[1] or ksub == 0:
        raise ValueError(f"codebooks (m={m}, ksub={ksub}, dsub={dsub}) do not tile D = {x.shape[1]}")
    if x.device != codebooks.device:
        raise ValueError(f"x is on {x.device}, codebooks on {codebooks.device}")
    temperature = _backend.check_number(temperature, "temperature", low=0, low_open=True)
    return quantize_ste_fwd(x, codebooks, temperature)[0]
