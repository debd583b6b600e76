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
