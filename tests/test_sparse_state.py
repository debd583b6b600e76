"""hotops.sparse under concurrent use and parameter mutation: threads sharing layers, and every way
a layer's parameters change (in place, .data, .to(), load_state_dict, copies) seen by the next call."""

import copy
import io
import pickle
import threading

import pytest
import torch
from _faults import run_threads
from torch import nn

from hotops.sparse import (
    SparseConv2d,
    SparseLinear,
    SparseWeight,
    reference,
    sparse_conv2d,
    sparse_linear,
)

LOW = (torch.bfloat16, torch.float16)


# ------------------------------------------------------------------ threads


@pytest.mark.parametrize("layout", ["csr", "blocked"])
def test_threads_first_call_on_shared_weight(layout):
    """The issue's race: four threads making their first call on one blocked SparseWeight."""
    for _ in range(5):
        sw = SparseWeight.from_dense(torch.randn(64, 96), sparsity=0.8, block=4, layout=layout)
        xs = [torch.randn(3, 96) for _ in range(4)]
        want = [reference.sparse_linear(x, sw) for x in xs]
        out = [[] for _ in range(4)]

        def call(i):
            with torch.no_grad():
                for _ in range(10):
                    out[i].append(sparse_linear(xs[i], sw))

        run_threads(call, 4)
        for i in range(4):
            for y in out[i]:
                torch.testing.assert_close(y, want[i], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("policy", ["sparse", "dense", "auto"])
@pytest.mark.parametrize("layout", ["csr", "blocked"])
def test_threads_share_modules(policy, layout):
    """Fresh modules (first call, dispatch measurement, prepared call, caches all built
    concurrently), shared by four threads at batch 1 and 5."""
    lin = SparseLinear.from_dense(nn.Linear(48, 32), sparsity=0.8, block=4, layout=layout, policy=policy)
    conv = SparseConv2d.from_dense(
        nn.Conv2d(8, 8, 3, padding=1), sparsity=0.8, block=4, layout=layout, policy=policy, activation="relu"
    )
    xs = [(torch.randn(1 + 4 * (i % 2), 48), torch.randn(1 + (i % 2), 8, 6, 6)) for i in range(4)]
    want = [
        (
            reference.sparse_linear(a, lin.sparse_weight, lin.bias),
            reference.sparse_conv2d(c, conv.sparse_weight, conv.bias, padding=1, activation="relu"),
        )
        for a, c in xs
    ]
    got = [[] for _ in range(4)]

    def call(i):
        with torch.no_grad():
            for _ in range(8):
                got[i].append((lin(xs[i][0]), conv(xs[i][1])))

    run_threads(call, 4)
    for i in range(4):
        for a, c in got[i]:
            torch.testing.assert_close(a, want[i][0], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(c, want[i][1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", ["csr", "blocked"])
def test_threads_training_while_others_infer(layout):
    """One thread trains (optimizer steps change values and bias in place) while three infer on
    the same module: no error, finite outputs of the right shape; once training stops, every
    thread's next output is exact for the final parameters."""
    layer = SparseLinear.from_dense(nn.Linear(40, 24), sparsity=0.75, block=4, layout=layout, policy="sparse")
    opt = torch.optim.SGD(layer.parameters(), lr=1e-3)
    xs = [torch.randn(1 + i, 40) for i in range(3)]
    stop = threading.Event()
    after = [None] * 3

    def work(i):
        if i == 3:
            for _ in range(30):
                opt.zero_grad()
                layer(torch.randn(8, 40)).square().mean().backward()
                opt.step()
            stop.set()
            return
        with torch.no_grad():
            while not stop.is_set():
                y = layer(xs[i])
                assert y.shape == (1 + i, 24) and torch.isfinite(y).all()
            after[i] = layer(xs[i])

    run_threads(work, 4)
    for i in range(3):
        torch.testing.assert_close(
            after[i], reference.sparse_linear(xs[i], layer.sparse_weight, layer.bias), rtol=1e-4, atol=1e-4
        )


# ------------------------------------------------------------------ parameter mutation


def _make(cls, layout, policy):
    torch.manual_seed(0)
    if cls == "linear":
        layer = SparseLinear.from_dense(
            nn.Linear(40, 16), sparsity=0.75, block=4, layout=layout, policy=policy
        )
        x = torch.randn(1, 40)
    else:
        layer = SparseConv2d.from_dense(
            nn.Conv2d(8, 8, 3, padding=1),
            sparsity=0.75,
            block=4,
            layout=layout,
            policy=policy,
            activation="relu",
        )
        x = torch.randn(1, 8, 5, 5)
    return layer, x


def _expected(layer, x):
    sw, b = layer.sparse_weight, layer.bias
    if isinstance(layer, SparseLinear):
        return reference.sparse_linear(x, sw, b, layer.activation)
    return reference.sparse_conv2d(
        x, sw, b, layer.stride, layer.padding, layer.dilation, activation=layer.activation
    )


def _check_follows(layer, x, mutate):
    with torch.no_grad():
        layer(x), layer(x)  # dispatch measured, prepared call and caches built
        before = layer(x).clone()
        mutate(layer)
        for _ in range(2):  # the first call after the change and the prepared one after it
            y = layer(x)
            want = _expected(layer, x.to(y.dtype) if x.dtype != y.dtype else x)
            tol = 1e-4 if y.dtype == torch.float32 else 3e-2
            torch.testing.assert_close(y, want.to(y.dtype), rtol=tol, atol=tol)
    return before


def _new_like(t):
    return torch.randn_like(t) if t.numel() else t.clone()


def _fused_step(m, opt_class=torch.optim.AdamW):
    """torch's fused optimizers write in place without bumping version counters."""
    opt = opt_class(m.parameters(), lr=0.1, fused=True)
    for p in m.parameters():
        p.grad = torch.randn_like(p)
    opt.step()


MUTATIONS = {
    "values.data.mul_": lambda m: m.values.data.mul_(2),
    "values.mul_": lambda m: m.values.mul_(-1),
    "values.data swap": lambda m: setattr(m.values, "data", _new_like(m.values)),
    "values.copy_": lambda m: m.values.copy_(_new_like(m.values)),
    "values.detach().add_": lambda m: m.values.detach().add_(1),
    "values[i] =": lambda m: m.values.__setitem__(0, 5.0),
    "values.data[i] =": lambda m: m.values.data.__setitem__(0, -5.0),
    "new values Parameter": lambda m: setattr(m, "values", nn.Parameter(_new_like(m.values))),
    "bias.data swap": lambda m: setattr(m.bias, "data", torch.randn_like(m.bias)),
    "bias.data.add_": lambda m: m.bias.data.add_(3),
    "bias.add_": lambda m: m.bias.add_(3),
    "bias.copy_": lambda m: m.bias.copy_(torch.randn_like(m.bias)),
    "bias = None": lambda m: setattr(m, "bias", None),
    "new bias Parameter": lambda m: setattr(m, "bias", nn.Parameter(torch.randn_like(m.bias))),
    "nn.init": lambda m: nn.init.normal_(m.values),
    "to(cpu)": lambda m: m.to("cpu"),
    "float()": lambda m: m.float(),
    "values.set_": lambda m: m.values.set_(_new_like(m.values)),
    "bias.set_": lambda m: m.bias.set_(torch.randn_like(m.bias)),
    "fused AdamW step": _fused_step,
    "fused SGD step": lambda m: _fused_step(m, torch.optim.SGD),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
@pytest.mark.parametrize("policy", ["sparse", "dense"])
@pytest.mark.parametrize("layout", ["csr", "blocked"])
@pytest.mark.parametrize("cls", ["linear", "conv"])
def test_mutation_is_seen(cls, layout, policy, mutation):
    layer, x = _make(cls, layout, policy)
    _check_follows(layer, x, MUTATIONS[mutation])


@pytest.mark.parametrize("policy", ["sparse", "dense"])
@pytest.mark.parametrize("layout", ["csr", "blocked"])
def test_conv_geometry_set_later_is_followed_by_both_paths(layout, policy):
    layer, x = _make("conv", layout, policy)
    _check_follows(layer, x, lambda m: setattr(m, "stride", 2))
    _check_follows(layer, x, lambda m: (setattr(m, "padding", (2, 1)), setattr(m, "dilation", 2)))
    assert (layer.stride, layer.padding, layer.dilation) == ((2, 2), (2, 1), (2, 2))
    with pytest.raises(ValueError, match="stride"):
        layer.stride = 0


@pytest.mark.parametrize("policy", ["sparse", "dense"])
@pytest.mark.parametrize("layout", ["csr", "blocked"])
def test_functional_call_substitutes_and_leaves_nothing_behind(layout, policy):
    """torch.func.functional_call swaps tensors into _parameters without __setattr__: the call
    computes with the substitutes, and the next ordinary call with the layer's own again."""
    layer, x = _make("linear", layout, policy)
    v, b = _new_like(layer.values), torch.randn_like(layer.bias)
    with torch.no_grad():
        for first in (True, False):  # as the layer's first call, and after prepared calls
            if not first:
                layer(x), layer(x)
            got = torch.func.functional_call(layer, {"values": v, "bias": b}, (x,))
            want = reference.sparse_linear(x, layer.sparse_weight.with_values(v), b)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            for _ in range(2):
                torch.testing.assert_close(layer(x), _expected(layer, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", ["csr", "blocked"])
def test_training_forward_follows_a_fused_optimizer(layout):
    """The blocked values are derived from values in training too: a fused step (no version
    bump) must be seen by the next grad-enabled forward, or training runs on stale weights."""
    layer, x = _make("linear", layout, "sparse")
    opt = torch.optim.Adam(layer.parameters(), lr=0.1, fused=True)
    for _ in range(3):
        y = layer(x)
        torch.testing.assert_close(y, _expected(layer, x), rtol=1e-4, atol=1e-4)
        y.square().sum().backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("cls", ["linear", "conv"])
def test_data_alias_kept_and_written_later(cls):
    """A .data alias taken, then written after calls that saw the old values."""
    layer, x = _make(cls, "blocked", "sparse")
    alias = layer.values.data
    with torch.no_grad():
        layer(x), layer(x)
        alias.mul_(3)
        torch.testing.assert_close(layer(x), _expected(layer, x), rtol=1e-4, atol=1e-4)
        alias[:3] = 0
        torch.testing.assert_close(layer(x), _expected(layer, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("policy", ["sparse", "dense"])
@pytest.mark.parametrize("layout", ["csr", "blocked"])
@pytest.mark.parametrize("cls", ["linear", "conv"])
def test_half_and_bfloat16_modules(cls, layout, policy, dtype):
    """.half() / .bfloat16(): the values and bias take the dtype (the kernels read them widened
    to float32); inputs of that dtype or float32 both run; .float() goes back."""
    layer, x = _make(cls, layout, policy)
    convert = (lambda m: m.half()) if dtype == torch.float16 else (lambda m: m.bfloat16())
    with torch.no_grad():
        layer(x)
        convert(layer)
        assert layer.values.dtype == dtype and layer.bias.dtype == dtype
        for xi in (x.to(dtype), x):
            y = layer(xi)
            assert y.dtype == xi.dtype
            torch.testing.assert_close(y, _expected(layer, xi.double()).to(y.dtype), rtol=3e-2, atol=3e-2)
    y = layer(x.to(dtype).requires_grad_())  # training in that dtype
    y.float().sum().backward()
    assert layer.values.grad.dtype == dtype
    layer.float()
    _check_follows(layer, x, lambda m: m.values.data.mul_(2))


@pytest.mark.parametrize("warm", [False, True])
@pytest.mark.parametrize("cls", ["linear", "conv"])
def test_double_module_refused_clearly(cls, warm):
    layer, x = _make(cls, "csr", "sparse")
    if warm:  # a layer that has run: its checks are made again after the change, not skipped
        layer(x)
    layer.double()
    with pytest.raises(TypeError, match="x has dtype float64"):
        layer(x.double())
    with pytest.raises(TypeError, match="values has dtype float64"):
        layer(x)
    layer.float()
    layer(x)
    layer.bias = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="bias has 3 entries"):
        layer(x)


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize(
    "src_layout,dst_layout", [("csr", "blocked"), ("blocked", "csr"), ("csr", "csr"), ("blocked", "blocked")]
)
@pytest.mark.parametrize("cls", ["linear", "conv"])
def test_load_state_dict_across_layouts(cls, src_layout, dst_layout, strict):
    """A checkpoint of another mask (and number of non-zeros) and layout loads whole; the
    layer keeps its own layout (the blocked form rebuilt from the loaded CSR)."""
    src, x = _make(cls, src_layout, "sparse")
    torch.manual_seed(1)
    if cls == "linear":
        dst = SparseLinear.from_dense(
            nn.Linear(40, 16), sparsity=0.5, block=4, layout=dst_layout, policy="sparse"
        )
    else:
        dst = SparseConv2d.from_dense(
            nn.Conv2d(8, 8, 3, padding=1),
            sparsity=0.5,
            block=4,
            layout=dst_layout,
            policy="sparse",
            activation="relu",
        )
    with torch.no_grad():
        dst(x), dst(x)
        result = dst.load_state_dict(src.state_dict(), strict=strict)
        assert not result.missing_keys and not result.unexpected_keys
        assert dst.layout == ("blocked 4x1" if dst_layout == "blocked" else "csr")
        assert dst.density == src.density
        torch.testing.assert_close(dst(x), src(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dst(x), _expected(dst, x), rtol=1e-4, atol=1e-4)
    dst(x.requires_grad_()).sum().backward()  # the loaded structure trains
    assert dst.values.grad.shape == dst.values.shape


@pytest.mark.parametrize("cls", ["linear", "conv"])
def test_load_state_dict_same_structure_keeps_parameter(cls):
    """Same structure: values are copied into the existing Parameter (an optimizer keeps it)."""
    src, x = _make(cls, "blocked", "sparse")
    dst = copy.deepcopy(src)
    with torch.no_grad():
        dst.values.mul_(0)
        dst(x)
    values = dst.values
    dst.load_state_dict(src.state_dict())
    assert dst.values is values
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x))


@pytest.mark.parametrize("corrupt", ["t_perm", "colidx", "rowptr", "values", "partial"])
def test_load_state_dict_refuses_corrupt_checkpoints(corrupt):
    layer, x = _make("linear", "blocked", "sparse")
    sd = {k: v.clone() for k, v in layer.state_dict().items()}
    if corrupt == "t_perm":
        sd["t_perm"] = sd["t_perm"].flip(0)
    elif corrupt == "colidx":
        sd["colidx"][0] = 10_000
    elif corrupt == "rowptr":
        sd["rowptr"][1] = -1
    elif corrupt == "values":
        sd["values"] = sd["values"][:-1]
    else:
        del sd["t_colidx"]
    with pytest.raises(RuntimeError, match="(?i)t_perm|colidx|rowptr|values|packed weight"):
        layer.load_state_dict(sd, strict=False)


def test_values_only_checkpoint_loads_into_structure():
    layer, x = _make("linear", "blocked", "sparse")
    v = torch.randn_like(layer.values)
    with torch.no_grad():
        layer(x)
        result = layer.load_state_dict({"values": v}, strict=False)
        assert "values" not in result.missing_keys
        torch.testing.assert_close(layer.values, v)
        torch.testing.assert_close(layer(x), _expected(layer, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copies_keep_tracking(how):
    layer, x = _make("linear", "blocked", "sparse")
    with torch.no_grad():
        layer(x)
    if how == "deepcopy":
        twin = copy.deepcopy(layer)
    elif how == "pickle":
        twin = pickle.loads(pickle.dumps(layer))
    else:
        buf = io.BytesIO()
        torch.save(layer, buf)
        buf.seek(0)
        twin = torch.load(buf, weights_only=False)
    _check_follows(twin, x, lambda m: m.values.data.mul_(2))
    with torch.no_grad():  # the original is untouched by the copy's change
        torch.testing.assert_close(layer(x), _expected(layer, x), rtol=1e-4, atol=1e-4)


def test_inference_mode_calls_follow_changes():
    layer, x = _make("linear", "blocked", "sparse")
    with torch.inference_mode():
        layer(x), layer(x)
    layer.values.data.mul_(2)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), _expected(layer, x), rtol=1e-4, atol=1e-4)


def test_functional_weight_follows_values():
    """A bare SparseWeight's blocked form follows in-place changes and replacements of values."""
    sw = SparseWeight.from_dense(torch.randn(16, 40), sparsity=0.5, block=4, layout="blocked")
    x = torch.randn(2, 40)
    with torch.no_grad():
        sparse_linear(x, sw)
        sw.values.mul_(2)
        torch.testing.assert_close(sparse_linear(x, sw), reference.sparse_linear(x, sw), rtol=1e-4, atol=1e-4)
        p = nn.Parameter(sw.values.clone())
        from hotops.sparse.tracking import track

        sw2 = sw.with_values(track(p))
        sparse_linear(x, sw2)
        p.data.mul_(-1)
        torch.testing.assert_close(
            sparse_linear(x, sw2), reference.sparse_linear(x, sw2), rtol=1e-4, atol=1e-4
        )


def test_module_refuses_wrong_input_clearly():
    layer, _ = _make("linear", "csr", "sparse")
    with pytest.raises(ValueError, match="x must end in the 40 input features"):
        layer(torch.randn(2, 39))
    conv, _ = _make("conv", "csr", "auto")
    with pytest.raises(ValueError, match="x has 3 channels"):
        conv(torch.randn(1, 3, 5, 5))
    with pytest.raises(TypeError, match="x has dtype int64"):
        conv(torch.ones(1, 8, 5, 5, dtype=torch.long))


# ------------------------------------------------------------------ determinism


@pytest.mark.parametrize("layout", ["csr", "blocked"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_repeated_calls_are_bitwise_equal(kind, layout):
    """Same inputs, ISA and thread count: the same bits, forward and both gradients."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        if kind == "linear":
            sw = SparseWeight.from_dense(torch.randn(96, 600), sparsity=0.8, layout=layout)
            x, run = torch.randn(33, 600), sparse_linear
        else:
            sw = SparseWeight.from_dense(torch.randn(16, 8, 3, 3), sparsity=0.8, layout=layout)
            x = torch.randn(2, 8, 12, 12)
            run = lambda x, sw: sparse_conv2d(x, sw, padding=1)  # noqa: E731
        outs = []
        for _ in range(6):
            xg, v = x.clone().requires_grad_(), sw.values.clone().requires_grad_()
            y = run(xg, sw.with_values(v))
            outs.append((y.detach(), *torch.autograd.grad(y, (xg, v), torch.ones_like(y))))
        for o in outs[1:]:
            for a, b in zip(o, outs[0]):
                assert torch.equal(a, b)
    finally:
        torch.set_num_threads(threads)


def test_prune_reparametrisation_is_seen():
    """torch.nn.utils.prune replaces values by a plain attribute before each forward."""
    prune = pytest.importorskip("torch.nn.utils.prune")
    layer, x = _make("linear", "blocked", "sparse")
    with torch.no_grad():
        layer(x)
    prune.l1_unstructured(layer, "values", amount=0.5)
    with torch.no_grad():
        layer(x)
        torch.testing.assert_close(layer(x), _expected(layer, x), rtol=1e-4, atol=1e-4)
    prune.remove(layer, "values")
    _check_follows(layer, x, lambda m: m.values.data.mul_(2))
