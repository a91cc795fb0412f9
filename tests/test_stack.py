"""Many models at once: a stack of K models trains exactly as K separate ``fit`` runs.

Each model of a ``ModelStack`` must follow the run of a standalone ``MLP`` with its seed,
hyperparameters and batch order: to rounding in float64, within float32 rounding in float32.
"""

import numpy as np
import pytest
from conftest import gpu_ops

import fastnn
from fastnn import MLP, ConfigError, ModelStack, fit, fit_many

SIZES = (20, 16, 8, 4)
SEEDS = [3, 5, 7]
DROPOUT = [0.0, 0.2, [0.1, 0.3]]  # per model: none, one rate, one per hidden layer
HYPER = {"sgd": ([0.05, 0.1, 0.2], [0.0, 1e-3, 1e-2]), "momentum": ([0.05, 0.1, 0.02], [1e-2, 0.0, 1e-3]),
         "nesterov": ([0.05, 0.02, 0.1], [0.0, 0.0, 1e-2]), "adam": ([1e-3, 3e-3, 1e-2], [0.0, 1e-2, 1e-3])}
MOMENTA = [0.5, 0.9, 0.0]


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.random((300, 20))
    y = rng.integers(0, 4, 300)
    y[:4] = np.arange(4)
    return x, y


def flat(params):
    return np.concatenate([p.ravel() for p in params])


def separate(k, x, y, optimizer, dtype, order_seed, epochs=3, **kw):
    lrs, wds = HYPER[optimizer]
    m = MLP(SIZES, seed=SEEDS[k], dtype=dtype, dropout=DROPOUT[k])
    h = fit(m, x, y, epochs=epochs, batch_size=32, lr=lrs[k], optimizer=optimizer, momentum=MOMENTA[k],
            weight_decay=wds[k], seed=order_seed, x_val=x[:60], y_val=y[:60], **kw)
    return m, h


def stacked(x, y, optimizer, dtype, order_seed, epochs=3, **kw):
    lrs, wds = HYPER[optimizer]
    st = ModelStack(SIZES, SEEDS, dtype=dtype, dropout=DROPOUT)
    h = fit_many(st, x, y, epochs=epochs, batch_size=32, lr=lrs, optimizer=optimizer, momentum=MOMENTA,
                 weight_decay=wds, seed=order_seed, x_val=x[:60], y_val=y[:60], **kw)
    return st, h


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-12), ("float32", 2e-6)])
@pytest.mark.parametrize("optimizer", list(HYPER))
@pytest.mark.parametrize("order", ["shared", "per-model"])
def test_stacked_models_equal_separate_fits(data, dtype, tol, optimizer, order):
    x, y = data
    order_seed = 11 if order == "shared" else [11, 12, 13]
    st, hist = stacked(x, y, optimizer, dtype, order_seed, lr_schedule="cosine")
    for k in range(3):
        m, h = separate(k, x, y, optimizer, dtype, order_seed if order == "shared" else order_seed[k],
                        lr_schedule="cosine")
        np.testing.assert_allclose(flat(st.get_params(k)), flat(m.get_params()), rtol=0, atol=tol)
        for a, b in zip(hist[k], h):
            for key in ("train_loss", "val_loss", "lr"):
                assert a[key] == pytest.approx(b[key], rel=1e-5 if dtype == "float32" else 1e-12), key
            assert a["train_accuracy"] == b["train_accuracy"] and a["val_accuracy"] == b["val_accuracy"]


@pytest.mark.parametrize("order", ["shared", "per-model"])
@pytest.mark.parametrize("weights", ["class", "sample"])
def test_weighted_stacked_models_equal_separate_weighted_fits(data, order, weights):
    """Loss weights reach every model, through each model's own batches with per-model orders."""
    x, y = data
    kw = {"class_weight": "balanced"} if weights == "class" else {
        "sample_weight": np.random.default_rng(4).random(len(y)) * 3}
    order_seed = 11 if order == "shared" else [11, 12, 13]
    st, hist = stacked(x, y, "momentum", "float64", order_seed, **kw)
    unweighted, _ = stacked(x, y, "momentum", "float64", order_seed)
    for k in range(3):
        m, h = separate(k, x, y, "momentum", "float64", order_seed if order == "shared" else order_seed[k], **kw)
        np.testing.assert_allclose(flat(st.get_params(k)), flat(m.get_params()), rtol=0, atol=1e-12)
        assert [r["train_loss"] for r in hist[k]] == pytest.approx([r["train_loss"] for r in h], rel=1e-12)
        assert np.abs(flat(unweighted.get_params(k)) - flat(m.get_params())).max() > 1e-3  # the weights matter


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_a_stack_of_one_equals_one_model(data, dtype):
    x, y = data
    st = ModelStack(SIZES, [4], dtype=dtype)
    hs = fit_many(st, x, y, epochs=2, batch_size=32, lr=0.1, optimizer="momentum", seed=3, x_val=x[:60],
                  y_val=y[:60], lr_schedule="constant")
    m = MLP(SIZES, seed=4, dtype=dtype)
    h = fit(m, x, y, epochs=2, batch_size=32, lr=0.1, optimizer="momentum", seed=3, x_val=x[:60],
            y_val=y[:60], lr_schedule="constant")
    np.testing.assert_array_equal(flat(st.get_params(0)), flat(m.get_params()))
    assert [r["val_loss"] for r in hs[0]] == pytest.approx([r["val_loss"] for r in h], rel=1e-6)


def test_each_models_hyperparameters_reach_it_and_no_other(data):
    x, y = data
    base = dict(epochs=2, batch_size=32, optimizer="momentum", seed=1, dtype="float64")

    def run(lr, wd, mu, dropout):
        st = ModelStack(SIZES, SEEDS, dtype=base["dtype"], dropout=dropout)
        fit_many(st, x, y, epochs=2, batch_size=32, optimizer="momentum", seed=1, lr=lr, weight_decay=wd,
                 momentum=mu, lr_schedule="constant")
        return [flat(st.get_params(k)) for k in range(3)]

    ref = run([0.1, 0.1, 0.1], [0.0] * 3, [0.9] * 3, 0.0)
    init = [flat(MLP(SIZES, seed=s).get_params()) for s in SEEDS]
    changes = {"lr": ([0.1, 0.0, 0.1], [0.0] * 3, [0.9] * 3, 0.0),  # model 1 frozen
               "wd": ([0.1] * 3, [0.0, 0.0, 0.05], [0.9] * 3, 0.0),
               "momentum": ([0.1] * 3, [0.0] * 3, [0.0, 0.9, 0.9], 0.0),
               "dropout": ([0.1] * 3, [0.0] * 3, [0.9] * 3, [0.0, 0.5, 0.0])}
    changed = {"lr": 1, "wd": 2, "momentum": 0, "dropout": 1}
    for name, args in changes.items():
        got = run(*args)
        for k in range(3):
            if k == changed[name]:
                assert not np.array_equal(got[k], ref[k]), name
            else:
                np.testing.assert_array_equal(got[k], ref[k], err_msg=name)
    np.testing.assert_allclose(run(*changes["lr"])[1], init[1], rtol=0, atol=1e-7)  # lr 0: only init rounding


def test_stacked_gradients_equal_each_models(data):
    x, y = data
    st = ModelStack(SIZES, SEEDS, dtype="float64")
    losses, grads = st.gradients(x[:50], y[:50])
    for k, s in enumerate(SEEDS):
        loss, g = MLP(SIZES, seed=s, dtype="float64").gradients(x[:50], y[:50])
        assert losses[k] == pytest.approx(loss, rel=1e-13)
        np.testing.assert_allclose(flat([a[k] for a in grads]), flat(g), rtol=0, atol=1e-14)


def test_stopped_and_diverged_models_leave_the_others_unchanged(data):
    x, y = data
    full = ModelStack(SIZES, SEEDS, dtype="float64")
    fit_many(full, x, y, epochs=3, batch_size=32, lr=[0.1, 0.05, 0.1], seed=2, optimizer="sgd", lr_schedule="constant")
    st = ModelStack(SIZES, SEEDS, dtype="float64")
    hist = fit_many(st, x, y, epochs=3, batch_size=32, lr=[0.1, 1e300, 0.1], seed=2,  # model 1 diverges
                    on_epoch=lambda recs: [2] if recs[0]["epoch"] == 1 else [], optimizer="sgd",
                        lr_schedule="constant")  # a pruner stops model 2
    assert st.ids == [0] and len(hist[2]) == 1 and hist[1][-1].get("diverged")
    with pytest.raises(ConfigError, match="model 2 is not in the stack"):
        st.model(2)
    # to rounding: a stack of one takes the single-model loss kernel
    np.testing.assert_allclose(flat(st.get_params(0)), flat(full.get_params(0)), rtol=0, atol=1e-13)
    assert len(hist[0]) == 3


def test_ensemble_prediction_best_model_and_saving(data, tmp_path, capsys):
    x, y = data
    st = ModelStack(SIZES, SEEDS, dropout=DROPOUT)
    fit_many(st, x, y, epochs=2, batch_size=32, lr=[0.3, 0.0, 0.1], validation_split=0.2, verbose=1,
             optimizer="sgd", lr_schedule="constant")
    assert "epoch 2/2  3 models  val accuracy: best" in capsys.readouterr().out
    each = st.predict_proba(x, each=True)
    assert each.shape == (3, 300, 4)
    np.testing.assert_allclose(st.predict_proba(x), each.mean(axis=0))
    np.testing.assert_array_equal(st.predict(x), each.mean(axis=0).argmax(axis=1))
    for k in range(3):
        np.testing.assert_allclose(st.model(k).predict_proba(x), each[k], rtol=1e-5, atol=1e-7)
    best = st.best()
    assert st.history[best][-1]["val_accuracy"] == max(h[-1]["val_accuracy"] for h in st.history.values())
    st.save(tmp_path / "stack.npz")
    back = ModelStack.load(tmp_path / "stack.npz")
    np.testing.assert_array_equal(back.params, st.params)
    assert back.seeds == SEEDS and back.dropouts.tolist() == st.dropouts.tolist()
    st.model(best).save(tmp_path / "best.npz")
    np.testing.assert_array_equal(MLP.load(tmp_path / "best.npz").predict(x), st.model(best).predict(x))


@pytest.mark.parametrize("build,match", [
    (lambda: ModelStack(SIZES, []), "at least one model"),
    (lambda: ModelStack(SIZES, [0, 1], dropout=[0.1, 0.2, 0.3]), "one entry per model"),
    (lambda: ModelStack(SIZES, [0, -1]), ">= 0"),
    (lambda: fit_many(ModelStack(SIZES, [0, 1]), np.zeros((8, 20)), np.arange(8) % 4, lr=[0.1] * 3), "one per model"),
    (lambda: fit_many(ModelStack(SIZES, [0, 1]), np.zeros((8, 20)), np.arange(8) % 4, seed=[1, 2, 3]), "one per model"),
    (lambda: fit_many(ModelStack(SIZES, [0, 1]), np.zeros((8, 20)), np.arange(8) % 4, momentum=[0.5, 1.0],
                      optimizer="momentum"), r"in \[0, 1\)"),
    (lambda: ModelStack(SIZES, [0, 1]).to_onnx("x.onnx"), "one model"),
])
def test_bad_stack_arguments_are_refused(build, match):
    with pytest.raises(ConfigError, match=match):
        build()


@pytest.mark.gpu
def test_cpu_and_gpu_stacks_agree_in_float64(data):
    gpu_ops()
    x, y = data
    cpu, _ = stacked(x, y, "adam", "float64", [1, 2, 3])
    lrs, wds = HYPER["adam"]
    gpu = ModelStack(SIZES, SEEDS, dtype="float64", dropout=DROPOUT, device="gpu")
    fit_many(gpu, x, y, epochs=3, batch_size=32, lr=lrs, optimizer="adam", weight_decay=wds, seed=[1, 2, 3],
             x_val=x[:60], y_val=y[:60], lr_schedule="constant")
    np.testing.assert_allclose(gpu.ops.to_host(gpu.params), cpu.params, rtol=0, atol=1e-10)


def test_exported_from_the_package():
    assert fastnn.ModelStack is ModelStack and fastnn.fit_many is fit_many
