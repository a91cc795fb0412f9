"""CuPy backend: the generic kernels of ``Ops`` with the hot ones fused into CUDA kernels.

This is the only module of fastnn that imports CuPy. Each fused kernel is named,
built on first use and cached by CuPy (compiled once per dtype). Anything not
overridden here runs the generic ``Ops`` code on CuPy arrays, which is also the
reference the GPU tests compare these kernels against.
"""

from __future__ import annotations

import functools

import cupy as cp
import numpy as np

from .backend import Ops
from .errors import ConfigError

_ACT_FORWARD = {
    "linear": "h = z;",
    "relu": "h = z > (T)0 ? z : (T)0;",
    "sigmoid": "h = (T)1 / ((T)1 + exp(-z));",
    "tanh": "h = tanh(z);",
}
_ACT_BACKWARD = {
    "relu": "d = a > (T)0 ? d : (T)0;",
    "sigmoid": "d = d * a * ((T)1 - a);",
    "tanh": "d = d * ((T)1 - a * a);",
}

# One thread per row: K (the number of classes) is small, so a row's softmax,
# loss, argmax and gradient are computed in registers in one pass over the row.
_ROW_LOSS_SRC = r"""
template <typename T>
__device__ void row_loss(const T* z, const int* y, T* g, T* loss_rows, int* hit_rows,
                         int B, int K, int want_grad, int mse) {
    int r = blockDim.x * blockIdx.x + threadIdx.x;
    if (r >= B) return;
    const T* zr = z + (long long)r * K;
    int t = y[r];
    int best = 0;
    T m = zr[0];
    for (int k = 1; k < K; ++k) if (zr[k] > m) { m = zr[k]; best = k; }
    hit_rows[r] = best == t;
    if (mse) {
        T acc = 0;
        for (int k = 0; k < K; ++k) {
            T a = zr[k];
            T d = a - (k == t ? (T)1 : (T)0);
            acc += d * d;
            if (want_grad) g[(long long)r * K + k] = (T)2 * d * a * ((T)1 - a) / (T)(B * K);
        }
        loss_rows[r] = acc / (T)K;
        return;
    }
    T s = 0;
    for (int k = 0; k < K; ++k) s += exp(zr[k] - m);
    loss_rows[r] = log(s) + m - zr[t];
    if (want_grad) {
        T inv = (T)1 / (s * (T)B);
        for (int k = 0; k < K; ++k)
            g[(long long)r * K + k] = exp(zr[k] - m) * inv - (k == t ? (T)1 / (T)B : (T)0);
    }
}
extern "C" __global__ void row_loss_f32(const float* z, const int* y, float* g, float* l,
                                        int* h, int B, int K, int wg, int mse) {
    row_loss<float>(z, y, g, l, h, B, K, wg, mse);
}
extern "C" __global__ void row_loss_f64(const double* z, const int* y, double* g, double* l,
                                        int* h, int B, int K, int wg, int mse) {
    row_loss<double>(z, y, g, l, h, B, K, wg, mse);
}
"""


@functools.cache
def _bias_act_kernel(act: str):
    if act not in _ACT_FORWARD:
        raise ConfigError(f"unknown activation {act!r}")
    return cp.ElementwiseKernel(
        "T b", "T h", "T z = h + b; " + _ACT_FORWARD[act], f"fastnn_bias_{act}")


@functools.cache
def _act_backward_kernel(act: str):
    if act not in _ACT_BACKWARD:
        raise ConfigError(f"unknown activation {act!r}")
    return cp.ElementwiseKernel("T a", "T d", _ACT_BACKWARD[act], f"fastnn_{act}_backward")


@functools.cache
def _row_loss_module():
    return cp.RawModule(code=_ROW_LOSS_SRC, options=("-std=c++14",))


@functools.cache
def _gather_kernel():
    return cp.ElementwiseKernel(
        "raw U src, raw I idx, int64 d, T scale, T shift", "T out",
        "out = (T)src[idx[i / d] * d + i % d] * scale + shift;", "fastnn_gather_scale")


@functools.cache
def _optim_kernel(kind: str):
    if kind == "sgd":
        return cp.ElementwiseKernel(
            "T g, T lr, T wd", "T p", "p -= lr * (g + wd * p);", "fastnn_sgd")
    if kind == "momentum":
        return cp.ElementwiseKernel(
            "T g, T lr, T mu, T wd, int32 nesterov", "T p, T v",
            "T gg = g + wd * p; v = mu * v + gg; p -= lr * (nesterov ? gg + mu * v : v);",
            "fastnn_momentum")
    return cp.ElementwiseKernel(
        "T g, T lr, T b1, T b2, T eps, T c1, T c2, T wd", "T p, T m, T v",
        "m = b1 * m + ((T)1 - b1) * g; v = b2 * v + ((T)1 - b2) * g * g;"
        "p -= lr * ((m / c1) / (sqrt(v / c2) + eps) + wd * p);",
        "fastnn_adam")


class CupyOps(Ops):
    """CuPy backend. Fused kernels for the hot paths; generic ``Ops`` code elsewhere."""

    name = "gpu"

    def __init__(self):
        super().__init__(cp)

    def to_host(self, a) -> np.ndarray:
        return cp.asnumpy(a)

    def synchronize(self) -> None:
        cp.cuda.get_current_stream().synchronize()

    def gather_rows(self, src, idx, out, scale, shift):
        t = out.dtype.type
        _gather_kernel()(src, idx, np.int64(out.shape[1]), t(scale), t(shift), out)

    def bias_act(self, h, b, act):
        _bias_act_kernel(act)(b, h)

    def act_backward(self, d, a, act):
        if act != "linear":
            _act_backward_kernel(act)(a, d)

    def _row_loss(self, z, y, grad, loss_out, correct_out, mse: int):
        b, k = z.shape
        suffix = "f32" if z.dtype == np.float32 else "f64"
        fn = _row_loss_module().get_function("row_loss_" + suffix)
        rows = cp.empty(b, z.dtype)
        hits = cp.empty(b, np.int32)
        g = grad if grad is not None else rows  # never written when want_grad == 0
        threads = 128
        fn(((b + threads - 1) // threads,), (threads,),
           (z, y, g, rows, hits, np.int32(b), np.int32(k), np.int32(grad is not None),
            np.int32(mse)))
        cp.sum(rows, out=loss_out.reshape(()))
        cp.sum(hits, out=correct_out.reshape(()))

    def xent(self, logits, y, grad, loss_out, correct_out):
        self._row_loss(logits, y, grad, loss_out, correct_out, 0)

    def mse(self, out, y, grad, loss_out, correct_out):
        self._row_loss(out, y, grad, loss_out, correct_out, 1)

    def sgd(self, p, g, lr, wd):
        t = p.dtype.type
        _optim_kernel("sgd")(g, t(lr), t(wd), p)

    def momentum(self, p, g, v, lr, mu, wd, nesterov):
        t = p.dtype.type
        _optim_kernel("momentum")(g, t(lr), t(mu), t(wd), np.int32(nesterov), p, v)

    def adam(self, p, g, m, v, lr, b1, b2, eps, step, wd):
        t = p.dtype.type
        _optim_kernel("adam")(g, t(lr), t(b1), t(b2), t(eps), t(1.0 - b1 ** step),
                              t(1.0 - b2 ** step), t(wd), p, m, v)


def device_problem() -> str | None:
    """``None`` if CuPy sees a usable CUDA device, else why not (one line)."""
    try:
        n = cp.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError, or a missing driver library
        return f"no usable CUDA device ({type(exc).__name__}: {exc})"
    return None if n > 0 else "no CUDA device found"


@functools.cache
def get_cupy_ops() -> CupyOps:
    return CupyOps()
