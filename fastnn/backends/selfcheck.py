"""The GPU self-check: every fused kernel of the GPU backend against the generic CuPy path, once.

The first time a process asks for the GPU (``get_ops("gpu")``), each public method that ``CupyOps``
overrides from ``Ops`` (fastnn's own CUDA kernels: the layer GEMMs with their epilogues, bias +
activation, activation derivative, losses and probabilities, gathers, step counter and optimizer
updates, stacked forms included, and a conv net's convolutions, pooling and shifts) runs on the
small problems of ``selfcheck_cases.CASES``, compared with the same method of the generic ``Ops``
on the same device (CuPy's own matmul and elementwise kernels). The inputs are multiples of 1/8,
so the GEMMs' products and sums are exact whatever the summation order (or TF32): ``TOLERANCES``
covers only the transcendental functions and the optimizers' arithmetic. A kernel that differs by
more (or raises) gets a RuntimeWarning naming it and its error, and is replaced for the run by the
generic method (an instance attribute ``ops.<name>``): an error that only real hardware shows
never gives a silently wrong model.

The results are kept per process and device, and in a JSON file under ``cache_dir()``
(``$XDG_CACHE_HOME/fastnn/gpu-selfcheck/``, ``~/.cache/...``) keyed by the device's name, the
driver, CUDA runtime, CuPy and fastnn versions, the GEMM mode and a hash of the CUDA sources (none
where the device has no name). ``FASTNN_SELFCHECK=0`` skips the check. ``run(ops)`` checks afresh
(no cache, nothing replaced) and ``table(results)`` formats the results, for ``fastnn doctor
--device gpu``.
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
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .ops import Ops
from .selfcheck_cases import CASES, Case

__all__ = ["TOLERANCES", "Result", "apply", "cache_dir", "check_once", "fused_kernels", "run", "table"]

# (rtol, atol) per dtype: a kernel passes where |got - want| <= atol + rtol * |want| for every element
TOLERANCES = {"float32": (1e-5, 1e-6), "float64": (1e-12, 1e-12)}
DTYPES = ("float32", "float64")
NOT_KERNELS = ("to_host", "synchronize", "scratch")  # overridden, but a copy, a wait, a buffer: nothing to compare
FORMAT = 1  # of the cache file
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
        return Result(name, dtype, np.inf, np.inf, False, "no self-check case for this kernel (selfcheck_cases.CASES)")
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
