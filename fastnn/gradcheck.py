"""Gradient checking by float64 central differences, for fastnn and for your own code.

For a fastnn model every parameter array is checked, conv weights and biases included; pooling
layers have no parameters, and their backward pass is checked through the gradients of the
layers below them. ``param_names`` names each array by its layer, ``fault_layers`` says which
layers' backward pass a mismatch points to, and ``off_kink_rows`` picks the samples where the
loss is differentiable (no relu unit at its kink, no max-pooling window with a near tie).
"""

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
    names: list[str] = field(default_factory=list)  # per array, e.g. "layer 1 (conv4k5) weights"; may be empty

    @property
    def max_rel_error(self) -> float:
        return max(self.rel_errors) if self.rel_errors else 0.0

    def __str__(self) -> str:
        lines = [f"max relative error {self.max_rel_error:.3e}"]
        for i, (err, (idx, a, n), k) in enumerate(zip(self.rel_errors, self.worst, self.checked)):
            name = f" ({self.names[i]})" if i < len(self.names) else ""
            lines.append(f"  array {i}{name}: rel error {err:.3e} over {k} entries; worst at {idx}: "
                         f"analytic {a:.6e}, numeric {n:.6e}")
        return "\n".join(lines)


def check_gradients(loss_fn, grad_fn, params, eps=1e-6, max_entries=None, seed=0, names=None) -> GradReport:
    """Compare ``grad_fn(params)`` with central differences of ``loss_fn(params)``.

    loss_fn(params) -> float and grad_fn(params) -> list of arrays take a list of
    NumPy arrays (your weights); they are evaluated in float64 on copies, so
    your arrays are left as they were. max_entries: check at most this many
    randomly chosen entries per array (all of them when None). names: one label per array,
    kept in the report.
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
    return GradReport(errors, worst, checked, list(names or []))


def gradcheck(model, x, y, eps=1e-6, max_entries=50, seed=0) -> GradReport:
    """Check a model's backward pass against float64 central differences on (x, y).

    x (N, D) inputs, y (N,) labels. A float64 copy of the model (same weights, CPU) is used, so a
    float32 or GPU model can be checked too. The report names each array (``param_names``).
    """
    ref = model.clone(device="cpu", dtype="float64")

    def loss_fn(params):
        ref.set_params(params)
        return ref.gradients(x, y)[0]

    def grad_fn(params):
        ref.set_params(params)
        return ref.gradients(x, y)[1]

    return check_gradients(loss_fn, grad_fn, model.get_params(), eps, max_entries, seed, param_names(model))


# ------------------------------------------------------ fastnn models: names, layers, samples
GRAD_ROWS = 8  # the samples the doctor's gradient check uses
# relu pre-activations within KINK_BAND x (1 + the largest |input|) of 0 are at relu's kink for the check: its
# step of 1e-6 in a weight moves a pre-activation by up to 1e-6 x its inputs (more through the layers after it),
# and a unit crossing 0 inside the step is measured at slope 1/2 where backpropagation uses 0 or 1 (100x margin).
# The same band applies to max pooling: a window whose two largest inputs are this close may swap its max
# inside the step, where backpropagation sends the whole gradient to one of them.
KINK_BAND = 1e-4
OUTPUT_CHUNK = 256  # layer_outputs runs the forward pass this many rows at a time (a conv net's patch buffers)


def layer_label(model, l: int) -> str:
    """Layer l (0-based, pooling layers counted) as the doctor names it: "layer 2 (pool2)"."""
    return f"layer {l + 1} ({model.layers[l].token()})"


def param_layers(model) -> list[int]:
    """The index of the layer of each of ``get_params``'s arrays [W1, b1, ...] (pooling layers have none)."""
    return [l for l, layer in enumerate(model.layers) if layer.kind != "pool" for _ in range(2)]


def param_names(model) -> list[str]:
    """One name per parameter array, in ``get_params`` order: "layer 1 (conv4k5) weights", "... biases"."""
    return [f"{layer_label(model, l)} {'biases' if i % 2 else 'weights'}" for i, l in enumerate(param_layers(model))]


def fault_layers(model, bad) -> list[int]:
    """The layers whose backward pass a mismatch points to, from ``bad`` (one bool per parameter array).

    Backpropagation runs from the output down, so the topmost layer T with a wrong gradient holds the fault,
    or the gradient handed down to it is wrong: by T's own parameter gradients, or on the way from the next
    layer with parameters above it (its input gradient, the pooling layers and activations in between),
    whose own gradients agree. Returns those layer indices (0-based), T first; [] when nothing is bad."""
    owners = param_layers(model)
    top = max((l for l, b in zip(owners, bad) if b), default=None)
    if top is None:
        return []
    above = min((l for l in owners if l > top), default=top)
    return list(range(top, above + 1))


def effective_inputs(model, x) -> np.ndarray:
    """What the network sees (float64): uint8 pixels after the model's preprocessing, floats as given."""
    return model.preprocessing.network_inputs(x, np.float64)


def layer_outputs(model, x) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The model's own forward pass on a float64 CPU clone, for inputs x (N, D).

    Returns ``(zs, acts)``: per layer, the pre-activations and the activations, each (N, n_{l+1})
    float64 for a dense layer, (N, H, W, C) for a convolution (z: the convolution plus bias) and
    pooling (z: its output, which has no activation).
    """
    ref = model.clone(device="cpu", dtype="float64")
    parts = [_outputs(ref, effective_inputs(model, x[s:s + OUTPUT_CHUNK])) for s in range(0, len(x), OUTPUT_CHUNK)]
    zs = [np.concatenate(z) for z in zip(*(p[0] for p in parts))]
    acts = [np.concatenate(a) for a in zip(*(p[1] for p in parts))]
    return zs, acts


def _outputs(ref, xs) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``layer_outputs`` of the float64 CPU model ``ref`` on network inputs xs (B, D)."""
    B = len(xs)
    ws = ref.workspace(B)
    ws.x[...] = xs
    ref.forward(ws)
    acts, zs = [a.copy() for a in ws.acts], []
    for l, (layer, a) in enumerate(zip(ref.layers, [ws.x] + acts[:-1])):
        if layer.kind == "pool":
            zs.append(acts[l])
        elif layer.kind == "conv":
            zs.append(np.empty_like(acts[l]))
            ref.ops.conv_act(a.reshape((B, *layer.shape_in)), ref.W[l], ref.b[l], ws.cols[l], zs[-1], "linear",
                             layer.pad)
        else:
            zs.append(a.reshape(B, -1) @ ref.W[l] + ref.b[l])
    return zs, acts


def pool_near_ties(a, p: int, band: float, relu: bool) -> np.ndarray:
    """(N,) bool: samples of a (N, H, W, C), a p x p max pooling's input, with a window whose two largest
    values are within ``band``; windows of relu outputs all exactly 0 (every unit off, its gradient 0
    both ways) do not count."""
    N, H, W, C = a.shape
    Ho, Wo = H // p, W // p
    if p == 1:  # one value per window: no ties
        return np.zeros(N, bool)
    win = a[:, :Ho * p, :Wo * p].reshape(N, Ho, p, Wo, p, C).transpose(0, 1, 3, 5, 2, 4).reshape(N, -1, p * p)
    top2 = np.sort(win, axis=-1)[..., -2:]
    tie = top2[..., 1] - top2[..., 0] <= band
    if relu:
        tie &= top2[..., 1] != 0
    return tie.any(axis=1)


def off_kink_rows(model, x) -> np.ndarray:
    """Up to GRAD_ROWS indices of rows of x (N, D) where the loss is differentiable for the check: every
    relu pre-activation off relu's kink at 0 by more than a central difference's step moves it (KINK_BAND),
    and no max-pooling window above a layer with parameters with a near tie. Healthy data: the first rows;
    all-zero inputs: none."""
    zs, acts = layer_outputs(model, x)
    band = KINK_BAND * (1.0 + float(np.abs(effective_inputs(model, x)).max(initial=0.0)))
    ok = np.ones(len(x), bool)
    for l, (layer, z, act) in enumerate(zip(model.layers, zs, model.layer_activations)):
        if act == "relu":
            ok &= (np.abs(z) > band).reshape(len(x), -1).all(axis=1)
        if layer.kind == "pool" and l > 0:  # ties of the raw inputs move with no parameter
            ok &= ~pool_near_ties(acts[l - 1], layer.k, band, model.layer_activations[l - 1] == "relu")
    return np.flatnonzero(ok)[:GRAD_ROWS]
