"""The ann family's file faults: index and store files truncated, bit-flipped, saved concurrently,
named by str, bytes or path-like, changed under a live mapping, and truncated under a live memory
map (in a subprocess: a SIGBUS would kill it)."""

import copy
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from _ann import shared, small
from _faults import run_threads

import hotops
from hotops.ann import BiGranularIndex, MappedFileChangedError, PQIndex, write_store

# the folder this process imported hotops from (a source tree's python/ or site-packages), so the
# subprocesses run the same build
PYTHON_DIR = str(pathlib.Path(hotops.__file__).resolve().parents[1])


@pytest.fixture(params=["pq", "ivf"])
def saved(request, tmp_path):
    index, x = small(request.param, keep_vectors=True)
    path = tmp_path / "index.hann"
    index.save(path)
    return index, x, path


def test_truncation_at_every_region_is_refused(saved, tmp_path):
    index, _, path = saved
    blob = path.read_bytes()
    cuts = sorted(
        set(
            [0, 1, 7, 8, 12, 19, 20, 21, 100]
            + list(range(64, len(blob), max(1, len(blob) // 60)))
            + [len(blob) - 1]
        )
    )
    cut_path = tmp_path / "cut.hann"
    for cut in cuts:
        cut_path.write_bytes(blob[:cut])
        for mmap in (False, True):
            with pytest.raises(ValueError):
                type(index).load(cut_path, mmap=mmap)
    cut_path.write_bytes(blob + b"\0")
    with pytest.raises(ValueError, match="extended"):
        type(index).load(cut_path)


def test_bit_flips_are_refused_or_harmless(saved, tmp_path):
    """Every byte that means something is covered by a CRC-32; a flip in alignment padding loads
    an index that answers exactly as the original."""
    index, x, path = saved
    blob = bytearray(path.read_bytes())
    rng = np.random.default_rng(0)
    flipped = tmp_path / "flip.hann"
    want = index.search(x[:8], 4)
    refused = 0
    for pos in rng.choice(len(blob), 80, replace=False):
        bad = bytearray(blob)
        bad[pos] ^= 1 << int(rng.integers(8))
        flipped.write_bytes(bad)
        try:
            loaded = type(index).load(flipped, mmap=bool(pos % 2))
        except ValueError:
            refused += 1
            continue
        for a, b in zip(want, loaded.search(x[:8], 4)):
            np.testing.assert_array_equal(a, b)
    assert refused >= 60


def test_concurrent_saves_to_one_path_leave_one_whole_index(tmp_path):
    """Threads saving different indexes to one path: every save returns, the file is always one of
    them, whole, and no temporary file is left."""
    base, x = shared()
    indexes = []
    for i in range(4):
        twin = copy.deepcopy(base)
        twin.reset()
        twin.add(x[: 100 + 50 * i])
        indexes.append(twin)
    path = tmp_path / "shared.hann"
    for _ in range(3):
        run_threads(lambda i: indexes[i].save(path), len(indexes))  # started together at a barrier
        loaded = PQIndex.load(path)
        assert any(loaded.ntotal == ix.ntotal and np.array_equal(loaded.codes, ix.codes) for ix in indexes)
    assert [p.name for p in tmp_path.iterdir()] == ["shared.hann"]


@pytest.mark.parametrize("to_path", [str, os.fsencode, pathlib.Path], ids=["str", "bytes", "pathlike"])
def test_paths_may_be_str_bytes_or_pathlike(tmp_path, to_path):
    index, x = small()
    path = to_path(str(tmp_path / "ü.hann"))
    index.save(path)
    for mmap in (False, True):
        np.testing.assert_array_equal(
            PQIndex.load(path, mmap=mmap).search(x[:3], 2)[1], index.search(x[:3], 2)[1]
        )
    store = to_path(str(tmp_path / "v.store"))
    write_store(store, x)
    assert BiGranularIndex(index, store).search(x[:3], 2)[1][:, 0].tolist() == [0, 1, 2]
    assert sorted(os.listdir(tmp_path)) == ["v.store", "ü.hann"]


def test_store_truncation_and_header_flips_are_refused(tmp_path):
    index, x = small()
    path = tmp_path / "v.store"
    write_store(path, x)
    blob = path.read_bytes()
    for cut in (0, 10, 63, 64, 65, len(blob) // 2, len(blob) - 1):
        path.write_bytes(blob[:cut])
        with pytest.raises(ValueError):
            BiGranularIndex(index, path)
    for pos in range(0, 36, 3):  # the checksummed header fields and their CRC (36..63 is padding)
        bad = bytearray(blob)
        bad[pos] ^= 4
        path.write_bytes(bad)
        with pytest.raises(ValueError):
            BiGranularIndex(index, path)


def test_save_of_a_damaged_mapping_refuses_and_keeps_the_old_file(saved, tmp_path):
    """A mapped index whose file changed refuses search, add and save: saving it would write the
    zero pages into a file with valid checksums."""
    index, x, path = saved
    mapped = type(index).load(path, mmap=True)
    with open(path, "r+b") as f:
        f.truncate(4096)
    other = tmp_path / "copy.hann"
    index.save(other)
    for call in (lambda: mapped.search(x[:2], 2), lambda: mapped.add(x[:2]), lambda: mapped.save(other)):
        with pytest.raises(MappedFileChangedError, match="load it again") as info:
            call()
        assert isinstance(info.value, OSError) and isinstance(info.value, ValueError)
    assert type(index).load(other).ntotal == index.ntotal  # the save did not replace it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.hann", "index.hann"]


def test_rewrite_in_place_under_a_mapping_is_noticed(saved):
    """Same size, other bytes (written in place): the mtime moves, the mapped index refuses."""
    index, x, path = saved
    mapped = type(index).load(path, mmap=True)
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(st.st_size - 64)
        f.write(b"\xff" * 64)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    with pytest.raises(MappedFileChangedError, match="written"):
        mapped.search(x[:2], 2)


SIGBUS_SCRIPT = textwrap.dedent(r"""
    import os, sys, threading, time
    import numpy as np
    from hotops import _backend
    from hotops.ann import BiGranularIndex, IVFPQIndex, MappedFileChangedError, PQIndex, write_store

    folder = sys.argv[1]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4000, 32)).astype(np.float32)
    q = x[:64]
    ext = _backend.ext()

    def build(kind, nbits):
        ix = (PQIndex(32, 8, nbits, keep_vectors=True, verbose=False) if kind == "pq"
              else IVFPQIndex(32, 8, 8, nbits, keep_vectors=True, verbose=False))
        ix.train(x[:1500]); ix.add(x)
        return ix

    def expect_changed(call, what):
        try:
            call()
        except MappedFileChangedError as exc:
            assert "load it again" in str(exc), exc
            return str(exc)
        raise AssertionError(f"{what}: no MappedFileChangedError")

    for kind, nbits in (("pq", 8), ("pq", 4), ("ivf", 8), ("ivf", 4)):
        ix = build(kind, nbits)
        intact_path, path = f"{folder}/{kind}{nbits}-intact.hann", f"{folder}/{kind}{nbits}.hann"
        ix.save(intact_path); ix.save(path)
        intact = type(ix).load(intact_path, mmap=True)
        want = intact.search(q, 5)

        # 1. truncated before the search: refused up front
        live = type(ix).load(path, mmap=True)
        os.truncate(path, 4096)
        expect_changed(lambda: live.search(q, 5), "truncated before search")

        # 2. truncated after the check, read by the kernels on worker threads and by NumPy: the
        #    pages past the end read as zeros (no SIGBUS), and the next use says so
        ix.save(path)
        live = type(ix).load(path, mmap=True)
        os.truncate(path, 4096)
        faults = ext.mapguard_total_faults()
        s, r = np.empty((64, 5), np.float32), np.empty((64, 5), np.int64)
        ext.ann_rerank(q, live.vectors, np.tile(np.arange(5), (64, 1)), None, 0.0, "l2", s, r, 2)
        if kind == "pq" and nbits == 8:
            ext.ann_pq_scan(live.tables(q), live.codes, None, s, r, 2)
        int(live.ids.sum())
        assert ext.mapguard_total_faults() > faults, "no fault was caught"
        msg = expect_changed(lambda: live.search(q, 5), "faulted")
        assert "page(s)" in msg, msg

        # 3. truncated by another thread while searches run: each returns or raises, none kills
        ix.save(path)
        live = type(ix).load(path, mmap=True)
        outcomes = []
        def search_loop():
            while len(outcomes) < 500 and "changed" not in outcomes:
                try:
                    live.search(q, 5, refine=2); outcomes.append("ok")
                except MappedFileChangedError:
                    outcomes.append("changed")
        t = threading.Thread(target=search_loop); t.start()
        while not outcomes:
            time.sleep(0.001)
        os.truncate(path, 4096)
        t.join()
        assert outcomes[-1] == "changed", outcomes

        # the intact index in the same process still answers as before
        for a, b in zip(want, intact.search(q, 5)):
            np.testing.assert_array_equal(a, b)

    # bi-granular re-rank from a vector store truncated under it
    coarse = build("pq", 8)
    store = f"{folder}/v.store"
    write_store(store, x)
    big = BiGranularIndex(coarse, store)
    want = big.search(q, 5, candidates=50)
    os.truncate(store, 64 + 4096)
    expect_changed(lambda: big.search(q, 5, candidates=50), "store truncated")
    write_store(store, x)
    big = BiGranularIndex(coarse, store)
    os.truncate(store, 64 + 4096)
    faults = ext.mapguard_total_faults()
    s, r = np.empty((64, 5), np.float32), np.empty((64, 5), np.int64)
    ext.ann_rerank(q, big.store, np.tile(np.arange(3000, 3050), (64, 1)), None, 0.0, "l2", s, r, 2)
    assert ext.mapguard_total_faults() > faults
    expect_changed(lambda: big.search(q, 5, candidates=50), "store faulted")
    write_store(f"{folder}/w.store", x)
    fresh = BiGranularIndex(coarse, f"{folder}/w.store")
    for a, b in zip(want, fresh.search(q, 5, candidates=50)):
        np.testing.assert_array_equal(a, b)

    # a .npy path cut while add() reads it (after its first chunk): refused, the index as it was
    from hotops.ann import _source
    np.save(f"{folder}/src.npy", x)
    ix, release = build("pq", 8), _source._release
    before = ix.ntotal

    def cut_after_first_chunk(mm, chunk):
        release(mm, chunk)
        os.truncate(f"{folder}/src.npy", 4096)

    _source._release = cut_after_first_chunk
    try:
        ix.add(f"{folder}/src.npy", chunk_rows=500)
        raise AssertionError("add from a cut .npy: no MappedFileChangedError")
    except MappedFileChangedError as exc:
        assert "changed while it was read" in str(exc), exc
    finally:
        _source._release = release
    assert ix.ntotal == before
    print("survived", ext.mapguard_total_faults())
""")


def test_truncation_under_a_live_mmap_raises_instead_of_sigbus(tmp_path):
    """In a subprocess (a SIGBUS would kill it): PQ, fast-scan PQ, IVF-PQ and the bi-granular
    store, mapped, truncated in place before a search, between check and kernel (kernels on worker
    threads, NumPy reads), and by another thread during searches. Every case raises
    MappedFileChangedError, the process exits 0, an intact mapped index keeps answering; so does a
    .npy path that add() maps itself, cut while it is read. Python's
    faulthandler is enabled first (as pytest does it): hotops' handler still comes first."""
    env = dict(
        os.environ, PYTHONPATH=PYTHON_DIR + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="2"
    )
    cmd = [sys.executable, "-X", "faulthandler", "-c", SIGBUS_SCRIPT, str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "survived" in done.stdout


def test_foreign_sigbus_still_kills(tmp_path):
    """The handler takes only faults in hotops' own mappings; another mapping's SIGBUS keeps its
    default action (the process dies with SIGBUS), so hotops hides nobody else's bugs."""
    script = textwrap.dedent("""
        import mmap, os, sys
        import numpy as np
        from hotops.ann import PQIndex
        x = np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32)
        ix = PQIndex(8, 2, 4, verbose=False); ix.train(x); ix.add(x)
        ix.save(sys.argv[1] + "/i.hann"); PQIndex.load(sys.argv[1] + "/i.hann", mmap=True)  # arms the handler
        path = sys.argv[1] + "/other.bin"
        open(path, "wb").write(b"\\0" * 8192)
        fd = os.open(path, os.O_RDWR); m = mmap.mmap(fd, 8192); os.ftruncate(fd, 0)
        print(np.frombuffer(m, np.uint8).sum())
    """)
    env = dict(os.environ, PYTHONPATH=PYTHON_DIR + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, timeout=120
    )
    sanitized = b"AddressSanitizer" in done.stderr  # scripts/sanitize.sh: ASan reports it and aborts
    assert done.returncode == (-6 if sanitized else -7), (done.returncode, done.stderr[-2000:])  # SIGBUS
