"""NumPy backend: the generic kernels of ``Ops``, with the hot ones rewritten in place."""

from __future__ import annotations

import math

import numpy as np

from . import cpu_fused
from .ops import Dropout, Ops, _mix32, applies

# Below this many parameters the NumPy passes run in cache, and loading Numba and its compiled
# updates (about 1 s, once per process) would cost more than they save.
FUSED_MIN_SIZE = 1 << 16


class NumpyOps(Ops):
    """NumPy backend: every kernel of the training step, written for speed on the CPU.

    The kernels are sequences of ufunc calls with ``out=`` into preallocated
    buffers, since at the sizes of an MNIST MLP the allocator and the extra passes
    over memory cost as much as the arithmetic. The exceptions are ``xent`` and
    ``mse``, which make a few (B,)-sized temporaries (argmax, row maxima, row sums).
    The generic ``Ops`` they override is their test oracle. A stack's (K, ...) arrays
    take the stacked forms of the same calls (``np.matmul`` over the leading axis), and the
    generic losses and dropout masks.
    """

    name = "cpu"

    def __init__(self):
        super().__init__(np)
        self._scratch: dict[tuple, np.ndarray] = {}
        self._masks: dict[tuple, tuple] = {}  # (shape, layer) -> (seed, step, threshold, keep)

    def scratch(self, shape, dtype) -> np.ndarray:
        """A reusable work array of this shape and dtype (overwritten by the next kernel)."""
        key = (shape, dtype)  # shape: a tuple; dtype: a NumPy dtype or type
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

    def dropout_keep(self, shape, drop: Dropout):
        """The generic mask, computed in place in uint32 work arrays, the part of the hash that
        depends on layer and element only computed once, and the mask of the last step kept per
        (shape, layer): the backward pass of a step reuses its forward pass's mask."""
        if np.ndim(drop.seed):  # a stack's per-model seeds
            return super().dropout_keep(shape, drop)
        seed, step, thr = drop.seed & 0xFFFFFFFF, int(drop.step[0]) & 0xFFFFFFFF, drop.threshold
        key = (tuple(shape), drop.layer)
        hit = self._masks.get(key)
        if hit is not None and hit[:3] == (seed, step, thr):
            return hit[3]
        base = self._consts.get(("layer_hash", key))
        if base is None:  # mix32(layer ^ element hash), as in the generic mask
            base = self._consts[("layer_hash", key)] = self._layer_hash(shape, drop.layer)
        h = np.bitwise_xor(base, np.uint32(step), out=self.scratch(shape, np.uint32))
        t = self.scratch((1,) + tuple(shape), np.uint32)[0]
        _mix32_inplace(h, t)
        h ^= np.uint32(seed)
        _mix32_inplace(h, t)
        h >>= np.uint32(8)
        keep = np.greater_equal(h, thr)
        self._masks[key] = (seed, step, thr, keep)
        return keep

    def _layer_hash(self, shape, layer: int) -> np.ndarray:
        """``mix32(layer ^ element hash)`` (shape) uint32: the steps' common part of the mask's hash."""
        return _mix32(np.uint32(layer) ^ self.element_hash(int(np.prod(shape))).reshape(shape))

    def bias_act(self, h, b, act, drop=None):
        if act == "relu" and drop is None and h.ndim == 2 and (fused := cpu_fused.compiled()):
            fused.bias_relu(h, b)  # one pass (the same bits as below): conv outputs, and dense ones without dropout
        elif act == "relu" and (drop is None or h.ndim == 2):
            # h * (h > 0) runs 2x faster than np.maximum(h, 0) on these small matrices
            h += b
            mask = self.scratch(h.shape, np.bool_)
            np.greater(h, 0, out=mask)
            h *= mask
            if drop is not None and drop.active:
                h *= self.dropout_keep(h.shape, drop)
                h *= drop.scale
        else:
            super().bias_act(h, b, act, drop)

    # Convolution and pooling: Numba's one-pass loops (``cpu_fused``) when installed, else NumPy's
    # strided copies. Each is the generic definition's result bit for bit (the patches: as
    # ``patch_matrix`` reads them, which for one input channel is another layout of the buffer).
    def patch_matrix(self, cols):
        if cols.shape[5] == 1:  # one channel: stored transposed, (k*k, B*Ho*Wo) (see im2col); a column-major view
            return cols.reshape(-1).reshape(cols.shape[3] * cols.shape[4], -1).T
        return super().patch_matrix(cols)

    def im2col(self, x, k, pad, cols):
        B, H, W, C = x.shape
        if C == 1:
            # One channel (a first layer): a patch is k*k scattered pixels, so written row by row the copy runs
            # 25 floats at a time. Stored transposed instead, (k, k, B, Ho, Wo), each kernel offset is one
            # strided copy of whole image rows: 3.6x faster (network3's first layer, 128 images), and the GEMMs
            # read the transposed matrix (BLAS's transposed operand) as fast.
            if not cols.flags.c_contiguous:  # the reshape below would copy, and the patches be lost
                raise ValueError(f"im2col: the patch buffer {cols.shape} must be C-contiguous")
            x = self._padded(x, pad)
            Ho, Wo = cols.shape[1], cols.shape[2]
            by_offset = cols.reshape(k, k, B, Ho, Wo)
            for i in range(k):
                for j in range(k):
                    by_offset[i, j] = x[:, i:i + Ho, j:j + Wo, 0]
        elif fused := cpu_fused.compiled():
            fused.im2col(x, k, pad, cols)
        else:  # one strided copy of all k*k patches (the generic version makes one copy per offset)
            windows = np.lib.stride_tricks.sliding_window_view(self._padded(x, pad), (k, k), axis=(1, 2))
            cols[...] = windows.transpose(0, 1, 2, 4, 5, 3)  # (B, Ho, Wo, C, k, k) -> (B, Ho, Wo, k, k, C)

    def _padded(self, x, pad):
        """x (B, H, W, C) with ``pad`` zeros around (a scratch buffer), or x itself for pad 0."""
        if not pad:
            return x
        B, H, W, C = x.shape
        padded = self.scratch((B, H + 2 * pad, W + 2 * pad, C), x.dtype)
        padded[:, :pad], padded[:, H + pad:], padded[:, :, :pad], padded[:, :, W + pad:] = 0, 0, 0, 0
        padded[:, pad:pad + H, pad:pad + W] = x
        return padded

    def conv_input_grad(self, d, W, dcols, out, pad):
        if not (fused := cpu_fused.compiled()):
            return super().conv_input_grad(d, W, dcols, out, pad)
        rows = d.shape[0] * d.shape[1] * d.shape[2]
        np.matmul(d.reshape(rows, -1), W.T, out=dcols.reshape(rows, -1))
        fused.col2im(dcols, pad, out)

    def maxpool(self, x, p, out, arg):
        if fused := cpu_fused.compiled():
            return fused.maxpool(x, p, out, arg)
        super().maxpool(x, p, out, arg)

    def maxpool_backward(self, d, arg, p, out):
        if fused := cpu_fused.compiled():
            return fused.maxpool_backward(d, arg, p, out, None)
        super().maxpool_backward(d, arg, p, out)

    def maxpool_act_backward(self, d, arg, p, out, a, act, drop=None):
        if act == "relu" and drop is None and a.shape == out.shape and (fused := cpu_fused.compiled()):
            return fused.maxpool_backward(d, arg, p, out, a)  # relu's derivative in the same pass
        super().maxpool_act_backward(d, arg, p, out, a, act, drop)

    def translate(self, x, out, limit, seed, step, fill):
        if not (fused := cpu_fused.compiled()):
            return super().translate(x, out, limit, seed, step, fill)
        dy, dx = self.translation_shifts(x.shape[0], limit, seed, step)  # B values; the images in one pass
        fused.shift_images(x, out, dy, dx, out.dtype.type(fill))

    def matmul(self, a, b, out):
        np.matmul(a, b, out=out)

    def weight_grad(self, a, d, out):
        # np.dot goes to BLAS even for B = 1 (an outer product), where np.matmul takes a
        # loop 6x slower and a broadcast multiply 2x slower.
        if d.ndim == 3:
            np.matmul(a.swapaxes(-1, -2), d, out=out)
        else:
            np.dot(a.T, d, out=out)

    def sum_rows(self, d, out):
        # ones @ d runs as one BLAS GEMV: 3x faster than d.sum(axis=0) at B=128.
        ones = self.constant("ones", d.shape[-2], d.dtype)
        if d.ndim == 3:
            np.matmul(ones, d, out=out[:, 0, :])
        else:
            np.dot(ones, d, out=out)

    def act_backward(self, d, a, act, drop=None):
        if drop is not None and not (act == "relu" and d.ndim == 2):
            super().act_backward(d, a, act, drop)
        elif (act == "relu" and drop is None and d.flags.c_contiguous and a.flags.c_contiguous and a.shape == d.shape
              and (fused := cpu_fused.compiled())):  # one pass (the same bits as below), on any shape as rows
            fused.relu_backward(d.reshape(-1, d.shape[-1]), a.reshape(-1, a.shape[-1]))
        elif act == "relu":
            if drop is not None and drop.active:  # the generic order: scale, relu', mask
                d *= drop.scale
            mask = self.scratch(a.shape, np.bool_)
            np.greater(a, 0, out=mask)
            d *= mask
            if drop is not None and drop.active:
                d *= self.dropout_keep(d.shape, drop)
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

    def xent(self, logits, y, grad, loss_out, hits_out, w=None):
        if logits.ndim == 3 and logits.shape[0] == 1 and y.ndim == 1 and w is None:  # a stack of one
            return self.xent(logits[0], y, None if grad is None else grad[0], loss_out.reshape(1),
                             hits_out.reshape(1))
        if w is not None or logits.ndim == 3:  # weighted batches, stacks: the generic kernel
            return super().xent(logits, y, grad, loss_out, hits_out, w)
        b, k = logits.shape
        if b == 1:
            return self._xent_one(logits[0], int(y[0]), grad, loss_out, hits_out)
        rows = self.constant("arange", b, None)
        am = logits.argmax(axis=1)
        m = logits[rows, am]  # the row maxima; cheaper than logits.max(axis=1)
        picked = logits[rows, y]
        hits_out[0] = np.count_nonzero(am == y)
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

    def _xent_one(self, z, t, grad, loss_out, hits_out):
        # Per-sample training calls this 60000 times an epoch: the fewest NumPy calls.
        m = z.max()
        e = grad[0] if grad is not None else self.scratch(z.shape, z.dtype)
        np.subtract(z, m, out=e)
        np.exp(e, out=e)
        s = e.sum()
        loss_out[0] = np.log(s) + m - z[t]
        hits_out[0] = z.argmax() == t
        if grad is not None:
            e *= 1.0 / s
            e[t] -= 1.0

    def mse(self, out, y, grad, loss_out, hits_out, w=None):
        if w is not None or out.ndim == 3:
            return super().mse(out, y, grad, loss_out, hits_out, w)
        b, k = out.shape
        rows = self.constant("arange", b, None)
        diff = grad if grad is not None else self.scratch(out.shape, out.dtype)
        np.copyto(diff, out)
        diff[rows, y] -= 1.0  # out - onehot(y)
        sq = self.scratch(out.shape, out.dtype)
        np.square(diff, out=sq)
        loss_out[0] = sq.sum() / k
        hits_out[0] = np.count_nonzero(out.argmax(axis=1) == y)
        if grad is not None:  # 2 (out - t) out (1 - out) / (B K), in place
            np.subtract(1.0, out, out=sq)
            sq *= out
            grad *= sq
            grad *= 2.0 / (b * k)

    @staticmethod
    def _fused(arrays, *hyperparameters):
        """``cpu_fused``'s compiled one-pass updates, for contiguous arenas (the loops write through
        flat views) of at least FUSED_MIN_SIZE parameters, when Numba is installed and every
        hyperparameter is one float (a stack's per-model (K, 1) arrays take the NumPy sequence);
        else None."""
        if (arrays[0].size < FUSED_MIN_SIZE or not all(a.flags.c_contiguous for a in arrays)
                or not all(isinstance(h, float) for h in hyperparameters)):
            return None
        return cpu_fused.compiled()

    def sgd(self, p, g, lr, wd):
        if fused := self._fused((p, g), lr, wd):
            t = p.dtype.type
            return fused.sgd(p.reshape(-1), g.reshape(-1), t(1.0 - lr * wd if wd else 1.0), t(lr))
        if applies(wd):
            p *= 1.0 - lr * wd
        g *= lr
        p -= g

    def _flush_subnormal(self, state, work):
        """``Ops.flush_subnormal`` through ``work`` (a float array of state's shape, overwritten) and a
        scratch mask: no allocation."""
        np.abs(state, out=work)
        small = self.scratch(state.shape, np.bool_)
        np.less(work, np.finfo(state.dtype).tiny, out=small)
        np.copyto(state, 0, where=small)

    def momentum(self, p, g, v, lr, mu, wd, nesterov):
        if fused := self._fused((p, g, v), lr, mu, wd):
            t = p.dtype.type
            return fused.momentum(p.reshape(-1), g.reshape(-1), v.reshape(-1), t(lr), t(mu), t(wd), t(mu * lr),
                                  bool(nesterov), np.finfo(p.dtype).tiny)
        if applies(wd):
            t = self.scratch(p.shape, p.dtype)
            np.multiply(p, wd, out=t)
            g += t
        v *= mu
        v += g
        self._flush_subnormal(v, self.scratch(p.shape, p.dtype))
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
        if fused := self._fused((p, g, m, v), lr, wd):
            f = p.dtype.type
            return fused.adam(p.reshape(-1), g.reshape(-1), m.reshape(-1), v.reshape(-1), f(b1), f(1.0 - b1),
                              f(b2), f(1.0 - b2), 1.0 / math.sqrt(c2), f(eps), f(1.0 - lr * wd if wd else 1.0),
                              f(lr / c1), np.finfo(p.dtype).tiny)
        w = self.scratch(p.shape, p.dtype)
        m *= b1
        np.multiply(g, 1.0 - b1, out=w)
        m += w
        v *= b2
        np.square(g, out=g)
        g *= 1.0 - b2
        v += g
        self._flush_subnormal(m, w)
        self._flush_subnormal(v, w)
        np.sqrt(v, out=w)
        w *= 1.0 / np.sqrt(c2)  # a NumPy float64: this multiply is done in float64, then rounded
        w += eps
        np.divide(m, w, out=w)  # w = m_hat / (sqrt(v_hat) + eps), up to the 1/c1 below
        if applies(wd):
            p *= 1.0 - lr * wd
        w *= lr / c1
        p -= w


def _mix32_inplace(x: np.ndarray, t: np.ndarray) -> None:
    """lowbias32 (``ops._mix32``, kernels.cu's mix32) of uint32 array x in place; t: a work array like x."""
    for shift, mul in ((16, 0x7FEB352D), (15, 0x846CA68B)):
        np.right_shift(x, np.uint32(shift), out=t)
        x ^= t
        x *= np.uint32(mul)
    np.right_shift(x, np.uint32(16), out=t)
    x ^= t
