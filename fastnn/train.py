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
import warnings

import numpy as np

from .errors import ConfigError, FastnnError
from .optim import Optimizer, make_optimizer


class DivergedError(FastnnError):
    """Training produced a non-finite loss. ``.history`` holds the epochs before it."""

    def __init__(self, message, history):
        super().__init__(message)
        self.history = history


def train_epoch(model, opt: Optimizer, x_dev, y_dev, batch_size: int, rng, progress=None, graph=None) -> dict:
    """One epoch over device data x_dev (N, D), y_dev (N,) int32 in shuffled batches.

    With ``batch_size=1`` this is per-sample SGD: one update after every sample.
    progress: optional callable(n) told after each batch how many samples it held
    (it counts launched work; it never waits for the device).
    graph: a ``fastnn.graph.GraphEpoch`` to replay instead of launching each kernel.
    Returns ``{"train_loss", "train_accuracy", "seconds"}`` (one synchronisation).
    """
    ops, xp = model.ops, model.ops.xp
    n = x_dev.shape[0]
    t0 = time.perf_counter()
    order = rng.permutation(n)
    if graph is not None:
        loss, hits = graph(order, progress)
        return {"train_loss": loss / n, "train_accuracy": hits / n, "seconds": time.perf_counter() - t0}
    steps = -(-n // batch_size)
    perm = ops.asarray(order)
    losses = xp.zeros(steps, model.dtype)
    hits = xp.zeros(steps, np.int32)
    for s in range(steps):
        idx = perm[s * batch_size:(s + 1) * batch_size]
        ws = model.workspace(idx.shape[0])
        model.load_batch(ws, x_dev, y_dev, idx)
        model.forward_backward(ws, losses[s:s + 1], hits[s:s + 1])
        opt.step()
        if progress is not None:
            progress(idx.shape[0])
    loss = float(ops.to_host(losses.astype(np.float64).sum())) / n
    acc = int(ops.to_host(hits.sum())) / n
    return {"train_loss": loss, "train_accuracy": acc, "seconds": time.perf_counter() - t0}


def fit(model, x, y, epochs=10, batch_size=128, lr=0.1, optimizer="sgd", momentum=0.9,
        weight_decay=0.0, per_sample=False, x_val=None, y_val=None, seed=0, lr_schedule="constant",
        patience=None, on_epoch=None, progress=None, rng=None, start_epoch=1, cuda_graph=False) -> list[dict]:
    """Train ``model`` on x (N, D) float or uint8, y (N,) integer labels.

    optimizer: "sgd", "momentum", "nesterov", "adam", or an ``Optimizer`` instance.
    per_sample: batch size 1, an update after every sample (the textbook loop).
    lr_schedule: "constant" or "cosine" (from lr down to 0 over ``epochs``).
    patience: stop when the validation loss has not improved for this many
    epochs, and restore the weights of the best epoch (needs x_val, y_val).
    on_epoch: optional callable ``(record) -> bool``; returning True stops training.
    progress: optional callable ``(n_samples)`` called after every batch.
    rng / start_epoch: continue a run (a NumPy Generator in the state it had
    after epoch ``start_epoch - 1``); by default a new one from ``seed``.
    cuda_graph: on the GPU, replay a captured training step per batch
    (``fastnn.graph``); if capturing fails, a warning says why and training
    goes on uncaptured.
    Returns the history, one dict per epoch with ``epoch, lr, train_loss,
    train_accuracy, val_loss, val_accuracy, seconds, samples_per_s``.
    Raises DivergedError when the loss becomes NaN or infinite.
    """
    if per_sample:
        batch_size = 1
    if int(batch_size) < 1 or int(epochs) < 0:
        raise ConfigError(f"batch_size must be >= 1 and epochs >= 0, got {batch_size}, {epochs}")
    if lr_schedule not in ("constant", "cosine"):
        raise ConfigError(f"unknown lr_schedule {lr_schedule!r}: choose constant or cosine")
    if (x_val is None) != (y_val is None):
        raise ConfigError("give both x_val and y_val, or neither")
    if patience is not None and x_val is None:
        raise ConfigError("early stopping (patience) needs validation data")
    x_dev, y_dev = model.to_device(x, y)
    val_dev = None if x_val is None else model.to_device(x_val, y_val, name="x_val")  # once, not per epoch
    opt = optimizer if isinstance(optimizer, Optimizer) else make_optimizer(
        optimizer, model, lr, momentum, weight_decay)
    base_lr = opt.lr
    rng = np.random.default_rng(seed) if rng is None else rng
    graph = _graph_or_none(model, opt, x_dev, y_dev, int(batch_size)) if cuda_graph else None
    history, best, best_params = [], math.inf, None
    for epoch in range(int(start_epoch), int(epochs) + 1):
        if lr_schedule == "cosine":
            opt.lr = base_lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / epochs))
        rec = {"epoch": epoch, "lr": opt.lr}
        with np.errstate(over="ignore", invalid="ignore"):  # divergence is reported below
            rec.update(train_epoch(model, opt, x_dev, y_dev, int(batch_size), rng, progress, graph))
        rec["samples_per_s"] = x_dev.shape[0] / rec["seconds"]
        if x_val is not None:
            val = model.evaluate_device(*val_dev)
            rec["val_loss"], rec["val_accuracy"] = val["loss"], val["accuracy"]
        else:
            rec["val_loss"] = rec["val_accuracy"] = None
        history.append(rec)
        if not math.isfinite(rec["train_loss"]):
            raise DivergedError(
                f"the training loss became {rec['train_loss']} in epoch {epoch}: the learning "
                f"rate ({opt.lr:g}) is probably too high, or the inputs are not scaled to about [0, 1]",
                history)
        stop = on_epoch is not None and on_epoch(rec)
        if patience is not None:
            if rec["val_loss"] < best:
                best, best_params = rec["val_loss"], model.params.copy()
                rec["best"] = True
            elif epoch - max(h["epoch"] for h in history if h.get("best")) >= patience:
                rec["early_stop"] = True
                stop = True
        if stop:
            break
    if best_params is not None:
        model.params[...] = best_params
    return history


def _graph_or_none(model, opt, x_dev, y_dev, batch):
    """A captured-step runner, or None (with a warning) when capture fails on this GPU."""
    from .graph import GraphEpoch

    graph = GraphEpoch(model, opt, x_dev, y_dev, batch)  # ConfigError on the CPU
    try:
        graph.capture()
    except Exception as exc:  # the driver or CuPy refused the capture
        warnings.warn(f"CUDA graph capture failed ({type(exc).__name__}: {exc}); training without it",
                      RuntimeWarning, stacklevel=3)
        return None
    return graph
