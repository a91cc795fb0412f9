"""Backward pass against float64 central differences, PyTorch autograd, and per-sample sums."""

import numpy as np
import pytest

import fastnn

COMBOS = [(act, loss) for act in ("relu", "sigmoid", "tanh") for loss in ("xent", "mse")]


def small_problem(seed=0, n=16, d=7, k=4):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)), rng.integers(0, k, n)


@pytest.mark.parametrize("act,loss", COMBOS)
@pytest.mark.parametrize("init", ["xavier", "he", "normal"])
def test_gradients_match_central_differences(act, loss, init):
    x, y = small_problem()
    model = fastnn.MLP([7, 6, 5, 4], activation=act, loss=loss, init=init, dtype="float64", seed=3)
    # Random biases, so the bias paths are checked away from zero too.
    params = model.get_params()
    rng = np.random.default_rng(1)
    params[1::2] = [rng.standard_normal(b.shape) * 0.1 for b in params[1::2]]
    model.set_params(params)
    report = fastnn.gradcheck(model, x, y, max_entries=None)
    assert report.max_rel_error < 1e-6, str(report)
    assert sum(report.checked) == model.size


def test_gradcheck_catches_a_wrong_gradient():
    x, y = small_problem()
    model = fastnn.MLP([7, 5, 4], activation="sigmoid", dtype="float64")

    def loss_fn(p):
        model.set_params(p)
        return model.gradients(x, y)[0]

    def wrong_grad(p):
        model.set_params(p)
        g = model.gradients(x, y)[1]
        g[2] = g[2] * 1.01  # 1% off on the second weight matrix
        return g

    report = fastnn.check_gradients(loss_fn, wrong_grad, model.get_params())
    assert report.rel_errors[2] > 1e-3
    assert max(report.rel_errors[:2] + report.rel_errors[3:]) < 1e-6


@pytest.mark.parametrize("act,loss", COMBOS)
def test_batched_gradient_is_mean_of_per_sample_gradients(act, loss):
    x, y = small_problem(n=12)
    model = fastnn.MLP([7, 6, 5, 4], activation=act, loss=loss, dtype="float64", seed=5)
    loss_b, grads_b = model.gradients(x, y)
    per = [model.gradients(x[i:i + 1], y[i:i + 1]) for i in range(len(y))]
    assert abs(loss_b - np.mean([p[0] for p in per])) < 1e-12
    for j, g in enumerate(grads_b):
        mean = np.mean([p[1][j] for p in per], axis=0)
        np.testing.assert_allclose(g, mean, rtol=0, atol=1e-10)


@pytest.mark.parametrize("act,loss", COMBOS)
def test_gradients_match_pytorch_autograd(act, loss, torch):
    x, y = small_problem(n=10)
    model = fastnn.MLP([7, 6, 5, 4], activation=act, loss=loss, dtype="float64", seed=2)
    ps = [torch.tensor(p, requires_grad=True) for p in model.get_params()]
    a = torch.tensor(x)
    f = {"relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh}[act]
    for i in range(0, len(ps), 2):
        a = a @ ps[i] + ps[i + 1]
        if i + 2 < len(ps):
            a = f(a)
    yt = torch.tensor(y)
    if loss == "xent":
        ref = torch.nn.functional.cross_entropy(a, yt)
    else:
        onehot = torch.nn.functional.one_hot(yt, 4).double()
        ref = torch.nn.functional.mse_loss(torch.sigmoid(a), onehot)
    ref.backward()
    value, grads = model.gradients(x, y)
    assert abs(value - ref.item()) < 1e-12
    for g, p in zip(grads, ps):
        np.testing.assert_allclose(g, p.grad.numpy(), rtol=1e-10, atol=1e-13)


def test_float32_gradients_close_to_float64():
    x, y = small_problem()
    m64 = fastnn.MLP([7, 6, 4], dtype="float64", seed=1)
    m32 = fastnn.MLP([7, 6, 4], dtype="float32", seed=1)
    _, g64 = m64.gradients(x, y)
    _, g32 = m32.gradients(x.astype(np.float32), y)
    for a, b in zip(g32, g64):
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("act", ["relu", "sigmoid", "tanh"])
def test_gradients_with_dropout_match_central_differences(act):
    """With the step counter fixed, the masks are fixed: the loss is a function of the weights."""
    rng = np.random.default_rng(1)
    x, y = rng.random((12, 7)), rng.integers(0, 3, 12)
    m = fastnn.MLP([7, 9, 8, 3], activation=act, dtype="float64", seed=2, dropout=[0.3, 0.5])
    m.step[...] = 5
    report = fastnn.gradcheck(m, x, y)
    assert report.max_rel_error < 1e-6, report
    no_drop = fastnn.MLP([7, 9, 8, 3], activation=act, dtype="float64", seed=2)
    assert not np.allclose(no_drop.gradients(x, y)[1][0], m.gradients(x, y)[1][0])  # dropout did act


@pytest.mark.parametrize("loss", ["xent", "mse"])
def test_weighted_gradients_match_central_differences_and_duplicated_samples(loss):
    rng = np.random.default_rng(4)
    x, y = rng.random((10, 6)), rng.integers(0, 3, 10)
    w = rng.integers(0, 4, 10).astype(np.float64)  # whole weights: the same as repeating samples
    m = fastnn.MLP([6, 5, 3], activation="tanh", loss=loss, dtype="float64", seed=3)
    report = fastnn.check_gradients(lambda p: (m.set_params(p), m.gradients(x, y, w)[0])[1],
                                    lambda p: (m.set_params(p), m.gradients(x, y, w)[1])[1], m.get_params())
    assert report.max_rel_error < 1e-6, report
    rep = np.repeat(np.arange(10), w.astype(int))
    loss_w, grads_w = m.gradients(x, y, w)
    loss_d, grads_d = m.gradients(x[rep], y[rep])
    assert loss_w * 10 / w.sum() == pytest.approx(loss_d, rel=1e-12)
    for gw, gd in zip(grads_w, grads_d):
        np.testing.assert_allclose(gw * 10 / w.sum(), gd, rtol=1e-10, atol=1e-14)
