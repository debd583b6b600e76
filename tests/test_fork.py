"""os.fork() after hotops has run (DataLoader workers, multiprocessing with fork): the child's calls
run and give the parent's results (torch's own parallel ops do not: libgomp hangs there). The
parent's threads, locks and waiters are not the child's: the own pool is rebuilt in the child,
torch's OpenMP team is not entered there, and an index's lock is taken across the fork so the child
gets every index whole and free. Each case runs in a fresh interpreter (forking pytest itself would
copy its state), with a deadline for a hang."""

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

CHILD_RUNS = """
import os, sys, threading, time
import numpy as np, torch
import hotops
from hotops.ann import IVFPQIndex
from hotops.sparse import SparseWeight

g = torch.Generator().manual_seed(0)
sw = SparseWeight.from_dense(torch.randn(512, 512, generator=g), sparsity=0.8)
x, q = torch.randn(64, 512, generator=g), torch.randn(1, 2, 97, 32, generator=g)

def work(threads):  # hotops calls only: after a fork torch's own parallel ops hang (libgomp)
    torch.set_num_threads(threads)
    return hotops.sparse_linear(x, sw), hotops.subsampled_attention(q, q, q, keep=1.0)

for _ in range(100):  # the parent's workers start, then sleep waiting for work
    want = work(2)
rng = np.random.default_rng(0)
index = IVFPQIndex(32, nlist=8, m=4, verbose=False)
index.train(rng.standard_normal((2000, 32), dtype=np.float32))
index.add(rng.standard_normal((2000, 32), dtype=np.float32))
stop = threading.Event()

def busy():  # searches and adds on another thread while the main thread forks
    while not stop.is_set():
        index.search(rng.standard_normal((4, 32), dtype=np.float32), k=5)
        index.add(rng.standard_normal((1, 32), dtype=np.float32))

worker = threading.Thread(target=busy)
worker.start()
time.sleep(0.2)
pid = os.fork()
if pid == 0:
    got = work(4)
    index.add(np.zeros((1, 32), np.float32))
    index.search(np.zeros((1, 32), np.float32), k=5)
    os._exit(0 if all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, want)) else 3)
stop.set()
worker.join()
deadline = time.time() + 60
while time.time() < deadline:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        sys.exit(os.waitstatus_to_exitcode(status))
    time.sleep(0.05)
os.kill(pid, 9)
sys.exit(2)  # the child hung
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("pool", ["own", "default"])
def test_child_runs_after_the_parent_used_threads_and_indexes(pool):
    env = dict(os.environ)
    if pool == "own":
        env["HOTOPS_POOL"] = "own"
    else:
        env.pop("HOTOPS_POOL", None)
    out = subprocess.run([sys.executable, "-c", CHILD_RUNS], env=env, capture_output=True, timeout=300)
    assert out.returncode != 2, "the forked child hung"
    assert out.returncode == 0, out.stderr.decode()[-2000:]
