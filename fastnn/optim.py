"""Optimizers over the flat parameter arena: each step is one backend call.

The model's parameters (``model.params``) and gradients (``model.grads``) are two
1-D arrays of the same layout, so SGD, momentum and Adam update every layer in a
single kernel, with their state (velocity, moments) in arrays of that layout too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .config import DEFAULTS, OPTIMIZERS, RULES, check
from .errors import ConfigError

if TYPE_CHECKING:  # for annotations only: the model module does not import this one
    from .model import MLP

__all__ = ["OPTIMIZERS", "Optimizer", "SGD", "Momentum", "Adam", "make_optimizer"]
WORDS = {"lr": "learning rate", "weight_decay": "weight decay", "momentum": "momentum"}  # as errors name them


def hyperparameter(model: MLP, name: str, value):
    """A hyperparameter checked by ``config.RULES[name]``: a float, or for a stack of K models
    (``model.stack``) given K different values, a (K, 1) device array of the model dtype."""
    stack = getattr(model, "stack", ())
    try:
        v = np.asarray(value, np.float64)
    except (TypeError, ValueError):
        v = np.full(2, np.nan)
    if v.ndim > 1 or (v.ndim == 1 and v.shape != stack) or not RULES[name].holds_all(v.tolist()):
        per = f" (one, or one per model: {stack[0]})" if stack else ""
        raise ConfigError(f"{WORDS[name]} must be {RULES[name].text}{per}, got {value!r}")
    if not stack or v.ndim == 0 or (v == v.flat[0]).all():  # one value for all: a float, as for one model
        return float(v.flat[0])
    return model.ops.asarray(v.reshape(-1, 1), model.dtype)


class Optimizer:
    """Base class: ``lr`` and ``weight_decay`` may be changed between steps.

    ``state`` holds the device arrays of the optimizer's state, in the arena's layout.
    For a stack of K models, ``lr``, ``weight_decay`` and ``momentum`` are (K, 1) device
    arrays, one value per model, read by the same update kernel.
    """

    name = "base"
    state_names: tuple[str, ...] = ()
    hyperparameter_names: tuple[str, ...] = ("lr", "weight_decay")

    def __init__(self, model: MLP, lr: float, weight_decay: float = 0.0):
        self.model = model
        self.ops = model.ops
        self.lr = hyperparameter(model, "lr", lr)
        self.weight_decay = hyperparameter(model, "weight_decay", weight_decay)
        self.steps = 0
        self.state = {k: model.ops.xp.zeros_like(model.params) for k in self.state_names}

    def hyperparameters(self) -> tuple:
        """The values the update kernel takes as constants (a captured step holds them)."""
        return tuple(getattr(self, k) for k in self.hyperparameter_names)

    def step(self) -> None:
        """Update ``model.params`` from ``model.grads`` (which it may overwrite)."""
        self.steps += 1
        self._update(self.model.params, self.model.grads)

    def _update(self, p, g) -> None:
        raise NotImplementedError

    def __getstate__(self) -> dict:
        """Pickling: the hyperparameters, the model, and the state as host arrays."""
        d = {k: v for k, v in self.__dict__.items() if k not in ("ops", "state")}
        d["state"] = {k: self.ops.to_host(v).copy() for k, v in self.state.items()}
        return d

    def __setstate__(self, d) -> None:
        state = d.pop("state")
        self.__dict__.update(d)
        self.ops = self.model.ops
        self.state = {k: self.ops.asarray(v) for k, v in state.items()}

    def state_dict(self) -> dict:
        """Host copy of the optimizer state, for checkpoints."""
        d = {k: self.ops.to_host(v).copy() for k, v in self.state.items()}
        d["steps"] = np.array(self.steps)
        return d

    def load_state_dict(self, d: dict) -> None:
        self.steps = int(d["steps"])
        for k, v in self.state.items():
            v[...] = self.ops.asarray(d[k], v.dtype)


class SGD(Optimizer):
    """Plain SGD: ``p -= lr (g + wd p)``."""

    name = "sgd"

    def _update(self, p, g):
        self.ops.sgd(p, g, self.lr, self.weight_decay)


class Momentum(Optimizer):
    """SGD with heavy-ball (or Nesterov) momentum, PyTorch's formulation."""

    name = "momentum"
    state_names = ("velocity",)
    hyperparameter_names = Optimizer.hyperparameter_names + ("momentum", "nesterov")

    def __init__(self, model: MLP, lr: float, momentum: float = 0.9, nesterov: bool = False,
                 weight_decay: float = 0.0):
        super().__init__(model, lr, weight_decay)
        self.momentum = hyperparameter(model, "momentum", momentum)
        self.nesterov = bool(nesterov)

    def _update(self, p, g):
        self.ops.momentum(p, g, self.state["velocity"], self.lr, self.momentum,
                          self.weight_decay, self.nesterov)


class Adam(Optimizer):
    """Adam with bias correction; weight decay is decoupled (AdamW)."""

    name = "adam"
    state_names = ("m", "v")
    hyperparameter_names = Optimizer.hyperparameter_names + ("b1", "b2", "eps")

    def __init__(self, model: MLP, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(model, lr, weight_decay)
        try:
            b1, b2 = betas
        except (TypeError, ValueError):
            raise ConfigError(f"Adam's betas must be two numbers in [0, 1), got {betas!r}") from None
        self.b1, self.b2 = (float(check("beta", b, "each of Adam's betas")) for b in (b1, b2))
        self.eps = float(check("eps", eps, "Adam's eps"))
        self.state["t"] = model.ops.xp.zeros(1, np.int32)  # steps taken, kept on the device

    def _update(self, p, g):
        self.ops.adam(p, g, self.state["m"], self.state["v"], self.state["t"], self.lr, self.b1,
                      self.b2, self.eps, self.weight_decay)


def make_optimizer(name: str, model: MLP, lr: float = DEFAULTS.lr, momentum: float = DEFAULTS.momentum,
                   weight_decay: float = DEFAULTS.weight_decay) -> Optimizer:
    """``"sgd"``, ``"momentum"``, ``"nesterov"`` or ``"adam"`` -> an optimizer for ``model``."""
    check("optimizer", name)
    if name == "sgd":
        return SGD(model, lr, weight_decay)
    if name in ("momentum", "nesterov"):
        return Momentum(model, lr, momentum, nesterov=name == "nesterov", weight_decay=weight_decay)
    return Adam(model, lr, weight_decay=weight_decay)
