"""Training: one step, one epoch loop, and ``fit``; batched and per-sample alike.

``fit`` uploads the data to the device once, then for each epoch draws one
permutation (on the host, from a seeded NumPy generator, so CPU and GPU runs
see the same batch order) and runs ``train_epoch``: per batch, ``train_step``
gathers the rows by index, runs forward, loss and backward into the gradient
arena and updates the parameter arena in one optimizer call. Per-batch loss sums
and hit counts are written into device arrays and read once at the end of the
epoch: nothing inside an epoch waits for the device. Per-sample training is the
same code at batch size 1. On the GPU the same step can be captured as a CUDA
graph (``backends/cuda_graph.py``), which the loop then replays per full batch.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
import warnings

import numpy as np

from .errors import ConfigError, DivergedError
from .model import MLP, Workspace
from .optim import Optimizer, make_optimizer

LR_SCHEDULES = ("constant", "cosine")


def train_step(model: MLP, opt: Optimizer, x_dev, y_dev, ws: Workspace, idx, loss_out=None, hits_out=None,
               w_dev=None) -> None:
    """One optimizer step on rows ``idx`` (B,) int64 of device data x_dev (N, D), y_dev (N,) int32.

    ws: the workspace for batch size B; loss_out / hits_out: 1-element device
    arrays for the batch's loss sum and hit count (default ``ws.loss``/``ws.hits``);
    w_dev: optional (N, 1) per-sample weights (the batch loss is sum_i w_i loss_i / B).
    """
    model.load_batch(ws, x_dev, y_dev, idx, w_dev)
    model.forward_backward(ws, loss_out, hits_out)
    opt.step()
    if model.uses_dropout:
        model.ops.count(model.step)  # the next step draws new dropout masks


def train_epoch(model: MLP, opt: Optimizer, x_dev, y_dev, batch_size: int, rng: np.random.Generator,
                progress=None, graph=None, w_dev=None) -> dict:
    """One epoch over device data x_dev (N, D), y_dev (N,) int32 in shuffled batches.

    With ``batch_size=1`` this is per-sample SGD: one update after every sample.
    progress: optional callable(n) told after each batch how many samples it held
    (it counts launched work; it never waits for the device).
    graph: a ``CapturedStep`` (``fit(cuda_graph=True)``) replayed for every full
    batch instead of launching its kernels; the ragged last batch runs uncaptured.
    A stack of K models (``fastnn.stack``) trains on one batch order from ``rng``, or on
    one order per model when ``rng`` is a list of K generators.
    Returns ``{"train_loss", "train_accuracy", "seconds"}`` (one synchronisation); the
    first two are (K,) arrays for a stack.
    """
    ops, xp = model.ops, model.ops.xp
    n = x_dev.shape[0]
    t0 = time.perf_counter()
    per_model = isinstance(rng, (list, tuple))
    order = np.stack([r.permutation(n) for r in rng]) if per_model else rng.permutation(n)
    steps = -(-n // batch_size)
    if graph is not None:
        buffers = graph.epoch(order)  # the graph's fixed perm, losses and hits, on its stream
    else:
        shape = (steps,) + model.stack
        buffers = contextlib.nullcontext((ops.asarray(order), xp.zeros(shape, model.dtype), xp.zeros(shape, np.int32)))
    with buffers as (perm, losses, hits):
        for s in range(steps):
            b = min(batch_size, n - s * batch_size)
            if graph is not None and b == batch_size:
                graph.replay()
            else:
                train_step(model, opt, x_dev, y_dev, model.workspace(b, per_model),
                           perm[..., s * batch_size:s * batch_size + b], losses[s:s + 1], hits[s:s + 1], w_dev)
            if progress is not None:
                progress(b)
        loss = ops.to_host(losses.astype(np.float64).sum(axis=0)) / n
        acc = ops.to_host(hits.sum(axis=0)) / n
    if not model.stack:
        loss, acc = float(loss), float(acc)
    return {"train_loss": loss, "train_accuracy": acc, "seconds": time.perf_counter() - t0}


def stratified_split(y, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded split of sample indices: ``(train_idx, val_idx)``, sorted, disjoint.

    y: (N,) integer labels. Each class gives ``round(fraction * n_class)`` of its samples
    (at least one when it has two or more) to validation, chosen by a generator seeded
    with ``seed``, so the same data, fraction and seed always give the same split.
    """
    if not 0 <= fraction < 1:
        raise ConfigError(f"the validation fraction must be in [0, 1), got {fraction}")
    y = np.asarray(y)
    rng = np.random.default_rng([seed, 0x5A11])  # its own stream: the batch order's is left alone
    val = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        k = int(round(fraction * len(idx)))
        if fraction > 0 and len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        val.append(rng.permutation(idx)[:k])
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, np.int64)
    train_idx = np.setdiff1d(np.arange(len(y)), val_idx)
    return train_idx, val_idx


def fit(model: MLP, x, y, epochs=10, batch_size=128, lr=None, optimizer="sgd", momentum=None,
        weight_decay=None, per_sample=False, x_val=None, y_val=None, seed=0, lr_schedule="constant",
        patience=None, on_epoch=None, progress=None, rng=None, start_epoch=1, cuda_graph=False,
        validation_split=None, verbose=0, sample_weight=None, class_weight=None) -> list[dict]:
    """Train ``model`` on x (N, D) float or uint8, y (N,) integer labels.

    optimizer: "sgd", "momentum", "nesterov", "adam" with ``lr`` (default 0.1),
    ``momentum`` (0.9) and ``weight_decay`` (0); or an ``Optimizer`` instance, which
    carries its own (giving them here too is a ConfigError).
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
    verbose: 1 prints a line per epoch and shows a progress bar (``tqdm.auto``: a widget in
    Jupyter, text in a terminal) when tqdm is installed.
    cuda_graph: on the GPU, replay a captured training step per batch (``backends/cuda_graph.py``);
    if capturing fails, a warning says why and training goes on uncaptured.
    Returns the history, one dict per epoch with ``epoch, lr, train_loss, train_accuracy,
    val_loss, val_accuracy, seconds, samples_per_s``; DivergedError when the loss is NaN or inf.
    """
    batch_size = 1 if per_sample else int(batch_size)
    if validation_split:
        x, y, x_val, y_val, sample_weight = _hold_out(x, y, x_val, validation_split, seed, sample_weight)
    _check_fit_args(batch_size, epochs, lr_schedule, x_val, y_val, patience)
    x_dev, y_dev = model.to_device(x, y)
    w_dev = _sample_weights(model, np.asarray(y), sample_weight, class_weight)
    val_dev = None if x_val is None else model.to_device(x_val, y_val, name="x_val")  # once, not per epoch
    opt = _optimizer(optimizer, model, lr, momentum, weight_decay)
    base_lr = opt.lr
    rng = np.random.default_rng(seed) if rng is None else rng
    graph = _graph_or_none(model, opt, x_dev, y_dev, batch_size, w_dev) if cuda_graph else None
    history, stopper = [], EarlyStopping(model, patience)
    printer = EpochPrinter(int(epochs), x_dev.shape[0], progress) if verbose else None
    progress = printer.progress if printer else progress  # it calls the caller's hook too
    for epoch in range(int(start_epoch), int(epochs) + 1):
        opt.lr = cosine_lr(base_lr, epoch, epochs) if lr_schedule == "cosine" else opt.lr
        rec = {"epoch": epoch, "lr": opt.lr}
        with np.errstate(over="ignore", invalid="ignore"):  # divergence is reported below
            rec.update(train_epoch(model, opt, x_dev, y_dev, batch_size, rng, progress, graph, w_dev))
        rec["samples_per_s"] = x_dev.shape[0] / rec["seconds"]
        val = model.evaluate_device(*val_dev) if val_dev is not None else {"loss": None, "accuracy": None}
        rec["val_loss"], rec["val_accuracy"] = val["loss"], val["accuracy"]
        history.append(rec)
        if printer:
            printer.epoch_done(rec)
        _check_finite(rec, opt, history)
        stop = on_epoch is not None and on_epoch(rec)
        if stopper.update(rec) or stop:
            break
    stopper.restore_best()
    return history


def cosine_lr(base_lr, epoch: int, epochs: int):
    """The cosine schedule's rate in epoch ``epoch`` (1-based) of ``epochs``: base_lr down toward 0
    (base_lr a float, or a stack's (K, 1) per-model rates)."""
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / epochs))


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
    if not math.isfinite(rec["train_loss"]):
        raise DivergedError(
            f"the training loss became {rec['train_loss']} in epoch {rec['epoch']}: the learning "
            f"rate ({opt.lr:g}) is probably too high, or the inputs are not scaled to about [0, 1]", history)


def _hold_out(x, y, x_val, fraction, seed, sample_weight):
    """``(x, y, x_val, y_val, sample_weight)`` with a stratified fraction of (x, y) held out."""
    if x_val is not None:
        raise ConfigError("give validation_split or x_val/y_val, not both")
    y = np.asarray(y)
    tr, va = stratified_split(y, fraction, seed)
    return x[tr], y[tr], x[va], y[va], None if sample_weight is None else np.asarray(sample_weight)[tr]


def class_weights(y, class_weight, k: int) -> np.ndarray:
    """Per-class weights (K,): ``"balanced"`` is scikit-learn's N / (K * count(class)); a dict
    {class: weight} (missing classes weigh 1) or a (K,) array are taken as given."""
    if isinstance(class_weight, str):
        if class_weight != "balanced":
            raise ConfigError(f"class_weight must be 'balanced', a dict or an array, got {class_weight!r}")
        counts = np.bincount(y, minlength=k).astype(np.float64)
        return np.where(counts > 0, len(y) / (k * np.maximum(counts, 1)), 0.0)
    if isinstance(class_weight, dict):
        out = np.ones(k)
        for c, v in class_weight.items():
            if not 0 <= int(c) < k:
                raise ConfigError(f"class_weight names class {c}, outside 0..{k - 1}")
            out[int(c)] = v
        return out
    out = np.asarray(class_weight, np.float64)
    if out.shape != (k,):
        raise ConfigError(f"class_weight has shape {out.shape}, expected ({k},)")
    return out


def _sample_weights(model: MLP, y: np.ndarray, sample_weight, class_weight):
    """The (N, 1) device weights of fit's samples, mean 1, or None when unweighted."""
    if sample_weight is None and class_weight is None:
        return None
    w = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, np.float64).reshape(-1)
    if w.shape != (len(y),):
        raise ConfigError(f"sample_weight has {w.size} values for {len(y)} samples")
    if class_weight is not None:
        w = w * class_weights(y, class_weight, model.sizes[-1])[y]
    if not (np.isfinite(w).all() and (w >= 0).all() and w.sum() > 0):
        raise ConfigError("sample weights must be finite and >= 0, and not all zero")
    return model.ops.asarray((w * (len(w) / w.sum())).reshape(-1, 1), model.dtype)


class EpochPrinter:
    """``fit(verbose=1)``: a progress bar per epoch (tqdm.auto, when installed) and a line after it."""

    def __init__(self, epochs: int, n: int, progress=None):
        self.epochs, self.n, self.user_progress, self.bar = epochs, n, progress, None
        try:
            from tqdm.auto import tqdm
        except ImportError:
            tqdm = None
        self.tqdm = tqdm

    def progress(self, k: int) -> None:
        if self.tqdm is not None:
            if self.bar is None:
                self.bar = self.tqdm(total=self.n, unit="sample", unit_scale=True, leave=False)
            self.bar.update(k)
        if self.user_progress is not None:
            self.user_progress(k)

    def epoch_done(self, rec: dict) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        val = "" if rec["val_loss"] is None else f"  val loss {rec['val_loss']:.4f} acc {rec['val_accuracy']:.4f}"
        print(f"epoch {rec['epoch']}/{self.epochs}  train loss {rec['train_loss']:.4f} "
              f"acc {rec['train_accuracy']:.4f}{val}  {rec['seconds']:.2f} s", flush=True)


def _check_fit_args(batch_size, epochs, lr_schedule, x_val, y_val, patience) -> None:
    if batch_size < 1 or int(epochs) < 0:
        raise ConfigError(f"batch_size must be >= 1 and epochs >= 0, got {batch_size}, {epochs}")
    if lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"unknown lr_schedule {lr_schedule!r}: choose constant or cosine")
    if (x_val is None) != (y_val is None):
        raise ConfigError("give both x_val and y_val, or neither")
    if patience is not None and x_val is None:
        raise ConfigError("early stopping (patience) needs validation data")


def _optimizer(optimizer, model: MLP, lr, momentum, weight_decay) -> Optimizer:
    """The optimizer ``fit`` trains with: the instance given, or one made by name."""
    if isinstance(optimizer, Optimizer):
        given = [k for k, v in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)) if v is not None]
        if given:
            raise ConfigError(f"fit got an Optimizer instance and {', '.join(given)}: set "
                              f"{'them' if len(given) > 1 else 'it'} on the optimizer instead")
        return optimizer
    return make_optimizer(optimizer, model, 0.1 if lr is None else lr, 0.9 if momentum is None else momentum,
                          0.0 if weight_decay is None else weight_decay)


def _graph_or_none(model: MLP, opt: Optimizer, x_dev, y_dev, batch: int, w_dev=None, per_model=False):
    """A ``CapturedStep`` for this run, or None: no full batch to capture, or (with a
    warning) the capture failed on this GPU. per_model: a stack with one batch order per model."""
    if model.ops.name != "gpu":
        raise ConfigError("CUDA graphs need the GPU backend (device='gpu')")
    if x_dev.shape[0] < batch:
        return None  # every batch is the ragged one: nothing to replay
    from .backends.cuda_graph import CapturedStep

    step = functools.partial(train_step, model, opt, x_dev, y_dev, w_dev=w_dev)
    graph = CapturedStep(step, model, opt, x_dev.shape[0], batch, per_model)
    try:
        graph.capture()
    except Exception as exc:  # the driver or CuPy refused the capture
        warnings.warn(f"CUDA graph capture failed ({type(exc).__name__}: {exc}); training without it",
                      RuntimeWarning, stacklevel=3)
        return None
    return graph
