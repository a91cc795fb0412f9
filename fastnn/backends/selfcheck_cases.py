"""The GPU self-check's cases: for each kernel ``CupyOps`` overrides, small problems with ragged tiles
(batch 1, sizes no multiple of the GEMM tile 16, tile-aligned ones; a conv net's kernels on odd image
sizes, both paddings, pooling ties and rows no window reads), built from multiples of 1/8 so that the
GEMMs' products and sums are exact in any order. ``CASES[name](dtype, rng)`` gives a kernel's cases.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from .ops import Dropout, Ops

LAYERS = ((1, 17, 10), (37, 33, 32), (32, 16, 48))  # (batch, fan_in, fan_out): batch 1, ragged, tile-aligned
MODELS = 3  # the stacked forms: three models at once


class Case(NamedTuple):
    label: str
    inputs: dict  # host arrays, uploaded afresh for each of the two implementations
    call: Callable  # call(method, device arrays)
    outputs: tuple  # the names of the arrays compared afterwards


# ------------------------------------------------------------------- inputs
def _eighths(rng, shape, lo=-2.0, hi=2.0) -> np.ndarray:
    """Multiples of 1/8 in [lo, hi]: products and sums of a few dozen of them are exact floats."""
    return rng.integers(int(lo * 8), int(hi * 8) + 1, shape) / 8.0


def _distinct(rng, shape, scale=0.375, offset=-1.5) -> np.ndarray:
    """Rows of distinct multiples of 1/8 (no argmax ties), shape (..., C)."""
    rows = np.argsort(rng.random(shape), axis=-1) * scale + offset
    return rows + rng.integers(-4, 5, shape[:-1] + (1,)) / 8.0


def _nan(shape, dt) -> np.ndarray:
    """An output buffer: NaN (or -1), so an element a kernel forgets to write is a mismatch."""
    return np.full(shape, -1 if np.dtype(dt).kind == "i" else np.nan, dt)


def _drop(a, stacked: bool) -> Dropout:
    """Dropout of layer 1 at step 3 (one rate, or one per model: 0, 0.2 and 0.5)."""
    if stacked:
        return Dropout(np.array([0.0, 0.2, 0.5]).reshape(-1, 1, 1),
                       np.array([5, 2 ** 31 + 7, 11], np.uint32).reshape(-1, 1, 1), a["step"], 1)
    return Dropout(0.3, 2 ** 31 + 5, a["step"], 1)


STEP = {"step": np.array([3], np.int32)}


# ------------------------------------------------------------------- cases
def _acts(shape) -> tuple:
    """Every activation at the ragged layer shape, relu at the others (the tiles are the same for all)."""
    return ("relu", "sigmoid", "tanh", "linear") if shape == LAYERS[1] else ("relu",)


def _linear_act(dt, rng) -> list[Case]:
    cases = []
    for b, m, n in LAYERS:
        x = {"a": _eighths(rng, (b, m)).astype(dt), "W": _eighths(rng, (m, n)).astype(dt),
             "b": _eighths(rng, n).astype(dt), "out": _nan((b, n), dt), **STEP}
        for act in _acts((b, m, n)):
            cases.append(Case(f"{b}x{m}x{n} {act}", x, lambda f, a, act=act: f(a["a"], a["W"], a["b"], a["out"], act),
                              ("out",)))
        cases.append(Case(f"{b}x{m}x{n} tanh dropout", x,
                          lambda f, a: f(a["a"], a["W"], a["b"], a["out"], "tanh", _drop(a, False)), ("out",)))
    cases.append(Case(f"{cases[-1].label[:-8]} rowwise", cases[-1].inputs,
                      lambda f, a: f(a["a"], a["W"], a["b"], a["out"], "tanh", rowwise=True), ("out",)))
    b, m, n, k = *LAYERS[1], MODELS
    for shared in (True, False):  # a stack's weights and biases: views of one (K, P) arena, as the model has them
        x = {"a": _eighths(rng, (b, m) if shared else (k, b, m)).astype(dt), "wb": _eighths(rng, (k, m * n + n + 3))
             .astype(dt), "out": _nan((k, b, n), dt), **STEP}
        cases.append(Case(f"stack of {k}, {'shared' if shared else 'own'} input, sigmoid, dropout", x, lambda f, a: f(
            a["a"], *_views(a["wb"], m, n), a["out"], "sigmoid", _drop(a, True)), ("out",)))
    return cases


def _views(arena, m: int, n: int) -> tuple:
    """W (K, m, n) and b (K, 1, n): views of a stack's (K, P) arena (their models P values apart)."""
    return arena[:, :m * n].reshape(-1, m, n), arena[:, m * n:m * n + n].reshape(-1, 1, n)


def _input_grad(dt, rng) -> list[Case]:
    cases = []
    shapes = [(b, m, n, None) for b, m, n in LAYERS] + [(*LAYERS[1], MODELS)]
    for b, m, n, k in shapes:
        lead = () if k is None else (k,)
        x = {"d": _eighths(rng, lead + (b, n)).astype(dt), "W": _eighths(rng, lead + (m, n)).astype(dt),
             "a": _eighths(rng, lead + (b, m), 0.0, 0.875).astype(dt), "out": _nan(lead + (b, m), dt), **STEP}
        name = f"{b}x{m}x{n}" if k is None else f"stack of {k}, {b}x{m}x{n}"
        for act in _acts((b, m, n)) if k is None else ("relu",):
            cases.append(Case(f"{name} {act}", x, lambda f, a, act=act: f(a["d"], a["W"], a["a"], a["out"], act),
                              ("out",)))
        cases.append(Case(f"{name} tanh dropout", x, lambda f, a, s=k is not None: f(
            a["d"], a["W"], a["a"], a["out"], "tanh", _drop(a, s)), ("out",)))
    return cases


def _param_grads(dt, rng) -> list[Case]:
    cases = []
    for b, m, n in LAYERS:
        x = {"a": _eighths(rng, (b, m)).astype(dt), "d": _eighths(rng, (b, n)).astype(dt), "gW": _nan((m, n), dt),
             "gb": _nan(n, dt)}
        cases.append(Case(f"{b}x{m}x{n}", x, lambda f, a: f(a["a"], a["d"], a["gW"], a["gb"]), ("gW", "gb")))
    b, m, n, k = *LAYERS[1], MODELS
    for shared in (True, False):  # gW and gb: views of a stack's gradient arena; a stack's first layer: a shared input
        x = {"a": _eighths(rng, (b, m) if shared else (k, b, m)).astype(dt), "d": _eighths(rng, (k, b, n)).astype(dt),
             "g": _nan((k, m * n + n + 3), dt)}
        cases.append(Case(f"stack of {k}, {b}x{m}x{n}, {'shared' if shared else 'own'} input", x, lambda f, a: f(
            a["a"], a["d"], *_views(a["g"], m, n)), ("g",)))
    return cases


def _epilogue(name: str) -> Callable:
    """The cases of bias_act or act_backward: each layer's output shape, every activation, dropout,
    and a stack's (3, 2, 20) outputs with per-model dropout."""
    second = "b" if name == "bias_act" else "a"
    acts = ("relu", "sigmoid", "tanh", "linear")

    def cases(dt, rng) -> list[Case]:
        out = []
        for shape in [(b, n) for b, _, n in LAYERS] + [(MODELS, 2, 20)]:
            stacked = len(shape) == 3
            x = {"h": _eighths(rng, shape).astype(dt), "a": _eighths(rng, shape, 0.0, 0.875).astype(dt),
                 "b": _eighths(rng, (MODELS, 1, shape[-1]) if stacked else shape[-1]).astype(dt), **STEP}
            out += [Case(f"{shape} {act}", x, lambda f, a, act=act: f(a["h"], a[second], act), ("h",)) for act in acts]
            out.append(Case(f"{shape} tanh, dropout", x, lambda f, a, s=stacked: f(
                a["h"], a[second], "tanh", _drop(a, s)), ("h",)))
        return out

    return cases


def _gather_rows(dt, rng) -> list[Case]:
    cases = []
    for d, b, stacked in ((17, 1, False), (32, 37, False), (17, 37, True)):
        idx = rng.integers(0, 50, (MODELS, b) if stacked else b)
        for src in (rng.integers(0, 256, (50, d)).astype(np.uint8), _eighths(rng, (50, d)).astype(dt)):
            x = {"src": src, "idx": idx, "out": _nan(idx.shape + (d,), dt)}
            for scale, shift in ((1 / 255, 0.0), (2 / 255, -1.0)):
                cases.append(Case(f"{src.dtype} rows {idx.shape} of {d}, scale {scale:.3g} shift {shift}", x,
                                  lambda f, a, s=scale, t=shift: f(a["src"], a["idx"], a["out"], s, t), ("out",)))
    return cases


def _gather_labels(dt, rng) -> list[Case]:
    src = rng.integers(0, 10, 50).astype(np.int32)
    return [Case(f"labels {shape}", {"src": src, "idx": rng.integers(0, 50, shape), "out": _nan(shape, np.int32)},
                 lambda f, a: f(a["src"], a["idx"], a["out"]), ("out",)) for shape in ((1,), (37,), (MODELS, 37))]


def _loss(name: str) -> Callable:
    """The cases of xent or mse: batch 1, 37 and 300 (more rows than a block's threads), with and
    without the gradient, with per-sample weights, and stacks with shared or per-model labels."""

    def cases(dt, rng) -> list[Case]:
        out = []
        for b, c, k, own_labels in ((1, 10, None, False), (37, 10, None, False), (300, 7, None, False),
                                    (37, 10, MODELS, False), (37, 10, MODELS, True)):
            lead = () if k is None else (k,)
            z = _distinct(rng, lead + (b, c)) if name == "xent" else (_distinct(rng, lead + (b, c), 1.0, 1.0) / 16)
            y = rng.integers(0, c, lead + (b,) if own_labels else (b,)).astype(np.int32)
            x = {"z": z.astype(dt), "y": y, "grad": _nan(lead + (b, c), dt), "loss": _nan(k or 1, dt),
                 "hits": _nan(k or 1, np.int32), "w": _eighths(rng, b, 0.125, 2.0).astype(dt)}
            kind = f"{b}x{c}" if k is None else f"stack of {k}, {b}x{c}, {'own' if own_labels else 'shared'} labels"
            outs = ("grad", "loss", "hits")
            out += [Case(kind, x, lambda f, a: f(a["z"], a["y"], a["grad"], a["loss"], a["hits"]), outs),
                    Case(f"{kind}, no gradient", x, lambda f, a: f(a["z"], a["y"], None, a["loss"], a["hits"]),
                         ("loss", "hits")),
                    Case(f"{kind}, weighted", x, lambda f, a: f(a["z"], a["y"], a["grad"], a["loss"], a["hits"],
                                                                 a["w"]), outs)]
        return out

    return cases


def _probabilities(dt, rng) -> list[Case]:
    cases = []
    for loss in ("xent", "mse"):
        for shape in ((1, 10), (37, 10), (MODELS, 37, 10)):
            z = _distinct(rng, shape) if loss == "xent" else _distinct(rng, shape, 1.0, 1.0) / 16
            for pd in {np.dtype(dt), np.dtype(np.float64)}:
                cases.append(Case(f"{loss} {shape} into {pd}", {"z": z.astype(dt), "p": _nan(shape, pd)},
                                  lambda f, a, loss=loss: f(a["z"], loss, a["p"]), ("p",)))
    return cases


def _optimizer(name: str) -> Callable:
    """The cases of sgd, momentum or adam: a flat arena of 1037 values (no multiple of the 256
    threads of a block) and a stack's (3, 345) arena, with one value of each hyperparameter or
    (K, 1) arrays of one per model, with and without weight decay."""

    def cases(dt, rng) -> list[Case]:
        out = []
        for shape, per_model in (((1037,), False), ((MODELS, 345), True), ((MODELS, 345), False)):
            for wd in (0.0, 0.01):
                first = name == "adam" and not wd  # Adam's first step (t 0, no state yet); else t 1
                x = {"p": rng.standard_normal(shape).astype(dt), "g": rng.standard_normal(shape).astype(dt),
                     "m": rng.standard_normal(shape).astype(dt) * (not first), "v": rng.random(shape).astype(dt)
                     * (not first), "t": np.array([0 if first else 1], np.int32)}
                if per_model:  # device arrays (K, 1) in place of the floats
                    x.update({h: rng.uniform(lo, hi, (MODELS, 1)).astype(dt) for h, lo, hi in (
                        ("lr", 0.01, 0.1), ("mu", 0.5, 0.95), ("wd", wd, 2 * wd)) if h != "wd" or wd})
                out += _optimizer_cases(name, f"{shape}{' per-model values' if per_model else ''}, wd {wd}", x,
                                        {"lr": 0.05, "mu": 0.9, "wd": wd})
        return out

    return cases


def _optimizer_cases(name: str, label: str, x: dict, floats: dict) -> list[Case]:
    def h(a, key):
        return a[key] if key in a else floats[key]

    if name == "sgd":
        return [Case(label, x, lambda f, a: f(a["p"], a["g"], h(a, "lr"), h(a, "wd")), ("p",))]
    if name == "momentum":
        return [Case(f"{label}{', Nesterov' if nest else ''}", x, lambda f, a, nest=nest: f(
            a["p"], a["g"], a["v"], h(a, "lr"), h(a, "mu"), h(a, "wd"), nest), ("p", "v")) for nest in (False, True)]
    # betas 1 - 2^-3 and 1 - 2^-9: 1 - beta and beta^step (step 1, 2) are exact in float32, where the kernel and
    # the generic path round 0.9 and 0.999 differently (the kernel's corrections are in double)
    return [Case(f"{label}, t {int(x['t'][0])}", x, lambda f, a: f(a["p"], a["g"], a["m"], a["v"], a["t"], h(a, "lr"),
                                                                  0.875, 1 - 2 ** -9, 1e-8, h(a, "wd")),
                 ("p", "m", "v", "t"))]


CONVS = ((1, 5, 6, 1, 3, 3, 0), (3, 7, 6, 2, 17, 3, 1), (2, 6, 5, 3, 4, 5, 2))  # (B, H, W, C_in, C_out, k, pad)
IMAGE_CALLS = {  # call(method, arrays, pad or window or limit, activation), and the outputs compared
    "conv_act": (lambda f, a, p, act: f(a["x"], a["W"], a["b"], a["cols"], a["out"], act, p), ("out",)),
    "conv_param_grads": (lambda f, a, p, act: f(a["x"], a["cols"], a["d"], a["gW"], a["gb"], p), ("gW", "gb")),
    "conv_input_grad": (lambda f, a, p, act: f(a["d"], a["W"], a["cols"], a["gx"], p), ("gx",)),
    "maxpool": (lambda f, a, p, act: f(a["x"], p, a["out"], a["arg"]), ("out", "arg")),
    "maxpool_backward": (lambda f, a, p, act: f(a["d"], a["at"], p, a["gx"]), ("gx",)),
    "translate": (lambda f, a, p, act: f(a["x"], a["gx"], p, 2 ** 31 + 9, a["step"], -0.5), ("gx",))}


def _images(name: str) -> Callable:
    """A conv net kernel's cases on CONVS (halves in [-1, 1]: pooling ties; pooling k x k, some rows unread)."""
    (call, outputs), pool = IMAGE_CALLS[name], name.startswith("maxpool")

    def cases(dt, rng) -> list[Case]:
        out = []
        for bt, h, w, c, n, k, pad in CONVS:
            o = (bt, h // k, w // k, c) if pool else (bt, h + 2 * pad - k + 1, w + 2 * pad - k + 1, n)
            x = {"x": (rng.integers(-2, 3, (bt, h, w, c)) / 2).astype(dt), "gx": _nan((bt, h, w, c), dt), **STEP,
                 **{key: _eighths(rng, shape).astype(dt) for key, shape in (("W", (k * k * c, n)), ("b", n), ("d", o))},
                 "out": _nan(o, dt), "arg": _nan(o, np.int8), "gW": _nan((k * k * c, n), dt), "gb": _nan(n, dt),
                 "cols": np.zeros(o[:3] + (k, k, c), dt), "at": np.zeros((bt, h // k, w // k, c), np.int8)}
            Ops(np).im2col(x["x"], k, pad, x["cols"])  # what the generic paths read: the patches, the argmax
            Ops(np).maxpool(x["x"], k, np.empty(x["at"].shape, dt), x["at"])
            p = k if pool else k - 2 if name == "translate" else pad
            out += [Case(f"{bt}x{h}x{w}x{c} -> {o}, k {k}, pad {pad} {act}", x, lambda f, a, p=p, act=act: call(
                f, a, p, act), outputs) for act in (_acts(LAYERS[1]) if name == "conv_act" and c == 2 else ("relu",))]
        return out

    return cases


CASES: dict[str, Callable] = {
    "linear_act": _linear_act, "input_grad": _input_grad, "param_grads": _param_grads,
    "bias_act": _epilogue("bias_act"), "act_backward": _epilogue("act_backward"),
    "gather_rows": _gather_rows, "gather_labels": _gather_labels, "xent": _loss("xent"), "mse": _loss("mse"),
    "probabilities": _probabilities,
    "count": lambda dt, rng: [Case("t = 5", {"t": np.array([5], np.int32)}, lambda f, a: f(a["t"]), ("t",))],
    "sgd": _optimizer("sgd"), "momentum": _optimizer("momentum"), "adam": _optimizer("adam"),
    **{name: _images(name) for name in IMAGE_CALLS},
}
