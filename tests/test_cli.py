"""The real scripts in subprocesses: on synthetic data of MNIST's shape, and the accuracy
claims on the real Fashion-MNIST (skipped when it is absent)."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO, data_root

import fastnn
from fastnn import checkpoint
from fastnn.cli.flags import PRESETS

TRAIN = [sys.executable, str(REPO / "scripts" / "train.py")]
PREDICT = [sys.executable, str(REPO / "scripts" / "predict.py")]
SMALL = ["--limit", "2000", "--hidden", "32", "--epochs", "3", "--quiet", "--device", "cpu"]


@pytest.fixture(scope="module")
def data_args(synthetic_dir):
    """The synthetic set, found by the CLI as fashion-mnist in a --data-dir."""
    return ["--data-dir", str(synthetic_dir)]


@pytest.fixture(scope="module")
def real_data_args():
    root = data_root()
    if not (root / "fashion-mnist" / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Fashion-MNIST not found in {root} (set FASTNN_DATA); needed for the accuracy claims only")
    return ["--data-dir", str(root)]


# One BLAS thread: the summation order of a GEMM (and so the last bit of the weights) is
# then the same in every process, which the bit-exact resume test relies on.
ENV = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")


def run(cmd, timeout=300, cwd=None):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=cwd)


def test_train_writes_metrics_and_a_model_that_predicts_the_same(tmp_path, data_args, synthetic_dir):
    metrics, model_path = tmp_path / "m.jsonl", tmp_path / "model.npz"
    r = run(TRAIN + data_args + SMALL + ["--metrics", str(metrics), "--save", str(model_path)])
    assert r.returncode == 0, r.stderr
    assert "test accuracy" in r.stdout and r.stderr == ""
    lines = [json.loads(s) for s in metrics.read_text().splitlines()]
    assert [x["type"] for x in lines] == ["config", "epoch", "epoch", "epoch", "result"]
    assert lines[0]["device"] == "cpu" and lines[0]["sizes"] == [784, 32, 10]
    assert lines[0]["n_train"] == 1800 and lines[0]["n_val"] == 200  # --val-split 0.1 by default
    assert lines[0]["classes"][0] == "T-shirt/top"
    assert [x["epoch"] for x in lines[1:4]] == [1, 2, 3]
    for x in lines[1:4]:
        assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "seconds"} <= x.keys()
    acc = lines[-1]["test_accuracy"]
    assert 0.6 < acc < 1.0
    assert f"test accuracy {acc:.4f}" in r.stdout

    model = fastnn.MLP.load(model_path)
    images = synthetic_dir / "fashion-mnist" / "t10k-images-idx3-ubyte.gz"
    from fastnn.datasets import read_idx

    x = read_idx(images).reshape(-1, 784)[:500]
    ours = model.predict(x)
    assert np.mean(ours == read_idx(images.with_name("t10k-labels-idx1-ubyte.gz"))[:500]) > 0.6
    r2 = run(PREDICT + [str(model_path), str(images)])
    assert r2.returncode == 0, r2.stderr
    preds = [int(line.split("\t")[1]) for line in r2.stdout.splitlines() if "\t" in line]
    assert len(preds) == 1000
    np.testing.assert_array_equal(preds[:500], ours)
    assert f"accuracy {acc:.4f} on 1000 labelled images" in r2.stdout
    # the same images as a headerless CSV of floats in [0, 1] get the same answers
    csv = tmp_path / "few.csv"
    np.savetxt(csv, x[:50] / 255.0, delimiter=",", fmt="%.6f")
    r3 = run(PREDICT + [str(model_path), str(csv)])
    assert r3.returncode == 0, r3.stderr
    np.testing.assert_array_equal([int(line.split("\t")[1]) for line in r3.stdout.splitlines()], ours[:50])
    r4 = run(PREDICT + [str(model_path), str(csv), "--proba"])
    probs = np.array([[float(v) for v in line.split("\t")[3].split()] for line in r4.stdout.splitlines()])
    assert probs.shape == (50, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-3)
    np.testing.assert_array_equal(probs.argmax(axis=1), ours[:50])


def _final_params(path):
    return [p for p in fastnn.MLP.load(path).get_params()]


def test_resume_after_a_kill_gives_identical_weights(tmp_path, data_args):
    args = TRAIN + data_args + SMALL + ["--epochs", "4", "--optimizer", "momentum", "--lr", "0.05", "--dropout", "0.2"]
    full = tmp_path / "full.npz"
    assert run(args + ["--save", str(full)]).returncode == 0
    ck = tmp_path / "ck"
    proc = subprocess.Popen(args + ["--checkpoint-dir", str(ck)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 120
    while not checkpoint.checkpoint_files(ck) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = checkpoint.load_latest(ck)
    assert 1 <= state["meta"]["epoch"] <= 4
    resumed = tmp_path / "resumed.npz"
    r = run(TRAIN + ["--resume", str(ck), "--save", str(resumed), "--quiet"])
    assert r.returncode == 0, r.stderr
    for a, b in zip(_final_params(full), _final_params(resumed)):
        np.testing.assert_array_equal(a, b)


def test_sigkill_while_checkpointing_never_leaves_an_unloadable_latest(tmp_path, data_args):
    ck = tmp_path / "ck"
    args = TRAIN + data_args + ["--limit", "300", "--hidden", "512,512", "--epochs", "100000",
                                "--quiet", "--device", "cpu", "--checkpoint-dir", str(ck)]
    rng = np.random.default_rng(0)
    for i in range(4):
        cmd = args if i == 0 else TRAIN + ["--resume", str(ck), "--quiet"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
        deadline = time.time() + 120
        while len(checkpoint.checkpoint_files(ck)) < 1 and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(float(rng.uniform(0.05, 0.6)))  # land anywhere, often mid-write
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        warnings = []
        state = checkpoint.load_latest(ck, warn=warnings.append)
        assert warnings == [] and state["meta"]["epoch"] >= 1
        assert len(checkpoint.checkpoint_files(ck)) <= checkpoint.KEEP
    # a resumed run clears the temporary files the kills left, and ends
    last = checkpoint.load_latest(ck)["meta"]["epoch"]
    r = run(TRAIN + ["--resume", str(ck), "--quiet", "--epochs", str(last + 1)])
    assert r.returncode == 0, r.stderr
    assert list(ck.glob(".tmp-*")) == []


def test_corrupt_latest_checkpoint_falls_back(tmp_path, data_args):
    ck = tmp_path / "ck"
    r = run(TRAIN + data_args + SMALL + ["--checkpoint-dir", str(ck)])
    assert r.returncode == 0, r.stderr
    newest = checkpoint.checkpoint_files(ck)[0]
    newest.write_bytes(newest.read_bytes()[:1000])
    r = run(TRAIN + ["--resume", str(ck), "--epochs", "3"])
    assert r.returncode == 0, r.stderr
    assert "ckpt-epoch-0003.npz" in r.stderr and "using the previous checkpoint" in r.stderr
    assert "resuming after epoch 2" in r.stdout


# The full table of bad inputs is in test_bad_inputs.py (in-process); these check the scripts' wiring.
@pytest.mark.parametrize("flags,match", [
    (["--lr", "-1"], "argument --lr: must be >= 0, got -1"),
    (["--dataset", "/no/such/place"], "/no/such/place: neither a known data set"),
    (["--save", "/proc/m.npz"], "--save /proc/m.npz: cannot write in /proc"),
])
def test_bad_flags_are_one_line_errors(flags, match, data_args):
    r = run(TRAIN + data_args + SMALL + flags)
    assert r.returncode == 2
    assert match in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr


def test_bad_data_file_is_a_one_line_error(tmp_path):
    (tmp_path / "train.csv").write_text("label,a,b\n1,2,3\n4,5\n")
    (tmp_path / "test.csv").write_text("label,a,b\n1,2,3\n")
    r = run(TRAIN + ["--dataset", str(tmp_path), "--quiet"])
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: {tmp_path / 'train.csv'}: line 3 has 2 fields, expected 3"


def test_divergence_exits_1_with_an_explanation(tmp_path, data_args):
    r = run(TRAIN + data_args + SMALL + ["--optimizer", "sgd", "--lr", "1e30", "--lr-schedule", "constant"])
    assert r.returncode == 1
    assert "learning rate" in r.stderr and "Traceback" not in r.stderr


def test_csv_training_from_the_first_seed_layout(tmp_path):
    rng = np.random.default_rng(0)
    for name, n in (("mnist_train.csv", 300), ("mnist_test.csv", 100)):
        y = rng.integers(0, 3, n)
        x = (np.eye(3)[y].repeat(4, axis=1) * 200 + rng.integers(0, 50, (n, 12))).astype(int)
        rows = ["label," + ",".join(f"pixel{i}" for i in range(12))]
        rows += [",".join(map(str, [lab, *px])) for lab, px in zip(y, x)]
        (tmp_path / name).write_text("\n".join(rows) + "\n")
    r = run(TRAIN + ["--dataset", str(tmp_path), "--hidden", "8", "--epochs", "20", "--lr", "0.01",
                     "--quiet"])
    assert r.returncode == 0, r.stderr
    acc = float(r.stdout.split("test accuracy ")[1].split()[0])
    assert acc > 0.9


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_and_sigterm_exit_cleanly_and_say_how_to_resume(tmp_path, data_args, sig, code):
    ck, saved = tmp_path / "ck", tmp_path / "now.npz"
    args = TRAIN + data_args + ["--limit", "300", "--hidden", "64", "--epochs", "100000", "--device", "cpu",
                                "--checkpoint-dir", str(ck), "--save", str(saved)]
    # SIGINT as a terminal sends it, also where this test runs as a background job (which ignores it)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.default_int_handler))
    deadline = time.time() + 120
    while len(checkpoint.checkpoint_files(ck)) < 1 and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert f"--resume {ck}" in err and "Traceback" not in err
    assert fastnn.MLP.load(saved).sizes == (784, 64, 10)
    checkpoint.load_latest(ck)


def test_plots(tmp_path, data_args):
    pytest.importorskip("matplotlib")
    r = run(TRAIN + data_args + SMALL + ["--epochs", "2", "--plots", str(tmp_path / "plots")])
    assert r.returncode == 0, r.stderr
    for name in ("curves.png", "confusion.png", "misclassified.png"):
        data = (tmp_path / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def png_bytes(img: np.ndarray, channels: int, seed=0, alpha=None) -> bytes:
    """A PNG encoder for the test: every row gets a random filter type (0-4). With ``alpha``
    (2 or 4 channels), the color is ``img`` and the alpha channel ``alpha``."""
    import struct
    import zlib

    h, w = img.shape
    px = np.repeat(img[:, :, None], channels, axis=2).astype(np.int32)
    if channels in (2, 4):
        px[:, :, -1] = 255 if alpha is None else alpha
    rows = px.reshape(h, w * channels)
    rng = np.random.default_rng(seed)
    out, prev = b"", np.zeros(w * channels, np.int32)
    for y in range(h):
        f, cur = int(rng.integers(0, 5)), rows[y]
        left = np.concatenate([np.zeros(channels, np.int32), cur[:-channels]])
        upleft = np.concatenate([np.zeros(channels, np.int32), prev[:-channels]])
        if f == 0:
            pred = np.zeros_like(cur)
        elif f == 1:
            pred = left
        elif f == 2:
            pred = prev
        elif f == 3:
            pred = (left + prev) // 2
        else:
            p = left + prev - upleft
            pa, pb, pc = abs(p - left), abs(p - prev), abs(p - upleft)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prev, upleft))
        out += bytes([f]) + ((cur - pred) & 255).astype(np.uint8).tobytes()
        prev = cur

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    color = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    header = struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(out))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_png_reader(tmp_path, channels):
    pytest.importorskip("PIL", reason="Pillow is not installed (the images extra)")
    from fastnn.images import read_image

    img = np.random.default_rng(channels).integers(0, 256, (28, 28)).astype(np.uint8)
    (tmp_path / "a.png").write_bytes(png_bytes(img, channels, seed=channels))
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), img)
    (tmp_path / "b.png").write_bytes(b"not a png")
    with pytest.raises(fastnn.DataError, match="b.png: not an image Pillow can read"):
        read_image(tmp_path / "b.png")


def test_predict_reads_a_png(tmp_path, data_args, synthetic):
    model_path = tmp_path / "m.npz"
    assert run(TRAIN + data_args + SMALL + ["--save", str(model_path)]).returncode == 0
    img = synthetic[2][0].reshape(28, 28)
    (tmp_path / "one.png").write_bytes(png_bytes(img, 1))
    r = run(PREDICT + [str(model_path), str(tmp_path / "one.png"), "--no-normalize"])  # already 28x28, centred
    assert r.returncode == 0, r.stderr
    want = fastnn.MLP.load(model_path).predict(img.reshape(1, 784))[0]
    assert r.stdout.split("\t")[1] == str(want)


@pytest.mark.accuracy
@pytest.mark.slow
def test_default_configuration_reaches_89_percent_on_fashion_mnist(tmp_path, real_data_args):
    metrics = tmp_path / "m.jsonl"
    r = subprocess.run(TRAIN + real_data_args + ["--quiet", "--metrics", str(metrics)], capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    result = json.loads(metrics.read_text().splitlines()[-1])
    print(r.stdout.splitlines()[-1])
    assert result["test_accuracy"] >= 0.89


@pytest.mark.accuracy
@pytest.mark.slow
@pytest.mark.parametrize("preset,floor", [("seed1", 0.85), ("seed2", 0.84)])
def test_seed_presets_reach_a_sound_accuracy(preset, floor, tmp_path, real_data_args):
    metrics = tmp_path / "m.jsonl"
    r = subprocess.run(TRAIN + real_data_args + ["--preset", preset, "--quiet", "--metrics", str(metrics)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(s) for s in metrics.read_text().splitlines()]
    print(preset, r.stdout.splitlines()[-1])
    assert lines[0]["per_sample"] == (preset == "seed1")
    assert lines[0]["loss"] == ("mse" if preset == "seed2" else "xent")
    assert lines[-1]["test_accuracy"] >= floor


def test_doctor_command(tmp_path, data_args):
    r = run([sys.executable, "-m", "fastnn", "doctor", *data_args, "--limit", "5000"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "doctor: no problems found"
    metrics = tmp_path / "m.jsonl"
    r = run([sys.executable, "-m", "fastnn", "doctor", *data_args, "--limit", "5000", "--optimizer", "sgd",
             "--lr", "1000", "--metrics", str(metrics)])
    assert r.returncode == 1
    assert "ERROR   non-finite:" in r.stdout and "fix: lower the learning rate" in r.stdout
    recs = [json.loads(s) for s in metrics.read_text().splitlines()]
    assert any(x["type"] == "finding" and x["code"] == "non-finite" for x in recs)


def test_train_with_doctor_reports_then_trains(data_args):
    r = run(TRAIN + data_args + SMALL + ["--doctor", "--lr", "1e-9", "--optimizer", "sgd"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.index("no-weight-change") < r.stdout.index("test accuracy")


def test_gpu_without_cuda_is_a_one_line_error(data_args):
    if fastnn.cuda_status() is None:
        pytest.skip("a GPU is present")
    r = run(TRAIN + data_args + SMALL[:-2] + ["--device", "gpu"])
    assert r.returncode == 2
    assert r.stderr.startswith("error: device 'gpu' is not usable: ") and len(r.stderr.splitlines()) == 1


def test_progress_bar_only_on_a_terminal(monkeypatch):
    from fastnn import progress

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert progress.bar(1000, "epoch 1/3").disable  # piped or redirected: no bar
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    shown = progress.EpochProgress(3, 1000)
    shown.update(500)
    assert not shown.current.disable and shown.current.n == 500 and shown.current.total == 1000
    assert shown.current.desc == "epoch 1/3" and not shown.current.leave  # a terminal's bar vanishes at its end
    shown.end("epoch line")
    assert shown.current is None and shown.epoch == 2
    assert progress.bar(1000, "epoch 1/3", show=False).disable  # --quiet


def test_a_notebook_keeps_each_bar_as_text_on_stdout(monkeypatch, capsys):
    from fastnn import progress

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    monkeypatch.setattr(progress, "in_notebook", lambda: True)
    b = progress.bar(1000, "epoch 1/3")
    assert not b.disable and b.leave
    b.update(1000)
    b.close()
    out = capsys.readouterr().out  # what the cell's saved output keeps: the bar's final state, as text
    assert out.rstrip().rsplit("\r", 1)[-1].startswith("epoch 1/3: 100%")


def test_a_redirected_run_writes_one_line_per_epoch_and_no_bar(data_args, tmp_path):
    with open(tmp_path / "log.txt", "w") as log:
        r = subprocess.run(TRAIN + data_args + [a for a in SMALL if a != "--quiet"], stdout=log, stderr=log,
                           text=True, timeout=300)
    assert r.returncode == 0
    text = (tmp_path / "log.txt").read_text()
    assert "\r" not in text and "it/s" not in text and "sample/s]" not in text
    assert sum(line.startswith("epoch ") for line in text.splitlines()) == int(SMALL[SMALL.index("--epochs") + 1])


def test_help_lists_the_commands_defaults_and_version():
    fastnn_cmd = [sys.executable, "-m", "fastnn"]
    r = run(fastnn_cmd + ["--help"])
    assert r.returncode == 0
    assert all(f"  {c} " in r.stdout for c in ("train", "predict", "doctor"))
    assert run(fastnn_cmd + ["--version"]).stdout.strip() == f"fastnn {fastnn.__version__}"
    r = run(TRAIN + ["--help"])
    assert "--lr LR" in r.stdout and "(default: 0.001)" in r.stdout and "(default: 20)" in r.stdout
    r = run(fastnn_cmd + ["doctor", "--help"])
    assert "trial run" in r.stdout and "--epochs" not in r.stdout and "--save" not in r.stdout


@pytest.mark.parametrize("flag", [["--epochs", "3"], ["--save", "m.npz"], ["--plots", "p"]])
def test_doctor_refuses_flags_it_would_ignore(flag):
    r = run([sys.executable, "-m", "fastnn", "doctor", *flag])
    assert r.returncode == 2
    assert r.stderr.startswith("fastnn doctor: error: unrecognized arguments: " + flag[0])


# ------------------------------------------------------------ nothing lost
def test_a_checkpoint_dir_holding_another_run_is_refused(tmp_path, data_args):
    ck = tmp_path / "ck"
    assert run(TRAIN + data_args + SMALL + ["--checkpoint-dir", str(ck)]).returncode == 0
    r = run(TRAIN + data_args + SMALL + ["--hidden", "16", "--checkpoint-dir", str(ck)])
    assert r.returncode == 2
    assert f"--checkpoint-dir {ck}: holds the checkpoints of another run (up to ckpt-epoch-0003.npz)" in r.stderr
    assert f"--resume {ck}" in r.stderr
    assert checkpoint.load_latest(ck)["meta"]["model"]["sizes"] == [784, 32, 10]  # untouched


def test_resume_works_from_another_folder_and_keeps_one_record_per_epoch(tmp_path, synthetic_dir):
    ck, metrics = tmp_path / "ck", tmp_path / "m.jsonl"
    rel = os.path.relpath(synthetic_dir, tmp_path)
    r = run(TRAIN + ["--data-dir", rel] + SMALL + ["--checkpoint-dir", "ck", "--metrics", "m.jsonl"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    checkpoint.checkpoint_files(ck)[0].unlink()  # as if killed after epoch 3 was logged but before its checkpoint
    r = run(TRAIN + ["--resume", str(ck), "--metrics", str(metrics), "--quiet"], cwd="/")
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["epoch"] for r in records if r["type"] == "epoch"] == [1, 2, 3]
    assert sum(r["type"] == "result" for r in records) == 1


def test_a_failed_save_after_training_keeps_the_model_and_names_both_paths(tmp_path, monkeypatch):
    from fastnn.cli import output as cli  # save_model

    model = fastnn.MLP([4, 3])
    real_save = fastnn.MLP.save

    def full_disk(self, path):
        if str(path).startswith(str(tmp_path)):
            raise OSError(28, "No space left on device", str(path))
        real_save(self, path)

    monkeypatch.setattr(fastnn.MLP, "save", full_disk)
    with pytest.raises(fastnn.FastnnError, match="No space left on device.*the trained model was saved to") as e:
        cli.save_model(model, tmp_path / "m.npz")
    rescued = str(e.value).split("was saved to ")[1].split(" instead")[0]
    assert fastnn.MLP.load(rescued).sizes == (4, 3)
    os.unlink(rescued)


def test_saved_files_get_the_permissions_of_any_new_file(tmp_path):
    old = os.umask(0o022)
    try:
        fastnn.MLP([4, 3]).save(tmp_path / "m.npz")
    finally:
        os.umask(old)
    assert (tmp_path / "m.npz").stat().st_mode & 0o777 == 0o644


def test_a_negative_seed_is_a_config_error():
    with pytest.raises(fastnn.ConfigError, match="seed must be a whole number >= 0, got -5"):
        fastnn.MLP([4, 3], seed=-5)


def test_an_rgba_png_with_its_ink_in_the_alpha_channel(tmp_path, data_args, synthetic):
    pytest.importorskip("PIL", reason="Pillow is not installed (the images extra)")
    from fastnn.images import read_image

    digit = synthetic[2][0].reshape(28, 28)
    png = tmp_path / "ink.png"
    png.write_bytes(png_bytes(np.zeros((28, 28), np.uint8), 4, alpha=digit))  # black ink, drawn in alpha
    np.testing.assert_array_equal(read_image(png), 255 - digit)  # composited on white paper
    model = tmp_path / "m.npz"
    assert run(TRAIN + data_args + SMALL + ["--save", str(model)]).returncode == 0
    plain = run(PREDICT + [str(model), str(png), "--no-normalize"])
    assert plain.returncode == 0 and "a light background" in plain.stderr and "--invert" in plain.stderr
    inverted = run(PREDICT + [str(model), str(png), "--invert", "--no-normalize"])
    want = fastnn.MLP.load(model).predict(digit.reshape(1, -1))[0]
    assert inverted.stdout.split("\t")[1] == str(want)


def test_the_test_set_chooses_nothing(tmp_path, synthetic_dir):
    """Two runs whose data differ only in the test set train the same weights epoch by epoch
    (with early stopping and the doctor's watch on): the test set is read once, at the end."""
    import shutil

    from conftest import write_idx_gz

    from fastnn.datasets import read_idx

    other = tmp_path / "other"
    shutil.copytree(synthetic_dir, other)
    d = other / "fashion-mnist"
    rng = np.random.default_rng(5)
    x = read_idx(d / "t10k-images-idx3-ubyte.gz")
    write_idx_gz(d / "t10k-images-idx3-ubyte.gz", rng.permutation(x))  # a different test set
    runs = []
    for root in (synthetic_dir, other):
        out = tmp_path / root.name
        r = run(TRAIN + ["--data-dir", str(root)] + SMALL + ["--epochs", "4", "--patience", "1", "--doctor",
                "--save", f"{out}.npz", "--metrics", f"{out}.jsonl"])
        assert r.returncode in (0, 1), r.stderr
        recs = [json.loads(s) for s in open(f"{out}.jsonl")]
        runs.append(([{k: v for k, v in e.items() if k not in ("seconds", "samples_per_s")}
                      for e in recs if e["type"] == "epoch"], fastnn.MLP.load(f"{out}.npz").get_params(),
                     [e["test_accuracy"] for e in recs if e["type"] == "result"]))
    (epochs_a, params_a, test_a), (epochs_b, params_b, test_b) = runs
    assert epochs_a == epochs_b
    for a, b in zip(params_a, params_b):
        np.testing.assert_array_equal(a, b)
    assert test_a != test_b  # the test sets did differ, and were evaluated


def test_lr_find_command_prints_a_suggestion_and_plots(tmp_path, data_args):
    pytest.importorskip("matplotlib")
    r = run(TRAIN[:1] + ["-m", "fastnn", "lr-find"] + data_args + ["--limit", "2000", "--hidden", "32", "--device",
                                                                    "cpu", "--plots", str(tmp_path)])
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("suggested learning rate for adam: ")
    assert (tmp_path / "lr_find.png").stat().st_size > 1000


# ------------------------------------------------------- nothing diverged is kept or loaded
def one_line_error(r, code=2):
    assert r.returncode == code, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    return r.stderr.strip()


TINY = ["--limit", "100", "--hidden", "32", "--val-split", "0", "--batch-size", "100", "--lr-schedule", "constant",
        "--quiet", "--device", "cpu"]


def test_weights_that_diverge_in_an_epoch_with_a_finite_loss_are_neither_saved_nor_checkpointed(tmp_path, data_args):
    # one Adam step of size ~2e38 per epoch: epoch 1's loss is measured before the step (finite), its weights are inf
    ck, saved = tmp_path / "ck", tmp_path / "m.npz"
    r = run(TRAIN + data_args + TINY + ["--lr", "2e38", "--epochs", "1", "--checkpoint-dir", str(ck),
                                        "--save", str(saved)])
    err = one_line_error(r, 1)
    assert err.startswith("training stopped: the weights became NaN or infinite in epoch 1 (parameter W1 (layer 1 "
                          "weights) holds 25088 NaN/inf values (and 3 other parameters)) although its training loss "
                          "was 2.")
    assert err.endswith(f"no checkpoint was written to {ck}")
    assert not saved.exists() and checkpoint.checkpoint_files(ck) == []


def test_divergence_leaves_the_last_good_checkpoint_newest(tmp_path, data_args):
    ck, saved = tmp_path / "ck", tmp_path / "m.npz"
    r = run(TRAIN + data_args + TINY + ["--lr", "3e37", "--epochs", "3", "--checkpoint-dir", str(ck),
                                        "--save", str(saved)])
    err = one_line_error(r, 1)
    assert "the training loss became nan in epoch 2" in err
    assert err.endswith(f"the last good checkpoint is {ck / 'ckpt-epoch-0001.npz'}")
    assert [p.name for p in checkpoint.checkpoint_files(ck)] == ["ckpt-epoch-0001.npz"]
    assert checkpoint.load_latest(ck)["meta"]["epoch"] == 1  # finite: it loads
    assert not saved.exists()


def test_predict_refuses_a_model_with_nan_weights(tmp_path, synthetic_dir):
    m = fastnn.MLP([784, 8, 10])
    params = m.get_params()
    params[2][3, :] = np.nan
    m.set_params(params)
    m.save(tmp_path / "nan.npz")
    images = synthetic_dir / "fashion-mnist" / "t10k-images-idx3-ubyte.gz"
    err = one_line_error(run(PREDICT + [str(tmp_path / "nan.npz"), str(images)]))
    assert err == (f"error: {tmp_path / 'nan.npz'}: parameter W2 (layer 2 weights) holds 10 NaN/inf values: the "
                   "training that wrote it diverged")


def test_ctrl_c_does_not_save_weights_that_went_nan(tmp_path, data_args, monkeypatch, capsys):
    from fastnn.cli import train as cli_train

    def diverge_then_ctrl_c(model, *args, **kwargs):
        model.params[:5] = np.nan
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_train, "fit", diverge_then_ctrl_c)
    saved = tmp_path / "m.npz"
    assert cli_train.run_train(data_args + TINY + ["--save", str(saved)]) == 130
    assert not saved.exists()
    assert capsys.readouterr().err.strip() == ("interrupted; the current weights hold NaN/inf values (the training "
                                               f"was diverging): not saved to {saved}")


# ------------------------------------------------------- a resumed run keeps its network
def test_resume_refuses_flags_that_change_the_network(tmp_path, data_args):
    ck = tmp_path / "ck"
    assert run(TRAIN + data_args + TINY + ["--epochs", "1", "--checkpoint-dir", str(ck)]).returncode == 0
    ckpt = ck / "ckpt-epoch-0001.npz"
    for flags, was in [(["--activation", "tanh"], "with --activation relu"),  # the same parameter count
                       (["--hidden", "300,64"], "with --hidden 32"),
                       (["--dropout", "0.2"], "with --dropout 0"),
                       (["--dtype", "float64"], "with --dtype float32"),
                       (["--standardize"], "without --standardize")]:
        err = one_line_error(run(TRAIN + ["--resume", str(ck), "--epochs", "2"] + flags))
        assert err == (f"error: {' '.join(flags)}: the checkpoint {ckpt} holds a network trained {was}; a resumed "
                       f"run continues that network: drop {flags[0]}, or train the new network in another "
                       "--checkpoint-dir")
    assert [p.name for p in checkpoint.checkpoint_files(ck)] == ["ckpt-epoch-0001.npz"]
    r = run(TRAIN + ["--resume", str(ck), "--epochs", "2", "--hidden", "32", "--dropout", "0", "--quiet"])
    assert r.returncode == 0, r.stderr  # the same network, spelled out: fine


# ------------------------------------------------------- one run per checkpoint folder
def test_a_checkpoint_dir_in_use_is_refused_and_a_killed_runs_lock_taken_over(tmp_path, data_args):
    import socket

    ck = tmp_path / "ck"
    args = TRAIN + data_args + ["--limit", "300", "--hidden", "64", "--epochs", "100000", "--device", "cpu",
                                "--quiet", "--checkpoint-dir", str(ck)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    try:
        deadline = time.time() + 120
        while not checkpoint.checkpoint_files(ck) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.01)
        holder = f"pid {proc.pid} on host {socket.gethostname()} since "
        assert (ck / ".fastnn.lock").read_text().startswith(holder)
        for flags, flag in ((data_args + SMALL + ["--checkpoint-dir", str(ck)], "--checkpoint-dir"),
                            (["--resume", str(ck), "--quiet"], "--resume")):
            err = one_line_error(run(TRAIN + flags))
            assert err.startswith(f"error: {flag} {ck}: in use by {holder}")
            assert err.endswith(": wait for it to end, or use another folder")
        assert proc.poll() is None  # the holder trains on
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    last = checkpoint.load_latest(ck)["meta"]["epoch"]
    r = run(TRAIN + ["--resume", str(ck), "--quiet", "--epochs", str(last + 1)])  # the dead run's lock: taken over
    assert r.returncode == 0, r.stderr
    assert (ck / ".fastnn.lock").read_text() == ""  # released at exit


# ------------------------------------------------------- sizes checked before allocating
def test_a_network_too_big_for_the_machine_is_one_line_before_anything_is_allocated(tmp_path, data_args,
                                                                                    synthetic_dir):
    err = one_line_error(run(TRAIN + data_args + SMALL + ["--hidden", "1000000000"]))
    assert err.startswith("error: --hidden 1000000000: a 784-1000000000-10 network would need 14 TB of memory "
                          "(parameters, gradients, optimizer state, batch buffers, in float32); this machine has ")
    err = one_line_error(run(TRAIN + data_args + ["--epochs", "1", "--layers", "conv3000000k3,dense10"]))
    assert err.startswith("error: --layers conv3000000k3,dense10: a conv3000000k3,dense10 network would need 2.4 TB")
    from fastnn import npzfile

    fastnn.MLP([784, 8, 10]).save(tmp_path / "m.npz")
    meta, arrays = npzfile.load(tmp_path / "m.npz", "fastnn-mlp", "model")
    npzfile.save(tmp_path / "huge.npz", "fastnn-mlp", dict(meta, sizes=[784, 10**9, 10]), arrays)
    images = synthetic_dir / "fashion-mnist" / "t10k-images-idx3-ubyte.gz"
    err = one_line_error(run(PREDICT + [str(tmp_path / "huge.npz"), str(images)]))
    assert err.startswith(f"error: {tmp_path / 'huge.npz'}: a 784-1000000000-10 network would need 14 TB of memory "
                          "(parameters, gradients, optimizer state, batch buffers, in float32); this machine has ")


# ------------------------------------------------------- a validation split of nothing
def test_a_limit_too_small_for_the_validation_split_is_one_line(data_args):
    few = TRAIN + data_args + ["--epochs", "1", "--quiet", "--device", "cpu", "--hidden", "8"]
    err = one_line_error(run(few + ["--limit", "5"]))
    assert err == ("error: --limit 5 with --val-split 0.1 leaves no validation samples (each class needs 2 samples "
                   "to give one to validation; the largest class here has 1): raise --limit or set --val-split 0")
    err = one_line_error(run(few + ["--limit", "5", "--val-split", "0.6"]))
    assert err.startswith("error: --limit 5 with --val-split 0.6 leaves no training samples")
    assert run(few + ["--limit", "5", "--val-split", "0"]).returncode == 0
    assert run(few + ["--limit", "30"]).returncode == 0  # a class with 2 samples gives one: a split


@pytest.mark.accuracy
@pytest.mark.slow
def test_the_cnn_preset_passes_the_mlp_ceiling_in_five_epochs(tmp_path, real_data_args):
    """The conv net's claim in short: 5 epochs of the cnn preset (0.9070 here, 101 s) beat what 20 MLP
    configurations reach (~0.899, README) on Fashion-MNIST's test set."""
    metrics = tmp_path / "m.jsonl"
    args = ["--preset", "cnn", "--epochs", "5", "--quiet", "--metrics", str(metrics)]
    r = subprocess.run(TRAIN + real_data_args + args, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(s) for s in metrics.read_text().splitlines()]
    print(r.stdout.splitlines()[-1])
    assert lines[0]["layers"] == PRESETS["cnn"]["layers"] and lines[0]["translate"] == 1
    assert lines[-1]["test_accuracy"] >= 0.90
