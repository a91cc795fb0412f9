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


# ------------------------------------------------------------------ conv nets
def conv_net(spec, image_shape, classes=5, act="relu", loss="xent", seed=0):
    """A conv net on flat (N, H*W*C) inputs with random weights and biases (not zero biases, not the init's
    scale only), and a preprocessing with a shift, so every part of the graph shows in its outputs."""
    h, w, c = image_shape
    m = fastnn.MLP([h * w * c, classes], activation=act, loss=loss, layers=spec, image_shape=image_shape, seed=seed)
    rng = np.random.default_rng(seed)
    m.set_params([rng.standard_normal(p.shape) * (1.5 / np.sqrt(p.shape[0]) if p.ndim == 2 else 0.2)
                  for p in m.get_params()])
    m.preprocessing = fastnn.Preprocessing(1 / 255, -0.3, 255)
    return m


def pixels(n, image_shape, seed=1):
    """(n, H*W*C) uint8 raw pixels, NHWC order flattened."""
    return np.random.default_rng(seed).integers(0, 256, (n, int(np.prod(image_shape))), dtype=np.uint8)


def assert_onnx_agrees(m, path, x):
    """Both input types of ``m``'s export against predict_proba / predict of the raw pixels x (N, D) uint8."""
    proba, label = m.predict_proba(x), m.predict(x)
    for input_type, images in (("uint8", x), ("float", m.preprocess(x))):
        m.to_onnx(path, input_type=input_type)
        onnx.checker.check_model(onnx.load(path), full_check=True)
        p, lab = run_onnx(path, images)
        assert p.shape == proba.shape and p.dtype == np.float32 and lab.dtype == np.int64
        np.testing.assert_allclose(p, proba, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(lab, label)
    return p


@pytest.mark.parametrize("spec,image_shape", [("conv4k3s,pool2,conv6k3,dense8", (12, 12, 1)),
                                              ("conv4k3s,pool2,conv6k3,dense8", (12, 12, 3)),
                                              ("conv3k3,pool3,dense5", (10, 14, 2)),  # pooling's floor: 8x12 -> 2x4
                                              ("pool2,conv5k5s,conv2k1", (9, 11, 1)),  # no hidden dense layer
                                              ("dense6", (4, 4, 1))])  # a conv spec of dense layers only
@pytest.mark.parametrize("act,loss", [("relu", "xent"), ("tanh", "xent"), ("sigmoid", "mse")])
def test_a_conv_net_in_onnxruntime_agrees_with_the_model(tmp_path, spec, image_shape, act, loss):
    m = conv_net(spec, image_shape, act=act, loss=loss)
    assert_onnx_agrees(m, tmp_path / "c.onnx", pixels(64, image_shape))
    ops = {n.op_type for n in onnx.load(tmp_path / "c.onnx").graph.node}
    assert ("Conv" in ops) == ("conv" in spec) and ("MaxPool" in ops) == ("pool" in spec)


def test_the_flatten_order_of_non_square_multichannel_images(tmp_path):
    """10 x 14 x 2 images: the graph must flatten (H, W, C) as fastnn does. The same network with the
    first dense layer's rows read in (C, H, W) or (W, H, C) order (what a wrong flatten computes) gives
    other probabilities, so a wrong order in the graph would fail the comparison."""
    shape = (10, 14, 2)
    m = conv_net("conv3k3s,dense7", shape, seed=4)
    x = pixels(32, shape)
    proba = assert_onnx_agrees(m, tmp_path / "c.onnx", x)
    h, w, c = m.layers[0].shape_out  # the first dense layer's input: (10, 14, 3)
    for wrong in (np.arange(h * w * c).reshape(c, h, w).transpose(1, 2, 0).ravel(),  # CHW flatten
                  np.arange(h * w * c).reshape(w, h, c).transpose(1, 0, 2).ravel()):  # H and W swapped
        params = m.get_params()
        params[2] = params[2][wrong]
        other = m.clone()
        other.set_params(params)
        assert np.abs(other.predict_proba(x) - proba).max() > 1e-2


def test_export_command_writes_a_conv_net(tmp_path):
    shape = (12, 12, 1)
    m = conv_net("conv4k3s,pool2,conv6k3,dense8", shape, classes=4)
    m.classes = ["a", "b", "c", "d"]
    m.save(tmp_path / "c.npz")
    x = pixels(16, shape)
    for input_type, images in (("uint8", x), ("float", m.preprocess(x))):
        r = subprocess.run([sys.executable, "-m", "fastnn", "export", str(tmp_path / "c.npz"), str(tmp_path / "c.onnx"),
                            "--input-type", input_type], capture_output=True, text=True, cwd=REPO)
        assert r.returncode == 0, r.stderr
        assert f"input 'images' {input_type}, outputs 'probabilities', 'label'" in r.stdout
        proba, label = run_onnx(tmp_path / "c.onnx", images)
        np.testing.assert_allclose(proba, m.predict_proba(x), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(label, m.predict(x))
    props = {p.key: p.value for p in onnx.load(tmp_path / "c.onnx").metadata_props}
    assert props["classes"] == "a,b,c,d"
