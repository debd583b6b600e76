"""Second-order one-shot pruning (hotops.sparse.second_order; sparsify(method="second_order"))
against a direct OBS reference and against magnitude pruning."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hotops.sparse import SparseConv2d, SparseLinear, sparsify
from hotops.sparse.second_order import prune_layer, refit


def _spd(K, gen):
    """The Gram of inputs that lie near a subspace of K / 4 dimensions, as layer inputs of trained
    networks do (what makes compensation pay), damped."""
    z = torch.randn(4 * K, max(1, K // 4), generator=gen, dtype=torch.float64)
    x = z @ torch.randn(z.shape[1], K, generator=gen, dtype=torch.float64)
    x += 0.1 * torch.randn(x.shape, generator=gen, dtype=torch.float64)
    return x.T @ x / x.shape[0] + 0.01 * torch.eye(K, dtype=torch.float64)


def _obs_reference(target, h, sparsity, block):
    """OBS with a frozen prefix, written out directly: columns left to right; at each block the
    pruned set is the smallest w^2 / [H_FF^-1]_jj (F: the columns not yet fixed); pruning w_j
    moves the free columns by -w_j / [H_FF^-1]_jj * H_FF^-1[j, :]; then column j is fixed."""
    N, K = target.shape
    w = target.clone()
    kept = torch.ones(N, K, dtype=torch.bool)
    for c0 in range(0, K, block):
        c1 = min(c0 + block, K)
        hinv = torch.linalg.inv(h[c0:, c0:])
        cost = torch.stack([w[:, j] ** 2 / torch.linalg.inv(h[j:, j:])[0, 0] for j in range(c0, c1)], 1)
        order = cost.flatten().argsort(stable=True)[: int(round(sparsity * cost.numel()))]
        pruned = torch.zeros(cost.numel(), dtype=torch.bool)
        pruned[order] = True
        pruned = pruned.view_as(cost)
        for j in range(c0, c1):
            hinv = torch.linalg.inv(h[j:, j:])
            p = pruned[:, j - c0]
            w[p, j:] -= (w[p, j] / hinv[0, 0])[:, None] * hinv[0][None, :]
        w[:, c0:c1][pruned] = 0
        kept[:, c0:c1] = ~pruned
    return w, kept


def _loss(w, target, h):
    d = w - target
    return ((d @ h) * d).sum()


@pytest.mark.parametrize("N,K,block,sparsity", [(5, 12, 4, 0.5), (7, 20, 8, 0.75), (3, 9, 128, 0.9)])
def test_prune_layer_matches_obs_reference(N, K, block, sparsity):
    gen = torch.Generator().manual_seed(N * K)
    h = _spd(K, gen)
    target = torch.randn(N, K, generator=gen, dtype=torch.float64)
    w, kept = prune_layer(target, h, sparsity, block)
    w_ref, kept_ref = _obs_reference(target, h, sparsity, block)
    assert torch.equal(kept, kept_ref)
    torch.testing.assert_close(w, w_ref, rtol=1e-9, atol=1e-9)
    assert torch.all(w[~kept] == 0)
    for c0 in range(0, K, block):  # each block prunes its share exactly
        c1 = min(c0 + block, K)
        assert int((~kept[:, c0:c1]).sum()) == round(sparsity * N * (c1 - c0))


def test_prune_layer_identity_metric_is_magnitude():
    """With uncorrelated unit inputs nothing can compensate: the largest |w| of each block stay,
    unchanged."""
    gen = torch.Generator().manual_seed(1)
    target = torch.randn(6, 16, generator=gen, dtype=torch.float64)
    w, kept = prune_layer(target, torch.eye(16, dtype=torch.float64), 0.5, block=8)
    for c0 in (0, 8):
        blk = target[:, c0 : c0 + 8].abs()
        assert torch.equal(kept[:, c0 : c0 + 8], blk >= blk.flatten().sort().values[24])
    torch.testing.assert_close(w, target * kept)


@pytest.mark.parametrize("sparsity,sweep,swept_and_refit", [(0.5, 0.2, 0.01), (0.8, 0.9, 0.4)])
def test_prune_layer_beats_magnitude_in_its_metric(sparsity, sweep, swept_and_refit):
    """The sweep alone gains most at moderate sparsity; at high sparsity most of the columns
    that compensated are pruned later, and the refit recovers what the mask allows."""
    gen = torch.Generator().manual_seed(2)
    h = _spd(64, gen)
    target = torch.randn(32, 64, generator=gen, dtype=torch.float64)
    w, kept = prune_layer(target, h, sparsity)
    mag = _loss(
        target * (target.abs() > target.abs().flatten().kthvalue(int(sparsity * 2048)).values), target, h
    )
    assert _loss(w, target, h) < sweep * mag
    assert _loss(refit(w, target, h, kept), target, h) < swept_and_refit * mag


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_refit_solves_each_row_exactly(sparsity):
    gen = torch.Generator().manual_seed(6)
    h = _spd(40, gen)
    target = torch.randn(70, 40, generator=gen, dtype=torch.float64)
    swept, kept = prune_layer(target, h, sparsity, block=16)
    kept[3] = False  # a row that keeps nothing
    w = refit(swept, target, h, kept)
    assert torch.all(w[~kept] == 0)
    for r in range(target.shape[0]):
        k = kept[r]
        if k.any():
            torch.testing.assert_close(w[r, k], torch.linalg.solve(h[k][:, k], (target[r] @ h)[k]))
    swept[3] = 0
    assert _loss(w, target, h) <= _loss(swept, target, h) * (1 + 1e-12)
    limit = int(kept.sum(1).median()) - 1  # rows keeping more are left as the sweep made them
    partial = refit(swept, target, h, kept, max_kept=limit)
    over = kept.sum(1) > limit
    assert over.any() and (~over).any()
    torch.testing.assert_close(partial[over], swept[over], rtol=0, atol=0)
    torch.testing.assert_close(partial[~over], w[~over])
    if sparsity == 0:
        torch.testing.assert_close(w[kept.any(1)], target[kept.any(1)])


def _mlp(gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    return nn.Sequential(nn.Linear(24, 48), nn.GELU(), nn.Dropout(0.1), nn.Linear(48, 16))


_MIX = torch.randn(8, 24, generator=torch.Generator().manual_seed(0))


def _correlated(n, gen):
    """Inputs near one 8-dimensional subspace of 24 (the same for every call)."""
    return torch.randn(n, 8, generator=gen) @ _MIX + 0.05 * torch.randn(n, 24, generator=gen)


def test_sparsify_second_order_mlp():
    gen = torch.Generator().manual_seed(3)
    net = _mlp(gen).train()
    calib = [_correlated(64, gen) for _ in range(4)]
    held = _correlated(256, gen)
    with torch.no_grad():
        ref = net.eval()(held)
    net.train()
    so = sparsify(net, 0.75, "second_order", calib=calib, policy="dense")
    mag = sparsify(net, 0.75, "magnitude", policy="dense")
    assert net.training and so.training  # the copy pruned in eval mode, its mode given back
    assert all(isinstance(so[i], SparseLinear) for i in (0, 3))
    for i in (0, 3):
        assert so[i].mask().float().mean().item() == pytest.approx(0.25, abs=0.01)
    with torch.no_grad():
        err_so = (so.eval()(held) - ref).norm() / ref.norm()
        err_mag = (mag.eval()(held) - ref).norm() / ref.norm()
    assert err_so < 0.6 * err_mag
    # deterministic
    again = sparsify(net, 0.75, "second_order", calib=calib, policy="dense")
    assert torch.equal(again[0].to_dense(), so[0].to_dense())


def test_token_mask_drops_padding_rows():
    """Rows the mask drops leave the result as if they were never there."""
    gen = torch.Generator().manual_seed(4)
    net = _mlp(gen)
    x = _correlated(48, gen).view(2, 24, 24)
    junk = torch.cat([x, 100 * torch.randn(2, 5, 24, generator=gen)], 1)
    keep = torch.cat([torch.ones(2, 24, dtype=torch.bool), torch.zeros(2, 5, dtype=torch.bool)], 1)
    masks = {"x": keep}
    a = sparsify(net, 0.5, "second_order", calib=[x], policy="dense")
    b = sparsify(net, 0.5, "second_order", calib=[junk], token_mask=lambda t: masks["x"], policy="dense")
    torch.testing.assert_close(a[3].to_dense(), b[3].to_dense(), rtol=1e-5, atol=1e-6)


def test_sparsify_second_order_conv():
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, stride=2, dilation=2))
    smooth = lambda n: F.avg_pool2d(torch.randn(n, 3, 20, 20, generator=gen), 3, 1, 1)  # noqa: E731
    calib, held = [smooth(8) for _ in range(2)], smooth(16)
    with torch.no_grad():
        ref = net(held)
        so = sparsify(net, 0.7, "second_order", calib=calib, policy="dense")
        mag = sparsify(net, 0.7, "magnitude", policy="dense")
        assert isinstance(so[0], SparseConv2d) and isinstance(so[2], SparseConv2d)
        err_so = (so(held) - ref).norm() / ref.norm()
        err_mag = (mag(held) - ref).norm() / ref.norm()
    assert err_so < 0.7 * err_mag


def test_second_order_refusals():
    net = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ValueError, match="needs calib"):
        sparsify(net, 0.5, "second_order")
    with pytest.raises(ValueError, match="needs calib"):
        sparsify(net, 0.5, "second_order", calib=[])
    with pytest.raises(ValueError, match="damp"):
        sparsify(net, 0.5, "second_order", calib=[torch.randn(4, 8)], damp=-1)
    with pytest.raises(ValueError, match="block"):
        sparsify(net, 0.5, "second_order", calib=[torch.randn(4, 8)], block=4)
    bad = torch.randn(4, 8)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="not all finite"):
        sparsify(net, 0.5, "second_order", calib=[bad])
    net.train()
    with pytest.raises(ValueError, match="not all finite"):
        sparsify(net, 0.5, "second_order", calib=[bad], inplace=True)
    assert net.training  # its mode given back on the error too
    with pytest.raises(ValueError, match="inputs of method='second_order' only"):
        sparsify(net, 0.5, "magnitude", calib=[torch.randn(4, 8)])  # not silently magnitude
    dw = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Flatten(), nn.Linear(64, 4))
    with pytest.raises(ValueError, match="groups=4"):
        sparsify(dw, 0.5, "second_order", calib=[torch.randn(1, 4, 6, 6)])
    # skipping the grouped convolution is the way through
    conv = lambda n, m: isinstance(m, nn.Conv2d)  # noqa: E731
    out = sparsify(dw, 0.5, "second_order", calib=[torch.randn(1, 4, 6, 6)], skip=conv)
    assert isinstance(out[0], nn.Conv2d) and isinstance(out[2], SparseLinear)


def test_bfloat16_weights():
    """A bfloat16 model (its inputs too) prunes the same way: the algebra runs in float64."""
    gen = torch.Generator().manual_seed(7)
    net = _mlp(gen).to(torch.bfloat16).eval()
    calib = [_correlated(64, gen).to(torch.bfloat16) for _ in range(2)]
    held = _correlated(128, gen).to(torch.bfloat16)
    so = sparsify(net, 0.5, "second_order", calib=calib, policy="dense")
    mag = sparsify(net, 0.5, "magnitude", policy="dense")
    with torch.no_grad():
        ref = net(held).float()
        err_so = (so(held).float() - ref).norm() / ref.norm()
        err_mag = (mag(held).float() - ref).norm() / ref.norm()
    assert err_so < 0.6 * err_mag


def test_sparsity_zero_changes_nothing():
    """No upstream error and nothing pruned: the damping must not move the weights."""
    gen = torch.Generator().manual_seed(8)
    net = _mlp(gen).eval()
    x = _correlated(64, gen)
    same = sparsify(net, 0.0, "second_order", calib=[x], policy="dense")
    torch.testing.assert_close(same(x), net(x), rtol=1e-5, atol=1e-5)


def test_a_float64_model_is_refused_before_any_weight_changes():
    """Once refused only when packing, after every layer was pruned in the caller's model."""
    net = _mlp(torch.Generator().manual_seed(9)).double()
    before = [p.detach().clone() for p in net.parameters()]
    calib = [torch.randn(32, 24, dtype=torch.float64)]
    for kw in (dict(), dict(method="second_order", calib=calib)):
        with pytest.raises(TypeError, match=r"layer 0 has float64 weights.*model.float\(\)"):
            sparsify(net, 0.5, inplace=True, **kw)
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))
