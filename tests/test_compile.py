"""torch.compile across the families: dynamic shapes (``dynamic=True`` traces sizes and Python
floats symbolically), and fake kernels that give the real outputs' shapes, dtypes and strides
for inputs the other tests pass contiguous (transposed views, bfloat16 values)."""

import pytest
import torch
from torch.library import opcheck

import hotops
from hotops.ann import quantize_ste
from hotops.ann.op import quantize_ste_fwd
from hotops.infonce import op as infonce_op
from hotops.sparse import SparseWeight, sparse_linear
from hotops.sparse import op as sparse_op

SW = SparseWeight.from_dense(torch.randn(9, 13), sparsity=0.5)

CALLS = {
    "info_nce": (lambda q, d: hotops.info_nce(q, d, temperature=0.1), lambda n: (n, 4)),
    "subsampled_attention": (
        lambda q, k: hotops.subsampled_attention(q, k, k, indices=torch.zeros(1, 2, 2, dtype=torch.long)),
        lambda n: (1, 2, n, 4),
    ),
    "quantize_ste": (lambda x, cb: quantize_ste(x, cb, 0.5), None),
    "sparse_linear": (lambda x, _: sparse_linear(x, SW, activation="relu"), lambda n: (n, 13)),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_dynamic_shapes_fullgraph(name):
    fn, shape = CALLS[name]
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
    for n in (3, 5, 8):
        if name == "quantize_ste":
            args = (torch.randn(n, 8), torch.randn(2, 4, 4))
        else:
            args = (torch.randn(*shape(n)), torch.randn(*shape(n)))
        torch.testing.assert_close(compiled(*args), fn(*args))


def _r(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype).requires_grad_()


@pytest.mark.parametrize(
    "op,args",
    [
        (infonce_op.info_nce, lambda t: (_r(17, 3), _r(3, 17).T, None, None, None, t, 0, 0.0, "sum", True)),
        (
            infonce_op.info_nce,
            lambda t: (_r(5, 3), _r(5, 3), _r(3, 4).T, None, None, t, 0, 0.0, "mean", True),
        ),
        (
            infonce_op.info_nce_backward,
            lambda t: (_r(5, 3), _r(3, 5).T, None, None, None, t, torch.rand(5), 0, 0.0),
        ),
        (quantize_ste_fwd, lambda t: (_r(8, 5).T, _r(2, 4, 4), 0.7)),
        (
            sparse_op.sparse_linear_backward,
            lambda t: (
                (torch.randn(5, 9), torch.randn(5, 13), SW.values.bfloat16(), SW.rowptr, SW.colidx)
                + (SW.t_rowptr, SW.t_colidx, SW.t_perm, 13, True, True)
            ),
        ),
    ],
    ids=[
        "info_nce d transposed",
        "info_nce pool transposed",
        "info_nce backward",
        "quantize_ste",
        "sparse bwd",
    ],
)
def test_fake_kernels_match_real_strides_and_dtypes(op, args):
    t = torch.tensor(0.2, requires_grad=True)
    opcheck(op, args(t), test_utils=("test_schema", "test_faketensor"))
