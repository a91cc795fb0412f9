"""The benchmark's naive per-sample loop computes the same gradients as fastnn (it is a fair baseline)."""

import sys

import numpy as np
import pytest
from conftest import REPO

import fastnn

sys.path.insert(0, str(REPO / "benchmarks"))
from naive import NaiveMLP  # noqa: E402


@pytest.mark.parametrize("act", ["relu", "sigmoid"])
def test_naive_backprop_equals_fastnn_gradients(act):
    sizes = [12, 7, 5, 3]
    naive = NaiveMLP(sizes, activation=act, seed=1)
    model = fastnn.MLP(sizes, activation=act, dtype="float64")
    model.set_params([a for W, b in zip(naive.W, naive.b) for a in (W.T, b[:, 0])])
    x = np.random.default_rng(2).random((1, 12))
    _, grads = model.gradients(x, np.array([2]))
    gW, gb = naive.backprop(x.reshape(-1, 1), 2)
    for i in range(3):
        np.testing.assert_allclose(grads[2 * i], gW[i].T, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(grads[2 * i + 1], gb[i][:, 0], rtol=1e-12, atol=1e-15)
