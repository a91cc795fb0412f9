"""fastnn.sklearn.MLPClassifier: scikit-learn's own estimator checks, and the places users put it."""

import pickle

import numpy as np
import pytest

sklearn = pytest.importorskip("sklearn", reason="scikit-learn is not installed (the sklearn extra)")
from sklearn.base import clone  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import GridSearchCV, train_test_split  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import MinMaxScaler  # noqa: E402
from sklearn.utils.estimator_checks import (  # noqa: E402
    check_methods_subset_invariance,
    check_sample_weight_equivalence_on_dense_data,
    parametrize_with_checks,
)

from fastnn.sklearn import MLPClassifier  # noqa: E402


@parametrize_with_checks([MLPClassifier(max_iter=50)])
def test_scikit_learns_estimator_checks(estimator, check):
    check(estimator)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_methods_are_invariant_to_subsets(dtype):
    check_methods_subset_invariance("MLPClassifier", MLPClassifier(max_iter=50, dtype=dtype))


def test_the_models_dtype_is_the_inputs_unless_given():
    x, y = load_digits(return_X_y=True)
    assert MLPClassifier(max_iter=1).fit(x, y).model_.dtype == np.float64
    assert MLPClassifier(max_iter=1).fit(x.astype(np.float32), y).model_.dtype == np.float32
    assert MLPClassifier(max_iter=1).fit(x.astype(np.uint8), y).model_.dtype == np.float32
    assert MLPClassifier(max_iter=1, dtype="float32").fit(x, y).model_.dtype == np.float32


def test_uint8_pixels_are_scaled_as_everywhere_in_fastnn():
    """uint8 images (as datasets.load gives them) train and predict as the same images / 255."""
    x, y = load_digits(return_X_y=True)
    pixels = np.round(x * 255 / 16).astype(np.uint8)
    a = MLPClassifier(hidden_layer_sizes=(32,), max_iter=40, random_state=0, dtype="float32").fit(pixels, y)
    b = MLPClassifier(hidden_layer_sizes=(32,), max_iter=40, random_state=0, dtype="float32").fit(pixels / 255.0, y)
    np.testing.assert_allclose(a.predict_proba(pixels), b.predict_proba(pixels / 255.0), rtol=1e-5, atol=1e-6)
    assert a.score(pixels, y) == b.score(pixels / 255.0, y) > 0.9


def test_sample_weights_equal_repeated_samples_with_full_batches():
    # as scikit-learn checks its own MLPClassifier (with its full-batch solver)
    check_sample_weight_equivalence_on_dense_data(
        "MLPClassifier", MLPClassifier(batch_size=10 ** 6, dtype="float64", max_iter=100, random_state=0))


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    return train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)


def test_string_labels_pipeline_and_curves(digits):
    xtr, xte, ytr, yte = digits
    names = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])
    clf = make_pipeline(MinMaxScaler(), MLPClassifier((64,), max_iter=100, early_stopping=True, random_state=0))
    clf.fit(xtr, names[ytr])
    mlp = clf[-1]
    assert list(mlp.classes_) == sorted(names) and clf.predict(xte[:3]).dtype.kind == "U"
    assert clf.score(xte, names[yte]) > 0.93
    assert len(mlp.loss_curve_) == mlp.n_iter_ == len(mlp.validation_scores_)
    assert mlp.loss_curve_[-1] < mlp.loss_curve_[0]
    np.testing.assert_allclose(clf.predict_proba(xte).sum(axis=1), 1.0, rtol=1e-6)


def test_grid_search_in_two_processes_clone_and_pickle(digits):
    xtr, xte, ytr, yte = digits
    search = GridSearchCV(MLPClassifier(max_iter=30, learning_rate_init=0.01, random_state=0),
                          {"hidden_layer_sizes": [(16,), (64,)]}, cv=2, n_jobs=2)
    search.fit(xtr / 16, ytr)
    assert search.best_params_["hidden_layer_sizes"] in [(16,), (64,)] and search.best_score_ > 0.85
    fitted = search.best_estimator_
    again = pickle.loads(pickle.dumps(fitted))
    np.testing.assert_array_equal(again.predict(xte / 16), fitted.predict(xte / 16))
    fresh = clone(fitted)
    assert fresh.get_params() == fitted.get_params() and not hasattr(fresh, "model_")


def test_partial_fit_continues_one_epoch_at_a_time(digits):
    xtr, xte, ytr, yte = digits
    clf = MLPClassifier((32,), learning_rate_init=0.01, random_state=0)
    with pytest.raises(ValueError, match="classes must be given"):
        clf.partial_fit(xtr / 16, ytr)
    for _ in range(10):
        clf.partial_fit(xtr / 16, ytr, classes=np.arange(10))
    assert clf.n_iter_ == 10 and len(clf.loss_curve_) == 10 and clf.score(xte / 16, yte) > 0.9


# ------------------------------------------------------------------ conv nets: the layers parameter
CONV = "conv6k3,pool2,dense16"


def blob_images(n, shape=(8, 10), seed=0):
    """Images (n, H*W) float64 in [0, 1]: noise (std 0.1) and one bright 2 x 2 blob, whose quadrant is the
    class (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right); the blob keeps a pixel from the middle
    lines, so every class is unambiguous. Returns (X, y)."""
    rng = np.random.default_rng(seed)
    H, W = shape
    y = rng.integers(0, 4, n)
    x = np.clip(rng.normal(0.2, 0.1, (n, H, W)), 0, 1)
    for img, c in zip(x, y):
        r = rng.integers(0, H // 2 - 2) + (H // 2 + 1 if c >= 2 else 0)
        s = rng.integers(0, W // 2 - 2) + (W // 2 + 1 if c % 2 else 0)
        img[r:r + 2, s:s + 2] = 1.0
    return x.reshape(n, -1), y


def test_a_conv_net_learns_where_the_blob_is_on_non_square_images():
    x, y = blob_images(700, seed=1)
    xt, yt = blob_images(300, seed=2)
    clf = MLPClassifier(layers=CONV, image_shape=(8, 10, 1), max_iter=15, learning_rate_init=0.01, random_state=0)
    clf.fit(x, y)
    assert clf.model_.layer_spec == CONV and [l.kind for l in clf.model_.layers] == ["conv", "pool", "dense", "dense"]
    assert clf.score(xt, yt) >= 0.95
    assert clf.loss_curve_[-1] < clf.loss_curve_[0]
    again = pickle.loads(pickle.dumps(clf))
    np.testing.assert_array_equal(again.predict_proba(xt), clf.predict_proba(xt))
    np.testing.assert_array_equal(again.predict(xt), clf.predict(xt))


def test_conv_parameters_round_trip_through_get_params_and_clone():
    clf = MLPClassifier(layers=CONV, image_shape=(8, 10, 1), max_iter=3)
    params = clf.get_params()
    assert params["layers"] == CONV and params["image_shape"] == (8, 10, 1)
    fresh = clone(clf)
    assert fresh.get_params() == params and fresh.layers is CONV
    fresh.set_params(layers="conv4k3,dense8", image_shape=None)
    assert fresh.get_params()["layers"] == "conv4k3,dense8" and clf.layers == CONV
    x, y = blob_images(60, shape=(8, 8))
    assert fresh.fit(x, y).model_.image_shape == (8, 8, 1)  # 64 features: a square image


@pytest.mark.parametrize("kw,match", [
    ({"layers": "conv6k3,pool2,dens16"}, r"'dens16' is not a layer"),
    ({"layers": "conv6k9"}, r"'conv6k9' has a 9 x 9 kernel for 8 x 10 images"),
    ({"layers": "dense8,pool2"}, r"'pool2' comes after a dense layer"),
    ({"layers": ["conv6k3"]}, r"layers must be a spec string"),
    ({"layers": CONV, "hidden_layer_sizes": (32,)}, r"give one of them"),
    ({"layers": CONV, "image_shape": (8, 8, 1)}, r"image_shape \(8, 8, 1\) does not hold 80 input values"),
])
def test_a_bad_conv_configuration_is_one_line_naming_it_at_fit(kw, match):
    clf = MLPClassifier(max_iter=1, **{"image_shape": (8, 10), **kw})
    x, y = blob_images(40)
    with pytest.raises(ValueError, match=match) as err:
        clf.fit(x, y)
    assert "\n" not in str(err.value)
