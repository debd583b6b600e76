"""hotops.data.text_sets: the kinds of English text used to calibrate and evaluate compressed
sentence encoders (each test skips when its source is not installed)."""

import pytest

from hotops.data import text_sets


def test_sentences_keep_prose_only():
    para = "Short one. This sentence has enough words to be kept as prose. Then x = f(a, b) + g[c] * 2 / h."
    assert list(text_sets._sentences(para)) == ["This sentence has enough words to be kept as prose."]


def test_roff_markup_is_stripped():
    page = ".TH LS 1\n.SH DESCRIPTION\nList information about the \\fBFILE\\fRs (the current\ndirectory by default)\\(em sorted.\n.PP\nNext."
    paras = list(text_sets._roff_paragraphs(page))
    assert paras[0] == "List information about the FILEs (the current directory by default)- sorted."


def test_usage_examples_come_from_the_given_glosses():
    gloss = 'move fast; "he runs every morning to the park"; "run!"'
    assert text_sets.usage_examples([gloss]) == ["he runs every morning to the park"]


@pytest.mark.parametrize("name", ["usage", "licenses", "readme", "info"])
def test_load_is_seeded_distinct_and_excludes(name):
    if not text_sets.available(name):
        pytest.skip(f"{name}: source not installed")
    a = text_sets.load(name, 50, seed=3)
    assert a == text_sets.load(name, 50, seed=3) and len(set(a)) == len(a) > 0
    assert a != text_sets.load(name, 50, seed=4)
    assert not set(a[:10]) & set(text_sets.load(name, 50, seed=3, exclude=a[:10]))
    if name != "usage":
        assert all(text_sets.MIN_WORDS <= len(t.split()) <= text_sets.MAX_WORDS for t in a)


def test_mixture_spreads_evenly():
    names = [n for n in ("usage", "licenses") if text_sets.available(n)]
    if len(names) < 2:
        pytest.skip("WordNet or the common licences are not installed")
    mix = text_sets.mixture(names, 11, seed=0)
    assert len(mix) == 11
    assert sum(t in set(text_sets.load("usage", 6, 0)) for t in mix) == 6


def test_docstrings_of_one_package():
    import json
    import os

    docs = text_sets.docstrings(os.path.dirname(json.__file__))
    assert len(docs) > 5 and any("JSON" in d for d in docs)


def test_unknown_set_is_named():
    with pytest.raises(ValueError, match="unknown text set 'nope'"):
        text_sets.load("nope", 1)


def test_compress_example_keeps_evaluation_text_out_of_calibration():
    """examples/compress_minilm.py's split: the calibration holds no evaluation text, and the
    usage examples come from glosses that neither the calibration nor the evaluation holds."""
    import importlib.util
    import pathlib

    if not (text_sets.available("licenses") and text_sets.available("glosses")):
        pytest.skip("WordNet or the common licences are not installed")
    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "compress_minilm.py"
    spec = importlib.util.spec_from_file_location("compress_minilm", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    calib, evals = example.text_split(
        ["glosses", "licenses"], ["glosses", "usage", "licenses"], 41, n_eval=50, n_eval_other=30
    )
    assert len(calib) == 41 and [len(v) for v in evals.values()] == [50, 30, 30]
    assert not set(calib) & {t for v in evals.values() for t in v}
    assert not any(e in g for e in evals["usage"] for g in calib + evals["glosses"])
    assert sum(t in set(text_sets.load("licenses", 10**6)) for t in calib) == 20


def test_counts_are_checked_before_any_text_is_read():
    """A negative count sliced from the end (load(..., -3) gave all texts but 3); a kind named
    twice drew the same texts twice with the same seed."""
    with pytest.raises(ValueError, match="limit must be >= 0"):
        text_sets.load("glosses", -3)
    with pytest.raises(ValueError, match="n must be >= 0"):
        text_sets.mixture(["glosses", "usage"], -4)
    with pytest.raises(ValueError, match="named twice"):
        text_sets.mixture(["glosses", "glosses"], 10)
