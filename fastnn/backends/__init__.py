"""Array backends: one set of kernels, on NumPy (CPU) or CuPy (CUDA GPU).

* ``ops.py``: ``Ops``, every kernel written only against ``self.xp``; the oracle.
* ``numpy_ops.py``: ``NumpyOps(Ops)``, the hot kernels as in-place NumPy sequences.
* ``cpu_fused.py``: the NumPy backend's optimizer updates (SGD, momentum, Adam) as one
  loop each, compiled by Numba when it is installed (``fastnn[fast]``), bit for bit those sequences.
* ``cupy_ops.py``: ``CupyOps(Ops)``, which launches the CUDA kernels of ``kernels.cu``.
* ``kernels.cu``: every CUDA kernel of the training step (fused GEMMs, loss, optimizers).
* ``selfcheck.py``: the first time a process asks for the GPU, each of those kernels against the
  generic CuPy path on a small problem (cached per device, driver and fastnn version;
  ``FASTNN_SELFCHECK=0`` skips it); a kernel that differs is warned about and replaced by the
  generic path for the run.

The CUDA-graph capture of a training step is not a backend: it is ``fastnn.cuda_graph``,
beside the training loop. Only ``cupy_ops.py`` here imports CuPy, and only when the GPU is
asked for: ``import fastnn`` never needs CUDA (nor Numba). This module picks the backend.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from ..errors import ConfigError, DeviceError
from .numpy_ops import NumpyOps
from .ops import ACTIVATIONS, GEMMS, Dropout, Ops

__all__ = ["ACTIVATIONS", "DTYPES", "GEMMS", "Dropout", "NumpyOps", "Ops", "cuda_status", "get_ops",
           "resolve_dtype", "set_tf32"]

DTYPES = {"float32": np.float32, "float64": np.float64}
DEVICES = ("auto", "cpu", "gpu")
_CPU: NumpyOps | None = None


def resolve_dtype(dtype) -> np.dtype:
    """``"float32"``/``"float64"`` (or the NumPy types) -> ``np.dtype``; anything else is a ConfigError."""
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}: choose float32 or float64")
    return np.dtype(DTYPES[name])


def set_tf32(enabled: bool) -> None:
    """Allow TF32 tensor-core GEMMs for float32 in cuBLAS (off by default).

    It applies to the GPU backend with ``gemm="cublas"`` (``get_ops("gpu", gemm="cublas")``);
    fastnn's own GEMM kernels, the default, compute in plain float32.
    TF32 keeps 10 mantissa bits in the products: faster on Ampere and Hopper GPUs,
    but results differ from float32 by about 1e-3 relative, enough to flip a
    near-tie argmax. Takes effect at once, before or after CuPy is first used.
    """
    os.environ["CUPY_TF32"] = "1" if enabled else "0"  # read by CuPy at its first float32 GEMM
    if "cupy" in sys.modules:  # already read and cached: switch CuPy's compute type directly
        from .cupy_ops import set_compute_tf32

        set_compute_tf32(enabled)


def cuda_status() -> str | None:
    """``None`` when a CUDA GPU is usable through CuPy, else the reason it is not."""
    try:
        from . import cupy_ops
    except ImportError as exc:
        return f"CuPy is not installed ({exc}); install it with: pip install 'fastnn[gpu]'"
    return cupy_ops.device_problem()


def get_ops(device: str | Ops = "cpu", gemm: str = "fastnn") -> Ops:
    """The backend for ``"cpu"``, ``"gpu"`` or ``"auto"`` (the GPU when one is usable).

    gemm: on the GPU, ``"fastnn"`` (its own fused GEMM kernels, which a CUDA graph can
    capture) or ``"cublas"`` (cuBLAS products; faster for wide layers, not capturable).
    Raises ConfigError for an unknown name and DeviceError when ``"gpu"`` is asked
    for and CuPy or a CUDA device is missing. The GPU backend is self-checked once per process
    and device (``selfcheck.check_once``): a kernel that differs from the generic CuPy path is
    warned about (RuntimeWarning) and replaced by that path. An ``Ops`` instance passed in is
    returned as it is, unchecked.
    """
    global _CPU
    if isinstance(device, Ops):
        return device
    if device not in DEVICES:
        raise ConfigError(f"unknown device {device!r}: choose cpu, gpu or auto")
    if gemm not in GEMMS:
        raise ConfigError(f"unknown gemm {gemm!r}: choose {' or '.join(GEMMS)}")
    if device in ("gpu", "auto"):
        problem = cuda_status()
        if problem is None:
            from . import selfcheck
            from .cupy_ops import get_cupy_ops

            ops = get_cupy_ops(gemm)
            selfcheck.check_once(ops)
            return ops
        if device == "gpu":
            raise DeviceError(f"device 'gpu' is not usable: {problem}")
    if _CPU is None:
        _CPU = NumpyOps()
    return _CPU
