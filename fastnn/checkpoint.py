"""Checkpoints that survive a crash: full training state, written atomically.

A checkpoint is ``<dir>/ckpt-epoch-NNNN.npz`` holding the parameter arena, the
optimizer state, the epoch, the NumPy RNG state, the run's configuration and
its history. Each is written to a temporary file, fsynced and renamed into
place (``npzfile``); the previous checkpoint is deleted only after
the new one is complete, so a crash or SIGKILL at any moment leaves at least
one loadable checkpoint. ``load_latest`` skips corrupt files with a warning.

A checkpoint never holds NaN or infinite weights: ``save_checkpoint`` refuses them
(DivergedError) and ``read_checkpoint`` rejects a file that has them. ``restore`` puts a
checkpoint only into a network of its architecture (``ARCHITECTURE``: the keys of
``MLP.config()`` that decide what the weights compute), not merely one of its size.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from . import npzfile
from .errors import DataError, DivergedError
from .guards import DIVERGED, describe_nonfinite, nonfinite_params
from .model import MLP
from .optim import Optimizer

PATTERN = re.compile(r"^ckpt-epoch-(\d{4,})\.npz$")
KEEP = 2
# The keys of MLP.config() a checkpoint's network must share with the network it is put into.
ARCHITECTURE = ("sizes", "activation", "loss", "dtype", "dropout", "input_scale", "input_shift", "pixel_max",
                "classes", "layers", "image_shape", "translate")


def checkpoint_files(folder) -> list[Path]:
    """Checkpoint files in ``folder``, newest epoch first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := PATTERN.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def remove_orphans(folder) -> list[Path]:
    """Delete the temporary files that runs killed while writing a checkpoint left in ``folder``."""
    orphans = list(Path(folder).glob(".tmp-*.npz"))
    for p in orphans:
        p.unlink(missing_ok=True)
    return orphans


def save_checkpoint(folder, model: MLP, opt: Optimizer, epoch: int, rng: np.random.Generator,
                    config: dict, history: list) -> Path:
    """Write the full state after ``epoch``; keep the newest ``KEEP`` checkpoints.

    DivergedError (with ``history``), and nothing written, when the weights or the optimizer
    state hold NaN or infinite values: the newest checkpoint stays the last good one.
    """
    folder = Path(folder)
    arrays = {"params": model.ops.to_host(model.params), "model_step": model.ops.to_host(model.step)}
    arrays.update({f"opt_{k}": v for k, v in opt.state_dict().items()})
    bad = nonfinite_params(arrays["params"], model.sizes) + _nonfinite_state(arrays)
    if bad:
        raise DivergedError(f"after epoch {epoch}, {describe_nonfinite(bad)}: training diverged "
                            f"(no checkpoint written for epoch {epoch})", history)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"epoch": epoch, "rng": rng.bit_generator.state, "config": config,
            "model": model.config(), "history": history}
    path = folder / f"ckpt-epoch-{epoch:04d}.npz"
    npzfile.save(path, "fastnn-checkpoint", meta, arrays)
    for old in checkpoint_files(folder)[KEEP:]:
        old.unlink(missing_ok=True)
    return path


def read_checkpoint(path) -> dict:
    """Load one checkpoint file -> ``{"meta", "params", "opt"}``; DataError if unusable."""
    meta, arrays = npzfile.load(path, "fastnn-checkpoint", "checkpoint")
    try:
        params = arrays.pop("params")
        model_step = arrays.pop("model_step", None)
        opt = {k[4:]: v for k, v in arrays.items() if k.startswith("opt_")}
        if "steps" not in opt or params.ndim != 1:
            raise ValueError("incomplete state")
    except (KeyError, ValueError) as exc:
        raise DataError(f"{path}: not a valid checkpoint ({exc})") from None
    model = meta.get("model") if isinstance(meta.get("model"), dict) else {}
    try:
        bad = nonfinite_params(params, model.get("sizes") or []) + _nonfinite_state(arrays)
    except (ValueError, TypeError, OverflowError) as exc:
        raise DataError(f"{path}: not a valid checkpoint ({exc})") from None
    if bad:
        raise DataError(f"{path}: {describe_nonfinite(bad)}: {DIVERGED}")
    state = {"meta": meta, "params": params, "opt": opt, "path": Path(path)}
    if model_step is not None:
        if model_step.shape != (1,) or model_step.dtype.kind not in "iu":
            raise DataError(f"{path}: not a valid checkpoint (bad step counter)")
        state["model_step"] = model_step
    return state


def load_latest(folder, warn=print) -> dict:
    """The newest checkpoint in ``folder`` that loads; corrupt ones are reported and skipped."""
    files = checkpoint_files(folder)
    if not files:
        raise DataError(f"{folder}: no checkpoint found (expected ckpt-epoch-NNNN.npz files)")
    for path in files:
        try:
            return read_checkpoint(path)
        except DataError as exc:
            if path == files[-1]:
                raise DataError(f"{folder}: no usable checkpoint (the oldest: {exc})") from None
            warn(f"warning: {exc}; using the previous checkpoint")
    raise AssertionError("unreachable")  # pragma: no cover


def restore(state: dict, model: MLP, opt: Optimizer, rng: np.random.Generator) -> None:
    """Put a loaded checkpoint's parameters, optimizer state and RNG state back; DataError naming the
    file and the first ``ARCHITECTURE`` key where the checkpoint's network and ``model`` differ."""
    check_architecture(state, model)
    if state["params"].shape != model.params.shape:
        raise DataError(f"{state['path']}: the checkpoint's parameters do not fit this network")
    model.params[...] = model.ops.asarray(state["params"], model.dtype)
    if "model_step" in state:  # the dropout masks' counter (checkpoints before it had none)
        model.step[...] = model.ops.asarray(state["model_step"], np.int32)
    try:
        opt.load_state_dict(state["opt"])
    except KeyError as exc:
        raise DataError(f"{state['path']}: no optimizer state {exc} for {opt.name}") from None
    rng.bit_generator.state = state["meta"]["rng"]


def check_architecture(state: dict, model: MLP) -> None:
    """DataError naming the checkpoint file, the first ``ARCHITECTURE`` key where its network differs
    from ``model``, and both values (keys an older checkpoint lacks are not compared)."""
    stored = state["meta"].get("model")
    stored = stored if isinstance(stored, dict) else {}
    now = json.loads(json.dumps(model.config(), default=float))  # as the checkpoint stored it
    for key in ARCHITECTURE:
        if key in stored and stored[key] != now.get(key):
            raise DataError(f"{state['path']}: the checkpoint is of another network: {key} {_show(stored[key])} "
                            f"in the checkpoint, {_show(now.get(key))} in this run")


def _show(value) -> str:
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return "-".join(map(str, value))  # layer sizes as 784-256-128-10
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _nonfinite_state(arrays: dict) -> list[tuple[str, int]]:
    """``[(name, count)]`` of the optimizer-state arrays (``opt_*``) holding NaN or inf values."""
    bad = []
    for key, a in arrays.items():
        if key.startswith("opt_") and a.dtype.kind == "f":
            n = int(a.size - np.count_nonzero(np.isfinite(a)))
            if n:
                bad.append((f"the optimizer state {key[4:]}", n))
    return bad
