"""JLCM stage 2, one layer's joint learning of codes, codebooks and scales (``learn_layer``), and
the loss it minimises: the layer's relative output error, read from K x K token-weighted Grams
(``Grams``, ``output_error``). Codes by the second-order rule (``second_order_codes``), then Adam
on the codebooks and scales with the codes fixed. The stages and their reasons are in
hotops.codebook.jlcm's doc."""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor, nn

from hotops._calibration import Grams, _damped
from hotops.codebook import format as fmt
from hotops.codebook.format import CodebookWeight
from hotops.codebook.kmeans import nearest


def output_error(w_q: Tensor, w: Tensor, g: Grams) -> Tensor:
    """||X_q w_q^T - X w^T||^2 / ||X w^T||^2 from the layer's Grams."""
    ref = ((w @ g.ff) * w).sum()
    err = ((w_q @ g.qq) * w_q).sum() - 2 * ((w_q @ g.qf) * w).sum() + ref
    return err.clamp_min(0) / ref.clamp_min(1e-30)


def _stored(w: CodebookWeight, dtype: torch.dtype) -> CodebookWeight:
    """The weight with its codebooks and scales in the storage dtype."""
    return CodebookWeight.from_packed(w.codes, w.codebooks.to(dtype), w.scales.to(dtype), w.group_ptr, w.perm)


def nearest_sum(points: Tensor, books: Tensor, passes: int = 2) -> Tuple[Tensor, Tensor]:
    """Codes (P, M) of additive codebooks `books` (M, C, g) whose sum is nearest each point (P, g),
    and the residuals: greedily one codebook after another, then `passes` rounds re-picking each
    codebook's word with the others fixed (each pick is the nearest given the rest, so the error
    never grows)."""
    M = books.shape[0]
    idx, residual = [], points
    for m in range(M):
        idx.append(nearest(residual.float(), books[m].float()))
        residual = residual - books[m][idx[m]]
    for _ in range(passes if M > 1 else 0):
        for m in range(M):
            residual = residual + books[m][idx[m]]
            idx[m] = nearest(residual.float(), books[m].float())
            residual = residual - books[m][idx[m]]
    return torch.stack(idx, 1), residual


def second_order_codes(
    target: Tensor,
    gram: Tensor,
    codebooks: Tensor,
    scales: Tensor,
    group_ptr: Tensor,
    damp: float = 0.01,
    passes: int = 2,
) -> Tensor:
    """The mappings (N, J, M) uint8 of the stored-order rows that (greedily) minimise
    tr((W_q - target) H (W_q - target)^T), H = `gram`, for fixed codebooks and scales.

    One input group at a time (GPTQ's rule, for vectors): with H^-1 = U^T U (U upper
    triangular), fixing group b's codes to q costs ||(w_b - q) U_bb^-1||^2, which is the
    Euclidean distance after multiplying by U_bb^-1, so each row takes the nearest codeword
    there (several additive codebooks: ``nearest_sum`` with `passes`); the error
    (w_b - q) U_bb^-1 @ U[b, later] is then taken off the groups not yet coded, which compensate
    it. Groups go in decreasing diag(H) (the most-used inputs first, their error spread over the
    rest)."""
    N, K = target.shape
    O, M, _, g = codebooks.shape
    h = _damped(gram, damp)
    order = torch.argsort(h.diagonal().reshape(-1, g).sum(1), descending=True, stable=True)
    cols = (order[:, None] * g + torch.arange(g)).reshape(-1)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h[cols][:, cols])), upper=True)
    w = (target.double() / scales.double()[:, None])[:, cols]  # normalised rows: the row's scale
    words = codebooks.double()  # does not change its nearest word
    codes = torch.empty(N, K // g, M, dtype=torch.uint8)
    err = torch.empty(N, g, dtype=torch.float64)
    for b, j in enumerate(order.tolist()):
        s = slice(b * g, (b + 1) * g)
        metric = torch.linalg.inv(u[s, s])
        for o in range(O):
            r0, r1 = int(group_ptr[o]), int(group_ptr[o + 1])
            idx, err[r0:r1] = nearest_sum(w[r0:r1, s] @ metric, words[o] @ metric, passes)
            codes[r0:r1, j] = idx.to(torch.uint8)
        w[:, s.stop :] -= err @ u[s, s.stop :]
    return codes


def _fit_codebooks(
    w: Tensor,
    grams: Grams,
    codes: Tensor,
    codebooks: Tensor,
    scales: Tensor,
    group_ptr: Tensor,
    steps: int,
    lr: float,
):
    """Codebooks and scales by Adam (cosine decay) on the relative output error, codes fixed."""
    codebooks, scales = nn.Parameter(codebooks.float().clone()), nn.Parameter(scales.float().clone())
    packed = fmt.pack_codes(codes)
    opt = torch.optim.Adam([codebooks, scales], lr=lr)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    cross = w @ grams.qf.T  # tr(W_q qf W^T) = <W_q, W qf^T>: one product saved per step
    ref = ((w @ grams.ff) * w).sum().clamp_min(1e-30)
    for _ in range(steps):
        w_q = fmt.dequantize_stored(packed, codebooks, scales, group_ptr)
        loss = (((w_q @ grams.qq) * w_q).sum() - 2 * (w_q * cross).sum() + ref) / ref
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay.step()
    return codebooks.detach(), scales.detach()


def learn_layer(
    w: Tensor,
    grams: Grams,
    init: CodebookWeight,
    steps: int,
    lr: float = 1e-2,
    rounds: int = 3,
    damp: float = 0.01,
) -> CodebookWeight:
    """JLCM's joint learning of one layer's mappings, codebooks and scales (see the module doc):
    `rounds` times, the second-order code assignment towards the weight that best maps the
    layer's compressed-model inputs to its dense outputs, then `steps` of Adam on the codebooks
    and scales. Returns float32 codebooks and scales."""
    w = w.detach().float()
    w_stored = w if init.perm is None else w[init.perm]
    target = grams.target(w_stored, _damped(grams.qq, damp))  # V = W on dense inputs
    codebooks, scales = init.codebooks.float(), init.scales.float()
    codes = init.code_indices()
    for _ in range(rounds):
        codes = second_order_codes(target, grams.qq, codebooks, scales, init.group_ptr, damp)
        codebooks, scales = _fit_codebooks(
            w_stored, grams, codes, codebooks, scales, init.group_ptr, steps, lr
        )
    return CodebookWeight(codes, codebooks, scales, init.group_ptr, init.perm)
