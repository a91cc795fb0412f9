"""The learning-rate range test (fastai's ``lr_find``, Lightning's ``Tuner.lr_find``).

A short run on a copy of the model in which the learning rate rises exponentially,
one step per rate, from ``start`` to ``end``, recording the loss of each batch. Where
the smoothed loss falls fastest is a good learning rate; where it bottoms out, the
rate is already too high (the classic suggestion is a tenth of that).
"""

from __future__ import annotations

import math

import numpy as np

from . import progress
from .config import DEFAULTS
from .errors import ConfigError
from .loop import train_step
from .model import MLP
from .optim import make_optimizer

SMOOTHING = 0.98  # exponential moving average of the batch losses, bias-corrected (as fastai)
DIVERGED = 4.0  # stop once the smoothed loss exceeds this multiple of the best one


def lr_find(model: MLP, x, y, optimizer=DEFAULTS.optimizer, start=1e-6, end=10.0, steps=100,
            batch_size=DEFAULTS.batch_size, momentum=DEFAULTS.momentum, seed=0, verbose=0) -> dict:
    """Learning rate vs loss on a copy of ``model`` (the model itself is not changed).

    x (N, D) float or uint8, y (N,) labels; one step per rate, the rates spaced
    exponentially from ``start`` to ``end``; batches drawn in a seeded random order.
    Returns ``{"lrs", "losses"}`` (the smoothed loss after each step, up to where it
    diverged), ``"suggested"`` (the middle of the decade of rates over which the smoothed
    loss falls most) and ``"min_loss_lr"`` (where it is lowest). verbose: 1 shows a progress
    bar where a person watches (``fastnn.progress``).
    """
    if not (0 < start < end) or steps < 3:
        raise ConfigError(f"lr_find needs 0 < start < end and steps >= 3, got {start}, {end}, {steps}")
    work = model.clone()
    x_dev, y_dev = work.to_device(x, y)
    n = x_dev.shape[0]
    batch = min(int(batch_size), n)
    opt = make_optimizer(optimizer, work, start, momentum)
    rng = np.random.default_rng(seed)
    ws = work.workspace(batch)
    lrs, losses, avg, best = [], [], 0.0, math.inf
    order = rng.permutation(n)
    shown = progress.bar(int(steps), "lr-find", unit="step", show=bool(verbose))
    for i in range(int(steps)):
        shown.update(1)
        opt.lr = start * (end / start) ** (i / (steps - 1))
        s = (i * batch) % n
        if s + batch > n:
            order, s = rng.permutation(n), 0
        train_step(work, opt, x_dev, y_dev, ws, work.ops.asarray(order[s:s + batch]))
        loss = float(work.ops.to_host(ws.loss)[0]) / batch  # one sync per step: a short run
        avg = SMOOTHING * avg + (1 - SMOOTHING) * loss
        smoothed = avg / (1 - SMOOTHING ** (i + 1))
        if not math.isfinite(smoothed) or smoothed > DIVERGED * best:
            break
        best = min(best, smoothed)
        lrs.append(opt.lr)
        losses.append(smoothed)
    shown.close()
    if len(lrs) < 3:
        raise ConfigError(f"the loss diverged within {len(lrs)} steps of lr_find: lower start (now {start:g})")
    return {"lrs": lrs, "losses": losses, "suggested": _steepest(lrs, losses, steps / math.log10(end / start)),
            "min_loss_lr": float(lrs[int(np.argmin(losses))])}


def _steepest(lrs, losses, per_decade: float) -> float:
    """The rate in the middle of the decade over which the smoothed loss falls most, skipping the
    first steps (the moving average is still settling there); a decade-wide slope is robust to
    the batch-to-batch noise that a point-to-point slope picks up on a nearly flat curve."""
    log_lr, loss = np.log10(np.asarray(lrs)), np.asarray(losses)
    w = max(1, min(int(round(per_decade)), len(lrs) // 3))
    first = min(10, len(lrs) // 4)
    drops = [(loss[i + w] - loss[i]) / (log_lr[i + w] - log_lr[i]) for i in range(first, len(lrs) - w)]
    if not drops:
        return float(lrs[int(np.argmin(loss))])
    i = first + int(np.argmin(drops))
    return float(10 ** ((log_lr[i] + log_lr[i + w]) / 2))


def plot_lr_find(result: dict, path) -> None:
    """The loss against the learning rate (log scale), the suggestion marked (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(result["lrs"], result["losses"])
    ax.axvline(result["suggested"], color="C1", linestyle="--", label=f"suggested {result['suggested']:.2g}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="smoothed training loss", title="learning-rate range test")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
