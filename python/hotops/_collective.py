"""torch.distributed helpers shared by the families that run across ranks: InfoNCE's gathered loss
(hotops.infonce), the sharded index, its distributed build and the hard-negative miner over it
(hotops.ann). Each function is one collective that every rank of the group must call.

Ranks may hold different row counts (0 included): gathers pad to the largest count, because one
collective with tensors of different sizes aborts gloo or reads garbage. The `*_together` helpers
exist because a rank that raises alone leaves the others waiting in the next collective: every
rank first learns whether any rank failed, and then all of them raise."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist


def comm_device(group=None) -> torch.device:
    """Where collective tensors must live: the current CUDA device for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def exchange(values: Sequence[int], group=None) -> List[List[int]]:
    """Every rank's `values` (int64; the same count on every rank), in rank order: one small
    all_gather, for the counts and settings the ranks must agree on before the real collective."""
    mine = torch.tensor(list(values), dtype=torch.int64, device=comm_device(group))
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    return torch.stack(parts).cpu().tolist()


def all_gather_rows(x: torch.Tensor, counts: Sequence[int], group=None) -> torch.Tensor:
    """Concatenation in rank order of every rank's (counts[r], ...) rows (padded to the largest)."""
    most = max(counts)
    if most == 0:
        return x.new_empty((0,) + tuple(x.shape[1:]))
    pad = x.new_zeros((most,) + tuple(x.shape[1:]))
    pad[: x.shape[0]] = x
    parts = [torch.empty_like(pad) for _ in counts]
    dist.all_gather(parts, pad, group=group)
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


def all_to_all(x: torch.Tensor, send: Sequence[int], recv: Sequence[int], group=None) -> torch.Tensor:
    """Rows x[sum(send[:r]):sum(send[:r+1])] go to rank r; returns the rows received, by source."""
    out = x.new_empty((int(sum(recv)),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), [int(c) for c in recv], [int(c) for c in send], group=group)
    return out


def shared_values(values: np.ndarray, group=None) -> Optional[Tuple[int, int, int, int]]:
    """Whether an int64 value is held by two ranks (each rank's `values` distinct among
    themselves): None, or (how many such values, one of them, two group ranks that hold it), the
    same on every rank. Value v is checked by group rank v mod world, so no rank gathers them all:
    one all_to_all of 8 bytes per value and a sort of this rank's share."""
    world, cdev = dist.get_world_size(group), comm_device(group)
    dest = np.mod(values, world)
    send = np.bincount(dest, minlength=world)
    me = dist.get_rank(group)
    recv = [row[me] for row in exchange(send.tolist(), group)]
    by_dest = torch.from_numpy(np.ascontiguousarray(values[np.argsort(dest, kind="stable")], np.int64))
    got = all_to_all(by_dest.to(cdev), send, recv, group).cpu().numpy()
    src = np.repeat(np.arange(world), recv)
    order = np.argsort(got, kind="stable")
    got, src = got[order], src[order]
    twice = np.flatnonzero(got[1:] == got[:-1])
    i = int(twice[0]) if twice.size else 0
    mine = [twice.size, int(got[i]), int(src[i]), int(src[i + 1])] if twice.size else [0] * 4
    found = [f for f in exchange(mine, group) if f[0]]
    if not found:
        return None
    return (sum(f[0] for f in found), *found[0][1:])


def raise_together(error: Optional[str], group, what: str, value=None) -> list:
    """Raises ValueError on every rank, with every rank's message, when any rank found an error;
    else returns every rank's `value` (any picklable object), in rank order."""
    found = [None] * dist.get_world_size(group)
    dist.all_gather_object(found, (error, value), group=group)
    bad = [f"rank {r}: {e}" for r, (e, _) in enumerate(found) if e]
    if bad:
        raise ValueError(f"{what}: " + "; ".join(bad))
    return [v for _, v in found]


def fail_together(error: Optional[BaseException], group, what: str) -> None:
    """Raises `error` on its rank and ValueError naming the failed ranks on the others, when any
    rank failed (a tensor all_gather: cheaper than raise_together's pickled objects on a hot path)."""
    failed = [r for r, (flag,) in enumerate(exchange([int(error is not None)], group)) if flag]
    if error is not None:
        raise error
    if failed:
        raise ValueError(f"{what}: rank(s) {failed} of the group failed (see their error)")
