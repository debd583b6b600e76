"""hotops.retrieval's training loop, ANCE refresh and helpers on a tiny random BERT (no download):
ContrastiveTrainer, contrastive_loss, batch_schedule, HardNegativeRefresh, build_pq_index,
evaluate, encode_speed, state_bytes, duplicate_key, false_negatives, topk_overlap."""

import copy
import types
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _tiny_bert import save_tiny_bert

from hotops.ann import IVFPQIndex, PQIndex
from hotops.retrieval import (
    duplicate_key,
    encode,
    encode_speed,
    evaluate,
    exclusion_matrix,
    false_negatives,
    state_bytes,
    tokenize,
    topk_overlap,
)
from hotops.retrieval.mining import HardNegativeRefresh, build_pq_index
from hotops.retrieval.training import ContrastiveTrainer, batch_schedule, contrastive_loss, encoder_calls

WORDS = [f"w{i}" for i in range(40)]


def _texts(n, seed):
    g = np.random.default_rng(seed)
    return [" ".join(g.choice(WORDS, size=int(g.integers(1, 6)))) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, tokenizer, bert): a 1-layer BERT of width 16 over WORDS, no dropout, saved."""
    transformers = pytest.importorskip("transformers")
    folder = save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), WORDS)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    return folder, tok, transformers.BertModel.from_pretrained(folder).eval()


class _Model(torch.nn.Module):
    """What the trainer and the refresh read of a SentenceTransformer: [0].auto_model, .tokenizer."""

    def __init__(self, bert, tokenizer):
        super().__init__()
        self.bert, self.tokenizer = bert, tokenizer

    def __getitem__(self, i):
        assert i == 0
        return types.SimpleNamespace(auto_model=self.bert)


def _model(tiny):
    import copy

    return _Model(copy.deepcopy(tiny[2]), tiny[1])


# ------------------------------------------------------------------ helpers


def test_batch_schedule_wraps_and_keeps_full_batches():
    order = torch.tensor([4, 2, 0, 3, 1])
    got = [b.tolist() for b in batch_schedule(order, 4, 2)]
    # steps at offsets 0, 2, 4 (only one left: order's first batch), 6 % 5 = 1
    assert got == [[4, 2], [0, 3], [4, 2], [2, 0]]


def test_duplicate_key_and_false_negatives():
    texts = ["a", "b", "a", "c", "b", "a"]
    assert duplicate_key(texts) == [0, 1, 0, 3, 1, 0]
    fn = false_negatives([0, 1, 3, 0], {0: [3], 3: [1, 0]}, texts)
    assert fn == {0: [2, 3, 5], 1: [4], 3: [0, 1]}
    assert exclusion_matrix([3, 1], fn).tolist() == [[0, 1], [4, -1]]


def test_topk_overlap():
    ids = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    ref = torch.tensor([[4, 3, 9, 9], [8, 7, 6, 5]])
    assert topk_overlap(ids, ref) == pytest.approx((2 / 3 + 1) / 2)  # 9 twice is one id of the reference


def test_state_bytes_counts_each_storage_once():
    lin = torch.nn.Linear(8, 4)
    assert state_bytes(lin) == (8 * 4 + 4) * 4
    tied = torch.nn.Module()
    tied.a, tied.b = lin, torch.nn.Linear(8, 4)
    tied.b.weight = lin.weight  # one storage, two names
    assert state_bytes(tied) == (8 * 4 + 4 + 4) * 4
    assert state_bytes(torch.nn.Linear(8, 4).half()) == (8 * 4 + 4) * 2


def test_contrastive_loss_is_cross_entropy_over_one_pool():
    g = torch.Generator().manual_seed(0)
    q, d, n1, n2 = (F.normalize(torch.randn(6, 8, generator=g), dim=1) for _ in range(4))
    T = 0.05
    ref = F.cross_entropy(q @ torch.cat([d, n1, n2]).T / T, torch.arange(6))
    torch.testing.assert_close(contrastive_loss([q, d, n1, n2], T), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        contrastive_loss([q, d], T), F.cross_entropy(q @ d.T / T, torch.arange(6)), rtol=1e-5, atol=1e-5
    )
    # distillation: KL(teacher || student) over the pool, plus 1 - cosine of every text
    tq, td, tn1, tn2 = (F.normalize(x + 0.1, dim=1) for x in (q, d, n1, n2))
    pool, tpool = torch.cat([d, n1, n2]), torch.cat([td, tn1, tn2])
    p_t = torch.softmax(tq @ tpool.T / T, 1)
    kl = (p_t * (p_t.log() - torch.log_softmax(q @ pool.T / T, 1))).sum(1).mean()
    cos = 1 - (torch.cat([q, d, n1, n2]) * torch.cat([tq, td, tn1, tn2])).sum(1).mean()
    got = contrastive_loss([q, d, n1, n2], T, [tq, td, tn1, tn2], distill=0.5)
    torch.testing.assert_close(got, ref + 0.5 * (kl + cos), rtol=1e-4, atol=1e-5)
    assert contrastive_loss([q, d], T, [tq, td], distill=0.0) == contrastive_loss([q, d], T)


def test_tokenize_evaluate_and_encode_speed(tiny):
    _, tok, bert = tiny
    corpus, queries = _texts(30, 1), _texts(5, 2)
    batch = tokenize(tok, queries, max_length=4)
    assert batch["input_ids"].shape[0] == 5 and batch["input_ids"].shape[1] <= 4
    m, C, Q = evaluate(
        bert, tok, corpus, corpus[:5], [0, 1, 2, 3, 4], batch_size=8, max_length=8, k=10, ks=(10,)
    )
    assert C.shape == (30, 16) and Q.shape == (5, 16)
    # each query is a corpus text: it finds itself (or an identical text) first
    m_dup, _, _ = evaluate(
        bert, tok, corpus, corpus[:5], [0, 1, 2, 3, 4], duplicate_key(corpus), 8, 8, 10, (10,)
    )
    assert m_dup["mrr@10"] == pytest.approx(1.0) and m["recall@10"] == pytest.approx(1.0)
    assert m["corpus_docs_per_s"] > 0 and m["query_encode_per_s"] > 0
    cpu, wall = encode_speed({"a": bert, "b": bert}, tok, corpus, batch_size=16, max_length=8)
    assert list(cpu) == ["a", "b"] and list(wall) == ["a", "b"]
    assert all(v > 0 for v in (*cpu.values(), *wall.values()))


# ------------------------------------------------------------------ mining


def test_build_pq_index_flat_and_ivf():
    x = F.normalize(torch.randn(300, 16), dim=1).numpy()
    flat = build_pq_index(x, 4)
    ivf = build_pq_index(x, 4, nlist=8, keep_vectors=True)
    assert isinstance(flat, PQIndex) and isinstance(ivf, IVFPQIndex)
    assert flat.metric == ivf.metric == "ip" and flat.ntotal == ivf.ntotal == 300
    assert flat.m == 4 and ivf.nlist == 8 and ivf.keep_vectors and not flat.keep_vectors
    _, ids = flat.search(x[:5], 1)
    assert np.asarray(ids)[:, 0].tolist() == list(range(5))  # every vector finds itself first


class _Exact:
    """Brute-force inner-product index with hotops' search signature."""

    metric = "ip"

    def __init__(self, x):
        self.x = torch.as_tensor(x)

    def search(self, q, k):
        k = min(k, self.x.shape[0])
        d, i = torch.topk(torch.as_tensor(q) @ self.x.T, k, dim=1)
        return d.numpy(), i.numpy()


def test_hard_negative_refresh(tiny):
    corpus, queries = _texts(40, 3), _texts(12, 4)
    positives = torch.arange(12) * 3
    exclude = torch.stack([positives + 1, torch.full((12,), -1)], 1)
    built = []

    def build(x):
        built.append(x)
        return _Exact(x)

    model = _model(tiny)
    refresh = HardNegativeRefresh(corpus, queries, positives, exclude, build, n=3, depth=10, seed=5, name="t")
    got = refresh(model)
    assert got.shape == (12, 3) and got.dtype == torch.int64
    assert ((got >= 0) & (got < 40)).all()
    assert not (got == positives[:, None]).any() and not (got == (positives + 1)[:, None]).any()
    assert torch.equal(refresh.last, got) and len(refresh.timings) == 1
    assert set(refresh.timings[0]) == {"encode_s", "index_build_s", "mine_s", "mine_queries_per_s"}
    # the negatives are among each query's best `depth` non-excluded documents
    C = encode(model.bert, model.tokenizer, corpus)
    Q = encode(model.bert, model.tokenizer, queries)
    for i in range(12):
        s = Q[i] @ C.T
        s[[3 * i, 3 * i + 1]] = -float("inf")
        assert (s[got[i]] >= s.topk(10).values[-1] - 1e-6).all()
    # a fresh refresh with the same seed draws the same; given embeddings are what the index gets
    again = HardNegativeRefresh(corpus, queries, positives, exclude, build, n=3, depth=10, seed=5)
    assert torch.equal(again(model, C), got)
    assert torch.equal(torch.as_tensor(built[-1]), C)


def test_hard_negative_refresh_fills_missing_with_random_rows(tiny):
    corpus, queries = _texts(4, 5), _texts(3, 6)
    gen = torch.Generator().manual_seed(0)
    refresh = HardNegativeRefresh(
        corpus, queries, [0, 1, 2], [[1, 2], [0, 2], [0, 1]], _Exact, n=3, depth=3, fill_generator=gen
    )
    got = refresh(_model(tiny))  # one candidate left per query: two filled in at random
    assert got.shape == (3, 3) and ((got >= 0) & (got < 4)).all()
    assert got[:, 0].tolist() == [3, 3, 3]
    assert (got == 3).all()  # the fill never draws a positive or an excluded row either
    # with room, a filled-in row is not one of the query's negatives already; exclude may be (Q,)
    refresh = HardNegativeRefresh(_texts(12, 5), queries, [0, 1, 2], [3, 4, 5], _Exact, n=8, depth=8)
    got = refresh(_model(tiny))
    assert all(len(set(r)) == 8 and not {0, 3} & set(r) for r in got.tolist()[:1])
    assert all(len(set(r)) == 8 for r in got.tolist())


def test_hard_negative_refresh_refuses_lists_that_are_not_one_row_per_query(tiny):
    """positives and exclude were reshaped to (len(queries), -1): an (E, Q) exclude list or 2Q
    positives were read as other queries' rows and false negatives were mined."""
    corpus, queries = _texts(20, 5), _texts(4, 6)
    exclude = torch.tensor([[10, -1], [11, -1], [12, -1], [13, -1]])

    def make(pos, ex):
        return HardNegativeRefresh(corpus, queries, pos, ex, _Exact, n=2, depth=4)

    make([0, 1, 2, 3], exclude)
    with pytest.raises(ValueError, match=r"exclude must be \(4,\) or \(4, P\)"):
        make([0, 1, 2, 3], exclude.T.contiguous())
    for pos in (list(range(8)), [0, 1, 2]):
        with pytest.raises(ValueError, match=r"positives must be \(4,\) or \(4, P\)"):
            make(pos, None)
    with pytest.raises(ValueError, match="corpus rows in \\[0, 20\\)"):
        make([0, 1, 2, 20], None)
    with pytest.raises(ValueError, match="one row of ids per query"):
        make([0, 1, 2, 3], [[5], [6, 7], [8], [9]])
    with pytest.raises(TypeError, match="integer"):
        make([0.0, 1.0, 2.0, 3.0], None)


def test_hard_negative_refresh_checks_and_converts_given_corpus_embeddings(tiny):
    corpus, queries = _texts(20, 5), _texts(4, 6)
    model = _model(tiny)
    C = encode(model.bert, model.tokenizer, corpus)
    built = []

    def build(x):
        built.append(x)
        return _Exact(x)

    refresh = HardNegativeRefresh(corpus, queries, [0, 1, 2, 3], None, build, n=2, depth=4)
    ref = refresh(model, C)
    for given in (C.bfloat16(), C.clone().requires_grad_(), C.numpy()):
        got = refresh(model, given)
        assert built[-1].dtype == np.float32 and built[-1].shape == (20, C.shape[1])
        if not isinstance(given, torch.Tensor) or given.dtype == torch.float32:
            assert torch.equal(got, ref)
    with pytest.raises(ValueError, match=r"corpus_embeddings must be \(20, dim\)"):  # was accepted
        refresh(model, C[:15])
    with pytest.raises(TypeError, match="floating point"):
        refresh(model, C.to(torch.int64))


def test_hard_negative_refresh_fill_finds_the_few_allowed_rows(tiny):
    """Exclusions covering all but a few rows: the random draws missed them and the fill raised
    although allowed rows exist; now it draws among the enumerated allowed rows (seeded)."""
    N = 300
    corpus, queries = _texts(N, 5), _texts(2, 6)
    pos, allowed = [0, 1], [[10, 20, 30], [11]]
    exclude = torch.full((2, N), -1)
    for i, (p, a) in enumerate(zip(pos, allowed)):
        rest = [j for j in range(N) if j not in a and j != p]
        exclude[i, : len(rest)] = torch.tensor(rest)
    model = _model(tiny)
    for seed in range(3):
        refresh = HardNegativeRefresh(corpus, queries, pos, exclude, _Exact, n=5, depth=5, seed=seed)
        got = refresh(model)
        assert set(got[0].tolist()) == {10, 20, 30} and got[1].tolist() == [11] * 5
        again = HardNegativeRefresh(corpus, queries, pos, exclude, _Exact, n=5, depth=5, seed=seed)
        assert torch.equal(again(model), got)
    none_left = torch.tensor([[j for j in range(N) if j != p] for p in pos])
    with pytest.raises(ValueError, match="query 0 has no corpus row"):
        HardNegativeRefresh(corpus, queries, pos, none_left, _Exact, n=2, depth=2)(model)


# ------------------------------------------------------------------ training


def test_trainer_runs_the_schedule_with_refresh_and_after_step(tiny):
    corpus, queries = _texts(20, 7), _texts(8, 8)
    positives = list(range(8))
    trainer = ContrastiveTrainer(queries, positives, corpus, batch_schedule(torch.arange(8), 5, 4), lr=1e-3)
    model = _model(tiny)
    before = [p.detach().clone() for p in model.parameters()]
    negatives = torch.full((8, 2), 19)
    calls, refreshed = [], []

    def refresh(m):
        assert m is model and m.training
        refreshed.append(len(calls))
        return torch.full((8, 2), 18)

    out = trainer.run(
        model, "info_nce", 5, negatives=negatives, refresh=refresh, refresh_every=2, after_step=calls.append
    )
    assert out is model and not model.training
    assert calls == [1, 2, 3, 4, 5] and refreshed == [2, 4]  # before steps 3 and 5
    assert len(trainer.losses) == 5 and all(np.isfinite(trainer.losses))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ValueError, match="loss"):
        trainer.run(model, "st", 1)
    with pytest.raises(ValueError, match="positives"):
        ContrastiveTrainer(queries, positives[:3], corpus, [torch.arange(2)])


def test_trainer_refuses_rows_that_would_train_against_another_document(tiny):
    """A miner's -1 ("none found") or a row outside the corpus would index another text; lr=0.0
    is a learning rate, not "unset"; a batch of one with no negatives has nothing to contrast."""
    corpus, queries = _texts(20, 7), _texts(8, 8)
    trainer = ContrastiveTrainer(queries, list(range(8)), corpus, batch_schedule(torch.arange(8), 2, 4))
    model = _model(tiny)
    for bad in (torch.full((8, 2), -1), torch.full((8, 2), 20), torch.zeros(8, dtype=torch.int64)):
        with pytest.raises(ValueError, match="negatives must be"):
            trainer.run(model, "info_nce", 1, negatives=bad)
    with pytest.raises(ValueError, match="negatives must be"):  # a refresh's answer is checked too
        trainer.run(
            model,
            "info_nce",
            2,
            torch.zeros(8, 1, dtype=torch.int64),
            lambda m: -torch.ones(8, 1, dtype=torch.int64),
            1,
        )
    with pytest.raises(ValueError, match="refresh_every"):
        trainer.run(model, "info_nce", 2, refresh=lambda m: None, refresh_every=0)
    before = [p.detach().clone() for p in model.parameters()]
    trainer.run(model, "info_nce", 2, lr=0.0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ValueError, match="batch of one"):
        ContrastiveTrainer(queries, list(range(8)), corpus, batch_schedule(torch.arange(8), 2, 1)).run(
            model, "info_nce", 1
        )
    with pytest.raises(ValueError, match="schedule batch"):
        ContrastiveTrainer(queries, list(range(8)), corpus, [torch.tensor([0, 8])])
    with pytest.raises(ValueError, match="positives must be"):
        ContrastiveTrainer(queries, [-1] * 8, corpus, [torch.arange(2)])
    with pytest.raises(ValueError, match="batch <= len"):
        batch_schedule(torch.arange(3), 2, 5)


def test_evaluate_and_false_negative_helpers_refuse_what_they_cannot_answer(tiny):
    _, tok, bert = tiny
    corpus = _texts(30, 1)
    with pytest.raises(ValueError, match="k \\(10\\) must be at least"):
        evaluate(bert, tok, corpus, corpus[:5], [0, 1, 2, 3, 4], k=10)  # recall@100 from 10 results
    with pytest.raises(ValueError, match=r"rows of the corpus, in \[0, 30\)"):  # scored 0 silently
        evaluate(bert, tok, corpus, corpus[:2], [0, 30])
    with pytest.raises(ValueError, match="one corpus row per query"):
        evaluate(bert, tok, corpus, corpus[:2], [0, 1, 2])
    m, _, _ = evaluate(bert, tok, corpus, corpus[:2], [0, 1], ks=())  # MRR@10 alone
    assert "mrr@10" in m and not any(key.startswith("recall") for key in m)
    texts = ["a", "b", "a", "c"]
    as_list = false_negatives([0, 3, 0], {0: [3]}, texts)
    assert (
        false_negatives(torch.tensor([0, 3, 0]), {0: [torch.tensor(3)]}, texts)
        == as_list
        == {0: [2, 3], 3: []}
    )
    with pytest.raises(ValueError, match="not rows of texts"):
        false_negatives([-1], {}, texts)
    assert exclusion_matrix([0], {0: torch.tensor([2, 3])}).tolist() == [[2, 3]]


def test_encoder_calls_split_columns_only_where_padding_would_grow_attention(tiny):
    """One step's columns go through the unpadded encoder in one call, unless short queries
    beside long passages would pad attention far beyond the Linears' work: then one call per
    column, each trimmed to its own longest text, with the same embeddings."""
    from hotops.integrations import unpadded

    tok, bert = tiny[1], tiny[2]
    hidden = bert.config.hidden_size
    short, long = ["w1", "w2 w3"], [" ".join(WORDS[:30]), " ".join(WORDS[5:35])]
    mixed = tokenize(tok, short + long + long[::-1], 64)
    calls = encoder_calls(mixed, 2, hidden)
    widths = [int(mixed["attention_mask"][2 * c : 2 * c + 2].sum(1).max()) for c in range(3)]
    assert [tuple(c["input_ids"].shape) for c in calls] == [(2, w) for w in widths] and widths[0] < widths[1]
    for c, call in enumerate(calls):
        assert set(call) == set(mixed)
        assert torch.equal(call["input_ids"], mixed["input_ids"][2 * c : 2 * c + 2, : widths[c]])
    whole = unpadded.mean_pooled(bert, mixed)
    torch.testing.assert_close(torch.cat([unpadded.mean_pooled(bert, x) for x in calls]), whole)
    alike = tokenize(tok, long * 3, 64)
    calls = encoder_calls(alike, 2, hidden)
    assert len(calls) == 1 and calls[0] is alike
    assert len(encoder_calls(tokenize(tok, long * 2 + short * 2, 64), 4, hidden)) == 2
    with pytest.raises(ValueError, match="columns of 4"):
        encoder_calls(mixed, 4, hidden)


def test_trainer_with_split_calls_and_a_teacher_trains_as_the_padded_forward(tiny):
    """Short queries beside 30-word documents: the unpadded step runs one call per column (for
    the student and the teacher), and two steps give the padded forward's losses and weights."""
    g = np.random.default_rng(13)
    queries, corpus = ["w1", "w2 w3", "w4", "w5"], [" ".join(g.choice(WORDS, 30)) for _ in range(12)]
    negatives, teacher = torch.tensor([[8], [9], [10], [11]]), _model(tiny).bert.eval()
    together = tokenize(tiny[1], queries + corpus[:4] + corpus[8:], 64)
    assert len(encoder_calls(together, 4, tiny[2].config.hidden_size)) == 3
    runs = []
    for unpadded in (True, False):
        trainer = ContrastiveTrainer(
            queries, [0, 1, 2, 3], corpus, [torch.arange(4)], max_length=64, lr=1e-2, unpadded=unpadded
        )
        model = _model(tiny)
        trainer.run(model, "info_nce", 2, negatives=negatives, teacher=teacher, distill=1.0)
        runs.append((trainer.losses, torch.cat([p.detach().flatten() for p in model.parameters()])))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-5)
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=0, atol=1e-4)


def test_trainer_distillation_from_itself_adds_nothing_at_the_start(tiny):
    corpus, queries = _texts(16, 9), _texts(4, 10)
    schedule = [torch.arange(4)]
    teacher = _model(tiny).bert.eval()
    losses = []
    for distill in (0.0, 1.0):
        trainer = ContrastiveTrainer(queries, [0, 1, 2, 3], corpus, schedule)
        trainer.run(
            _model(tiny), "info_nce", 1, negatives=torch.full((4, 1), 9), teacher=teacher, distill=distill
        )
        losses.append(trainer.losses[0])
    # the student is the teacher (no dropout): KL 0 and cosine 1 before the first update
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)


def test_info_nce_and_mnrl_compute_the_same_loss(tiny):
    """The 'info_nce' loss (hotops) is sentence-transformers' MNRL at scale 1 / temperature: the same
    first-step loss on the same batch, with in-batch negatives and with mined ones."""
    pytest.importorskip("sentence_transformers")
    try:
        from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.models import Normalize, Pooling, Transformer
    from sentence_transformers import SentenceTransformer

    corpus, queries, positives = _texts(24, 11), _texts(6, 12), [1, 3, 5, 7, 9, 11]
    for negatives in (None, torch.tensor([[0, 2]] * 3 + [[4, 6]] * 3)):
        first, after = {}, {}
        # unpadded: every column in one call; padded: one call per column, as MNRL
        for loss, unpadded in (("info_nce", True), ("info_nce", False), ("mnrl", True)):
            trainer = ContrastiveTrainer(
                queries, positives, corpus, [torch.arange(6)], max_length=8, unpadded=unpadded, lr=1e-2
            )
            st = SentenceTransformer(
                modules=[Transformer(tiny[0], max_seq_length=8), Pooling(16, "mean"), Normalize()],
                device="cpu",
            )
            trainer.run(st, loss, 2, negatives=negatives)
            first[loss, unpadded] = trainer.losses[0]
            after[loss, unpadded] = torch.cat([p.detach().flatten() for p in st.parameters()])
        start = torch.cat([p.detach().flatten() for p in tiny[2].parameters()])
        assert (after["info_nce", True] - start).abs().max() > 1e-3  # the second step moved the weights
        for key in (("info_nce", False), ("mnrl", True)):
            assert first["info_nce", True] == pytest.approx(first[key], rel=1e-4)
            # Adam divides by |grad|: near-zero gradients amplify rounding to ~1 % of a step (lr 1e-2)
            torch.testing.assert_close(after["info_nce", True], after[key], rtol=0, atol=1e-4)


def test_inputs_that_returned_wrong_numbers_are_refused(tiny):
    """Each of these returned a number, or nothing, without an error: a negative doc_key matched
    the -1 of an empty result (MRR 1.0 for no results), tensor keys of `related` were never found
    (nothing excluded), batch_size -1 made encode return None, max_length 0 turned truncation off,
    an interval of 0 made PeakRSS's sampler spin."""
    from hotops.retrieval import PeakRSS, rank_metrics

    _, tok, bert = tiny
    with pytest.raises(ValueError, match="doc_key must hold keys >= 0"):
        rank_metrics([[-1, -1]], [0], doc_key=[-1, 5], ks=(2,))
    with pytest.raises(ValueError, match="doc_key has 2 keys, fewer than the corpus's 3 rows"):
        rank_metrics([[0, 1]], [0], doc_key=[0, 1], ks=(2,), n_docs=3)
    related = {torch.tensor(0): [3]}
    assert false_negatives([0], related, ["a", "b", "c", "d"]) == {0: [3]}
    assert exclusion_matrix([0], related).tolist() == [[3]]
    corpus = _texts(4, 1)
    for kw, says in (
        ({"batch_size": -1}, "batch_size"),
        ({"batch_size": 0}, "batch_size"),
        ({"max_length": 0}, "max_length"),
    ):
        with pytest.raises(ValueError, match=says):
            encode(bert, tok, corpus, **kw)
    with pytest.raises(ValueError, match="max_length"):
        tokenize(tok, corpus, 0)
    with pytest.raises(TypeError, match="one str"):
        encode(bert, tok, "hello")
    for interval in (0, -1, float("nan")):
        with pytest.raises(ValueError, match="interval"):
            PeakRSS(interval)


def test_trainer_refuses_settings_it_used_to_ignore_and_stops_on_a_nan_loss(tiny):
    """lr=inf trained to NaN weights and returned; distillation without a teacher, with NaN or
    negative weight, or with loss='mnrl' ran without it; a teacher of another width failed in a
    broadcast; a train-mode teacher gave dropout-noised targets; an interrupted run left the
    model in train mode."""
    corpus, queries = _texts(16, 9), _texts(4, 10)
    schedule = [torch.arange(4)]
    negatives = torch.full((4, 1), 9)
    with pytest.raises(ValueError, match="lr"):
        ContrastiveTrainer(queries, [0, 1, 2, 3], corpus, schedule, lr=float("inf"))
    trainer = ContrastiveTrainer(queries, [0, 1, 2, 3], corpus, schedule)
    model, teacher = _model(tiny), _model(tiny).bert
    with pytest.raises(ValueError, match="lr"):
        trainer.run(model, "info_nce", 1, negatives=negatives, lr=float("inf"))
    for distill, says in ((float("nan"), "distill"), (-1.0, "distill")):
        with pytest.raises(ValueError, match=says):
            trainer.run(model, "info_nce", 1, negatives=negatives, teacher=teacher, distill=distill)
    with pytest.raises(ValueError, match="needs a teacher"):
        trainer.run(model, "info_nce", 1, negatives=negatives, distill=1.0)
    with pytest.raises(ValueError, match="loss='info_nce' only"):
        trainer.run(model, "mnrl", 1, negatives=negatives, teacher=teacher, distill=1.0)

    # the hooks below see the models' forward calls: the padded path makes them
    trainer = ContrastiveTrainer(queries, [0, 1, 2, 3], corpus, schedule, unpadded=False)
    # the teacher runs in eval mode and gets its own mode back
    seen = []
    teacher.train()
    hook = teacher.register_forward_pre_hook(lambda m, a: seen.append(m.training))
    trainer.run(model, "info_nce", 1, negatives=negatives, teacher=teacher, distill=1.0)
    hook.remove()
    assert seen and not any(seen) and teacher.training

    wide = copy.deepcopy(teacher)
    wide.register_forward_hook(lambda m, a, out: type(out)(last_hidden_state=torch.cat([out[0], out[0]], -1)))
    with pytest.raises(ValueError, match="the teacher embeds in 32 dimensions, the model in 16"):
        trainer.run(model, "info_nce", 1, negatives=negatives, teacher=wide, distill=1.0)

    # a NaN loss stops the run before its step changes the weights
    before = [p.detach().clone() for p in model.parameters()]
    nan = model.bert.register_forward_hook(
        lambda m, a, out: type(out)(last_hidden_state=out[0] * float("nan"))
    )
    with pytest.raises(FloatingPointError, match="the loss of step 1 is nan"):
        trainer.run(model, "info_nce", 2, negatives=negatives)
    nan.remove()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())) and not model.training

    def interrupt(step):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trainer.run(model, "info_nce", 2, negatives=negatives, after_step=interrupt)
    assert not model.training


def test_hard_negative_refresh_refuses_n_and_depth_before_encoding(tiny):
    """n > depth, n = 0 and a batch_size of 0 were refused only at the first refresh, after the
    corpus was encoded and the index built."""
    corpus, queries = _texts(20, 7), _texts(4, 8)

    def build(x):
        raise AssertionError("built an index before refusing")

    for kw, says in (({"n": 5, "depth": 3}, "depth"), ({"n": 0}, "n"), ({"batch_size": 0}, "batch_size")):
        with pytest.raises(ValueError, match=says):
            HardNegativeRefresh(corpus, queries, [0, 1, 2, 3], None, build, **kw)


def test_retrieval_helpers_refuse_what_failed_deep_inside(tiny):
    """A tokenizer bigger than the model's embedding table failed with torch's bare IndexError,
    an empty or 2-d schedule batch with "list index out of range", a sparse buffer in
    state_bytes with "Cannot access storage"; batch_schedule took an order with repeats."""
    _, tok, bert = tiny
    small = copy.deepcopy(bert)
    small.set_input_embeddings(torch.nn.Embedding(len(tok) - 1, small.config.hidden_size))
    corpus, queries = _texts(8, 7), _texts(4, 8)
    with pytest.raises(ValueError, match="do not belong together"):
        encode(small, tok, corpus)
    with pytest.raises(ValueError, match="do not belong together"):
        ContrastiveTrainer(queries, [0, 1, 2, 3], corpus, [torch.arange(4)]).run(
            _Model(small, tok), "info_nce", 1
        )
    for bad in (torch.tensor([], dtype=torch.int64), torch.arange(4).reshape(2, 2)):
        with pytest.raises(ValueError, match="non-empty 1-d"):
            ContrastiveTrainer(queries, [0, 1, 2, 3], corpus, [bad])
    with pytest.raises(ValueError, match="permutation"):
        batch_schedule(torch.tensor([0, 0, 0, 0]), 2, 2)
    m = torch.nn.Module()
    m.register_buffer("coo", torch.eye(4).to_sparse())
    with warnings.catch_warnings():  # torch: "Sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        m.register_buffer("csr", torch.eye(4).to_sparse_csr())
    assert state_bytes(m) == (4 * 4 + 2 * 4 * 8) + (4 * 4 + 5 * 8 + 4 * 8)


def test_exact_search_scores_half_precision_in_float32_and_overlap_counts_ids_once():
    from hotops.retrieval import exact_search

    g = torch.Generator().manual_seed(0)
    corpus, q = torch.randn(2000, 32, generator=g), torch.randn(20, 32, generator=g)
    for dt in (torch.float16, torch.bfloat16):
        cq, qq = corpus.to(dt), q.to(dt)
        want = torch.topk(qq.float() @ cq.float().T, 10).indices
        got = exact_search(qq, cq, 10)
        assert torch.equal(got, want)  # bfloat16 scores tied most of these orders
    assert topk_overlap([[2, 2]], [[2, 2]]) == 1.0
    with pytest.raises(ValueError, match="no rows"):
        topk_overlap(np.empty((0, 3)), np.empty((0, 3)))
