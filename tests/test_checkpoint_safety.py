"""Model files and checkpoints that must not be trusted: NaN/inf weights, another network's
checkpoint, sizes that would not fit in memory, a checkpoint folder in use by another run."""

import errno
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import tracemalloc

import numpy as np
import pytest

import fastnn
from fastnn import checkpoint, guards, npzfile
from fastnn.lock import LOCK_NAME, FolderLock
from fastnn.stack import ModelStack


def with_nan(params, index, n=3):
    """``params`` ([W1, b1, ...]) with ``n`` NaN/inf values in parameter ``index``."""
    params = [p.copy() for p in params]
    flat = params[index].reshape(-1)
    flat[:n] = [np.nan, np.inf, -np.inf][:n] if n <= 3 else np.nan
    return params


# ------------------------------------------------------------ NaN / inf weights
def test_a_model_stack_with_nan_weights_is_refused_naming_the_model_and_parameter(tmp_path):
    stack = ModelStack([6, 5, 4, 3], seeds=[1, 2, 3])
    stack.save(tmp_path / "ok.npz")
    assert ModelStack.load(tmp_path / "ok.npz").n_models == 3
    meta, arrays = npzfile.load(tmp_path / "ok.npz", "fastnn-stack", "stack")
    params = arrays["params"].copy()
    params[2, 6 * 5 + 5 + 1] = np.nan  # model 2, W2 (after W1 (6, 5) and b1 (5,))
    npzfile.save(tmp_path / "bad.npz", "fastnn-stack", meta, {"params": params})
    with pytest.raises(fastnn.DataError) as e:
        ModelStack.load(tmp_path / "bad.npz")
    assert str(e.value) == (f"{tmp_path / 'bad.npz'}: model 2's parameter W2 (layer 2 weights) holds 1 NaN/inf "
                            "value: the training that wrote it diverged")


def state_of(model, epoch=1):
    return {"params": model.ops.to_host(model.params), "opt_steps": np.array([epoch], np.int64),
            "model_step": model.ops.to_host(model.step)}


def write_checkpoint(folder, model, epoch, params=None):
    """A checkpoint file written as save_checkpoint writes one, with these (possibly non-finite) params."""
    folder.mkdir(exist_ok=True)
    meta = {"epoch": epoch, "rng": np.random.default_rng(0).bit_generator.state, "config": {},
            "model": model.config(), "history": []}
    arrays = state_of(model, epoch)
    if params is not None:
        arrays["params"] = params
    path = folder / f"ckpt-epoch-{epoch:04d}.npz"
    npzfile.save(path, "fastnn-checkpoint", meta, arrays)
    return path


def test_a_checkpoint_with_nan_weights_is_refused_and_resuming_takes_the_previous_one(tmp_path):
    m = fastnn.MLP([16, 5, 3])
    ck = tmp_path / "ck"
    write_checkpoint(ck, m, 1)
    arena = m.ops.to_host(m.params).copy()
    arena[16 * 5 + 5 + 2] = np.inf  # W2
    bad = write_checkpoint(ck, m, 2, arena)
    with pytest.raises(fastnn.DataError) as e:
        checkpoint.read_checkpoint(bad)
    assert str(e.value) == (f"{bad}: parameter W2 (layer 2 weights) holds 1 NaN/inf value: the training that "
                            "wrote it diverged")
    warnings = []
    assert checkpoint.load_latest(ck, warn=warnings.append)["meta"]["epoch"] == 1
    assert warnings == [f"warning: {e.value}; using the previous checkpoint"]
    (ck / "ckpt-epoch-0001.npz").unlink()
    with pytest.raises(fastnn.DataError, match=f"{ck}: no usable checkpoint .the oldest: {bad}: parameter W2"):
        checkpoint.load_latest(ck)


def test_a_checkpoint_with_nan_optimizer_state_is_refused(tmp_path):
    m = fastnn.MLP([16, 5, 3])
    opt = fastnn.make_optimizer("adam", m, 0.01)
    path = checkpoint.save_checkpoint(tmp_path, m, opt, 1, np.random.default_rng(0), {}, [])
    meta, arrays = npzfile.load(path, "fastnn-checkpoint", "checkpoint")
    arrays["opt_m"] = arrays["opt_m"].copy()
    arrays["opt_m"][:4] = np.nan
    npzfile.save(path, "fastnn-checkpoint", meta, arrays)
    with pytest.raises(fastnn.DataError, match="the optimizer state m holds 4 NaN/inf values: the training"):
        checkpoint.read_checkpoint(path)


def test_no_checkpoint_is_written_for_nan_weights(tmp_path):
    m = fastnn.MLP([16, 5, 3])
    opt = fastnn.make_optimizer("adam", m, 0.01)
    checkpoint.save_checkpoint(tmp_path, m, opt, 1, np.random.default_rng(0), {}, [{"epoch": 1}])
    m.set_params(with_nan(m.get_params(), 1, 2))
    with pytest.raises(fastnn.DivergedError, match="after epoch 2, parameter b1 .layer 1 biases. holds 2 NaN/inf "
                                                   "values: training diverged .no checkpoint written") as e:
        checkpoint.save_checkpoint(tmp_path, m, opt, 2, np.random.default_rng(0), {}, [{"epoch": 1}])
    assert e.value.history == [{"epoch": 1}]
    assert [p.name for p in checkpoint.checkpoint_files(tmp_path)] == ["ckpt-epoch-0001.npz"]
    assert list(tmp_path.glob(".tmp-*")) == []


# ------------------------------------------------------- another network's checkpoint
def test_restore_refuses_a_checkpoint_of_another_network_of_the_same_size(tmp_path):
    a = fastnn.MLP([16, 5, 3])
    path = checkpoint.save_checkpoint(tmp_path, a, fastnn.make_optimizer("adam", a, 0.01), 1,
                                      np.random.default_rng(0), {}, [])
    state = checkpoint.read_checkpoint(path)
    b = fastnn.MLP([16, 4, 4, 3])
    assert b.size == a.size == 103  # the parameter count alone would let it in
    with pytest.raises(fastnn.DataError) as e:
        checkpoint.restore(state, b, fastnn.make_optimizer("adam", b, 0.01), np.random.default_rng(0))
    assert str(e.value) == (f"{path}: the checkpoint is of another network: sizes 16-5-3 in the checkpoint, "
                            "16-4-4-3 in this run")
    for other, key, was, now in [(fastnn.MLP([16, 5, 3], activation="tanh"), "activation", "relu", "tanh"),
                                 (fastnn.MLP([16, 5, 3], loss="mse"), "loss", "xent", "mse"),
                                 (fastnn.MLP([16, 5, 3], dtype="float64"), "dtype", "float32", "float64"),
                                 (fastnn.MLP([16, 5, 3], dropout=0.5), "dropout", "[0.0]", "[0.5]")]:
        with pytest.raises(fastnn.DataError, match=re.escape(f"network: {key} {was} in the checkpoint, {now} in "
                                                             "this run")):
            checkpoint.restore(state, other, fastnn.make_optimizer("adam", other, 0.01), np.random.default_rng(0))
    same = fastnn.MLP([16, 5, 3], seed=7, init="xavier")  # init and seed are not the architecture
    checkpoint.restore(state, same, fastnn.make_optimizer("adam", same, 0.01), np.random.default_rng(0))
    np.testing.assert_array_equal(same.ops.to_host(same.params), a.ops.to_host(a.params))


# ------------------------------------------------------- sizes checked before allocating
def test_a_network_too_big_for_the_machine_is_refused_before_allocating():
    tracemalloc.start()
    try:
        with pytest.raises(fastnn.ConfigError) as e:
            fastnn.MLP([784, 10**9, 10])
        with pytest.raises(fastnn.ConfigError, match="a stack of 3 784-1000000000-10 network would need"):
            ModelStack([784, 10**9, 10], seeds=[0, 1, 2])
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 1 << 20
    have = guards.format_bytes(guards.physical_memory())
    assert str(e.value) == ("a 784-1000000000-10 network would need 14 TB of memory (parameters, gradients, optimizer "
                            f"state, batch buffers, in float32); this machine has {have}")


def test_memory_estimate_and_its_units():
    # 4 arrays of P = 12*5+5+5*3+3 = 83 values, a batch of 128 (12 inputs, 2 x (5 + 3) activations/deltas), 8 bytes
    assert guards.training_bytes([12, 5, 3], np.float64) == (4 * 83 + 128 * (12 + 16)) * 8
    assert guards.training_bytes([12, 5, 3], np.float32, n_models=3, batch=1) == 3 * (4 * 83 + 28) * 4
    assert [guards.format_bytes(n) for n in (999, 1000, 24_300_000_000, 7.3e12)] == \
        ["999 bytes", "1.0 kB", "24 GB", "7.3 TB"]
    assert guards.physical_memory() == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def edited_header(tmp_path, fmt, sizes, name="huge.npz"):
    """A small valid model (or stack) file whose header's sizes are replaced by ``sizes``."""
    src = tmp_path / f"src-{fmt}.npz"
    (fastnn.MLP([16, 5, 3]) if fmt == "fastnn-mlp" else ModelStack([16, 5, 3], seeds=[0, 1])).save(src)
    meta, arrays = npzfile.load(src, fmt, "file")
    npzfile.save(tmp_path / name, fmt, dict(meta, sizes=sizes), arrays)
    return tmp_path / name


@pytest.mark.parametrize("load,fmt", [(fastnn.MLP.load, "fastnn-mlp"), (ModelStack.load, "fastnn-stack")],
                         ids=["model", "stack"])
def test_a_model_file_whose_header_claims_a_billion_units_is_refused_before_allocating(tmp_path, load, fmt):
    path = edited_header(tmp_path, fmt, [16, 10**9, 3])
    tracemalloc.start()
    try:
        with pytest.raises(fastnn.DataError, match=f"^{path}: a (stack of 2 )?16-1000000000-3 network would need "
                                                   ".* of memory .* this machine has "):
            load(path)
        # sizes that fit in memory but not the arrays: refused before the network is built
        with pytest.raises(fastnn.DataError, match=r"has shape .*, but the header's sizes \[16, 100000, 3\]"):
            load(edited_header(tmp_path, fmt, [16, 100000, 3], "wide.npz"))
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 1 << 20


# ----------------------------------------------------------- one run per folder
HOLD = textwrap.dedent("""
    import sys, time
    from fastnn.lock import FolderLock
    FolderLock(sys.argv[1], "--checkpoint-dir").acquire()
    print("held", flush=True)
    time.sleep(600)
""")


def test_a_folder_lock_names_its_holder_and_is_taken_over_after_a_kill(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "held\n"
        holder = (tmp_path / LOCK_NAME).read_text()
        assert holder.startswith(f"pid {proc.pid} on host ") and " since " in holder
        with pytest.raises(fastnn.ConfigError) as e:
            FolderLock(tmp_path, "--checkpoint-dir").acquire()
        assert str(e.value) == (f"--checkpoint-dir {tmp_path}: in use by {holder.strip()}: wait for it to end, "
                                "or use another folder")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (tmp_path / LOCK_NAME).read_text() == holder  # the dead run's line is still there: stale
    with FolderLock(tmp_path, "--checkpoint-dir"):
        assert (tmp_path / LOCK_NAME).read_text().startswith(f"pid {os.getpid()} on host ")
        with pytest.raises(fastnn.ConfigError, match=f"in use by pid {os.getpid()} "):
            FolderLock(tmp_path, "--resume").acquire()  # one holder, even within a process
    assert (tmp_path / LOCK_NAME).read_text() == ""  # released: emptied
    FolderLock(tmp_path).acquire().release()


def test_a_read_only_resume_folder_is_locked_if_a_run_made_a_lock_file_there(tmp_path, monkeypatch):
    real_open = os.open

    def read_only(path, flags, *mode):  # a folder on a read-only file system
        if flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *mode)

    monkeypatch.setattr(os, "open", read_only)
    lock = FolderLock(tmp_path, "--resume").acquire()  # no lock file: no run writes there
    assert lock.fd is None and not (tmp_path / LOCK_NAME).exists()
    monkeypatch.setattr(os, "open", real_open)
    with FolderLock(tmp_path, "--checkpoint-dir"):  # a run holds it (this process, another descriptor)
        monkeypatch.setattr(os, "open", read_only)
        with pytest.raises(fastnn.ConfigError, match=f"--resume {tmp_path}: in use by pid {os.getpid()} "):
            FolderLock(tmp_path, "--resume").acquire()
    with FolderLock(tmp_path, "--resume") as lock:  # the holder ended: the existing file, opened read-only, locks
        assert lock.fd is not None and not lock.writable


def test_a_lock_file_of_garbage_is_not_trusted_as_a_holder(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"not": "ours"}))
    with FolderLock(tmp_path, "--checkpoint-dir") as lock:  # nobody holds the flock: taken
        assert lock.fd is not None
