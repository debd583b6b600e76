"""What compress and second-order pruning read from a model (hotops._calibration): the runs of
layers that share one input are found from the forward pass, and computing their Grams from one
pass changes nothing; Grams beyond float32's range, layers called by keyword, and which layers
are taken (shared, tied, the model itself)."""

import math

import pytest
import torch
from torch import nn

import hotops.codebook.jlcm as jlcm
import hotops.sparse.second_order as second_order
from hotops._calibration import _float32, input_groups
from hotops.codebook import CodebookLinear, compress
from hotops.codebook.jlcm import Format, plan
from hotops.sparse import SparseLinear, sparsify


class Block(nn.Module):
    """Attention-like: q, k and v read x; o reads their mix; `bump` edits x in place between k
    and v (then v reads x changed: it must not join q and k); u reads a copy equal to x."""

    def __init__(self, d=12, bump=False):
        super().__init__()
        self.q, self.k, self.v, self.o, self.u = (nn.Linear(d, d) for _ in range(5))
        self.bump = bump

    def forward(self, x):
        x = x * 1.0  # a tensor of the block's own: the in-place edit below leaves the caller's alone
        q, k = self.q(x), self.k(x)
        if self.bump:
            x.add_(1.0)
        v = self.v(x)
        y = self.o(torch.tanh(q * k) + v)
        return y + self.u(x.clone())


def _calib(n=3, d=12):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(40, d, generator=g) * torch.linspace(0.2, 3.0, d) for _ in range(n)]


def test_input_groups_follow_the_shared_input():
    names = ["q", "k", "v", "o", "u"]
    assert input_groups(Block(), names, _calib()[0]) == [["q", "k", "v"], ["o"], ["u"]]
    # changed in place between k and v: the same tensor, another version
    assert input_groups(Block(bump=True), names, _calib()[0]) == [["q", "k"], ["v"], ["o"], ["u"]]
    # only consecutive names run together
    assert input_groups(Block(), ["q", "o", "k"], _calib()[0]) == [["q"], ["o"], ["k"]]


def test_inference_mode_tensors_are_never_grouped():
    """Tensors made in inference mode keep no count of in-place edits: each layer then gets its
    own pass, and pruning there gives what it gives outside."""
    torch.manual_seed(0)
    net = Block()
    outside = sparsify(net, 0.6, "second_order", calib=_calib(), policy="dense")
    with torch.inference_mode():
        assert input_groups(net, ["q", "k", "v"], _calib()[0]) == [["q"], ["k"], ["v"]]
        inside = sparsify(net, 0.6, "second_order", calib=_calib(), policy="dense")
    for name in ("q", "k", "v", "o", "u"):
        assert torch.equal(getattr(inside, name).to_dense(), getattr(outside, name).to_dense()), name


def _singletons(model, names, batch):
    return [[n] for n in names]


@pytest.mark.parametrize("bump", [False, True])
def test_second_order_pruning_is_the_same_layer_by_layer(monkeypatch, bump):
    torch.manual_seed(0)
    net = Block(bump=bump)
    grouped = sparsify(net, 0.6, "second_order", calib=_calib(), policy="dense")
    monkeypatch.setattr(second_order, "input_groups", _singletons)
    one_by_one = sparsify(net, 0.6, "second_order", calib=_calib(), policy="dense")
    for name in ("q", "k", "v", "o", "u"):
        assert torch.equal(getattr(grouped, name).to_dense(), getattr(one_by_one, name).to_dense()), name


def test_jlcm_is_the_same_layer_by_layer(monkeypatch):
    kw = dict(
        bits_per_weight=8,
        formats=[Format(in_group=2, num_codebooks=1, code_bits=4)],
        calib=_calib(d=32),
        steps=5,
        rounds=1,
        plan_steps=2,
        kmeans_iters=3,
        progress=False,
    )
    torch.manual_seed(0)
    net = Block(d=32)
    grouped = compress(_copy(net), **kw)
    monkeypatch.setattr(jlcm, "input_groups", _singletons)
    one_by_one = compress(_copy(net), **kw)
    for name in ("q", "k", "v", "o", "u"):
        a, b = getattr(grouped, name), getattr(one_by_one, name)
        assert isinstance(a, CodebookLinear)
        assert torch.equal(a.weight.dequantize(), b.weight.dequantize()), name


def _copy(net):
    other = Block(d=net.q.in_features)
    other.load_state_dict(net.state_dict())
    return other


# ------------------------------------------------------------------ Gram range, layer calls and selection


def test_grams_outside_float32s_comfort_are_scaled_by_a_power_of_two():
    """In range, a Gram is stored as it is (the methods' results stay bitwise the same); far out
    of it (a zero-initialised layer weighs its tokens by 1e30), every Gram of the layer is scaled
    by one power of two, exactly."""
    g = torch.randn(50, 6, dtype=torch.float64)
    gram, cross = g.T @ g, g.T @ g.flip(0)
    assert all(torch.equal(a, b.float()) for a, b in zip(_float32("x", [gram, cross]), (gram, cross)))
    scale = 2.0 ** -round(math.log2(gram.diagonal().mean().item()))
    for big in (2.0**90, 2.0**-90):
        out = _float32("x", [gram * big, cross * big])
        assert all(torch.equal(a, (b * scale).float()) for a, b in zip(out, (gram, cross)))
    with pytest.raises(ValueError, match="inputs of layer x are not all finite"):
        _float32("x", [gram * float("nan")])


class ZeroInit(nn.Module):
    """A LoRA-B / adaLN-zero style layer: zero weight and bias, so every token's output is 0."""

    def __init__(self, d=16):
        super().__init__()
        self.a, self.z = nn.Linear(d, d), nn.Linear(d, d)
        nn.init.zeros_(self.z.weight)
        nn.init.zeros_(self.z.bias)

    def forward(self, x):
        h = self.a(x)
        return h + self.z(h)


def test_zero_initialised_layer_with_large_inputs():
    torch.manual_seed(0)
    calib = [3000.0 * torch.randn(128, 16)]
    pruned = sparsify(ZeroInit(), 0.5, "second_order", calib=calib, policy="dense")
    assert torch.equal(pruned.z.to_dense(), torch.zeros(16, 16))
    small = Format(in_group=2, num_codebooks=1, code_bits=4)
    kw = dict(calib=calib, steps=2, rounds=1, plan_steps=0, kmeans_iters=2, formats=[small], progress=False)
    coded = compress(ZeroInit(), 8.0, **kw)
    assert isinstance(coded.z, CodebookLinear) and torch.isfinite(coded.a.weight.dequantize()).all()


class Chain(nn.Module):
    def __init__(self, keyword):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(12, 12), nn.Linear(12, 12)
        self.keyword = keyword

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(input=h) if self.keyword else self.b(h)


def test_a_layer_called_with_a_keyword_argument():
    calib = _calib()
    by_name, by_position = (
        sparsify(Chain(k), 0.5, "second_order", calib=calib, policy="dense") for k in (True, False)
    )
    assert torch.equal(by_name.b.to_dense(), by_position.b.to_dense())
    small = Format(in_group=2, num_codebooks=1, code_bits=4)
    kw = dict(calib=calib, steps=2, rounds=1, plan_steps=1, kmeans_iters=2, formats=[small], progress=False)
    by_name, by_position = (compress(Chain(k), 12.0, **kw) for k in (True, False))
    assert torch.equal(by_name.b.weight.dequantize(), by_position.b.weight.dequantize())


class Shared(nn.Module):
    """One layer registered under two names (ALBERT-style sharing)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.Linear(12, 12)
        self.dec = self.enc

    def forward(self, x):
        return self.dec(torch.relu(self.enc(x)))


def test_a_layer_under_two_names_is_replaced_at_both_and_stays_shared():
    for kw in (dict(), dict(method="second_order", calib=_calib())):
        out = sparsify(Shared(), 0.5, **kw)
        assert isinstance(out.enc, SparseLinear) and out.enc is out.dec
    small = Format(in_group=2, num_codebooks=1, code_bits=4)
    model = Shared()
    layout = plan(model, 12.0, formats=[small], kmeans_iters=2, progress=False)
    assert list(layout) == ["enc"]  # one layer, counted once in the budget
    kw = dict(
        calib=_calib(), steps=2, rounds=1, plan_steps=1, kmeans_iters=2, formats=[small], progress=False
    )
    coded = compress(model, 12.0, **kw)
    assert isinstance(coded.enc, CodebookLinear) and coded.enc is coded.dec


def test_a_model_that_is_itself_a_layer_is_refused_before_any_change():
    lin = nn.Linear(12, 8)
    before = lin.weight.detach().clone()
    for kw in (dict(), dict(method="second_order", calib=_calib())):
        with pytest.raises(ValueError, match=r"itself a Linear.*nn.Sequential\(layer\)"):
            sparsify(lin, 0.5, inplace=True, **kw)
    with pytest.raises(ValueError, match="itself a Linear"):
        compress(lin, 8.0, calib=_calib(), progress=False)
    assert torch.equal(lin.weight, before)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(12, 12), nn.Linear(12, 12)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_layers_tied_to_one_weight():
    """Second-order pruning and JLCM rewrite each layer's weight from its own inputs: tied layers
    are refused by name. Magnitude pruning gives both the one mask of the one weight."""
    with pytest.raises(ValueError, match="layers a and b share one weight tensor"):
        sparsify(Tied(), 0.5, "second_order", calib=_calib())
    with pytest.raises(ValueError, match="layers a and b share one weight tensor"):
        compress(Tied(), 8.0, progress=False)
    out = sparsify(Tied(), 0.5, policy="dense")
    assert torch.equal(out.a.to_dense(), out.b.to_dense())
