"""Explain a network that won't learn.

``diagnose(model, x_train, y_train, x_test, y_test, lr=..., optimizer=...)`` looks at
the data, the initial network, a short trial run on a copy of the model, and the
gradients, and returns ``Finding``s, each with a stable ``code``, a ``severity``
(info, warning, error), the ``evidence`` (numbers) and the likely ``fix``:

unscaled-inputs, train-test-mismatch, bad-labels, saturated-units, dead-units,
bad-init, collapsed-predictions, loss-at-chance, no-weight-change, non-finite,
gradient-mismatch.

``EpochMonitor`` repeats the cheap checks after every epoch of a real run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import DataError
from .gradcheck import check_gradients, gradcheck
from .optim import make_optimizer

SEVERITIES = ("info", "warning", "error")


@dataclass
class Finding:
    code: str
    severity: str
    evidence: str
    fix: str

    def __str__(self):
        return f"{self.severity.upper():<7} {self.code}: {self.evidence}\n        fix: {self.fix}"


# ------------------------------------------------------------------ helpers
def effective_inputs(model, x) -> np.ndarray:
    """What the network sees: uint8 pixels after the model's preprocessing, floats as given."""
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return x.astype(np.float64) * model.input_scale + model.input_shift
    return x.astype(np.float64)


def _sample(n, k, seed=0):
    return np.sort(np.random.default_rng(seed).choice(n, min(n, k), replace=False))


def host_forward(params, acts, x):
    """float64 forward on the host -> (pre-activations, activations) per layer."""
    zs, outs, a = [], [], x
    for i, act in enumerate(acts):
        z = a @ params[2 * i] + params[2 * i + 1]
        if act == "relu":
            a = np.maximum(z, 0)
        elif act == "sigmoid":
            a = 0.5 * (1 + np.tanh(0.5 * z))
        elif act == "tanh":
            a = np.tanh(z)
        else:
            a = z
        zs.append(z)
        outs.append(a)
    return zs, outs


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
def check_inputs(model, x_train, x_test=None) -> list[Finding]:
    out = []
    xs = effective_inputs(model, np.asarray(x_train)[_sample(len(x_train), 4000)])
    lo, hi = float(xs.min()), float(xs.max())
    if max(abs(lo), abs(hi)) > 20:
        out.append(Finding(
            "unscaled-inputs", "error",
            f"inputs range over {lo:g}..{hi:g}; a network with standard initialisation expects values "
            "of about [0, 1] (or mean 0, std 1)",
            "divide pixels by 255 (fastnn does this itself when you pass uint8 images), or standardize "
            "with the training set's mean and std"))
    elif lo >= 0 and hi > 1.5:
        out.append(Finding("unscaled-inputs", "warning", f"non-negative inputs up to {hi:g}",
                           "scale inputs to [0, 1] (pixels / 255)"))
    if x_test is not None:
        xt = effective_inputs(model, np.asarray(x_test)[_sample(len(x_test), 4000, 1)])
        mtr, mte, sd = xs.mean(), xt.mean(), xs.std() or 1.0
        rtr, rte = hi - lo, float(xt.max() - xt.min())
        problems = []
        if rte > 0 and rtr > 0 and not 0.2 < rte / rtr < 5:
            problems.append(f"range {xt.min():g}..{xt.max():g} on test against {lo:g}..{hi:g} on training")
        if abs(mte - mtr) > 0.5 * sd:
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


def check_labels(model, x_train, y_train, y_test=None) -> tuple[list[Finding], np.ndarray | None]:
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
    if len(present) >= 2 and len(idx) >= 200:
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


def check_units(model, x, when) -> list[Finding]:
    """Saturated sigmoid/tanh units and dead relu units on the inputs x (N, D)."""
    out = []
    params = [p.astype(np.float64) for p in model.get_params()]
    _, acts = host_forward(params, model.acts, effective_inputs(model, x))
    for i, a in enumerate(acts[:-1]):
        act = model.acts[i]
        if act == "sigmoid" or act == "tanh":
            sat = float(np.mean((a < 0.01) | (a > 0.99))) if act == "sigmoid" else float(np.mean(np.abs(a) > 0.99))
            if sat > 0.5:
                out.append(Finding(
                    "saturated-units", "warning",
                    f"{when}: {sat:.0%} of the {act} outputs of hidden layer {i + 1} are saturated "
                    "(gradients there are near 0)",
                    "scale the inputs to [0, 1], use Xavier initialisation, or lower the learning rate"))
        if act == "relu":
            dead = float(np.mean((a <= 0).all(axis=0)))
            if dead > 0.5:
                out.append(Finding(
                    "dead-units", "warning",
                    f"{when}: {dead:.0%} of the relu units of hidden layer {i + 1} never fire on {len(x)} inputs",
                    "lower the learning rate, use He initialisation, and check the input scaling"))
    return out


def check_init(model, x) -> list[Finding]:
    out = []
    params = model.get_params()
    for i in range(model.n_layers):
        w = params[2 * i]
        if w.shape[1] > 1 and float(np.abs(w - w[:, :1]).max()) == 0.0:
            out.append(Finding(
                "bad-init", "error",
                f"all {w.shape[1]} units of layer {i + 1} start with identical weights "
                f"({'all zero' if not w.any() else 'equal columns'}): they get identical gradients and stay "
                "identical forever",
                "initialise weights randomly (xavier for sigmoid/tanh, he for relu), biases to 0"))
    zs, _ = host_forward([p.astype(np.float64) for p in params], model.acts, effective_inputs(model, x))
    for i, z in enumerate(zs[:-1]):
        sd = float(z.std())
        if sd > 0 and not 0.05 < sd < 20:
            out.append(Finding(
                "bad-init", "warning",
                f"pre-activations of layer {i + 1} have std {sd:.3g} at initialisation (about 1 is healthy)",
                "use xavier (sigmoid/tanh) or he (relu) initialisation, and inputs of about unit scale"))
    return out


def trial_run(model, x, y, lr, optimizer, batch_size, samples, momentum=0.9) -> list[Finding]:
    """Train a copy of the model on a few thousand samples and watch what happens."""
    out = []
    trial = model.clone()
    opt = make_optimizer(optimizer, trial, lr, momentum)
    idx = np.random.default_rng(3).permutation(len(y))[:samples]
    xd, yd = trial.to_device(np.asarray(x)[idx], y[idx])
    ops, steps, losses = trial.ops, -(-len(idx) // batch_size), []
    before = [p.copy() for p in trial.get_params()]
    for s in range(steps):
        sel = ops.xp.arange(s * batch_size, min((s + 1) * batch_size, len(idx)))
        ws = trial.workspace(sel.shape[0])
        trial.load_batch(ws, xd, yd, sel)
        with np.errstate(all="ignore"):
            trial.forward_backward(ws)
            opt.step()
        loss = float(ops.to_host(ws.loss)[0]) / sel.shape[0]
        losses.append(loss)
        params_ok = bool(ops.to_host(ops.xp.isfinite(trial.params).all()))
        if not math.isfinite(loss) or not params_ok:
            what = "the loss" if not math.isfinite(loss) else "the weights"
            out.append(Finding(
                "non-finite", "error",
                f"{what} became NaN or infinite at step {s + 1} of a trial run (lr {lr:g}, {optimizer})",
                "lower the learning rate (try 10x smaller) and check that the inputs are scaled to [0, 1]"))
            return out
        if s == 0:
            after = trial.get_params()
            moved = [float(np.abs(a - b).max()) for a, b in zip(after, before)]
            if max(moved) == 0.0:
                out.append(Finding(
                    "no-weight-change", "error",
                    f"no parameter changed after an optimizer step (lr {lr:g})",
                    "apply the update (w -= lr * grad) and use a learning rate > 0"))
                return out
            for i in range(model.n_layers):
                w0, w1 = before[2 * i], after[2 * i]
                ratio = float(np.linalg.norm(w1 - w0) / (np.linalg.norm(w0) or 1.0))
                if ratio < 1e-6 or ratio > 1.0:
                    out.append(Finding(
                        "no-weight-change", "warning",
                        f"one step changes the weights of layer {i + 1} by {ratio:.2g} of their norm "
                        "(healthy: about 1e-5 to 1e-1)",
                        "raise the learning rate" if ratio < 1e-6 else
                        "lower the learning rate: steps this large make training diverge"))
    tail = float(np.mean(losses[-max(1, steps // 5):]))
    chance = chance_loss(model)
    if abs(tail - chance) < 0.05 * chance or (model.loss == "mse" and abs(tail - chance) < 0.1 * chance):
        out.append(Finding(
            "loss-at-chance", "warning",
            f"after {len(idx)} training samples the loss is {tail:.4g}, the no-information level "
            f"({'ln' if model.loss == 'xent' else '(K-1)/K^2 for'} {model.sizes[-1]} = {chance:.4g})",
            "the network is not learning: check the learning rate, the input scaling and the labels"))
    out += check_predictions(trial, np.asarray(x)[idx[:2000]], y[idx[:2000]], "after the trial run")
    out += check_units(trial, np.asarray(x)[idx[:512]], "after the trial run")
    return out


def check_predictions(model, x, y, when) -> list[Finding]:
    pred = model.predict(x)
    k = model.sizes[-1]
    counts = np.bincount(pred, minlength=k)
    c = int(counts.argmax())
    share = counts[c] / len(pred)
    if share > 0.9:
        base = float(np.mean(np.asarray(y) == c)) if y is not None else float("nan")
        return [Finding(
            "collapsed-predictions", "error",
            f"{when}: the network answers class {c} for {share:.1%} of the inputs; always answering {c} "
            f"scores {base:.2%} here (on MNIST's test set, always answering 1 scores exactly 11.35%)",
            "the network has collapsed to a constant: check learning rate, input scaling, biases, the "
            "loss gradient, and that the weight update is applied")]
    return []


def check_own_gradients(model, x, y, loss_fn=None, grad_fn=None, params=None) -> list[Finding]:
    if loss_fn is not None and grad_fn is not None:
        report = check_gradients(loss_fn, grad_fn, params if params is not None else model.get_params(),
                                 max_entries=30)
        who = "your gradient function"
    else:
        report = gradcheck(model, np.asarray(x)[:8], np.asarray(y)[:8], max_entries=20)
        who = "fastnn's backward pass"
    if report.max_rel_error > 1e-4:
        i = int(np.argmax(report.rel_errors))
        where, a, n = report.worst[i]
        return [Finding(
            "gradient-mismatch", "error",
            f"{who} disagrees with central differences: relative error {report.max_rel_error:.2g} on "
            f"parameter array {i} (at {where}: analytic {a:.4g}, numeric {n:.4g})",
            "re-derive that gradient; for softmax + cross-entropy the gradient of the logits is "
            "softmax - onehot, with no extra softmax derivative")]
    return []


# ---------------------------------------------------------------- entry points
def diagnose(model, x_train, y_train, x_test=None, y_test=None, lr=0.1, optimizer="sgd",
             batch_size=128, trial_samples=4096, loss_fn=None, grad_fn=None, params=None) -> list[Finding]:
    """Run every check; returns the findings, errors first. The model is not changed.

    loss_fn / grad_fn / params: your own loss and gradient functions (as for
    ``check_gradients``) to check instead of fastnn's backward pass.
    """
    findings = []
    x_train = np.asarray(x_train)
    if x_train.ndim != 2 or x_train.shape[1] != model.sizes[0]:
        raise DataError(f"x_train has shape {x_train.shape}, the model expects (N, {model.sizes[0]})")
    findings += check_inputs(model, x_train, x_test)
    more, y = check_labels(model, x_train, y_train, y_test)
    findings += more
    sample = x_train[_sample(len(x_train), 512, 4)]
    findings += check_init(model, sample)
    findings += check_units(model, sample, "at initialisation")
    if y is not None:
        findings += check_own_gradients(model, x_train, y, loss_fn, grad_fn, params)
        findings += trial_run(model, x_train, y, lr, optimizer, batch_size,
                              min(trial_samples, len(y)))
    order = {s: i for i, s in enumerate(reversed(SEVERITIES))}
    unique = {(f.code, f.evidence): f for f in findings}
    return sorted(unique.values(), key=lambda f: order[f.severity])


class EpochMonitor:
    """Cheap checks after each epoch of a real run: call it with fit's epoch record."""

    def __init__(self, model, x_val, y_val):
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
        if rec.get("val_loss") is not None and abs(rec["val_loss"] - chance_loss(m)) < 0.02 * chance_loss(m):
            out.append(Finding("loss-at-chance", "warning",
                               f"epoch {rec['epoch']}: test loss {rec['val_loss']:.4g} is the no-information level",
                               "the network is not learning: check learning rate, input scaling and labels"))
        if self.x_val is not None:
            out += check_predictions(m, self.x_val, self.y_val, f"epoch {rec['epoch']}")
        fresh = [f for f in out if f.code not in self.reported]
        self.reported.update(f.code for f in fresh)
        return fresh
