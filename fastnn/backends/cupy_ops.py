"""CuPy backend: the training step as fastnn's own CUDA kernels (``kernels.cu``).

This module and ``cuda_graph.py`` beside it are the only ones that import CuPy.
Every kernel of the training step is in ``kernels.cu``, one RawModule compiled
by NVRTC on first use: the three GEMMs of a layer carry their epilogues (bias +
activation; activation backward; bias gradient), so a step of an L-layer network
is 3L + 4 launches, none of them through cuBLAS. That makes the step capturable
as a CUDA graph (CuPy refuses cuBLAS calls on a capturing stream) and its sums
run in a fixed order. ``CupyOps(gemm="cublas")`` computes the products with
cuBLAS instead (faster for wide layers, not capturable). Anything not overridden
runs the generic ``Ops`` code on CuPy arrays, the reference these kernels are
tested against. A stack of models (``fastnn.stack.ModelStack``, arrays with a leading
model axis) runs that generic code: batched cuBLAS GEMMs and CuPy elementwise kernels.
"""

from __future__ import annotations

import functools
from pathlib import Path

import cupy as cp
import numpy as np

from ..errors import ConfigError
from .ops import GEMMS, Ops

KERNELS_CU = Path(__file__).with_name("kernels.cu")
ACT_CODES = {"linear": 0, "relu": 1, "sigmoid": 2, "tanh": 3}  # as in kernels.cu
TILE = 16  # kernels.cu's GEMM tile: TILE x TILE threads per block
THREADS = 256  # per block of the elementwise kernels and of row_loss (its shared arrays hold 256)
MAX_BLOCKS = 4096  # the elementwise kernels loop over the rest (grid-stride)


@functools.cache
def module():
    """``kernels.cu`` as a CuPy RawModule (NVRTC compiles it at the first kernel lookup)."""
    return cp.RawModule(code=KERNELS_CU.read_text(), options=("-std=c++14",))


@functools.cache
def kernel(name: str):
    """The kernel ``name`` of ``kernels.cu``, looked up once."""
    return module().get_function(name)


def _typed(name: str, dtype) -> object:
    """The float32 (``name_f32``) or float64 (``name_f64``) instance of a kernel."""
    return kernel(f"{name}_{'f32' if dtype == np.float32 else 'f64'}")


def _act_code(act: str) -> np.int32:
    if act not in ACT_CODES:
        raise ConfigError(f"unknown activation {act!r}")
    return np.int32(ACT_CODES[act])


def _blocks(n: int) -> tuple[int]:
    return (max(1, min(-(-n // THREADS), MAX_BLOCKS)),)


def _gemm_grid(rows: int, cols: int) -> tuple[int, int]:
    return (-(-cols // TILE), -(-rows // TILE))


class CupyOps(Ops):
    """CuPy backend; arrays passed to its kernels must be C-contiguous.

    gemm: ``"fastnn"`` (default) runs the fused GEMM kernels of ``kernels.cu``;
    ``"cublas"`` runs the products through cuBLAS (``cupy.matmul``; TF32 with
    ``fastnn.set_tf32``) followed by the epilogue kernels. Only ``"fastnn"``
    can be captured as a CUDA graph.
    """

    name = "gpu"

    def __init__(self, gemm: str = "fastnn"):
        if gemm not in GEMMS:
            raise ConfigError(f"unknown gemm {gemm!r}: choose fastnn or cublas")
        super().__init__(cp)
        self.gemm = gemm

    def to_host(self, a) -> np.ndarray:
        return cp.asnumpy(a)

    def synchronize(self) -> None:
        cp.cuda.get_current_stream().synchronize()

    # ------------------------------------------------------------ data access
    def gather_rows(self, src, idx, out, scale, shift):
        if out.ndim != 2:  # one batch per model of a stack
            return super().gather_rows(src, idx, out, scale, shift)
        b, d = out.shape
        t = out.dtype.type
        fn = _typed("gather_rows_u8" if src.dtype == np.uint8 else "gather_rows", out.dtype)
        fn(_blocks(b * d), (THREADS,), (src, idx, np.int64(b), np.int64(d), t(scale), t(shift), out))

    def gather_labels(self, src, idx, out):
        if out.ndim != 1:
            return super().gather_labels(src, idx, out)
        b = out.shape[0]
        kernel("gather_labels")(_blocks(b), (THREADS,), (src, idx, np.int64(b), out))

    # ------------------------------------------------------------ dense layer
    def _dropout_args(self, drop, dtype) -> tuple:
        """(thr, scale, seed, step, layer) as kernels.cu takes them; thr 0 is no dropout."""
        if drop is None or not drop.active:
            return np.int32(0), dtype.type(1), np.uint32(0), self.constant("zeros", 1, np.int32), np.int32(0)
        return (np.int32(drop.threshold), dtype.type(drop.scale), np.uint32(drop.seed), drop.step,
                np.int32(drop.layer))

    def _layer_gemm(self, name, arrays, out, m, n, k, act, drop):
        """Launch linear_act or input_grad: (arrays..., out, M, N, K, act, dropout args)."""
        rows, cols = out.shape
        _typed(name, out.dtype)(_gemm_grid(rows, cols), (TILE, TILE), (
            *arrays, out, np.int32(m), np.int32(n), np.int32(k), _act_code(act), *self._dropout_args(drop, out.dtype)))

    def linear_act(self, a, W, b, out, act, drop=None):
        if W.ndim == 3:
            return super().linear_act(a, W, b, out, act, drop)
        if self.gemm == "cublas":
            cp.matmul(a, W, out=out)
            self.bias_act(out, b, act, drop)
            return
        self._layer_gemm("linear_act", (a, W, b), out, a.shape[0], W.shape[1], a.shape[1], act, drop)

    def input_grad(self, d, W, a, out, act, drop=None):
        if W.ndim == 3:
            return super().input_grad(d, W, a, out, act, drop)
        if self.gemm == "cublas":
            cp.matmul(d, W.T, out=out)
            self.act_backward(out, a, act, drop)
            return
        self._layer_gemm("input_grad", (d, W, a), out, d.shape[0], d.shape[1], W.shape[0], act, drop)

    def param_grads(self, a, d, gW, gb):
        if gW.ndim == 3:
            return super().param_grads(a, d, gW, gb)
        if self.gemm == "cublas":
            cp.matmul(a.T, d, out=gW)
            cp.matmul(self.constant("ones", d.shape[0], d.dtype), d, out=gb)  # one GEMV
            return
        m, k = a.shape
        n = d.shape[1]
        _typed("weight_grad", gW.dtype)(_gemm_grid(k + 1, n), (TILE, TILE),
                                        (a, d, gW, gb, np.int32(m), np.int32(k), np.int32(n)))

    def bias_act(self, h, b, act, drop=None):
        if h.ndim == 3:
            return super().bias_act(h, b, act, drop)
        rows, n = h.shape
        _typed("bias_act", h.dtype)(_blocks(rows * n), (THREADS,), (
            h, b, np.int64(rows), np.int64(n), _act_code(act), *self._dropout_args(drop, h.dtype)))

    def act_backward(self, d, a, act, drop=None):
        if d.ndim == 3:
            return super().act_backward(d, a, act, drop)
        _typed("act_backward", d.dtype)(_blocks(d.size), (THREADS,), (
            d, a, np.int64(d.size), _act_code(act), *self._dropout_args(drop, d.dtype)))

    def count(self, t):
        kernel("step_count")((1,), (1,), (t,))

    # ----------------------------------------------------------------- losses
    def _row_loss(self, z, y, grad, loss_out, hits_out, mse: int, w):
        b, k = z.shape
        g = grad if grad is not None else z  # never written when want_grad == 0
        weights = w if w is not None else z  # never read when weighted == 0
        _typed("row_loss", z.dtype)((1,), (THREADS,), (
            z, y, weights, g, loss_out, hits_out, np.int32(b), np.int32(k), np.int32(grad is not None),
            np.int32(mse), np.int32(w is not None)))

    def xent(self, logits, y, grad, loss_out, hits_out, w=None):
        if logits.ndim == 3:
            return super().xent(logits, y, grad, loss_out, hits_out, w)
        self._row_loss(logits, y, grad, loss_out, hits_out, 0, w)

    def mse(self, out, y, grad, loss_out, hits_out, w=None):
        if out.ndim == 3:
            return super().mse(out, y, grad, loss_out, hits_out, w)
        self._row_loss(out, y, grad, loss_out, hits_out, 1, w)

    # ------------------------------------------------------------- optimizers
    def sgd(self, p, g, lr, wd):
        if p.ndim != 1:  # a stack's (K, P) arena, per-model hyperparameters
            return super().sgd(p, g, lr, wd)
        t = p.dtype.type
        _typed("sgd", p.dtype)(_blocks(p.size), (THREADS,), (p, g, np.int64(p.size), t(lr), t(wd)))

    def momentum(self, p, g, v, lr, mu, wd, nesterov):
        if p.ndim != 1:
            return super().momentum(p, g, v, lr, mu, wd, nesterov)
        t = p.dtype.type
        _typed("momentum", p.dtype)(_blocks(p.size), (THREADS,),
                                    (p, g, v, np.int64(p.size), t(lr), t(mu), t(wd), np.int32(nesterov)))

    def adam(self, p, g, m, v, t, lr, b1, b2, eps, wd):
        if p.ndim != 1:
            return super().adam(p, g, m, v, t, lr, b1, b2, eps, wd)
        f = p.dtype.type
        _typed("adam", p.dtype)(_blocks(p.size), (THREADS,),
                                (p, g, m, v, t, np.int64(p.size), f(lr), f(b1), f(b2), f(eps), f(wd)))
        self.count(t)


def device_problem() -> str | None:
    """``None`` if CuPy sees a usable CUDA device, else why not (one line)."""
    try:
        n = cp.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError, or a missing driver library
        return f"no usable CUDA device ({type(exc).__name__}: {exc})"
    return None if n > 0 else "no CUDA device found"


@functools.cache
def get_cupy_ops(gemm: str = "fastnn") -> CupyOps:
    return CupyOps(gemm)


def set_compute_tf32(enabled: bool) -> None:
    """Switch CuPy's float32 GEMMs to TF32 tensor cores, or back to plain float32, at run time."""
    from cupy._core import _routines_linalg as linalg

    linalg.set_compute_type(np.float32, linalg.COMPUTE_TYPE_TF32 if enabled else linalg.COMPUTE_TYPE_DEFAULT)
