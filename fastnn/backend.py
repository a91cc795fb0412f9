"""Array backends: one set of kernels written against ``xp`` (NumPy or CuPy).

``Ops`` holds the array module in ``self.xp`` and implements every kernel the
training step needs using only ``xp`` calls, so the same code runs on NumPy and
on CuPy and serves as the reference ("oracle") implementation.  ``NumpyOps``
replaces a few hot kernels with in-place NumPy sequences that allocate nothing;
``fastnn.cuda_ops.CupyOps`` replaces them with fused CUDA kernels.

Conventions for every kernel:

* batches are row-major ``(B, D)``; weights are ``(fan_in, fan_out)``;
* floating arrays share one dtype (float32 by default, float64 on request) and
  scalars are passed as Python floats, which never promote an array's dtype;
* results go into caller-given buffers (``out``), so a training step at a fixed
  batch size allocates nothing and can be captured as a CUDA graph;
* loss and accuracy are written into device arrays, never returned as Python
  numbers, so a training epoch never waits on the device.

Only ``fastnn.cuda_ops`` imports CuPy, and only when a GPU is asked for.
"""

from __future__ import annotations

import os
import sys
import warnings

import numpy as np

from .errors import ConfigError, DeviceError

ACTIVATIONS = ("relu", "sigmoid", "tanh")
DTYPES = {"float32": np.float32, "float64": np.float64}


def resolve_dtype(dtype) -> np.dtype:
    """``"float32"``/``"float64"`` (or the NumPy types) -> ``np.dtype``; anything else is a ConfigError."""
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}: choose float32 or float64")
    return np.dtype(DTYPES[name])


class Ops:
    """Generic kernels, written only against ``self.xp``.

    Subclasses set ``name`` (``"cpu"``/``"gpu"``) and may override any method with
    a faster one; the generic versions here stay the reference for their tests.
    """

    name = "generic"

    def __init__(self, xp):
        self.xp = xp
        self._consts: dict[tuple, object] = {}

    def constant(self, kind: str, n: int, dtype):
        """A cached read-only helper vector: ``"ones"`` (n,) of dtype, or ``"arange"`` (n,)."""
        key = (kind, n, dtype)
        c = self._consts.get(key)
        if c is None:
            c = self._consts[key] = self.xp.ones(n, dtype) if kind == "ones" else self.xp.arange(n)
        return c

    # ----------------------------------------------------------------- memory
    def asarray(self, a, dtype=None):
        """Host or device array -> array of this backend (copies only if needed)."""
        return self.xp.asarray(a, dtype=dtype)

    def to_host(self, a) -> np.ndarray:
        """Device array -> NumPy array (a synchronising copy on the GPU)."""
        return np.asarray(a)

    def synchronize(self) -> None:
        """Wait for queued device work (a no-op on the CPU)."""

    # ------------------------------------------------------------ data access
    def upload_images(self, x, dtype):
        """Host images (N, D) -> device array for ``gather_rows``.

        uint8 pixels stay uint8 (a quarter of the memory and transfer; they are
        scaled as each batch is gathered); float inputs become ``dtype`` as given.
        """
        return self.asarray(x, None if x.dtype == np.uint8 else dtype)

    def gather_rows(self, src, idx, out, scale: float, shift: float) -> None:
        """``out[i] = src[idx[i]] * scale + shift`` as ``out.dtype``.

        src: (N, D) uint8 or float; idx: (B,) int64; out: (B, D) float.
        """
        out[...] = self.xp.take(src, idx, axis=0).astype(out.dtype)
        out *= scale
        if shift:
            out += shift

    def gather_labels(self, src, idx, out) -> None:
        """``out[i] = src[idx[i]]``; src: (N,) int32, idx: (B,) int64, out: (B,) int32."""
        self.xp.take(src, idx, out=out)

    # ------------------------------------------------------------ dense layer
    def matmul(self, a, b, out) -> None:
        """``out = a @ b`` (one GEMM). a: (M, K), b: (K, N), out: (M, N)."""
        self.xp.matmul(a, b, out=out)

    def weight_grad(self, a, d, out) -> None:
        """``out = a.T @ d``: the weight gradient. a: (B, M), d: (B, N), out: (M, N)."""
        self.xp.matmul(a.T, d, out=out)

    def bias_act(self, h, b, act: str) -> None:
        """In place: ``h = act(h + b)``. h: (B, N), b: (N,); act in ACTIVATIONS or ``"linear"``."""
        xp = self.xp
        h += b
        if act == "relu":
            xp.maximum(h, 0, out=h)
        elif act == "sigmoid":
            self._sigmoid_inplace(h)
        elif act == "tanh":
            xp.tanh(h, out=h)
        elif act != "linear":
            raise ConfigError(f"unknown activation {act!r}")

    def _sigmoid_inplace(self, h) -> None:
        # 1/(1+e^-x) = (1 + tanh(x/2)) / 2: no overflow for any x, no warnings.
        h *= 0.5
        self.xp.tanh(h, out=h)
        h *= 0.5
        h += 0.5

    def act_backward(self, d, a, act: str) -> None:
        """In place: ``d *= act'(z)``, written in terms of the activation ``a = act(z)``.

        d: (B, N) upstream gradient dL/da; a: (B, N) the activation from the forward pass.
        """
        if act == "relu":
            d *= a > 0
        elif act == "sigmoid":
            d *= a * (1.0 - a)
        elif act == "tanh":
            d *= 1.0 - a * a
        elif act != "linear":
            raise ConfigError(f"unknown activation {act!r}")

    def sum_rows(self, d, out) -> None:
        """``out = d.sum(axis=0)``: the bias gradient. d: (B, N), out: (N,)."""
        self.xp.sum(d, axis=0, out=out)

    # ----------------------------------------------------------------- losses
    def xent(self, logits, y, grad, loss_out, correct_out) -> None:
        """Softmax cross-entropy from logits, by log-sum-exp.

        logits: (B, K); y: (B,) int32 labels; grad: (B, K) receives
        ``(softmax(logits) - onehot(y)) / B`` (or None to skip it); loss_out and
        correct_out: 0-d or 1-element arrays that receive the *sum* over the batch
        of the per-sample losses and the number of argmax hits.
        """
        xp = self.xp
        rows = xp.arange(logits.shape[0])
        m = logits.max(axis=1, keepdims=True)
        z = logits - m
        e = xp.exp(z)
        s = e.sum(axis=1, keepdims=True)
        loss_out[...] = (xp.log(s)[:, 0] - z[rows, y]).sum()
        correct_out[...] = (logits.argmax(axis=1) == y).sum()
        if grad is not None:
            xp.divide(e, s, out=grad)
            grad[rows, y] -= 1.0
            grad *= 1.0 / logits.shape[0]

    def mse(self, out, y, grad, loss_out, correct_out) -> None:
        """Mean squared error of sigmoid outputs against one-hot targets.

        out: (B, K) sigmoid activations; y: (B,) int32. The per-sample loss is
        ``mean_k (out_k - onehot_k)^2``; grad (B, K) receives dL/dz of the batch
        mean, through the sigmoid: ``2 (out - t) out (1 - out) / (B K)``.
        loss_out/correct_out as in ``xent``.
        """
        xp = self.xp
        b, k = out.shape
        rows = xp.arange(b)
        diff = out.copy()
        diff[rows, y] -= 1.0
        loss_out[...] = (diff * diff).sum() / k
        correct_out[...] = (out.argmax(axis=1) == y).sum()
        if grad is not None:
            xp.multiply(diff, out * (1.0 - out), out=grad)
            grad *= 2.0 / (b * k)

    # ------------------------------------------------------------- optimizers
    # Each takes the whole flat parameter arena p and gradient arena g (1-D) and
    # updates p (and its state arrays) in place. g may be overwritten (consumed).
    def sgd(self, p, g, lr: float, wd: float) -> None:
        """``p -= lr * (g + wd * p)``."""
        p -= lr * (g + wd * p) if wd else lr * g

    def momentum(self, p, g, v, lr: float, mu: float, wd: float, nesterov: bool) -> None:
        """Heavy-ball or Nesterov momentum, PyTorch's convention.

        ``v = mu v + (g + wd p)``; ``p -= lr v`` or, with Nesterov,
        ``p -= lr ((g + wd p) + mu v)``.
        """
        gg = g + wd * p if wd else g
        v *= mu
        v += gg
        p -= lr * (gg + mu * v) if nesterov else lr * v

    def adam(self, p, g, m, v, t, lr: float, b1: float, b2: float, eps: float, wd: float) -> None:
        """Adam with bias correction and decoupled weight decay (AdamW).

        t: 1-element int32 array, the number of steps taken so far; this step is
        ``t + 1`` and t is incremented (a device counter, so a captured step stays right).
        ``m = b1 m + (1-b1) g``; ``v = b2 v + (1-b2) g^2``;
        ``p -= lr (m_hat / (sqrt(v_hat) + eps) + wd p)``.
        """
        xp = self.xp
        t += 1
        step = t.astype(p.dtype)
        c1 = 1.0 - b1 ** step
        c2 = 1.0 - b2 ** step
        m *= b1
        m += (1.0 - b1) * g
        v *= b2
        v += (1.0 - b2) * (g * g)
        upd = (m / c1) / (xp.sqrt(v / c2) + eps)
        if wd:
            upd += wd * p
        p -= lr * upd


class NumpyOps(Ops):
    """NumPy backend: the generic kernels, with the hot ones rewritten in place.

    The overrides are sequences of ufunc calls with ``out=`` into preallocated
    buffers, since at the sizes of an MNIST MLP the allocator and the extra passes
    over memory cost as much as the arithmetic. The one exception is ``xent``,
    which makes a few (B,)-sized temporaries (argmax, row maxima, row sums).
    """

    name = "cpu"

    def __init__(self):
        super().__init__(np)
        self._scratch: dict[tuple, np.ndarray] = {}

    def scratch(self, shape, dtype, slot: int = 0) -> np.ndarray:
        """A reusable work array of this shape and dtype (one per slot)."""
        key = (shape, dtype, slot)  # shape: a tuple; dtype: a NumPy dtype or type
        buf = self._scratch.get(key)
        if buf is None:
            buf = self._scratch[key] = np.empty(shape, dtype)
        return buf

    def gather_rows(self, src, idx, out, scale, shift):
        # mode="clip" skips a bounds check that costs 3x; idx comes from a permutation.
        if src.dtype == out.dtype:
            np.take(src, idx, axis=0, out=out, mode="clip")
            if scale != 1.0:
                out *= scale
        else:  # uint8 rows, then convert and scale: 2x faster than one mixed-type multiply
            rows = self.scratch(out.shape, src.dtype)
            np.take(src, idx, axis=0, out=rows, mode="clip")
            np.copyto(out, rows)
            out *= scale
        if shift:
            out += shift

    def gather_labels(self, src, idx, out):
        np.take(src, idx, out=out, mode="clip")

    def bias_act(self, h, b, act):
        if act == "relu":
            # h * (h > 0) runs 2x faster than np.maximum(h, 0) on these small matrices
            h += b
            mask = self.scratch(h.shape, np.bool_)
            np.greater(h, 0, out=mask)
            h *= mask
        else:
            super().bias_act(h, b, act)

    def weight_grad(self, a, d, out):
        # np.dot goes to BLAS even for B = 1 (an outer product), where np.matmul takes a
        # loop 6x slower and a broadcast multiply 2x slower.
        np.dot(a.T, d, out=out)

    def sum_rows(self, d, out):
        # ones @ d runs as one BLAS GEMV: 3x faster than d.sum(axis=0) at B=128.
        np.dot(self.constant("ones", d.shape[0], d.dtype), d, out=out)

    def act_backward(self, d, a, act):
        if act == "relu":
            mask = self.scratch(a.shape, np.bool_)
            np.greater(a, 0, out=mask)
            d *= mask
        elif act == "sigmoid":
            t = self.scratch(a.shape, a.dtype)
            np.subtract(1.0, a, out=t)
            t *= a
            d *= t
        elif act == "tanh":
            t = self.scratch(a.shape, a.dtype)
            np.multiply(a, a, out=t)
            np.subtract(1.0, t, out=t)
            d *= t
        else:
            super().act_backward(d, a, act)

    def xent(self, logits, y, grad, loss_out, correct_out):
        b, k = logits.shape
        if b == 1:
            return self._xent_one(logits[0], int(y[0]), grad, loss_out, correct_out)
        rows = self.constant("arange", b, None)
        am = logits.argmax(axis=1)
        m = logits[rows, am]  # the row maxima; cheaper than logits.max(axis=1)
        picked = logits[rows, y]
        correct_out[0] = np.count_nonzero(am == y)
        e = grad if grad is not None else self.scratch(logits.shape, logits.dtype)
        np.subtract(logits, m[:, None], out=e)
        np.exp(e, out=e)
        s = np.dot(e, self.constant("ones", k, e.dtype))  # row sums as one GEMV
        if grad is not None:
            e *= np.divide(1.0 / b, s)[:, None]
            e[rows, y] -= 1.0 / b
        # loss_i = log(sum_j exp(z_j - m)) + (m - z_y), summed per row first: both terms
        # are small, while m and z_y alone can be large enough to lose digits.
        np.log(s, out=s)
        m -= picked
        s += m
        loss_out[0] = s.sum()

    def _xent_one(self, z, t, grad, loss_out, correct_out):
        # Per-sample training calls this 60000 times an epoch: the fewest NumPy calls.
        m = z.max()
        e = grad[0] if grad is not None else self.scratch(z.shape, z.dtype)
        np.subtract(z, m, out=e)
        np.exp(e, out=e)
        s = e.sum()
        loss_out[0] = np.log(s) + m - z[t]
        correct_out[0] = z.argmax() == t
        if grad is not None:
            e *= 1.0 / s
            e[t] -= 1.0

    def sgd(self, p, g, lr, wd):
        if wd:
            p *= 1.0 - lr * wd
        g *= lr
        p -= g

    def momentum(self, p, g, v, lr, mu, wd, nesterov):
        if wd:
            t = self.scratch(p.shape, p.dtype)
            np.multiply(p, wd, out=t)
            g += t
        v *= mu
        v += g
        if nesterov:
            t = self.scratch(p.shape, p.dtype)
            np.multiply(v, mu * lr, out=t)
            g *= lr
            p -= g
            p -= t
        else:
            np.multiply(v, lr, out=g)
            p -= g

    def adam(self, p, g, m, v, t, lr, b1, b2, eps, wd):
        t += 1
        step = int(t[0])
        c1 = 1.0 - b1 ** step
        c2 = 1.0 - b2 ** step
        w = self.scratch(p.shape, p.dtype)
        m *= b1
        np.multiply(g, 1.0 - b1, out=w)
        m += w
        v *= b2
        np.square(g, out=g)
        g *= 1.0 - b2
        v += g
        np.sqrt(v, out=w)
        w *= 1.0 / np.sqrt(c2)
        w += eps
        np.divide(m, w, out=w)  # w = m_hat / (sqrt(v_hat) + eps), up to the 1/c1 below
        if wd:
            p *= 1.0 - lr * wd
        w *= lr / c1
        p -= w


_CPU = None


def set_tf32(enabled: bool) -> None:
    """Allow TF32 tensor-core GEMMs for float32 on the GPU (off by default).

    TF32 keeps 10 mantissa bits in the products: faster on Ampere and Hopper GPUs,
    but results differ from float32 by about 1e-3 relative, enough to flip a
    near-tie argmax. CuPy reads ``CUPY_TF32`` when it is imported, so call this
    before the GPU is first used.
    """
    if "cupy" in sys.modules:
        warnings.warn("set_tf32 called after CuPy was imported: it may not take effect",
                      RuntimeWarning, stacklevel=2)
    os.environ["CUPY_TF32"] = "1" if enabled else "0"


def cuda_status() -> str | None:
    """``None`` when a CUDA GPU is usable through CuPy, else the reason it is not."""
    try:
        from . import cuda_ops
    except ImportError as exc:
        return f"CuPy is not installed ({exc}); install it with: pip install 'fastnn[gpu]'"
    return cuda_ops.device_problem()


def get_ops(device: str = "cpu") -> Ops:
    """The backend for ``"cpu"``, ``"gpu"`` or ``"auto"`` (the GPU when one is usable).

    Raises ConfigError for an unknown name and DeviceError when ``"gpu"`` is asked
    for and CuPy or a CUDA device is missing.
    """
    global _CPU
    if isinstance(device, Ops):
        return device
    if device not in ("cpu", "gpu", "auto"):
        raise ConfigError(f"unknown device {device!r}: choose cpu, gpu or auto")
    if device in ("gpu", "auto"):
        problem = cuda_status()
        if problem is None:
            from .cuda_ops import get_cupy_ops

            return get_cupy_ops()
        if device == "gpu":
            raise DeviceError(f"device 'gpu' is not usable: {problem}")
    if _CPU is None:
        _CPU = NumpyOps()
    return _CPU
