"""Convolutional networks in the one model type: gradients, batched = mean of per-sample, training,
saving and the refusals, on the same kernels and arenas as the dense layers."""

import json
import pickle

import numpy as np
import pytest

import fastnn
from fastnn import ConfigError, layers
from fastnn.backends import NumpyOps, Ops

SPEC = "conv4k3,pool2,conv6k3s,pool2,dense12"  # 10 x 10 images: 8x8x4, 4x4x4, 4x4x6, 2x2x6, 12


def small(n=40, side=10, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, side * side)), rng.integers(0, 3, n)


def net(spec=SPEC, side=10, classes=3, **kw):
    return fastnn.MLP([side * side, classes], layers=spec, **kw)


def test_the_spec_gives_every_layers_shape():
    ls = layers.parse("conv20k5,pool2,conv40k5,pool2,dense100", (28, 28, 1), 10)
    assert [(l.token(), l.shape_out) for l in ls] == [
        ("conv20k5", (24, 24, 20)), ("pool2", (12, 12, 20)), ("conv40k5", (8, 8, 40)), ("pool2", (4, 4, 40)),
        ("dense100", (100,)), ("dense10", (10,))]
    assert [l.weight_shape for l in ls] == [(25, 20), (), (500, 40), (), (640, 100), (100, 10)]
    m = net("conv20k5,pool2,conv40k5,pool2,dense100", side=28, classes=10)
    assert m.sizes == (784, 11520, 2880, 2560, 640, 100, 10)
    assert [p.shape for p in m.get_params()] == [(25, 20), (20,), (500, 40), (40,), (640, 100), (100,), (100, 10),
                                                 (10,)]


@pytest.mark.parametrize("bad,match", [
    ("conv20x5", "'conv20x5' is not a layer"),
    ("dense10,conv4k3", "'conv4k3' comes after a dense layer"),
    ("conv4k4s", "odd kernel"),
    ("pool20", "pools 20 x 20 windows of 10 x 10 images"),
    ("pool12", "'pool12': pooling windows are at most 11 x 11"),
])
def test_a_bad_spec_is_one_error_naming_the_token(bad, match):
    with pytest.raises(ConfigError, match=match):
        net(bad, side=28 if bad == "pool12" else 10)


@pytest.mark.parametrize("spec", [SPEC, "conv3k5s,pool3,dense7", "conv5k1,conv4k3,dense6"])
def test_conv_gradients_match_float64_central_differences(spec):
    x, y = small()
    m = net(spec, dtype="float64", activation="tanh", seed=3)
    report = fastnn.gradcheck(m, x[:6], y[:6], max_entries=40)
    assert report.max_rel_error < 1e-6, str(report)


def test_batched_gradient_is_the_mean_of_per_sample_gradients():
    x, y = small(n=8)
    m = net(dtype="float64", seed=1)
    loss, grads = m.gradients(x, y)
    singles = [m.gradients(x[i:i + 1], y[i:i + 1]) for i in range(8)]
    assert loss == pytest.approx(np.mean([s[0] for s in singles]), rel=1e-12)
    for k, g in enumerate(grads):
        np.testing.assert_allclose(g, np.mean([s[1][k] for s in singles], axis=0), rtol=1e-10, atol=1e-13)


def test_a_conv_net_learns_the_synthetic_digits(synthetic):
    xtr, ytr, xte, yte = synthetic
    m = fastnn.MLP([784, 10], layers="conv8k5,pool2,conv16k5,pool2,dense32", seed=0)
    fastnn.fit(m, xtr[:3000], ytr[:3000], epochs=3, batch_size=64)
    assert m.evaluate(xte, yte)["accuracy"] > 0.95


def test_save_load_pickle_and_clone_keep_the_network(tmp_path):
    x, y = small()
    m = net(dropout=0.3, seed=2)
    fastnn.fit(m, x, y, epochs=2, batch_size=8)
    m.save(tmp_path / "conv.npz")
    for other in (fastnn.MLP.load(tmp_path / "conv.npz"), pickle.loads(pickle.dumps(m)), m.clone()):
        assert other.layers == m.layers and other.dropout == m.dropout
        np.testing.assert_array_equal(other.predict_proba(x), m.predict_proba(x))


def test_dropout_is_for_the_dense_layers():
    m = net(dropout=0.5)
    assert m.dropout == [0.0, 0.0, 0.0, 0.0, 0.5]  # conv, pool, conv, pool: none; dense12: 0.5
    with pytest.raises(ConfigError, match="dropout"):
        net(dropout=[0.5, 0.5])


def test_what_conv_nets_cannot_do_yet_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="stack"):
        fastnn.ModelStack([100, 3], seeds=[0, 1], layers=SPEC)
    with pytest.raises(ConfigError, match="square"):
        fastnn.MLP([90, 3], layers=SPEC)  # 90 pixels: not a square image; give image_shape
    assert fastnn.MLP([90, 3], layers="conv2k3,dense4", image_shape=(9, 10, 1)).sizes[1] == 7 * 8 * 2


def run_cli(args, tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    return subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), *args], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)


def test_the_cli_trains_resumes_and_predicts_a_conv_net_bit_for_bit(synthetic_dir, tmp_path):
    base = ["--data-dir", str(synthetic_dir), "--layers", "conv4k5,pool2,dense16", "--limit", "600", "--device",
            "cpu", "--quiet", "--translate", "2", "--dropout", "0.2"]
    r = run_cli(base + ["--epochs", "2", "--save", "whole.npz", "--metrics", "m.jsonl"], tmp_path)
    assert r.returncode == 0, r.stderr
    config = json.loads((tmp_path / "m.jsonl").read_text().splitlines()[0])
    assert config["type"] == "config" and config["layers"] == "conv4k5,pool2,dense16" and config["hidden"] is None
    r = run_cli(base + ["--epochs", "1", "--checkpoint-dir", "ck"], tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_cli(["--resume", "ck", "--epochs", "2", "--save", "resumed.npz"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "network conv4k5,pool2,dense16 (28x28x1 images) relu/xent" in r.stdout, r.stdout
    whole, resumed = fastnn.MLP.load(tmp_path / "whole.npz"), fastnn.MLP.load(tmp_path / "resumed.npz")
    assert whole.layer_spec == "conv4k5,pool2,dense16" and whole.translate == 2
    for a, b in zip(whole.get_params(), resumed.get_params()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("args,match", [
    (["--layers", "conv4k5,poool2"], "'poool2' is not a layer"),
    (["--layers", "conv4k5", "--hidden", "32"], "give --layers or --hidden, not both"),
    (["--preset", "network3", "--hidden", "32"], "give --layers or --hidden, not both"),
])
def test_a_bad_conv_flag_is_one_line_and_exit_2(args, match, synthetic_dir, tmp_path):
    r = run_cli(["--data-dir", str(synthetic_dir), "--epochs", "1", *args], tmp_path)
    assert r.returncode == 2 and match in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def shifted(image, dy, dx, fill):
    """image (H, W, C) moved down dy rows and right dx columns, ``fill`` moved in (by slicing)."""
    out = np.full_like(image, fill)
    H, W = image.shape[:2]
    out[max(dy, 0):H + min(dy, 0), max(dx, 0):W + min(dx, 0)] = image[max(-dy, 0):H - max(dy, 0),
                                                                      max(-dx, 0):W - max(dx, 0)]
    return out


@pytest.mark.parametrize("ops", [Ops(np), NumpyOps()], ids=["generic", "numpy"])
def test_translate_moves_each_image_within_the_limit_and_differs_by_step(ops):
    rng = np.random.default_rng(0)
    x = rng.random((64, 7, 9, 2))
    out = np.empty_like(x)
    seen, moves_by_step = set(), []
    for step in (0, 1):
        ops.translate(x, out, 2, 5, np.array([step], np.int32), -1.5)
        moves = []
        for i in range(len(x)):  # exactly one shift in [-2, 2]^2 reproduces each image
            found = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                     if np.array_equal(out[i], shifted(x[i], dy, dx, -1.5))]
            assert len(found) == 1, (step, i, found)
            moves.append(found[0])
        seen |= set(moves)
        assert len(set(moves)) > 10  # the shifts vary from image to image
        moves_by_step.append(moves)
    assert moves_by_step[0] != moves_by_step[1] and len(seen) == 25  # a new step, new shifts; every shift drawn


def moved_by_one_shift(out, images, limit, fill) -> bool:
    """Whether each of ``out`` (N, H, W, C) is its image moved by exactly one (dy, dx) in [-limit, limit]^2."""
    return all(sum(np.array_equal(o, shifted(im, dy, dx, fill)) for dy in range(-limit, limit + 1)
                   for dx in range(-limit, limit + 1)) == 1 for o, im in zip(out, images))


def test_a_model_translates_its_training_batches_only_with_a_blank_pixel_moved_in():
    x = np.random.default_rng(1).integers(1, 256, (8, 100), dtype=np.uint8)  # no 0 pixel: the fill shows
    model = fastnn.MLP([100, 3], layers="conv2k3,dense4", translate=3)
    model.preprocessing = fastnn.Preprocessing(scale=1 / 255, shift=-0.5)
    ws = model.workspace(8)
    idx = model.ops.asarray(np.arange(8))
    model.load_batch(ws, model.ops.asarray(x), None, idx)
    plain = ws.x.copy()
    np.testing.assert_allclose(plain, x / 255 - 0.5, rtol=1e-6, atol=1e-7)  # evaluation: no translation
    model.load_batch(ws, model.ops.asarray(x), None, idx, train=True)
    from_uint8 = ws.x.copy()
    assert moved_by_one_shift(from_uint8.reshape(8, 10, 10, 1), plain.reshape(8, 10, 10, 1), 3, np.float32(-0.5))
    assert not np.array_equal(from_uint8, plain)
    model.load_batch(ws, model.ops.asarray(plain), None, idx, train=True)  # the same images as network inputs
    np.testing.assert_array_equal(ws.x, from_uint8)  # the same shifts, and the same blank pixel (-0.5) moved in
    back = fastnn.MLP.from_config(model.config())
    assert back.translate == 3 and back.image_shape == (10, 10, 1) and model.uses_dropout


def test_an_mlp_translates_images_of_the_shape_given_and_fit_draws_new_shifts_each_step():
    model = fastnn.MLP([100, 3], translate=2, image_shape=(5, 20))  # not square: 5 x 20 single-channel images
    assert model.image_shape == (5, 20, 1) and fastnn.MLP.from_config(model.config()).image_shape == (5, 20, 1)
    x = np.random.default_rng(2).standard_normal((6, 100)).astype(np.float32) + 3  # float inputs, none 0
    ws = model.workspace(6)
    shifts = []
    for _ in range(2):
        model.load_batch(ws, model.ops.asarray(x), None, model.ops.asarray(np.arange(6)), train=True)
        assert moved_by_one_shift(ws.x.reshape(6, 5, 20, 1), x.reshape(6, 5, 20, 1), 2, np.float32(0))
        shifts.append(ws.x.copy())
        model.ops.count(model.step)
    assert not np.array_equal(*shifts)
    fastnn.fit(model, np.tile(x, (4, 1)), np.arange(24) % 3, epochs=1, batch_size=8)  # no dropout: shifts alone
    assert int(model.ops.to_host(model.step)[0]) == 2 + 3  # each of the 3 steps advanced the counter
    with pytest.raises(ConfigError, match="translate must be less than the images' side \\(5 pixels\\)"):
        fastnn.MLP([100, 3], translate=5, image_shape=(5, 20))
    with pytest.raises(ConfigError, match="translate must be less than the images' side"):
        fastnn.MLP([100, 3], layers="conv2k3,dense4", translate=10)
    with pytest.raises(ConfigError, match="translate must be a whole number >= 0, got -1"):
        fastnn.MLP([100, 3], translate=-1)


def test_resuming_a_cnn_run_from_before_translate_keeps_its_images_unshifted():
    """A checkpoint of the cnn preset written before the preset shifted images has no translate key: the
    resumed run continues the network it had (no shifts), not the preset's current one."""
    from fastnn.cli.flags import DEFAULTS, PRESETS, resolve_config, train_parser

    stored = {k: v for k, v in {**DEFAULTS, **PRESETS["cnn"], "preset": "cnn"}.items() if k != "translate"}
    cfg = resolve_config(train_parser().parse_args(["--resume", "ck"]), stored)
    assert cfg["translate"] == 0 and cfg["layers"] == PRESETS["cnn"]["layers"]
    assert resolve_config(train_parser().parse_args(["--resume", "ck"]), {**stored, "translate": 1})["translate"] == 1


def test_a_conv_net_too_big_for_memory_is_one_error_before_anything_is_allocated(tmp_path):
    """Its layers give the estimate (parameters, outputs and each convolution's patches), not the widths."""
    from fastnn import guards

    m = net("conv4k3s,pool2,dense5", dtype="float64")
    patches = 100 * 9  # the one convolution's patches (their gradient reuses the buffer), per image
    params = (9 * 4 + 4) + (100 * 5 + 5) + (5 * 3 + 3)  # conv, dense (after pooling to 5x5x4), output
    assert guards.training_bytes(m.sizes, np.float64, batch=2, layers=m.layers) == (
        4 * params + 2 * (100 + 2 * sum(m.sizes[1:]) + patches)) * 8
    with pytest.raises(ConfigError, match=r"a conv100000k3s,dense10 network would need \d+ GB of memory"):
        fastnn.MLP([784, 10], layers="conv100000k3s,dense10")
