"""Training loops: batched and per-sample, through the same forward/backward.

``fit`` uploads the data to the device once, then for each epoch draws one
permutation (on the host, from a seeded NumPy generator, so CPU and GPU runs
see the same batch order) and uploads it; every batch is gathered from the
device-resident data by index. Per-batch loss sums and hit counts are written
into device arrays and read once at the end of the epoch: nothing inside an
epoch waits for the device.
"""

from __future__ import annotations

import math
import time

import numpy as np

from .errors import ConfigError, FastnnError
from .optim import Optimizer, make_optimizer


class DivergedError(FastnnError):
    """Training produced a non-finite loss. ``.history`` holds the epochs before it."""

    def __init__(self, message, history):
        super().__init__(message)
        self.history = history


def train_epoch(model, opt: Optimizer, x_dev, y_dev, batch_size: int, rng) -> dict:
    """One epoch over device data x_dev (N, D), y_dev (N,) int32 in shuffled batches.

    With ``batch_size=1`` this is per-sample SGD: one update after every sample.
    Returns ``{"train_loss", "train_accuracy", "seconds"}`` (one synchronisation).
    """
    ops, xp = model.ops, model.ops.xp
    n = x_dev.shape[0]
    steps = -(-n // batch_size)
    t0 = time.perf_counter()
    perm = ops.asarray(rng.permutation(n))
    losses = xp.zeros(steps, model.dtype)
    hits = xp.zeros(steps, np.int32)
    for s in range(steps):
        idx = perm[s * batch_size:(s + 1) * batch_size]
        ws = model.workspace(idx.shape[0])
        model.load_batch(ws, x_dev, y_dev, idx)
        model.forward(ws)
        model.loss_and_delta(ws, losses[s:s + 1], hits[s:s + 1])
        model.backward(ws)
        opt.step()
    loss = float(ops.to_host(losses.astype(np.float64).sum())) / n
    acc = int(ops.to_host(hits.sum())) / n
    return {"train_loss": loss, "train_accuracy": acc, "seconds": time.perf_counter() - t0}


def fit(model, x, y, epochs=10, batch_size=128, lr=0.1, optimizer="sgd", momentum=0.9,
        weight_decay=0.0, per_sample=False, x_val=None, y_val=None, seed=0,
        on_epoch=None) -> list[dict]:
    """Train ``model`` on x (N, D) float or uint8, y (N,) integer labels.

    optimizer: "sgd", "momentum", "nesterov", "adam", or an ``Optimizer`` instance.
    per_sample: batch size 1, an update after every sample (the textbook loop).
    on_epoch: optional callable ``(record) -> bool``; returning True stops training.
    Returns the history, one dict per epoch with ``epoch, train_loss,
    train_accuracy, val_loss, val_accuracy, seconds, samples_per_s``.
    Raises DivergedError when the loss becomes NaN or infinite.
    """
    if per_sample:
        batch_size = 1
    if int(batch_size) < 1 or int(epochs) < 0:
        raise ConfigError(f"batch_size must be >= 1 and epochs >= 0, got {batch_size}, {epochs}")
    x_dev, y_dev = model.to_device(x, y)
    if (x_val is None) != (y_val is None):
        raise ConfigError("give both x_val and y_val, or neither")
    if x_val is not None:
        model.check_inputs(x_val, y_val, name="x_val")
    opt = optimizer if isinstance(optimizer, Optimizer) else make_optimizer(
        optimizer, model, lr, momentum, weight_decay)
    rng = np.random.default_rng(seed)
    history = []
    for epoch in range(1, int(epochs) + 1):
        rec = {"epoch": epoch}
        with np.errstate(over="ignore", invalid="ignore"):  # divergence is reported below
            rec.update(train_epoch(model, opt, x_dev, y_dev, int(batch_size), rng))
        rec["samples_per_s"] = x_dev.shape[0] / rec["seconds"]
        if x_val is not None:
            val = model.evaluate(x_val, y_val)
            rec["val_loss"], rec["val_accuracy"] = val["loss"], val["accuracy"]
        else:
            rec["val_loss"] = rec["val_accuracy"] = None
        history.append(rec)
        if not math.isfinite(rec["train_loss"]):
            raise DivergedError(
                f"the training loss became {rec['train_loss']} in epoch {epoch}: the learning "
                f"rate ({opt.lr}) is probably too high, or the inputs are not scaled to about [0, 1]",
                history)
        if on_epoch is not None and on_epoch(rec):
            break
    return history
