"""JLCM: compress every nn.Linear of a model into the codebook format.

For each layer in turn:

1. group output neurons by the distribution of their (RMS-normalised) weights and initialise
   one set of codebooks per group by k-means (``kmeans.quantize_weight``);
2. jointly learn codebooks, scales and mappings by gradient descent on the layer-output
   reconstruction error  ||X_q W_q^T - X W^T||^2 / ||X W^T||^2, X_q being the layer's inputs in
   the model compressed so far and X in the dense model (layers go in order, so each one
   compensates the error of those before it). The error needs only the K x K Grams (``Grams``),
   not the activations. Mappings (the codes) learn through a
   straight-through latent U: the forward pass uses the quantized W_q, the gradient updates U,
   and every code moves to the codeword nearest its slice of U. A proximal term pulls U towards
   its current codeword, so a code changes only when the gradient keeps pushing it to a
   neighbouring codeword and never runs off to extreme values.

Deterministic for a seed; layer by layer with a tqdm progress bar.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from hotops.codebook import reference
from hotops.codebook.format import CodebookWeight
from hotops.codebook.kmeans import nearest, quantize_weight
from hotops.codebook.module import CodebookLinear

GROUP_CHOICES = (4, 2, 1)  # row groups tried, most first, until a layer fits its bit budget


@dataclasses.dataclass
class Grams:
    """Second moments of one layer's calibration inputs: X_q from the model compressed so far,
    X from the dense model (same tokens). The loss of a quantized W_q against the dense layer's
    output,  ||X_q W_q^T - X W^T||^2 = tr(W_q qq W_q^T) - 2 tr(W_q qf W^T) + tr(W ff W^T),
    so earlier layers' errors are compensated, not compounded."""

    qq: Tensor  # X_q^T X_q
    qf: Tensor  # X_q^T X
    ff: Tensor  # X^T X


def _call(model: nn.Module, batch) -> None:
    if isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


def _layer_grams(dense: nn.Module, model: nn.Module, name: str, calib: Iterable) -> Grams:
    """Grams of layer `name`'s inputs in `model` (compressed so far) and in `dense`."""
    seen = {}
    hooks = [m.get_submodule(name).register_forward_pre_hook(
        lambda mod, args, key=key: seen.__setitem__(key, args[0].detach().reshape(-1, args[0].shape[-1]).double()))
        for key, m in (("q", model), ("f", dense))]
    acc = None
    try:
        with torch.no_grad():
            for batch in calib:
                seen.clear()
                _call(dense, batch)
                _call(model, batch)
                if len(seen) < 2:
                    raise ValueError(f"the calibration data never reached {name}")
                xq, xf = seen["q"], seen["f"]
                parts = (xq.T @ xq, xq.T @ xf, xf.T @ xf)
                acc = parts if acc is None else tuple(a + p for a, p in zip(acc, parts))
    finally:
        for h in hooks:
            h.remove()
    if acc is None:
        raise ValueError("calib is empty")
    return Grams(*(t.float() for t in acc))


def _assign(latent: Tensor, codebooks: Tensor, group_ptr: Tensor, in_group: int) -> Tensor:
    """Codes (N, J, M): per row group, greedily the codeword nearest the residual of `latent`."""
    N, K = latent.shape
    O, M = codebooks.shape[:2]
    codes = torch.empty(N, K // in_group, M, dtype=torch.uint8)
    for o in range(O):
        r0, r1 = int(group_ptr[o]), int(group_ptr[o + 1])
        residual = latent[r0:r1].reshape(-1, in_group)
        for m in range(M):
            idx = nearest(residual, codebooks[o, m])
            codes[r0:r1, :, m] = idx.reshape(r1 - r0, -1).to(torch.uint8)
            residual = residual - codebooks[o, m][idx]
    return codes


def output_error(w_q: Tensor, w: Tensor, g: Grams) -> Tensor:
    """||X_q w_q^T - X w^T||^2 / ||X w^T||^2 from the layer's Grams."""
    ref = ((w @ g.ff) * w).sum()
    err = ((w_q @ g.qq) * w_q).sum() - 2 * ((w_q @ g.qf) * w).sum() + ref
    return err.clamp_min(0) / ref.clamp_min(1e-30)


def learn_layer(w: Tensor, grams: Grams, init: CodebookWeight, steps: int, lr: float = 1e-3,
                proximal: float = 1e-2, reassign_every: int = 5) -> CodebookWeight:
    """JLCM's joint learning of codebooks, scales and mappings for one layer (see module doc)."""
    w = w.detach().float()
    perm = init.perm
    w_stored = w if perm is None else w[perm]
    codes = init.code_indices().clone()
    codebooks = nn.Parameter(init.codebooks.float().clone())
    scales = nn.Parameter(init.scales.float().clone())
    latent = nn.Parameter(w_stored / scales.detach()[:, None])  # normalised rows
    opt = torch.optim.Adam([codebooks, scales, latent], lr=lr)
    g = init.in_group
    for step in range(steps):
        packed = reference.pack_codes(codes)
        unscaled = reference.dequantize_stored(packed, codebooks, torch.ones_like(scales), init.group_ptr)
        w_q = scales[:, None] * unscaled
        surrogate = scales[:, None] * latent
        w_used = w_q + (surrogate - surrogate.detach())  # value W_q, gradient also into U
        loss = output_error(w_used, w_stored, grams) + proximal * (latent - unscaled.detach()).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % reassign_every == 0 or step + 1 == steps:
            with torch.no_grad():
                codes = _assign(latent.detach(), codebooks.detach(), init.group_ptr, g)
    return CodebookWeight(codes, codebooks.detach(), scales.detach(), init.group_ptr, perm)


def _linears(model: nn.Module, skip: Sequence[str]) -> dict:
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not any(s in name for s in skip)}


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def compress(model: nn.Module, bits_per_weight: float = 2.0, calib: Optional[Iterable] = None,
             steps: int = 100, seed: int = 0, in_group: int = 4, num_codebooks: int = 1,
             code_bits_per_weight: Optional[float] = None, lr: float = 1e-3, kmeans_iters: int = 25,
             storage_dtype: torch.dtype = torch.float16, skip: Sequence[str] = (),
             progress: bool = True) -> nn.Module:
    """Replace every nn.Linear of `model` (in place; returned too) by a CodebookLinear of at most
    `bits_per_weight` exact storage bits per weight.

    Args:
        calib: iterable of model inputs (tensors, tuples of args or dicts of kwargs); the
            layer-output reconstruction is measured on them. None: k-means only (no learning).
        steps: joint-learning steps per layer (0: k-means initialisation only).
        in_group, num_codebooks: the vector format; codes cost `code_bits_per_weight`
            (default: the whole number of bits below `bits_per_weight` that uint8 codes hold).
        storage_dtype: dtype of the stored codebooks and scales (counted in the bits).
        skip: substrings of module names to leave dense.
    """
    from tqdm.auto import tqdm

    from hotops.codebook.format import code_bits

    code_bpw = code_bits_per_weight if code_bits_per_weight is not None else \
        min(8 * num_codebooks / in_group, float(int(bits_per_weight)))
    code_bits(code_bpw, in_group, num_codebooks)  # refuses combinations that do not fit
    layers = _linears(model, skip)
    learn = calib is not None and steps > 0
    if learn:
        calib = list(calib)
        dense = copy.deepcopy(model)  # the targets: every layer's dense output on dense inputs
    torch.manual_seed(seed)
    bar = tqdm(layers.items(), desc="JLCM", disable=not progress)
    for i, (name, lin) in enumerate(bar):
        w = lin.weight.detach().float()
        for groups in GROUP_CHOICES:
            init = quantize_weight(w, code_bpw, in_group, num_codebooks, groups, kmeans_iters, seed + i)
            stored = CodebookWeight.from_packed(init.codes, init.codebooks.to(storage_dtype),
                                                init.scales.to(storage_dtype), init.group_ptr, init.perm)
            if stored.bits_per_weight <= bits_per_weight or groups == 1:
                break
        if stored.bits_per_weight > bits_per_weight:
            raise ValueError(f"{name}: {stored.bits_per_weight:.3f} bits/weight even with one row group; "
                             f"raise bits_per_weight or lower the code bits")
        grams = _layer_grams(dense, model, name, calib) if learn else None
        learned = learn_layer(w, grams, init, steps, lr) if learn else init
        final = CodebookWeight.from_packed(learned.codes, learned.codebooks.to(storage_dtype),
                                           learned.scales.to(storage_dtype), learned.group_ptr, learned.perm)
        if learn:
            err = output_error(final.dequantize().to(w.device), w, grams).item()
            bar.set_postfix(layer=name[-24:], out_err=f"{err:.4f}")
        _replace(model, name, CodebookLinear(final, lin.bias).to(lin.weight.device))
    return model


def load_compressed(model: nn.Module, state_dict: dict) -> nn.Module:
    """Load a compressed model's state_dict into the dense architecture `model`: every nn.Linear
    whose entry holds codes becomes a CodebookLinear of the stored shapes, then the whole
    state_dict is loaded (strictly)."""
    for name, lin in list(_linears(model, ()).items()):
        prefix = f"{name}." if name else ""
        if prefix + "codes" not in state_dict:
            continue
        get = lambda key: state_dict.get(prefix + key)  # noqa: E731
        weight = CodebookWeight.from_packed(get("codes"), get("codebooks"), get("scales"),
                                            get("group_ptr"), get("perm"))
        _replace(model, name, CodebookLinear(weight, get("bias")))
    model.load_state_dict(state_dict)
    return model
