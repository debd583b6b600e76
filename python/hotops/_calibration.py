"""What second-order compression reads from a model: its layers' inputs on calibration batches
(a Linear's input rows, a Conv2d's patches; as token-weighted Grams, from the dense model and from
the model compressed so far), its output and that output's distortion (1 - cosine) against the
dense one; and the nn.Linear layers it finds and replaces. Shared by JLCM
(hotops.codebook.jlcm) and second-order pruning (hotops.sparse.second_order)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclasses.dataclass
class Grams:
    """Second moments of one layer's calibration inputs: X_q from the model compressed so far,
    X from the dense model (same tokens). The loss of a quantized W_q against the dense layer's
    output,  ||X_q W_q^T - X W^T||^2 = tr(W_q qq W_q^T) - 2 tr(W_q qf W^T) + tr(W ff W^T),
    so earlier layers' errors are compensated, not compounded."""

    qq: Tensor  # X_q^T X_q
    qf: Tensor  # X_q^T X
    ff: Optional[Tensor]  # X^T X; None where only qq and qf are read (pruning)

    @classmethod
    def dense(cls, ff: Tensor) -> "Grams":
        return cls(ff, ff, ff)

    def target(self, w: Tensor, damped_qq: Tensor) -> Tensor:
        """The weight V (float64) that best maps the layer's inputs in the compressed model to its
        dense outputs, argmin ||X_q V^T - X W^T||: V^T = W^T + qq^-1 (qf - qq) W^T. Written as W
        moved by what the inputs' change asks, so the damping (`damped_qq`: qq + damp I)
        regularises the move and not W itself: where X_q = X, V = W whatever the damp (the
        plain solve qq^-1 qf W^T would shrink W towards zero along the inputs' weak directions)."""
        w = w.double()
        return w + torch.linalg.solve(damped_qq, (self.qf.double() - self.qq.double()) @ w.T).T


def _damped(gram: Tensor, damp: float) -> Tensor:
    """gram (float64) + damp * mean(diag) I; inputs no calibration token uses get a unit diagonal,
    so the matrix is positive definite whatever the data."""
    h = gram.double().clone()
    diag = h.diagonal()
    diag[diag <= 0] = 1
    diag += damp * diag.mean()
    return h


def _call(model: nn.Module, batch):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def model_output(model: nn.Module, batch) -> Tensor:
    """The default `output` of compress: the model's output tensor (the first one of a tuple,
    dict or transformers ModelOutput)."""
    out = _call(model, batch)
    if isinstance(out, dict):
        out = next(iter(out.values()))
    elif isinstance(out, (tuple, list)):
        out = out[0]
    return out


def distortion(y: Tensor, target: Tensor) -> Tensor:
    """Mean over output vectors (the last dimension) of 1 - cosine."""
    return (
        1
        - F.cosine_similarity(y.reshape(-1, y.shape[-1]), target.reshape(-1, target.shape[-1]), dim=1).mean()
    )


def _first_tensor(args: tuple, kwargs: dict) -> Optional[Tensor]:
    """A layer call's input: its first positional tensor, else its first keyword tensor (a layer
    called as ``self.b(input=h)``)."""
    return next((a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)), None)


class _Reached(Exception):
    """Stops a forward pass once the hooked layer's input is captured."""


def _rows(module: nn.Module, x: Tensor, batch, token_mask: Optional[Callable]) -> Tensor:
    """`module`'s input x as the rows its weight (out, in_features) multiplies: a Linear's
    (..., in_features) flattened, a Conv2d's patches (in_channels x kernel, one row per output
    position); only the tokens `token_mask(batch)` keeps (where its shape is the input's leading
    shape: a layer fed pooled vectors, or a convolution, keeps all its rows)."""
    x = x.detach()
    if isinstance(module, nn.Conv2d):
        x = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride).transpose(1, 2)
    elif token_mask is not None:
        keep = token_mask(batch)
        if keep.shape == x.shape[:-1]:
            return x[keep.to(torch.bool)]
    return x.reshape(-1, x.shape[-1])


def _token_weights(x: Tensor, weight: Tensor) -> Tensor:
    """1 / ||x W^T||^2 per row of the dense inputs x: with rows weighted so, the Gram's loss is
    the sum of the tokens' relative output errors. Unweighted, a few tokens whose outputs are huge
    (in MiniLM, the FFN outputs that write the residual stream's outlier features) own the loss;
    fitting them cost the other tokens so much that one FFN layer's codes took the model's
    cosine from 0.99 to 0.18 (docs/notes/codebook.md)."""
    return (x @ weight.detach().double().T).pow(2).sum(1).clamp_min(1e-30).reciprocal()


def _layer_inputs(
    model: nn.Module, names: Sequence[str], batch, token_mask: Optional[Callable]
) -> List[Tensor]:
    """The input rows (float64) of each of the layers `names`, which read one input tensor
    (``input_groups``), when `model` runs `batch`; the rest of the forward pass is skipped."""
    seen = []

    def hook(module, args, kwargs):
        seen.append(_first_tensor(args, kwargs))
        raise _Reached

    handle = model.get_submodule(names[0]).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        _call(model, batch)
    except _Reached:
        pass
    finally:
        handle.remove()
    if not seen or seen[0] is None:
        raise ValueError(f"the calibration data never reached {names[0]}")
    return [_rows(model.get_submodule(n), seen[0], batch, token_mask).double() for n in names]


def _version(t: Tensor) -> Optional[int]:
    """t's count of in-place edits; None for a tensor made in inference mode, which keeps none."""
    try:
        return t._version
    except RuntimeError:
        return None


def input_groups(model: nn.Module, names: Sequence[str], batch) -> List[List[str]]:
    """`names` (in forward order) cut into runs of consecutive layers that read the same input
    tensor, unchanged in between (a transformer block's query, key and value projections), as one
    forward pass of `batch` shows. Compressing one layer of a run cannot change the others'
    inputs, so one pass over the calibration data gives the Grams of the whole run: second-order
    pruning of all-MiniLM-L6-v2 spent most of its time re-running the forward up to each layer."""
    seen = {}

    def hook(name):
        def record(module, args, kwargs):
            x = _first_tensor(args, kwargs)
            if name not in seen and x is not None:
                seen[name] = (x, _version(x))  # the tensor kept alive: ids are not reused

        return record

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n), with_kwargs=True) for n in names]
    try:
        with torch.no_grad():
            _call(model, batch)
    finally:
        for h in handles:
            h.remove()
    groups: List[List[str]] = []
    for n in names:
        prev = seen.get(groups[-1][-1]) if groups else None
        now = seen.get(n)
        tracked = prev is not None and now is not None and now[1] is not None
        if tracked and now[0] is prev[0] and now[1] == prev[1]:
            groups[-1].append(n)
        else:
            groups.append([n])
    return groups


# Grams whose mean diagonal lies within 2^-RANGE..2^RANGE are stored as they are (see _float32).
_GRAM_RANGE = 64


def _float32(name: str, grams: Sequence[Tensor]) -> List[Tensor]:
    """One layer's Gram accumulators (float64) as float32, refused unless finite.

    A layer whose dense output is (nearly) zero, e.g. a zero-initialised LoRA-B or adaLN-zero
    projection, weighs every token by about 1e30 (``_token_weights``), and its Grams overflow
    float32. Where the first Gram's mean diagonal lies outside 2^-64..2^64, all of them are scaled
    by the one power of two that brings it near 1: exact, and every reader is invariant to a common
    scale (damping relative to the mean diagonal, the target solve, the ranking of the OBS costs,
    the relative output error). Grams in that range are left alone because ``_damped``'s unit
    diagonal for inputs no token uses is not relative: scaling those would move results."""
    mean = grams[0].diagonal().mean().item()
    if math.isfinite(mean) and mean > 0 and abs(math.log2(mean)) > _GRAM_RANGE:
        grams = [g * 2.0 ** -round(math.log2(mean)) for g in grams]
    out = [g.float() for g in grams]
    if not all(torch.isfinite(g).all() for g in out):
        raise ValueError(
            f"the calibration inputs of layer {name} are not all finite: check the calibration data for "
            "NaN or inf, and the layers before it for outputs that overflow"
        )
    return out


def _layer_grams(
    dense: nn.Module,
    model: nn.Module,
    names: Sequence[str],
    calib: List,
    token_mask: Optional[Callable],
    dense_gram: bool = True,
) -> List[Grams]:
    """Token-weighted Grams of the inputs of layers `names` (one ``input_groups`` run) in `model`
    (compressed so far) and in `dense`, one per layer; with `dense_gram` False, ``ff`` is None
    (a third of the products, which pruning never reads)."""
    weights = [dense.get_submodule(n).weight.flatten(1) for n in names]
    acc: List = [None] * len(names)
    with torch.no_grad():
        for batch in calib:
            xqs, xfs = (_layer_inputs(m, names, batch, token_mask) for m in (model, dense))
            for i, (xq, xf, weight) in enumerate(zip(xqs, xfs, weights)):
                a = _token_weights(xf, weight)[:, None]
                xqa = xq * a
                parts = (xqa.T @ xq, xqa.T @ xf) + (((xf * a).T @ xf,) if dense_gram else ())
                acc[i] = parts if acc[i] is None else tuple(s + p for s, p in zip(acc[i], parts))
    return [
        Grams(*_float32(name, parts), *(() if dense_gram else (None,))) for name, parts in zip(names, acc)
    ]


def _dense_grams(
    model: nn.Module, names: Sequence[str], calib: List, token_mask: Optional[Callable]
) -> Dict[str, Tensor]:
    """Token-weighted X^T X of every layer's input in the (dense) model, from one pass over the
    calibration data."""
    acc: Dict[str, Tensor] = {}
    current = []

    def hook(name):
        def accumulate(module, args, kwargs):
            x = _rows(module, _first_tensor(args, kwargs), current[0], token_mask).double()
            gram = (x * _token_weights(x, module.weight.flatten(1))[:, None]).T @ x
            acc[name] = acc[name] + gram if name in acc else gram

        return accumulate

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n), with_kwargs=True) for n in names]
    try:
        with torch.no_grad():
            for batch in calib:
                current[:] = [batch]
                _call(model, batch)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in acc]
    if missing:
        raise ValueError(f"the calibration data never reached {missing}")
    return {n: _float32(n, (acc[n],))[0] for n in names}


def _linears(model: nn.Module, skip: Sequence[str]) -> Dict[str, nn.Linear]:
    """The nn.Linear layers whose names contain none of `skip` (one pattern if a str), each once
    under its first name (named_modules): a layer registered under several names is one layer."""
    skip = (skip,) if isinstance(skip, str) else skip
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not any(s in name for s in skip)
    }


def _check_selection(layers: Dict[str, nn.Module], caller: str, verb: str, kinds: str) -> None:
    """Refuse, before anything changes, a selection of layers to replace that is empty (say so
    rather than hand the model back as it was) or that is the model itself, which cannot be
    replaced inside itself."""
    if not layers:
        raise ValueError(
            f"{caller}: found no layers to {verb}: no {kinds} outside skip (a model already "
            "converted has none left)"
        )
    if "" in layers:
        raise ValueError(
            f"{caller}: the model is itself a {type(layers['']).__name__}, which cannot be replaced "
            "inside itself; wrap it, e.g. nn.Sequential(layer), and take [0] of the result"
        )


def _check_untied(layers: Dict[str, nn.Module], caller: str) -> None:
    """Refuse two layers that share one weight tensor (tied weights): second-order pruning and
    JLCM rewrite each layer's weight in turn from its own inputs, so the second would overwrite
    the first's result in the tensor they share."""
    owner: Dict[int, str] = {}
    for name, m in layers.items():
        first = owner.setdefault(id(m.weight), name)
        if first != name:
            raise ValueError(
                f"{caller}: layers {first} and {name} share one weight tensor (tied weights), which cannot "
                "take two different results; skip one of them, or untie them first"
            )


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` at every name the module at `name` is registered under (e.g. a ModuleList that
    repeats one layer, ALBERT-style), so the model still shares it."""
    old = model.get_submodule(name)
    for alias, m in list(model.named_modules(remove_duplicate=False)):
        if m is old:
            parent_name, _, child = alias.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """`model` in eval mode inside (no dropout; BatchNorm uses, and leaves alone, its running
    statistics); after it, on an error too, the module at each name takes back the mode of the
    module there before (a layer replaced meanwhile takes its predecessor's)."""
    modes = {name: m.training for name, m in model.named_modules()}
    model.eval()
    try:
        yield
    finally:
        for name, m in model.named_modules():
            m.training = modes.get(name, m.training)
