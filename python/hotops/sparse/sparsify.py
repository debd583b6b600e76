"""sparsify(): prune a model's Linear / Conv2d layers (magnitude, or learned masks HYDRA / DASS
style) and swap in the sparse modules."""

from __future__ import annotations

import warnings
from typing import Callable, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hotops._backend import check_number
from hotops._calibration import _check_selection, _replace
from hotops.integrations.torch_prune import deepcopy as prune_safe_deepcopy
from hotops.integrations.torch_prune import is_pruned
from hotops.integrations.torch_prune import remove as remove_pruning
from hotops.sparse.format import BLOCK_SIZES, block_mask, check_sparsity, magnitude_mask
from hotops.sparse.module import SparseConv2d, SparseLinear
from hotops.sparse.second_order import check_layers, prune_model

# ------------------------------------------------------------------ mask learning (HYDRA / DASS)


class _TopK(torch.autograd.Function):
    """Binary mask of the k largest scores; the gradient passes straight through."""

    @staticmethod
    def forward(ctx, scores: Tensor, keep: int) -> Tensor:
        mask = torch.zeros_like(scores)
        if keep > 0:
            mask.view(-1)[scores.abs().flatten().topk(keep, sorted=False).indices] = 1.0
        return mask

    @staticmethod
    def backward(ctx, g: Tensor):
        return g, None


class _Scored(nn.Module):
    """A frozen dense layer whose weight is masked by the top-k of learnable scores."""

    def __init__(self, layer: nn.Module, sparsity: float):
        super().__init__()
        self.layer = layer
        w = layer.weight.detach()
        self.keep = int(round((1.0 - sparsity) * w.numel()))
        fan_in = w[0].numel()
        # HYDRA's scaled initialisation: scores start proportional to |w|
        self.scores = nn.Parameter((6.0 / fan_in) ** 0.5 * w.abs() / w.abs().max().clamp_min(1e-12))

    def mask(self) -> Tensor:
        return _TopK.apply(self.scores, self.keep)

    def forward(self, x: Tensor) -> Tensor:
        w = self.layer.weight * self.mask()
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, w, self.layer.bias)
        c = self.layer
        return F.conv2d(x, w, c.bias, c.stride, c.padding, c.dilation, c.groups)


_ZERO_PADDING_ONLY = (
    "sparse convolutions take numeric zero padding only (padding_mode='zeros', padding given as "
    "numbers, not 'same' / 'valid')"
)


def _split(model: nn.Module, skip: Callable[[str, nn.Module], bool]):
    """(layers, dense): every nn.Linear and every nn.Conv2d with numeric zero padding
    (SparseConv2d's) that ``skip(name, module)`` does not name, each once; and the names of the
    convolutions that stay dense (padding_mode other than "zeros", or padding="same"/"valid")."""
    layers, dense = [], []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)) and not skip(name, m):
            if isinstance(m, nn.Conv2d) and (m.padding_mode != "zeros" or isinstance(m.padding, str)):
                dense.append(name)
            else:
                layers.append((name, m))
    return layers, dense


def _warn_dense(dense: List[str], stacklevel: int) -> None:
    if dense:
        warnings.warn(f"leaving {', '.join(dense)} dense: {_ZERO_PADDING_ONLY}", stacklevel=stacklevel + 1)


def _prunable(model: nn.Module, skip: Callable[[str, nn.Module], bool]) -> List[Tuple[str, nn.Module]]:
    """The layers sparsify prunes (see _split); the convolutions left dense are named in a
    warning."""
    layers, dense = _split(model, skip)
    _warn_dense(dense, stacklevel=3)
    return layers


def sparsify(
    model: nn.Module,
    sparsity: Optional[float] = 0.9,
    method: str = "magnitude",
    *,
    data: Optional[Iterable] = None,
    loss_fn: Optional[Callable] = None,
    steps: int = 100,
    lr: float = 0.1,
    skip: Callable[[str, nn.Module], bool] = lambda name, m: False,
    policy: str = "auto",
    inplace: bool = False,
    block: Optional[int] = None,
    calib: Optional[Iterable] = None,
    token_mask: Optional[Callable] = None,
    damp: float = 0.01,
) -> nn.Module:
    """Prunes every nn.Linear and every nn.Conv2d with numeric zero padding (except those
    ``skip(name, module)`` names) to ``sparsity`` and swaps in SparseLinear / SparseConv2d, whose
    parameters keep the dense ones' requires_grad. A convolution with another padding_mode or with
    padding="same" / "valid" stays dense (a warning names it). A layer registered under several
    names is replaced at each, so it stays shared.

    method="magnitude": one-shot, per layer, the largest |w| survive.
    method="learned": DASS/HYDRA-style. Weights are frozen; each layer gets scores initialised
    from |w|; the forward uses w * topk(scores) and the gradient reaches the scores straight
    through the top-k. ``steps`` SGD steps over ``data`` (an iterable of (inputs, targets),
    cycled) with ``loss_fn(model(inputs), targets)``, then the learned masks are packed.
    method="second_order": one-shot, layer by layer in the order the model lists them (which
    should be the forward order), OBS / SparseGPT: ``calib`` (an iterable of model inputs:
    tensors, tuples of args or dicts of kwargs, as ``hotops.codebook.compress`` takes) gives each
    layer's input Gram H; the weights pruned are those whose loss w^2 / [H^-1]_jj is smallest,
    and the surviving weights of the layer move to compensate them, towards the dense model's
    outputs from the pruned model's inputs. ``token_mask(batch)`` keeps the input positions that
    count (e.g. a transformer batch's attention mask); ``damp`` is added to H's diagonal as a
    share of its mean. Linear and Conv2d (groups 1) layers; two layers tied to one weight tensor
    raise. Layers are pruned one after the other, so with ``inplace=True`` an error at a layer
    (e.g. calibration inputs that are not finite there) leaves the layers before it pruned (and
    still dense modules); with ``inplace=False`` the model is untouched.

    ``block`` (4 or 8, magnitude only): prune whole blocks of ``block`` consecutive output channels
    x one column by their L2 norm, which the blocked format runs faster than unstructured masks,
    at some accuracy (structured pruning keeps fewer free choices).

    Layers pruned with torch.nn.utils.prune have the pruning made permanent first (their hooks
    removed, values from ``weight_orig``). ``sparsity=None`` keeps each layer's pattern as it is:
    its ``weight_mask`` if pruned so, else its non-zeros.
    """
    if sparsity is None:
        if method != "magnitude" or block is not None:
            raise ValueError(
                "sparsity=None keeps the layers' own patterns: it takes method='magnitude' and no block"
            )
    else:
        check_sparsity(sparsity)
    if method not in ("magnitude", "learned", "second_order"):
        raise ValueError(f"method must be 'magnitude', 'learned' or 'second_order', got {method!r}")
    if block is not None and (block not in BLOCK_SIZES or method != "magnitude"):
        raise ValueError(
            f"block must be None or one of {BLOCK_SIZES}, with method='magnitude'; got block={block!r}, "
            f"method={method!r}"
        )
    if method != "second_order" and (calib is not None or token_mask is not None):
        raise ValueError(
            f"calib and token_mask are inputs of method='second_order' only; method is {method!r}"
        )
    if not inplace:
        model = prune_safe_deepcopy(model)
    layers, dense = _split(model, skip)
    if not layers and dense:  # say why, rather than "no nn.Conv2d" beside an nn.Conv2d
        raise ValueError(
            f"sparsify: found no layers to prune: the only layers outside skip are nn.Conv2d layers "
            f"({', '.join(dense)}), all left dense because {_ZERO_PADDING_ONLY}; give them zero padding (e.g. "
            "padding=k // 2 instead of 'same'), or leave the model dense"
        )
    _warn_dense(dense, stacklevel=2)
    # Everything is checked before the first weight changes: with inplace=True it is the caller's.
    _check_selection(dict(layers), "sparsify", "prune", "nn.Linear / nn.Conv2d")
    pruned = [name for name, m in layers if is_pruned(m)]
    if pruned and sparsity is not None:
        warnings.warn(
            f"sparsify: layer{'' if len(pruned) == 1 else 's'} {', '.join(pruned)} already "
            f"carr{'ies' if len(pruned) == 1 else 'y'} a "
            f"torch.nn.utils.prune mask (weight_mask), and sparsity={sparsity} prunes "
            f"{'it' if len(pruned) == 1 else 'them'} again (method={method!r}) to that sparsity, "
            "whatever the mask's own; pass sparsity=None to keep the torch masks as they are (or "
            "silence this warning where pruning further is meant)",
            UserWarning,
            stacklevel=2,
        )
    for name, m in layers:
        if m.weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(
                f"sparsify: layer {name} has {str(m.weight.dtype).replace('torch.', '')} weights; "
                "sparse layers take float32, bfloat16 or float16 (their values are kept in float32): "
                "convert the model first, e.g. model.float()"
            )
    if method == "learned":
        if data is None or loss_fn is None:
            raise ValueError("method='learned' needs data (an iterable of (inputs, targets)) and loss_fn")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
    elif method == "second_order":
        calib = list(calib) if calib is not None else []
        if not calib:
            raise ValueError("method='second_order' needs calib: a non-empty iterable of model inputs")
        damp = check_number(damp, "damp", low=0.0)
        check_layers(layers)
    masks = {name: remove_pruning(m) for name, m in layers}
    if sparsity is None:
        masks = {name: m.weight.detach() != 0 if masks[name] is None else masks[name] for name, m in layers}
    elif method == "magnitude":
        masks = {
            name: magnitude_mask(m.weight, sparsity)
            if block is None
            else block_mask(m.weight, sparsity, block, getattr(m, "groups", 1))
            for name, m in layers
        }
    elif method == "learned":
        masks = _learn_masks(model, layers, sparsity, data, loss_fn, steps, lr)
    else:
        masks = prune_model(model, layers, sparsity, calib, token_mask, damp)
    for name, m in layers:
        cls = SparseLinear if isinstance(m, nn.Linear) else SparseConv2d
        new = cls.from_dense(m, mask=masks[name], policy=policy, block=block).train(m.training)
        new.values.requires_grad_(m.weight.requires_grad)  # frozen layers stay frozen
        if new.bias is not None:
            new.bias.requires_grad_(m.bias.requires_grad)
        _replace(model, name, new)
    return model


def _learn_masks(model, layers, sparsity, data, loss_fn, steps, lr):
    """The masks learned through _Scored wrappers; the model's layers, requires_grad flags and
    mode are given back afterwards, also when the training raises (e.g. in loss_fn)."""
    scored = {name: _Scored(m, sparsity) for name, m in layers}
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        for name, s in scored.items():
            _replace(model, name, s)
        for p, _ in frozen:
            p.requires_grad_(False)
        scores = [s.scores for s in scored.values()]
        for p in scores:
            p.requires_grad_(True)
        opt = torch.optim.SGD(scores, lr=lr, momentum=0.9)
        model.train()
        it, done, fresh = iter(data), 0, True
        while done < steps:
            try:
                inputs, targets = next(it)
            except StopIteration:
                if fresh:
                    raise ValueError("data yielded no batches") from None
                it, fresh = iter(data), True
                continue
            fresh = False
            opt.zero_grad()
            loss_fn(model(inputs), targets).backward()
            opt.step()
            done += 1
        return {name: s.mask().detach().bool() for name, s in scored.items()}
    finally:
        model.train(was_training)
        for p, req in frozen:
            p.requires_grad_(req)
        for name, s in scored.items():
            _replace(model, name, s.layer)
