"""GradualPruner: the cubic ramp, the masks kept through training, and sparsify(model, None)
packing exactly its patterns."""

import pytest
import torch
from torch.nn.utils import prune

from hotops.sparse import GradualPruner, SparseLinear, sparsify


def _net():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    net.add_module("pooler", torch.nn.Linear(8, 8))
    return net


def test_ramps_to_target_and_keeps_pruned_weights_zero():
    net = _net()
    pr = GradualPruner(net, 0.9, steps=20, every=3, ramp=0.5, skip=lambda name, m: "pooler" in name)
    assert pr.sparsity(0) == 0 and pr.sparsity(10) == pytest.approx(0.9) and pr.sparsity(20) == 0.9
    assert 0 < pr.sparsity(3) < pr.sparsity(6) < 0.9
    assert len(pr.layers) == 2  # the pooler is skipped
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    seen = []
    for step in range(1, 21):
        net(torch.randn(4, 16)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        pr(step)
        for lin, mask in zip(pr.layers, pr.masks):
            assert torch.all(lin.weight[~mask] == 0)
        seen.append((net[0].weight == 0).float().mean().item())
    assert all(a <= b + 1e-9 for a, b in zip(seen, seen[1:]))  # the sparsity only grows
    for lin in pr.layers:
        assert (lin.weight == 0).float().mean().item() == pytest.approx(0.9, abs=0.01)
    assert (net.pooler.weight != 0).all()


def test_masks_keep_the_largest_magnitudes_and_update_on_schedule():
    net = _net()
    pr = GradualPruner(net, 0.5, steps=8, every=4, ramp=1.0)
    assert len(pr.layers) == 3  # nothing skipped by default
    w = net[0].weight.detach().clone()
    pr(1)  # the first call always computes masks
    s1 = pr.sparsity(1)
    kept = net[0].weight != 0
    assert kept.sum().item() == round((1 - s1) * w.numel())
    assert w.abs()[kept].min() >= w.abs()[~kept].max()
    first = [m.clone() for m in pr.masks]
    pr(2)  # not a multiple of every, not the ramp's end: the same masks
    assert all(torch.equal(a, b) for a, b in zip(first, pr.masks))
    pr(4)
    assert (net[0].weight == 0).float().mean().item() == pytest.approx(pr.sparsity(4), abs=0.01)


def test_sparsify_packs_the_pruners_patterns():
    net = _net()
    pr = GradualPruner(net, 0.75, steps=4, every=1, skip=lambda name, m: "pooler" in name)
    for step in range(1, 5):
        pr(step)
    masks = [m.clone() for m in pr.masks]
    x = torch.randn(5, 16)
    ref = net(x)
    packed = sparsify(net, None, skip=lambda name, m: "pooler" in name)
    assert isinstance(packed[0], SparseLinear) and isinstance(packed[2], SparseLinear)
    assert not isinstance(packed.pooler, SparseLinear)
    for layer, mask in zip((packed[0], packed[2]), masks):
        assert layer.values.numel() == int(mask.sum())
    torch.testing.assert_close(packed(x), ref, rtol=1e-5, atol=1e-5)


def test_rejects_a_bad_target_or_schedule():
    with pytest.raises(ValueError, match="sparsity"):
        GradualPruner(_net(), 1.0, steps=4, every=1)
    for kw, msg in [
        (dict(ramp=4.0), r"ramp \(the share of steps the sparsity rises over\) must be > 0.0 and <= 1.0"),
        (dict(ramp=0.0), "ramp"),
        (dict(steps=-5), "steps must be >= 1"),
        (dict(every=0), "every must be >= 1"),
        (dict(every=2.5), "every must be an integer"),
    ]:
        with pytest.raises(ValueError, match=msg):
            GradualPruner(_net(), 0.5, **(dict(steps=10, every=2) | kw))


def test_refuses_layers_pruned_with_torch_prune():
    """torch's forward recomputes weight from weight_orig * weight_mask, undoing the pruner."""
    net = _net()
    prune.l1_unstructured(net[0], "weight", amount=0.2)
    with pytest.raises(ValueError, match=r"layer 0 is pruned with torch.nn.utils.prune.*prune.remove"):
        GradualPruner(net, 0.9, steps=10, every=1)
    prune.remove(net[0], "weight")
    GradualPruner(net, 0.9, steps=10, every=1)


def test_second_order_updates_compensate():
    """With calib, each mask update prunes by the second-order rule: the pruned layers' outputs on
    the calibration inputs stay closer to the unpruned ones than a magnitude cut leaves them."""
    mix = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    calib = [torch.randn(64, 4) @ mix + 0.01 * torch.randn(64, 16) for _ in range(2)]
    x = torch.cat(calib)
    errors = {}
    for rule, extra in (("magnitude", {}), ("second_order", dict(calib=calib))):
        net = _net().train()
        ref = net(x).detach()
        pr = GradualPruner(
            net, 0.75, steps=4, every=2, ramp=1.0, skip=lambda name, m: "pooler" in name, **extra
        )
        for step in range(1, 5):
            pr(step)
            for lin, mask in zip(pr.layers, pr.masks):
                assert mask.dtype == torch.bool and torch.all(lin.weight[~mask] == 0)
        assert net.training  # the second-order update ran in eval mode and gave the mode back
        for lin in pr.layers:
            assert (lin.weight == 0).float().mean().item() == pytest.approx(0.75, abs=0.01)
        errors[rule] = ((net(x) - ref).norm() / ref.norm()).item()
    assert errors["second_order"] < 0.5 * errors["magnitude"]
    with pytest.raises(ValueError, match="calib is empty"):
        GradualPruner(_net(), 0.5, steps=4, every=1, calib=[])
