"""CuPy backend: the generic kernels of ``Ops`` with the hot ones fused into CUDA kernels.

This module and ``cuda_graph.py`` beside it are the only ones that import CuPy. Each fused kernel is named,
built on first use and cached by CuPy (compiled once per dtype). Anything not
overridden here runs the generic ``Ops`` code on CuPy arrays, which is also the
reference the GPU tests compare these kernels against.
"""

from __future__ import annotations

import functools

import cupy as cp
import numpy as np

from ..errors import ConfigError
from .ops import Ops

_ACT_FORWARD = {
    "linear": "h = z;",
    "relu": "h = z > (T)0 ? z : (T)0;",
    "sigmoid": "h = (T)0.5 * tanh((T)0.5 * z) + (T)0.5;",  # the formula of Ops: no overflow
    "tanh": "h = tanh(z);",
}
_ACT_BACKWARD = {
    "relu": "d = a > (T)0 ? d : (T)0;",
    "sigmoid": "d = d * a * ((T)1 - a);",
    "tanh": "d = d * ((T)1 - a * a);",
}

# One block of 256 threads walks the rows (K, the number of classes, is small): each
# row's softmax (or sigmoid MSE), loss, argmax and gradient in one pass, then a
# shared-memory reduction of the loss sum and hit count. One launch, no temporary
# arrays, and the same summation order every time (a CUDA graph can capture it).
_ROW_LOSS_SRC = r"""
template <typename T>
__device__ void row_loss(const T* z, const int* y, T* g, T* loss_out, int* hits_out,
                         int B, int K, int want_grad, int mse) {
    __shared__ T s_loss[256];
    __shared__ int s_hits[256];
    T my_loss = 0;
    int my_hits = 0;
    for (int r = threadIdx.x; r < B; r += blockDim.x) {
        const T* zr = z + (long long)r * K;
        T* gr = g + (long long)r * K;
        int t = y[r];
        int best = 0;
        T m = zr[0];
        for (int k = 1; k < K; ++k) if (zr[k] > m) { m = zr[k]; best = k; }
        my_hits += best == t;
        if (mse) {
            T acc = 0;
            for (int k = 0; k < K; ++k) {
                T a = zr[k];
                T d = a - (k == t ? (T)1 : (T)0);
                acc += d * d;
                if (want_grad) gr[k] = (T)2 * d * a * ((T)1 - a) / (T)(B * K);
            }
            my_loss += acc / (T)K;
        } else {
            T s = 0;
            for (int k = 0; k < K; ++k) s += exp(zr[k] - m);
            my_loss += log(s) + m - zr[t];
            if (want_grad) {
                T inv = (T)1 / (s * (T)B);
                for (int k = 0; k < K; ++k)
                    gr[k] = exp(zr[k] - m) * inv - (k == t ? (T)1 / (T)B : (T)0);
            }
        }
    }
    s_loss[threadIdx.x] = my_loss;
    s_hits[threadIdx.x] = my_hits;
    __syncthreads();
    for (int w = blockDim.x / 2; w > 0; w /= 2) {
        if (threadIdx.x < w) {
            s_loss[threadIdx.x] += s_loss[threadIdx.x + w];
            s_hits[threadIdx.x] += s_hits[threadIdx.x + w];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) { loss_out[0] = s_loss[0]; hits_out[0] = s_hits[0]; }
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
ROW_LOSS_THREADS = 256


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


def compile_module(code: str):
    """A CuPy RawModule of CUDA C++ source (compiled on first use of a function)."""
    return cp.RawModule(code=code, options=("-std=c++14",))


@functools.cache
def _row_loss_function(dtype_char: str):
    """The row-loss kernel for float32 (``"f"``) or float64 (``"d"``), looked up once."""
    return compile_module(_ROW_LOSS_SRC).get_function("row_loss_f32" if dtype_char == "f" else "row_loss_f64")


@functools.cache
def _gather_kernel():
    return cp.ElementwiseKernel(
        "raw U src, raw I idx, int64 d, T scale, T shift", "T out",
        "out = (T)src[idx[i / d] * d + i % d] * scale + shift;", "fastnn_gather_scale")


@functools.cache
def _label_kernel():
    return cp.ElementwiseKernel("raw int32 src, raw I idx", "int32 out", "out = src[idx[i]];",
                                "fastnn_gather_labels")


# One fused update over the whole arena per optimizer: (inputs, outputs, body).
_OPTIM_KERNELS = {
    "sgd": ("T g, T lr, T wd", "T p", "p -= lr * (g + wd * p);"),
    "momentum": ("T g, T lr, T mu, T wd, int32 nesterov", "T p, T v",
                 "T gg = g + wd * p; v = mu * v + gg; p -= lr * (nesterov ? gg + mu * v : v);"),
    # Adam reads the step count from the device, so a captured step stays right on replay;
    # the bias corrections c1, c2 are computed in double, as NumpyOps does, for every T.
    "adam": ("T g, raw int32 t, T lr, T b1, T b2, T eps, T wd", "T p, T m, T v",
             "double step = t[0] + 1; T c1 = (T)(1.0 - pow((double)b1, step));"
             "T c2 = (T)(1.0 - pow((double)b2, step));"
             "m = b1 * m + ((T)1 - b1) * g; v = b2 * v + ((T)1 - b2) * g * g;"
             "p -= lr * ((m / c1) / (sqrt(v / c2) + eps) + wd * p);"),
    "count": ("", "int32 t", "t += 1;"),
}


@functools.cache
def _optim_kernel(kind: str):
    inputs, outputs, body = _OPTIM_KERNELS[kind]  # KeyError: a kind with no kernel is a bug
    return cp.ElementwiseKernel(inputs, outputs, body, f"fastnn_{kind}")


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

    def gather_labels(self, src, idx, out):
        _label_kernel()(src, idx, out)

    def bias_act(self, h, b, act):
        _bias_act_kernel(act)(b, h)

    def act_backward(self, d, a, act):
        if act != "linear":
            _act_backward_kernel(act)(a, d)

    def sum_rows(self, d, out):
        cp.matmul(self.constant("ones", d.shape[0], d.dtype), d, out=out)  # one cuBLAS GEMV

    def _row_loss(self, z, y, grad, loss_out, hits_out, mse: int):
        b, k = z.shape
        fn = _row_loss_function(z.dtype.char)
        g = grad if grad is not None else z  # never written when want_grad == 0
        fn((1,), (ROW_LOSS_THREADS,), (z, y, g, loss_out, hits_out, np.int32(b), np.int32(k),
                                       np.int32(grad is not None), np.int32(mse)))

    def xent(self, logits, y, grad, loss_out, hits_out):
        self._row_loss(logits, y, grad, loss_out, hits_out, 0)

    def mse(self, out, y, grad, loss_out, hits_out):
        self._row_loss(out, y, grad, loss_out, hits_out, 1)

    def sgd(self, p, g, lr, wd):
        t = p.dtype.type
        _optim_kernel("sgd")(g, t(lr), t(wd), p)

    def momentum(self, p, g, v, lr, mu, wd, nesterov):
        t = p.dtype.type
        _optim_kernel("momentum")(g, t(lr), t(mu), t(wd), np.int32(nesterov), p, v)

    def adam(self, p, g, m, v, t, lr, b1, b2, eps, wd):
        f = p.dtype.type
        _optim_kernel("adam")(g, t, f(lr), f(b1), f(b2), f(eps), f(wd), p, m, v)
        _optim_kernel("count")(t)


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


def set_compute_tf32(enabled: bool) -> None:
    """Switch CuPy's float32 GEMMs to TF32 tensor cores, or back to plain float32, at run time."""
    from cupy._core import _routines_linalg as linalg

    linalg.set_compute_type(np.float32, linalg.COMPUTE_TYPE_TF32 if enabled else linalg.COMPUTE_TYPE_DEFAULT)
