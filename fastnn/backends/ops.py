"""The generic kernels: every kernel of the training step, written only against ``xp``.

``Ops`` holds the array module (NumPy or CuPy) in ``self.xp``, so the same code
runs on both backends and is the reference ("oracle") that the faster overrides
in ``numpy_ops.NumpyOps`` and ``cupy_ops.CupyOps`` are tested against.

Conventions for every kernel:

* batches are row-major ``(B, D)``; weights are ``(fan_in, fan_out)``;
* a stack of K models (``fastnn.stack.ModelStack``) adds a leading axis to every weight,
  activation and gradient: ``(K, B, N)``, ``(K, M, N)``, biases ``(K, 1, N)``, labels ``(B,)``
  (one batch order for all) or ``(K, B)``, loss sums ``(K,)``; the generic kernels take both
  forms, and the optimizers take per-model hyperparameters as ``(K, 1)`` arrays;
* floating arrays share one dtype (float32 by default, float64 on request) and
  scalars are passed as Python floats, which never promote an array's dtype;
* results go into caller-given buffers (``out``), so a training step at a fixed
  batch size allocates nothing and can be captured as a CUDA graph;
* loss and hit counts are written into device arrays, never returned as Python
  numbers, so a training epoch never waits on the device.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..errors import ConfigError

ACTIVATIONS = ("relu", "sigmoid", "tanh")
GEMMS = ("fastnn", "cublas")  # the GPU backend's GEMMs: its own fused kernels, or cuBLAS


class Dropout(NamedTuple):
    """Inverted dropout of one layer's output: each element is zeroed with probability ``p``
    and the kept ones scaled by ``1 / (1 - p)``. The mask is a hash of (seed, the value of the
    1-element int32 device counter ``step``, layer, element index), as in ``kernels.cu``.
    In a stack, ``p`` and ``seed`` are host arrays (K, 1, 1), one per model, and the element
    index counts within each model's (B, N) output."""

    p: float
    seed: int
    step: object
    layer: int

    @property
    def threshold(self):
        """Kept when the top 24 bits of the element's hash are >= this (an int, or an int64 array)."""
        t = np.round(np.asarray(self.p, np.float64) * (1 << 24)).astype(np.int64)
        return int(t) if t.ndim == 0 else t

    @property
    def scale(self):
        s = 1.0 / (1.0 - np.asarray(self.p, np.float64))
        return float(s) if s.ndim == 0 else s

    @property
    def active(self) -> bool:
        return bool(np.any(self.threshold))


def applies(v) -> bool:
    """Whether an optimizer term with coefficient ``v`` (a float, or a per-model array) must run."""
    return not isinstance(v, (int, float)) or v != 0


def _mix32(x):
    """lowbias32 (kernels.cu's mix32) on uint32 arrays, wrapping as C does."""
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


class Ops:
    """Generic kernels, written only against ``self.xp``.

    Subclasses set ``name`` (``"cpu"``/``"gpu"``) and may override any method with
    a faster one; the generic versions here stay the reference for their tests.
    """

    name = "generic"
    patches_in_memory = True  # a convolution's patches are written out (im2col) for its GEMMs to read

    def __init__(self, xp):
        self.xp = xp
        self._consts: dict[tuple, object] = {}

    def constant(self, kind: str, n: int, dtype):
        """A cached read-only helper vector (n,): ``"ones"``, ``"zeros"`` or ``"arange"``, of ``dtype``
        (None: the array module's default, int64 for an arange)."""
        key = (kind, n, dtype)
        c = self._consts.get(key)
        if c is None:
            make = {"ones": self.xp.ones, "zeros": self.xp.zeros, "arange": self.xp.arange}[kind]
            c = self._consts[key] = make(n, dtype=dtype)
        return c

    # ----------------------------------------------------------------- memory
    def scratch(self, shape, dtype):
        """A work array of this shape and dtype, overwritten by the next kernel that asks for one
        (here a new array; NumPy's backend keeps one per shape)."""
        return self.xp.empty(shape, dtype)

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

    def matmul_rows(self, a, b, out) -> None:
        """``out = a @ b`` one row at a time: a batch of (1, K) @ (K, N) products, so each row's result
        is computed the same way whatever else its batch holds (a GEMM's summation order changes with
        the batch's size and a row's place in it). a: (M, K) or (S, M, K), b: (K, N) or (S, K, N)."""
        self.xp.matmul(a[..., None, :], b[..., None, :, :], out=out[..., None, :])

    def weight_grad(self, a, d, out) -> None:
        """``out = a.T @ d``: the weight gradient. a: (B, M), d: (B, N), out: (M, N)."""
        self.xp.matmul(a.swapaxes(-1, -2), d, out=out)

    def element_hash(self, n: int):
        """The part of the dropout hash that depends on the element index only (n,) uint32, cached."""
        h = self._consts.get(("element_hash", n))
        if h is None:
            e = self.xp.arange(n, dtype=np.uint64)
            h = _mix32((e & np.uint64(0xFFFFFFFF)).astype(np.uint32) ^ _mix32((e >> np.uint64(32)).astype(np.uint32)))
            self._consts[("element_hash", n)] = h
        return h

    def dropout_keep(self, shape, drop: Dropout):
        """The dropout mask (bool, ``shape``) of a layer's output (B, N) or (K, B, N): True where kept."""
        h = self.element_hash(int(np.prod(shape[-2:])))
        step = np.uint32(int(self.to_host(drop.step)[0]) & 0xFFFFFFFF)
        seed, thr = np.asarray(drop.seed, np.uint32), drop.threshold
        if seed.ndim:  # one per model (K, 1, 1)
            seed, thr = self.asarray(seed), self.asarray(thr)
        h = _mix32(seed ^ _mix32(step ^ _mix32(np.uint32(drop.layer) ^ h.reshape(shape[-2:]))))
        return (h >> np.uint32(8)) >= thr

    def bias_act(self, h, b, act: str, drop: Dropout | None = None) -> None:
        """In place: ``h = act(h + b)``, then dropout if given. h: (B, N), b: (N,); act in
        ACTIVATIONS or ``"linear"``."""
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
        if drop is not None and drop.active:
            h *= self.dropout_keep(h.shape, drop)
            h *= self.asarray(drop.scale, h.dtype)

    def _sigmoid_inplace(self, h) -> None:
        # 1/(1+e^-x) = (1 + tanh(x/2)) / 2: no overflow for any x, no warnings.
        h *= 0.5
        self.xp.tanh(h, out=h)
        h *= 0.5
        h += 0.5

    def act_backward(self, d, a, act: str, drop: Dropout | None = None) -> None:
        """In place: ``d *= act'(z)``, written in terms of the activation ``a = act(z)``
        (``a = dropout(act(z))`` when the layer had dropout: then the mask and scale too).

        d: (B, N) upstream gradient dL/da; a: (B, N) the activation from the forward pass.
        """
        if drop is not None and drop.active:
            scale = self.asarray(drop.scale, d.dtype)
            d *= scale
            self.act_backward(d, a / scale, act)
            d *= self.dropout_keep(d.shape, drop)
            return
        if act == "relu":
            d *= a > 0
        elif act == "sigmoid":
            d *= a * (1.0 - a)
        elif act == "tanh":
            d *= 1.0 - a * a
        elif act != "linear":
            raise ConfigError(f"unknown activation {act!r}")

    def sum_rows(self, d, out) -> None:
        """``out = d.sum(axis=0)``: the bias gradient. d: (B, N), out: (N,); or d (K, B, N), out (K, 1, N)."""
        self.xp.sum(d, axis=-2, out=out[..., 0, :] if d.ndim == 3 else out)

    # The three products of a layer with what follows them, the calls the model makes.
    # Here they are composed of the kernels above; the CuPy backend fuses each one.
    def linear_act(self, a, W, b, out, act: str, drop: Dropout | None = None, rowwise: bool = False) -> None:
        """Forward: ``out = dropout(act(a @ W + b))``. a: (B, M), W: (M, N), b: (N,), out: (B, N).

        rowwise: each row's product on its own (``matmul_rows``), for batch-invariant inference."""
        (self.matmul_rows if rowwise else self.matmul)(a, W, out)
        self.bias_act(out, b, act, drop)

    def input_grad(self, d, W, a, out, act: str, drop: Dropout | None = None) -> None:
        """Backward to the layer's input: ``out = (d @ W.T) * act'(z)`` where ``a = act(z)``.

        d: (B, N) dL/dz of this layer; W: (M, N); a, out: (B, M) the previous layer's
        activation and its dL/dz; drop: the previous layer's dropout.
        """
        self.matmul(d, W.swapaxes(-1, -2), out)
        self.act_backward(out, a, act, drop)

    def param_grads(self, a, d, gW, gb) -> None:
        """``gW = a.T @ d`` and ``gb = d.sum(axis=0)``. a: (B, M), d: (B, N), gW: (M, N), gb: (N,)."""
        self.weight_grad(a, d, gW)
        self.sum_rows(d, gb)

    # ---------------------------------------------- convolution and pooling (NHWC)
    # Images are (B, H, W, C), channels last, so a convolution is one GEMM with no transposes:
    # the k x k patches of every position of every image are the rows of (B*Ho*Wo, k*k*C), and the
    # weight is (k*k*C_in, C_out), rows in (ki, kj, c_in) order. Stride 1; ``pad`` zeros around
    # (0: "valid", (k - 1) // 2 for odd k: "same"). Pooling is p x p, non-overlapping (floor).
    def im2col(self, x, k: int, pad: int, cols) -> None:
        """cols (B, Ho, Wo, k, k, C) = the k x k patches of x (B, H, W, C) padded by ``pad`` zeros:
        one strided copy per kernel offset (k*k of them), none per image or position. A backend may
        lay the buffer out otherwise: read it through ``patch_matrix``."""
        B, H, W, C = x.shape
        Ho, Wo = cols.shape[1], cols.shape[2]
        if pad:
            xp_ = self.xp.zeros((B, H + 2 * pad, W + 2 * pad, C), x.dtype)
            xp_[:, pad:pad + H, pad:pad + W] = x
            x = xp_
        for i in range(k):
            for j in range(k):
                cols[:, :, :, i, j, :] = x[:, i:i + Ho, j:j + Wo, :]

    def patch_matrix(self, cols):
        """The patches that ``im2col`` wrote into cols (B, Ho, Wo, k, k, C) as the GEMMs read them: a
        (B*Ho*Wo, k*k*C) view, one row per output position (here the buffer's own layout; a backend
        may store them otherwise, as long as its im2col and this view agree)."""
        return cols.reshape(cols.shape[0] * cols.shape[1] * cols.shape[2], -1)

    def conv_act(self, x, W, b, cols, out, act: str, pad: int, rowwise: bool = False) -> None:
        """Forward: ``out = act(im2col(x) @ W + b)``, one GEMM. x: (B, H, W, C_in); W: (k*k*C_in, C_out);
        b: (C_out,); cols: (B, Ho, Wo, k, k, C_in), the patches (kept for the weight gradient);
        out: (B, Ho, Wo, C_out); rowwise: each patch's product on its own (as ``linear_act``)."""
        self.im2col(x, cols.shape[3], pad, cols)
        rows = out.shape[0] * out.shape[1] * out.shape[2]
        self.linear_act(self.patch_matrix(cols), W, b, out.reshape(rows, -1), act, rowwise=rowwise)

    def conv_param_grads(self, x, cols, d, gW, gb, pad: int) -> None:
        """``gW = patches.T @ d`` and ``gb = d summed over images and positions``. x: (B, H, W, C_in) the
        layer's input; cols: (B, Ho, Wo, k, k, C_in), its patches from the forward pass (this version reads
        them; a backend that never materializes them reads x and pad); d: (B, Ho, Wo, C_out) dL/dz;
        gW: (k*k*C_in, C_out); gb: (C_out,)."""
        rows = d.shape[0] * d.shape[1] * d.shape[2]
        self.param_grads(self.patch_matrix(cols), d.reshape(rows, -1), gW, gb)

    def conv_input_grad(self, d, W, dcols, out, pad: int) -> None:
        """dL/dx (out, (B, H, W, C_in)) of a convolution from d (B, Ho, Wo, C_out): ``dcols = d @ W.T``
        (one GEMM into dcols (B, Ho, Wo, k, k, C_in)), then col2im: each patch's gradient added back
        where the patch was read (k*k strided adds), the padding cut off."""
        rows = d.shape[0] * d.shape[1] * d.shape[2]
        self.matmul(d.reshape(rows, -1), W.swapaxes(-1, -2), dcols.reshape(rows, -1))
        B, H, Wd, C = out.shape
        k, Ho, Wo = dcols.shape[3], d.shape[1], d.shape[2]
        full = self.scratch((B, H + 2 * pad, Wd + 2 * pad, C), out.dtype) if pad else out
        full[...] = 0
        for i in range(k):
            for j in range(k):
                full[:, i:i + Ho, j:j + Wo, :] += dcols[:, :, :, i, j, :]
        if pad:
            out[...] = full[:, pad:pad + H, pad:pad + Wd]

    def maxpool(self, x, p: int, out, arg) -> None:
        """out (B, H//p, W//p, C) = the max of each p x p window of x (B, H, W, C); arg (same shape,
        int8): the window position of that max, the first in row-major order on ties (the backward
        pass sends the whole gradient there). p*p passes over strided views: no window copies."""
        Ho, Wo = out.shape[1], out.shape[2]
        greater = self.scratch(out.shape, np.bool_)
        arg[...] = 0
        out[...] = x[:, 0:Ho * p:p, 0:Wo * p:p]
        for q in range(1, p * p):
            i, j = divmod(q, p)
            v = x[:, i:Ho * p:p, j:Wo * p:p]
            self.xp.greater(v, out, out=greater)  # strictly greater: ties keep the first
            self.xp.copyto(arg, q, where=greater)
            self.xp.maximum(out, v, out=out)

    def maxpool_backward(self, d, arg, p: int, out) -> None:
        """dL/dx (out, (B, H, W, C)) of max pooling from d (B, H//p, W//p, C): each window's gradient
        goes to its max (``arg`` from ``maxpool``), zero elsewhere (rows and columns no window read too)."""
        Ho, Wo = d.shape[1], d.shape[2]
        if out.shape[1] != Ho * p or out.shape[2] != Wo * p:
            out[...] = 0
        at_q = self.scratch(d.shape, np.bool_)
        for q in range(p * p):
            i, j = divmod(q, p)
            self.xp.equal(arg, q, out=at_q)
            self.xp.multiply(d, at_q, out=out[:, i:Ho * p:p, j:Wo * p:p])

    def maxpool_act_backward(self, d, arg, p: int, out, a, act: str, drop: Dropout | None = None) -> None:
        """dL/dz of the layer below a max pooling: ``maxpool_backward(d, arg, p, out)``, then
        ``act_backward(out, a, act, drop)`` with a (B, H, W, C) that layer's activation (the pooling's
        input). One call, so a backend can do both in one pass."""
        self.maxpool_backward(d, arg, p, out)
        self.act_backward(out, a, act, drop)

    def translate(self, x, out, limit: int, seed: int, step, fill: float) -> None:
        """Random translation, the conv nets' augmentation: out (B, H, W, C) = each image of x (same
        shape) moved by dy rows and dx columns, both in [-limit, limit], the pixels moved in from
        outside set to ``fill``. (dy, dx) of row i is a hash of (seed, the 1-element int32 device
        counter ``step``, i), as the dropout masks are: ``h % n - limit`` and ``h // n % n - limit``
        with n = 2 limit + 1 and h = mix(seed ^ mix(step ^ mix(i ^ 0x9E3779B9)))."""
        xp = self.xp
        B, H, W, _ = x.shape
        dy, dx = self.translation_shifts(B, limit, seed, step)
        ys = xp.arange(H)[None, :] - dy[:, None]  # (B, H): the source row of each output row
        xs = xp.arange(W)[None, :] - dx[:, None]  # (B, W)
        inside = ((ys >= 0) & (ys < H))[:, :, None] & ((xs >= 0) & (xs < W))[:, None, :]
        moved = x[xp.arange(B)[:, None, None], xp.clip(ys, 0, H - 1)[:, :, None], xp.clip(xs, 0, W - 1)[:, None, :]]
        out[...] = xp.where(inside[..., None], moved, xp.asarray(fill, out.dtype))

    def translation_shifts(self, B: int, limit: int, seed: int, step) -> tuple:
        """``translate``'s (dy, dx) of rows 0..B-1, (B,) int64 each (the hash in its docstring)."""
        n = 2 * limit + 1
        step = np.uint32(int(self.to_host(step)[0]) & 0xFFFFFFFF)
        rows = self.xp.arange(B, dtype=np.uint32) ^ np.uint32(0x9E3779B9)
        h = _mix32(np.uint32(seed & 0xFFFFFFFF) ^ _mix32(step ^ _mix32(rows)))
        return (h % np.uint32(n)).astype(np.int64) - limit, (h // np.uint32(n) % np.uint32(n)).astype(np.int64) - limit

    # ----------------------------------------------------------------- losses
    def _at_labels(self, z, y) -> tuple:
        """The index of each row's label entry in z (B, K) or (K_models, B, K); y (B,) or (K_models, B)."""
        rows = self.xp.arange(z.shape[-2])
        if z.ndim == 2:
            return rows, y
        if y.ndim == 1:
            return slice(None), rows, y
        return self.xp.arange(z.shape[0])[:, None], rows, y

    def xent(self, logits, y, grad, loss_out, hits_out, w=None) -> None:
        """Softmax cross-entropy from logits, by log-sum-exp.

        logits: (B, K); y: (B,) int32 labels; grad: (B, K) receives
        ``(softmax(logits) - onehot(y)) / B`` (or None to skip it); loss_out and
        hits_out: 0-d or 1-element arrays that receive the *sum* over the batch
        of the per-sample losses and the number of argmax hits. w: optional (B,)
        per-sample weights: row i's loss and gradient are multiplied by w[i].
        A stack's logits (K_models, B, K) give sums (K_models,), one per model.
        """
        xp = self.xp
        at = self._at_labels(logits, y)
        z, e, s = self._softmax_parts(logits)
        losses = xp.log(s)[..., 0] - z[at]
        loss_out[...] = (losses if w is None else losses * w).sum(axis=-1)
        hits_out[...] = (logits.argmax(axis=-1) == y).sum(axis=-1)
        if grad is not None:
            xp.divide(e, s, out=grad)  # the softmax
            grad[at] -= 1.0
            grad *= 1.0 / logits.shape[-2]
            if w is not None:
                grad *= w[..., None]

    def _softmax_parts(self, logits) -> tuple:
        """``(z, e, s)``: the logits less their row maximum, ``exp(z)`` and its row sums (..., 1), of
        which xent's loss and gradient and the probabilities are made (softmax = e / s)."""
        z = logits - logits.max(axis=-1, keepdims=True)
        e = self.xp.exp(z)
        return z, e, e.sum(axis=-1, keepdims=True)

    def probabilities(self, out, loss: str, proba) -> None:
        """Class probabilities from the network's outputs: ``proba = softmax(out)`` for loss "xent"
        (out: logits), or for "mse" the sigmoid outputs, at least the dtype's smallest normal number
        (a row of zeros would divide by 0), scaled to sum to 1. out, proba: (B, K) or a stack's
        (K_models, B, K); computed in proba's dtype (out's, or float64). The softmax is xent's
        (``_softmax_parts``)."""
        xp = self.xp
        if loss == "xent":
            _, e, s = self._softmax_parts(out.astype(proba.dtype, copy=False))
            xp.divide(e, s, out=proba)
        else:
            xp.maximum(out, xp.finfo(proba.dtype).tiny, out=proba)
            proba /= proba.sum(axis=-1, keepdims=True)

    def mse(self, out, y, grad, loss_out, hits_out, w=None) -> None:
        """Mean squared error of sigmoid outputs against one-hot targets.

        out: (B, K) sigmoid activations; y: (B,) int32. The per-sample loss is
        ``mean_k (out_k - onehot_k)^2``; grad (B, K) receives dL/dz of the batch
        mean, through the sigmoid: ``2 (out - t) out (1 - out) / (B K)``.
        loss_out/hits_out/w and stacks as in ``xent``.
        """
        b, k = out.shape[-2:]
        diff = out.copy()
        diff[self._at_labels(out, y)] -= 1.0
        losses = (diff * diff).sum(axis=-1) / k
        loss_out[...] = (losses if w is None else losses * w).sum(axis=-1)
        hits_out[...] = (out.argmax(axis=-1) == y).sum(axis=-1)
        if grad is not None:
            self.xp.multiply(diff, out * (1.0 - out), out=grad)
            grad *= 2.0 / (b * k)
            if w is not None:
                grad *= w[..., None]

    def count(self, t) -> None:
        """``t += 1`` for a 1-element int32 device counter (Adam's and dropout's step)."""
        t += 1

    # ------------------------------------------------------------- optimizers
    # Each takes the whole flat parameter arena p and gradient arena g (1-D; (K, P) for a
    # stack, whose lr, mu and wd may then be (K, 1) arrays) and updates p (and its state
    # arrays) in place. g may be overwritten (consumed).
    def sgd(self, p, g, lr: float, wd: float) -> None:
        """``p -= lr * (g + wd * p)``."""
        p -= lr * (g + wd * p) if applies(wd) else lr * g

    def flush_subnormal(self, state) -> None:
        """In place: the elements of an optimizer's state below the dtype's smallest normal number in
        magnitude (subnormal numbers and -0) set to +0. The state of a parameter whose gradient stays
        zero (a weight reading an always-blank pixel, a dead unit's) decays geometrically into the
        subnormal range within a few epochs and stays there, and on x86 CPUs every subnormal operand
        costs a microcode assist (Adam's pass 9x as long with a third of m subnormal). The update such
        a value makes (< 1.2e-38 lr / eps in float32) leaves every weight over ~4e-23 lr unchanged
        (eps 1e-8)."""
        tiny = np.finfo(state.dtype).tiny
        self.xp.copyto(state, 0, where=self.xp.abs(state) < tiny)

    def momentum(self, p, g, v, lr: float, mu: float, wd: float, nesterov: bool) -> None:
        """Heavy-ball or Nesterov momentum, PyTorch's convention.

        ``v = mu v + (g + wd p)``, subnormal v flushed to 0 (``flush_subnormal``); ``p -= lr v`` or,
        with Nesterov, ``p -= lr ((g + wd p) + mu v)``.
        """
        gg = g + wd * p if applies(wd) else g
        v *= mu
        v += gg
        self.flush_subnormal(v)
        p -= lr * (gg + mu * v) if nesterov else lr * v

    def adam(self, p, g, m, v, t, lr: float, b1: float, b2: float, eps: float, wd: float) -> None:
        """Adam with bias correction and decoupled weight decay (AdamW).

        t: 1-element int32 array, the number of steps taken so far; this step is
        ``t + 1`` and t is incremented (a device counter, so a captured step stays right).
        ``m = b1 m + (1-b1) g``; ``v = b2 v + (1-b2) g^2``, subnormal values of both flushed to 0
        (``flush_subnormal``); ``p -= lr (m_hat / (sqrt(v_hat) + eps) + wd p)``.
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
        self.flush_subnormal(m)
        self.flush_subnormal(v)
        upd = (m / c1) / (xp.sqrt(v / c2) + eps)
        if applies(wd):
            upd += wd * p
        p -= lr * upd
