"""One run configuration: every default of a training run written once, every rule declared once.

``DEFAULTS`` holds what a run does when nothing is said: ``fastnn train``'s flags, ``fit``,
``fit_many``, the sweep's ``Settings`` and the scikit-learn estimator all start from it, so
``fit(model, x, y)`` trains as ``fastnn train`` does. ``RULES`` holds what each setting must be
(in the spirit of scikit-learn's ``_parameter_constraints``): ``check`` applies one in the
library (a ``ConfigError`` naming the setting), ``flag_type`` turns one into an argparse type
(a one-line usage error naming the flag), and the sweep checks its search space with them.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .errors import ConfigError

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam")
LR_SCHEDULES = ("constant", "cosine")
LOSSES = ("xent", "mse")
INITS = ("xavier", "glorot", "he", "normal")


@dataclasses.dataclass(frozen=True)
class Defaults:
    """A training run's defaults. Measured on Fashion-MNIST (README): 0.8988 test accuracy in
    about 25 s on a 2-core CPU with these."""

    dataset: str = "fashion-mnist"  # harder than MNIST, where every method scores ~98% and none stands out
    hidden: tuple = (256, 128)  # two hidden layers: wider or deeper MLPs gain nothing here (README)
    activation: str = "relu"  # trains faster than sigmoid/tanh from He initialisation
    loss: str = "xent"  # softmax cross-entropy; "mse" is the textbook network's loss
    init: str | None = None  # None: "he" for relu, "xavier" for sigmoid and tanh
    dropout: float = 0.0  # off: on this data, dropout alone does not beat the default network (README)
    translate: int = 0  # pixels of random translation in training: off for MLPs; the cnn preset's (README)
    optimizer: str = "adam"  # robust to the learning rate: no tuning needed for a first run
    lr: float = 1e-3  # Adam's usual rate
    momentum: float = 0.9  # for "momentum" and "nesterov"
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"  # from lr down to 0 over the run: ~0.5 points over a constant rate
    batch_size: int = 128  # fast on CPU BLAS and GPU kernels alike; small enough to generalise well
    epochs: int = 20  # the cosine schedule's length; validation accuracy has levelled off by then
    val_split: float = 0.1  # held out, stratified, from the training split: the test set chooses nothing
    seed: int = 0
    dtype: str = "float32"  # float64 for gradient checks and exact comparisons
    device: str = "auto"  # the GPU when CuPy finds a usable one, else the CPU
    gpu_gemm: str = "fastnn"  # fastnn's fused GEMM kernels: a CUDA graph can capture them, cuBLAS's it cannot
    sweep_epochs: int = 10  # a sweep trains many models: half a run each, ranked on validation accuracy
    sweep_stack: int = 16  # models a sweep trains at once in stacked kernels
    sweep_trials: int = 32  # trials in a sweep's study (a grid sampler: the grid's size)


DEFAULTS = Defaults()


@dataclasses.dataclass(frozen=True)
class Rule:
    """What a setting must be: a number in an interval or one of some choices.

    kind: int, float or str; low/high: the bounds (None: none), each excluded when
    ``low_open``/``high_open``; text: the rule in words, as errors say it.
    """

    kind: type
    text: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple | None = None

    def holds(self, value) -> bool:
        if self.choices is not None:
            return value in self.choices
        kinds = (int, np.integer) if self.kind is int else (int, float, np.integer, np.floating)
        if not isinstance(value, kinds) or isinstance(value, (bool, np.bool_)) or not math.isfinite(value):
            return False
        lo_ok = self.low is None or (value > self.low if self.low_open else value >= self.low)
        hi_ok = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return bool(lo_ok and hi_ok)

    def holds_all(self, values) -> bool:
        """Whether every element of ``values`` (a number or an array of them) keeps the rule."""
        return all(self.holds(v) for v in np.ravel(np.asarray(values, dtype=object)).tolist())


def _choice(choices) -> Rule:
    return Rule(str, "one of " + ", ".join(choices), choices=tuple(choices))


RULES = {
    "lr": Rule(float, ">= 0", low=0),  # 0 trains nothing (the doctor says so), but is allowed: a loss of fixed weights
    "momentum": Rule(float, "in [0, 1)", low=0, high=1, high_open=True),
    "weight_decay": Rule(float, ">= 0", low=0),
    "beta": Rule(float, "in [0, 1)", low=0, high=1, high_open=True),  # Adam's b1, b2 (1 would divide by 1 - 1)
    "eps": Rule(float, "> 0", low=0, low_open=True),  # Adam's: 0 divides by a zero moment
    "dropout": Rule(float, "in [0, 1)", low=0, high=1, high_open=True),
    "val_split": Rule(float, "in [0, 1)", low=0, high=1, high_open=True),
    "translate": Rule(int, ">= 0", low=0),
    "batch_size": Rule(int, "a positive number", low=1),
    "epochs": Rule(int, "a positive number", low=1),
    "patience": Rule(int, "a positive number", low=1),
    "limit": Rule(int, "a positive number", low=1),
    "classes": Rule(int, "a positive number", low=1),
    "stack": Rule(int, "a positive number", low=1),
    "trials": Rule(int, "a positive number", low=1),
    "workers": Rule(int, "a positive number", low=1),
    "seed": Rule(int, ">= 0", low=0, high=2**32 - 1),
    "worker": Rule(int, ">= 0", low=0),
    "optimizer": _choice(OPTIMIZERS),
    "lr_schedule": _choice(LR_SCHEDULES),
    "loss": _choice(LOSSES),
    "init": _choice(INITS),
}


def check(name: str, value, what: str | None = None):
    """``value`` if it keeps ``RULES[name]`` (every element, for an array), else a ConfigError
    "<what> must be <rule>, got <value>" (what: the name the caller's user knows, default ``name``)."""
    rule = RULES[name]
    if rule.kind is str:
        if value not in rule.choices:
            raise ConfigError(f"unknown {what or name} {value!r}: choose {rule.text}")
        return value
    if not rule.holds_all(value):
        whole = "a whole number " if rule.kind is int and rule.text.startswith(">") else ""
        raise ConfigError(f"{what or name} must be {whole}{rule.text}, got {value!r}")
    return value


def flag_type(name: str):
    """An argparse ``type`` for the flag of setting ``name``: parses the text as the rule's kind and
    checks the rule; a bad value is argparse's one-line usage error."""
    import argparse

    rule = RULES[name]

    def parse(text: str):
        try:
            value = rule.kind(text)
        except ValueError:
            kind = "a whole number" if rule.kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
        if not rule.holds(value):
            raise argparse.ArgumentTypeError(f"must be {rule.text}, got {text}")
        return value

    parse.__name__ = name  # argparse names the type in its messages
    return parse
