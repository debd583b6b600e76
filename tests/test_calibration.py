"""What compress and second-order pruning read from a model (hotops._calibration): the runs of
layers that share one input are found from the forward pass, and computing their Grams from one
pass changes nothing."""

import pytest
import torch
from torch import nn

import hotops.codebook.jlcm as jlcm
import hotops.sparse.second_order as second_order
from hotops._calibration import input_groups
from hotops.codebook import CodebookLinear, compress
from hotops.codebook.jlcm import Format
from hotops.sparse import sparsify


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
