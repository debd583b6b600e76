"""The distributed build of a ShardedIndex (build_sharded) and what shards must share: the
fingerprint of the trained quantizers, their state broadcast from rank 0, the manifest format."""

from __future__ import annotations

import hashlib
import json
import os
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch.distributed as dist

from hotops.ann import _arrays
from hotops.ann.bigran import BiGranularIndex
from hotops.ann.index import IVFPQIndex, PQIndex

if TYPE_CHECKING:  # pragma: no cover
    from hotops.ann.sharded import ShardedIndex

MANIFEST_FORMAT = "hotops-sharded-index"
MANIFEST_VERSION = 1


def trained_fingerprint(index) -> str:
    """sha256 of what shards must share: kind, parameters, PQ codebooks and coarse centroids."""
    index = index.coarse if isinstance(index, BiGranularIndex) else index
    h = hashlib.sha256()
    h.update(json.dumps([type(index).__name__, index._params()], sort_keys=True).encode())
    for a in (index.codebooks, getattr(index, "coarse", None)):
        if a is not None:
            h.update(np.ascontiguousarray(a, dtype=np.float32).tobytes())
    return h.hexdigest()


def _trained_state(index) -> dict:
    state = {"codebooks": np.asarray(index.codebooks)}
    if isinstance(index, IVFPQIndex):
        state["coarse"] = np.asarray(index.coarse)
    return state


def _set_trained_state(index, state: dict) -> None:
    if isinstance(index, IVFPQIndex):
        coarse = np.array(state["coarse"], dtype=np.float32, order="C")
        if coarse.shape != (index.nlist, index.dim):
            raise ValueError(
                f"coarse centroids have shape {coarse.shape}, expected {(index.nlist, index.dim)}"
            )
        index.coarse = coarse
    index.set_codebooks(state["codebooks"])


def build_sharded(
    index,
    x,
    folder,
    *,
    ids=None,
    train_sample=None,
    train_on: str = "gathered",
    store_dtype: Optional[str] = None,
    group=None,
    name: str = "shard",
) -> "ShardedIndex":
    """Collective distributed build. `index` is an untrained PQIndex or IVFPQIndex made with the
    same parameters on every rank; `x` is this rank's part of the corpus.

    1. Training: train_on="gathered" trains rank 0's index on the concatenation (in rank order)
       of every rank's `train_sample` (default: this rank's x); "rank0" trains on rank 0's only.
       The trained codebooks (and coarse centroids) are broadcast to every rank.
    2. Each rank encodes and adds x with ids (default: consecutive global ids, the rows of the
       ranks before first), saves `folder/{name}-{rank:05d}-of-{world:05d}.hann`, and with
       store_dtype ("float32"/"float16") also writes its vectors to a store file next to it and
       becomes a BiGranularIndex shard (ids are then store rows; the global id adds the rows of
       the ranks before).
    3. Rank 0 writes `folder/manifest.json`: shard files, ntotal and bytes per shard, the index
       kind and parameters, and the sha256 of the trained quantizers that load() checks.
    Returns the ShardedIndex over the in-memory shards."""
    from hotops._collective import raise_together, shared_values
    from hotops.ann.sharded import ShardedIndex

    # every step below is collective: a rank that refused alone would leave the others waiting,
    # so local errors and settings that differ between ranks raise on every rank
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    error, config, count = None, None, 0
    try:
        if not isinstance(index, (PQIndex, IVFPQIndex)):
            raise TypeError(f"index must be a PQIndex or IVFPQIndex, got {type(index).__name__}")
        if train_on not in ("gathered", "rank0"):
            raise ValueError(f"train_on must be 'gathered' or 'rank0', got {train_on!r}")
        if store_dtype is not None and ids is not None:
            raise ValueError("a bi-granular shard's ids are its store rows: leave ids=None with store_dtype")
        x = _arrays.as_vectors(x, "x", index.dim)
        sample = x if train_sample is None else _arrays.as_vectors(train_sample, "train_sample", index.dim)
        config = dict(
            index=type(index).__name__,
            params=index._params(),
            train_on=train_on,
            store_dtype=store_dtype,
            ids_given=ids is not None,
        )
        count = int(x.shape[0])
    except (TypeError, ValueError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    found = raise_together(error, group, "build_sharded", (config, count))
    odd = [r for r, (c, _) in enumerate(found) if c != found[0][0]]
    if odd:
        raise ValueError(
            f"build_sharded: the index, its parameters, train_on, store_dtype or ids=None differ between "
            f"ranks: ranks {odd} differ from rank 0's {found[0][0]} (e.g. {found[odd[0]][0]})"
        )
    counts = [n for _, n in found]
    if train_on == "gathered":
        samples = [None] * world
        dist.all_gather_object(samples, sample, group=group)
        sample = np.concatenate(samples)
    error = None
    if rank == 0:
        try:
            index.train(sample)
        except (ValueError, RuntimeError) as exc:
            error = f"training failed: {exc}"
    raise_together(error, group, "build_sharded")
    state = [_trained_state(index) if rank == 0 else None]
    dist.broadcast_object_list(
        state, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group
    )

    offset = sum(counts[:rank])
    fname = f"{name}-{rank:05d}-of-{world:05d}.hann"
    entry, error = {"path": fname}, None
    try:
        if rank != 0:
            _set_trained_state(index, state[0])
        if store_dtype is not None:
            from hotops.ann.bigran import write_store

            os.makedirs(folder, exist_ok=True)
            index.add(x, np.arange(x.shape[0], dtype=np.int64))
            sname = f"{name}-{rank:05d}-of-{world:05d}.store"
            write_store(os.path.join(folder, sname), x, store_dtype)
            entry.update(store=sname, id_offset=offset)
        else:
            index.add(x, np.arange(offset, offset + x.shape[0], dtype=np.int64) if ids is None else ids)
    except (OSError, TypeError, ValueError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    raise_together(error, group, "build_sharded")
    # ids given by the ranks may overlap (the default ones cannot): refused before any file is
    # written, which ShardedIndex would refuse to open
    shared = shared_values(index._live_ids(), group) if ids is not None else None
    if shared is not None:
        count, gid, a, b = shared
        raise ValueError(
            f"build_sharded: {count} id(s) given on more than one rank, e.g. id {gid} on group ranks "
            f"{a} and {b}; give every vector one global id"
        )
    try:
        os.makedirs(folder, exist_ok=True)
        index.save(os.path.join(folder, fname))
        entry.update(ntotal=index.ntotal, bytes=os.path.getsize(os.path.join(folder, fname)))
    except (OSError, TypeError, ValueError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    entries = raise_together(error, group, "build_sharded", entry)
    if rank == 0:
        meta = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "index_kind": type(index).__name__,
            "params": index._params(),
            "trained_sha256": trained_fingerprint(index),
            "ntotal": sum(e["ntotal"] for e in entries),
            "shards": entries,
        }
        path = os.path.join(folder, "manifest.json")
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    dist.barrier(group=group)
    local = index
    if store_dtype is not None:
        local = BiGranularIndex(index, os.path.join(folder, entry["store"]))
    return ShardedIndex(local, group, id_offset=offset if store_dtype is not None else None)
