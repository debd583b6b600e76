"""The sparse modules on the meta device: models built there (torch.device("meta"), .to("meta"),
accelerate's init_empty_weights) trace shapes through them, then load a checkpoint (assign=True,
or to_empty and load_state_dict)."""

import warnings

import pytest
import torch
from torch import nn

from hotops.sparse import SparseConv2d, SparseLinear, sparse_conv2d, sparse_linear, sparsify

LAYERS = {
    "linear": (lambda: SparseLinear.from_dense(nn.Linear(16, 8), sparsity=0.5, layout="csr"), (3, 16)),
    "linear blocked": (
        lambda: SparseLinear.from_dense(nn.Linear(16, 8), sparsity=0.5, block=4, layout="blocked"),
        (2, 5, 16),
    ),
    "conv": (lambda: SparseConv2d.from_dense(nn.Conv2d(4, 8, 3, padding=1), sparsity=0.5), (2, 4, 5, 5)),
    "conv1x1 blocked": (
        lambda: SparseConv2d.from_dense(nn.Conv2d(8, 8, 1), sparsity=0.5, block=4, layout="blocked"),
        (2, 8, 5, 5),
    ),
    "depthwise": (
        lambda: SparseConv2d.from_dense(nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8), sparsity=0.5),
        (2, 8, 5, 5),
    ),
}


def _assign_load_then_edit(layer, ref):
    """layer (on meta) takes ref's checkpoint by assign=True, computes as ref does, and still sees
    a .data write to its values (the parameter stays tracked)."""
    layer.load_state_dict({k: v.clone() for k, v in ref.state_dict().items()}, assign=True)
    x = torch.randn(3, 16)
    torch.testing.assert_close(layer(x), ref(x))
    layer.values.data.mul_(2)  # still tracked: a .data write shows
    torch.testing.assert_close(
        layer(x), sparse_linear(x, ref.sparse_weight.with_values(ref.values * 2), ref.bias)
    )


@pytest.mark.parametrize("policy", ["dense", "sparse", "auto", "model"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_forward_on_meta_gives_the_shapes(name, policy):
    """Both paths on meta: the dense one once built its weight with repeat_interleave, which
    needs the counts a meta tensor does not hold; the sparse one without grad skipped the
    dispatcher (and so the op's fake implementation) for the CPU backends."""
    make, shape = LAYERS[name]
    layer = make()
    layer.policy = policy
    x = torch.randn(shape)
    y_cpu = layer(x)
    meta = layer.to("meta")
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            y = meta(x.to("meta"))
        assert y.is_meta and y.shape == y_cpu.shape and y.dtype == y_cpu.dtype
    xm = x.to("meta").requires_grad_()
    meta(xm).sum().backward()
    assert xm.grad.shape == x.shape and meta.values.grad.shape == meta.values.shape
    assert meta(x.to("meta").bfloat16()).dtype == torch.bfloat16
    assert meta.to_dense().is_meta and meta.to_dense().shape == meta.shape
    assert meta.mask().is_meta and meta.mask().shape == meta.shape


def test_functional_on_meta_without_grad():
    lin = SparseLinear.from_dense(nn.Linear(16, 8), sparsity=0.5).to("meta")
    conv = SparseConv2d.from_dense(nn.Conv2d(4, 8, 3), sparsity=0.5).to("meta")
    with torch.no_grad():
        assert sparse_linear(torch.randn(3, 16, device="meta"), lin.sparse_weight).shape == (3, 8)
        y = sparse_conv2d(torch.randn(2, 4, 5, 5, device="meta"), conv.sparse_weight)
    assert y.is_meta and y.shape == (2, 8, 3, 3)


@pytest.mark.parametrize("name", list(LAYERS))
def test_load_state_dict_assign_into_a_meta_layer(name):
    """The checkpoint's packed weight loads whole, whatever the meta layer's number of non-zeros
    (sparsity 0.8 against the checkpoint's 0.5)."""
    make, shape = LAYERS[name]
    ref = make()
    placeholder = type(ref).from_dense(
        nn.Linear(16, 8) if isinstance(ref, SparseLinear) else nn.Conv2d(ref.in_channels, 8, ref.shape[2:]),
        sparsity=0.8,
        block=ref.block or None,
        layout="blocked" if ref.block else "csr",
    )
    if isinstance(ref, SparseConv2d):
        placeholder.stride, placeholder.padding, placeholder.groups = ref.stride, ref.padding, ref.groups
    if ref.groups > 1:  # a depthwise placeholder
        placeholder = make()
    meta = placeholder.to("meta")
    meta.policy = ref.policy = "sparse"
    assert str(meta.load_state_dict(ref.state_dict(), assign=True)) == "<All keys matched successfully>"
    assert all(not t.is_meta for t in list(meta.parameters()) + list(meta.buffers()))
    assert meta.layout == ref.layout
    x = torch.randn(shape)
    torch.testing.assert_close(meta(x), ref(x))


def test_load_state_dict_without_assign_keeps_the_layer_on_meta():
    """As torch does for meta parameters (a no-op, with its warning), in the checkpoint's shapes:
    the structure must not land on the CPU beside meta values."""
    ref = SparseLinear.from_dense(nn.Linear(16, 8), sparsity=0.5)
    for sparsity in (0.5, 0.8):  # the checkpoint's number of non-zeros, and another
        meta = SparseLinear.from_dense(nn.Linear(16, 8), sparsity=sparsity).to("meta")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            meta.load_state_dict(ref.state_dict())
        assert all(t.is_meta for t in list(meta.parameters()) + list(meta.buffers()))
        assert meta.values.shape == ref.values.shape
        assert meta(torch.randn(3, 16, device="meta")).shape == (3, 8)


@pytest.mark.parametrize("block", [None, 4])
@pytest.mark.parametrize("assign", [False, True])
def test_meta_checkpoint_loads_into_a_meta_layer(block, assign):
    """A meta layer's state_dict has no values to check: its sizes are, and it stays on meta."""
    layout = "blocked" if block else "csr"
    src = SparseConv2d.from_dense(nn.Conv2d(8, 16, 3), sparsity=0.5, block=block, layout=layout).to("meta")
    dst = SparseConv2d.from_dense(nn.Conv2d(8, 16, 3), sparsity=0.8, block=block, layout=layout).to("meta")
    dst.load_state_dict(src.state_dict(), assign=assign)
    assert dst.values.is_meta and dst.values.shape == src.values.shape and dst.layout == src.layout
    assert dst(torch.randn(2, 8, 5, 5, device="meta")).shape == (2, 16, 3, 3)
    bad = {k: v[:-1] if k == "t_perm" else v for k, v in src.state_dict().items()}
    with pytest.raises(RuntimeError, match="t_perm"):
        dst.load_state_dict(bad, assign=assign)


@pytest.mark.parametrize("name", list(LAYERS))
def test_to_empty_refuses_until_a_checkpoint_is_loaded(name):
    """to_empty() leaves the packed structure as whatever memory it got (row pointers, column
    indices): the layer refuses to run or read it until load_state_dict installs one."""
    make, shape = LAYERS[name]
    ref = make()
    layer = make().to("meta").to_empty(device="cpu")
    x = torch.randn(shape)
    for fn in (lambda: layer(x), layer.to_dense, layer.mask):
        with pytest.raises(RuntimeError, match=r"to_empty\(\).*load_state_dict"):
            fn()
    values_only = {k: v for k, v in ref.state_dict().items() if k in ("values", "bias")}
    layer.load_state_dict(values_only, strict=False)  # values alone do not make a structure
    with pytest.raises(RuntimeError, match="uninitialised"):
        layer(x)
    layer.load_state_dict(ref.state_dict())
    torch.testing.assert_close(layer.to_dense(), ref.to_dense())
    torch.testing.assert_close(layer(x), ref(x), rtol=1e-5, atol=1e-5)


def test_values_only_checkpoint_with_assign_into_a_meta_layer_is_refused():
    ref = SparseLinear.from_dense(nn.Linear(16, 8), sparsity=0.5)
    meta = SparseLinear.from_dense(nn.Linear(16, 8), sparsity=0.5).to("meta")
    sd = {"values": ref.values.detach(), "bias": ref.bias.detach()}
    with pytest.raises(RuntimeError, match="no structure"):
        meta.load_state_dict(sd, assign=True)


def test_packing_on_meta_is_refused_clearly():
    """Which weights are kept depends on their values: from_dense / sparsify on meta raise a
    ValueError naming what to do, not an error from inside torch's nonzero."""
    with torch.device("meta"):
        lin, conv = nn.Linear(16, 8), nn.Conv2d(4, 8, 3)
        for build in (
            lambda: SparseLinear.from_dense(lin, sparsity=0.5),
            lambda: SparseLinear.from_dense(lin),
            lambda: SparseConv2d.from_dense(conv, mask=torch.ones(8, 4, 3, 3, dtype=torch.bool)),
            lambda: sparsify(nn.Sequential(lin), 0.5),
        ):
            with pytest.raises(ValueError, match=r"meta device.*\.to\('meta'\)"):
                build()
        # a packed weight moved to meta builds a layer there
        sw = SparseLinear.from_dense(nn.Linear(16, 8, device="cpu"), sparsity=0.5).sparse_weight
        layer = SparseLinear(sw.to("meta"))
    assert layer.values.is_meta and layer(torch.randn(3, 16, device="meta")).shape == (3, 8)


def test_accelerate_init_empty_weights():
    """accelerate re-creates each registered Parameter on meta as type(p)(p, **p.__dict__): a
    tracked Parameter's bookkeeping made that a TypeError. Buffers (the structure) stay real."""
    accelerate = pytest.importorskip("accelerate")
    ref = SparseLinear.from_dense(nn.Linear(16, 8), sparsity=0.5, policy="sparse")
    with accelerate.init_empty_weights():
        layer = SparseLinear(ref.sparse_weight, ref.bias.detach(), policy="sparse")
    assert layer.values.is_meta and layer.bias.is_meta and not layer.rowptr.is_meta
    for policy in ("sparse", "dense"):
        layer.policy = policy
        assert layer(torch.randn(3, 16, device="meta")).shape == (3, 8)
    layer.policy = "sparse"
    _assign_load_then_edit(layer, ref)


@pytest.mark.parametrize("block", [None, 4])
def test_meta_checkpoint_into_a_real_layer(block):
    """A checkpoint saved from a layer on meta holds no values. Without assign, loading it into
    a real layer is torch's "Cannot copy out of meta tensor" error, raised before anything is
    installed: the layer stays whole on the CPU, its packed weight and bias on one device,
    whatever the checkpoint's number of non-zeros. With assign the layer takes the checkpoint's
    meta tensors."""
    layout = "blocked" if block else "csr"
    x = torch.randn(3, 16)
    for sparsity in (0.5, 0.8):  # this layer's number of non-zeros, and another
        sd = SparseLinear.from_dense(nn.Linear(16, 8), sparsity=sparsity, block=block, layout=layout)
        sd = sd.to("meta").state_dict()
        layer = SparseLinear.from_dense(nn.Linear(16, 8), sparsity=0.5, block=block, layout=layout)
        values, before = layer.values, {k: v.clone() for k, v in layer.state_dict().items()}
        y = layer(x)
        with pytest.raises(RuntimeError, match=r'"values".*Cannot copy out of meta tensor'):
            layer.load_state_dict(sd)
        assert layer.values is values
        after = layer.state_dict()
        assert after.keys() == before.keys()
        for k, v in before.items():
            assert not after[k].is_meta and torch.equal(after[k], v), k
        torch.testing.assert_close(layer(x), y)

        layer.load_state_dict(sd, assign=True)
        assert all(t.is_meta for t in list(layer.parameters()) + list(layer.buffers()))
        assert layer.values.shape == sd["values"].shape
        assert layer(x.to("meta")).shape == (3, 8)


@pytest.mark.parametrize("name", list(LAYERS))
def test_to_empty_flag_follows_the_structure(name):
    """The refusal is about reading uninitialised real memory: back on meta, shapes trace again
    (the flag once cleared only on load_state_dict); to_empty() of a real layer, or of a model
    holding it, leaves garbage too, and is refused as from meta."""
    make, shape = LAYERS[name]
    ref = make()
    x = torch.randn(shape)
    layer = make().to("meta").to_empty(device="cpu").to("meta")
    assert layer(x.to("meta")).shape == ref(x).shape
    layer.load_state_dict(ref.state_dict(), assign=True)
    torch.testing.assert_close(layer(x), ref(x))
    for empty in (
        lambda: make().to_empty(device="cpu"),
        lambda: nn.Sequential(make()).to_empty(device="cpu")[0],
        lambda: nn.Sequential(make()).to("meta").to_empty(device="cpu")[0],
    ):
        layer = empty()
        with pytest.raises(RuntimeError, match=r"uninitialised.*to_empty\(\)"):
            layer(x)
        layer.load_state_dict(ref.state_dict())
        torch.testing.assert_close(layer(x), ref(x), rtol=1e-5, atol=1e-5)
    layer = make().to_empty(device="meta")  # nothing real to read
    assert layer(x.to("meta")).shape == ref(x).shape


def test_accelerate_init_empty_weights_registers_a_tracked_parameter_again():
    """Weight tying under init_empty_weights: accelerate re-creates the registered Parameter as
    type(p)(p.to("meta"), **p.__dict__), which passed the tracked one's bookkeeping to
    Parameter.__new__ (a TypeError). The new Parameter is tracked by the layer holding it."""
    accelerate = pytest.importorskip("accelerate")
    ref = SparseLinear.from_dense(nn.Linear(16, 8), sparsity=0.5, policy="sparse")
    with accelerate.init_empty_weights():
        a = SparseLinear(ref.sparse_weight, ref.bias.detach(), policy="sparse")
        b = SparseLinear(ref.sparse_weight, ref.bias.detach(), policy="sparse")
        b.values = a.values
        holder = nn.Module()
        holder.register_parameter("w", a.values)
    for layer in (a, b):
        assert layer.values.is_meta and layer(torch.randn(3, 16, device="meta")).shape == (3, 8)
        assert any(c is layer._cell for c in layer.values.__dict__["_hotops_cells"])
    assert holder.w.is_meta and holder.w.shape == a.values.shape
    _assign_load_then_edit(b, ref)
