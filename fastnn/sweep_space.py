"""A sweep's search space: its text (``0.1``, ``0.01,0.1``, ``1e-4..1e-2``), its Optuna distributions,
and the check that a study goes on over the space its trials were searched over (``fastnn.sweep``).

A search space is given per hyperparameter as text: ``0.1`` (fixed), ``0.01,0.1,0.3``
(choices) or ``1e-4..1e-2`` (a range: log-uniform for the learning rate and weight decay
when it starts above 0, uniform otherwise). Hidden sizes are a list of shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .config import DEFAULTS, RULES
from .errors import ConfigError

LOG_SCALE = ("lr", "weight_decay")  # ranges of these are searched on a log scale when they start above 0
SCALARS = ("lr", "weight_decay", "momentum", "dropout", "seed")  # searched as numbers; hidden as shapes
SPACE_KEYS = ("lr", "weight_decay", "momentum", "dropout", "hidden", "seed")


def optuna():
    """The optuna module, or a ConfigError saying how to install it."""
    try:
        import optuna as o
    except ImportError:
        raise ConfigError("fastnn sweep needs Optuna: pip install 'fastnn[sweep]'") from None
    o.logging.set_verbosity(o.logging.WARNING)
    return o


def parse_space(name: str, text: str, kind=float):
    """``"0.1"`` -> [0.1]; ``"0.01,0.1"`` -> [0.01, 0.1]; ``"1e-4..1e-2"`` -> (1e-4, 1e-2). ConfigError if bad."""
    text = str(text).strip()
    try:
        if ".." in text:
            lo, hi = (kind(t) for t in text.split(".."))
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ValueError
            return (lo, hi)
        values = [kind(t) for t in text.split(",") if t.strip()]
        if not values or not all(math.isfinite(v) for v in values):
            raise ValueError
        return values
    except ValueError:
        raise ConfigError(f"--{name.replace('_', '-')} {text!r}: expected a value (0.1), choices (0.01,0.1) "
                          "or a range (1e-4..1e-2)") from None


@dataclass
class SearchSpace:
    """Per hyperparameter: a list of choices or a (low, high) range; hidden: a list of shapes."""

    lr: list | tuple
    weight_decay: list | tuple = field(default_factory=lambda: [DEFAULTS.weight_decay])
    momentum: list | tuple = field(default_factory=lambda: [DEFAULTS.momentum])
    dropout: list | tuple = field(default_factory=lambda: [DEFAULTS.dropout])
    seed: list = field(default_factory=lambda: [DEFAULTS.seed])
    hidden: list = field(default_factory=lambda: [list(DEFAULTS.hidden)])

    def check(self) -> None:
        """ConfigError naming the flag of a value that breaks its rule (``config.RULES``)."""
        for name in SCALARS:
            bad = [v for v in getattr(self, name) if not RULES[name].holds(v)]
            if bad:
                raise ConfigError(f"--{name.replace('_', '-')}: {bad[0]} is out of range ({RULES[name].text})")
        if not self.hidden:
            raise ConfigError("--hidden: give at least one shape")

    def distributions(self) -> dict:
        """The Optuna distributions of this space (hidden shapes as the strings "256,128")."""
        o = optuna()
        out = {}
        for name in SCALARS:
            v = getattr(self, name)
            if isinstance(v, tuple):
                if name == "seed":
                    out[name] = o.distributions.IntDistribution(int(v[0]), int(v[1]))
                else:
                    out[name] = o.distributions.FloatDistribution(v[0], v[1], log=name in LOG_SCALE and v[0] > 0)
            else:
                out[name] = o.distributions.CategoricalDistribution(list(v))
        out["hidden"] = o.distributions.CategoricalDistribution([shape_text(h) for h in self.hidden])
        return out

    def grid(self) -> dict:
        """The grid of a space made only of choices; ConfigError for a range."""
        ranges = [k for k in SCALARS if isinstance(getattr(self, k), tuple)]
        if ranges:
            raise ConfigError(f"--sampler grid needs lists of values, not ranges (--{ranges[0].replace('_', '-')})")
        g = {k: list(getattr(self, k)) for k in SCALARS}
        g["hidden"] = [shape_text(h) for h in self.hidden]
        return g


def shape_text(hidden) -> str:
    return ",".join(str(int(n)) for n in hidden)


def check_space(study, space: SearchSpace, where: str | None = None) -> None:
    """ConfigError saying what changed when ``space`` is not the one the study's trials were searched
    over (Optuna refuses other choices deep in ``ask``, and would mix other ranges into one study).
    Each hyperparameter is compared with the first trial that has it, as Optuna's storages compare."""
    recorded: dict = {}
    for t in study.get_trials(deepcopy=False):
        for name, dist in t.distributions.items():
            recorded.setdefault(name, dist)
    new = space.distributions()
    changed = [k for k in SPACE_KEYS if k in recorded and recorded[k] != new[k]]
    if not changed:
        return
    head = f"{where}: its study" if where else "study"
    was = " and ".join(f"{_flag(k)} {_dist_text(recorded[k], k)}" for k in changed)
    now = " and ".join(f"{_flag(k)} {_dist_text(new[k], k)}" for k in changed)
    if was == now:  # alike as flags, other as distributions (a study of another fastnn, or another program)
        was, now = (" and ".join(f"{_flag(k)} {d[k]!r}" for k in changed) for d in (recorded, new))
    order = any(_choices(recorded[k]) is not None and _choices(recorded[k]) == _choices(new[k]) for k in changed)
    raise ConfigError(f"{head} {study.study_name!r} was searched over {was}; this run asks for {now}"
                      f"{' (choices in another order are another space)' if order else ''}: use a new --out or "
                      "--study NAME to start a new study, or give the same space to continue it")


def _flag(name: str) -> str:
    return "--seeds" if name == "seed" else f"--{name.replace('_', '-')}"


def _dist_text(dist, name: str) -> str:
    """An Optuna distribution as the flag's text: ``1e-4..1e-2``, ``0,0.1``, ``256,128 128,64``."""
    if _choices(dist) is None:
        return f"{_num(dist.low)}..{_num(dist.high)}"
    return (" " if name == "hidden" else ",").join(map(_num, dist.choices))


def _choices(dist) -> list | None:
    choices = getattr(dist, "choices", None)
    return None if choices is None else sorted(map(str, choices))


def _num(v) -> str:
    """A number as short as it reads back exactly (``0.0003``, ``1e-05``, ``0``); text as it is."""
    if isinstance(v, float):
        return f"{v:g}" if float(f"{v:g}") == v else repr(v)
    return str(v)
