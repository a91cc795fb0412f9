"""Many models at once: K networks of one architecture trained in stacked kernels.

A ``ModelStack`` is an ``MLP`` whose arenas have a leading model axis: ``params`` and
``grads`` are (K, P), ``W[l]`` is (K, n_l, n_{l+1}) and ``b[l]`` (K, 1, n_{l+1}), and
activations are (K, B, n). The MLP's own forward and backward run on it unchanged: each
GEMM becomes one batched GEMM over the K models (``np.matmul`` on the CPU, cuBLAS's
batched GEMM on the GPU), so a step of K models is as many kernel calls as a step of one,
and the optimizer updates the whole (K, P) arena in one call, with the per-model learning
rates, momenta and weight decays as (K, 1) vectors.

What differs per model: the init seed, the dropout rates, the learning rate, momentum and
weight decay, and (optionally) the batch order. ``fit_many`` trains a stack; with the same
seeds and order, model k follows ``fit(MLP(seed=seeds[k]), ...)`` step for step.
"""

from __future__ import annotations

import math

import numpy as np

from . import config, npzfile
from .backends import Dropout, resolve_dtype
from .config import DEFAULTS
from .errors import ConfigError, DataError
from .guards import DIVERGED, check_fits, describe_nonfinite, n_params, nonfinite_params
from .loop import EpochLoop, prepare
from .model import MLP, dropout_rates
from .optim import make_optimizer
from .preprocessing import Preprocessing
from .progress import EpochProgress


class ModelStack(MLP):
    """K networks ``sizes[0] -> ... -> sizes[-1]`` trained at once; K = ``len(seeds)``.

    seeds: one init seed per model (model k starts as ``MLP(sizes, seed=seeds[k])``);
    dropout: one rate for all, or a sequence of K entries, each one rate or one per hidden
    layer. The other arguments are the MLP's, shared by all K. ``ids`` names each model by
    its index in the stack as built; ``fit_many`` drops stopped and diverged models from
    the stack, and ``ids`` says which remain.
    """

    def __init__(self, sizes, seeds=(0,), activation="relu", loss="xent", init=None, device="cpu",
                 dtype="float32", dropout=0.0, layers=None):
        seeds = list(seeds)
        if not seeds:
            raise ConfigError("a stack needs at least one model (one seed per model)")
        self.stack = (len(seeds),)
        n_hidden = len(sizes) - 2
        per_model = dropout if not np.isscalar(dropout) else [dropout] * len(seeds)
        if len(per_model) != len(seeds):
            raise ConfigError(f"dropout must be one rate or one entry per model ({len(seeds)}), got {dropout!r}")
        super().__init__(sizes, activation, loss, init, device, dtype, seed=seeds[0], layers=layers)
        self.dropouts = np.array([dropout_rates(d, n_hidden) for d in per_model]).reshape(len(seeds), n_hidden)
        self.seeds = seeds
        self.ids = list(range(len(seeds)))
        self.history: dict[int, list[dict]] = {}
        self._make_drops()
        for k, s in enumerate(seeds):
            self.set_params(self._init_params(np.random.default_rng(_seed(s))), k)

    @property
    def n_models(self) -> int:
        return self.stack[0]

    @property
    def uses_dropout(self) -> bool:
        return bool(self.dropouts.any())

    def _drop(self, l: int) -> Dropout | None:
        return self._drops[l] if l < len(self._drops) else None

    def _make_drops(self) -> None:
        """Each hidden layer's Dropout (per-model rates and seeds), or None where no model drops:
        made when the stack's models change, not per step."""
        seeds = np.array([s & 0xFFFFFFFF for s in self.seeds], np.uint32).reshape(-1, 1, 1)  # as MLP._drop
        self._drops = [Dropout(p.reshape(-1, 1, 1), seeds, self.step, l) if p.any() else None
                       for l, p in enumerate(self.dropouts.T)]

    # ------------------------------------------------------------ parameters
    def set_params(self, params, model=None) -> None:
        """Copy ``[W1, b1, ...]`` of one network into model ``model`` (index in the stack), or into all."""
        params = list(params)
        if len(params) != len(self.shapes):
            raise ConfigError(f"expected {len(self.shapes)} arrays, got {len(params)}")
        rows = slice(None) if model is None else model
        for i, (view, p, shape) in enumerate(zip(self.param_list(), params, self.shapes)):
            if tuple(p.shape) != shape:
                raise ConfigError(f"parameter {i} has shape {tuple(p.shape)}, expected {shape}")
            view[rows] = self.ops.asarray(p, self.dtype).reshape(view.shape[1:])

    def row(self, model_id: int) -> int:
        """The row in the stack of the model with this id; ConfigError if it has left the stack."""
        if model_id not in self.ids:
            raise ConfigError(f"model {model_id} is not in the stack (it has {self.ids}): it stopped training "
                              "(pruned or diverged), or never was")
        return self.ids.index(model_id)

    def get_params(self, model_id: int = 0) -> list[np.ndarray]:
        """``[W1, b1, ...]`` of the model with this id as NumPy copies."""
        k = self.row(model_id)
        return [self.ops.to_host(v[k]).copy().reshape(s) for v, s in zip(self.param_list(), self.shapes)]

    def model(self, model_id: int) -> MLP:
        """The model with this id (``ids``; ``best()`` returns one) as a standalone ``MLP``, on the same device."""
        k = self.row(model_id)
        own = {"seed": _seed(self.seeds[k]), "dropout": [float(p) for p in self.dropouts[k]]}
        m = MLP.from_config({**self.config(), **own}, self.device)
        m.set_params(self.get_params(model_id))
        m.step[...] = m.ops.asarray(self.ops.to_host(self.step))
        return m

    def keep(self, rows) -> None:
        """Keep only the models at these indices (in stack order); the others are dropped."""
        rows = [int(r) for r in rows]
        if not rows:
            raise ConfigError("a stack must keep at least one model")
        idx = self.ops.asarray(np.array(rows))
        self.params, self.grads = self.params[idx], self.ops.xp.zeros((len(rows), self.size), self.dtype)
        self.stack = (len(rows),)
        self.W, self.b = self._views(self.params)
        self.gW, self.gb = self._views(self.grads)
        self._workspaces.clear()
        self.dropouts = self.dropouts[rows]
        self.seeds = [self.seeds[r] for r in rows]
        self.ids = [self.ids[r] for r in rows]
        self._make_drops()

    def best(self, metric: str = "val_accuracy") -> int:
        """The id of the model with the highest ``metric`` in its last epoch of ``fit_many``."""
        last = {i: h[-1].get(metric) for i, h in self.history.items() if h and i in self.ids}
        last = {i: v for i, v in last.items() if v is not None and math.isfinite(v)}
        if not last:
            raise ConfigError(f"no model in the stack has a {metric} yet: train it with fit_many first")
        return max(last, key=last.get)

    # ----------------------------------------------------------- prediction
    def predict_proba(self, x, batch_size=10000, each: bool = False) -> np.ndarray:
        """Class probabilities (N, C) float64 averaged over the models (an ensemble); with
        ``each``, every model's own (K, N, C), in the order of ``ids``."""
        p = super().predict_proba(x, batch_size)
        return p if each else p.mean(axis=0)

    def predict(self, x, batch_size=10000) -> np.ndarray:
        """The ensemble's labels (N,) int64: the argmax of the averaged probabilities."""
        return self.predict_proba(x, batch_size).argmax(axis=1).astype(np.int64)

    # --------------------------------------------------------------- saving
    def config(self) -> dict:
        cfg = super().config()
        cfg.update(seed=None, dropout=None, seeds=[int(s) for s in self.seeds], dropouts=self.dropouts.tolist(),
                   ids=self.ids)
        return cfg

    def save(self, path) -> None:
        """All models in one ``.npz`` (``ModelStack.load``); ``model(k).save`` writes one."""
        npzfile.save(path, "fastnn-stack", self.config(), {"params": self.ops.to_host(self.params)})

    @classmethod
    def load(cls, path, device="cpu") -> ModelStack:
        """A stack saved by ``save``, on ``device``. DataError naming the file when it is unreadable,
        when its header's sizes would not fit in memory or disagree with the ``params`` (K, P) array
        (checked before anything is allocated), or when a model's parameter holds NaN or inf."""
        meta, arrays = npzfile.load(path, "fastnn-stack", "fastnn model-stack file")
        try:
            sizes, params = [int(n) for n in meta["sizes"]], arrays["params"]
            _fits(path, sizes, resolve_dtype(meta["dtype"]), len(meta["seeds"]))
            if params.shape != (len(meta["seeds"]), n_params(sizes)):
                raise ValueError(f"params has shape {params.shape}, but the header's sizes {sizes} and "
                                 f"{len(meta['seeds'])} seeds make it {(len(meta['seeds']), n_params(sizes))}")
            bad = [(k, found) for k, row in enumerate(params) if (found := nonfinite_params(row, sizes))]
            if not bad:
                stack = cls(sizes, meta["seeds"], meta["activation"], meta["loss"], meta["init"],
                            device=device, dtype=meta["dtype"], dropout=meta["dropouts"])
                stack.preprocessing = Preprocessing.from_config(meta)
                stack.classes = meta.get("classes")
                stack.ids = list(meta["ids"])
                stack.params[...] = stack.ops.asarray(params, stack.dtype)
        except DataError:
            raise
        except (KeyError, ValueError, TypeError, OverflowError, ConfigError) as exc:
            raise DataError(f"{path}: not a valid fastnn model-stack file ({exc})") from None
        if bad:
            k, found = bad[0]
            ids = meta.get("ids")
            which = ids[k] if isinstance(ids, list) and len(ids) == len(params) else k
            raise DataError(f"{path}: model {which}'s {describe_nonfinite(found)}: {DIVERGED}")
        return stack

    def __getstate__(self) -> dict:
        raise TypeError("a ModelStack is saved with stack.save(path), or one model with stack.model(k)")

    def clone(self, device=None, dtype=None):
        raise ConfigError("clone one model with stack.model(k).clone()")

    def to_onnx(self, path, input_type: str = "uint8") -> None:
        raise ConfigError("export one model: stack.model(stack.best()).to_onnx(path)")


def _fits(path, sizes: list[int], dtype, n_models: int) -> None:
    """A stack file's network must fit in memory (``guards.check_fits``): DataError naming the file."""
    try:
        check_fits(sizes, dtype, n_models)
    except ConfigError as exc:
        raise DataError(f"{path}: {exc}") from None


def _seed(s) -> int:
    if not isinstance(s, (int, np.integer)) or isinstance(s, bool) or s < 0:
        raise ConfigError(f"seeds must be whole numbers >= 0, got {s!r}")
    return int(s)


def fit_many(stack: ModelStack, x, y, epochs=DEFAULTS.epochs, batch_size=DEFAULTS.batch_size, lr=DEFAULTS.lr,
             optimizer=DEFAULTS.optimizer, momentum=DEFAULTS.momentum, weight_decay=DEFAULTS.weight_decay,
             x_val=None, y_val=None, validation_split=None, seed=DEFAULTS.seed, lr_schedule=DEFAULTS.lr_schedule,
             on_epoch=None, verbose=0, cuda_graph=False, sample_weight=None,
             class_weight=None) -> dict[int, list[dict]]:
    """Train every model of ``stack`` on x (N, D), y (N,) at once, as ``fit`` trains one (same defaults).

    lr, momentum, weight_decay: one value for all models or one per model (K values).
    seed: an int gives every model the same batch order (one gather per step serves all);
    a list of K ints gives model k its own order from ``default_rng(seed[k])`` (bagging-like
    ensembles). With the same seeds, model k follows ``fit(MLP(seed=stack.seeds[k]), seed=...)``.
    validation_split holds out a stratified fraction, seeded by the first order seed.
    on_epoch: callable ``(records) -> ids`` given one record per model still training (with its
    ``model`` id) after each epoch; the ids it returns stop training (a pruner's decision).
    A model whose training loss becomes NaN or infinite stops with ``diverged: True`` in its
    last record; the others go on. Stopped models are dropped from the stack (``stack.ids``).
    cuda_graph: on the GPU, replay the captured stacked step per batch, as ``fit`` does.
    sample_weight (N,) / class_weight: the same loss weights for every model, as in ``fit``.
    Returns (and keeps in ``stack.history``) ``{model id: [record per epoch]}``; a record has
    ``epoch, lr, train_loss, train_accuracy, val_loss, val_accuracy, seconds`` for that model.
    """
    config.check("optimizer", optimizer)
    per_model_order = not np.isscalar(seed)
    seeds = [_seed(s) for s in (seed if per_model_order else [seed])]
    if per_model_order and len(seeds) != stack.n_models:
        raise ConfigError(f"seed must be one int, or one per model ({stack.n_models}), got {len(seeds)}")
    data = prepare(stack, x, y, batch_size=int(batch_size), epochs=epochs, lr_schedule=lr_schedule, x_val=x_val,
                   y_val=y_val, validation_split=validation_split, split_seed=seeds[0],
                   sample_weight=sample_weight, class_weight=class_weight)
    opt = make_optimizer(optimizer, stack, lr, momentum, weight_decay)
    rngs = [np.random.default_rng(s) for s in seeds]
    shown = EpochProgress(epochs, data.n) if verbose else None
    loop = EpochLoop(stack, opt, data, epochs, batch_size, lr_schedule, rngs if per_model_order else rngs[0],
                     cuda_graph, shown and shown.update)
    history = stack.history = {i: [] for i in stack.ids}
    try:
        _run(stack, opt, loop, history, shown, on_epoch)
    finally:  # also after Ctrl-C: no bar left half drawn
        if shown:
            shown.close()
    return history


def _run(stack: ModelStack, opt, loop: EpochLoop, history: dict, shown, on_epoch) -> None:
    """fit_many's epochs: file each model's record, print, and drop the models that stop."""
    for epoch, result, val in loop.run():
        records = _epoch_records(stack, opt, epoch, result, val)
        for rec in records:
            history[rec["model"]].append(rec)
        if shown:
            shown.end(_epoch_line(records, epoch, loop.epochs))
        stop = {r["model"] for r in records if r.get("diverged")}
        if on_epoch is not None:
            stop |= {int(i) for i in (on_epoch([r for r in records if not r.get("diverged")]) or ())}
        if len(stop) == len(records):
            break
        if stop:
            rows = [k for k, i in enumerate(stack.ids) if i not in stop]
            _keep(stack, opt, rows)
            loop.keep(rows)


def _epoch_records(stack: ModelStack, opt, epoch: int, res: dict, val: dict | None) -> list[dict]:
    """One history record per model still in the stack, from train_epoch's and evaluate's (K,) arrays."""
    lrs = np.broadcast_to(opt.lr if isinstance(opt.lr, float) else stack.ops.to_host(opt.lr), (stack.n_models, 1))
    records = []
    for k, i in enumerate(stack.ids):
        rec = {"model": i, "epoch": epoch, "lr": float(lrs[k, 0]), "train_loss": float(res["train_loss"][k]),
               "train_accuracy": float(res["train_accuracy"][k]),
               "val_loss": None if val is None else float(val["loss"][k]),
               "val_accuracy": None if val is None else float(val["accuracy"][k]), "seconds": res["seconds"]}
        if not math.isfinite(rec["train_loss"]):
            rec["diverged"] = True
        records.append(rec)
    return records


def _keep(stack: ModelStack, opt, rows: list[int]) -> None:
    """Shrink the stack and its optimizer (state arrays, per-model hyperparameters) to ``rows``."""
    idx = stack.ops.asarray(np.array(rows))
    stack.keep(rows)
    opt.state = {k: (v[idx] if v.ndim == 2 else v) for k, v in opt.state.items()}
    for name in ("lr", "weight_decay", "momentum"):
        value = getattr(opt, name, None)
        if value is not None and not isinstance(value, float):
            setattr(opt, name, value[idx])


def _epoch_line(records: list[dict], epoch: int, epochs: int) -> str:
    key = "val_accuracy" if records[0]["val_accuracy"] is not None else "train_accuracy"
    accs = [r[key] for r in records]
    best = records[int(np.argmax(accs))]
    return (f"epoch {epoch}/{epochs}  {len(records)} models  {key.replace('_', ' ')}: best {best[key]:.4f} "
            f"(model {best['model']}), median {float(np.median(accs)):.4f}  {records[0]['seconds']:.2f} s")
