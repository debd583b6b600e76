"""JLCM stage 1, the bit plan (``plan``): the candidate formats (``Format``, ``FORMATS``) and their
exact stored bits, each layer's candidates initialised and scored by output error, one
end-to-end probe per layer turning output error into damage, and the greedy knapsack
(``_allocate``) that spends the model-wide budget. See hotops.codebook.jlcm's doc."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from hotops import _backend
from hotops._calibration import (
    Grams,
    _check_selection,
    _check_untied,
    _dense_grams,
    _linears,
    _replace,
    distortion,
    model_output,
)
from hotops.codebook import format as fmt
from hotops.codebook.format import CodebookWeight
from hotops.codebook.jlcm_layerwise import _stored, learn_layer, output_error
from hotops.codebook.kmeans import quantize_weight
from hotops.codebook.module import CodebookLinear


@dataclasses.dataclass(frozen=True)
class Format:
    """A layer's configuration: per row group, `num_codebooks` additive codebooks of
    2**code_bits codewords over `in_group` consecutive inputs."""

    in_group: int = 4
    num_codebooks: int = 1
    code_bits: int = 8
    groups: int = 1

    @classmethod
    def parse(cls, spec: str) -> "Format":
        """A format from its name: "MxB/G" is M codebooks of 2**B codewords over G inputs
        ("1x8/4": 2 bits per weight, "3x8/8": 3); "MxB" is AQLM's name for "MxB/8"; a bare "G"
        is "1x8/G"."""
        if not isinstance(spec, str):
            raise TypeError(f'a format name is a str such as "1x8/4", got {type(spec).__name__}')
        spec_ = spec.strip()
        if "/" not in spec_ and "x" in spec_:
            spec_ += "/8"
        books, slash, group = spec_.rpartition("/")
        m, _, b = books.partition("x") if slash else ("1", "", "8")
        try:
            numbers = int(group), int(m), int(b)
        except ValueError:
            raise ValueError(
                f'a format is "MxB/G" (e.g. "1x8/4") or an in_group (e.g. "4"), got {spec!r}'
            ) from None
        return cls(*numbers)

    def __post_init__(self):
        # refuses in_group, num_codebooks and code sizes that uint8 codes cannot hold
        fmt.code_bits(self.code_bits_per_weight, self.in_group, self.num_codebooks)
        if self.groups < 1:
            raise ValueError(f"groups must be >= 1, got {self.groups}")

    def __str__(self) -> str:
        name = f"{self.num_codebooks}x{self.code_bits}/{self.in_group}"
        return name if self.groups == 1 else f"{name} in {self.groups} row groups"

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
class LayerPlan:
    """The format chosen for one layer, its exact bits and (k-means) initialisation."""

    format: Format
    bits_per_weight: float
    init: CodebookWeight
    output_error: float  # of the initialisation, on dense inputs


def _check_budget(bits: Dict[str, Dict[Format, float]], sizes: Dict[str, int], budget: float) -> float:
    """The stored bits of every layer at its cheapest format; raises if they exceed the budget."""
    spent = sum(min(bits[n].values()) * sizes[n] for n in bits)
    total = sum(sizes.values())
    if spent > budget * total * (1 + 1e-12):
        raise ValueError(
            f"even the cheapest formats need {spent / total:.3f} bits/weight on average; "
            f"raise bits_per_weight above that or offer cheaper formats"
        )
    return spent


def _allocate(
    bits: Dict[str, Dict[Format, float]],
    damage: Dict[str, Dict[Format, float]],
    sizes: Dict[str, int],
    budget: float,
) -> Dict[str, Format]:
    """Greedy knapsack: start every layer at its cheapest format, then repeatedly take the
    upgrade that removes the most damage per extra stored bit while the parameter-weighted mean
    bits stay within `budget` (a move that costs no bits and removes damage first). A move must
    remove a finite, positive damage: each one then lowers the summed damage or raises the bits
    spent, so the loop ends whatever the damages (a NaN damage made the layer's own format a free
    "upgrade", taken forever)."""
    choice = {n: min(bits[n], key=lambda f: (bits[n][f], damage[n][f])) for n in bits}
    total = sum(sizes.values())
    spent = _check_budget(bits, sizes, budget)
    while True:
        best, best_gain = None, 0.0
        for n in bits:
            cur = choice[n]
            for f, b in bits[n].items():
                extra = (b - bits[n][cur]) * sizes[n]
                saved = damage[n][cur] - damage[n][f]
                if not 0 < saved < math.inf or spent + extra > budget * total:
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

    bits_per_weight = _backend.check_number(bits_per_weight, "bits_per_weight", low=0.0, low_open=True)
    formats = tuple(formats)  # read once per layer: a generator would be spent after the first
    if not formats or not all(isinstance(f, Format) for f in formats):
        raise TypeError(f"formats must be a non-empty sequence of Format, got {formats!r}")
    layers = _linears(model, skip)
    _check_selection(layers, "compress", "compress", "nn.Linear")
    _check_untied(layers, "compress")
    for name, lin in layers.items():
        if not torch.isfinite(lin.weight).all():
            raise ValueError(
                f"compress: the weight of layer {name} is not all finite (NaN or inf): load a sound "
                "checkpoint, or skip the layer"
            )
    # Exact bits need only the shapes: a budget no format can meet is refused before the
    # calibration passes and the candidates' learning (minutes on a small encoder).
    bits = {}
    for name, lin in layers.items():
        N, K = lin.weight.shape
        bits[name] = {f: f.bits_per_weight(N, K, storage_dtype) for f in formats if f.fits(N, K)}
        if not bits[name]:
            raise ValueError(f"{name}: in_features = {K} fits none of the formats' in_group")
    sizes = {n: lin.weight.numel() for n, lin in layers.items()}
    _check_budget(bits, sizes, bits_per_weight)
    ff = _dense_grams(model, list(layers), calib, token_mask) if calib is not None else {}
    targets, probe_calib = None, None
    if calib is not None:
        probe_calib = calib[:probe_batches]
        with torch.no_grad():
            targets = [output(model, b) for b in probe_calib]
    inits, errors, damage = {}, {}, {}
    for i, (name, lin) in enumerate(tqdm(layers.items(), desc="JLCM plan", disable=not progress)):
        w = lin.weight.detach().float()
        N, K = w.shape
        g = Grams.dense(ff[name]) if name in ff else Grams.dense(torch.eye(K))
        inits[name], errors[name] = {}, {}
        choice = len(bits[name]) > 1  # with one candidate there is nothing to score
        for f in bits[name]:
            init = quantize_weight(
                w, f.code_bits_per_weight, f.in_group, f.num_codebooks, f.groups, kmeans_iters, seed + i
            )
            if plan_steps and name in ff and choice:
                init = learn_layer(w, g, init, plan_steps, lr, rounds=1)
            inits[name][f] = init
            errors[name][f] = output_error(_stored(init, storage_dtype).dequantize(), w, g).item()
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
    choice = _allocate(bits, damage, sizes, bits_per_weight)
    return {n: LayerPlan(f, bits[n][f], inits[n][f], errors[n][f]) for n, f in choice.items()}
