"""fastnn's MLPClassifier against scikit-learn's: same architecture, solver (Adam), batch size and
epochs, on this CPU; fit time and test accuracy.

    pytest benchmarks/test_sklearn_speed.py --benchmark-only

Both train every epoch (scikit-learn's early exit is switched off with tol=0 and
n_iter_no_change=max_iter). Fashion-MNIST needs ../shared/data (or FASTNN_DATA).
"""

import time
import warnings

import numpy as np
import pytest

sklearn = pytest.importorskip("sklearn", reason="scikit-learn is not installed")
from conftest import _data_root  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from sklearn.neural_network import MLPClassifier as SkMLP  # noqa: E402

import fastnn  # noqa: E402
from fastnn.sklearn import MLPClassifier  # noqa: E402

CASES = {"digits": ((64,), 50), "fashion-mnist": ((256, 128), 5)}  # hidden sizes, epochs


def data(name):
    if name == "digits":
        x, y = load_digits(return_X_y=True)
        xtr, xte, ytr, yte = train_test_split(x / 16.0, y, test_size=0.25, random_state=0, stratify=y)
        return xtr, ytr, xte, yte
    try:
        ds = fastnn.datasets.load("fashion-mnist", root=_data_root(), download=False)
    except fastnn.DataError as exc:
        pytest.skip(f"Fashion-MNIST not found ({exc})")
    return ds.train_images / 255.0, ds.train_labels, ds.test_images / 255.0, ds.test_labels


def estimators(name):
    hidden, epochs = CASES[name]
    common = dict(hidden_layer_sizes=hidden, solver="adam", batch_size=200, learning_rate_init=1e-3,
                  max_iter=epochs, alpha=1e-4, random_state=0)
    return {"fastnn": lambda: MLPClassifier(**common, dtype="float32"),  # fastnn's float32 on float64 data
            "scikit-learn": lambda: SkMLP(**common, tol=0.0, n_iter_no_change=epochs)}


@pytest.mark.benchmark(group="sklearn")
@pytest.mark.parametrize("name", list(CASES))
def test_fit_time_ratio_alternating(benchmark, name):
    """Both fits alternating in one process (this machine's speed drifts over minutes), medians."""
    xtr, ytr, xte, yte = data(name)
    times = {impl: [] for impl in ("fastnn", "scikit-learn")}

    def one_round():
        for impl, make in estimators(name).items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                t0 = time.perf_counter()
                make().fit(xtr, ytr)
                times[impl].append(time.perf_counter() - t0)
    benchmark.pedantic(one_round, rounds=5 if name == "digits" else 3, iterations=1, warmup_rounds=0)
    med = {impl: float(np.median(t)) for impl, t in times.items()}
    benchmark.extra_info.update(fastnn_seconds=med["fastnn"], sklearn_seconds=med["scikit-learn"],
                                speedup=med["scikit-learn"] / med["fastnn"], epochs=CASES[name][1])


@pytest.mark.benchmark(group="sklearn")
@pytest.mark.parametrize("impl", ["fastnn", "scikit-learn"])
@pytest.mark.parametrize("name", list(CASES))
def test_fit_time_and_accuracy(benchmark, name, impl):
    xtr, ytr, xte, yte = data(name)
    epochs = CASES[name][1]
    make = estimators(name)[impl]
    fitted = []

    def fit():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            fitted.append(make().fit(xtr, ytr))
    benchmark.pedantic(fit, rounds=3 if name == "digits" else 1, iterations=1)
    benchmark.extra_info["test_accuracy"] = float(np.mean(fitted[-1].predict(xte) == yte))
    benchmark.extra_info["epochs"] = epochs
