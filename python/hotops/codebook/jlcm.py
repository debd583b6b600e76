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

Deterministic for a seed.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hotops.codebook import format as fmt
from hotops.codebook.format import CodebookWeight
from hotops.codebook.kmeans import nearest, quantize_weight
from hotops.codebook.module import CodebookLinear


@dataclasses.dataclass(frozen=True)
class Format:
    """A layer's configuration: per row group, `num_codebooks` additive codebooks of
    2**code_bits codewords over `in_group` consecutive inputs."""

    in_group: int = 4
    num_codebooks: int = 1
    code_bits: int = 8
    groups: int = 1

    @property
    def code_bits_per_weight(self) -> float:
        return self.code_bits * self.num_codebooks / self.in_group

    def fits(self, out_features: int, in_features: int) -> bool:
        return in_features % self.in_group == 0

    def bits_per_weight(self, out_features: int, in_features: int, storage_dtype: torch.dtype) -> float:
        """Exact stored bits per weight of an (out, in) layer in this format, as CodebookWeight
        counts them (codes are stored as uint8 whatever code_bits is)."""
        N, g, M = out_features, self.in_group, self.num_codebooks
        groups = self.groups if N >= 2 * self.groups else 1  # as kmeans.group_rows
        w = CodebookWeight(
            torch.zeros(N, in_features // g, M, dtype=torch.uint8),
            torch.zeros(groups, M, 1 << self.code_bits, g, dtype=storage_dtype),
            torch.zeros(N, dtype=storage_dtype),
            torch.tensor([0] * groups + [N], dtype=torch.int64),
            torch.arange(N) if groups > 1 else None,
        )
        return w.bits_per_weight


# 8-bit codes (the uint8 storage is then used in full) over 4 or 2 inputs: 2 or 4 code bits per
# weight, one row group. Not offered by default (pass `formats=`), from MiniLM measurements:
# 1 bit (over 8 inputs) looks cheap to the plan's linear damage model but compounds: layer 3's
# FFN output reached relative output error 0.50 on compressed inputs. A second row group costs
# 0.1-0.3 bits/weight (codebook + int64 permutation) that buy more as a 4-bit layer elsewhere.
# AQLM's 2x8 (two codebooks over 8 inputs) from residual k-means was worse than 1x8 over 4.
FORMATS = (Format(4), Format(2))


@dataclasses.dataclass
class Grams:
    """Second moments of one layer's calibration inputs: X_q from the model compressed so far,
    X from the dense model (same tokens). The loss of a quantized W_q against the dense layer's
    output,  ||X_q W_q^T - X W^T||^2 = tr(W_q qq W_q^T) - 2 tr(W_q qf W^T) + tr(W ff W^T),
    so earlier layers' errors are compensated, not compounded."""

    qq: Tensor  # X_q^T X_q
    qf: Tensor  # X_q^T X
    ff: Tensor  # X^T X

    @classmethod
    def dense(cls, ff: Tensor) -> "Grams":
        return cls(ff, ff, ff)


def output_error(w_q: Tensor, w: Tensor, g: Grams) -> Tensor:
    """||X_q w_q^T - X w^T||^2 / ||X w^T||^2 from the layer's Grams."""
    ref = ((w @ g.ff) * w).sum()
    err = ((w_q @ g.qq) * w_q).sum() - 2 * ((w_q @ g.qf) * w).sum() + ref
    return err.clamp_min(0) / ref.clamp_min(1e-30)


# ---------------------------------------------------------------- running the model


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


def _rows(x: Tensor, batch, token_mask: Optional[Callable]) -> Tensor:
    """A layer input (..., in_features) as rows (tokens, in_features), only the tokens
    `token_mask(batch)` keeps (where its shape is the input's leading shape: a layer fed pooled
    vectors keeps all its rows)."""
    x = x.detach()
    if token_mask is not None:
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


def _layer_input(model: nn.Module, name: str, batch, token_mask: Optional[Callable]) -> Tensor:
    """Layer `name`'s input rows (float64) when `model` runs `batch`; the rest of the forward
    pass is skipped."""
    seen = []

    def hook(module, args):
        seen.append(_rows(args[0], batch, token_mask).double())
        raise _Reached

    handle = model.get_submodule(name).register_forward_pre_hook(hook)
    try:
        _call(model, batch)
    except _Reached:
        pass
    finally:
        handle.remove()
    if not seen:
        raise ValueError(f"the calibration data never reached {name}")
    return seen[0]


def _layer_grams(
    dense: nn.Module, model: nn.Module, name: str, calib: List, token_mask: Optional[Callable]
) -> Grams:
    """Token-weighted Grams of layer `name`'s inputs in `model` (compressed so far) and in `dense`."""
    weight = dense.get_submodule(name).weight
    acc = None
    with torch.no_grad():
        for batch in calib:
            xq, xf = (_layer_input(m, name, batch, token_mask) for m in (model, dense))
            a = _token_weights(xf, weight)[:, None]
            parts = ((xq * a).T @ xq, (xq * a).T @ xf, (xf * a).T @ xf)
            acc = parts if acc is None else tuple(a + p for a, p in zip(acc, parts))
    return Grams(*(t.float() for t in acc))


def _dense_grams(
    model: nn.Module, names: Sequence[str], calib: List, token_mask: Optional[Callable]
) -> Dict[str, Tensor]:
    """Token-weighted X^T X of every layer's input in the (dense) model, from one pass over the
    calibration data."""
    acc: Dict[str, Tensor] = {}
    current = []

    def hook(name):
        def accumulate(module, args):
            x = _rows(args[0], current[0], token_mask).double()
            gram = (x * _token_weights(x, module.weight)[:, None]).T @ x
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


def _stored(w: CodebookWeight, dtype: torch.dtype) -> CodebookWeight:
    """The weight with its codebooks and scales in the storage dtype."""
    return CodebookWeight.from_packed(w.codes, w.codebooks.to(dtype), w.scales.to(dtype), w.group_ptr, w.perm)


# ---------------------------------------------------------------- stage 1: the plan


@dataclasses.dataclass
class LayerPlan:
    """The format chosen for one layer, its exact bits and (k-means) initialisation."""

    format: Format
    bits_per_weight: float
    init: CodebookWeight
    output_error: float  # of the initialisation, on dense inputs


def _allocate(
    bits: Dict[str, Dict[Format, float]],
    damage: Dict[str, Dict[Format, float]],
    sizes: Dict[str, int],
    budget: float,
) -> Dict[str, Format]:
    """Greedy knapsack: start every layer at its cheapest format, then repeatedly take the
    upgrade that removes the most damage per extra stored bit while the parameter-weighted mean
    bits stay within `budget`."""
    choice = {n: min(bits[n], key=lambda f: (bits[n][f], damage[n][f])) for n in bits}
    total = sum(sizes.values())
    spent = sum(bits[n][choice[n]] * sizes[n] for n in bits)
    if spent > budget * total * (1 + 1e-12):
        raise ValueError(
            f"even the cheapest formats need {spent / total:.3f} bits/weight on average; "
            f"raise bits_per_weight above that or offer cheaper formats"
        )
    while True:
        best, best_gain = None, 0.0
        for n in bits:
            cur = choice[n]
            for f, b in bits[n].items():
                extra = (b - bits[n][cur]) * sizes[n]
                saved = damage[n][cur] - damage[n][f]
                if saved <= 0 or spent + extra > budget * total:
                    continue
                gain = saved / extra if extra > 0 else math.inf
                if gain > best_gain:
                    best, best_gain = (n, f, extra), gain
        if best is None:
            return choice
        n, f, extra = best
        choice[n], spent = f, spent + extra


def plan(
    model: nn.Module,
    bits_per_weight: float,
    calib: Optional[List] = None,
    formats: Sequence[Format] = FORMATS,
    output: Callable = model_output,
    seed: int = 0,
    plan_steps: int = 20,
    lr: float = 1e-2,
    probe_batches: int = 4,
    kmeans_iters: int = 25,
    storage_dtype: torch.dtype = torch.float16,
    skip: Sequence[str] = (),
    token_mask: Optional[Callable] = None,
    progress: bool = True,
) -> Dict[str, LayerPlan]:
    """Stage 1 of compress: a format and initialisation for every nn.Linear of `model` (outside
    `skip`), with parameter-weighted mean exact bits <= `bits_per_weight`.

    Each candidate is the k-means initialisation followed by one round of joint learning on the
    dense inputs (second-order codes, then `plan_steps` codebook steps): k-means alone misjudges
    layers whose inputs have a few huge features, so the plan would spend bits where learning
    needs none. The end-to-end damage is measured on the first `probe_batches` calibration
    batches. Without `calib` the damage of a format is its relative weight error after k-means."""
    from tqdm.auto import tqdm

    layers = _linears(model, skip)
    ff = _dense_grams(model, list(layers), calib, token_mask) if calib is not None else {}
    targets, probe_calib = None, None
    if calib is not None:
        probe_calib = calib[:probe_batches]
        with torch.no_grad():
            targets = [output(model, b) for b in probe_calib]
    inits, bits, errors, damage = {}, {}, {}, {}
    for i, (name, lin) in enumerate(tqdm(layers.items(), desc="JLCM plan", disable=not progress)):
        w = lin.weight.detach().float()
        N, K = w.shape
        g = Grams.dense(ff[name]) if name in ff else Grams.dense(torch.eye(K))
        inits[name], bits[name], errors[name] = {}, {}, {}
        candidates = [f for f in formats if f.fits(N, K)]
        choice = len(candidates) > 1  # with one candidate there is nothing to score
        for f in candidates:
            init = quantize_weight(
                w, f.code_bits_per_weight, f.in_group, f.num_codebooks, f.groups, kmeans_iters, seed + i
            )
            if plan_steps and name in ff and choice:
                init = learn_layer(w, g, init, plan_steps, lr, rounds=1)
            inits[name][f] = init
            bits[name][f] = f.bits_per_weight(N, K, storage_dtype)
            errors[name][f] = output_error(_stored(init, storage_dtype).dequantize(), w, g).item()
        if not inits[name]:
            raise ValueError(f"{name}: in_features = {K} fits none of the formats' in_group")
        # Damage per unit output error: quantize this layer alone with the format nearest the
        # budget and measure the model's output distortion.
        probe = min(bits[name], key=lambda f: (abs(bits[name][f] - bits_per_weight), errors[name][f]))
        scale = 1.0
        if targets is not None and choice and errors[name][probe] > 0:
            _replace(model, name, CodebookLinear(_stored(inits[name][probe], storage_dtype), lin.bias))
            try:
                with torch.no_grad():
                    d = sum(
                        distortion(output(model, b), t).item() for b, t in zip(probe_calib, targets)
                    ) / len(targets)
            finally:
                _replace(model, name, lin)
            scale = d / errors[name][probe]
        damage[name] = {f: scale * e for f, e in errors[name].items()}
    sizes = {n: lin.weight.numel() for n, lin in layers.items()}
    choice = _allocate(bits, damage, sizes, bits_per_weight)
    return {n: LayerPlan(f, bits[n][f], inits[n][f], errors[n][f]) for n, f in choice.items()}


# ---------------------------------------------------------------- stage 2: layer-wise learning


def _damped(gram: Tensor, damp: float) -> Tensor:
    """gram (float64) + damp * mean(diag) I; inputs no calibration token uses get a unit diagonal,
    so the matrix is positive definite whatever the data."""
    h = gram.double().clone()
    diag = h.diagonal()
    diag[diag <= 0] = 1
    diag += damp * diag.mean()
    return h


def second_order_codes(
    target: Tensor, gram: Tensor, codebooks: Tensor, scales: Tensor, group_ptr: Tensor, damp: float = 0.01
) -> Tensor:
    """The mappings (N, J, M) uint8 of the stored-order rows that (greedily) minimise
    tr((W_q - target) H (W_q - target)^T), H = `gram`, for fixed codebooks and scales.

    One input group at a time (GPTQ's rule, for vectors): with H^-1 = U^T U (U upper
    triangular), fixing group b's codes to q costs ||(w_b - q) U_bb^-1||^2, which is the
    Euclidean distance after multiplying by U_bb^-1, so each row takes the nearest codeword
    there (greedily, one additive codebook after another); the error (w_b - q) U_bb^-1 @ U[b, later]
    is then taken off the groups not yet coded, which compensate it. Groups go in decreasing
    diag(H) (the most-used inputs first, their error spread over the rest)."""
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
            residual = w[r0:r1, s] @ metric
            for m in range(M):
                book = words[o, m] @ metric
                idx = nearest(residual.float(), book.float())
                codes[r0:r1, j, m] = idx.to(torch.uint8)
                residual = residual - book[idx]
            err[r0:r1] = residual
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
    # argmin_V ||X_q V^T - X W^T||: V^T = qq^-1 qf W^T (V = W on dense inputs)
    target = torch.linalg.solve(_damped(grams.qq, damp), grams.qf.double() @ w_stored.double().T).T
    codebooks, scales = init.codebooks.float(), init.scales.float()
    codes = init.code_indices()
    for _ in range(rounds):
        codes = second_order_codes(target, grams.qq, codebooks, scales, init.group_ptr, damp)
        codebooks, scales = _fit_codebooks(
            w_stored, grams, codes, codebooks, scales, init.group_ptr, steps, lr
        )
    return CodebookWeight(codes, codebooks, scales, init.group_ptr, init.perm)


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
    codebooks and scales train in float32 and go back to their storage dtype at the end."""
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
    opt = torch.optim.Adam(params, lr=lr)
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
        opt.step()
        decay.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    for m in layers:
        m.codebooks.data = m.codebooks.data.to(stored_dtype[m])
        m.scales.data = m.scales.data.to(stored_dtype[m])
    model.train(was_training)
    return model


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
    """
    from tqdm.auto import tqdm

    calib = list(calib) if calib is not None else None
    if calib is not None and not calib:
        raise ValueError("calib is empty")
    torch.manual_seed(seed)
    learn = calib is not None and (steps > 0 or finetune_steps > 0)
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
    bar = tqdm(layout.items(), desc="JLCM layers", disable=not progress)
    for name, p in bar:
        lin = model.get_submodule(name)
        weight = p.init
        if calib is not None and steps > 0:
            grams = _layer_grams(dense, model, name, calib, token_mask)
            weight = learn_layer(lin.weight, grams, p.init, steps, lr, rounds)
            err = output_error(
                _stored(weight, storage_dtype).dequantize(), lin.weight.detach().float(), grams
            )
            bar.set_postfix(layer=name[-24:], bits=f"{p.bits_per_weight:.2f}", out_err=f"{err.item():.4f}")
        _replace(model, name, CodebookLinear(_stored(weight, storage_dtype), lin.bias).to(lin.weight.device))
    if calib is not None and finetune_steps > 0:
        finetune(model, dense, calib, finetune_steps, finetune_lr, output, seed=seed, progress=progress)
    return model


def load_compressed(model: nn.Module, state_dict: dict) -> nn.Module:
    """Load a compressed model's state_dict into the dense architecture `model`: every nn.Linear
    whose entry holds codes becomes a CodebookLinear of the stored shapes, then the whole
    state_dict is loaded (strictly)."""
    for name in list(_linears(model, ())):
        prefix = f"{name}." if name else ""
        if prefix + "codes" not in state_dict:
            continue

        def get(key, prefix=prefix):
            return state_dict.get(prefix + key)

        lacking = [
            prefix + key for key in ("codebooks", "scales", "group_ptr") if prefix + key not in state_dict
        ]
        if lacking:
            raise ValueError(
                f"load_compressed: the state_dict holds {prefix}codes but lacks {', '.join(lacking)}"
            )
        weight = CodebookWeight.from_packed(
            get("codes"), get("codebooks"), get("scales"), get("group_ptr"), get("perm")
        )
        _replace(model, name, CodebookLinear(weight, get("bias")))
    model.load_state_dict(state_dict)
    return model
