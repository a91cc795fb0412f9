"""scikit-learn's estimator API: ``fastnn.sklearn.MLPClassifier``, on the CPU or a GPU.

    from fastnn.sklearn import MLPClassifier
    clf = MLPClassifier(hidden_layer_sizes=(256, 128), max_iter=20, device="auto").fit(X, y)
    clf.predict(X_test), clf.predict_proba(X_test), clf.score(X_test, y_test)

Parameters mirror scikit-learn's ``MLPClassifier`` where they overlap. Differences:
``solver`` is "adam" or "sgd" (Nesterov momentum, as scikit-learn's default "sgd"); no
"lbfgs". ``alpha`` is decoupled weight decay (AdamW) rather than an L2 term in the loss.
``max_iter`` epochs always run unless ``early_stopping`` stops them; ``tol`` is not used.
``dtype`` (default: X's, as scikit-learn computes: float64 X trains in float64; float32 X and
uint8 pixels, which the model's Preprocessing scales by 1/255, in float32, twice as fast).

Conv nets: ``layers="conv8k3,pool2,dense32"`` (the grammar of ``fastnn.layers``: convCkK[s],
poolP, denseN; the output layer is added) trains a convolutional network on X's rows as images,
(H, W, C) channels last: square single-channel images by default (64 features: 8 x 8 x 1),
``image_shape=(H, W, C)`` otherwise (not used without ``layers``). The spec's dense layers are
the hidden layers, so a spec takes the place of ``hidden_layer_sizes``: setting both is refused
in ``fit`` (a ValueError), unless ``hidden_layer_sizes`` is left at its default. ``dropout``
applies to dense layers only. A bad spec is a one-line ValueError (``ConfigError``) naming the token.
Needs scikit-learn (``pip install 'fastnn[sklearn]'``); ``import fastnn`` does not.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from .model import MLP
from .train import fit

SOLVERS = {"adam": "adam", "sgd": "nesterov"}
DEFAULT_HIDDEN = (100,)  # hidden_layer_sizes' default, as scikit-learn's
# uint8 pixels stay uint8: the model's Preprocessing scales them (1/255), as everywhere in fastnn
DTYPES = [np.float64, np.float32, np.uint8]


class MLPClassifier(ClassifierMixin, BaseEstimator):
    """A multilayer perceptron classifier trained by fastnn (see the module docstring).

    Attributes after ``fit``: ``classes_`` (any labels, strings included), ``model_``
    (the ``fastnn.MLP``), ``loss_curve_`` (training loss per epoch), ``validation_scores_``
    (validation accuracy per epoch with early_stopping, else None), ``n_iter_``,
    ``n_features_in_``.
    """

    def __init__(self, hidden_layer_sizes=DEFAULT_HIDDEN, activation="relu", solver="adam", alpha=0.0001,
                 batch_size="auto", learning_rate_init=0.001, max_iter=200, momentum=0.9, early_stopping=False,
                 validation_fraction=0.1, n_iter_no_change=10, random_state=None, verbose=False, device="cpu",
                 dropout=0.0, class_weight=None, dtype=None, layers=None, image_shape=None):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate_init = learning_rate_init
        self.max_iter = max_iter
        self.momentum = momentum
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.random_state = random_state
        self.verbose = verbose
        self.device = device
        self.dropout = dropout
        self.class_weight = class_weight
        self.dtype = dtype
        self.layers = layers
        self.image_shape = image_shape

    def fit(self, X, y, sample_weight=None):
        """Train a new network on X (n_samples, n_features), y (n_samples,) labels."""
        X, y = validate_data(self, X, y, dtype=DTYPES)
        check_classification_targets(y)
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"MLPClassifier needs samples of at least 2 classes; got one class: {self.classes_[0]!r}")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {sorted(SOLVERS)}, got {self.solver!r}")
        self._check_layers()
        seed = 0 if self.random_state is None else int(np.random.RandomState(self.random_state).randint(2 ** 31))
        self.model_ = self._new_model(X, seed)
        return self._train(X, y_idx, self.max_iter, sample_weight, seed)

    def _new_model(self, X, seed: int) -> MLP:
        """The network for X (n_samples, n_features): in ``dtype``, or by default in X's float dtype as
        scikit-learn's estimators compute (float64 for float64 X; float32 for float32 X and uint8 pixels)."""
        hidden = [self.hidden_layer_sizes] if np.isscalar(self.hidden_layer_sizes) else list(self.hidden_layer_sizes)
        dtype = self.dtype or ("float64" if X.dtype == np.float64 else "float32")
        if self.layers is not None:  # a conv net: the spec holds the hidden layers
            hidden = []
        return MLP([X.shape[1], *hidden, len(self.classes_)], self.activation, device=self.device, dtype=dtype,
                   seed=seed, dropout=self.dropout, layers=self.layers, image_shape=self.image_shape)

    def _check_layers(self) -> None:
        """``layers`` a spec string or None, and not together with a ``hidden_layer_sizes`` of one's own;
        the spec's tokens and ``image_shape`` are checked by the network (a ConfigError, a ValueError,
        naming the token)."""
        if self.layers is None:  # a dense network: image_shape is not used
            return
        if not isinstance(self.layers, str):
            raise ValueError(f"layers must be a spec string such as 'conv8k3,pool2,dense32' or None, "
                             f"got {self.layers!r}")
        if np.atleast_1d(self.hidden_layer_sizes).tolist() != list(DEFAULT_HIDDEN):
            raise ValueError(f"layers={self.layers!r} holds the hidden layers of a conv net, and "
                             f"hidden_layer_sizes={self.hidden_layer_sizes!r} those of a dense one: give one of them "
                             "(put dense layers in the spec: '...,dense100')")

    def partial_fit(self, X, y, classes=None, sample_weight=None):
        """One more epoch on (X, y); the first call needs ``classes`` (all the labels there will be)."""
        if not hasattr(self, "model_"):
            if classes is None:
                raise ValueError("classes must be given in the first call to partial_fit")
            X, y = validate_data(self, X, y, dtype=DTYPES)
            self._check_layers()
            self.classes_ = np.unique(classes)
            self.model_ = self._new_model(X, 0 if self.random_state is None else int(self.random_state))
        else:
            X, y = validate_data(self, X, y, dtype=DTYPES, reset=False)
        unknown = np.setdiff1d(y, self.classes_)
        if unknown.size:
            raise ValueError(f"labels {unknown.tolist()} are not in classes_ {self.classes_.tolist()}")
        return self._train(X, np.searchsorted(self.classes_, y), 1, sample_weight, getattr(self, "n_iter_", 0))

    def _train(self, X, y_idx, epochs, sample_weight, seed):
        stop = self.early_stopping and epochs > 1
        batch = min(200, len(X)) if self.batch_size == "auto" else int(self.batch_size)
        history = fit(self.model_, X, y_idx, epochs=epochs, batch_size=min(batch, len(X)), seed=seed,
                      lr=self.learning_rate_init, optimizer=SOLVERS[self.solver], momentum=self.momentum,
                      weight_decay=self.alpha, sample_weight=sample_weight, class_weight=self._class_weight(),
                      validation_split=self.validation_fraction if stop else None,
                      patience=self.n_iter_no_change if stop else None, verbose=int(bool(self.verbose)),
                      lr_schedule="constant")  # scikit-learn's learning_rate='constant'
        self.loss_curve_ = getattr(self, "loss_curve_", [])[:0 if epochs > 1 else None] + [
            h["train_loss"] for h in history]
        self.validation_scores_ = [h["val_accuracy"] for h in history] if stop else None
        self.n_iter_ = (0 if epochs > 1 else getattr(self, "n_iter_", 0)) + len(history)
        return self

    def _class_weight(self):
        """class_weight in the network's class order (a dict keyed by the labels is mapped)."""
        if isinstance(self.class_weight, dict):
            return {int(np.searchsorted(self.classes_, c)): w for c, w in self.class_weight.items()
                    if c in self.classes_}
        return self.class_weight

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities (n_samples, n_classes), columns in the order of ``classes_``."""
        check_is_fitted(self)
        X = validate_data(self, X, dtype=DTYPES, reset=False)
        return self.model_.predict_proba(X)

    def predict(self, X) -> np.ndarray:
        proba = self.predict_proba(X)  # first: it raises NotFittedError before fit
        return self.classes_[np.argmax(proba, axis=1)]
