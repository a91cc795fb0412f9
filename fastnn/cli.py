"""Command line: ``fastnn train`` (also ``scripts/train.py``), ``fastnn doctor``, ``fastnn predict``.

Exit codes: 0 success; 1 training diverged; 2 bad flags, bad data or a bad file
(one line on stderr, no traceback); 130 interrupted by Ctrl-C.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

from . import __version__, checkpoint, datasets
from .backends import ACTIVATIONS, DEVICES, GEMMS, get_ops, set_tf32
from .diagnose import EpochMonitor, diagnose
from .errors import ConfigError, DataError, DivergedError, FastnnError
from .export import OPSET
from .images import IMAGE_SUFFIXES, light_paper, save_gray
from .lrfind import lr_find, plot_lr_find
from .model import INITS, LOSSES, MLP
from .optim import OPTIMIZERS, Optimizer, make_optimizer
from .report import confusion_matrix, format_report, write_plots
from .train import LR_SCHEDULES, fit, stratified_split

DEFAULTS = {
    "dataset": "fashion-mnist", "hidden": "256,128", "activation": "relu", "loss": "xent",
    "init": None, "dropout": "0", "optimizer": "adam", "lr": 1e-3, "momentum": 0.9, "weight_decay": 0.0,
    "batch_size": 128, "epochs": 20, "lr_schedule": "cosine", "seed": 0, "dtype": "float32", "val_split": 0.1,
    "class_weight": None,
    "device": "auto", "per_sample": False, "patience": None, "standardize": False,
    "cuda_graph": False, "gpu_gemm": "fastnn", "tf32": False,
}

# The two networks of the questions in the README, done right.
PRESETS = {
    "seed1": {"hidden": "128,64", "activation": "sigmoid", "loss": "xent", "init": "xavier",
              "optimizer": "sgd", "lr": 0.05, "per_sample": True, "epochs": 3,
              "lr_schedule": "constant", "weight_decay": 0.0},
    "seed2": {"hidden": "16,16", "activation": "sigmoid", "loss": "mse", "init": "xavier",
              "optimizer": "sgd", "lr": 20.0, "batch_size": 125, "epochs": 30,
              "lr_schedule": "constant", "weight_decay": 0.0},
}
RUN_KEYS = list(DEFAULTS) + ["data_dir", "train", "test", "allow_pickle", "limit", "download", "classes"]


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _fraction(text: str) -> float:
    v = _nonneg_float(text)
    if v >= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text!r}")
    return v


def _rates(text: str) -> list[float]:
    try:
        rates = [float(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected probabilities like 0.2 or 0.2,0.1, got {text!r}") from None
    if not rates or not all(0 <= p < 1 for p in rates):
        raise argparse.ArgumentTypeError(f"each probability must be in [0, 1), got {text!r}")
    return rates


def _nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def _hidden(text: str) -> list[int]:
    try:
        sizes = [int(t) for t in text.split(",") if t.strip()] if text.strip() else []
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected widths like 128,64, got {text!r}") from None
    if any(n < 1 for n in sizes):
        raise argparse.ArgumentTypeError(f"layer widths must be positive, got {text!r}")
    return sizes


def _positive(kind):
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not v > 0 or (kind is float and not math.isfinite(v)):
            raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
        return v
    return parse


def _nonneg_float(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (v >= 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return v


TRAIN_HELP = ("Train an MLP on MNIST-like data and report its test accuracy (defaults: Fashion-MNIST, "
              "784-256-128-10 relu, Adam, cosine schedule, 20 epochs).")
DOCTOR_HELP = ("Check data, initialisation, gradients and a short trial run on a copy of the network, "
               "and explain what would keep it from learning. Exit status 1 when it finds an error.")
# Flags of a training run that the doctor has no use for: it refuses them.
TRAIN_ONLY = {"--epochs", "--lr-schedule", "--patience", "--cuda-graph", "--tf32", "--doctor", "--quiet",
              "--save", "--checkpoint-dir", "--resume", "--plots"}


def train_parser(prog="fastnn train", doctor=False) -> argparse.ArgumentParser:
    """The flags of ``fastnn train`` (``doctor=True``: of ``fastnn doctor``, without the training-only ones)."""
    p = OneLineParser(prog=prog, description=DOCTOR_HELP if doctor else TRAIN_HELP)
    S = argparse.SUPPRESS  # absent flags stay absent, so presets and checkpoints can fill them

    def add(group, flag, help=None, **kw):
        if doctor and flag in TRAIN_ONLY:
            return
        key = flag[2:].replace("-", "_")
        if kw.get("default", 0) is S and DEFAULTS.get(key) is not None and kw.get("action") != "store_true":
            help = f"{help + ' ' if help else ''}(default: {DEFAULTS[key]})"
        group.add_argument(flag, help=help, **kw)

    _data_and_network_flags(p, add, S)
    _training_flags(p, add, S)
    g = p.add_argument_group("output")
    add(g, "--doctor", "check data, initialisation, gradients and a trial run first, and watch every epoch",
        action="store_true")
    add(g, "--quiet", "only the final result", action="store_true")
    add(g, "--metrics", "write one JSON object per epoch (and per finding) to this .jsonl file")
    add(g, "--save", "save the trained model (.npz) here")
    add(g, "--checkpoint-dir", "write the full training state here after every epoch")
    add(g, "--resume", "continue from the last complete checkpoint in DIR", metavar="DIR")
    add(g, "--plots", "write curves, confusion matrix, misclassified images", metavar="DIR")
    return p


def _data_and_network_flags(p, add, S) -> None:
    _data_flags(p, add, S)
    _network_flags(p, add, S)


def _data_flags(p, add, S) -> None:
    g = p.add_argument_group("data")
    add(g, "--dataset", "mnist, fashion-mnist, kmnist, a folder, or an .npz", default=S)
    add(g, "--data-dir", "folder searched first for named data sets", default=S)
    add(g, "--train", "training file (CSV or IDX images); with --test", default=S)
    add(g, "--test", "test file (CSV or IDX images); with --train", default=S)
    add(g, "--allow-pickle", "allow loading pickled images/labels (pickle can run arbitrary code)",
        action="store_true", default=S)
    add(g, "--no-download", "never download a named data set", dest="download", action="store_false", default=S)
    add(g, "--standardize", "scale inputs to mean 0, std 1 (statistics of the training split)",
        action="store_true", default=S)
    add(g, "--limit", "use the first N training samples", type=_positive(int), default=S)
    add(g, "--classes", "the number of classes, when the training labels do not show all of them "
        "(by default labels must be exactly 0..K-1, every class present)", type=_positive(int), default=S)


def _network_flags(p, add, S) -> None:
    g = p.add_argument_group("network")
    add(g, "--preset", "seed1/seed2: the networks of the two questions in the README, done right",
        choices=sorted(PRESETS), default=S)
    add(g, "--hidden", "hidden widths, e.g. 128,64", type=_hidden, default=S)
    add(g, "--activation", choices=ACTIVATIONS, default=S)
    add(g, "--loss", choices=LOSSES, default=S)
    add(g, "--init", "(default: he for relu, xavier otherwise)", choices=INITS, default=S)
    add(g, "--dtype", choices=["float32", "float64"], default=S)
    add(g, "--dropout", "dropout probability of the hidden layers' outputs in training: one for all "
        "(0.2) or one per hidden layer (0.2,0.1)", type=_rates, default=S)


def _training_flags(p, add, S) -> None:
    g = p.add_argument_group("training")
    add(g, "--device", "auto: the GPU when one is usable", choices=DEVICES, default=S)
    add(g, "--optimizer", choices=OPTIMIZERS, default=S)
    add(g, "--lr", type=_positive(float), default=S)
    add(g, "--momentum", type=_nonneg_float, default=S)
    add(g, "--weight-decay", type=_nonneg_float, default=S)
    add(g, "--lr-schedule", choices=LR_SCHEDULES, default=S)
    add(g, "--batch-size", type=_positive(int), default=S)
    add(g, "--epochs", type=_positive(int), default=S)
    add(g, "--per-sample", "batch size 1: an update after every sample", action="store_true", default=S)
    add(g, "--val-split", "hold out this fraction of the training data (stratified, seeded) for validation: it "
        "drives early stopping and the per-epoch figures; the test set is evaluated once, at the end",
        type=_fraction, default=S)
    add(g, "--class-weight", "balanced: weigh each class's loss by N / (K * its count), for imbalanced data",
        choices=["balanced"], default=S)
    add(g, "--patience", "early stopping: stop after N epochs without a better validation loss, keep the best",
        type=_positive(int), default=S)
    add(g, "--seed", type=_nonneg_int, default=S)
    g = p.add_argument_group("GPU")
    add(g, "--cuda-graph", "capture one training step as a CUDA graph and replay it per batch",
        action="store_true", default=S)
    add(g, "--gpu-gemm", "fastnn's fused GEMM kernels (capturable), or cuBLAS (for wide layers)",
        choices=GEMMS, default=S)
    add(g, "--tf32", "with --gpu-gemm cublas: allow TF32 tensor cores (faster, less exact)",
        action="store_true", default=S)


def resolve_config(args, stored=None) -> dict:
    """Defaults < preset < stored (resumed) configuration < flags given now."""
    given = {k: v for k, v in vars(args).items() if k in RUN_KEYS or k == "preset"}
    cfg = dict(DEFAULTS, data_dir=None, train=None, test=None, allow_pickle=False, limit=None,
               download=True, classes=None)
    preset = given.pop("preset", None) or (stored or {}).get("preset")
    if preset:
        cfg.update(PRESETS[preset])
    if stored:
        cfg.update({k: v for k, v in stored.items() if k in cfg})
        cfg["val_split"] = stored.get("val_split", 0.0)  # runs from before --val-split used all the data
    for key in ("data_dir", "train", "test"):  # stored absolute: --resume works from any folder
        if given.get(key) is not None:
            given[key] = os.path.abspath(given[key])
    if given.get("dataset") is not None and os.path.exists(given["dataset"]):
        given["dataset"] = os.path.abspath(given["dataset"])
    cfg.update(given)
    cfg["preset"] = preset
    if isinstance(cfg["hidden"], str):
        cfg["hidden"] = _hidden(cfg["hidden"])
    if isinstance(cfg["dropout"], str):
        cfg["dropout"] = _rates(cfg["dropout"])
    if cfg["per_sample"]:
        cfg["batch_size"] = 1  # resolved here, once: every later step reads batch_size
    if (cfg["train"] is None) != (cfg["test"] is None):
        raise ConfigError("--train and --test go together")
    if cfg["gpu_gemm"] == "cublas" and cfg["cuda_graph"]:
        raise ConfigError("--cuda-graph needs fastnn's GEMM kernels (CuPy cannot capture cuBLAS): "
                          "drop --gpu-gemm cublas")
    if cfg["tf32"] and cfg["gpu_gemm"] != "cublas":
        raise ConfigError("--tf32 applies to cuBLAS GEMMs only: add --gpu-gemm cublas")
    return cfg


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


def model_inputs(ds, val_split: float, seed: int) -> Inputs:
    xtr, xte = (x if x.dtype == np.uint8 else ds.preprocess(x) for x in (ds.train_images, ds.test_images))
    if not val_split:
        return Inputs(xtr, xtr, ds.train_labels, None, None, xte)
    tr, va = stratified_split(ds.train_labels, val_split, seed)
    return Inputs(xtr, xtr[tr], ds.train_labels[tr], xtr[va], ds.train_labels[va], xte)


class Output:
    """Progress bar, epoch lines and the metrics file."""

    def __init__(self, quiet, metrics_path, resumed_after=None):
        """resumed_after: the checkpoint's epoch when resuming: the metrics file is kept up to
        that epoch (records a killed run wrote after it are dropped) and appended to."""
        self.quiet = quiet
        if metrics_path and resumed_after is not None:
            _truncate_metrics(metrics_path, resumed_after)
        mode = "a" if resumed_after is not None else "w"
        self.metrics = open(metrics_path, mode) if metrics_path else None  # noqa: SIM115
        self.bar = None

    def say(self, text=""):
        if not self.quiet:
            print(text, flush=True)

    def record(self, obj):
        if self.metrics:
            self.metrics.write(json.dumps(obj) + "\n")
            self.metrics.flush()

    def finding(self, f, **where):
        """Print a doctor's finding (even with --quiet) and file it in the metrics."""
        print(f)
        self.record({"type": "finding", **where, **dataclasses.asdict(f)})

    def progress(self, epoch, epochs, total):
        """A callable for fit's progress hook, or None when no bar is shown."""
        if self.quiet or not (sys.stdout.isatty() or "ipykernel" in sys.modules):  # a terminal or Jupyter
            return None
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return None
        self.bar = tqdm(total=total, unit="sample", unit_scale=True, leave=False,
                        desc=f"epoch {epoch}/{epochs}", dynamic_ncols=True)
        return self.bar.update

    def close_bar(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self):
        self.close_bar()
        if self.metrics:
            self.metrics.close()


def _truncate_metrics(path, last_epoch: int) -> None:
    """Drop the records of epochs after ``last_epoch`` (and the result) from a metrics file, atomically."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return
    keep = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if rec.get("type") == "result" or (rec.get("epoch") or 0) > last_epoch:
            continue
        keep.append(line + "\n")
    tmp = Path(path).with_name(f".{Path(path).name}.tmp-{os.getpid()}")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)


def build(cfg: dict, ds: datasets.Dataset, state: dict | None) -> tuple[MLP, Optimizer, np.random.Generator]:
    """The network, its optimizer and the batch-order RNG for a run; a resumed run's state put back."""
    model = MLP([ds.train_images.shape[1], *cfg["hidden"], len(ds.classes)], cfg["activation"], cfg["loss"],
                cfg["init"], device=get_ops(cfg["device"], gemm=cfg["gpu_gemm"]), dtype=cfg["dtype"], seed=cfg["seed"],
                dropout=cfg["dropout"][0] if len(cfg["dropout"]) == 1 else cfg["dropout"])  # one for all, or per layer
    model.preprocessing, model.classes = ds.preprocessing, ds.classes
    opt = make_optimizer(cfg["optimizer"], model, cfg["lr"], cfg["momentum"], cfg["weight_decay"])
    rng = np.random.default_rng(cfg["seed"])
    if state:
        checkpoint.restore(state, model, opt, rng)
    return model, opt, rng


def run_doctor(cfg, ds, inputs, model, out) -> list:
    """Print and file the doctor's findings before training (data checks read both splits)."""
    findings = diagnose(model, inputs.x_all, ds.train_labels, inputs.x_test, ds.test_labels, lr=cfg["lr"],
                        optimizer=cfg["optimizer"], batch_size=cfg["batch_size"])
    print(f"doctor: {len(findings)} finding(s)" if findings else "doctor: no problems found")
    for f in findings:
        out.finding(f)
    return findings


def announce(cfg, ds, inputs, model, out, resumed_after) -> None:
    """The run's configuration: a line on screen, a record in the metrics."""
    n_val = 0 if inputs.y_val is None else len(inputs.y_val)
    out.record({"type": "config", **cfg, "sizes": list(model.sizes), "device": model.device,
                "classes": ds.classes, "source": ds.source, "n_train": len(inputs.y_train), "n_val": n_val,
                "n_test": len(ds.test_labels), "resumed_from_epoch": resumed_after, "fastnn": __version__})
    out.say(f"fastnn {__version__}: {ds.name} ({len(inputs.y_train)} train / {n_val} validation / "
            f"{len(ds.test_labels)} test), "
            f"network {'-'.join(map(str, model.sizes))} {cfg['activation']}/{cfg['loss']}, "
            f"{cfg['optimizer']} lr {cfg['lr']:g}, batch {cfg['batch_size']}, device {model.device}"
            + (f", resuming after epoch {resumed_after}" if resumed_after is not None else ""))


def train(args, cfg, ds, inputs, model, opt, rng, out, history, start) -> int | None:
    """Train, printing, checkpointing and watching each epoch. An exit status if it stopped early."""
    n = len(inputs.y_train)
    monitor = EpochMonitor(model, inputs.x_val, inputs.y_val) if args.doctor else None

    def on_epoch(rec):
        out.close_bar()
        history.append(rec)
        out.record({"type": "epoch", **rec})
        val = "" if rec["val_loss"] is None else f"val loss {rec['val_loss']:.4f} acc {rec['val_accuracy']:.4f}  "
        out.say(f"epoch {rec['epoch']:3d}/{cfg['epochs']}  train loss {rec['train_loss']:.4f} "
                f"acc {rec['train_accuracy']:.4f}  {val}{rec['seconds']:.2f} s  {rec['samples_per_s']:,.0f} samples/s")
        for f in monitor(rec) if monitor else []:
            out.finding(f, epoch=rec["epoch"])
        if args.checkpoint_dir:
            checkpoint.save_checkpoint(args.checkpoint_dir, model, opt, rec["epoch"], rng, cfg, history)
        if rec["epoch"] < cfg["epochs"]:
            bar_hook[0] = out.progress(rec["epoch"] + 1, cfg["epochs"], n)
        return False

    bar_hook = [out.progress(start, cfg["epochs"], n)]
    try:
        fit(model, inputs.x_train, inputs.y_train, epochs=cfg["epochs"], batch_size=cfg["batch_size"], optimizer=opt,
            x_val=inputs.x_val, y_val=inputs.y_val, lr_schedule=cfg["lr_schedule"], patience=cfg["patience"],
            on_epoch=on_epoch, progress=lambda n: bar_hook[0] and bar_hook[0](n), rng=rng, start_epoch=start,
            class_weight=cfg["class_weight"],
            cuda_graph=cfg["cuda_graph"] and model.device == "gpu")
    except DivergedError as exc:
        where = f"; the last good checkpoint is in {args.checkpoint_dir}" if args.checkpoint_dir else ""
        print(f"training stopped: {exc}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        msg = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        if args.checkpoint_dir and checkpoint.checkpoint_files(args.checkpoint_dir):
            last = history[-1]["epoch"] if history else 0
            msg += f"; resume with --resume {args.checkpoint_dir} (last complete epoch: {last})"
        if args.save:
            save_model(model, args.save)
            msg += f"; current weights saved to {args.save}"
        print(msg, file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    return None


def check_outputs(args, resuming: bool) -> None:
    """Every output path of a run is usable before training starts; ConfigError naming it if not.

    A --checkpoint-dir that holds another run's checkpoints is refused unless that run
    is being resumed (its newer files would otherwise replace this run's as "latest").
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
    if args.checkpoint_dir and not resuming:
        found = checkpoint.checkpoint_files(args.checkpoint_dir)
        if found:
            raise ConfigError(f"--checkpoint-dir {args.checkpoint_dir}: holds the checkpoints of another run (up to "
                              f"{found[0].name}); continue it with --resume {args.checkpoint_dir}, or use an "
                              "empty folder")


def _probe_folder(folder: Path, flag: str, given, create=False) -> None:
    """Create ``folder`` if asked, then write and remove a file in it; ConfigError if that fails."""
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".fastnn-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except FileExistsError:
        raise ConfigError(f"{flag} {given}: {folder} is a file, not a folder") from None
    except OSError as exc:
        raise ConfigError(f"{flag} {given}: cannot write in {folder} ({exc.strerror or exc})") from None


def save_model(model: MLP, path) -> None:
    """``model.save(path)``; if writing fails after training, the weights go to a file in the
    temporary folder and the error names both paths (the run is not lost)."""
    try:
        model.save(path)
    except OSError as exc:
        rescue = Path(tempfile.gettempdir()) / f"fastnn-model-{os.getpid()}.npz"
        try:
            model.save(rescue)
            kept = f"the trained model was saved to {rescue} instead"
        except OSError as exc2:
            kept = f"saving it to {rescue} failed too ({exc2.strerror or exc2})"
        raise FastnnError(f"--save {path}: cannot write the model ({exc.strerror or exc}); {kept}") from None


def report(args, ds, inputs, model, out, history, seconds) -> None:
    """Test accuracy (the test set is predicted once, here), per-class report, model, plots."""
    pred = model.predict(inputs.x_test)
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
        files = write_plots(args.plots, history, cm, ds.classes, ds.test_images, ds.test_labels, pred,
                            side=int(round(math.sqrt(ds.test_images.shape[1]))))
        out.say("plots: " + ", ".join(map(str, files)))


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
    state = None
    if args.resume:
        state = checkpoint.load_latest(args.resume, warn=lambda m: print(m, file=sys.stderr))
        args.checkpoint_dir = args.checkpoint_dir or args.resume
    check_outputs(args, resuming=state is not None)  # now, not after training
    cfg = resolve_config(args, state["meta"]["config"] if state else None)
    set_tf32(cfg["tf32"])
    ds = load_data(cfg)
    model, opt, rng = build(cfg, ds, state)
    inputs = model_inputs(ds, cfg["val_split"], cfg["seed"])  # once, not per step of the run
    out = Output(args.quiet, args.metrics, resumed_after=state["meta"]["epoch"] if state else None)
    if args.checkpoint_dir:
        checkpoint.remove_orphans(args.checkpoint_dir)
    try:
        if command == "lr-find":
            return run_lr_find(cfg, inputs, model, args.plots)
        if command == "doctor" or args.doctor:
            findings = run_doctor(cfg, ds, inputs, model, out)
            if command == "doctor":
                return 1 if any(f.severity == "error" for f in findings) else 0
        history = state["meta"]["history"] if state else []
        start = state["meta"]["epoch"] + 1 if state else 1
        announce(cfg, ds, inputs, model, out, start - 1 if state else None)
        t0 = time.perf_counter()
        stopped = train(args, cfg, ds, inputs, model, opt, rng, out, history, start)
        if stopped is not None:
            return stopped
        report(args, ds, inputs, model, out, history, time.perf_counter() - t0)
        return 0
    finally:
        out.close()


PREDICT_HELP = "Classify images with a saved model (the model's preprocessing is applied to them)."
LR_FIND_HELP = ("The learning-rate range test: 100 steps on a copy of the network with the rate rising from 1e-6 "
                "to 10; prints the rate where the loss falls fastest (and plots the curve with --plots).")
EXPORT_HELP = "Write a saved model as ONNX: its preprocessing, layers, probabilities and the predicted label."
SWEEP_HELP = ("Search learning rate, weight decay, momentum, dropout, hidden sizes and seeds with Optuna (grid, "
              "random or TPE), training up to --stack models at once; a leaderboard, the best model, and its "
              "test accuracy (the test set read once). Workers share the study through --storage.")
COMMANDS = {"train": TRAIN_HELP, "predict": PREDICT_HELP, "doctor": DOCTOR_HELP, "lr-find": LR_FIND_HELP,
            "export": EXPORT_HELP, "sweep": SWEEP_HELP}


def sweep_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="fastnn sweep", description=SWEEP_HELP)
    S = argparse.SUPPRESS

    def add(group, flag, help=None, **kw):
        group.add_argument(flag, help=help, **kw)

    _data_flags(p, add, S)
    g = p.add_argument_group("search space: a value (0.1), choices (0.01,0.1,0.3) or a range (1e-4..1e-2; "
                             "log scale for --lr and --weight-decay)")
    g.add_argument("--lr", dest="lr_space", metavar="SPACE", help="(default: 3e-4..3e-3 for adam, 0.01..0.3 otherwise)")
    g.add_argument("--weight-decay", dest="weight_decay_space", metavar="SPACE", default="0", help="(default: 0)")
    g.add_argument("--momentum", dest="momentum_space", metavar="SPACE", default="0.9",
                   help="momentum and nesterov (default: 0.9)")
    g.add_argument("--dropout", dest="dropout_space", metavar="SPACE", default="0", help="(default: 0)")
    g.add_argument("--seeds", dest="seed_space", metavar="SPACE", default="0",
                   help="init and batch-order seeds of the models, e.g. 0..9 (default: 0)")
    g.add_argument("--hidden", dest="hidden_space", nargs="+", type=_hidden, default=[[256, 128]],
                   metavar="WIDTHS", help="one or more shapes, e.g. 128,64 256,128 (default: 256,128)")
    g = p.add_argument_group("search")
    g.add_argument("--sampler", choices=["grid", "random", "tpe"], default="tpe", help="(default: tpe)")
    g.add_argument("--trials", type=_positive(int), help="trials in the study, over all workers (default: 32; "
                   "the grid's size with --sampler grid)")
    g.add_argument("--stack", type=_positive(int), default=16, help="models trained at once (default: 16)")
    g.add_argument("--pruner", choices=["median", "none"], default="median",
                   help="from epoch 2 on, stop a model whose validation accuracy is below the median of the "
                        "completed trials at the same epoch, once 5 have completed (default: median)")
    g.add_argument("--seed", type=_nonneg_int, default=S, help="seed of the sampler and the validation split "
                   "(default: 0)")
    g = p.add_argument_group("training, shared by every trial")
    add(g, "--device", "(default: auto)", choices=DEVICES, default=S)
    add(g, "--optimizer", "(default: adam)", choices=OPTIMIZERS, default=S)
    add(g, "--epochs", "(default: 10)", type=_positive(int), default=10)
    add(g, "--batch-size", "(default: 128)", type=_positive(int), default=S)
    add(g, "--lr-schedule", "(default: cosine)", choices=LR_SCHEDULES, default=S)
    add(g, "--val-split", "validation fraction of the training data (default: 0.1)", type=_fraction, default=S)
    add(g, "--activation", choices=ACTIVATIONS, default=S)
    add(g, "--loss", choices=LOSSES, default=S)
    add(g, "--dtype", choices=["float32", "float64"], default=S)
    add(g, "--class-weight", "balanced: weigh each class's loss by N / (K * its count), for imbalanced data",
        choices=["balanced"], default=S)
    g.add_argument("--cuda-graph", action="store_true", help="GPU: capture each stack's step as a CUDA graph")
    g = p.add_argument_group("study and workers")
    g.add_argument("--study", default="fastnn", help="the study's name in the storage (default: fastnn)")
    g.add_argument("--storage", help="a journal file shared by processes on one machine, or a database URL "
                   "(postgresql://user:password@host/db) shared by machines (default: OUT/sweep.journal)")
    g.add_argument("--out", default="sweep", help="folder for the leaderboard, plot and best model (default: sweep)")
    g.add_argument("--workers", type=_positive(int), default=1, help="worker processes on this machine (default: 1)")
    g.add_argument("--devices", help="GPU numbers, e.g. 0,1,2,3: one worker process per GPU")
    g.add_argument("--worker", type=_nonneg_int, help=S)  # the index of a worker started by another fastnn sweep
    return p


def run_sweep(argv=None) -> int:
    """``fastnn sweep``: the study's workers (this process, or one process per --workers/--devices),
    then the leaderboard, the best model and its test accuracy."""
    from . import sweep

    argv = list(sys.argv[1:] if argv is None else argv)
    args = sweep_parser().parse_args(argv)
    cfg = resolve_config(args)
    if not cfg["val_split"]:
        raise ConfigError("a sweep ranks trials on validation data: --val-split must be above 0")
    space = sweep.SearchSpace(
        lr=sweep.parse_space("lr", args.lr_space or ("3e-4..3e-3" if cfg["optimizer"] == "adam" else "0.01..0.3")),
        weight_decay=sweep.parse_space("weight_decay", args.weight_decay_space),
        momentum=sweep.parse_space("momentum", args.momentum_space),
        dropout=sweep.parse_space("dropout", args.dropout_space),
        seed=sweep.parse_space("seeds", args.seed_space, int), hidden=args.hidden_space)
    space.check()
    trials = args.trials or (int(np.prod([len(v) for v in space.grid().values()])) if args.sampler == "grid" else 32)
    devices = [d.strip() for d in args.devices.split(",") if d.strip()] if args.devices else []
    settings = sweep.Settings(epochs=args.epochs, batch_size=cfg["batch_size"], optimizer=cfg["optimizer"],
                              lr_schedule=cfg["lr_schedule"], activation=cfg["activation"], loss=cfg["loss"],
                              dtype=cfg["dtype"], device="gpu" if devices else cfg["device"], stack=args.stack,
                              trials=trials, cuda_graph=args.cuda_graph, class_weight=cfg["class_weight"])
    if args.cuda_graph and not devices and get_ops(cfg["device"]).name != "gpu":
        raise ConfigError("--cuda-graph needs the GPU: add --device gpu (or --devices)")
    out = Path(args.out)
    _probe_folder(out, "--out", out, create=True)
    storage_spec = args.storage or str(out / "sweep.journal")
    pruner = (sweep.optuna().pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2) if args.pruner == "median"
              else sweep.optuna().pruners.NopPruner())
    worker = args.worker is not None
    # each worker's sampler its own seed: two seeded alike would propose the same trials
    sampler_seed = int(np.random.SeedSequence([cfg["seed"], args.worker or 0]).generate_state(1)[0])
    study = sweep.open_study(args.study, sweep.make_storage(storage_spec),
                             sweep.make_sampler(args.sampler, space, sampler_seed), pruner)
    ds = load_data(cfg)
    inputs = model_inputs(ds, cfg["val_split"], cfg["seed"])
    data = (inputs.x_train, inputs.y_train, inputs.x_val, inputs.y_val, ds.preprocessing, ds.classes)
    who = f"worker {args.worker}: " if worker else ""
    if worker or (args.workers == 1 and not devices):
        if not worker:
            print(f"fastnn sweep: study {args.study!r} in {storage_spec}, {trials} trials, up to {args.stack} "
                  f"models at once, {ds.name} ({len(inputs.y_train)} train / {len(inputs.y_val)} validation)")
        sweep.run_worker(study, space, settings, data, out, log=lambda m: print(who + m, flush=True))
        if worker:
            return 0
    else:
        _run_workers(argv, storage_spec, devices, args.workers)
    return _sweep_report(study, out, ds, inputs)


def _run_workers(argv, storage_spec, devices, n_workers) -> None:
    """Start one ``fastnn sweep --worker`` process per device (or --workers of them) and wait for all."""
    import subprocess

    drop = {"--workers", "--devices", "--storage", "--worker"}
    child, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in drop:
            skip = True
        elif not any(a.startswith(d + "=") for d in drop):
            child.append(a)
    cmd = [sys.executable, "-m", "fastnn", "sweep", *child, "--storage", storage_spec]
    slots = [{"CUDA_VISIBLE_DEVICES": d} for d in devices] or [{} for _ in range(n_workers)]
    procs = [subprocess.Popen(cmd + ["--worker", str(i)] + (["--device", "gpu"] if env else []),
                              env={**os.environ, **env}) for i, env in enumerate(slots)]
    print(f"fastnn sweep: {len(procs)} worker processes on {storage_spec}"
          + (f", GPUs {','.join(devices)}" if devices else ""), flush=True)
    codes = [p.wait() for p in procs]
    if any(codes):
        raise FastnnError(f"worker processes exited with {codes}: see their messages above")


def _sweep_report(study, out: Path, ds, inputs) -> int:
    """Leaderboard (table, JSONL, plot); the best trial's model as best.npz with best.json; its test accuracy."""
    from . import sweep

    rows = sweep.leaderboard(study)
    print(sweep.format_leaderboard(rows))
    sweep.write_leaderboard(rows, out / "leaderboard.jsonl")
    files = [out / "leaderboard.jsonl"]
    if sweep.plot_leaderboard(rows, out / "leaderboard.png"):
        files.append(out / "leaderboard.png")
    best, path = sweep.best_model_file(study, out)
    info = {"trial": best.number, "val_accuracy": best.value, "params": best.params, **best.user_attrs}
    if path is None:
        print(f"best: trial {best.number} (val accuracy {best.value:.4f}); its model was saved by the worker that "
              f"trained it, as trial-{best.number}.npz in that worker's --out folder")
    else:
        model = MLP.load(path)
        model.save(out / "best.npz")
        info["test_accuracy"] = model.evaluate(inputs.x_test, ds.test_labels)["accuracy"]
        files.append(out / "best.npz")
        print(f"best: trial {best.number}, val accuracy {best.value:.4f}, test accuracy {info['test_accuracy']:.4f} "
              f"(the test set, read once)")
    (out / "best.json").write_text(json.dumps(info, indent=1) + "\n")
    print("wrote " + ", ".join(map(str, files + [out / "best.json"])))
    return 0


def run_export(argv=None) -> int:
    p = OneLineParser(prog="fastnn export", description=EXPORT_HELP)
    p.add_argument("model", help="a model saved with --save")
    p.add_argument("output", help="the .onnx file to write")
    p.add_argument("--input-type", choices=["uint8", "float"], default="uint8",
                   help="uint8: raw pixels, scaled inside the graph; float: network inputs (default: uint8)")
    args = p.parse_args(argv)
    _probe_folder(Path(args.output).parent, "output", args.output)
    MLP.load(args.model).to_onnx(args.output, args.input_type)
    print(f"{args.output}: ONNX opset {OPSET}, input 'images' {args.input_type}, outputs 'probabilities', 'label'")
    return 0


def run_lr_find(cfg, inputs, model, plots) -> int:
    """``fastnn lr-find``: the range test with the run's optimizer and batch size."""
    result = lr_find(model, inputs.x_train, inputs.y_train, optimizer=cfg["optimizer"],
                     batch_size=cfg["batch_size"], momentum=cfg["momentum"], seed=cfg["seed"])
    print(f"suggested learning rate for {cfg['optimizer']}: {result['suggested']:.3g} (the loss is lowest at "
          f"{result['min_loss_lr']:.3g}; --lr {cfg['lr']:g} is {cfg['lr'] / result['suggested']:.3g}x the suggestion)")
    if plots:
        Path(plots).mkdir(parents=True, exist_ok=True)
        plot_lr_find(result, Path(plots) / "lr_find.png")
        print(f"plot: {Path(plots) / 'lr_find.png'}")
    return 0


def predict_parser(prog="fastnn predict"):
    p = OneLineParser(prog=prog, description=PREDICT_HELP)
    p.add_argument("model", help="a model saved with --save")
    p.add_argument("inputs", nargs="+", help="IDX image files, CSV files, or image files (PNG, JPEG, ...)")
    p.add_argument("--invert", action="store_true", help="invert pixels (dark ink on light paper)")
    p.add_argument("--no-normalize", dest="normalize", action="store_false",
                   help="image files: only convert to gray (for images already 28x28, centred, light on dark); "
                        "by default they are prepared as MNIST's digits were: inverted if the paper is light, "
                        "cropped to the ink, scaled into 20x20 and centred by mass in 28x28")
    p.add_argument("--show", metavar="DIR", help="write each image file as the network saw it, as PNG, here")
    p.add_argument("--proba", action="store_true", help="also print the probability of every class")
    p.add_argument("--device", choices=DEVICES, default="cpu", help="(default: cpu)")
    return p


def usage() -> str:
    """``fastnn --help``: the commands."""
    lines = ["usage: fastnn [COMMAND] [FLAGS]", "", "commands:"]
    lines += [textwrap.fill(text, 88, initial_indent=f"  {name:<9}", subsequent_indent=" " * 11)
              for name, text in COMMANDS.items()]
    lines += ["", "With no command, fastnn trains. 'fastnn COMMAND --help' lists a command's flags;",
              "'fastnn --version' prints the version. Exit status: 0 done, 1 training diverged (or the",
              "doctor found an error), 2 bad flag, data or file, 130 interrupted, 143 terminated."]
    return "\n".join(lines)


def run_predict(argv=None) -> int:
    args = predict_parser().parse_args(argv)
    model = MLP.load(args.model, device=args.device)
    classes = getattr(model, "classes", None) or [str(i) for i in range(model.sizes[-1])]
    for path in args.inputs:
        images, labels = datasets.read_images(path, normalize=args.normalize)
        images = datasets.flatten_images(images, path)
        if images.shape[1] != model.sizes[0]:
            raise DataError(f"{path}: images have {images.shape[1]} pixels, the model expects "
                              f"{model.sizes[0]}")
        photo = str(path).lower().endswith(IMAGE_SUFFIXES)
        if args.invert:
            images = (255 - images) if images.dtype == np.uint8 or images.max() > 1 else 1.0 - images
        elif photo and not args.normalize and light_paper(images[0]):
            print(f"{path}: a light background: MNIST-like models expect light ink on black; if this is dark "
                  "ink on light paper, pass --invert (or leave out --no-normalize)", file=sys.stderr)
        if photo and args.show:
            Path(args.show).mkdir(parents=True, exist_ok=True)
            save_gray(images[0], Path(args.show) / (Path(path).stem + ".seen.png"))
        inputs = model.preprocess(images)
        proba = model.predict_proba(inputs) if args.proba else None
        pred = model.predict(inputs)
        for i, p in enumerate(pred):
            name = f"{path}[{i}]" if len(pred) > 1 else str(path)
            extra = "" if proba is None else "\t" + " ".join(f"{v:.4f}" for v in proba[i])
            print(f"{name}\t{p}\t{classes[p]}{extra}")
        if labels is not None:
            print(f"{path}: accuracy {np.mean(pred == labels):.4f} on {len(labels)} labelled images")
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM (``docker stop``, cluster schedulers), handled as Ctrl-C is: weights saved, resume hint."""


def _terminate(signum, frame):
    raise Terminated()


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if threading_main():
        signal.signal(signal.SIGTERM, _terminate)
    if argv[:1] in (["-h"], ["--help"]):
        print(usage())
        return 0
    if argv[:1] == ["--version"]:
        print(f"fastnn {__version__}")
        return 0
    cmd = argv[0] if argv and argv[0] in COMMANDS else None
    if cmd:
        argv = argv[1:]
    try:
        if cmd == "predict":
            return run_predict(argv)
        if cmd == "export":
            return run_export(argv)
        if cmd == "sweep":
            return run_sweep(argv)
        return run_train(argv, command=cmd or "train")
    except FastnnError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. --metrics or --save into a folder that does not exist
        print(f"error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print("terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130


def threading_main() -> bool:
    """Signal handlers can be set only from the main thread (``main`` may be called from others)."""
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
