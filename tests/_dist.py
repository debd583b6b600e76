"""Run a function on N gloo ranks of this machine (torch.multiprocessing spawn) with a deadline."""

from __future__ import annotations

import datetime
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, fn, world, port, args):
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # a rank that passed leaves without the interpreter's finalization, where gloo objects still
    # referenced (autograd graphs, work handles) are destroyed with their threads alive and can
    # abort the process after a passing test (pytorch/pytorch#179291 describes it; a full-suite run
    # here once lost a rank to SIGABRT, "terminate called without an active exception", at a point
    # the log does not show)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run(fn, world: int, *args, timeout: float = 120.0):
    """Calls fn(rank, world, *args) on `world` gloo ranks; re-raises a rank's exception; kills the
    ranks and fails after `timeout` seconds."""
    ctx = mp.start_processes(
        _entry, args=(fn, world, free_port(), args), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            raise TimeoutError(f"{fn.__name__} on {world} ranks did not finish in {timeout:.0f} s")
