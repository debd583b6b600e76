"""JLCM: compress every nn.Linear of a model into the codebook format under a model-wide budget.

Three stages, each with a tqdm progress bar:

1. **Plan** (``plan``): per layer, every candidate ``Format`` (in_group, codebooks, codebook size,
   row groups) is initialised by k-means (``kmeans.quantize_weight``: rows grouped by
   distribution, residual k-means per group) and scored by its output error on the dense
   calibration inputs. One end-to-end measurement per layer (only that layer quantized, the rest
   dense) turns output error into damage to the model's output. A greedy knapsack then gives the
   extra bits to the layers where they remove the most damage per bit, until the average exact
   storage bits, weighted by parameter count, reach the budget. On small layers the codebooks'
   own bytes are a large part of the budget; the plan counts them exactly.
2. **Layer-wise joint learning** (``learn_layer``): layers in order; each minimises the sum
   over tokens of ||W_q x_q - W x||^2 / ||W x||^2, x_q being a token's input in the model
   compressed so far and x in the dense model (so it compensates the error of the layers before
   it). The loss needs only K x K token-weighted Grams (``Grams``). A few rounds alternate the
   mappings and the codebooks: each code moves to the nearest codeword of its error-compensated
   target in the loss's own (second-order) metric, one input group at a time, the error passed
   on to the groups not yet coded (GPTQ's rule, ``second_order_codes``); then the codebooks and
   scales take exact gradient steps with the codes fixed. (A straight-through latent weight with
   a proximal pull, JLCM's mapping update, was the first version: it lowered each layer's error
   but not the model's, see docs/notes/codebook.md.)
3. **End-to-end fine-tuning** (AQLM's global stage): codes frozen, the codebooks, scales, biases
   and LayerNorms learn by distillation, 1 - cosine between the compressed and the dense model's
   outputs on the calibration batches, through the codebook op's backward.

Stage 1 is in jlcm_plan.py, stage 2 in jlcm_layerwise.py, stage 3 (``finetune``) here beside
``compress``, which runs the three, and ``load_compressed``; hotops._calibration (shared with
second-order pruning) runs the model on the calibration batches (layer inputs as Grams, outputs
and their distortion). Their public names are all importable from here.

Deterministic for a seed.
"""

from __future__ import annotations

import copy
from typing import Callable, Iterable, List, Optional, Sequence

import torch
from torch import Tensor, nn

from hotops import _backend
from hotops._calibration import (  # noqa: F401 (Grams: re-exported)
    Grams,
    _check_selection,
    _eval_mode,
    _layer_grams,
    _linears,
    _replace,
    distortion,
    input_groups,
    model_output,
)
from hotops.codebook.format import CodebookWeight
from hotops.codebook.jlcm_layerwise import (  # noqa: F401 (second_order_codes: re-exported)
    _stored,
    learn_layer,
    output_error,
    second_order_codes,
)
from hotops.codebook.jlcm_plan import (  # noqa: F401 (LayerPlan, _allocate: re-exported)
    FORMATS,
    Format,
    LayerPlan,
    _allocate,
    plan,
)
from hotops.codebook.module import CodebookLinear

# ---------------------------------------------------------------- stage 3: end-to-end fine-tuning


def finetune(
    model: nn.Module,
    dense: nn.Module,
    calib: List,
    steps: int,
    lr: float = 1e-3,
    output: Callable = model_output,
    norms: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> nn.Module:
    """Codes frozen, train every CodebookLinear's codebooks, scales and bias (and the LayerNorms'
    weights and biases if `norms`) to minimise 1 - cosine between `model`'s and `dense`'s outputs
    on the calibration batches (Adam, cosine decay, batches in a seeded random order). The
    codebooks and scales train in float32 and go back to their storage dtype at the end; the
    other parameters of a float16 / bfloat16 model train through float32 copies that Adam steps
    and that are written back after each step (Adam's state in float16 overflows or underflows
    to NaN, and bfloat16 drops steps below its resolution)."""
    from tqdm.auto import tqdm

    with torch.no_grad():
        targets = [output(dense, b) for b in calib]
    layers = [m for m in model.modules() if isinstance(m, CodebookLinear)]
    stored_dtype = {m: m.codebooks.dtype for m in layers}
    params = []
    for m in layers:
        m.codebooks.data, m.scales.data = m.codebooks.data.float(), m.scales.data.float()
        params += [p for p in (m.codebooks, m.scales, m.bias) if p is not None]
    if norms:
        params += [p for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()]
    low = (torch.float16, torch.bfloat16)
    masters = [p.detach().float().requires_grad_() if p.dtype in low else p for p in params]
    opt = torch.optim.Adam(masters, lr=lr)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    gen = torch.Generator().manual_seed(seed)
    order: List[int] = []
    was_training = model.training
    model.eval()  # no dropout: the targets are the dense model's deterministic outputs
    bar = tqdm(range(steps), desc="JLCM fine-tune", disable=not progress)
    for _ in bar:
        if not order:
            order = torch.randperm(len(calib), generator=gen).tolist()
        i = order.pop()
        loss = distortion(output(model, calib[i]), targets[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        _master_step(opt, params, masters)
        decay.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    for m in layers:
        m.codebooks.data = m.codebooks.data.to(stored_dtype[m])
        m.scales.data = m.scales.data.to(stored_dtype[m])
    model.train(was_training)
    return model


def _master_step(opt: torch.optim.Optimizer, params: List[nn.Parameter], masters: List[Tensor]) -> None:
    """`opt`'s step on `masters`, the float32 copies of `params` (a parameter already float32 is
    its own): their gradients go in, the stepped values come back."""
    for p, m in zip(params, masters):
        if m is not p:
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None
    opt.step()
    with torch.no_grad():
        for p, m in zip(params, masters):
            if m is not p:
                p.copy_(m)


# ---------------------------------------------------------------- compress


def compress(
    model: nn.Module,
    bits_per_weight: float = 2.0,
    calib: Optional[Iterable] = None,
    steps: int = 100,
    finetune_steps: int = 0,
    seed: int = 0,
    formats: Sequence[Format] = FORMATS,
    output: Callable = model_output,
    lr: float = 1e-2,
    plan_steps: int = 20,
    rounds: int = 3,
    finetune_lr: float = 1e-3,
    kmeans_iters: int = 25,
    storage_dtype: torch.dtype = torch.float16,
    skip: Sequence[str] = (),
    token_mask: Optional[Callable] = None,
    progress: bool = True,
    damp: float = 0.01,
) -> nn.Module:
    """Replace every nn.Linear of `model` (outside `skip`; in place, and returned) by a
    CodebookLinear, with at most `bits_per_weight` exact storage bits per weight on average over
    those layers, weighted by their parameter counts (see the module doc for the stages).

    Args:
        calib: iterable of model inputs (tensors, tuples of args or dicts of kwargs). It
            weighs the plan by damage to the output and drives the learning. None: k-means
            only, formats chosen by weight error.
        steps: layer-wise codebook-learning steps per round (0: no layer-wise stage, the
            k-means initialisation goes to fine-tuning).
        rounds: layer-wise rounds per layer, each a second-order code assignment then `steps`.
        plan_steps: codebook steps of the one round (on dense inputs) that precedes the scoring
            of each candidate format.
        finetune_steps: end-to-end distillation steps (batches of calib) after that.
        formats: the candidate formats of every layer; one format gives a uniform model.
        output: `output(model, batch) -> Tensor` whose cosine to the dense one is the end-to-end
            measure (default: the model's output tensor; e.g. pooled sentence embeddings).
        storage_dtype: dtype of the stored codebooks and scales (counted in the bits).
        token_mask: `token_mask(batch) -> bool Tensor` of the input positions that count in the
            layer-wise losses (e.g. a transformer batch's attention mask: padding tokens are
            computed but never used), for layers whose inputs have that leading shape.
        damp: added to the diagonal of each layer's input Gram, as a share of its mean, where the
            layer-wise stage assigns codes and solves for its target weight: larger values trust
            the calibration's input correlations less (closer to plain weight error).
    """
    from tqdm.auto import tqdm

    calib = list(calib) if calib is not None else None
    if calib is not None and not calib:
        raise ValueError("calib is empty")
    damp = _backend.check_number(damp, "damp", low=0.0)
    torch.manual_seed(seed)
    learn = calib is not None and (steps > 0 or finetune_steps > 0)
    # Calibration in eval mode: a model left in training mode would have its BatchNorm statistics
    # overwritten, and dropout would draw other masks in the dense and the compressed passes.
    with _eval_mode(model):
        dense = copy.deepcopy(model) if learn else None  # the targets: the dense model's outputs
        layout = plan(
            model,
            bits_per_weight,
            calib,
            formats,
            output,
            seed,
            plan_steps if steps > 0 else 0,
            lr,
            kmeans_iters=kmeans_iters,
            storage_dtype=storage_dtype,
            skip=skip,
            progress=progress,
        )
        layer_grams = {}  # the Grams of the layers that read one input (input_groups), from one pass
        groups = input_groups(model, list(layout), calib[0]) if calib is not None and steps > 0 else []
        bar = tqdm(layout.items(), desc="JLCM layers", disable=not progress)
        for name, p in bar:
            lin = model.get_submodule(name)
            weight = p.init
            if calib is not None and steps > 0:
                if name not in layer_grams:
                    group = next(g for g in groups if name in g)
                    layer_grams.update(zip(group, _layer_grams(dense, model, group, calib, token_mask)))
                grams = layer_grams.pop(name)
                weight = learn_layer(lin.weight, grams, p.init, steps, lr, rounds, damp)
                err = output_error(
                    _stored(weight, storage_dtype).dequantize(), lin.weight.detach().float(), grams
                )
                bar.set_postfix(
                    layer=name[-24:], bits=f"{p.bits_per_weight:.2f}", out_err=f"{err.item():.4f}"
                )
            _replace(
                model, name, CodebookLinear(_stored(weight, storage_dtype), lin.bias).to(lin.weight.device)
            )
    if calib is not None and finetune_steps > 0:
        finetune(model, dense, calib, finetune_steps, finetune_lr, output, seed=seed, progress=progress)
    return model


def load_compressed(model: nn.Module, state_dict: dict) -> nn.Module:
    """Load a compressed model's state_dict into the dense architecture `model`: every nn.Linear
    whose entry holds codes becomes a CodebookLinear of the stored shapes, then the whole
    state_dict is loaded (strictly)."""
    layers = _linears(model, ())
    _check_selection(layers, "load_compressed", "load codes into", "nn.Linear")
    for name in list(layers):
        prefix = f"{name}."
        if prefix + "codes" not in state_dict:
            continue

        def get(key, prefix=prefix):
            return state_dict.get(prefix + key)

        # the bias follows the dense layer, so a checkpoint without one is refused, not loaded bare
        has_bias = layers[name].bias is not None
        needed = ("codebooks", "scales", "group_ptr") + (("bias",) if has_bias else ())
        lacking = [prefix + key for key in needed if prefix + key not in state_dict]
        if lacking:
            raise ValueError(
                f"load_compressed: the state_dict holds {prefix}codes but lacks {', '.join(lacking)}"
            )
        weight = CodebookWeight.from_packed(
            get("codes"), get("codebooks"), get("scales"), get("group_ptr"), get("perm")
        )
        _replace(model, name, CodebookLinear(weight, get("bias") if has_bias else None))
    model.load_state_dict(state_dict)
    return model
