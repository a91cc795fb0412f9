"""The flags of ``fastnn train``, ``fastnn doctor`` and ``fastnn lr-find``, the type checks that
every command's parser shares, and the run's configuration: defaults < preset < checkpoint < flags."""

from __future__ import annotations

import argparse
import os

from ..backends import ACTIVATIONS, DEVICES, GEMMS
from ..config import DEFAULTS as RUN
from ..config import INITS, LOSSES, LR_SCHEDULES, OPTIMIZERS, RULES, flag_type
from ..errors import ConfigError
from ..layers import parse as parse_layers

# What a run does when no flag, preset or checkpoint says otherwise: fastnn.config's defaults.
DEFAULTS = {
    "dataset": RUN.dataset, "hidden": list(RUN.hidden), "activation": RUN.activation, "loss": RUN.loss,
    "init": RUN.init, "dropout": [RUN.dropout], "optimizer": RUN.optimizer, "lr": RUN.lr, "momentum": RUN.momentum,
    "weight_decay": RUN.weight_decay, "batch_size": RUN.batch_size, "epochs": RUN.epochs,
    "lr_schedule": RUN.lr_schedule, "seed": RUN.seed, "dtype": RUN.dtype, "val_split": RUN.val_split,
    "class_weight": None, "device": RUN.device, "per_sample": False, "patience": None, "standardize": False,
    "cuda_graph": False, "gpu_gemm": RUN.gpu_gemm, "tf32": False, "layers": None,
    "translate": RUN.translate,
}

# The two networks of the questions in the README, done right; then the conv nets.
PRESETS = {
    "seed1": {"hidden": "128,64", "activation": "sigmoid", "loss": "xent", "init": "xavier",
              "optimizer": "sgd", "lr": 0.05, "per_sample": True, "epochs": 3,
              "lr_schedule": "constant", "weight_decay": 0.0},
    "seed2": {"hidden": "16,16", "activation": "sigmoid", "loss": "mse", "init": "xavier",
              "optimizer": "sgd", "lr": 20.0, "batch_size": 125, "epochs": 30,
              "lr_schedule": "constant", "weight_decay": 0.0},
    # Nielsen's network3 (Neural Networks and Deep Learning, ch. 6) with ReLU, on Adam and a cosine schedule
    "network3": {"layers": "conv20k5,pool2,conv40k5,pool2,dense100", "dropout": "0.5", "activation": "relu",
                 "optimizer": "adam", "lr": 1e-3, "lr_schedule": "cosine", "epochs": 10},
    # fastnn's recommended conv net for MNIST-like data: 3x3 'same' convolutions, 32 then 64 channels, images
    # moved by up to 1 pixel in training; 1 pixel and 20 epochs chosen on the validation split (README)
    "cnn": {"layers": "conv32k3s,pool2,conv64k3s,pool2,dense128", "dropout": "0.25", "activation": "relu",
            "translate": 1, "optimizer": "adam", "lr": 1e-3, "lr_schedule": "cosine", "epochs": 20},
}
RUN_KEYS = list(DEFAULTS) + ["data_dir", "train", "test", "allow_pickle", "limit", "download", "classes"]


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _rates(text: str) -> list[float]:
    """``--dropout``: one probability for all hidden layers, or one per layer ("0.2,0.1")."""
    try:
        rates = [float(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected probabilities like 0.2 or 0.2,0.1, got {text!r}") from None
    if not rates or not RULES["dropout"].holds_all(rates):
        raise argparse.ArgumentTypeError(f"each probability must be {RULES['dropout'].text}, got {text!r}")
    return rates


def _hidden(text: str) -> list[int]:
    try:
        sizes = [int(t) for t in text.split(",") if t.strip()] if text.strip() else []
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected widths like 128,64, got {text!r}") from None
    if any(n < 1 for n in sizes):
        raise argparse.ArgumentTypeError(f"layer widths must be positive, got {text!r}")
    return sizes


TRAIN_HELP = ("Train an MLP or a conv net on MNIST-like data and report its test accuracy (defaults: Fashion-MNIST, "
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
            default = DEFAULTS[key]
            shown = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in default) \
                if isinstance(default, list) else default
            help = f"{help + ' ' if help else ''}(default: {shown})"
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
    add(g, "--limit", "use the first N training samples", type=flag_type("limit"), default=S)
    add(g, "--classes", "the number of classes, when the training labels do not show all of them "
        "(by default labels must be exactly 0..K-1, every class present)", type=flag_type("classes"), default=S)


def _network_flags(p, add, S) -> None:
    g = p.add_argument_group("network")
    add(g, "--preset", "seed1/seed2: the networks of the two questions in the README, done right; network3: "
        "Nielsen's conv net (ReLU, dropout 0.5); cnn: fastnn's recommended conv net (1-pixel shifts, 20 epochs)",
        choices=list(PRESETS), default=S)
    add(g, "--hidden", "hidden widths, e.g. 128,64", type=_hidden, default=S)
    add(g, "--layers", "a conv net instead: e.g. conv20k5,pool2,conv40k5,pool2,dense100 (convCkK: C channels, "
        "K x K kernel, 'valid'; convCkKs: 'same' padding; poolP: P x P max pooling; denseN: N units)",
        metavar="SPEC", default=S)
    add(g, "--activation", choices=ACTIVATIONS, default=S)
    add(g, "--loss", choices=LOSSES, default=S)
    add(g, "--init", "(default: he for relu, xavier otherwise)", choices=INITS, default=S)
    add(g, "--dtype", choices=["float32", "float64"], default=S)
    add(g, "--dropout", "dropout probability of the hidden layers' outputs in training: one for all "
        "(0.2) or one per hidden layer (0.2,0.1)", type=_rates, default=S)
    add(g, "--translate", "in training, move each image at random by up to this many pixels each way "
        "(an augmentation for conv nets; 0: off)", type=flag_type("translate"), metavar="PIXELS", default=S)


def _training_flags(p, add, S) -> None:
    g = p.add_argument_group("training")
    add(g, "--device", "auto: the GPU when one is usable", choices=DEVICES, default=S)
    add(g, "--optimizer", choices=OPTIMIZERS, default=S)
    add(g, "--lr", type=flag_type("lr"), default=S)
    add(g, "--momentum", "for momentum and nesterov", type=flag_type("momentum"), default=S)
    add(g, "--weight-decay", type=flag_type("weight_decay"), default=S)
    add(g, "--lr-schedule", choices=LR_SCHEDULES, default=S)
    add(g, "--batch-size", type=flag_type("batch_size"), default=S)
    add(g, "--epochs", type=flag_type("epochs"), default=S)
    add(g, "--per-sample", "batch size 1: an update after every sample", action="store_true", default=S)
    add(g, "--val-split", "hold out this fraction of the training data (stratified, seeded) for validation: it "
        "drives early stopping and the per-epoch figures; the test set is evaluated once, at the end",
        type=flag_type("val_split"), default=S)
    add(g, "--class-weight", "balanced: weigh each class's loss by N / (K * its count), for imbalanced data",
        choices=["balanced"], default=S)
    add(g, "--patience", "early stopping: stop after N epochs without a better validation loss, keep the best",
        type=flag_type("patience"), default=S)
    add(g, "--seed", type=flag_type("seed"), default=S)
    g = p.add_argument_group("GPU")
    add(g, "--cuda-graph", "capture one training step as a CUDA graph and replay it per batch",
        action="store_true", default=S)
    add(g, "--gpu-gemm", "fastnn's fused GEMM kernels (capturable), or cuBLAS (for wide layers)",
        choices=GEMMS, default=S)
    add(g, "--tf32", "with --gpu-gemm cublas: allow TF32 tensor cores (faster, less exact)",
        action="store_true", default=S)


def resolve_config(args, stored=None, checkpoint=None) -> dict:
    """Defaults < preset < stored (resumed) configuration < flags given now.

    A resumed run continues the checkpoint's network: a flag given now that would change it
    (``NETWORK_FLAGS``) is a ConfigError naming the flag, the checkpoint file and both values.
    """
    given = {k: v for k, v in vars(args).items() if k in RUN_KEYS or k == "preset"}
    cfg = dict(DEFAULTS, data_dir=None, train=None, test=None, allow_pickle=False, limit=None,
               download=True, classes=None)
    preset = given.pop("preset", None) or (stored or {}).get("preset")
    if preset:
        cfg.update(PRESETS[preset])
    if stored:
        cfg.update({k: v for k, v in stored.items() if k in cfg})
        cfg["val_split"] = stored.get("val_split", 0.0)  # runs from before --val-split used all the data
        cfg["translate"] = stored.get("translate", 0)  # ... and before --translate did not shift images
        check_same_network(cfg, given, checkpoint or "of --resume")
    for key in ("data_dir", "train", "test"):  # stored absolute: --resume works from any folder
        if given.get(key) is not None:
            given[key] = os.path.abspath(given[key])
    if given.get("dataset") is not None and os.path.exists(given["dataset"]):
        given["dataset"] = os.path.abspath(given["dataset"])
    cfg.update(given)
    cfg["preset"] = preset
    if cfg["layers"]:
        if "hidden" in given:
            raise ConfigError(f"--hidden applies to an MLP, and this run is the conv net {cfg['layers']}: give "
                              "--layers or --hidden, not both")
        parse_layers(cfg["layers"], (1 << 16, 1 << 16, 1), 2)  # the grammar, before any data is read
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


# The flags that decide a network's architecture or what its inputs are: a resumed run keeps them.
NETWORK_FLAGS = ("hidden", "layers", "activation", "loss", "dtype", "dropout", "translate", "standardize")


def check_same_network(stored: dict, given: dict, checkpoint) -> None:
    """ConfigError when a flag given now (``given``) changes the network of the resumed run, whose
    resolved configuration is ``stored``: one line naming the flag, the checkpoint file and both values."""
    for key in NETWORK_FLAGS:
        if key not in given:
            continue
        old, new = _network_value(key, stored), _network_value(key, {**stored, **given})
        if old != new:
            flag = "--" + key.replace("_", "-")
            was = f"with {flag} {_flag_text(old)}" if not isinstance(old, bool) else \
                f"{'with' if old else 'without'} {flag}"
            raise ConfigError(f"{flag}{'' if isinstance(new, bool) else ' ' + _flag_text(new)}: the checkpoint "
                              f"{checkpoint} holds a network trained {was}; a resumed run continues that network: "
                              f"drop {flag}, or train the new network in another --checkpoint-dir")


def _network_value(key: str, cfg: dict):
    """``cfg[key]`` in one form for comparing: widths and rates as lists (the dropout per hidden layer)."""
    value = cfg.get(key, DEFAULTS.get(key, False))
    if key == "hidden":
        return _hidden(value) if isinstance(value, str) else [int(n) for n in value]
    if key == "dropout":
        rates = _rates(value) if isinstance(value, str) else [float(p) for p in value]
        n_hidden = len(_network_value("hidden", cfg))
        return rates * n_hidden if len(rates) == 1 else rates
    return value


def _flag_text(value) -> str:
    if isinstance(value, list):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return str(value)
