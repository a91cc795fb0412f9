"""CuPy backend: the training step as fastnn's own CUDA kernels (``kernels.cu``).

This module and ``fastnn/cuda_graph.py`` (the captured training step) are the only ones that import CuPy.
Every kernel of the training step is in ``kernels.cu`` (a conv net's in ``conv_kernels.cu``), one
RawModule compiled by NVRTC on first use: the three GEMMs of a layer carry their epilogues (bias +
activation; activation backward; bias gradient), so a step of an L-layer network
is 3L + 4 launches, none of them through cuBLAS. That makes the step capturable
as a CUDA graph (CuPy refuses cuBLAS calls on a capturing stream) and its sums
run in a fixed order. ``CupyOps(gemm="cublas")`` computes the products with
cuBLAS instead (faster for wide layers, not capturable). Anything not overridden
runs the generic ``Ops`` code on CuPy arrays, the reference these kernels are
tested against. A stack of models (``fastnn.stack.ModelStack``, arrays with a leading
model axis) runs the same kernels with the models on grid axis z (one block per model in
the loss), and its (K, P) arena is updated by the ``*_stack`` optimizer kernels with
per-model hyperparameters; with ``gemm="cublas"`` a stack runs the generic code (batched
cuBLAS GEMMs). A conv net's convolutions are implicit GEMMs (the patches are read from the images by
index, never copied out), its pooling and random translation elementwise kernels: no allocation after
the first step and no host synchronisation, so its step is captured as a dense step is; with
``gemm="cublas"`` the convolutions run the generic im2col and cuBLAS GEMMs instead.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import cupy as cp
import numpy as np

from ..errors import ConfigError
from .ops import GEMMS, Ops

KERNELS_CU = Path(__file__).with_name("kernels.cu")
CONV_KERNELS_CU = Path(__file__).with_name("conv_kernels.cu")  # the conv nets' kernels, compiled after kernels.cu
SOURCES = ("KERNELS_CU", "CONV_KERNELS_CU")  # the module's CUDA files, by attribute (the self-check hashes them)
ACT_CODES = {"linear": 0, "relu": 1, "sigmoid": 2, "tanh": 3}  # as in kernels.cu
TILE = 16  # kernels.cu's GEMM tile: TILE x TILE threads per block
THREADS = 256  # per block of the elementwise kernels and of row_loss (its shared arrays hold 256)
MAX_BLOCKS = 4096  # the elementwise kernels loop over the rest (grid-stride)
MAX_GRID_Y = 65535  # a launch's grid.y and grid.z on every GPU: the GEMMs' blocks take further row tiles in turn
CONV_SPLIT_ROWS = 512  # a conv weight gradient sums its B*Ho*Wo rows in parts of about this many (grid z)...
CONV_MAX_SPLITS = 64  # ...at most this many, added in order by conv_grad_sum


def source() -> str:
    """The module's CUDA source: ``kernels.cu``, then ``conv_kernels.cu`` (which uses its helpers)."""
    return f'{KERNELS_CU.read_text()}\n#line 1 "conv_kernels.cu"\n{CONV_KERNELS_CU.read_text()}'


@functools.cache
def module():
    """``source()`` as a CuPy RawModule (NVRTC compiles it at the first kernel lookup)."""
    return cp.RawModule(code=source(), options=("-std=c++14",))


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


def _gemm_grid(rows: int, cols: int, models: int = 1) -> tuple[int, int, int]:
    """The grid of a fused GEMM kernel of (rows, cols) outputs: column tiles on x, row tiles on y,
    at most MAX_GRID_Y of them (kernels.cu's FOR_ROW_TILES: a block takes every gridDim.y-th row
    tile), models of a stack on z."""
    if models > MAX_GRID_Y:
        raise ConfigError(f"a stack of {models} models: the GEMM kernels take at most {MAX_GRID_Y} in one launch")
    return (-(-cols // TILE), max(1, min(-(-rows // TILE), MAX_GRID_Y)), models)


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

    @property
    def patches_in_memory(self) -> bool:
        """Only the cuBLAS path writes a convolution's patches out; the implicit GEMMs read the images."""
        return self.gemm == "cublas"

    def to_host(self, a) -> np.ndarray:
        return cp.asnumpy(a)

    def synchronize(self) -> None:
        cp.cuda.get_current_stream().synchronize()

    # ------------------------------------------------------------ data access
    def gather_rows(self, src, idx, out, scale, shift):
        d = out.shape[-1]
        rows = out.size // d  # a stack's per-model batches (K, B, D): K * B rows, idx (K, B)
        (idx0, sidx), t = _part(idx, 1), out.dtype.type
        fn = _typed("gather_rows_u8" if src.dtype == np.uint8 else "gather_rows", out.dtype)
        fn(_blocks(rows * d), (THREADS,), (src, idx0, np.int64(rows), np.int64(idx.shape[-1]), np.int64(sidx),
                                          np.int64(d), t(scale), t(shift), out))

    def gather_labels(self, src, idx, out):
        idx0, sidx = _part(idx, 1)
        kernel("gather_labels")(_blocks(out.size), (THREADS,), (src, idx0, np.int64(out.size), np.int64(idx.shape[-1]),
                                                               np.int64(sidx), out))

    # ------------------------------------------------------------ dense layer
    def _dropout_args(self, drop, dtype) -> tuple:
        """(thr, scale, seed, step, layer) as the cuBLAS epilogues take them; thr 0 is no dropout."""
        if drop is None or not drop.active:
            return np.int32(0), dtype.type(1), np.uint32(0), self.constant("zeros", 1, np.int32), np.int32(0)
        return (np.int32(drop.threshold), dtype.type(drop.scale), np.uint32(drop.seed), drop.step,
                np.int32(drop.layer))

    def _dropout_arrays(self, drop, dtype) -> tuple:
        """(thr, scale, seed, sdrop, step, layer) as the fused layer GEMMs take them: device arrays of
        one value (sdrop 0) or of one per model of a stack (sdrop 1), made once per value."""
        key = ("dropout", dtype.str) + (() if drop is None else (_key(drop.p), _key(drop.seed)))
        arrays = self._consts.get(key)
        if arrays is None:
            if drop is None or not drop.active:
                host = np.zeros(1, np.int32), np.ones(1, dtype), np.zeros(1, np.uint32)
            else:
                host = (np.asarray(drop.threshold, np.int32).reshape(-1), np.asarray(drop.scale, dtype).reshape(-1),
                        np.asarray(drop.seed, np.uint32).reshape(-1))
            arrays = self._consts[key] = (*(cp.asarray(a) for a in host), np.int32(host[0].size > 1))
        if drop is None:
            return (*arrays, self.constant("zeros", 1, np.int32), np.int32(0))
        return (*arrays, drop.step, np.int32(drop.layer))

    def _layer_gemm(self, name, arrays, out, m, n, k, act, drop, strides, models):
        """Launch linear_act or input_grad: (arrays..., out, M, N, K, act, dropout args, strides); grid z: models."""
        rows, cols = out.shape
        _typed(name, out.dtype)(_gemm_grid(rows, cols, models), (TILE, TILE), (
            *arrays, out, np.int32(m), np.int32(n), np.int32(k), _act_code(act),
            *self._dropout_arrays(drop, out.dtype), *(np.int64(s) for s in strides)))

    def linear_act(self, a, W, b, out, act, drop=None, rowwise=False):
        # fastnn's kernels sum each output in one fixed order whatever the batch: rowwise needs nothing more
        if self.gemm == "cublas":
            if W.ndim == 3 or rowwise:
                return super().linear_act(a, W, b, out, act, drop, rowwise)
            cp.matmul(a, W, out=out)
            self.bias_act(out, b, act, drop)
            return
        (a0, sa), (W0, sw), (o0, so) = _part(a, 2), _part(W, 2), _part(out, 2)
        self._layer_gemm("linear_act", (a0, W0, _part(b, 1)[0]), o0, a0.shape[0], W0.shape[1], a0.shape[1], act,
                         drop, (sa, sw, so), _models(W))

    def input_grad(self, d, W, a, out, act, drop=None):
        if self.gemm == "cublas":
            if W.ndim == 3:
                return super().input_grad(d, W, a, out, act, drop)
            cp.matmul(d, W.T, out=out)
            self.act_backward(out, a, act, drop)
            return
        (d0, sd), (W0, sw), (a0, sa) = _part(d, 2), _part(W, 2), _part(a, 2)
        self._layer_gemm("input_grad", (d0, W0, a0), _part(out, 2)[0], d0.shape[0], d0.shape[1], W0.shape[0], act,
                         drop, (sd, sw, sa), _models(W))

    def param_grads(self, a, d, gW, gb):
        if self.gemm == "cublas":
            if gW.ndim == 3:
                return super().param_grads(a, d, gW, gb)
            cp.matmul(a.T, d, out=gW)
            cp.matmul(self.constant("ones", d.shape[0], d.dtype), d, out=gb)  # one GEMV
            return
        (a0, sa), (d0, sd), (gW0, sg) = _part(a, 2), _part(d, 2), _part(gW, 2)
        m, k = a0.shape
        n = d0.shape[1]
        _typed("weight_grad", gW.dtype)(_gemm_grid(k + 1, n, _models(gW)), (TILE, TILE), (
            a0, d0, gW0, _part(gb, 1)[0], np.int32(m), np.int32(k), np.int32(n), np.int64(sa), np.int64(sd),
            np.int64(sg)))

    # ---------------------------------------------- convolution and pooling (NHWC)
    def _buffer(self, name: str, shape: tuple, dtype):
        """A device work array kept per (name, shape, dtype): made at the first step, reused (no
        allocation in a captured step); the kernels of one stream use it one after another."""
        key = ("buffer", name, tuple(shape), np.dtype(dtype).str)
        buf = self._consts.get(key)
        if buf is None:
            buf = self._consts[key] = cp.empty(shape, dtype)
        return buf

    def scratch(self, shape, dtype):
        return self._buffer("scratch", shape, dtype)

    def conv_act(self, x, W, b, cols, out, act, pad, rowwise=False):
        """The implicit GEMM of conv_kernels.cu (``cols`` not written); its summation order per output
        element is fixed, whatever the batch: each row is independent of its batch with or without rowwise."""
        if self.gemm == "cublas":
            return super().conv_act(x, W, b, cols, out, act, pad, rowwise)
        shape = _conv_shape(x, W, out, pad)
        _typed("conv_act", out.dtype)(_gemm_grid(out.size // out.shape[3], out.shape[3]), (TILE, TILE), (
            x, W, b, out, *shape, _act_code(act)))

    def conv_param_grads(self, x, cols, d, gW, gb, pad):
        """gW and gb from x and d (``cols`` not read): one GEMM of k*k*C_in + 1 rows (the last the bias
        gradient) split into at most CONV_MAX_SPLITS parts of the B*Ho*Wo summed rows, added in order."""
        if self.gemm == "cublas":
            return super().conv_param_grads(x, cols, d, gW, gb, pad)
        shape = _conv_shape(x, gW, d, pad)
        rows, (p, n) = d.size // d.shape[3], gW.shape
        splits = max(1, min(-(-rows // CONV_SPLIT_ROWS), CONV_MAX_SPLITS))
        chunk = -(-rows // splits)
        part = self._buffer("conv_partials", (splits, p + 1, n), gW.dtype) if splits > 1 else gW
        grid = _gemm_grid(p + 1, n)[:2] + (splits,)
        _typed("conv_weight_grad", gW.dtype)(grid, (TILE, TILE), (x, d, gW, gb, part, *shape, np.int64(chunk)))
        if splits > 1:
            _typed("conv_grad_sum", gW.dtype)(_blocks(gW.size + n), (THREADS,), (
                part, np.int32(splits), np.int64(gW.size), np.int64(gW.size + n), gW, gb))

    def conv_input_grad(self, d, W, dcols, out, pad):
        """dL/dx as one GEMM gathered from d by the weight (a transposed convolution; ``dcols`` not written)."""
        if self.gemm == "cublas":
            return super().conv_input_grad(d, W, dcols, out, pad)
        shape = _conv_shape(out, W, d, pad)
        _typed("conv_input_grad", out.dtype)(_gemm_grid(out.size // out.shape[3], out.shape[3]), (TILE, TILE), (
            d, W, out, *shape))

    def maxpool(self, x, p, out, arg):
        _typed("maxpool", x.dtype)(_blocks(out.size), (THREADS,), (
            x, out, arg, *(np.int32(v) for v in (*x.shape, p, *out.shape[1:3]))))

    def maxpool_backward(self, d, arg, p, out):
        _typed("maxpool_backward", d.dtype)(_blocks(out.size), (THREADS,), (
            d, arg, out, *(np.int32(v) for v in (*out.shape, p, *d.shape[1:3]))))

    def translate(self, x, out, limit, seed, step, fill):
        """The generic hash, the step read by the kernel from the device counter (no host read)."""
        _typed("translate", out.dtype)(_blocks(out.size), (THREADS,), (
            x, out, *(np.int32(v) for v in (*x.shape, limit)), np.uint32(int(seed) & 0xFFFFFFFF), step,
            out.dtype.type(fill)))

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
    def _row_loss(self, z, y, grad, loss_out, hits_out, mse: int, w, want_grad=None):
        """One block per model: a stack's z (K, B, C) and y (B,) or (K, B) give loss_out, hits_out (K,).
        want_grad: 0 or 1 (by default: whether grad is given), or 2: the probabilities into grad."""
        (z0, sz), (g0, _) = _part(z, 2), _part(grad if grad is not None else z, 2)  # g never written with 0
        y0, sy = _part(y, 1) if y is not None else (self.constant("zeros", 1, np.int32), 0)  # not read with 2
        b, k = z0.shape
        weights = w if w is not None else z0  # never read when weighted == 0
        if hits_out is None:  # probabilities: no loss or hits written
            loss_out, hits_out = z0, self.constant("zeros", _models(z), np.int32)
        _typed("row_loss", z.dtype)((_models(z),), (THREADS,), (
            z0, y0, weights, g0, loss_out, hits_out, np.int32(b), np.int32(k),
            np.int32(grad is not None if want_grad is None else want_grad), np.int32(mse), np.int32(w is not None),
            np.int64(sz), np.int64(sy)))

    def probabilities(self, out, loss, proba):
        """The row_loss kernel's probabilities (its want_grad == 2), in proba's dtype."""
        z = out if out.dtype == proba.dtype else out.astype(proba.dtype)
        self._row_loss(z, None, proba, None, None, int(loss == "mse"), None, want_grad=2)

    def xent(self, logits, y, grad, loss_out, hits_out, w=None):
        if logits.ndim == 3 and w is not None:
            return super().xent(logits, y, grad, loss_out, hits_out, w)
        self._row_loss(logits, y, grad, loss_out, hits_out, 0, w)

    def mse(self, out, y, grad, loss_out, hits_out, w=None):
        if out.ndim == 3 and w is not None:
            return super().mse(out, y, grad, loss_out, hits_out, w)
        self._row_loss(out, y, grad, loss_out, hits_out, 1, w)

    # ------------------------------------------------------------- optimizers
    def _hyper(self, v, dtype) -> tuple:
        """(device array, stride) of a stack's hyperparameter: its (K,) values, or one value for all."""
        if isinstance(v, float):
            return self.constant_value(v, dtype), np.int32(0)
        return v.reshape(-1), np.int32(1)

    def constant_value(self, v: float, dtype):
        """A cached 1-element device array holding v."""
        key = ("value", v, np.dtype(dtype).str)
        c = self._consts.get(key)
        if c is None:
            c = self._consts[key] = cp.full(1, v, dtype)
        return c

    def sgd(self, p, g, lr, wd):
        if p.ndim != 1:  # a stack's (K, P) arena, per-model hyperparameters
            _typed("sgd_stack", p.dtype)(_blocks(p.size), (THREADS,), (
                p, g, np.int64(p.size), np.int64(p.shape[1]), *self._hyper(lr, p.dtype), *self._hyper(wd, p.dtype)))
            return
        t = p.dtype.type
        _typed("sgd", p.dtype)(_blocks(p.size), (THREADS,), (p, g, np.int64(p.size), t(lr), t(wd)))

    def momentum(self, p, g, v, lr, mu, wd, nesterov):
        if p.ndim != 1:
            _typed("momentum_stack", p.dtype)(_blocks(p.size), (THREADS,), (
                p, g, v, np.int64(p.size), np.int64(p.shape[1]), *self._hyper(lr, p.dtype), *self._hyper(mu, p.dtype),
                *self._hyper(wd, p.dtype), np.int32(nesterov)))
            return
        t = p.dtype.type
        _typed("momentum", p.dtype)(_blocks(p.size), (THREADS,),
                                    (p, g, v, np.int64(p.size), t(lr), t(mu), t(wd), np.int32(nesterov)))

    def adam(self, p, g, m, v, t, lr, b1, b2, eps, wd):
        f = p.dtype.type
        if p.ndim != 1:
            _typed("adam_stack", p.dtype)(_blocks(p.size), (THREADS,), (
                p, g, m, v, t, np.int64(p.size), np.int64(p.shape[1]), *self._hyper(lr, p.dtype), f(b1), f(b2),
                f(eps), *self._hyper(wd, p.dtype)))
            self.count(t)
            return
        _typed("adam", p.dtype)(_blocks(p.size), (THREADS,),
                                (p, g, m, v, t, np.int64(p.size), f(lr), f(b1), f(b2), f(eps), f(wd)))
        self.count(t)


def _conv_shape(x, W, out, pad: int) -> tuple:
    """A convolution's (B, H, W, C_in, Ho, Wo, C_out, k, pad) as conv_kernels.cu's CONV_ARGS take them, from
    its input x (B, H, W, C_in), weight W (k*k*C_in, C_out) and output out (B, Ho, Wo, C_out)."""
    k = math.isqrt(W.shape[0] // x.shape[3])
    return tuple(np.int32(v) for v in (*x.shape, *out.shape[1:3], W.shape[1], k, pad))


def _part(x, ndim: int) -> tuple:
    """``(model 0's part, elements between models)`` of a stack's array with one more axis than
    ``ndim``; ``(x, 0)`` for an array of ``ndim`` axes, which every model shares."""
    if x.ndim > ndim:
        return x[0], x.strides[0] // x.itemsize
    return x, 0


def _key(v):
    """A dict key for a dropout rate or seed: the number, or a stack's array as bytes."""
    return v.tobytes() if isinstance(v, np.ndarray) else v


def _models(x) -> int:
    return x.shape[0] if x.ndim == 3 else 1


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
