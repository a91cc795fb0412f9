"""The bug zoo: every classic from-scratch failure, built through the public API, is named.

And healthy runs raise no alarm at all. On synthetic data of MNIST's shape (conftest).
"""

import warnings

import numpy as np
import pytest

import fastnn
from fastnn.backends.ops import Ops
from fastnn.diagnose import check_init, check_own_gradients, check_predictions, check_units
from fastnn.gradcheck import off_kink_rows
from fastnn.loop import stratified_split
from fastnn.stack import ModelStack


@pytest.fixture(scope="module")
def data(synthetic):
    return synthetic


def codes(findings, severity=None):
    return {f.code for f in findings if severity is None or f.severity == severity}


def net(act="relu", **kw):
    return fastnn.MLP([784, 64, 32, 10], activation=act, **kw)


@pytest.mark.parametrize("act,opt,lr,batch", [("relu", "momentum", 0.05, 128), ("relu", "adam", 1e-3, 128),
                                              ("sigmoid", "sgd", 0.05, 1), ("tanh", "sgd", 0.1, 32)])
def test_healthy_runs_raise_no_alarm(data, act, opt, lr, batch):
    x, y, xt, yt = data
    findings = fastnn.diagnose(net(act), x, y, xt, yt, lr=lr, optimizer=opt, batch_size=batch, trial_samples=3000)
    assert findings == [], "\n".join(map(str, findings))


def test_unscaled_inputs(data):
    x, y, _, _ = data
    f = fastnn.diagnose(net("sigmoid"), x.astype(np.float32), y, lr=0.05, optimizer="sgd")
    assert "unscaled-inputs" in codes(f, "error")
    assert "saturated-units" in codes(f)
    ev = next(i for i in f if i.code == "unscaled-inputs").evidence
    assert "0..255" in ev


def test_test_data_scaled_differently(data):
    x, y, xt, yt = data
    f = fastnn.diagnose(net(), x, y, xt.astype(np.float32), yt, lr=0.05,  # test pixels 0..255 as floats
                        optimizer="sgd")
    assert "train-test-mismatch" in codes(f, "error")


def test_test_data_inverted(data):
    x, y, xt, yt = data
    f = fastnn.diagnose(net(), x, y, 255 - xt, yt, lr=0.05, optimizer="sgd")
    assert "train-test-mismatch" in codes(f, "error")
    assert "polarity" in next(i for i in f if i.code == "train-test-mismatch").evidence


def test_labels_shuffled_apart_from_images(data):
    x, y, _, _ = data
    f = fastnn.diagnose(net(), x, np.random.default_rng(0).permutation(y), lr=0.05, optimizer="sgd")
    assert "bad-labels" in codes(f, "error")


@pytest.mark.parametrize("labels,match", [
    (lambda y: y + 1, "range over 1..10"),
    (lambda y: y.astype(np.float64) + 0.5, "not whole numbers"),
    (lambda y: np.eye(10)[y] * 2, "do not sum to 1"),
    (lambda y: np.where(y == 3, 4, y), "class(es) 3 never occur"),
])
def test_bad_label_encodings(data, labels, match):
    x, y, _, _ = data
    f = fastnn.diagnose(net(), x, labels(y), lr=0.05, optimizer="sgd")
    assert any(i.code == "bad-labels" and match in i.evidence for i in f), "\n".join(map(str, f))


def test_learning_rate_zero(data):
    x, y, _, _ = data
    f = fastnn.diagnose(net(), x, y, lr=0.0, optimizer="sgd")
    assert "no-weight-change" in codes(f, "error")


def test_learning_rate_far_too_high(data):
    x, y, _, _ = data
    f = fastnn.diagnose(net(), x, y, lr=1e3, optimizer="sgd")
    assert "non-finite" in codes(f, "error")
    assert "step" in next(i for i in f if i.code == "non-finite").evidence


def test_steps_far_too_large_have_their_own_code(data):
    x, y, _, _ = data
    f = fastnn.diagnose(net(), x, y, lr=1.0, optimizer="adam")  # Adam moves every weight by about lr
    assert "update-too-large" in codes(f, "warning") and "no-weight-change" not in codes(f)
    assert "lower the learning rate" in next(i for i in f if i.code == "update-too-large").fix


def test_learning_rate_far_too_low_is_an_update_ratio_warning(data):
    x, y, _, _ = data
    f = fastnn.diagnose(net(), x, y, lr=1e-9, optimizer="sgd")
    assert "no-weight-change" in codes(f, "warning")


def test_all_zero_init(data):
    x, y, _, _ = data
    m = net()
    m.set_params([np.zeros_like(p) for p in m.get_params()])
    f = fastnn.diagnose(m, x, y, lr=0.05, optimizer="sgd")
    assert "bad-init" in codes(f, "error")
    assert "dead-units" in codes(f)  # relu(0) never fires
    assert "collapsed-predictions" in codes(f, "error")


def test_huge_init_spread(data):
    x, y, _, _ = data
    m = net("tanh")
    m.set_params([p * 100 for p in m.get_params()])
    f = fastnn.diagnose(m, x, y, lr=0.01, optimizer="sgd")
    assert "bad-init" in codes(f, "warning")
    assert "saturated-units" in codes(f)


def test_collapsed_predictions_name_the_class_and_the_11_35_figure(data):
    x, y, xt, yt = data
    m = net()
    p = m.get_params()
    p[-1] = np.array([0, 50, 0, 0, 0, 0, 0, 0, 0, 0], np.float32)  # the output bias favours class 1
    p[-2] = p[-2] * 0
    m.set_params(p)
    f = check_predictions(m, xt, yt, "now")
    assert [i.code for i in f] == ["collapsed-predictions"]
    assert "class 1 for 100.0%" in f[0].evidence and "11.35%" in f[0].evidence
    assert f"{np.mean(yt == 1):.2%}" in f[0].evidence


def test_loss_stuck_at_chance_with_mse(data):
    x, y, _, _ = data
    # the second question's network with its tiny learning rate: the MSE loss sits at 0.09
    m = fastnn.MLP([784, 16, 16, 10], activation="sigmoid", loss="mse")
    f = fastnn.diagnose(m, x, y, lr=3.0, batch_size=125, optimizer="sgd")
    assert "loss-at-chance" in codes(f, "warning"), "\n".join(map(str, f))


def test_wrong_gradient_function_of_your_own(data):
    x, y, _, _ = data
    m = fastnn.MLP([784, 8, 10], activation="sigmoid", dtype="float64")
    xs, ys = x[:16], y[:16]

    def loss_fn(params):
        m.set_params(params)
        return m.gradients(xs, ys)[0]

    def wrong_grad(params):  # the first question's bug: an extra softmax derivative on the output
        m.set_params(params)
        g = m.gradients(xs, ys)[1]
        g[2] = g[2] * 0.5
        return g

    f = fastnn.diagnose(m, x, y, lr=0.1, loss_fn=loss_fn, grad_fn=wrong_grad, params=m.get_params(), optimizer="sgd")
    assert "gradient-mismatch" in codes(f, "error")
    assert "parameter array 2" in next(i for i in f if i.code == "gradient-mismatch").evidence


def test_epoch_monitor_flags_a_frozen_collapsed_run(data):
    x, y, xt, yt = data
    m = net()
    m.set_params([np.zeros_like(p) for p in m.get_params()])
    mon = fastnn.EpochMonitor(m, xt, yt)
    seen = []
    fastnn.fit(m, x, y, epochs=2, lr=0.0, x_val=xt, y_val=yt, on_epoch=lambda r: seen.extend(mon(r)),
               optimizer="sgd", lr_schedule="constant")
    assert {"no-weight-change", "collapsed-predictions", "loss-at-chance"} <= codes(seen)
    assert len(seen) == len(codes(seen))  # each reported once, not every epoch


def test_diagnose_leaves_the_model_unchanged(data):
    x, y, _, _ = data
    m = net()
    before = m.get_params()
    fastnn.diagnose(m, x, y, lr=0.1, optimizer="sgd")
    for a, b in zip(before, m.get_params()):
        np.testing.assert_array_equal(a, b)


def test_a_learning_rate_far_below_the_range_tests_suggestion(data):
    """The second question's network: sigmoid outputs with MSE, trained by SGD at lr 0.005."""
    x, y, xt, yt = data
    m = fastnn.MLP([784, 16, 16, 10], activation="sigmoid", loss="mse")
    f = fastnn.diagnose(m, x, y, xt, yt, lr=0.005, optimizer="sgd", batch_size=125, trial_samples=3000)
    found = next(i for i in f if i.code == "lr-far-off")
    ratio = float(found.evidence.split(" is ")[1].split("x ")[0])
    assert ratio < 1 / 30 and "try lr" in found.fix


def all_the_same(x, image):
    """The training images made all black, or all a copy of the first (identical, but not black)."""
    return np.zeros_like(x) if image == "black" else np.repeat(x[:1], len(x), axis=0)


@pytest.mark.parametrize("image", ["black", "identical"])
def test_images_all_the_same_are_named_and_nothing_else_is_blamed(data, image):
    x, y, xt, yt = data
    f = fastnn.diagnose(net(), all_the_same(x, image), y, xt, yt, lr=1e-3, optimizer="adam")
    found = next((i for i in f if i.code == "constant-inputs"), None)
    assert found is not None and found.severity == "error", "\n".join(map(str, f))
    assert f"all {len(x)} training images are the same" in found.evidence
    assert ("every pixel 0" in found.evidence) == (image == "black")
    # the backward pass is sound (all-black inputs put every relu unit at its kink, where central
    # differences are no derivative), and the labels are not shuffled: neither is blamed
    assert not codes(f) & {"gradient-mismatch", "bad-labels"}, "\n".join(map(str, f))


def test_the_gradient_check_skips_samples_at_relus_kink_and_still_catches_a_broken_backward_pass(data, monkeypatch):
    x, y, _, _ = data
    assert "gradient-mismatch" not in codes(check_own_gradients(net(), x, y))
    black = check_own_gradients(net(), np.zeros_like(x), y)
    assert codes(black, "info") == {"gradient-check-skipped"} and len(black) == 1
    original = Ops.input_grad

    def broken(self, d, W, a, out, act, drop=None):  # half the gradient back through every hidden layer
        original(self, d, W, a, out, act, drop)
        out *= 0.5

    monkeypatch.setattr(Ops, "input_grad", broken)
    f = check_own_gradients(net(), x, y)
    assert codes(f, "error") == {"gradient-mismatch"} and "fastnn's backward pass" in f[0].evidence


@pytest.mark.parametrize("image", ["black", "identical"])
def test_fit_and_fit_many_warn_before_training_on_images_all_the_same(data, image):
    x, y, _, _ = data
    same = all_the_same(x[:600], image)
    with pytest.warns(RuntimeWarning, match=r"x: all 600 training images are the same \(every input feature is "
                                            r"constant\): there is no signal to learn"):
        fastnn.fit(fastnn.MLP([784, 8, 10]), same, y[:600], epochs=1)
    n_train = len(stratified_split(y[:600], 0.1)[0])  # 10% held out first
    with pytest.warns(RuntimeWarning, match=f"x: all {n_train} training images are the same"):
        fastnn.fit_many(ModelStack([784, 8, 10], [0, 1]), same, y[:600], epochs=1, validation_split=0.1)


def test_fit_does_not_warn_of_images_that_differ(data):
    x, y, _, _ = data
    same = all_the_same(x[:600], "identical")
    same[599, 5] += 1  # one pixel of one image differs
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        fastnn.fit(fastnn.MLP([784, 8, 10]), same, y[:600], epochs=1)
        fastnn.fit(fastnn.MLP([784, 8, 10]), x[:600], y[:600], epochs=1)


# ------------------------------------------------------------------ conv nets
CONV = "conv4k5,pool2,conv6k3,pool2,dense16"


def conv_net():
    return fastnn.MLP([784, 10], layers=CONV)


def test_a_healthy_conv_net_passes_the_gradient_check_with_every_layer_named(data):
    x, y, xt, yt = data
    m = conv_net()
    rows = off_kink_rows(m, x[:256])
    assert len(rows) == 8  # the check runs (the synthetic images' noise keeps every patch off relu's kink)
    report = fastnn.gradcheck(m, x[rows], y[rows], max_entries=20)
    assert report.max_rel_error < 1e-6, str(report)
    assert report.names == [f"layer {i} ({t}) {p}" for i, t in [(1, "conv4k5"), (3, "conv6k3"), (5, "dense16"),
                                                                 (6, "dense10")] for p in ("weights", "biases")]
    f = fastnn.diagnose(m, x, y, xt, yt, lr=1e-2, optimizer="adam", trial_samples=1000)
    assert not codes(f) & {"gradient-mismatch", "gradient-check-skipped", "bad-init", "dead-units", "non-finite"}, \
        "\n".join(map(str, f))


@pytest.mark.parametrize("op,out_arg,fault", [
    ("conv_input_grad", 3, "layer 1 (conv4k5), layer 2 (pool2), layer 3 (conv6k3)"),  # into conv6k3's input
    ("maxpool_act_backward", 3, "layer 3 (conv6k3), layer 4 (pool2), layer 5 (dense16)"),  # both pools: the top one
])
def test_a_broken_conv_or_pool_backward_is_named_by_its_layers(data, monkeypatch, op, out_arg, fault):
    x, y, _, _ = data
    m = conv_net()
    cls = type(m.ops)
    original = getattr(cls, op)

    def broken(self, *args):  # half the gradient handed down
        original(self, *args)
        args[out_arg][...] *= 0.5

    monkeypatch.setattr(cls, op, broken)
    f = check_own_gradients(m, x, y)
    assert codes(f) == {"gradient-mismatch"} and f[0].severity == "error", "\n".join(map(str, f))
    assert f"the fault is in the backward pass of {fault}" in f[0].evidence, f[0].evidence
    report = fastnn.gradcheck(m, x[off_kink_rows(m, x[:256])], y[off_kink_rows(m, x[:256])], max_entries=20)
    wrong = [n for n, e in zip(report.names, report.rel_errors) if e > 0.1]
    assert wrong and all("conv" in n for n in wrong) and max(report.rel_errors[4:]) < 1e-6, str(report)


def test_a_conv_net_on_blank_images_is_checked_on_random_ones(data, monkeypatch):
    """Blank images put every conv unit at relu's kink (zero patches, zero biases): the backward pass is
    then checked on random images, and a broken one is still caught."""
    x, y, _, _ = data
    blank = np.zeros_like(x)
    assert len(off_kink_rows(conv_net(), blank[:256])) == 0
    assert check_own_gradients(conv_net(), blank, y) == []  # checked, and sound: no finding
    cls = type(conv_net().ops)
    original = cls.maxpool_act_backward

    def broken(self, d, arg, p, out, *rest):
        original(self, d, arg, p, out, *rest)
        out *= 0.5

    monkeypatch.setattr(cls, "maxpool_act_backward", broken)
    f = check_own_gradients(conv_net(), blank, y)
    assert codes(f) == {"gradient-mismatch"}, "\n".join(map(str, f))


def test_the_doctor_names_the_conv_layers_in_its_unit_checks(data):
    x, y, _, _ = data
    m = conv_net()
    p = m.get_params()
    p[0] = np.zeros_like(p[0])  # conv4k5's four channels: identical, and dead (relu(0))
    m.set_params(p)
    f = check_init(m, x[:256]) + check_units(m, x[:256], "at initialisation")
    assert any(i.code == "bad-init" and "all 4 units of layer 1 (conv4k5)" in i.evidence for i in f), f
    assert any(i.code == "dead-units" and "relu channels of hidden layer 1 (conv4k5)" in i.evidence for i in f), f
