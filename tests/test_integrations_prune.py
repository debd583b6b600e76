"""Modules pruned with torch.nn.utils.prune: the pattern is weight_mask, the values weight_orig
(the `weight` attribute goes stale after an optimizer step), the prune hooks go, and the sparse
model computes what the pruned dense one does."""

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import hotops.sparse as hs
from hotops.integrations import torch_prune


def step(model, x):
    """One SGD step: weight_orig moves, the cached `weight` attribute does not."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad()


def net():
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16),
        nn.Flatten(),
        nn.Linear(16 * 36, 10),
    )


def assert_same(sparse_model, dense_model, x):
    with torch.no_grad():
        torch.testing.assert_close(sparse_model(x), dense_model(x), rtol=1e-5, atol=1e-5)


X = torch.randn(2, 3, 6, 6)


def test_linear_l1_unstructured_after_a_step():
    lin = nn.Linear(40, 24)
    prune.l1_unstructured(lin, "weight", amount=0.8)
    x = torch.randn(5, 40)
    step(lin, x)
    assert not torch.equal(lin.weight, lin.weight_orig * lin.weight_mask)  # stale until the next forward
    stale = lin.weight.clone()
    s = hs.SparseLinear.from_dense(lin, policy="sparse")
    assert torch.equal(lin.weight, stale) and torch_prune.is_pruned(lin)  # the source is left alone
    assert s.sparse_weight.nnz == int(lin.weight_mask.sum())
    assert not s._forward_pre_hooks
    with torch.no_grad():
        torch.testing.assert_close(s(x), lin(x))  # lin's hook recomputes weight from weight_orig


def test_conv_random_structured_and_pruned_bias():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    prune.random_structured(conv, "weight", amount=0.5, dim=0)
    prune.l1_unstructured(conv, "bias", amount=0.25)
    step(conv, X)
    s = hs.SparseConv2d.from_dense(conv, policy="sparse")
    mask = conv.weight_mask.bool()
    assert s.sparse_weight.nnz == int(mask.sum())
    assert int(mask.flatten(1).any(1).sum()) == 4  # whole output channels pruned
    assert_same(s, conv, X)


def test_sparsify_global_unstructured_removes_hooks():
    model = net()
    layers = [m for m in model if isinstance(m, (nn.Linear, nn.Conv2d))]
    prune.global_unstructured(
        [(m, "weight") for m in layers], pruning_method=prune.L1Unstructured, amount=0.7
    )
    step(model, X)
    out = hs.sparsify(model, sparsity=None, policy="sparse")
    assert not prune.is_pruned(out) and not any(hasattr(m, "weight_orig") for m in out.modules())
    assert prune.is_pruned(model)  # not inplace: the given model keeps its pruning
    sparse = [m for m in out.modules() if isinstance(m, (hs.SparseLinear, hs.SparseConv2d))]
    assert [m.sparse_weight.nnz for m in sparse] == [int(m.weight_mask.sum()) for m in layers]
    assert_same(out, model, X)


def test_sparsify_inplace_makes_pruning_permanent():
    model = net()
    prune.l1_unstructured(model[0], "weight", amount=0.6)
    prune.ln_structured(model[2], "weight", amount=0.5, n=2, dim=1)
    step(model, X)
    with torch.no_grad():
        want = model(X)
    out = hs.sparsify(model, sparsity=None, inplace=True, policy="sparse")
    assert out is model and not prune.is_pruned(model)
    with torch.no_grad():
        torch.testing.assert_close(out(X), want, rtol=1e-5, atol=1e-5)


def test_sparsify_sparsity_prunes_the_current_weights_further():
    model = net()
    prune.l1_unstructured(model[6], "weight", amount=0.5)
    step(model, X)
    with pytest.warns(UserWarning, match=r"layer 6 already carries a torch.*sparsity=None"):
        out = hs.sparsify(model, sparsity=0.9, policy="sparse")
    lin = out[6]
    assert lin.sparse_weight.nnz == round(0.1 * lin.out_features * lin.in_features)
    # the survivors are the largest of weight_orig * weight_mask
    current = (model[6].weight_orig * model[6].weight_mask).detach()
    dense = lin.sparse_weight.to_dense()
    assert torch.equal(
        dense != 0, current.abs() >= current.abs().flatten().topk(lin.sparse_weight.nnz).values[-1]
    )


def test_default_sparsity_on_a_torch_pruned_model_warns():
    """sparsify(model) (sparsity=0.9) re-prunes a torch-pruned layer to 0.9 whatever its mask:
    it says so and names sparsity=None, which keeps the masks (and warns of nothing)."""
    model = net()
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    prune.l1_unstructured(model[6], "weight", amount=0.5)
    with pytest.warns(UserWarning, match=r"layers 0, 6 already carry .*pass sparsity=None"):
        hs.sparsify(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_same(hs.sparsify(model, sparsity=None), model, X)
        hs.sparsify(net(), sparsity=0.9)  # nothing pruned with torch: nothing to say


@pytest.mark.parametrize("padding", [dict(padding=1, padding_mode="reflect"), dict(padding="same")])
def test_only_convolutions_left_dense_says_why(padding):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, **padding))
    prune.l1_unstructured(model[0], "weight", amount=0.6)
    with pytest.raises(
        ValueError, match=r"only layers outside skip are nn.Conv2d layers \(0\), all left dense.*zero padding"
    ):
        hs.sparsify(model, sparsity=None)


def test_sparsity_none_takes_the_zeros_as_they_are():
    model = net()
    with torch.no_grad():
        for m in model:
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.mul_(torch.rand_like(m.weight) > 0.7)
    out = hs.sparsify(model, sparsity=None, policy="sparse")
    for dense, sparse in zip(model, out):
        if isinstance(dense, (nn.Linear, nn.Conv2d)):
            assert sparse.sparse_weight.nnz == int((dense.weight != 0).sum())
    assert_same(out, model, X)
    lin = hs.SparseLinear.from_dense(model[6])  # from_dense: neither sparsity nor mask: the zeros
    assert lin.sparse_weight.nnz == int((model[6].weight != 0).sum())


def test_sparsity_none_refuses_what_needs_a_sparsity():
    with pytest.raises(ValueError, match="sparsity=None"):
        hs.sparsify(net(), sparsity=None, block=4)
    with pytest.raises(ValueError, match="sparsity=None"):
        hs.sparsify(net(), sparsity=None, method="learned", data=[(X, None)], loss_fn=lambda y, t: y.sum())


def test_explicit_mask_overrides_the_prune_mask():
    lin = nn.Linear(16, 8)
    prune.random_unstructured(lin, "weight", amount=0.5)
    mask = torch.zeros(8, 16, dtype=torch.bool)
    mask[:, :4] = True
    s = hs.SparseLinear.from_dense(lin, mask=mask, policy="sparse")
    assert s.sparse_weight.nnz == 32
    want = (lin.weight_orig * lin.weight_mask * mask).detach()
    torch.testing.assert_close(s.sparse_weight.to_dense(), want)
