"""The training loop that ``fit`` (one model) and ``fit_many`` (a stack) share.

``prepare`` checks the arguments and uploads the data to the device once. ``EpochLoop`` then
runs the epochs: per epoch it sets the learning rate from the schedule, draws one
permutation (on the host, from a seeded NumPy generator, so CPU and GPU runs see the same
batch order) and runs ``train_epoch``: per batch, ``train_step`` gathers the rows by index,
runs forward, loss and backward into the gradient arena and updates the parameter arena in
one optimizer call. Per-batch loss sums and hit counts are written into device arrays and
read once at the end of the epoch: nothing inside an epoch waits for the device. On the GPU
the step can be captured as a CUDA graph (``fastnn/cuda_graph.py``), which the loop then
replays per full batch. Per-sample training is the same code at batch size 1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
import warnings

import numpy as np

from .config import LR_SCHEDULES, check
from .errors import ConfigError
from .model import MLP, Workspace
from .optim import Optimizer

__all__ = ["LR_SCHEDULES", "DeviceData", "EpochLoop", "prepare", "all_rows_equal", "train_step", "train_epoch",
           "stratified_split", "hold_out", "check_fit_args", "class_weights", "sample_weights", "capture_step",
           "cosine_lr"]


def train_step(model: MLP, opt: Optimizer, x_dev, y_dev, ws: Workspace, idx, loss_out=None, hits_out=None,
               w_dev=None) -> None:
    """One optimizer step on rows ``idx`` (B,) int64 of device data x_dev (N, D), y_dev (N,) int32.

    ws: the workspace for batch size B; loss_out / hits_out: 1-element device
    arrays for the batch's loss sum and hit count (default ``ws.loss``/``ws.hits``);
    w_dev: optional (N, 1) per-sample weights (the batch loss is sum_i w_i loss_i / B).
    """
    model.load_batch(ws, x_dev, y_dev, idx, w_dev, train=True)
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


@dataclasses.dataclass
class DeviceData:
    """What a run trains on, uploaded once: x (N, D) uint8 or model dtype, y (N,) int32, the loss
    weights w (N, 1) model dtype or None, and the validation pair ``(x_val, y_val)`` or None."""

    x: object
    y: object
    w: object | None
    val: tuple | None

    @property
    def n(self) -> int:
        return self.x.shape[0]


def prepare(model: MLP, x, y, *, batch_size: int, epochs, lr_schedule: str, x_val=None, y_val=None,
            validation_split=None, split_seed: int = 0, patience=None, sample_weight=None,
            class_weight=None) -> DeviceData:
    """Check ``fit``'s (or ``fit_many``'s) arguments and upload the data: a stratified fraction
    ``validation_split`` of (x, y) held out first (seeded by ``split_seed``), the loss weights
    rescaled to mean 1 (``sample_weights``)."""
    if validation_split:
        x, y, x_val, y_val, sample_weight = hold_out(x, y, x_val, validation_split, split_seed, sample_weight)
    check_fit_args(batch_size, epochs, lr_schedule, x_val, y_val, patience)
    x_dev, y_dev = model.to_device(x, y)
    if all_rows_equal(x_dev):
        warnings.warn(f"x: all {x_dev.shape[0]} training images are the same (every input feature is constant): "
                      "there is no signal to learn (check how the images were read)", RuntimeWarning, stacklevel=3)
    w_dev = sample_weights(model, np.asarray(y), sample_weight, class_weight)
    val = None if x_val is None else model.to_device(x_val, y_val, name="x_val")
    return DeviceData(x_dev, y_dev, w_dev, val)


def all_rows_equal(x, chunk: int = 1024) -> bool:
    """Whether the N >= 2 rows of x (N, D) (NumPy or CuPy) are all the same (every feature constant).
    Compared with the first row a chunk at a time: real data differs in its first chunk, so this
    costs one small comparison; only constant data is read through."""
    if x.shape[0] < 2:
        return False
    for start in range(0, x.shape[0], chunk):
        if not bool((x[start:start + chunk] == x[0]).all()):
            return False
    return True


class EpochLoop:
    """The epochs of one run: ``for epoch, result, val in EpochLoop(...).run():``.

    Each epoch sets ``opt.lr`` from the schedule ("cosine": from the rate the optimizer
    started with down toward 0 over ``epochs``; "constant": left as it is), runs
    ``train_epoch`` (replaying the captured step when ``cuda_graph``; captured at the
    first epoch, and again after ``keep``) and evaluates the validation data. ``result``
    is train_epoch's dict; ``val`` evaluate's, or None without validation data. rng: one
    generator, or one per model of a stack (each model its own batch order).
    """

    def __init__(self, model: MLP, opt: Optimizer, data: DeviceData, epochs: int, batch_size: int,
                 lr_schedule: str, rng, cuda_graph: bool = False, progress=None):
        self.model, self.opt, self.data = model, opt, data
        self.epochs, self.batch_size, self.lr_schedule = int(epochs), int(batch_size), lr_schedule
        self.rng, self.progress, self.cuda_graph = rng, progress, cuda_graph
        self.base_lr = opt.lr
        self.graph, self.captured = None, False
        if cuda_graph and model.ops.name != "gpu":
            raise ConfigError("CUDA graphs need the GPU backend (device='gpu')")

    def run(self, start_epoch: int = 1):
        """Yield ``(epoch, result, val)`` after each epoch from ``start_epoch`` to ``epochs``;
        the caller stops training by leaving the loop."""
        model, data = self.model, self.data
        for epoch in range(int(start_epoch), self.epochs + 1):
            if self.cuda_graph and not self.captured:
                self.graph, self.captured = capture_step(model, self.opt, data, self.batch_size, self.per_model), True
            if self.lr_schedule == "cosine":
                self.opt.lr = cosine_lr(self.base_lr, epoch, self.epochs)
            with np.errstate(over="ignore", invalid="ignore"):  # divergence is the caller's to report
                result = train_epoch(model, self.opt, data.x, data.y, self.batch_size, self.rng, self.progress,
                                     self.graph, data.w)
                val = model.evaluate_device(*data.val) if data.val is not None else None
            yield epoch, result, val

    @property
    def per_model(self) -> bool:
        return isinstance(self.rng, (list, tuple))

    def keep(self, rows: list[int]) -> None:
        """After a stack kept only the models at ``rows``: their base rates and batch orders; the
        step is captured again (the stack's arrays are new)."""
        if not isinstance(self.base_lr, float):
            self.base_lr = self.base_lr[self.model.ops.asarray(np.array(rows))]
        if self.per_model:
            self.rng = [self.rng[k] for k in rows]
        self.graph, self.captured = None, False


def cosine_lr(base_lr, epoch: int, epochs: int):
    """The cosine schedule's rate in epoch ``epoch`` (1-based) of ``epochs``: base_lr down toward 0
    (base_lr a float, or a stack's (K, 1) per-model rates)."""
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / epochs))


def stratified_split(y, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded split of sample indices: ``(train_idx, val_idx)``, sorted, disjoint.

    y: (N,) integer labels. Each class gives ``round(fraction * n_class)`` of its samples
    (at least one when it has two or more) to validation, chosen by a generator seeded
    with ``seed``, so the same data, fraction and seed always give the same split.
    """
    check("val_split", fraction, "the validation fraction")
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


def hold_out(x, y, x_val, fraction, seed, sample_weight):
    """``(x, y, x_val, y_val, sample_weight)`` with a stratified fraction of (x, y) held out."""
    if x_val is not None:
        raise ConfigError("give validation_split or x_val/y_val, not both")
    y = np.asarray(y)
    tr, va = stratified_split(y, fraction, seed)
    return x[tr], y[tr], x[va], y[va], None if sample_weight is None else np.asarray(sample_weight)[tr]


def check_fit_args(batch_size, epochs, lr_schedule, x_val, y_val, patience) -> None:
    """ConfigError for a setting that breaks its rule (``config.RULES``), half a validation pair,
    or early stopping without validation data."""
    check("batch_size", batch_size)
    check("epochs", epochs)
    check("lr_schedule", lr_schedule)
    if patience is not None:
        check("patience", patience)
    if (x_val is None) != (y_val is None):
        raise ConfigError("give both x_val and y_val, or neither")
    if patience is not None and x_val is None:
        raise ConfigError("early stopping (patience) needs validation data")


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


def sample_weights(model: MLP, y: np.ndarray, sample_weight, class_weight):
    """The (N, 1) device weights of the training samples, mean 1, or None when unweighted."""
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


def capture_step(model: MLP, opt: Optimizer, data: DeviceData, batch: int, per_model: bool = False):
    """A ``CapturedStep`` for this run, or None: no full batch to capture, or (with a
    warning) the capture failed on this GPU. per_model: a stack with one batch order per model."""
    if data.n < batch:
        return None  # every batch is the ragged one: nothing to replay
    from .cuda_graph import CapturedStep

    step = functools.partial(train_step, model, opt, data.x, data.y, w_dev=data.w)
    graph = CapturedStep(step, model, opt, data.n, batch, per_model)
    try:
        graph.capture()
    except Exception as exc:  # the driver or CuPy refused the capture
        warnings.warn(f"CUDA graph capture failed ({type(exc).__name__}: {exc}); training without it",
                      RuntimeWarning, stacklevel=4)
        return None
    return graph
