"""A tiny random-init BERT over a word vocabulary, saved like a Hugging Face model folder, for tests
of sentence encoders that must not download anything."""

from __future__ import annotations

import pathlib
from typing import Sequence


def save_tiny_bert(folder, words: Sequence[str], **config) -> str:
    """Saves to `folder` a BertModel (seed 0, no dropout; `config`: BertConfig sizes, by default one
    layer of width 16 with 2 heads) and its fast tokenizer, whose vocabulary is [PAD] [UNK] [CLS]
    [SEP] [MASK] then `words`. Returns the folder."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = pathlib.Path(folder)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # the vocabulary file positionally: transformers 5 names the argument `vocab` and drops an
    # unknown `vocab_file=` silently, leaving a tokenizer that maps every word to [UNK]
    BertTokenizerFast(str(folder / "vocab.txt")).save_pretrained(str(folder))
    sizes = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **{**sizes, **config},
    )
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(str(folder))
    return str(folder)
