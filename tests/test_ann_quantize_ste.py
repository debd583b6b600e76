"""hotops.ann.quantize_ste against the reference (values and gradients), PQ encoding, opcheck and
torch.compile, bad input; the contrastive-codebook example that trains codebooks with it."""

import os

import numpy as np
import pytest
import torch
from _ann import data, pq

from hotops.ann import reference


def _ste_inputs(dtype=torch.float64, n=13, m=3, ksub=5, dsub=4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, m * dsub, generator=g, dtype=dtype, requires_grad=True)
    cb = torch.randn(m, ksub, dsub, generator=g, dtype=dtype, requires_grad=True)
    return x, cb


@pytest.mark.parametrize("temperature", [0.5, 4.0])
def test_quantize_ste_matches_reference(temperature):
    from hotops.ann import quantize_ste

    x, cb = _ste_inputs()
    out = quantize_ste(x, cb, temperature)
    ref = reference.quantize_ste(x, cb, temperature)
    torch.testing.assert_close(out, ref)
    w = torch.randn_like(out)
    gx, gc = torch.autograd.grad((out * w).sum(), (x, cb))
    rx, rc = torch.autograd.grad((ref * w).sum(), (x, cb))
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gc, rc)


def test_quantize_ste_agrees_with_pq_encoding():
    from hotops.ann import quantize_ste

    index, x = pq(d=16, m=4, nbits=4)
    out = quantize_ste(torch.from_numpy(x), torch.from_numpy(index.codebooks), 1.0)
    np.testing.assert_allclose(out.numpy(), index.decode(index.encode(x)), atol=1e-6)


def test_quantize_ste_opcheck_and_compile():
    from hotops.ann import quantize_ste
    from hotops.ann.op import quantize_ste_fwd

    x, cb = _ste_inputs(torch.float32)
    torch.library.opcheck(quantize_ste_fwd, (x, cb, 0.7))
    compiled = torch.compile(
        lambda a, b: quantize_ste(a, b, 0.7).square().sum(), fullgraph=True, backend="aot_eager"
    )
    loss = compiled(x, cb)
    loss.backward()
    torch.testing.assert_close(loss, quantize_ste(x, cb, 0.7).square().sum())
    assert x.grad is not None and cb.grad is not None


def test_quantize_ste_bad_input():
    from hotops.ann import quantize_ste

    x, cb = _ste_inputs()
    with pytest.raises(ValueError, match="do not tile"):
        quantize_ste(x[:, :5], cb)
    with pytest.raises(ValueError, match="temperature"):
        quantize_ste(x, cb, 0.0)
    with pytest.raises(TypeError, match="floating point"):
        quantize_ste(x.long(), cb)


def test_contrastive_codebook_example_runs_end_to_end():
    """examples/ann_contrastive_codebooks.py on tiny data: quantize_ste + info_nce train the
    codebooks, set_codebooks loads them, the re-encoded index still finds neighbours."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "examples", "ann_contrastive_codebooks.py")
    spec = importlib.util.spec_from_file_location("ann_contrastive_codebooks", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    x = data(700, 16, seed=7)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    out = example.run(x[100:], x[:80], x[80:100], m=4, nbits=6, steps=6, batch=32, hard=5, log_every=0)
    assert len(out["losses"]) == 6 and np.isfinite(out["losses"]).all()
    assert 0.1 <= out["before"] <= 1 and 0.1 <= out["after"] <= 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "-1"], "--steps: must be at least 1, got -1"),  # ran as 0 steps, no word said
        (["--nbits", "9"], "--nbits: invalid choice: 9"),
        (["--lr", "0"], "--lr: must be a finite number above 0, got 0"),
        (["--base", "100"], "--base 100: fewer vectors than the 256 codewords of --nbits 8"),
        (["--m", "7"], "--m 7: PQ sub-spaces must divide the 50 dimensions of --data glove"),
    ],
)
def test_contrastive_codebook_example_refuses_bad_arguments(argv, message, capsys):
    """examples/ann_contrastive_codebooks.py: argparse's error naming the flag, before any training
    (--m is checked against the data's width once the vectors are read)."""
    import importlib.util

    if argv[0] == "--m":
        from hotops.bench import ann_data

        if ann_data.missing("glove"):
            pytest.skip("GloVe is not installed")
    path = os.path.join(os.path.dirname(__file__), "..", "examples", "ann_contrastive_codebooks.py")
    spec = importlib.util.spec_from_file_location("ann_contrastive_codebooks", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    with pytest.raises(SystemExit) as e:
        example.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
