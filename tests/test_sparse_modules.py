"""hotops.sparse modules: SparseLinear / SparseConv2d, the dense-or-sparse dispatch, prepared calls, sparsify, fuse."""

import pytest
import torch
import torch.nn.functional as F
from _sparse_ref import check_close, reference_pair
from torch import nn

import hotops
from hotops.sparse import (
    SparseConv2d,
    SparseLinear,
    reference,
    sparse_linear,
    sparsify,
)
from hotops.sparse.module import DENSE, SPARSE

# ------------------------------------------------------------------ modules and sparsify


def test_sparse_linear_module():
    lin = nn.Linear(20, 10)
    layer = SparseLinear.from_dense(lin, sparsity=0.9, policy="sparse")
    assert abs(layer.density - 0.1) < 0.01
    dense = layer.to_dense()
    assert (dense != 0).sum() == layer.values.numel()
    x = torch.randn(4, 20)
    torch.testing.assert_close(layer(x), F.linear(x, dense, lin.bias))
    assert layer.backend == SPARSE
    layer.policy = "dense"
    torch.testing.assert_close(layer(x), F.linear(x, dense, lin.bias))
    assert layer.backend == DENSE
    # the model policy: a 90 %-sparse batched layer runs sparse, a 10 % one dense
    model_sparse = SparseLinear.from_dense(lin, sparsity=0.9, policy="model")
    model_dense = SparseLinear.from_dense(lin, sparsity=0.1, policy="model")
    model_sparse(torch.randn(16, 20))
    model_dense(torch.randn(16, 20))
    assert (model_sparse.backend, model_dense.backend) == (SPARSE, DENSE)


# policy="model" for linear layers (dispatch.sparse_pays): (density, rows, sparse?)
LINEAR_MODEL = [
    (0.1, 1, True),  # batch-1-like (under 8 rows): density <= 0.2
    (0.3, 4, False),
    (0.3, 8, True),  # batched: density <= 0.4, at every batch size
    (0.5, 512, False),
    (0.1, 512, True),
    (0.1, 1024, True),  # x^T's rows 4 KB apart: padded, so the kernel keeps its pace
    (0.1, 5120, True),
    (0.4, 8192, True),
    (0.5, 8192, False),
]


@pytest.mark.parametrize("density,rows,sparse", LINEAR_MODEL)
def test_linear_model_rule(density, rows, sparse):
    from hotops.sparse.dispatch import sparse_pays

    assert sparse_pays("linear", density, rows) == sparse


@pytest.mark.parametrize("sparsity,rows,want", [(0.9, 512, SPARSE), (0.9, 2100, SPARSE), (0.5, 2100, DENSE)])
def test_linear_model_policy_by_rows(sparsity, rows, want):
    """A 384 -> 384 layer under policy="model": the path the density rule picks at each batch
    size, and both paths give the reference's result."""
    torch.manual_seed(0)
    lin = nn.Linear(384, 384)
    layer = SparseLinear.from_dense(lin, sparsity=sparsity, policy="model")
    x = torch.randn(rows, 384)
    with torch.no_grad():
        y = layer(x)
        assert layer.backend == want
        r64, r32 = reference_pair(reference.sparse_linear, x, layer.sparse_weight, bias=lin.bias.detach())
        check_close(y, r64, r32)
        layer.policy = "sparse" if want == DENSE else "dense"  # the other path agrees too
        check_close(layer(x), r64, r32)
        assert layer.backend != want


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_model_policy_runs_one_path(monkeypatch, kind):
    """Where the rule picks dense, a new input shape checks the sparse op's arguments without
    running its kernel (it did once per shape: length-sorted encoding batches, each a new shape,
    paid for both paths); bad arguments still raise as the sparse op does."""
    from hotops.sparse import op

    calls = []
    for name in ("linear_forward", "sparse_linear_op", "conv2d_forward", "sparse_conv2d_op"):
        real = getattr(op, name)
        monkeypatch.setattr(op, name, lambda *a, real=real, **k: calls.append(1) or real(*a, **k))
    if kind == "linear":
        layer = SparseLinear.from_dense(nn.Linear(384, 384), sparsity=0.5, policy="model")
        shapes, bad = [(1100, 384), (40, 30, 384)], torch.randn(1100, 383)
    else:
        layer = SparseConv2d.from_dense(nn.Conv2d(8, 8, 3, padding=1), sparsity=0.5, policy="model")
        shapes, bad = [(1, 8, 6, 6), (2, 8, 5, 7)], torch.randn(1, 8, 0, 6)
    with torch.no_grad():
        for shape in shapes:
            layer(torch.randn(shape))
            assert layer.backend == DENSE and not calls
        with pytest.raises(ValueError):
            layer(bad)
        layer.policy = "dense"  # a forced dense path checks its input too: int32 x would cast w to int32
        with pytest.raises(TypeError):
            layer(torch.ones(shapes[0], dtype=torch.int32))


@pytest.mark.parametrize("sparse_faster", [True, False])
def test_measured_dispatch(monkeypatch, sparse_faster):
    """policy="auto" times both paths once per input signature and runs the faster."""
    from hotops.sparse import module

    calls = []

    def fake_measure(run_sparse, run_dense):
        calls.append(1)
        torch.testing.assert_close(run_sparse(), run_dense())
        return (1.0, 2.0) if sparse_faster else (2.0, 1.0)

    monkeypatch.setattr(module, "measure_pair", fake_measure)
    conv = SparseConv2d.from_dense(nn.Conv2d(4, 6, 3, padding=1), sparsity=0.5, activation="relu")
    lin = SparseLinear.from_dense(nn.Linear(12, 5), sparsity=0.5)
    want = SPARSE if sparse_faster else DENSE
    for layer, make in ((conv, lambda n: torch.randn(n, 4, 7, 7)), (lin, lambda n: torch.randn(n, 12))):
        calls.clear()
        for n in (2, 2, 3, 2):
            x = make(n)
            y = layer(x)
            assert layer.backend == want
            dense = (
                F.conv2d(x, layer.to_dense(), layer.bias, padding=1).relu()
                if layer is conv
                else F.linear(x, layer.to_dense(), layer.bias)
            )
            torch.testing.assert_close(y, dense)
        assert len(calls) == 2  # batch 2 and batch 3: each signature measured once
        assert all(d[1:] == ((1.0, 2.0) if sparse_faster else (2.0, 1.0)) for d in layer.dispatch.values())


def test_measured_dispatch_really_times():
    layer = SparseLinear.from_dense(nn.Linear(64, 32), sparsity=0.9)
    layer(torch.randn(8, 64))
    ((wins, ts, td),) = layer.dispatch.values()
    assert ts > 0 and td > 0 and wins == (ts < td)
    assert layer.backend == (SPARSE if wins else DENSE)


def test_dense_cache_follows_values():
    layer = SparseLinear.from_dense(nn.Linear(8, 4), sparsity=0.5, policy="dense")
    x = torch.randn(2, 8)
    with torch.no_grad():
        y0 = layer(x)
        layer.values.mul_(2)  # an in-place update bumps the version: the cache is rebuilt
        y1 = layer(x)
    torch.testing.assert_close(y1 - layer.bias, 2 * (y0 - layer.bias))


@pytest.mark.parametrize("policy", ["sparse", "dense"])
def test_prepared_inference_call_follows_the_layer(policy):
    """Repeated inference calls run a call bound once per signature; whatever it depends on
    (values or bias updated in place or replaced, activation, policy, input layout) rebinds it."""
    import copy
    import io

    torch.manual_seed(0)
    conv = SparseConv2d.from_dense(
        nn.Conv2d(6, 6, 3, padding=1, groups=3), sparsity=0.5, activation="relu6", policy=policy
    )
    x = 4 * torch.randn(2, 6, 5, 5)

    def want(inp=x):
        return reference.sparse_conv2d(
            inp, conv.sparse_weight, conv.bias, padding=1, activation=conv.activation
        )

    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(conv(x), want())
        assert conv._prepared is not None
        conv.values.mul_(-2)  # in place
        torch.testing.assert_close(conv(x), want())
        conv.bias.add_(1)
        torch.testing.assert_close(conv(x), want())
        conv.values = nn.Parameter(torch.randn_like(conv.values))  # replaced
        torch.testing.assert_close(conv(x), want())
        conv.activation = None
        torch.testing.assert_close(conv(x), want())
        conv.policy = "dense" if policy == "sparse" else "sparse"
        torch.testing.assert_close(conv(x), want())
        assert conv.backend == (DENSE if policy == "sparse" else SPARSE)
        xt = x.transpose(2, 3)  # not contiguous: the full path
        torch.testing.assert_close(conv(xt), want(xt))
        torch.testing.assert_close(conv(x[:1]), want(x[:1]))
    copied = copy.deepcopy(conv)  # the bound C++ call is not copied, but rebuilt
    buf = io.BytesIO()
    torch.save(conv, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.inference_mode():
        for layer in (copied, loaded):
            torch.testing.assert_close(layer(x), want())
    xg = x.clone().requires_grad_()  # with autograd: the op, differentiable
    conv(xg).sum().backward()
    assert xg.grad is not None and conv.values.grad is not None


@pytest.mark.parametrize("policy", ["sparse", "dense"])
@pytest.mark.parametrize("shape", [(1, 20), (7, 20), (2, 3, 20)])
def test_prepared_linear_call(policy, shape):
    torch.manual_seed(0)
    lin = SparseLinear.from_dense(nn.Linear(20, 9), sparsity=0.6, activation="relu", policy=policy)
    x = torch.randn(*shape)
    with torch.inference_mode():
        for _ in range(3):
            torch.testing.assert_close(
                lin(x), reference.sparse_linear(x, lin.sparse_weight, lin.bias, "relu")
            )
        assert lin._prepared is not None
        lin.activation = "relu6"
        torch.testing.assert_close(
            lin(3 * x), reference.sparse_linear(3 * x, lin.sparse_weight, lin.bias, "relu6")
        )


def test_training_under_fixed_mask():
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    layer = SparseConv2d.from_dense(conv, sparsity=0.8, activation="relu", policy="sparse")
    mask = layer.mask()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x, target = torch.randn(3, 4, 6, 6), torch.randn(3, 6, 6, 6)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = F.mse_loss(layer(x), target)
        loss.backward()
        # the values' gradient is the dense masked gradient at the mask's non-zeros
        w = layer.to_dense().detach().requires_grad_()
        F.mse_loss(F.relu(F.conv2d(x, w, layer.bias, padding=1)), target).backward()
        torch.testing.assert_close(layer.values.grad, w.grad[mask], rtol=1e-4, atol=1e-6)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert torch.equal(layer.mask(), mask)  # the mask is fixed; only values moved


def test_set_mask_repacks():
    layer = SparseConv2d.from_dense(nn.Conv2d(3, 4, 3), sparsity=0.5)
    new = torch.zeros(4, 3, 3, 3, dtype=torch.bool)
    new[:, :, 1, 1] = True
    layer.set_mask(new)
    assert layer.values.numel() == 12 and torch.equal(layer.mask(), new)


def _tiny_net():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )


def test_sparsify_magnitude():
    net = _tiny_net()
    sp = sparsify(net, sparsity=0.75, policy="sparse")
    assert (
        isinstance(sp[0], SparseConv2d)
        and isinstance(sp[2], SparseConv2d)
        and isinstance(sp[6], SparseLinear)
    )
    assert isinstance(net[0], nn.Conv2d)  # not in place by default
    dense = _tiny_net()
    dense.load_state_dict(net.state_dict())
    for i in (0, 2, 6):
        dense[i].weight.data = sp[i].to_dense()
        assert abs(sp[i].density - 0.25) < 0.05
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(sp(x), dense(x), rtol=1e-4, atol=1e-5)


def test_sparsify_learned():
    torch.manual_seed(0)
    net = _tiny_net()
    data = [(torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))) for _ in range(3)]
    sp = sparsify(
        net,
        sparsity=0.7,
        method="learned",
        data=data,
        loss_fn=F.cross_entropy,
        steps=6,
        lr=5.0,
        skip=lambda name, m: isinstance(m, nn.Linear),
    )
    assert isinstance(sp[0], SparseConv2d) and isinstance(sp[6], nn.Linear)
    assert abs(sp[0].density - 0.3) < 0.02
    magnitude = sparsify(net, sparsity=0.7, skip=lambda name, m: isinstance(m, nn.Linear))
    assert not torch.equal(sp[0].mask(), magnitude[0].mask())  # the scores moved the mask
    with pytest.raises(ValueError, match="data"):
        sparsify(net, method="learned")
    with pytest.raises(ValueError, match="method"):
        sparsify(net, method="random")


def test_sparsify_learned_gives_the_model_back_when_training_raises():
    net = _tiny_net().eval()
    net[0].weight.requires_grad_(False)
    flags = [p.requires_grad for p in net.parameters()]
    data = [(torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,)))]
    calls = []

    def loss_fn(y, t):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return F.cross_entropy(y, t)

    with pytest.raises(RuntimeError, match="boom"):
        sparsify(net, 0.5, "learned", data=data, loss_fn=loss_fn, steps=5, inplace=True)
    assert [type(m) for m in net] == [type(m) for m in _tiny_net()]
    assert [p.requires_grad for p in net.parameters()] == flags and not net.training


def test_sparsify_keeps_frozen_parameters_frozen():
    net = _tiny_net()
    net[0].requires_grad_(False)
    net[6].bias.requires_grad_(False)
    sp = sparsify(net, 0.5)
    assert not sp[0].values.requires_grad and not sp[0].bias.requires_grad
    assert sp[2].values.requires_grad and sp[6].values.requires_grad and not sp[6].bias.requires_grad


def test_sparsify_says_when_it_finds_nothing_to_prune():
    once = sparsify(_tiny_net(), 0.5)
    for sparsity in (0.9, None):
        with pytest.raises(ValueError, match="found no layers to prune"):
            sparsify(once, sparsity)
    with pytest.raises(ValueError, match="found no layers to prune"):
        sparsify(_tiny_net(), 0.5, skip=lambda name, m: True)


def test_sparsify_names_the_convolutions_it_leaves_dense():
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"),
        nn.Conv2d(4, 4, 3, padding="same"),
        nn.Conv2d(4, 4, 1),
    )
    with pytest.warns(
        UserWarning, match=r"leaving 0, 1 dense: sparse convolutions take numeric zero padding"
    ):
        sp = sparsify(net, 0.5)
    assert type(sp[0]) is nn.Conv2d and type(sp[1]) is nn.Conv2d and isinstance(sp[2], SparseConv2d)


def _bn_net():
    """conv + BN + ReLU6, depthwise + BN + ReLU, a sparse layer with its own ReLU before a BN (must
    not fold), a dense conv + BN (torch's folding), linear + BatchNorm1d + ReLU."""
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU6(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 6, 1),
        nn.ReLU(),
        nn.BatchNorm2d(6),
        nn.Conv2d(6, 4, 1),
        nn.BatchNorm2d(4),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 7),
        nn.BatchNorm1d(7),
        nn.ReLU(),
    )
    for bn in net.modules():
        if isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.data.uniform_(0.5, 2)
            bn.bias.data.uniform_(-1, 1)
    return net.eval()


def test_fuse_folds_batchnorm_and_activations():
    torch.manual_seed(0)
    sp = sparsify(_bn_net(), sparsity=0.6, policy="sparse", skip=lambda name, m: name == "9")
    fused = hotops.sparse.fuse(sp)
    kinds = [type(m).__name__ for m in fused]
    assert kinds == [
        "SparseConv2d",
        "Identity",
        "Identity",
        "SparseConv2d",
        "Identity",
        "Identity",
        "SparseConv2d",
        "Identity",
        "BatchNorm2d",
        "Conv2d",
        "Identity",
        "Flatten",
        "SparseLinear",
        "Identity",
        "Identity",
    ]
    assert [fused[i].activation for i in (0, 3, 6, 12)] == ["relu6", "relu", "relu", "relu"]
    assert isinstance(sp[1], nn.BatchNorm2d) and sp[0].activation is None  # not in place by default
    x = 3 * torch.randn(4, 3, 5, 5)
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), sp(x), rtol=1e-4, atol=1e-4)
        fused[0].policy = "dense"  # the dense path of a fused layer applies the same activation
        torch.testing.assert_close(fused(x), sp(x), rtol=1e-4, atol=1e-4)


def test_fuse_refuses_training_mode():
    sp = sparsify(_bn_net(), sparsity=0.5)
    with pytest.raises(ValueError, match="eval mode"):
        hotops.sparse.fuse(sp.train())
    sp.eval()
    sp[1].train()
    with pytest.raises(ValueError, match="but module '1' is in"):  # names the module in training mode
        hotops.sparse.fuse(sp)


def test_public_api():
    assert hotops.sparse_linear is sparse_linear and hotops.nn.SparseConv2d is SparseConv2d


def test_conv_dispatch_model():
    x = torch.randn(1, 8, 6, 6)
    cases = [
        (nn.Conv2d(8, 8, 3, padding=1), 0.9, SPARSE),
        (nn.Conv2d(8, 8, 3, padding=1), 0.5, DENSE),
        (nn.Conv2d(8, 8, 1), 0.7, SPARSE),
        (nn.Conv2d(8, 8, 1), 0.3, DENSE),
        (nn.Conv2d(8, 8, 3, padding=1, groups=8), 0.9, SPARSE),
        (nn.Conv2d(8, 8, 3, padding=1, groups=8), 0.5, DENSE),
    ]
    for conv, sparsity, backend in cases:
        layer = SparseConv2d.from_dense(conv, sparsity=sparsity, policy="model")
        torch.testing.assert_close(
            layer(x), F.conv2d(x, layer.to_dense(), conv.bias, 1, conv.padding, 1, conv.groups)
        )
        assert layer.backend == backend, (conv, sparsity)


@pytest.mark.parametrize("policy", ["sparse", "dense"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_compiled_modules_equal_eager_with_gradients(kind, policy):
    """torch.compile of the modules themselves: their parameters and buffers are tracked
    subclasses, which tracing cannot take, so a trace sees plain views of them (as_subclass,
    still attached to autograd). Output and every parameter's gradient equal eager's."""
    torch.manual_seed(0)
    if kind == "linear":
        layer = SparseLinear.from_dense(nn.Linear(40, 16), sparsity=0.75, policy=policy)
        x = torch.randn(4, 40)
    else:
        layer = SparseConv2d.from_dense(nn.Conv2d(8, 8, 3, padding=1), sparsity=0.75, policy=policy)
        x = torch.randn(2, 8, 6, 6)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager")
    got = compiled(x)
    got.square().sum().backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    want = layer(x)
    want.square().sum().backward()
    torch.testing.assert_close(got, want)
    for g, p in zip(grads, layer.parameters()):
        torch.testing.assert_close(g, p.grad)
    with torch.no_grad():  # an in-place update after the trace is seen by the compiled call
        layer.values.mul_(2)
        torch.testing.assert_close(compiled(x), layer(x))


@pytest.mark.parametrize("policy", ["sparse", "dense"])
def test_conv_takes_an_unbatched_image_as_nn_conv2d_does(policy):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    layer = SparseConv2d.from_dense(conv, sparsity=0.5, policy=policy)
    x = torch.randn(4, 5, 5)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            got = layer(x)
        assert got.shape == (6, 5, 5)
        torch.testing.assert_close(got, layer(x[None])[0])


def test_signatures_kept_are_bounded(monkeypatch):
    # token batches of ever new lengths must not grow a layer's per-signature tables without end
    monkeypatch.setattr(hotops.sparse.dispatch, "SIGNATURES_KEPT", 4)
    layer = SparseLinear.from_dense(nn.Linear(16, 8), sparsity=0.5, policy="model")
    for rows in range(1, 11):
        x = torch.randn(rows, 16)
        torch.testing.assert_close(layer(x), F.linear(x, layer.to_dense(), layer.bias))
    assert len(layer.dispatch) == 4 and len(layer._checked) == 4
    assert all(key[0] == (rows, 16) for key, rows in zip(layer.dispatch, range(7, 11)))  # the newest
