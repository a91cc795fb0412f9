"""``fastnn train``, ``fastnn doctor`` and ``fastnn lr-find``: data, network, the doctor, the
training loop's printing and checkpointing, and the range test."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import time
from pathlib import Path

import numpy as np

from .. import __version__, checkpoint, datasets
from ..backends import get_ops, resolve_dtype, set_tf32
from ..diagnose import EpochMonitor, diagnose
from ..errors import ConfigError, DataError, DivergedError
from ..guards import check_fits
from ..layers import image_shape_of, parse
from ..lock import FolderLock
from ..loop import stratified_split
from ..lrfind import lr_find, plot_lr_find
from ..model import MLP
from ..optim import Optimizer, make_optimizer
from ..train import fit
from .flags import resolve_config, train_parser
from .output import (
    Output,
    Terminated,
    _probe_folder,
    confusion_matrix,
    format_report,
    panel_shape,
    save_model,
    write_plots,
)

LR_FIND_HELP = ("The learning-rate range test: 100 steps on a copy of the network with the rate rising from 1e-6 "
                "to 10; prints the rate where the loss falls fastest (and plots the curve with --plots).")


def load_data(cfg):
    if cfg["train"] is not None:
        ds = datasets.load(None, train=cfg["train"], test=cfg["test"], standardize=cfg["standardize"],
                           classes=cfg["classes"])
    else:
        ds = datasets.load(cfg["dataset"], root=cfg["data_dir"], download=cfg["download"],
                           allow_pickle=cfg["allow_pickle"], standardize=cfg["standardize"], classes=cfg["classes"])
    return ds.limit(cfg["limit"]) if cfg["limit"] else ds


@dataclasses.dataclass
class Inputs:
    """What the network is given: the training split, divided into the part trained on and the
    validation part (x_val None without one), and the test images. uint8 pixels stay as they are
    (the model scales them on the device); float images are preprocessed."""

    x_all: np.ndarray  # the whole training split, for the doctor's data checks
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray | None
    y_val: np.ndarray | None
    x_test: np.ndarray


def model_inputs(ds, val_split: float, seed: int, limit: int | None = None) -> Inputs:
    """The run's inputs: the training split divided by ``stratified_split`` (``val_split`` > 0).
    ConfigError when that leaves no validation or no training sample (``limit``: the --limit that
    made the training split so small, named in the message)."""
    xtr, xte = (x if x.dtype == np.uint8 else ds.preprocess(x) for x in (ds.train_images, ds.test_images))
    if not val_split:
        return Inputs(xtr, xtr, ds.train_labels, None, None, xte)
    tr, va = stratified_split(ds.train_labels, val_split, seed)
    if len(va) == 0 or len(tr) == 0:
        raise ConfigError(_split_problem(ds.train_labels, val_split, limit, empty="validation" if len(tr) else
                                         "training"))
    return Inputs(xtr, xtr[tr], ds.train_labels[tr], xtr[va], ds.train_labels[va], xte)


def _split_problem(labels: np.ndarray, val_split: float, limit: int | None, empty: str) -> str:
    """Why ``stratified_split`` left no ``empty`` ("validation" or "training") samples: it gives a class
    round(fraction * n) samples, at least one and at most n - 1 when the class has n >= 2, so a class
    of one sample gives it all (fraction > 0.5) or nothing."""
    source = f"--limit {limit}" if limit else f"the training data ({len(labels)} samples)"
    largest = int(np.bincount(labels).max()) if len(labels) else 0
    if empty == "validation":
        return (f"{source} with --val-split {val_split:g} leaves no validation samples (each class needs 2 samples "
                f"to give one to validation; the largest class here has {largest}): "
                f"{'raise --limit' if limit else 'add training data'} or set --val-split 0")
    return (f"{source} with --val-split {val_split:g} leaves no training samples (each class has 1 sample, and "
            f"a fraction above 0.5 gives it to validation): lower --val-split or "
            f"{'raise --limit' if limit else 'add training data'}")


def check_size(cfg: dict, ds: datasets.Dataset, state: dict | None, given: dict) -> None:
    """Before the network is allocated: ConfigError naming --hidden or --layers (or DataError naming the checkpoint
    a resumed run took its layers from) when it would not fit in this machine's memory."""
    sizes, conv, flag = [ds.train_images.shape[1], *cfg["hidden"], len(ds.classes)], None, "hidden"
    if cfg["layers"]:  # a conv net: its layers give the parameters, outputs and patch buffers
        conv, flag = parse(cfg["layers"], image_shape_of(sizes[0], ds.image_shape), sizes[-1]), "layers"
    try:
        check_fits(sizes, resolve_dtype(cfg["dtype"]), batch=min(cfg["batch_size"], len(ds.train_labels)),
                   layers=conv, spec=cfg["layers"])
    except ConfigError as exc:
        if state is not None and flag not in given:
            raise DataError(f"{state['path']}: {exc}") from None
        value = cfg["layers"] or ",".join(map(str, cfg["hidden"]))
        raise ConfigError(f"--{flag} {value}: {exc}") from None


def build(cfg: dict, ds: datasets.Dataset, state: dict | None) -> tuple[MLP, Optimizer, np.random.Generator]:
    """The network, its optimizer and the batch-order RNG for a run; a resumed run's state put back
    (``checkpoint.restore`` refuses a checkpoint of another architecture)."""
    sizes = [ds.train_images.shape[1], *([] if cfg["layers"] else cfg["hidden"]), len(ds.classes)]
    model = MLP(sizes, cfg["activation"], cfg["loss"], cfg["init"], device=get_ops(cfg["device"], gemm=cfg["gpu_gemm"]),
                dtype=cfg["dtype"], seed=cfg["seed"], layers=cfg["layers"], image_shape=ds.image_shape,
                translate=cfg["translate"],
                dropout=cfg["dropout"][0] if len(cfg["dropout"]) == 1 else cfg["dropout"])  # one for all, or per layer
    model.preprocessing, model.classes = ds.preprocessing, ds.classes
    opt = make_optimizer(cfg["optimizer"], model, cfg["lr"], cfg["momentum"], cfg["weight_decay"])
    rng = np.random.default_rng(cfg["seed"])
    if state:
        checkpoint.restore(state, model, opt, rng)
    return model, opt, rng


@dataclasses.dataclass
class Run:
    """One ``fastnn train`` (or doctor, or lr-find) run: its flags, configuration, data, network,
    optimizer and batch-order RNG, its output, and the epochs done (``history``; a resumed run
    starts with the checkpoint's)."""

    args: argparse.Namespace
    cfg: dict
    ds: datasets.Dataset
    inputs: Inputs
    model: MLP
    opt: Optimizer
    rng: np.random.Generator
    out: Output
    history: list
    resumed_after: int | None = None  # the checkpoint's epoch when resuming

    @property
    def start(self) -> int:
        """The first epoch to train."""
        return 1 if self.resumed_after is None else self.resumed_after + 1


def run_doctor(run: Run) -> list:
    """Print and file the doctor's findings before training (data checks read both splits)."""
    cfg, ds, inputs = run.cfg, run.ds, run.inputs
    findings = diagnose(run.model, inputs.x_all, ds.train_labels, inputs.x_test, ds.test_labels, lr=cfg["lr"],
                        optimizer=cfg["optimizer"], batch_size=cfg["batch_size"],
                        verbose=0 if run.args.quiet else 1)
    print(f"doctor: {len(findings)} finding(s)" if findings else "doctor: no problems found")
    for f in findings:
        run.out.finding(f)
    return findings


def announce(run: Run) -> None:
    """The run's configuration: a line on screen, a record in the metrics."""
    cfg, ds, inputs, model, out, resumed_after = run.cfg, run.ds, run.inputs, run.model, run.out, run.resumed_after
    n_val = 0 if inputs.y_val is None else len(inputs.y_val)
    # a conv net is its layer spec (its flattened widths say little; --hidden is unused)
    spec = model.layer_spec and f"{model.layer_spec} ({'x'.join(map(str, model.image_shape))} images)"
    out.record({"type": "config", **cfg, **({"hidden": None} if spec else {}), "sizes": list(model.sizes),
                "device": model.device,
                "classes": ds.classes, "source": ds.source, "n_train": len(inputs.y_train), "n_val": n_val,
                "n_test": len(ds.test_labels), "resumed_from_epoch": resumed_after, "fastnn": __version__})
    out.say(f"fastnn {__version__}: {ds.name} ({len(inputs.y_train)} train / {n_val} validation / "
            f"{len(ds.test_labels)} test), "
            f"network {spec or '-'.join(map(str, model.sizes))} {cfg['activation']}/{cfg['loss']}, "
            f"{cfg['optimizer']} lr {cfg['lr']:g}, batch {cfg['batch_size']}, device {model.device}"
            + (f", resuming after epoch {resumed_after}" if resumed_after is not None else ""))


def train(run: Run) -> int | None:
    """Train, printing, checkpointing and watching each epoch. An exit status if it stopped early."""
    args, cfg, inputs, model, opt, rng, out = run.args, run.cfg, run.inputs, run.model, run.opt, run.rng, run.out
    history, start = run.history, run.start
    monitor = EpochMonitor(model, inputs.x_val, inputs.y_val) if args.doctor else None

    def on_epoch(rec):  # after fit printed the epoch's line and checked its loss and weights
        history.append(rec)
        out.record({"type": "epoch", **rec})
        for f in monitor(rec) if monitor else []:
            out.finding(f, epoch=rec["epoch"])
        if args.checkpoint_dir:
            checkpoint.save_checkpoint(args.checkpoint_dir, model, opt, rec["epoch"], rng, cfg, history)
        return False

    try:
        fit(model, inputs.x_train, inputs.y_train, epochs=cfg["epochs"], batch_size=cfg["batch_size"], optimizer=opt,
            x_val=inputs.x_val, y_val=inputs.y_val, lr_schedule=cfg["lr_schedule"], patience=cfg["patience"],
            on_epoch=on_epoch, verbose=0 if args.quiet else 1, rng=rng, start_epoch=start,
            class_weight=cfg["class_weight"],
            cuda_graph=cfg["cuda_graph"] and model.device == "gpu")
    except DivergedError as exc:
        where = ""
        if args.checkpoint_dir:
            found = checkpoint.checkpoint_files(args.checkpoint_dir)
            where = (f"; the last good checkpoint is {found[0]}" if found else
                     f"; no checkpoint was written to {args.checkpoint_dir}")
        print(f"training stopped: {exc}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        msg = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        if args.checkpoint_dir and checkpoint.checkpoint_files(args.checkpoint_dir):
            last = history[-1]["epoch"] if history else 0
            msg += f"; resume with --resume {args.checkpoint_dir} (last complete epoch: {last})"
        if args.save and not bool(model.ops.xp.isfinite(model.params).all()):
            msg += f"; the current weights hold NaN/inf values (the training was diverging): not saved to {args.save}"
        elif args.save:
            save_model(model, args.save)
            msg += f"; current weights saved to {args.save}"
        print(msg, file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    return None


def report(run: Run, seconds: float) -> None:
    """Test accuracy (the test set is predicted once, here), per-class report, model, plots."""
    args, ds, model, out, history = run.args, run.ds, run.model, run.out, run.history
    pred = model.predict(run.inputs.x_test)
    cm = confusion_matrix(ds.test_labels, pred, len(ds.classes))
    acc = float(np.trace(cm)) / cm.sum()
    out.record({"type": "result", "test_accuracy": acc, "train_seconds": seconds, "confusion_matrix": cm.tolist()})
    out.say()
    out.say(format_report(cm, ds.classes))
    print(f"test accuracy {acc:.4f} after {len(history)} epochs ({seconds:.1f} s)")
    if args.save:
        save_model(model, args.save)
        out.say(f"model saved to {args.save}")
    if args.plots:
        shape = panel_shape(ds)
        files = write_plots(args.plots, history, cm, ds.classes, ds.test_images, ds.test_labels, pred, shape)
        out.say("plots: " + ", ".join(map(str, files)))
        if shape is None:
            print(f"plots: no misclassified.png: the images are rows of {ds.test_images.shape[1]} pixels, not a "
                  "square, and the data does not say their height and width (IDX files and (N, H, W) arrays do)",
                  file=sys.stderr)


def check_outputs(args, resuming: bool, locks: contextlib.ExitStack | None = None) -> None:
    """Every output path of a run is usable before training starts; ConfigError naming it if not.

    A --checkpoint-dir is locked for the run's life (``FolderLock``, entered into ``locks``): one in
    use by another run is refused naming it. A --checkpoint-dir that holds another run's checkpoints
    is refused unless that run is being resumed (its newer files would otherwise replace this run's
    as "latest").
    """
    if args.save:
        save = Path(args.save)
        if save.is_dir():
            raise ConfigError(f"--save {save}: is a folder; give a file name such as {save / 'model.npz'}")
        if not save.parent.resolve().is_dir():
            raise ConfigError(f"--save {save}: the folder to save the model in does not exist")
        _probe_folder(save.parent, "--save", save)
    if args.metrics:
        if Path(args.metrics).is_dir():
            raise ConfigError(f"--metrics {args.metrics}: is a folder; give a file name such as metrics.jsonl")
        _probe_folder(Path(args.metrics).parent, "--metrics", args.metrics)
    for flag, folder in (("--checkpoint-dir", args.checkpoint_dir), ("--plots", args.plots)):
        if folder:
            _probe_folder(Path(folder), flag, folder, create=True)
    if args.checkpoint_dir and locks is not None and not _same_folder(args.checkpoint_dir, args.resume):
        locks.enter_context(FolderLock(args.checkpoint_dir, "--checkpoint-dir"))
    if args.checkpoint_dir and not resuming:
        found = checkpoint.checkpoint_files(args.checkpoint_dir)
        if found:
            raise ConfigError(f"--checkpoint-dir {args.checkpoint_dir}: holds the checkpoints of another run (up to "
                              f"{found[0].name}); continue it with --resume {args.checkpoint_dir}, or use an "
                              "empty folder")


def run_train(argv=None, command="train") -> int:
    """``fastnn train``, ``fastnn doctor`` or ``fastnn lr-find``: the whole run, step by step."""
    setup_only = command != "train"
    parser = train_parser(f"fastnn {command}", doctor=setup_only)
    if command == "lr-find":
        parser.description = LR_FIND_HELP
        parser.add_argument("--plots", metavar="DIR", help="write lr_find.png here")
    args = parser.parse_args(argv)
    for key in ("doctor", "quiet", "save", "checkpoint_dir", "resume", "plots"):  # output flags the doctor lacks
        args.__dict__.setdefault(key, None)
    with contextlib.ExitStack() as locks:  # the checkpoint folders, held until the run ends
        state = open_checkpoints(args, locks)
        cfg = resolve_config(args, state["meta"]["config"] if state else None, state and state["path"])
        set_tf32(cfg["tf32"])
        ds = load_data(cfg)
        check_size(cfg, ds, state, vars(args))
        inputs = model_inputs(ds, cfg["val_split"], cfg["seed"], cfg["limit"])  # once, not per step of the run
        model, opt, rng = build(cfg, ds, state)
        resumed_after = state["meta"]["epoch"] if state else None
        out = Output(args.quiet, args.metrics, resumed_after=resumed_after)
        if args.checkpoint_dir:
            checkpoint.remove_orphans(args.checkpoint_dir)
        try:
            run = Run(args, cfg, ds, inputs, model, opt, rng, out, state["meta"]["history"] if state else [],
                      resumed_after)
            return run_command(run, command)
        finally:
            out.close()


def open_checkpoints(args, locks: contextlib.ExitStack) -> dict | None:
    """Lock the --resume folder and read its newest usable checkpoint (None when not resuming), then
    check (and lock) the outputs: all before the data is loaded or the network built."""
    state = None
    if args.resume:
        if Path(args.resume).is_dir():
            locks.enter_context(FolderLock(args.resume, "--resume"))
        state = checkpoint.load_latest(args.resume, warn=lambda m: print(m, file=sys.stderr))
        args.checkpoint_dir = args.checkpoint_dir or args.resume
    check_outputs(args, resuming=state is not None, locks=locks)  # now, not after training
    return state


def _same_folder(a, b) -> bool:
    try:
        return bool(a and b) and os.path.samefile(a, b)
    except OSError:
        return False


def run_command(run: Run, command: str) -> int:
    """The command's work once the run is set up: lr-find, the doctor, or training and the report."""
    if command == "lr-find":
        return run_lr_find(run)
    if command == "doctor" or run.args.doctor:
        findings = run_doctor(run)
        if command == "doctor":
            return 1 if any(f.severity == "error" for f in findings) else 0
    announce(run)
    t0 = time.perf_counter()
    stopped = train(run)
    if stopped is not None:
        return stopped
    report(run, time.perf_counter() - t0)
    return 0


def run_lr_find(run: Run) -> int:
    """``fastnn lr-find``: the range test with the run's optimizer and batch size."""
    cfg, inputs, model, plots = run.cfg, run.inputs, run.model, run.args.plots
    result = lr_find(model, inputs.x_train, inputs.y_train, optimizer=cfg["optimizer"],
                     batch_size=cfg["batch_size"], momentum=cfg["momentum"], seed=cfg["seed"], verbose=1)
    print(f"suggested learning rate for {cfg['optimizer']}: {result['suggested']:.3g} (the loss is lowest at "
          f"{result['min_loss_lr']:.3g}; --lr {cfg['lr']:g} is {cfg['lr'] / result['suggested']:.3g}x the suggestion)")
    if plots:
        Path(plots).mkdir(parents=True, exist_ok=True)
        plot_lr_find(result, Path(plots) / "lr_find.png")
        print(f"plot: {Path(plots) / 'lr_find.png'}")
    return 0
