"""What second-order compression reads from a model: its layers' inputs on calibration batches
(a Linear's input rows, a Conv2d's patches; as token-weighted Grams, from the dense model and from
the model compressed so far), its output and that output's distortion (1 - cosine) against the
dense one; and the nn.Linear layers it finds and replaces. Shared by JLCM
(hotops.codebook.jlcm) and second-order pruning (hotops.sparse.second_order)."""

from __future__ import annotations

import dataclasses
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

    def hook(module, args):
        seen.append(args[0])
        raise _Reached

    handle = model.get_submodule(names[0]).register_forward_pre_hook(hook)
    try:
        _call(model, batch)
    except _Reached:
        pass
    finally:
        handle.remove()
    if not seen:
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
        def record(module, args):
            if name not in seen and args and isinstance(args[0], Tensor):
                seen[name] = (args[0], _version(args[0]))  # the tensor kept alive: ids are not reused

        return record

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
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
    return [Grams(*(t.float() for t in parts), *(() if dense_gram else (None,))) for parts in acc]


def _dense_grams(
    model: nn.Module, names: Sequence[str], calib: List, token_mask: Optional[Callable]
) -> Dict[str, Tensor]:
    """Token-weighted X^T X of every layer's input in the (dense) model, from one pass over the
    calibration data."""
    acc: Dict[str, Tensor] = {}
    current = []

    def hook(name):
        def accumulate(module, args):
            x = _rows(module, args[0], current[0], token_mask).double()
            gram = (x * _token_weights(x, module.weight.flatten(1))[:, None]).T @ x
            acc[name] = acc[name] + gram if name in acc else gram

        return accumulate

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
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
    return {n: acc[n].float() for n in names}


def _linears(model: nn.Module, skip: Sequence[str]) -> Dict[str, nn.Linear]:
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not any(s in name for s in skip)
    }


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
