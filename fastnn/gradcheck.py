"""Gradient checking by float64 central differences, for fastnn and for your own code."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import ConfigError


@dataclass
class GradReport:
    """Result of a gradient check.

    rel_errors: per parameter array, ``|analytic - numeric| / (|analytic| + |numeric|)``
    over the checked entries (vector norms); max_rel_error: the largest of them;
    worst: per array, ``(index, analytic, numeric)`` of the entry with the largest
    absolute difference.
    """

    rel_errors: list[float]
    worst: list[tuple]
    checked: list[int] = field(default_factory=list)

    @property
    def max_rel_error(self) -> float:
        return max(self.rel_errors) if self.rel_errors else 0.0

    def __str__(self) -> str:
        lines = [f"max relative error {self.max_rel_error:.3e}"]
        for i, (err, (idx, a, n), k) in enumerate(zip(self.rel_errors, self.worst, self.checked)):
            lines.append(f"  array {i}: rel error {err:.3e} over {k} entries; worst at {idx}: "
                         f"analytic {a:.6e}, numeric {n:.6e}")
        return "\n".join(lines)


def check_gradients(loss_fn, grad_fn, params, eps=1e-6, max_entries=None, seed=0) -> GradReport:
    """Compare ``grad_fn(params)`` with central differences of ``loss_fn(params)``.

    loss_fn(params) -> float and grad_fn(params) -> list of arrays take a list of
    NumPy arrays (your weights); they are evaluated in float64 on copies, so
    your arrays are left as they were. max_entries: check at most this many
    randomly chosen entries per array (all of them when None).
    """
    params = [np.array(p, dtype=np.float64) for p in params]
    analytic = [np.asarray(g, dtype=np.float64) for g in grad_fn([p.copy() for p in params])]
    if len(analytic) != len(params):
        raise ConfigError(f"grad_fn returned {len(analytic)} arrays for {len(params)} parameters")
    rng = np.random.default_rng(seed)
    errors, worst, checked = [], [], []
    for i, (p, g) in enumerate(zip(params, analytic)):
        if g.shape != p.shape:
            raise ConfigError(f"gradient {i} has shape {g.shape}, parameter has {p.shape}")
        flat = np.arange(p.size)
        if max_entries is not None and p.size > max_entries:
            flat = rng.choice(p.size, max_entries, replace=False)
        num = np.empty(len(flat))
        for j, k in enumerate(flat):
            idx = np.unravel_index(k, p.shape)
            orig = p[idx]
            p[idx] = orig + eps
            up = float(loss_fn(params))
            p[idx] = orig - eps
            down = float(loss_fn(params))
            p[idx] = orig
            num[j] = (up - down) / (2 * eps)
        ana = g.reshape(-1)[flat]
        denom = np.linalg.norm(ana) + np.linalg.norm(num)
        errors.append(float(np.linalg.norm(ana - num) / denom) if denom > 0 else 0.0)
        w = int(np.argmax(np.abs(ana - num)))
        where = tuple(int(i) for i in np.unravel_index(flat[w], p.shape))
        worst.append((where, float(ana[w]), float(num[w])))
        checked.append(len(flat))
    return GradReport(errors, worst, checked)


def gradcheck(model, x, y, eps=1e-6, max_entries=50, seed=0) -> GradReport:
    """Check a model's backward pass against float64 central differences on (x, y).

    A float64 copy of the model (same weights, CPU) is used, so a float32 or GPU
    model can be checked too.
    """
    ref = model.clone(device="cpu", dtype="float64")

    def loss_fn(params):
        ref.set_params(params)
        return ref.gradients(x, y)[0]

    def grad_fn(params):
        ref.set_params(params)
        return ref.gradients(x, y)[1]

    return check_gradients(loss_fn, grad_fn, model.get_params(), eps, max_entries, seed)
