"""fuse(): the inference form of a pruned network. Eval-mode BatchNorm is folded into the layer
before it and a ReLU / ReLU6 after it becomes the sparse kernel's fused activation, so a
conv + BN + activation block is one kernel call."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from hotops.sparse.module import SparseConv2d, SparseLinear

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
_FUSED_ACTIVATIONS = {nn.ReLU: "relu", nn.ReLU6: "relu6"}


def _check_eval(model: nn.Module) -> None:
    training = [
        f"module {name!r}" if name else "the model"
        for name, m in model.named_modules()
        if m.training and (m is model or isinstance(m, _BATCHNORMS))
    ]
    if training:
        raise ValueError(
            "fuse() folds BatchNorm's running statistics, which is only valid in eval mode, but "
            f"{', '.join(training[:3])}{' ...' if len(training) > 3 else ''} "
            f"{'is' if len(training) == 1 else 'are'} in training mode: call model.eval() first (and keep "
            "training on the unfused model)"
        )


def _fold_into_sparse(layer, bn) -> None:
    """values[o, k] *= s[o] and bias = (bias - mean) * s + beta, s = gamma / sqrt(var + eps): the
    same structure, so the packed form and the layer's measured dispatch stay valid."""
    scale = torch.rsqrt(bn.running_var.float() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.float()
    shift = -bn.running_mean.float() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.float()
    rows = layer.sparse_weight.row_indices()
    with torch.no_grad():
        layer.values.mul_(scale[rows])
        bias = shift if layer.bias is None else layer.bias.float() * scale + shift
        layer.bias = nn.Parameter(bias.to(layer.values.dtype), requires_grad=layer.values.requires_grad)


def _foldable(layer: nn.Module, bn: nn.Module) -> bool:
    if not isinstance(bn, _BATCHNORMS) or bn.running_mean is None:  # no running statistics: nothing to fold
        return False
    if isinstance(layer, (SparseConv2d, nn.Conv2d)):
        return isinstance(bn, nn.BatchNorm2d) and bn.num_features == layer.out_channels
    if isinstance(layer, (SparseLinear, nn.Linear)):
        return isinstance(bn, nn.BatchNorm1d) and bn.num_features == layer.out_features
    return False


def fuse(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Folds, in every nn.Sequential, a BatchNorm2d (BatchNorm1d) that follows a SparseConv2d
    (SparseLinear) into the layer's non-zero values and bias, and hands a ReLU / ReLU6 that follows
    the layer (or its BN) to the layer as its fused ``activation``; the folded modules become
    nn.Identity, so state_dict keys of the others do not move. A dense nn.Conv2d / nn.Linear
    followed by BN gets torch's own folding (``torch.nn.utils.fusion.fuse_conv_bn_eval`` /
    ``fuse_linear_bn_eval``); its activation stays a module.

    Only valid for inference: the folded model uses BN's running statistics, so ``model`` must be
    in eval mode (ValueError otherwise) and must not be trained afterwards. Blocks written in a
    custom ``forward`` rather than an nn.Sequential are left as they are."""
    _check_eval(model)
    if not inplace:
        model = copy.deepcopy(model)
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        kids = list(seq)
        for i, layer in enumerate(kids):
            sparse = isinstance(layer, (SparseConv2d, SparseLinear))
            if not (sparse or isinstance(layer, (nn.Conv2d, nn.Linear))):
                continue
            j = i + 1
            # a sparse layer's fused activation runs before what follows: nothing after it folds in
            if j < len(kids) and not (sparse and layer.activation) and _foldable(layer, kids[j]):
                if sparse:
                    _fold_into_sparse(layer, kids[j])
                else:
                    fold = fuse_conv_bn_eval if isinstance(layer, nn.Conv2d) else fuse_linear_bn_eval
                    seq[i] = fold(layer, kids[j])
                seq[j] = nn.Identity()
                j += 1
            act = _FUSED_ACTIVATIONS.get(type(kids[j])) if j < len(kids) else None
            if sparse and act is not None and layer.activation is None:
                layer.activation = act
                seq[j] = nn.Identity()
    return model
