"""Kinds of English text that install with a Debian system and Python, as lists of short texts
(sentences or one-sentence paragraphs): evaluation and calibration sets for sentence encoders.

=============  =====================================================================  ======================
name           what                                                                   read from
=============  =====================================================================  ======================
``glosses``    WordNet glosses: a definition and its quoted usage examples            ``/usr/share/wordnet``
``usage``      WordNet usage examples alone: everyday sentences                       ``/usr/share/wordnet``
``docstrings`` Python standard-library docstrings, first paragraph: API documentation  the running Python
``man``        manual pages (sections 1, 5, 8), prose sentences                       ``/usr/share/man``
``info``       GNU Texinfo manuals (coreutils, find, ...), prose sentences            ``/usr/share/info``
``licenses``   the common free-software licence texts, sentences                      ``/usr/share/common-licenses``
``readme``     installed Python packages' READMEs (PyPI descriptions), prose sentences site-packages' METADATA
=============  =====================================================================  ======================

``load(name, limit, seed)`` returns up to `limit` distinct texts of one kind, shuffled with `seed`
(a missing source raises FileNotFoundError; ``available(name)`` says whether it is there).
``mixture(names, n, seed)`` draws `n` texts spread evenly over several kinds (fewer where a kind
holds less than its share). Markup (roff,
Texinfo, Markdown) is stripped and only prose sentences of 6 to 60 words are kept, so every
kind is plain English of a similar length; the texts differ in vocabulary and register.
"""

from __future__ import annotations

import ast
import glob
import gzip
import os
import random
import re
import sysconfig
from typing import Callable, Dict, Iterable, Iterator, List, Sequence, Tuple

from hotops._backend import check_number
from hotops.data import wordnet

MIN_WORDS, MAX_WORDS = 6, 60
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'])")
_SPACES = re.compile(r"\s+")


def _sentences(paragraph: str) -> Iterator[str]:
    """The prose sentences of a paragraph: 6-60 words, mostly letters, ending like a sentence."""
    for s in _SENTENCE_END.split(_SPACES.sub(" ", paragraph).strip()):
        words = s.split()
        if not MIN_WORDS <= len(words) <= MAX_WORDS or s[-1] not in ".!?:":
            continue
        letters = sum(c.isalpha() or c == " " for c in s)
        if letters < 0.85 * len(s) or not s[0].isupper():
            continue
        yield s


def _open_text(path: str) -> str:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            return f.read()
    except (OSError, EOFError):
        return ""


# ---------------------------------------------------------------- WordNet


def glosses() -> List[str]:
    """Every WordNet gloss line (definition; "example"; ...), in file order."""
    texts = []
    for pos in wordnet.POS_FILES:
        path = os.path.join(wordnet.WORDNET_DIR, f"data.{pos}")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} is missing: apt-get install wordnet-base")
        with open(path, encoding="utf-8", errors="replace") as f:
            texts += [
                line.split("|", 1)[1].strip() for line in f if not line.startswith("  ") and "|" in line
            ]
    return texts


def usage_examples(gloss_lines: Iterable[str]) -> List[str]:
    """The usage examples (at least 4 words) quoted in the given gloss lines: give it glosses that
    no calibration set holds and the examples are unseen text."""
    return [e for g in gloss_lines for e in wordnet.parse_gloss(g)[1] if len(e.split()) >= 4]


# ---------------------------------------------------------------- Python docstrings


def docstrings(root: str = "") -> List[str]:
    """First paragraphs of the module, class and function docstrings of the standard library
    (tests, idlelib and site-packages left out), one sentence or short paragraph each."""
    root = root or sysconfig.get_paths()["stdlib"]
    if not os.path.isdir(root):
        raise FileNotFoundError(f"no standard library under {root}")
    out = []
    for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
        rel = os.path.relpath(path, root)
        if any(p in rel.split(os.sep) for p in ("test", "tests", "idlelib", "site-packages", "lib2to3")):
            continue
        try:
            tree = ast.parse(_open_text(path))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    out += list(_sentences(doc.split("\n\n")[0]))
    return out


# ---------------------------------------------------------------- manual pages and info manuals

_ROFF_ESCAPES = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),  # font changes
    (re.compile(r"\\\*(\[[^\]]*\]|\(..|.)"), ""),  # strings
    (re.compile(r"\\\((aq|cq)"), "'"),
    (re.compile(r"\\\((lq|rq|dq)"), '"'),
    (re.compile(r"\\\((em|en|hy)"), "-"),
    (re.compile(r"\\\(..|\\\[[^\]]*\]"), ""),
    (re.compile(r"\\[-&:%]"), lambda m: "-" if m.group(0) == "\\-" else ""),
    (re.compile(r"\\[ e~0|^]"), " "),
    (re.compile(r'\\".*'), ""),  # comments
    (re.compile(r"\\s[-+]?\d"), ""),
]


def _roff_paragraphs(text: str) -> Iterator[str]:
    para: List[str] = []
    for line in text.splitlines():
        if line.startswith((".", "'")):
            macro = line[1:3].strip()
            if macro in ("B", "I", "BR", "IR", "RB", "RI", "BI", "IB", "SM") and para:
                para.append(line.split(None, 1)[1] if " " in line else "")
                continue
            if para:
                yield " ".join(para)
            para = []
            continue
        for pattern, repl in _ROFF_ESCAPES:
            line = pattern.sub(repl, line)
        if line.strip():
            para.append(line.strip().replace('"', ""))
    if para:
        yield " ".join(para)


def man_pages(
    root: str = "/usr/share/man", sections: Sequence[str] = ("1", "5", "8"), max_pages: int = 2000
) -> List[str]:
    """Prose sentences of the English manual pages (pages that are links to others skipped),
    from at most `max_pages` pages spread evenly over the sorted list (reading them all takes
    a minute)."""
    paths = sorted(p for s in sections for p in glob.glob(os.path.join(root, f"man{s}", "*")))
    if not paths:
        raise FileNotFoundError(f"no manual pages under {root}")
    paths = paths[:: max(1, -(-len(paths) // max_pages))]
    out = []
    for path in paths:
        text = _open_text(path)
        if text.startswith(".so "):
            continue
        for para in _roff_paragraphs(text):
            out += list(_sentences(para))
    return out


def info_manuals(root: str = "/usr/share/info") -> List[str]:
    """Prose sentences of the Texinfo manuals (menus, node headers and indented examples
    dropped)."""
    paths = sorted(glob.glob(os.path.join(root, "*.info*")))
    if not paths:
        raise FileNotFoundError(f"no info manuals under {root}")
    out = []
    for path in paths:
        for block in re.split(r"\n\s*\n|\x1f", _open_text(path)):
            lines = block.splitlines()
            if not lines or lines[0].startswith(("File:", "* ", "Tag Table", "   ", "\t")):
                continue
            out += list(_sentences(" ".join(l.strip() for l in lines).replace("'", "'").replace("`", "'")))
    return out


# ---------------------------------------------------------------- licences and READMEs


def licenses(root: str = "/usr/share/common-licenses") -> List[str]:
    """Sentences of the common licence texts (GPL, Apache, MPL, Artistic, ...)."""
    paths = sorted(p for p in glob.glob(os.path.join(root, "*")) if os.path.isfile(p))
    if not paths:
        raise FileNotFoundError(f"no licence texts under {root}")
    out = []
    for path in paths:
        for block in re.split(r"\n\s*\n", _open_text(path)):
            out += list(_sentences(block))
    return out


_MD_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")
_MD_MARK = re.compile(r"[*_`]+|<[^>]+>")


def readmes(root: str = "") -> List[str]:
    """Prose sentences of the installed packages' long descriptions (their README, from the
    METADATA of each dist-info): headings, lists, tables and code blocks dropped."""
    root = root or sysconfig.get_paths()["purelib"]
    paths = sorted(glob.glob(os.path.join(root, "*.dist-info", "METADATA")))
    if not paths:
        raise FileNotFoundError(f"no package METADATA under {root}")
    out = []
    for path in paths:
        text = _open_text(path)
        body = text.split("\n\n", 1)[1] if "\n\n" in text else ""
        body = re.sub(r"```.*?```", "", body, flags=re.S)
        for block in re.split(r"\n\s*\n", body):
            lines = [l for l in block.splitlines() if l.strip()]
            if not lines or lines[0].lstrip().startswith(("#", "|", "-", "*", ">", "    ", "..", ":", "=")):
                continue
            block = _MD_MARK.sub("", _MD_LINK.sub(r"\1", " ".join(lines)))
            out += list(_sentences(block))
    return out


# ---------------------------------------------------------------- access by name

SOURCES: Dict[str, Callable[[], List[str]]] = {
    "glosses": glosses,
    "usage": lambda: usage_examples(glosses()),
    "docstrings": docstrings,
    "man": man_pages,
    "info": info_manuals,
    "licenses": licenses,
    "readme": readmes,
}
# keyed by WordNet's directory too: glosses and usage follow wordnet.WORDNET_DIR when it is changed
_CACHE: Dict[Tuple[str, str], List[str]] = {}


def available(name: str) -> bool:
    try:
        return bool(_all(name))
    except FileNotFoundError:
        return False


def _all(name: str) -> List[str]:
    if name not in SOURCES:
        raise ValueError(f"unknown text set {name!r}; known: {', '.join(SOURCES)}")
    key = (name, wordnet.WORDNET_DIR)
    if key not in _CACHE:
        _CACHE[key] = list(dict.fromkeys(SOURCES[name]()))  # distinct, first occurrence kept
    return _CACHE[key]


def load(name: str, limit: int, seed: int = 0, exclude: Iterable[str] = ()) -> List[str]:
    """Up to `limit` distinct texts of kind `name`, shuffled with `seed`, none in `exclude`."""
    limit = check_number(limit, "limit", integer=True, low=0)  # a negative one sliced from the end
    skip = set(exclude)
    texts = [t for t in _all(name) if t not in skip]
    random.Random(seed).shuffle(texts)
    return texts[:limit]


def mixture(names: Sequence[str], n: int, seed: int = 0, exclude: Iterable[str] = ()) -> List[str]:
    """`n` texts drawn evenly from the kinds `names` (the first kinds take the remainder),
    shuffled together with `seed`. A kind holding fewer texts than its share gives all it has
    (others do not make up for it), so fewer than `n` texts come back then."""
    if not names:
        raise ValueError("mixture needs at least one text set")
    if len(set(names)) != len(names):  # each would draw the same texts with the same seed
        raise ValueError(f"mixture: a kind is named twice in {list(names)}")
    n = check_number(n, "n", integer=True, low=0)
    out = []
    for i, name in enumerate(names):
        share = n // len(names) + (i < n % len(names))
        out += load(name, share, seed, exclude)
    random.Random(seed).shuffle(out)
    return out
