"""WordNet synsets as a retrieval task (Debian `wordnet-base`, read from its data.* files).

A synset's gloss is its definition followed by quoted usage examples::

    the act of buying; "buying and selling fill their days"; "shrewd purchasing requires ..."

`synsets()` parses every synset into its lemmas, definition and examples; `retrieval_split()`
turns them into a query -> document task: the queries are the usage examples, the document of a
query is its synset's definition, the corpus is every definition, and the split is by synset (no
held-out synset is seen in training).
"""

from __future__ import annotations

import os
import random
import re
from typing import Dict, List, NamedTuple, Optional, Sequence

from hotops._backend import check_number

WORDNET_DIR = "/usr/share/wordnet"
POS_FILES = ("noun", "verb", "adj", "adv")
_QUOTED = re.compile(r'"([^"]*)"')


class Synset(NamedTuple):
    key: str  # "<pos>:<offset>", unique
    pos: str  # n, v, a, s, r
    lemmas: List[str]  # lower-case, spaces for underscores, (a)/(p) markers dropped
    definition: str
    examples: List[str]


class RetrievalSplit(NamedTuple):
    corpus: List[str]  # every definition, row i is synset i
    synsets: List[Synset]
    train_queries: List[str]
    train_docs: List[int]  # row of the query's synset
    test_queries: List[str]
    test_docs: List[int]
    related: Dict[int, List[int]]  # synset row -> rows of the other senses of its lemmas


def _root(root: Optional[str]) -> str:
    """root, or the module's WORDNET_DIR as it is now (setting it redirects every loader)."""
    return WORDNET_DIR if root is None else root


def available(root: Optional[str] = None) -> bool:
    """Whether the four data files are under root (default: WORDNET_DIR, read at call time)."""
    root = _root(root)
    return all(os.path.exists(os.path.join(root, f"data.{p}")) for p in POS_FILES)


def parse_gloss(gloss: str):
    """(definition, examples) of a gloss: the quoted parts are the examples, the rest (trailing
    separators trimmed) the definition."""
    examples = [e.strip() for e in _QUOTED.findall(gloss) if len(e.strip()) > 0]
    definition = _QUOTED.sub("", gloss)
    definition = re.sub(r"(\s*;\s*)+", "; ", definition).strip(" ;-:,")
    return definition, examples


def synsets(root: Optional[str] = None) -> List[Synset]:
    """Every synset of the four data files under root (default: WORDNET_DIR, read at call time),
    in file order."""
    root = _root(root)
    if not available(root):
        raise FileNotFoundError(f"WordNet data files are missing under {root}: apt-get install wordnet-base")
    out = []
    for name in POS_FILES:
        with open(os.path.join(root, f"data.{name}"), encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  ") or "|" not in line:
                    continue
                head, gloss = line.split("|", 1)
                fields = head.split()
                offset, pos, n = fields[0], fields[2], int(fields[3], 16)
                lemmas = [
                    re.sub(r"\([a-z]+\)$", "", w).replace("_", " ").lower() for w in fields[4 : 4 + 2 * n : 2]
                ]
                definition, examples = parse_gloss(gloss.strip())
                out.append(Synset(f"{pos}:{offset}", pos, lemmas, definition, examples))
    return out


def retrieval_split(
    n_test_synsets: int = 2000,
    n_train_queries: Optional[int] = None,
    n_test_queries: Optional[int] = None,
    corpus_size: Optional[int] = None,
    seed: int = 0,
    max_related: int = 64,
    root: Optional[str] = None,
    all_synsets: Optional[Sequence[Synset]] = None,
) -> RetrievalSplit:
    """Usage examples -> definitions, split by synset.

    `n_test_synsets` synsets that have examples are held out (all their examples are test
    queries, capped at `n_test_queries`); the examples of every other synset are training
    queries (a seeded sample of `n_train_queries`). The corpus is every definition, or, with
    `corpus_size`, the definitions of every query's synset plus seeded random others up to that
    size (for quick runs). `related[i]` lists the other synsets sharing a lemma with synset i
    (at most `max_related`): the false negatives a miner should skip. The synsets are
    `all_synsets`, or read by `synsets(root)` (root None: WORDNET_DIR at call time).
    """
    # a negative count would slice from the end; a float one fails later, in slicing
    n_test_synsets = check_number(n_test_synsets, "n_test_synsets", integer=True, low=0)
    if n_train_queries is not None:
        n_train_queries = check_number(n_train_queries, "n_train_queries", integer=True, low=0)
    if n_test_queries is not None:
        n_test_queries = check_number(n_test_queries, "n_test_queries", integer=True, low=0)
    if corpus_size is not None:  # a negative one sliced from the end, a float one failed in slicing
        corpus_size = check_number(corpus_size, "corpus_size", integer=True, low=1)
    max_related = check_number(max_related, "max_related", integer=True, low=0)
    rng = random.Random(seed)
    syn = list(all_synsets) if all_synsets is not None else synsets(root)
    with_ex = [i for i, s in enumerate(syn) if s.examples]
    if n_test_synsets > len(with_ex):
        raise ValueError(f"n_test_synsets {n_test_synsets}: only {len(with_ex)} synsets have usage examples")
    rng.shuffle(with_ex)
    test_syn = with_ex[:n_test_synsets]
    train_syn = with_ex[n_test_synsets:]
    test = [(e, i) for i in test_syn for e in syn[i].examples]
    train = [(e, i) for i in train_syn for e in syn[i].examples]
    rng.shuffle(test)
    rng.shuffle(train)
    if n_test_queries is not None:
        test = test[:n_test_queries]
    if n_train_queries is not None:
        train = train[:n_train_queries]
    keep = list(range(len(syn)))
    if corpus_size is not None and corpus_size < len(syn):
        need = sorted({i for _, i in test} | {i for _, i in train})
        if len(need) > corpus_size:
            raise ValueError(
                f"corpus_size {corpus_size} is smaller than the {len(need)} synsets the queries need"
            )
        needed = set(need)
        others = [i for i in range(len(syn)) if i not in needed]
        rng.shuffle(others)
        keep = sorted(need + others[: corpus_size - len(need)])
    row = {i: r for r, i in enumerate(keep)}
    kept = [syn[i] for i in keep]
    by_lemma: Dict[str, List[int]] = {}
    for r, s in enumerate(kept):
        for lem in s.lemmas:
            by_lemma.setdefault(lem, []).append(r)
    related = {}
    for r, s in enumerate(kept):
        rel = sorted({o for lem in s.lemmas for o in by_lemma[lem]} - {r})
        related[r] = rel[:max_related]
    return RetrievalSplit(
        [s.definition for s in kept],
        kept,
        [e for e, _ in train],
        [row[i] for _, i in train],
        [e for e, _ in test],
        [row[i] for _, i in test],
        related,
    )
