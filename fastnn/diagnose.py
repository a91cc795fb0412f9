"""Explain a network that won't learn.

``diagnose(model, x_train, y_train, x_test, y_test, lr=..., optimizer=...)`` looks at
the data, the initial network, a short trial run on a copy of the model, and the
gradients, and returns ``Finding``s, each with a stable ``code``, a ``severity``
(info, warning, error), the ``evidence`` (numbers) and the likely ``fix``:

constant-inputs, unscaled-inputs, train-test-mismatch, bad-labels, saturated-units,
dead-units, bad-init, collapsed-predictions, loss-at-chance, no-weight-change,
update-too-large, non-finite, gradient-mismatch (and the info gradient-check-skipped).
Conv nets are checked too: a convolution's units are its channels, and findings name
layers by their spec token, "layer 2 (pool2)".

Every check looks at the network through the model's own forward pass, run on a
float64 CPU clone. ``EpochMonitor`` repeats the cheap checks after every epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import progress
from .config import DEFAULTS
from .errors import ConfigError, DataError
from .gradcheck import (
    check_gradients,
    effective_inputs,
    fault_layers,
    gradcheck,
    layer_label,
    layer_outputs,
    off_kink_rows,
    param_layers,
    param_names,
)
from .loop import all_rows_equal, train_step
from .lrfind import lr_find
from .model import MLP
from .optim import make_optimizer

SEVERITIES = ("info", "warning", "error")

# Thresholds, each with the reason for its value.
INPUT_LIMIT_ERROR = 20.0  # |input| past 20: far outside the unit scale standard inits assume (0..255 pixels)
INPUT_LIMIT_WARNING = 1.5  # non-negative inputs past 1.5: pixels not divided by 255, or divided by too little
RANGE_RATIO = (0.2, 5.0)  # test/training range ratio outside this: another scaling, not sampling noise
MEAN_SHIFT_STDS = 0.5  # test mean over half a training std from the training mean: another preprocessing
SATURATION = 0.01  # sigmoid within 0.01 of 0 or 1, tanh within 0.01 of -1 or 1: slope under 0.01
SATURATED_SHARE = 0.5  # over half of a layer's outputs saturated: most of its gradients vanish
DEAD_SHARE = 0.5  # over half of a layer's relu units never fire: the layer has lost most of its width
PREACT_STD = (0.05, 20.0)  # pre-activation std outside this at init: signals vanish or explode with depth
UPDATE_RATIO = (1e-6, 1.0)  # one step's |dW|/|W| outside this does nothing or overshoots (healthy 1e-5..1e-1)
COLLAPSE_SHARE = 0.9  # one class for over 90% of inputs: a constant network, not a skewed data set
CHANCE_TOLERANCE = {"xent": 0.05, "mse": 0.1}  # trial loss this close (relative) to the no-information loss
CHANCE_TOLERANCE_EPOCH = 0.02  # the same after a whole epoch, measured on more data
RANGE_TEST_BATCH = 64  # the smallest batch the range test reads a slope from
LR_FACTOR = 30.0  # lr over 30x off the range test's suggestion (1.5 decades; the test's noise is far less)
GRAD_REL_ERROR = 1e-4  # float64 central differences agree to about 1e-8: past 1e-4 the gradient is wrong
GRAD_POOL = 256  # the gradient check's samples (gradcheck.GRAD_ROWS) come from the first 256 training rows


@dataclass
class Finding:
    code: str
    severity: str
    evidence: str
    fix: str

    def __str__(self):
        return f"{self.severity.upper():<7} {self.code}: {self.evidence}\n        fix: {self.fix}"


# ------------------------------------------------------------------ helpers
def _sample(n, k, seed=0):
    return np.sort(np.random.default_rng(seed).choice(n, min(n, k), replace=False))


def chance_loss(model) -> float:
    """Loss of a network that knows nothing: ln K for cross-entropy, (K-1)/K^2 for MSE."""
    k = model.sizes[-1]
    return math.log(k) if model.loss == "xent" else (k - 1) / k ** 2


def _labels(y, k, where):
    """Check labels; returns (int labels or None, findings)."""
    out = []
    y = np.asarray(y)
    if y.ndim == 2:
        sums = y.sum(axis=1)
        bad = np.flatnonzero(~np.isclose(sums, 1) | (y < 0).any(axis=1))
        if len(bad):
            out.append(Finding("bad-labels", "error",
                               f"{where}: {len(bad)} one-hot rows do not sum to 1 (first: row {bad[0]}, "
                               f"sum {sums[bad[0]]:g})",
                               "each one-hot row needs exactly one 1; or pass integer labels 0..K-1"))
            return None, out
        y = y.argmax(axis=1)
    if y.ndim != 1:
        return None, [Finding("bad-labels", "error", f"{where}: labels of shape {y.shape}",
                              "pass a vector of integer class labels")]
    if y.dtype.kind == "f" and not np.array_equal(y, np.round(y)):
        return None, [Finding("bad-labels", "error", f"{where}: labels are not whole numbers",
                              "pass integer class labels 0..K-1, not probabilities or scores")]
    if y.dtype.kind not in "iuf":
        return None, [Finding("bad-labels", "error", f"{where}: labels of type {y.dtype}",
                              "pass integer class labels 0..K-1")]
    y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= k:
        return None, [Finding("bad-labels", "error",
                              f"{where}: labels range over {y.min()}..{y.max()}, the network has {k} outputs",
                              f"labels must be 0..{k - 1} (shift 1-based labels down by one, or size "
                              "the output layer to the number of classes)")]
    return y, out


# ----------------------------------------------------------------- checks
def check_inputs(model: MLP, x_train, x_test=None) -> list[Finding]:
    """Training images all the same, inputs far from unit scale, test inputs unlike the training inputs.

    Codes: constant-inputs, unscaled-inputs, train-test-mismatch.
    """
    out = constant_inputs(np.asarray(x_train))
    xs = effective_inputs(model, np.asarray(x_train)[_sample(len(x_train), 4000)])
    lo, hi = float(xs.min()), float(xs.max())
    if max(abs(lo), abs(hi)) > INPUT_LIMIT_ERROR:
        out.append(Finding(
            "unscaled-inputs", "error",
            f"inputs range over {lo:g}..{hi:g}; a network with standard initialisation expects values "
            "of about [0, 1] (or mean 0, std 1)",
            "divide pixels by 255 (fastnn does this itself when you pass uint8 images), or standardize "
            "with the training set's mean and std"))
    elif lo >= 0 and hi > INPUT_LIMIT_WARNING:
        out.append(Finding("unscaled-inputs", "warning", f"non-negative inputs up to {hi:g}",
                           "scale inputs to [0, 1] (pixels / 255)"))
    if x_test is not None:
        xt = effective_inputs(model, np.asarray(x_test)[_sample(len(x_test), 4000, 1)])
        mtr, mte, sd = xs.mean(), xt.mean(), xs.std() or 1.0
        rtr, rte = hi - lo, float(xt.max() - xt.min())
        problems = []
        if rte > 0 and rtr > 0 and not RANGE_RATIO[0] < rte / rtr < RANGE_RATIO[1]:
            problems.append(f"range {xt.min():g}..{xt.max():g} on test against {lo:g}..{hi:g} on training")
        if abs(mte - mtr) > MEAN_SHIFT_STDS * sd:
            problems.append(f"mean {mte:.3g} on test against {mtr:.3g} on training (std {sd:.3g})")
            mid = (lo + hi) / 2
            if (mtr - mid) * (mte - mid) < 0:
                problems.append("the ink polarity looks inverted (dark on light against light on dark)")
        if problems:
            out.append(Finding(
                "train-test-mismatch", "error", "test inputs differ from training inputs: " + "; ".join(problems),
                "preprocess test data exactly as training data (same scaling from the training set, same "
                "polarity); fastnn.datasets.load does this for you"))
    return out


def constant_inputs(x) -> list[Finding]:
    """Every training image the same: nothing to learn from, whatever the network. Code: constant-inputs."""
    if not all_rows_equal(x):
        return []
    what = "all black: every pixel 0" if not np.any(x[0]) else "every input feature is constant"
    return [Finding("constant-inputs", "error",
                    f"all {len(x)} training images are the same ({what}): there is no signal to learn, and the "
                    "network can only learn how common each class is",
                    "check how the images were read (a reader that returned zeros, a wrong offset into the file, "
                    "a failed conversion) and that x holds the images, not a placeholder")]


def check_labels(model: MLP, x_train, y_train, y_test=None) -> tuple[list[Finding], np.ndarray | None]:
    """Labels out of range or not integers, missing classes, labels apart from their images.

    Code: bad-labels. Also returns the labels as int64 (None when unusable).
    """
    k = model.sizes[-1]
    y, out = _labels(y_train, k, "training labels")
    if y is None:
        return out, None
    if y_test is not None:
        yt, more = _labels(y_test, k, "test labels")
        out += more
    counts = np.bincount(y, minlength=k)
    missing = np.flatnonzero(counts == 0)
    if len(missing):
        out.append(Finding("bad-labels", "warning",
                           f"class(es) {', '.join(map(str, missing))} never occur in the training labels",
                           "check the label encoding and that the training split holds every class"))
    # Nearest-class-mean probe: with real labels it beats chance easily; with labels
    # shuffled apart from their images it cannot.
    idx = _sample(len(y), 6000, 2)
    xs, ys = effective_inputs(model, np.asarray(x_train)[idx]), y[idx]
    half = len(idx) // 2
    present = [c for c in range(k) if np.any(ys[:half] == c)]
    if len(present) >= 2 and len(idx) >= 200 and not all_rows_equal(xs):  # identical images: constant-inputs
        means = np.stack([xs[:half][ys[:half] == c].mean(axis=0) for c in present])
        d = ((xs[half:, None, :] - means[None]) ** 2).sum(axis=2)
        acc = float(np.mean(np.asarray(present)[d.argmin(axis=1)] == ys[half:]))
        base = float(np.max(np.bincount(ys[half:], minlength=k))) / (len(ys) - half)
        margin = 3 * math.sqrt(base * (1 - base) / (len(ys) - half))
        if acc < base + margin:
            out.append(Finding(
                "bad-labels", "error",
                f"a nearest-class-mean classifier scores {acc:.1%} on the training data, no better than "
                f"always answering the most common class ({base:.1%}): the labels do not go with the images",
                "check that images and labels are shuffled together (one permutation for both) and "
                "read from matching files"))
    return out, y


def check_units(model: MLP, x, when) -> list[Finding]:
    """Saturated sigmoid/tanh units and dead relu units on the inputs x (N, D); a convolution's unit
    is a channel (dead: it fires at no position of any input).

    Codes: saturated-units, dead-units.
    """
    out = []
    _, acts = layer_outputs(model, x)
    for i, a in enumerate(acts[:-1]):
        act = model.layer_activations[i]
        if act in ("sigmoid", "tanh"):
            lo = 0.0 if act == "sigmoid" else -1.0
            sat = float(np.mean((a < lo + SATURATION) | (a > 1.0 - SATURATION)))
            if sat > SATURATED_SHARE:
                out.append(Finding(
                    "saturated-units", "warning",
                    f"{when}: {sat:.0%} of the {act} outputs of hidden {layer_label(model, i)} are saturated "
                    "(gradients there are near 0)",
                    "scale the inputs to [0, 1], use Xavier initialisation, or lower the learning rate"))
        if act == "relu":
            dead = float(np.mean((a <= 0).all(axis=tuple(range(a.ndim - 1)))))  # per unit or channel
            if dead > DEAD_SHARE:
                out.append(Finding(
                    "dead-units", "warning",
                    f"{when}: {dead:.0%} of the relu {'channels' if a.ndim == 4 else 'units'} of hidden "
                    f"{layer_label(model, i)} never fire on {len(x)} inputs",
                    "lower the learning rate, use He initialisation, and check the input scaling"))
    return out


def check_init(model: MLP, x) -> list[Finding]:
    """Identical units (a convolution's: channels) and badly scaled pre-activations at initialisation,
    on the inputs x (N, D). Code: bad-init."""
    out = []
    for i, w in enumerate(None if w is None else model.ops.to_host(w) for w in model.W):
        if w is not None and w.shape[1] > 1 and float(np.abs(w - w[:, :1]).max()) == 0.0:
            out.append(Finding(
                "bad-init", "error",
                f"all {w.shape[1]} units of {layer_label(model, i)} start with identical weights "
                f"({'all zero' if not w.any() else 'equal columns'}): they get identical gradients and stay "
                "identical forever",
                "initialise weights randomly (xavier for sigmoid/tanh, he for relu), biases to 0"))
    zs, _ = layer_outputs(model, x)
    for i, z in enumerate(zs[:-1]):
        sd = float(z.std())
        if model.layers[i].kind != "pool" and sd > 0 and not PREACT_STD[0] < sd < PREACT_STD[1]:
            out.append(Finding(
                "bad-init", "warning",
                f"pre-activations of {layer_label(model, i)} have std {sd:.3g} at initialisation (about 1 is healthy)",
                "use xavier (sigmoid/tanh) or he (relu) initialisation, and inputs of about unit scale"))
    return out


def check_first_step(model: MLP, before: list, after: list, lr: float) -> list[Finding]:
    """How far one optimizer step moved the weights (lists of ``[W0, b0, ...]``).

    Codes: no-weight-change (error: nothing moved; warning: far too little),
    update-too-large.
    """
    if max(float(np.abs(a - b).max()) for a, b in zip(after, before)) == 0.0:
        return [Finding("no-weight-change", "error", f"no parameter changed after an optimizer step (lr {lr:g})",
                        "apply the update (w -= lr * grad) and use a learning rate > 0")]
    out = []
    for j, i in enumerate(param_layers(model)[::2]):  # the weights of each layer with parameters
        w0, w1 = before[2 * j], after[2 * j]
        ratio = float(np.linalg.norm(w1 - w0) / (np.linalg.norm(w0) or 1.0))
        evidence = (f"one step changes the weights of {layer_label(model, i)} by {ratio:.2g} of their norm "
                    "(healthy: about 1e-5 to 1e-1)")
        if ratio < UPDATE_RATIO[0]:
            out.append(Finding("no-weight-change", "warning", evidence, "raise the learning rate"))
        elif ratio > UPDATE_RATIO[1]:
            out.append(Finding("update-too-large", "warning", evidence,
                               "lower the learning rate: steps this large make training diverge"))
    return out


def check_loss_level(model: MLP, loss: float, samples: int) -> list[Finding]:
    """The trial run's loss at the no-information level. Code: loss-at-chance."""
    chance = chance_loss(model)
    if abs(loss - chance) >= CHANCE_TOLERANCE[model.loss] * chance:
        return []
    return [Finding(
        "loss-at-chance", "warning",
        f"after {samples} training samples the loss is {loss:.4g}, the no-information level "
        f"({'ln' if model.loss == 'xent' else '(K-1)/K^2 for'} {model.sizes[-1]} = {chance:.4g})",
        "the network is not learning: check the learning rate, the input scaling and the labels")]


def trial_run(model: MLP, x, y, lr, optimizer, batch_size, samples, momentum=DEFAULTS.momentum) -> list[Finding]:
    """Train a copy of the model on a few thousand samples and watch what happens.

    Codes: non-finite, those of ``check_first_step``, ``check_loss_level``,
    ``check_predictions`` and ``check_units``.
    """
    trial = model.clone()
    opt = make_optimizer(optimizer, trial, lr, momentum)
    idx = np.random.default_rng(3).permutation(len(y))[:samples]
    xd, yd = trial.to_device(np.asarray(x)[idx], y[idx])
    ops, steps, losses, out = trial.ops, -(-len(idx) // batch_size), [], []
    before = trial.get_params()
    for s in range(steps):
        sel = ops.xp.arange(s * batch_size, min((s + 1) * batch_size, len(idx)))
        ws = trial.workspace(sel.shape[0])
        with np.errstate(all="ignore"):
            train_step(trial, opt, xd, yd, ws, sel)
        losses.append(float(ops.to_host(ws.loss)[0]) / sel.shape[0])
        if not math.isfinite(losses[-1]) or not bool(ops.to_host(ops.xp.isfinite(trial.params).all())):
            what = "the loss" if not math.isfinite(losses[-1]) else "the weights"
            return out + [Finding(
                "non-finite", "error",
                f"{what} became NaN or infinite at step {s + 1} of a trial run (lr {lr:g}, {optimizer})",
                "lower the learning rate (try 10x smaller) and check that the inputs are scaled to [0, 1]")]
        if s == 0:
            out += check_first_step(model, before, trial.get_params(), lr)
            if any(f.severity == "error" for f in out):
                return out
    out += check_loss_level(model, float(np.mean(losses[-max(1, steps // 5):])), len(idx))
    out += check_predictions(trial, np.asarray(x)[idx[:2000]], y[idx[:2000]], "after the trial run")
    out += check_units(trial, np.asarray(x)[idx[:512]], "after the trial run")
    return out


def check_learning_rate(model: MLP, x, y, lr, optimizer, batch_size) -> list[Finding]:
    """The learning-rate range test (``lr_find``) on a copy of the model. Codes: lr-far-off.

    Batches of at least RANGE_TEST_BATCH: the loss of a single sample is too noisy to read
    a slope from (the gradient of a batch-mean loss has the per-sample gradient's scale)."""
    try:
        r = lr_find(model, x, y, optimizer=optimizer, batch_size=max(batch_size, RANGE_TEST_BATCH))
    except ConfigError:  # the loss diverged at once: the trial run says why
        return []
    ratio = lr / r["suggested"]
    if 1 / LR_FACTOR <= ratio <= LR_FACTOR:
        return []
    return [Finding("lr-far-off", "warning",
                    f"lr {lr:g} is {ratio:.3g}x the rate where the loss falls fastest in a learning-rate range "
                    f"test ({r['suggested']:.3g} for {optimizer})",
                    f"try lr {r['suggested']:.2g} ('fastnn lr-find' plots the whole curve)")]


def check_predictions(model: MLP, x, y, when) -> list[Finding]:
    """One class for nearly every input. Code: collapsed-predictions."""
    pred = model.predict(x)
    k = model.sizes[-1]
    counts = np.bincount(pred, minlength=k)
    c = int(counts.argmax())
    share = counts[c] / len(pred)
    if share > COLLAPSE_SHARE:
        base = float(np.mean(np.asarray(y) == c)) if y is not None else float("nan")
        return [Finding(
            "collapsed-predictions", "error",
            f"{when}: the network answers class {c} for {share:.1%} of the inputs; always answering {c} "
            f"scores {base:.2%} here (on MNIST's test set, always answering 1 scores exactly 11.35%)",
            "the network has collapsed to a constant: check learning rate, input scaling, biases, the "
            "loss gradient, and that the weight update is applied")]
    return []


def check_own_gradients(model: MLP, x, y, loss_fn=None, grad_fn=None, params=None) -> list[Finding]:
    """fastnn's backward pass (or your grad_fn) against central differences, on inputs x (N, D) and
    labels y (N,). Code: gradient-mismatch, naming the array and the layers it points to.

    Every parameter array is checked, a conv net's too (pooling through the layers below it). fastnn's
    pass is checked on samples where the loss is differentiable (``off_kink_rows``: relu units off their
    kink, no near ties in a max-pooling window): there central differences are no derivative, and a
    mismatch is no fault of the backward pass (code gradient-check-skipped, info, when no sample is; a conv
    net, whose blank image borders put units at the kink, is then checked on random images instead)."""
    if loss_fn is not None and grad_fn is not None:
        params = params if params is not None else model.get_params()
        names = param_names(model) if len(params) == len(model.shapes) else None
        report = check_gradients(loss_fn, grad_fn, params, max_entries=30, names=names)
        who = "your gradient function"
    else:
        x = np.asarray(x)[:GRAD_POOL]
        rows = off_kink_rows(model, x)
        if len(rows) == 0 and model.layer_spec is not None:  # blank borders: a conv net is checked on noise
            x = _noise_like(x)
            rows = off_kink_rows(model, x)
        if len(rows) == 0:
            conv = model.layer_spec is not None
            return [Finding(
                "gradient-check-skipped", "info",
                f"fastnn's backward pass was not checked: on each of the first {min(len(x), GRAD_POOL)} training "
                f"samples some relu units sit at their kink (pre-activation 0, as all-zero {'patches' if conv else ''}"
                f"{' (black image borders)' if conv else 'inputs'} with zero biases give)"
                f"{', or max-pooling windows hold near ties' if conv else ''}, where central differences measure a "
                "slope of 1/2 and backpropagation 0",
                "the inputs may be sound (random images put this conv net's units at the kink too): run "
                "fastnn.gradcheck on inputs of your own that keep every relu unit off 0" if conv else
                "fix the inputs first; the check runs on samples that keep every relu unit off 0")]
        report = gradcheck(model, x[rows], np.asarray(y)[rows], max_entries=20)
        who = "fastnn's backward pass"
    return _mismatch(model, report, who) if report.max_rel_error > GRAD_REL_ERROR else []


def _noise_like(x: np.ndarray) -> np.ndarray:
    """Random images in x's range and dtype (uint8 pixels: 0-255), seeded: inputs that keep a conv net's
    units off relu's kink where real images' blank borders put them on it."""
    rng = np.random.default_rng(0)
    if x.dtype == np.uint8:
        return rng.integers(0, 256, x.shape, dtype=np.uint8)
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 1.0)
    return rng.uniform(lo, hi if hi > lo else lo + 1.0, x.shape).astype(x.dtype)


def _mismatch(model: MLP, report, who: str) -> list[Finding]:
    """The gradient-mismatch finding of a failed ``GradReport``. With names in the report: the topmost wrong
    array (backpropagation's errors flow down, so it is the one nearest the fault) and the layers it points
    to (``fault_layers``); without: the worst array."""
    bad = [e > GRAD_REL_ERROR for e in report.rel_errors]
    named = len(report.names) == len(bad)
    i = max(j for j, b in enumerate(bad) if b) if named else int(np.argmax(report.rel_errors))
    where, a, n = report.worst[i]
    evidence = (f"{who} disagrees with central differences: relative error {report.rel_errors[i]:.2g} on "
                f"parameter array {i}{', ' + report.names[i] if named else ''} (at {where}: analytic {a:.4g}, "
                f"numeric {n:.4g})")
    if named:
        layers = fault_layers(model, bad)
        evidence += (f"; {'the layers above agree, so ' if i < len(bad) - 2 else ''}the fault is in the backward "
                     "pass of " + ", ".join(layer_label(model, l) for l in layers))
    return [Finding("gradient-mismatch", "error", evidence,
                    "re-derive that gradient; for softmax + cross-entropy the gradient of the logits is "
                    "softmax - onehot, with no extra softmax derivative")]


# ---------------------------------------------------------------- entry points
def diagnose(model: MLP, x_train, y_train, x_test=None, y_test=None, lr=DEFAULTS.lr, optimizer=DEFAULTS.optimizer,
             batch_size=DEFAULTS.batch_size, trial_samples=4096, loss_fn=None, grad_fn=None, params=None,
             verbose=0) -> list[Finding]:
    """Run every check; returns the findings, errors first. The model is not changed.

    loss_fn / grad_fn / params: your own loss and gradient functions (as for
    ``check_gradients``) to check instead of fastnn's backward pass.
    verbose: 1 shows a progress bar over the checks where a person watches (``fastnn.progress``).
    """
    x_train = np.asarray(x_train)
    if x_train.ndim != 2 or x_train.shape[1] != model.sizes[0]:
        raise DataError(f"x_train has shape {x_train.shape}, the model expects (N, {model.sizes[0]})")
    findings, (label_findings, y) = [], check_labels(model, x_train, y_train, y_test)
    sample = x_train[_sample(len(x_train), 512, 4)]
    checks = [("data", lambda: check_inputs(model, x_train, x_test) + label_findings),
              ("initialisation", lambda: check_init(model, sample) + check_units(model, sample, "at initialisation"))]
    if y is not None:
        checks += [("gradients", lambda: check_own_gradients(model, x_train, y, loss_fn, grad_fn, params)),
                   ("trial run", lambda: trial_run(model, x_train, y, lr, optimizer, batch_size,
                                                   min(trial_samples, len(y)))),
                   ("learning rate", lambda: check_learning_rate(model, x_train, y, lr, optimizer, batch_size))]
    with progress.bar(len(checks), "doctor", unit="check", show=bool(verbose)) as shown:
        for name, run in checks:
            shown.set_postfix_str(name, refresh=True)
            findings += run()
            shown.update(1)
    order = {s: i for i, s in enumerate(reversed(SEVERITIES))}
    unique = {(f.code, f.evidence): f for f in findings}
    return sorted(unique.values(), key=lambda f: order[f.severity])


class EpochMonitor:
    """Cheap checks after each epoch of a real run: call it with fit's epoch record.

    Codes: no-weight-change, loss-at-chance, collapsed-predictions; each reported once.
    """

    def __init__(self, model: MLP, x_val, y_val):
        self.model, self.x_val, self.y_val = model, x_val, y_val
        self.last = model.params.copy()
        self.reported = set()

    def __call__(self, rec) -> list[Finding]:
        m, out = self.model, []
        xp = m.ops.xp
        moved = float(m.ops.to_host(xp.abs(m.params - self.last).max()))
        self.last[...] = m.params
        if moved == 0.0:
            out.append(Finding("no-weight-change", "error", f"epoch {rec['epoch']}: no parameter changed",
                               "use a learning rate > 0 and check that the update is applied"))
        chance = chance_loss(m)
        if rec.get("val_loss") is not None and abs(rec["val_loss"] - chance) < CHANCE_TOLERANCE_EPOCH * chance:
            out.append(Finding("loss-at-chance", "warning",
                               f"epoch {rec['epoch']}: validation loss {rec['val_loss']:.4g} is at chance level",
                               "the network is not learning: check learning rate, input scaling and labels"))
        if self.x_val is not None:
            out += check_predictions(m, self.x_val, self.y_val, f"epoch {rec['epoch']}")
        fresh = [f for f in out if f.code not in self.reported]
        self.reported.update(f.code for f in fresh)
        return fresh
