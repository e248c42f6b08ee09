"""Checkpoint trees round-trip exactly through safetensors, and never unpickle."""

import random

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from polytask.engine import checkpoint
from polytask.engine.state import rng_state, set_rng_state
from polytask.errors import CheckpointError

leaves = st.one_of(st.none(), st.booleans(), st.integers(-2**62, 2**62), st.floats(allow_nan=False),
                   st.text(max_size=5))
trees = st.recursive(leaves, lambda c: st.one_of(
    st.lists(c, max_size=3), st.tuples(c, c),
    st.dictionaries(st.text(max_size=4), c, max_size=3),
    st.dictionaries(st.integers(0, 9), c, max_size=3)), max_leaves=12)


@given(trees)
def test_tree_round_trip(tree):
    assert checkpoint._decode(*_via_bytes(tree)) == tree


def _via_bytes(tree):
    tensors = {}
    skel = checkpoint._encode(tree, tensors)
    return skel, tensors


def test_optimizer_and_rng_round_trip(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    random.random()
    np.random.rand()
    path = checkpoint.save(tmp_path / "c.safetensors", {"opt": opt.state_dict(), "rng": rng_state()})
    loaded = checkpoint.load(path)
    opt2 = torch.optim.Adam(model.parameters())
    opt2.load_state_dict(loaded["opt"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    expect = (torch.rand(3), np.random.rand(), random.random())
    set_rng_state(loaded["rng"])
    assert torch.equal(torch.rand(3), expect[0]) and np.random.rand() == expect[1] and random.random() == expect[2]


def test_bad_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00garbage")
    with pytest.raises(CheckpointError, match=r"bad\.safetensors is unreadable"):
        checkpoint.load(bad)
    good = checkpoint.save(tmp_path / "t.safetensors", {"x": torch.ones(1000)})
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"trunc\.safetensors"):
        checkpoint.load(truncated)


def test_failed_write_names_the_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    """A full disk while a checkpoint is written: a StorageError (an OSError too) naming the file, and the
    half-written temporary is gone (it would hold the space a resume needs)."""
    import errno
    import os

    from polytask.errors import StorageError

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    target = tmp_path / "jobs" / "a" / "last.safetensors"
    with pytest.raises(StorageError, match=r"cannot write .*jobs/a/last\.safetensors: No space left") as e:
        checkpoint.save(target, {"x": torch.ones(10)})
    assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC
    assert list(tmp_path.rglob("*")) == [tmp_path / "jobs", tmp_path / "jobs" / "a"]


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    import os
    import subprocess
    import sys

    from polytask.io import remove_stale_temporaries

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "jobs" / "a").mkdir(parents=True)
    stale = tmp_path / "jobs" / "a" / f".last.safetensors.tmp-{dead.pid}"
    mine = tmp_path / f".summary.json.tmp-{os.getpid()}"
    keep = tmp_path / "jobs" / "a" / "last.safetensors"
    for p in (stale, mine, keep):
        p.write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert not stale.exists() and mine.exists() and keep.exists()


def test_safetensors_bytes_do_not_depend_on_insertion_order():
    """The same tensors and metadata always give the same bytes (safetensors orders the header by a
    randomly seeded hash map), so checksums can compare runs."""
    import itertools

    tensors = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3, dtype=torch.float64),
               "i": torch.arange(4, dtype=torch.int8)}
    meta = {"job": "equal", "epoch": "3", "tasks": "a,b", "z": "1"}
    outs = {checkpoint.tensors_to_bytes(dict(t), dict(m))
            for t, m in zip(itertools.permutations(tensors.items()),
                            itertools.cycle(itertools.permutations(meta.items())), strict=False)}
    outs |= {checkpoint.tensors_to_bytes(tensors, dict(m)) for m in itertools.permutations(meta.items())}
    assert len(outs) == 1
    from safetensors.torch import load

    loaded = load(outs.pop())
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    tree = {"model": tensors, "meta": meta}
    assert len({checkpoint.dumps(tree) for _ in range(5)}) == 1


def test_directory_lock_names_the_holder_and_takes_over_dead_ones(tmp_path):
    import os
    import subprocess
    import sys

    from polytask.errors import RunLockedError
    from polytask.io import DirLock

    held = DirLock(tmp_path).acquire()
    with pytest.raises(RunLockedError, match=rf"in use by process {os.getpid()} \(lock file .*run\.lock\)"):
        DirLock(tmp_path).acquire()
    held.release()
    DirLock(tmp_path).acquire().release()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "run.lock").write_text(f"{dead.pid}\n")  # left by a killed process
    lock = DirLock(tmp_path).acquire()
    assert (tmp_path / "run.lock").read_text().strip() == str(os.getpid())
    lock.release()


def test_directory_lock_without_flock_decides_by_pid(tmp_path, monkeypatch):
    import os
    import subprocess
    import sys

    from polytask import io
    from polytask.errors import RunLockedError

    monkeypatch.setattr(io, "fcntl", None)
    (tmp_path / "run.lock").write_text(f"{os.getppid()}\n")  # a live process
    with pytest.raises(RunLockedError, match=rf"in use by process {os.getppid()} "):
        io.DirLock(tmp_path).acquire()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "run.lock").write_text(f"{dead.pid}\n")
    io.DirLock(tmp_path).acquire().release()


def test_python_rng_state_of_older_checkpoints_restores():
    """Checkpoints before the state's 625 words became one tensor stored them as a list of numbers: still read."""
    random.seed(3)
    state = rng_state()
    v, words, gauss = state["python"]
    assert isinstance(words, torch.Tensor) and words.dtype == torch.int64
    expect = random.random()
    set_rng_state({**state, "python": [v, words.tolist(), gauss]})
    assert random.random() == expect


def test_non_durable_write_is_atomic_without_fsync(tmp_path, monkeypatch):
    """durable=False (bookkeeping such as timing.json) never fsyncs, and still replaces the file whole."""
    import os

    from polytask.io import atomic_write_json

    calls = []
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(fd))
    path = tmp_path / "timing.json"
    atomic_write_json(path, {"elapsed": 1.0}, durable=False)
    atomic_write_json(path, {"elapsed": 2.0}, durable=False)
    assert calls == [] and path.read_text() == '{\n  "elapsed": 2.0\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["timing.json"]
    atomic_write_json(path, {"elapsed": 3.0})
    assert len(calls) == 2  # the file, then its folder


def test_background_writer_replaces_a_queued_save_of_the_same_file_and_keeps_the_order(tmp_path, monkeypatch):
    """While the disk is busy (the worker held inside a write), a newer save of a file replaces its queued one:
    that file lands once, with the newest state; files of other paths land in save order, each ``then`` after its
    file, a call queued with ``then()`` after the files queued before it, and ``wait`` returns only when the queue is
    empty."""
    import threading

    import polytask.engine.checkpoint as module

    real = module.atomic_write_bytes
    entered, release, landed = threading.Event(), threading.Event(), []

    def slow(path, data, durable=True, folder=True):
        if not entered.is_set():
            entered.set()
            assert release.wait(60)
        out = real(path, data, durable, folder)
        landed.append(out.name)
        return out

    monkeypatch.setattr(module, "atomic_write_bytes", slow)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    then = []
    writer = checkpoint.BackgroundWriter()
    writer.save(a, {"v": torch.tensor([0.0])}, lambda: then.append("a0"))
    assert entered.wait(60)  # the worker is inside the first write: the next saves queue
    writer.save(a, {"v": torch.tensor([1.0])}, lambda: then.append("a1"))
    writer.save(b, {"v": torch.tensor([5.0])}, lambda: then.append("b"))
    writer.then(lambda: then.append(("call", sorted(landed))))  # after b (and the first a), before the next a
    writer.save(a, {"v": torch.tensor([2.0])}, lambda: then.append("a2"))
    assert landed == []
    release.set()
    writer.close()
    assert landed == ["a.safetensors", "b.safetensors", "a.safetensors"]
    assert then == ["a0", "b", ("call", ["a.safetensors", "b.safetensors"]), "a2"]
    assert checkpoint.load(a)["v"].item() == 2.0 and checkpoint.load(b)["v"].item() == 5.0


def test_background_writer_raises_a_failed_write_at_the_next_save_and_drops_the_queue(tmp_path, monkeypatch):
    import errno
    import os

    from polytask.errors import StorageError

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left")

    monkeypatch.setattr(os, "fsync", full)
    writer = checkpoint.BackgroundWriter()
    writer.save(tmp_path / "a.safetensors", {"v": torch.ones(1)})
    with pytest.raises(StorageError, match=r"a\.safetensors: No space left"):
        writer.wait()
    writer.wait()  # raised once
    writer.save(tmp_path / "b.safetensors", {"v": torch.ones(1)})
    with pytest.raises(StorageError, match=r"b\.safetensors"):
        writer.close()
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(("durable", "folder", "want"), [(True, True, ["file", "folder"]), (True, False, ["file"]),
                                                          (False, True, [])])
def test_atomic_writes_fsync_what_they_promise(tmp_path, monkeypatch, durable, folder, want):
    """Durable: the file's data, then the folder (the new name survives an OS crash); ``folder=False``: the file's data
    only (whole or absent); not durable: nothing."""
    import os
    import stat

    from polytask.io import atomic_write_bytes

    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append("folder" if stat.S_ISDIR(os.fstat(fd).st_mode)
                                                               else "file"), real(fd)))
    path = atomic_write_bytes(tmp_path / "x.bin", b"abc", durable=durable, folder=folder)
    assert synced == want and path.read_bytes() == b"abc"


def test_a_kill_on_the_training_thread_waits_for_the_queued_checkpoints(tmp_path, monkeypatch):
    """``POLYTASK_KILL_AT="micro:1"`` while the worker is still inside the write of a checkpoint queued before it:
    the kill lands only after that checkpoint has (a loaded machine must not turn "killed after the checkpoint"
    into "killed before it"). A ``write`` kill, which fires on the worker thread, does not wait for itself."""
    import threading

    import polytask.engine.checkpoint as module
    from polytask.engine import faults

    real = module.atomic_write_bytes
    entered, release, waiting = threading.Event(), threading.Event(), threading.Event()

    def slow(path, data, durable=True, folder=True):
        entered.set()
        assert release.wait(60)
        return real(path, data, durable, folder)

    class Watched(checkpoint.BackgroundWriter):
        def wait(self):
            waiting.set()
            super().wait()

    monkeypatch.setattr(module, "atomic_write_bytes", slow)
    monkeypatch.setenv("POLYTASK_KILL_AT", "micro:1")
    monkeypatch.setattr(faults, "_counts", faults.Counter())
    kills = []
    monkeypatch.setattr(faults.os, "kill", lambda pid, sig: kills.append((path.exists(), sig)))
    path = tmp_path / "last.safetensors"
    writer = Watched()
    writer.save(path, {"v": torch.ones(1)})
    assert entered.wait(60)
    helper = threading.Thread(target=lambda: waiting.wait(60) and release.set())
    helper.start()
    try:
        faults.hit("micro")
    finally:
        release.set()
        helper.join()
        writer.close()
    assert kills == [(True, faults.signal.SIGKILL)]

    class Stuck:
        def wait(self):
            raise AssertionError("a write kill waited for the writer")

    stuck = Stuck()
    faults.track(stuck)
    monkeypatch.setenv("POLYTASK_KILL_AT", "write:x:1")
    faults.hit("write", "x")
    assert len(kills) == 2
