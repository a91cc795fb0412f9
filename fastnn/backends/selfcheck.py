"""The GPU self-check: every fused kernel of the GPU backend against the generic CuPy path, once.

When a process first asks for the GPU (``get_ops("gpu")``), each public method ``CupyOps`` overrides from
``Ops`` (its CUDA kernels, stacked forms and conv nets' kernels included) runs small problems with ragged
tiles (batch 1, sizes no multiple of the GEMM tile 16, tile-aligned ones) against the generic ``Ops`` on the
device. Inputs are multiples of 1/8, so products and sums are exact in any order (or TF32): ``TOLERANCES``
covers transcendental functions and the optimizers' arithmetic. A kernel that differs by more (or raises)
gets a RuntimeWarning naming it and its error, and the generic method replaces it for the run (``ops.<name>``).
Results are kept per process and device, and in a JSON file under ``cache_dir()`` keyed by the device's name,
driver, CUDA runtime, CuPy and fastnn versions, GEMM mode and a hash of the CUDA sources (none where the device
has no name). ``FASTNN_SELFCHECK=0`` skips the check; ``run(ops)`` checks afresh (nothing cached or replaced)
and ``table(results)`` formats results, for ``fastnn doctor --device gpu``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import tempfile
import time
import types
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .ops import Dropout, Ops

__all__ = ["TOLERANCES", "Result", "apply", "cache_dir", "check_once", "fused_kernels", "run", "table"]

# (rtol, atol) per dtype: a kernel passes where |got - want| <= atol + rtol * |want| for every element
TOLERANCES = {"float32": (1e-5, 1e-6), "float64": (1e-12, 1e-12)}
DTYPES = ("float32", "float64")
NOT_KERNELS = ("to_host", "synchronize", "scratch")  # overridden, but a copy, a wait, a buffer: nothing to compare
FORMAT = 1  # of the cache file
LAYERS = ((1, 17, 10), (37, 33, 32), (32, 16, 48))  # (batch, fan_in, fan_out): batch 1, ragged, tile-aligned
MODELS = 3  # the stacked forms: three models at once
_DONE: dict[str, list] = {}  # key (device and versions) -> results, for this process


class Result(NamedTuple):
    """One kernel at one dtype: the largest absolute and relative (``|got - want| / max(|want|, atol / rtol)``)
    errors; ``case``: the worst case against the tolerance (or the one that raised). ok: True, False (replaced by
    the generic path), or None: the generic path raised (kept)."""

    kernel: str
    dtype: str
    max_abs: float
    max_rel: float
    ok: bool | None
    case: str


class Case(NamedTuple):
    label: str
    inputs: dict  # host arrays, uploaded afresh for each of the two implementations
    call: Callable  # call(method, device arrays)
    outputs: tuple  # the names of the arrays compared afterwards


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
    return Dropout(np.array([0.0, 0.2, 0.5]).reshape(-1, 1, 1), np.array([5, 2 ** 31 + 7, 11], np.uint32).reshape(
        -1, 1, 1), a["step"], 1) if stacked else Dropout(0.3, 2 ** 31 + 5, a["step"], 1)


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
        cases += [Case(f"{b}x{m}x{n} {act}", x, lambda f, a, act=act: f(a["a"], a["W"], a["b"], a["out"], act),
                       ("out",)) for act in _acts((b, m, n))] + [Case(f"{b}x{m}x{n} tanh dropout", x, lambda f, a: f(
                           a["a"], a["W"], a["b"], a["out"], "tanh", _drop(a, False)), ("out",))]
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
        cases += [Case(f"{name} {act}", x, lambda f, a, act=act: f(a["d"], a["W"], a["a"], a["out"], act), ("out",))
                  for act in (_acts((b, m, n)) if k is None else ("relu",))]
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
    """bias_act's or act_backward's cases: each layer's output shape, every activation, dropout, a stack's."""
    second, acts = "b" if name == "bias_act" else "a", ("relu", "sigmoid", "tanh", "linear")

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
    """xent's or mse's cases: batch 1, 37, 300 (over a block's threads), no gradient, weights, stacks' labels."""
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
    """sgd's, momentum's or adam's cases: 1037 values (no multiple of a block's 256 threads), a stack's (3, 345)
    arena with one value of each hyperparameter or (K, 1) arrays of one per model; weight decay or none."""
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


# ------------------------------------------------------------------- running
def fused_kernels(cls) -> list[str]:
    """The public methods of ``cls`` (``CupyOps``) that override the generic ``Ops``: its own kernels."""
    return sorted(n for n in dir(Ops) if not n.startswith("_") and n not in NOT_KERNELS
                  and callable(getattr(Ops, n)) and getattr(cls, n, None) is not getattr(Ops, n))


def _outputs(ops, method, case: Case) -> dict:
    """Run ``method`` on fresh device copies of the case's inputs; its outputs, on the host."""
    arrays = {k: ops.xp.asarray(v) for k, v in case.inputs.items()}
    case.call(method, arrays)
    return {k: ops.to_host(arrays[k]) for k in case.outputs}


def _compare(got, want, rtol: float, atol: float) -> tuple[float, float, float]:
    """(largest absolute, largest relative error, largest error / tolerance) of got against want; NaN against
    NaN and equal infinities are no error, anything else not finite an infinite one."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        return np.inf, np.inf, np.inf
    same = (got == want) | (np.isnan(got) & np.isnan(want))
    finite = np.isfinite(got) & np.isfinite(want)
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.where(same, 0.0, np.where(finite, np.abs(got - want), np.inf))
    size = np.where(finite, np.abs(want), 0.0)
    rel, ratio = diff / np.maximum(size, atol / rtol), diff / (atol + rtol * size)
    return float(diff.max(initial=0.0)), float(rel.max(initial=0.0)), float(ratio.max(initial=0.0))


def _check_kernel(ops, ref: Ops, name: str, dtype: str) -> Result:
    """One fused kernel at one dtype over all its cases, against the same method of ``ref``."""
    rtol, atol = TOLERANCES[dtype]
    build = CASES.get(name)
    if build is None:
        return Result(name, dtype, np.inf, np.inf, False, "no self-check case for this kernel (selfcheck.CASES)")
    fused, generic = types.MethodType(getattr(type(ops), name), ops), getattr(ref, name)
    rng = np.random.default_rng([zlib.crc32(name.encode()), DTYPES.index(dtype)])
    worst, max_abs, max_rel, where = 0.0, 0.0, 0.0, ""
    for case in build(np.dtype(dtype), rng):
        for side, method in (("kernel", fused), ("generic path", generic)):
            try:
                out = _outputs(ops, method, case)
            except Exception as exc:  # the kernel's launch failed (not to be trusted), or the reference's
                text = " ".join(f"{case.label}: the {side} raised {type(exc).__name__}: {exc}".split())
                return Result(name, dtype, np.inf, np.inf, False if side == "kernel" else None,
                              text.replace("|", "/")[:300])
            if side == "kernel":
                got = out
        for k in case.outputs:
            a, r, q = _compare(got[k], out[k], rtol, atol)
            max_abs, max_rel = max(max_abs, a), max(max_rel, r)
            if q > worst or not where:
                worst, where = q, f"{case.label}: {k}"
    return Result(name, dtype, max_abs, max_rel, worst <= 1.0, where)


def run(ops, dtypes=DTYPES, kernels=None) -> list[Result]:
    """Check each fused kernel of ``ops`` (a ``CupyOps``; or those named in ``kernels``) at each dtype, nothing
    cached or replaced (``check_once`` does that); the class's kernels, even where ``ops`` runs the generic path."""
    ref = Ops(ops.xp)
    ref.to_host = ops.to_host  # the generic to_host reads host arrays only
    names = [n for n in fused_kernels(type(ops)) if kernels is None or n in kernels]
    with np.errstate(all="ignore"):
        return [_check_kernel(ops, ref, name, dt) for dt in dtypes for name in names]


def table(results) -> str:
    """The results as a Markdown table, with the tolerances and a last line counting the failures."""
    lines = ["| kernel | dtype | max abs error | max rel error | tolerance (rtol, atol) | result | worst case |",
             "| --- | --- | ---: | ---: | --- | --- | --- |"]
    for r in results:
        rtol, atol = TOLERANCES.get(r.dtype, (np.nan, np.nan))
        verdict = {True: "ok", False: "FAILED: the generic path runs instead"}.get(r.ok, "UNCHECKED: kept")
        lines.append(f"| {r.kernel} | {r.dtype} | {r.max_abs:.3g} | {r.max_rel:.3g} | {rtol:g}, {atol:g} | {verdict} "
                     f"| {r.case if r.max_abs else '(all exact)'} |")
    bad = sorted({r.kernel for r in results if r.ok is False})
    lines += ["", f"{sum(r.ok is True for r in results)} of {len(results)} checks passed"
              + (f"; replaced by the generic path: {', '.join(bad)}" if bad else "")]
    return "\n".join(lines)


def apply(ops, results) -> list[str]:
    """Replace each kernel that failed by the generic method for ``ops``, with a RuntimeWarning; their names."""
    failed: dict[str, list[Result]] = {}
    for r in results:
        if r.ok is False and callable(getattr(Ops, r.kernel, None)):
            failed.setdefault(r.kernel, []).append(r)
    for name, rs in failed.items():
        if name in vars(ops):  # replaced already
            continue
        setattr(ops, name, types.MethodType(getattr(Ops, name), ops))
        detail = "; ".join(f"{r.dtype}: max abs error {r.max_abs:.3g}, max rel error {r.max_rel:.3g} ({r.case})"
                           for r in rs)
        warnings.warn(f"GPU self-check: fastnn's CUDA kernel {name} differs from the generic CuPy path beyond the "
                      f"tolerance ({detail}); {name} runs the generic path in this process", RuntimeWarning,
                      stacklevel=4)
    return list(failed)


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/fastnn/gpu-selfcheck`` (``~/.cache/fastnn/gpu-selfcheck``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastnn" / "gpu-selfcheck"


@functools.lru_cache(maxsize=8)
def _kernels_hash(files: tuple) -> str:
    """A hash of the CUDA source files of ``files``, (path, mtime) pairs (``CupyOps``'s module's ``SOURCES``)."""
    return hashlib.sha256(b"".join(Path(path).read_bytes() for path, _ in files)).hexdigest()[:16]


def device_key(ops) -> dict:
    """What the results depend on: device, driver, runtime, CuPy, fastnn, GEMM mode, CUDA sources (or None)."""
    rt = getattr(getattr(ops.xp, "cuda", None), "runtime", None)
    key = {"format": FORMAT, "device_index": 0, "device": None, "driver": None, "runtime": None,
           "cupy": getattr(ops.xp, "__version__", None),
           "fastnn": getattr(sys.modules.get("fastnn"), "__version__", None),
           "gemm": getattr(ops, "gemm", None), "kernels": None}
    module = sys.modules.get(type(ops).__module__)
    sources = [getattr(module, name, None) for name in getattr(module, "SOURCES", ("KERNELS_CU",))]
    for field, read in (("device_index", "getDevice"), ("driver", "driverGetVersion"),
                        ("runtime", "runtimeGetVersion")):
        try:
            key[field] = int(getattr(rt, read)())
        except Exception:  # a runtime without it (the CPU emulator), or a driver that cannot say
            pass
    try:
        key["kernels"] = _kernels_hash(tuple((str(p), Path(p).stat().st_mtime_ns) for p in sources))
        name = rt.getDeviceProperties(key["device_index"])["name"]
        key["device"] = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
    except Exception:  # no source file, or no device name (the emulator): no cache file either
        pass
    return key


def _cache_file(key: dict) -> Path:
    return cache_dir() / f"{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]}.json"


def _load(key: dict) -> list[Result] | None:
    try:
        data = json.loads(_cache_file(key).read_text())
        return [Result(**r) for r in data["results"]] if data.get("key") == key else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # none yet, or unreadable: check again


def _save(key: dict, results: list[Result], seconds: float) -> None:
    """Write the results atomically (a file renamed); not where a side raised (perhaps as memory ran out)."""
    if any(" raised " in r.case for r in results):
        return
    path = _cache_file(key)
    data = {"key": key, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": round(seconds, 3),
            "tolerances": TOLERANCES, "results": [r._asdict() for r in results]}
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except OSError:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def check_once(ops) -> list[Result] | None:
    """The self-check of ``ops`` once per process and device (and GEMM mode): this process's results, else the
    cache file's, else ``run(ops)``'s (saved); failed kernels replaced (``apply``). None if FASTNN_SELFCHECK=0."""
    if os.environ.get("FASTNN_SELFCHECK", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    key = device_key(ops)
    memo = json.dumps(key, sort_keys=True)
    results = _DONE.get(memo)
    if results is None:
        results = _DONE[memo] = _results(ops, key)
    apply(ops, results)
    return results


def _results(ops, key: dict) -> list[Result]:
    """The results for this device: its cache file's, else ``run``'s (then saved)."""
    disk = {k: v for k, v in key.items() if k != "device_index"}  # the same for every device of that name
    results = _load(disk) if key["device"] else None
    if results is not None:
        return results
    t0 = time.perf_counter()
    try:
        results = run(ops)
    except Exception as exc:  # the check's own failure must not stop a run: say so, once
        warnings.warn(f"GPU self-check could not run ({type(exc).__name__}: {exc}); fastnn's CUDA kernels run "
                      "unchecked", RuntimeWarning, stacklevel=4)
        return []
    if key["device"]:
        _save(disk, results, time.perf_counter() - t0)
    for r in results:
        if r.ok is None:
            warnings.warn(f"GPU self-check: kernel {r.kernel} ({r.dtype}) unchecked: {r.case}", RuntimeWarning,
                          stacklevel=4)
    return results
