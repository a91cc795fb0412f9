"""``fit``: train one model, batched or per-sample, on the shared epoch loop (``fastnn/loop.py``).

``fit`` checks its arguments and uploads the data once (``loop.prepare``), makes the
optimizer, and runs ``loop.EpochLoop``; around each epoch it keeps the history, prints
(``verbose``), stops on a NaN loss (``DivergedError``) or on the caller's ``on_epoch`` and
keeps the best weights for early stopping (``patience``).
"""

from __future__ import annotations

import math

import numpy as np

from .config import DEFAULTS
from .errors import ConfigError, DivergedError
from .guards import describe_nonfinite, nonfinite_params
from .loop import EpochLoop, prepare, stratified_split, train_epoch, train_step
from .model import MLP
from .optim import Optimizer, make_optimizer
from .progress import EpochProgress, epoch_line

__all__ = ["fit", "train_step", "train_epoch", "stratified_split", "EarlyStopping"]


def fit(model: MLP, x, y, epochs=DEFAULTS.epochs, batch_size=DEFAULTS.batch_size, lr=None,
        optimizer=DEFAULTS.optimizer, momentum=None, weight_decay=None, per_sample=False, x_val=None, y_val=None,
        seed=DEFAULTS.seed, lr_schedule=DEFAULTS.lr_schedule, patience=None, on_epoch=None, progress=None, rng=None,
        start_epoch=1, cuda_graph=False, validation_split=None, verbose=0, sample_weight=None,
        class_weight=None) -> list[dict]:
    """Train ``model`` on x (N, D) float or uint8, y (N,) integer labels.

    The defaults are ``fastnn train``'s (``config.DEFAULTS``): Adam, lr 1e-3, a cosine
    schedule, batch 128, 20 epochs.
    optimizer: "sgd", "momentum", "nesterov", "adam" with ``lr``, ``momentum`` and
    ``weight_decay`` (defaults ``DEFAULTS.lr``, ``.momentum``, ``.weight_decay``); or an
    ``Optimizer`` instance, which carries its own (giving them here too is a ConfigError).
    per_sample: batch size 1, an update after every sample (the textbook loop).
    lr_schedule: "constant" or "cosine" (from lr down to 0 over ``epochs``).
    x_val, y_val: validation data, evaluated after every epoch (never the test set:
    what it decides, early stopping and the best epoch, must not see the test data).
    validation_split: instead, hold out this fraction of (x, y), stratified by class
    and seeded by ``seed`` (``stratified_split(y, fraction, seed)``).
    patience: stop when the validation loss has not improved for this many
    epochs, and restore the weights of the best epoch (needs validation data).
    on_epoch: callable ``(record) -> bool``, True stops; progress: ``(n_samples)`` after each batch.
    rng / start_epoch: continue a run (a NumPy Generator in the state it had
    after epoch ``start_epoch - 1``); by default a new one from ``seed``.
    sample_weight (N,) / class_weight ("balanced", a dict or a (K,) array): per-sample loss
    weights, rescaled to mean 1 over (x, y), so the epoch loss is sum(w loss) / sum(w).
    verbose: 1 prints a line per epoch and, where a person watches (a terminal or a notebook), a
    progress bar during it (``fastnn.progress``).
    cuda_graph: on the GPU, replay a captured training step per batch (``fastnn/cuda_graph.py``);
    if capturing fails, a warning says why and training goes on uncaptured.
    Returns the history, one dict per epoch with ``epoch, lr, train_loss, train_accuracy,
    val_loss, val_accuracy, seconds, samples_per_s``; DivergedError when the loss is NaN or inf.
    """
    batch_size = 1 if per_sample else int(batch_size)
    data = prepare(model, x, y, batch_size=batch_size, epochs=epochs, lr_schedule=lr_schedule, x_val=x_val,
                   y_val=y_val, validation_split=validation_split, split_seed=seed, patience=patience,
                   sample_weight=sample_weight, class_weight=class_weight)
    opt = _optimizer(optimizer, model, lr, momentum, weight_decay)
    rng = np.random.default_rng(seed) if rng is None else rng
    shown = EpochProgress(epochs, data.n, start_epoch, hook=progress) if verbose else None
    progress = shown.update if shown else progress  # it calls the caller's hook too
    loop = EpochLoop(model, opt, data, epochs, batch_size, lr_schedule, rng, cuda_graph, progress)
    history, stopper = [], EarlyStopping(model, patience)
    try:
        for epoch, result, val in loop.run(start_epoch):
            rec = {"epoch": epoch, "lr": opt.lr, **result, "samples_per_s": data.n / result["seconds"],
                   "val_loss": None if val is None else val["loss"],
                   "val_accuracy": None if val is None else val["accuracy"]}
            history.append(rec)
            if shown:
                shown.end(epoch_line(rec, epochs))
            _check_finite(rec, opt, history)
            stop = on_epoch is not None and on_epoch(rec)
            if stopper.update(rec) or stop:
                break
    finally:  # also after a NaN loss or Ctrl-C: no bar left half drawn
        if shown:
            shown.close()
    stopper.restore_best()
    return history


class EarlyStopping:
    """``fit(patience=N)``: stop after N epochs without a lower validation loss; keep the best weights."""

    def __init__(self, model: MLP, patience: int | None):
        self.model, self.patience = model, patience
        self.best_loss, self.best_epoch, self.best_params = math.inf, None, None

    def update(self, rec: dict) -> bool:
        """Note the epoch's record (marking it ``best`` or ``early_stop``); True: stop now."""
        if self.patience is None:
            return False
        if rec["val_loss"] < self.best_loss:
            self.best_loss, self.best_epoch, self.best_params = rec["val_loss"], rec["epoch"], self.model.params.copy()
            rec["best"] = True
        elif rec["epoch"] - self.best_epoch >= self.patience:
            rec["early_stop"] = True
            return True
        return False

    def restore_best(self) -> None:
        if self.best_params is not None:
            self.model.params[...] = self.best_params


def _check_finite(rec: dict, opt: Optimizer, history: list) -> None:
    """DivergedError when the epoch's loss, or the weights after it, are NaN or infinite (the loss is
    computed before each step's update, so an epoch can end with inf weights and a finite loss)."""
    if not math.isfinite(rec["train_loss"]):
        raise DivergedError(
            f"the training loss became {rec['train_loss']} in epoch {rec['epoch']}: the learning "
            f"rate ({opt.lr:g}) is probably too high, or the inputs are not scaled to about [0, 1]", history)
    model = opt.model
    if not bool(model.ops.xp.isfinite(model.params).all()):  # one reduction per epoch
        bad = nonfinite_params(model.ops.to_host(model.params), model.sizes)
        raise DivergedError(f"the weights became NaN or infinite in epoch {rec['epoch']} ({describe_nonfinite(bad)}) "
                            f"although its training loss was {rec['train_loss']:.4g}: the learning rate "
                            f"({rec['lr']:g}) is probably far too high", history)


def _optimizer(optimizer, model: MLP, lr, momentum, weight_decay) -> Optimizer:
    """The optimizer ``fit`` trains with: the instance given, or one made by name."""
    if isinstance(optimizer, Optimizer):
        given = [k for k, v in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)) if v is not None]
        if given:
            raise ConfigError(f"fit got an Optimizer instance and {', '.join(given)}: set "
                              f"{'them' if len(given) > 1 else 'it'} on the optimizer instead")
        return optimizer
    return make_optimizer(optimizer, model, DEFAULTS.lr if lr is None else lr,
                          DEFAULTS.momentum if momentum is None else momentum,
                          DEFAULTS.weight_decay if weight_decay is None else weight_decay)
