"""ONNX export: the graph passes onnx.checker, and onnxruntime gives the model's own answers."""

import subprocess
import sys

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="onnx is not installed (the onnx extra)")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (the test extra)")

from conftest import REPO  # noqa: E402

import fastnn  # noqa: E402


def run_onnx(path, images):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": images})


@pytest.mark.parametrize("act,loss", [("relu", "xent"), ("sigmoid", "xent"), ("tanh", "xent"), ("relu", "mse"),
                                      ("sigmoid", "mse"), ("tanh", "mse")])
def test_onnxruntime_agrees_with_the_model(synthetic, tmp_path, act, loss):
    x, y, xt, _ = synthetic
    m = fastnn.MLP([784, 32, 16, 10], activation=act, loss=loss, seed=1)
    m.preprocessing = fastnn.Preprocessing(1 / 255, -0.1, 255)
    fastnn.fit(m, x[:2000], y[:2000], epochs=1, lr=0.1 if loss == "xent" else 2.0, optimizer="sgd",
               lr_schedule="constant")
    m.to_onnx(tmp_path / "m.onnx")
    onnx.checker.check_model(onnx.load(tmp_path / "m.onnx"), full_check=True)
    proba, label = run_onnx(tmp_path / "m.onnx", xt)
    np.testing.assert_array_equal(label, m.predict(xt))
    np.testing.assert_allclose(proba, m.predict_proba(xt), atol=1e-5)
    m.to_onnx(tmp_path / "f.onnx", input_type="float")  # float network inputs: no preprocessing inside
    proba_f, _ = run_onnx(tmp_path / "f.onnx", m.preprocess(xt))
    np.testing.assert_allclose(proba_f, proba, atol=1e-5)


def test_the_whole_fashion_mnist_test_set(fashion, tmp_path):
    xtr, ytr, xte, _ = fashion
    m = fastnn.MLP([784, 64, 10], seed=0)
    fastnn.fit(m, xtr, ytr, epochs=1, lr=1e-3, optimizer="adam", lr_schedule="constant")
    m.to_onnx(tmp_path / "m.onnx")
    proba, label = run_onnx(tmp_path / "m.onnx", xte)
    np.testing.assert_array_equal(label, m.predict(xte))
    np.testing.assert_allclose(proba, m.predict_proba(xte), atol=1e-5)


def test_export_command(tmp_path):
    m = fastnn.MLP([16, 8, 3])
    m.save(tmp_path / "m.npz")
    r = subprocess.run([sys.executable, "-m", "fastnn", "export", str(tmp_path / "m.npz"), str(tmp_path / "m.onnx")],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "outputs 'probabilities', 'label'" in r.stdout
    proba, label = run_onnx(tmp_path / "m.onnx", np.arange(32, dtype=np.uint8).reshape(2, 16))
    assert proba.shape == (2, 3) and label.shape == (2,)
