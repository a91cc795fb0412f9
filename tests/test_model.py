"""The MLP and fit(): API contract, dtypes, per-sample training, saving, clear errors."""

import numpy as np
import pytest

import fastnn


def toy(n=64, d=12, k=3, seed=0):
    """A separable toy problem: class = argmax of three fixed projections."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    y = (x @ rng.standard_normal((d, k))).argmax(axis=1)
    return x, y


def test_params_layout_and_roundtrip():
    m = fastnn.MLP([5, 4, 3], seed=1)
    p = m.get_params()
    assert [a.shape for a in p] == [(5, 4), (4,), (4, 3), (3,)]
    assert all(a.dtype == np.float32 for a in p)
    new = [np.full_like(a, i) for i, a in enumerate(p)]
    m.set_params(new)
    for a, b in zip(m.get_params(), new):
        np.testing.assert_array_equal(a, b)
    # the views share the arena: a step over the arena moves every layer
    assert m.params.size == sum(a.size for a in p)
    assert np.shares_memory(m.W[1], m.params) and np.shares_memory(m.gb[0], m.grads)
    assert [w.shape for w in m.W] == [(5, 4), (4, 3)] and [b.shape for b in m.b] == [(4,), (3,)]
    np.testing.assert_array_equal(m.b[1], new[3])


def test_float32_end_to_end_through_an_epoch():
    x, y = toy()
    m = fastnn.MLP([12, 8, 3])
    seen = []
    orig = m.forward

    def spy(ws, train=False):
        out = orig(ws, train)
        seen.extend([ws.x.dtype, *(a.dtype for a in ws.acts), *(d.dtype for d in ws.deltas)])
        return out

    m.forward = spy
    fastnn.fit(m, x.astype(np.float64), y, epochs=1, batch_size=16, optimizer="adam", lr=0.01, lr_schedule="constant")
    assert seen and set(seen) == {np.dtype(np.float32)}
    assert m.params.dtype == np.float32 and m.grads.dtype == np.float32
    opt = fastnn.make_optimizer("adam", m, 0.01)
    assert all(v.dtype == np.float32 for k, v in opt.state.items() if k != "t")  # t: the step count


def test_float64_on_request():
    m = fastnn.MLP([4, 3], dtype="float64")
    assert m.params.dtype == np.float64
    assert m.get_params()[0].dtype == np.float64


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.5), ("momentum", 0.1), ("nesterov", 0.1), ("adam", 0.01)])
def test_fit_learns_a_toy_problem(optimizer, lr):
    x, y = toy(n=512)
    m = fastnn.MLP([12, 16, 3])
    before = m.evaluate(x, y)
    hist = fastnn.fit(m, x, y, epochs=20, batch_size=32, lr=lr, optimizer=optimizer, x_val=x, y_val=y,
                      lr_schedule="constant")
    assert hist[-1]["train_loss"] < before["loss"] / 3
    assert hist[-1]["val_accuracy"] > 0.95
    keys = {"epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "seconds"}
    assert keys <= hist[0].keys()
    assert [h["epoch"] for h in hist] == list(range(1, 21))


def manual_sgd(x, y, epochs, batch, lr, seed):
    """Plain SGD written out by hand with model.gradients: the reference for fit()."""
    ref = fastnn.MLP([12, 6, 3], dtype="float64", seed=4)
    rng = np.random.default_rng(seed)
    params = ref.get_params()
    for _ in range(epochs):
        perm = rng.permutation(len(y))
        for s in range(0, len(y), batch):
            i = perm[s:s + batch]
            _, g = ref.gradients(x[i], y[i])
            params = [p - lr * gi for p, gi in zip(params, g)]
            ref.set_params(params)
    return params


def test_per_sample_fit_is_one_sgd_step_per_sample_in_shuffled_order():
    x, y = toy(n=20)
    m = fastnn.MLP([12, 6, 3], dtype="float64", seed=4)
    fastnn.fit(m, x, y, epochs=2, per_sample=True, lr=0.1, seed=7, optimizer="sgd", lr_schedule="constant")
    for a, b in zip(m.get_params(), manual_sgd(x, y, 2, 1, 0.1, 7)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_batched_fit_equals_manual_minibatch_sgd_with_ragged_last_batch():
    x, y = toy(n=50)
    m = fastnn.MLP([12, 6, 3], dtype="float64", seed=4)
    fastnn.fit(m, x, y, epochs=1, batch_size=16, lr=0.3, seed=3, optimizer="sgd",  # batches of 16, 16, 16, 2
               lr_schedule="constant")
    for a, b in zip(m.get_params(), manual_sgd(x, y, 1, 16, 0.3, 3)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_train_loss_is_mean_over_the_epoch():
    x, y = toy(n=40)
    m = fastnn.MLP([12, 3], dtype="float64")
    ref = fastnn.MLP([12, 3], dtype="float64")
    hist = fastnn.fit(m, x, y, epochs=1, batch_size=40, lr=0.1, optimizer="sgd",  # one batch: loss before the step
                      lr_schedule="constant")
    assert hist[0]["train_loss"] == pytest.approx(ref.evaluate(x, y)["loss"], rel=1e-12)
    assert hist[0]["train_accuracy"] == ref.evaluate(x, y)["accuracy"]


def test_uint8_inputs_are_scaled_like_float_inputs():
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (30, 10), dtype=np.uint8)
    m = fastnn.MLP([10, 5, 3])
    np.testing.assert_allclose(m.outputs(u8), m.outputs(u8 / 255.0), rtol=1e-5, atol=1e-6)


def test_predict_and_evaluate_agree():
    x, y = toy(n=300)
    m = fastnn.MLP([12, 8, 3])
    fastnn.fit(m, x, y, epochs=3, lr=0.1, optimizer="sgd", lr_schedule="constant")
    pred = m.predict(x, batch_size=64)
    assert pred.dtype == np.int64 and pred.shape == (300,)
    ev = m.evaluate(x, y, batch_size=64)
    assert ev["accuracy"] == pytest.approx(np.mean(pred == y))
    z = m.outputs(x).astype(np.float64)
    lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    assert ev["loss"] == pytest.approx(np.mean(lse - z[np.arange(300), y]), rel=1e-5)


def test_save_and_load_roundtrip(tmp_path):
    x, y = toy()
    m = fastnn.MLP([12, 7, 3], activation="tanh", loss="mse", dtype="float64", seed=9)
    m.preprocessing = fastnn.Preprocessing(scale=0.5)
    path = tmp_path / "model.npz"
    m.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["model.npz"]  # no temporary file left
    m2 = fastnn.MLP.load(path)
    assert (m2.sizes, m2.activation, m2.loss, m2.dtype, m2.preprocessing.scale) == (
        m.sizes, "tanh", "mse", np.dtype("float64"), 0.5)
    for a, b in zip(m.get_params(), m2.get_params()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(m.predict(x), m2.predict(x))


def test_load_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(fastnn.DataError, match="bad.npz"):
        fastnn.MLP.load(bad)
    with pytest.raises(fastnn.DataError, match="no such file"):
        fastnn.MLP.load(tmp_path / "missing.npz")
    other = tmp_path / "other.npz"
    np.savez(other, a=np.zeros(3))
    with pytest.raises(fastnn.DataError, match="not a valid fastnn model"):
        fastnn.MLP.load(other)


@pytest.mark.parametrize("kwargs,match", [
    ({"activation": "swish"}, "unknown activation 'swish'"),
    ({"loss": "hinge"}, "unknown loss 'hinge'"),
    ({"init": "orthogonal"}, "unknown init"),
    ({"device": "tpu"}, "unknown device 'tpu'"),
    ({"dtype": "float16"}, "unknown dtype"),
])
def test_unknown_names_are_config_errors(kwargs, match):
    with pytest.raises(fastnn.ConfigError, match=match):
        fastnn.MLP([4, 3], **kwargs)


def test_unknown_optimizer():
    x, y = toy()
    with pytest.raises(fastnn.ConfigError, match="unknown optimizer 'rmsprop'"):
        fastnn.fit(fastnn.MLP([12, 3]), x, y, optimizer="rmsprop")


@pytest.mark.parametrize("kwargs,match", [
    ({"eps": 0.0}, r"Adam's eps must be > 0, got 0.0"),  # a zero moment (flushed or never set) would divide by 0
    ({"eps": float("nan")}, "Adam's eps must be > 0"),
    ({"betas": (0.9, 1.0)}, r"each of Adam's betas must be in \[0, 1\), got 1.0"),  # 1 - b2^t = 0
    ({"betas": 0.9}, "Adam's betas must be two numbers"),
])
def test_adam_refuses_eps_and_betas_it_would_divide_by_zero_with(kwargs, match):
    with pytest.raises(fastnn.ConfigError, match=match):
        fastnn.optim.Adam(fastnn.MLP([4, 3]), **kwargs)


def test_bad_data_gets_clear_errors():
    x, y = toy()
    m = fastnn.MLP([12, 3])
    with pytest.raises(fastnn.DataError, match=r"shape \(64, 11\), the model expects \(N, 12\)"):
        fastnn.fit(m, x[:, :11], y)
    with pytest.raises(fastnn.DataError, match=r"labels must be in 0..2, found values in 0..3"):
        fastnn.fit(m, x, np.where(y == 2, 3, y))
    with pytest.raises(fastnn.DataError, match="labels must be in"):
        m.evaluate(x, y - 1)
    bad = x.copy()
    bad[3, 4] = np.nan
    with pytest.raises(fastnn.DataError, match="NaN"):
        fastnn.fit(m, bad, y)
    with pytest.raises(fastnn.DataError, match="expected integer class labels"):
        fastnn.fit(m, x, y.astype(np.float32))
    with pytest.raises(fastnn.DataError, match=r"labels have shape \(63,\)"):
        fastnn.fit(m, x, y[:-1])
    with pytest.raises(fastnn.DataError, match="NaN"):
        m.predict(np.full((2, 12), np.inf, np.float32))


def test_gpu_request_without_cuda_is_a_clear_error():
    if fastnn.cuda_status() is None:
        pytest.skip("a GPU is present")
    with pytest.raises(fastnn.DeviceError, match="device 'gpu' is not usable: "):
        fastnn.MLP([4, 3], device="gpu")
    assert fastnn.MLP([4, 3], device="auto").device == "cpu"


def test_divergence_is_reported():
    x, y = toy()
    m = fastnn.MLP([12, 8, 3])
    with pytest.raises(fastnn.DivergedError, match="learning rate") as info:
        fastnn.fit(m, x * 1e4, y, epochs=5, lr=1e30, optimizer="sgd", lr_schedule="constant")
    assert len(info.value.history) >= 1


@pytest.mark.slow
def test_fashion_mnist_two_epochs_reaches_85_percent(fashion):
    xtr, ytr, xte, yte = fashion
    m = fastnn.MLP([784, 128, 64, 10], activation="relu")
    hist = fastnn.fit(m, xtr, ytr, epochs=2, batch_size=128, lr=2e-3, optimizer="adam",
                      x_val=xte, y_val=yte, lr_schedule="constant")
    assert hist[-1]["val_accuracy"] >= 0.85


def test_early_stopping_restores_the_best_weights():
    x, y = toy(n=200)
    xv, yv = toy(n=100, seed=1)
    m = fastnn.MLP([12, 32, 3], seed=0)
    seen = []

    def record(rec):
        seen.append((rec["val_loss"], m.get_params()))

    # a learning rate this high makes the validation loss go up and down
    hist = fastnn.fit(m, x, y, epochs=40, batch_size=8, lr=2.0, optimizer="sgd", x_val=xv, y_val=yv,
                      patience=3, on_epoch=record, lr_schedule="constant")
    assert hist[-1].get("early_stop") and len(hist) < 40
    best = int(np.argmin([v for v, _ in seen]))
    for a, b in zip(m.get_params(), seen[best][1]):
        np.testing.assert_array_equal(a, b)
    assert m.evaluate(xv, yv)["loss"] == pytest.approx(seen[best][0], rel=1e-6)


def test_cosine_schedule():
    x, y = toy()
    hist = fastnn.fit(fastnn.MLP([12, 3]), x, y, epochs=4, lr=0.2, lr_schedule="cosine", optimizer="sgd")
    assert [round(h["lr"], 6) for h in hist] == [0.2, round(0.1 * (1 + np.cos(np.pi / 4)), 6), 0.1,
                                                 round(0.1 * (1 + np.cos(3 * np.pi / 4)), 6)]


def test_preprocess_maps_any_raw_form_to_the_training_inputs(tmp_path):
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (5, 12), dtype=np.uint8)
    m = fastnn.MLP([12, 3])
    m.preprocessing = fastnn.Preprocessing(1 / (255 * 0.3), -0.4 / 0.3)  # standardized pixels
    want = u8 / (255 * 0.3) - 0.4 / 0.3
    for raw in (u8, u8 / 255.0, u8.astype(np.float64)):
        np.testing.assert_allclose(m.preprocess(raw), want, rtol=1e-5, atol=1e-5)
    m.preprocessing = fastnn.Preprocessing(2.0, -1.0, pixel_max=1.0)  # trained on images already in [0, 1]
    np.testing.assert_allclose(m.preprocess(u8), u8 / 255 * 2 - 1, rtol=1e-5, atol=1e-5)
    m.save(tmp_path / "m.npz")
    assert fastnn.MLP.load(tmp_path / "m.npz").preprocessing.pixel_max == 1.0


@pytest.mark.parametrize("prep", [fastnn.Preprocessing(), fastnn.Preprocessing(2.0, -1.0, pixel_max=1.0),
                                  fastnn.Preprocessing(1 / (255 * 0.3), -0.4 / 0.3)])
def test_one_preprocessing_for_uint8_batches_raw_images_and_the_doctor(prep):
    """The gather kernel, ``preprocess`` and the doctor's view of the inputs agree, whatever the pixel range."""
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (30, 10), dtype=np.uint8)
    m = fastnn.MLP([10, 5, 3], dtype="float64")
    m.preprocessing = prep
    x = m.preprocess(u8)
    np.testing.assert_allclose(m.outputs(u8), m.outputs(x), rtol=1e-12)
    np.testing.assert_allclose(prep.network_inputs(u8, np.float64), x, rtol=1e-12)


def test_workspaces_are_kept_for_a_few_batch_sizes_only():
    m = fastnn.MLP([12, 3])
    for b in range(1, 20):
        m.workspace(b)
    assert len(m._workspaces) == 4
    ws = m.workspace(128)
    assert m.workspace(128) is ws


def test_fit_refuses_hyperparameters_beside_an_optimizer_instance():
    x, y = toy()
    m = fastnn.MLP([12, 3])
    opt = fastnn.make_optimizer("momentum", m, lr=0.1)
    with pytest.raises(fastnn.ConfigError, match="fit got an Optimizer instance and lr, weight_decay"):
        fastnn.fit(m, x, y, epochs=1, optimizer=opt, lr=0.5, weight_decay=0.1, lr_schedule="constant")
    fastnn.fit(m, x, y, epochs=1, optimizer=opt, lr_schedule="constant")  # its own lr, 0.1
    assert opt.lr == 0.1 and opt.steps == 1


def test_a_file_of_a_newer_format_version_is_refused(tmp_path):
    from fastnn import checkpoint, npzfile

    m = fastnn.MLP([4, 2])
    npzfile.save(tmp_path / "new.npz", "fastnn-mlp", dict(m.config(), future=True),
                 {f"p{i}": p for i, p in enumerate(m.get_params())})
    assert fastnn.MLP.load(tmp_path / "new.npz").sizes == (4, 2)
    meta, arrays = npzfile.load(tmp_path / "new.npz", "fastnn-mlp", "model")
    meta["version"] = npzfile.FORMAT_VERSION + 1
    npzfile.atomic_savez(tmp_path / "newer.npz", dict(arrays, meta=np.frombuffer(
        __import__("json").dumps(meta).encode(), np.uint8)))
    with pytest.raises(fastnn.DataError, match="newer.npz: a fastnn model file of format version 2; this "
                                               "fastnn reads up to version 1"):
        fastnn.MLP.load(tmp_path / "newer.npz")
    with pytest.raises(fastnn.DataError, match="not a valid checkpoint .format 'fastnn-mlp'"):
        checkpoint.read_checkpoint(tmp_path / "new.npz")


def test_stratified_split_is_disjoint_stratified_and_seeded():
    from fastnn.loop import stratified_split

    y = np.repeat(np.arange(4), [100, 50, 10, 2])
    tr, va = stratified_split(y, 0.1, seed=3)
    assert np.intersect1d(tr, va).size == 0 and np.union1d(tr, va).size == len(y)
    assert [int(np.sum(y[va] == c)) for c in range(4)] == [10, 5, 1, 1]  # every class, in proportion
    np.testing.assert_array_equal(stratified_split(y, 0.1, seed=3)[1], va)
    assert not np.array_equal(stratified_split(y, 0.1, seed=4)[1], va)
    assert stratified_split(y, 0.0)[1].size == 0


def test_fit_holds_out_a_validation_split(synthetic):
    x, y = synthetic[0][:600], synthetic[1][:600]
    m = fastnn.MLP([784, 16, 10], seed=1)
    hist = fastnn.fit(m, x, y, epochs=1, lr=0.05, validation_split=0.2, seed=2, optimizer="sgd", lr_schedule="constant")
    assert hist[0]["val_accuracy"] is not None
    from fastnn.loop import stratified_split

    tr, va = stratified_split(y, 0.2, seed=2)
    assert hist[0]["val_loss"] == pytest.approx(m.evaluate(x[va], y[va])["loss"], rel=1e-6)
    with pytest.raises(fastnn.ConfigError, match="validation_split or x_val/y_val, not both"):
        fastnn.fit(m, x, y, epochs=1, validation_split=0.2, x_val=x[:5], y_val=y[:5], optimizer="sgd",
                   lr_schedule="constant", lr=0.1)


@pytest.mark.parametrize("loss", ["xent", "mse"])
def test_predict_proba_rows_are_distributions_that_agree_with_predict(synthetic, loss):
    x, y = synthetic[0][:500], synthetic[1][:500]
    m = fastnn.MLP([784, 16, 10], activation="sigmoid", loss=loss, seed=1)
    fastnn.fit(m, x, y, epochs=1, lr=0.5, optimizer="sgd", lr_schedule="constant")
    p = m.predict_proba(x[:50])
    assert p.shape == (50, 10) and p.dtype == np.float64
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(p.argmax(axis=1), m.predict(x[:50]))
    if loss == "xent":  # the softmax of the logits, written out
        z = m.outputs(x[:50]).astype(np.float64)
        np.testing.assert_allclose(p, np.exp(z) / np.exp(z).sum(axis=1, keepdims=True), rtol=1e-6)


def test_models_and_optimizers_pickle_and_deepcopy(synthetic):
    import copy
    import pickle

    x, y = synthetic[0][:300], synthetic[1][:300]
    m = fastnn.MLP([784, 16, 10], seed=1)
    m.preprocessing = fastnn.Preprocessing(1 / 255, -0.5, 255)
    m.classes = [f"c{i}" for i in range(10)]
    opt = fastnn.make_optimizer("adam", m, 1e-2)
    fastnn.fit(m, x, y, epochs=1, optimizer=opt, lr_schedule="constant")
    m2, opt2 = pickle.loads(pickle.dumps((m, opt)))
    assert opt2.model is m2 and opt2.steps == opt.steps and m2.classes == m.classes
    np.testing.assert_array_equal(m2.predict_proba(x), m.predict_proba(x))
    for k in opt.state:
        np.testing.assert_array_equal(opt2.state[k], opt.state[k])
    # both continue identically
    fastnn.fit(m, x, y, epochs=1, optimizer=opt, seed=3, lr_schedule="constant")
    fastnn.fit(m2, x, y, epochs=1, optimizer=opt2, seed=3, lr_schedule="constant")
    np.testing.assert_array_equal(m2.params, m.params)
    m3 = copy.deepcopy(m)
    m3.params[0] += 1
    assert m3.params[0] != m.params[0]


def test_a_gpu_model_unpickles_on_the_cpu_with_a_warning_when_no_gpu(monkeypatch):
    import pickle

    import fastnn.backends as backends

    m = fastnn.MLP([4, 3])
    state = m.__getstate__()
    state["device"] = "gpu"
    monkeypatch.setattr(backends, "cuda_status", lambda: "no CUDA device found")
    restored = fastnn.MLP.__new__(fastnn.MLP)
    with pytest.warns(RuntimeWarning, match="no CUDA device found.*loaded on the CPU"):
        restored.__setstate__(pickle.loads(pickle.dumps(state)))
    assert restored.device == "cpu"
    np.testing.assert_array_equal(restored.params, m.params)


def test_fit_verbose_prints_a_line_per_epoch_without_a_terminal(tmp_path):
    import subprocess
    import sys

    code = ("import numpy as np, fastnn\n"
            "x = np.random.default_rng(0).random((200, 8)); y = np.arange(200) % 2\n"
            "fastnn.fit(fastnn.MLP([8, 4, 2]), x, y, epochs=3, validation_split=0.1, verbose=1)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [ln.split()[1] for ln in lines] == ["1/3", "2/3", "3/3"]
    assert all("train loss" in ln and "val loss" in ln for ln in lines)
    assert "\r" not in r.stderr  # no bar redrawn into a redirected log


def test_lr_find_leaves_the_model_alone_and_suggests_a_rate_on_the_falling_slope(synthetic):
    x, y = synthetic[0][:2000], synthetic[1][:2000]
    m = fastnn.MLP([784, 32, 10], seed=1)
    before = m.params.copy()
    r = fastnn.lr_find(m, x, y, optimizer="sgd", steps=60)
    np.testing.assert_array_equal(m.params, before)
    lrs, losses = np.array(r["lrs"]), np.array(r["losses"])
    np.testing.assert_allclose(np.diff(np.log(lrs)), np.log(1e7) / 59, rtol=1e-9)  # exponential steps
    assert np.isfinite(losses).all()
    wild = fastnn.lr_find(m, x, y, optimizer="sgd", end=1e5, steps=60)
    assert len(wild["lrs"]) < 60 and np.isfinite(wild["losses"]).all()  # it stopped where the loss diverged
    i = int(np.argmin(np.abs(np.log(lrs / r["suggested"]))))
    assert losses[i] < losses[0] and 1e-4 < r["suggested"] < r["min_loss_lr"] <= lrs[-1]
    with pytest.raises(fastnn.ConfigError, match="0 < start < end"):
        fastnn.lr_find(m, x, y, start=1.0, end=0.1)


def test_balanced_class_weights_are_scikit_learns():
    from fastnn.loop import class_weights

    y = np.array([0] * 6 + [1] * 3 + [2])
    np.testing.assert_allclose(class_weights(y, "balanced", 3), [10 / 18, 10 / 9, 10 / 3])
    np.testing.assert_allclose(class_weights(y, {2: 5.0}, 3), [1, 1, 5])
    with pytest.raises(fastnn.ConfigError, match="class_weight names class 7"):
        class_weights(y, {7: 1.0}, 3)


def test_fit_with_class_weights_reports_the_weighted_mean_loss(synthetic):
    x, y = synthetic[0][:400], synthetic[1][:400]
    m = fastnn.MLP([784, 16, 10], seed=1)
    w = np.where(y == 3, 5.0, 1.0)
    fastnn.fit(m, x, y, epochs=1, lr=0.05, sample_weight=w, optimizer="sgd", lr_schedule="constant")
    snapshot = m.clone()
    hist = fastnn.fit(m, x, y, epochs=1, lr=0.0, sample_weight=w, optimizer="sgd",  # lr 0: the loss of fixed weights
                      lr_schedule="constant")
    losses = []
    for i in range(400):
        losses.append(snapshot.gradients(x[i:i + 1], y[i:i + 1])[0])
    assert hist[0]["train_loss"] == pytest.approx(np.average(losses, weights=w), rel=1e-4)
    with pytest.raises(fastnn.ConfigError, match="finite and >= 0, and not all zero"):
        fastnn.fit(m, x, y, epochs=1, sample_weight=np.zeros(400), optimizer="sgd", lr_schedule="constant", lr=0.1)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_rows_prediction_does_not_depend_on_its_batch(dtype):
    """Single rows, random subsets and odd chunk sizes give each row the bits of the full batch
    (BLAS's GEMM sums in an order that changes with the batch's size: prediction is row by row)."""
    rng = np.random.default_rng(5)
    x = rng.random((257, 50)).astype(dtype)
    m = fastnn.MLP([50, 37, 19, 6], dtype=dtype, seed=2)
    full, logits = m.predict_proba(x), m.outputs(x)
    for i in rng.permutation(257)[:40]:
        np.testing.assert_array_equal(m.predict_proba(x[i:i + 1]), full[i:i + 1])
    for size in (2, 3, 7, 64, 129):
        rows = rng.permutation(257)[:size]
        np.testing.assert_array_equal(m.predict_proba(x[rows]), full[rows])
        np.testing.assert_array_equal(m.outputs(x[rows]), logits[rows])
    np.testing.assert_array_equal(m.predict_proba(x, batch_size=10), full)
    stack = fastnn.ModelStack([50, 19, 6], seeds=[1, 2], dtype=dtype)
    each = stack.predict_proba(x, each=True)
    np.testing.assert_array_equal(stack.predict_proba(x[5:6], each=True), each[:, 5:6])


def test_a_model_file_with_nan_or_inf_weights_is_refused_naming_the_parameter(tmp_path):
    m = fastnn.MLP([12, 6, 4, 3])
    params = m.get_params()
    params[2].reshape(-1)[:12] = np.nan  # W2
    params[2][0, 0], params[5][1] = np.inf, -np.inf  # and b3
    m.set_params(params)
    m.save(tmp_path / "diverged.npz")
    with pytest.raises(fastnn.DataError) as e:
        fastnn.MLP.load(tmp_path / "diverged.npz")
    assert str(e.value) == (f"{tmp_path / 'diverged.npz'}: parameter W2 (layer 2 weights) holds 12 NaN/inf values "
                            "(and 1 other parameter): the training that wrote it diverged")
    params[2][...], params[5][...] = 0.0, 0.0
    m.set_params(params)
    m.save(tmp_path / "fine.npz")
    fastnn.MLP.load(tmp_path / "fine.npz")


def test_fit_stops_when_the_weights_diverge_in_an_epoch_whose_loss_was_finite():
    """One step per epoch: the loss is computed before the update, so only the weights show it."""
    x, y = toy(n=64)
    m = fastnn.MLP([12, 8, 3], seed=0)
    with pytest.raises(fastnn.DivergedError, match="weights became NaN or infinite in epoch 1") as info:
        fastnn.fit(m, x, y, epochs=3, batch_size=64, lr=1e39, optimizer="sgd", lr_schedule="constant")
    assert np.isfinite(info.value.history[0]["train_loss"]) and len(info.value.history) == 1
