"""The NumPy backend's optimizer updates, and its conv, pooling and image-shift loops, as single fused passes
compiled by Numba when it is installed (``pip install 'fastnn[fast]'``; ``FASTNN_NUMBA=0`` turns
them off).

NumPy runs an Adam step as 13 passes over the parameter arena, each a separate ufunc call, and
at an MLP's sizes those passes, not the arithmetic, are the cost (a third of a default epoch).
Here each update is one pass, element by element, doing exactly the float operations of
``NumpyOps``' sequence in the same order, with the same constants rounded to the arena's dtype
first (the caller passes them), and no fused multiply-add (Numba compiles without fastmath):
so the result is the same bit for bit, whichever path runs (``tests/test_backend.py``).

Each optimizer function takes 1-D arrays of one dtype (float32 or float64) and scalars of that dtype.
``compiled()`` gives them compiled (on first use: ``import fastnn`` does not import Numba), or None.
"""

from __future__ import annotations

import math
import os
import types

import numpy as np

_compiled: list = []  # [namespace or None], filled on first use


def compiled() -> types.SimpleNamespace | None:
    """``sgd``, ``momentum``, ``adam`` and the conv and pooling loops compiled by Numba (each on its
    first call, cached on disk), or None without Numba or with ``FASTNN_NUMBA=0``."""
    if not _compiled:
        try:
            if os.environ.get("FASTNN_NUMBA", "1") == "0":
                raise ImportError
            import numba
        except Exception:  # not installed, or not usable with this NumPy: the NumPy sequences run
            _compiled.append(None)
        else:
            jit = numba.njit(cache=True, nogil=True, error_model="numpy")
            # one thread each: a loop split over the cores fights BLAS's threads (and other processes) for
            # them, 3-8x slower than one thread on a busy 2-core machine
            _compiled.append(types.SimpleNamespace(**{f.__name__: jit(f) for f in (
                sgd, momentum, adam, im2col, col2im, maxpool, maxpool_backward, bias_relu, relu_backward,
                shift_images)}))
    return _compiled[0]


def sgd(p, g, decay, lr):
    """``p = p * decay - g * lr`` (decay = 1 - lr wd, rounded)."""
    for e in range(p.shape[0]):
        p[e] = p[e] * decay - g[e] * lr


def momentum(p, g, v, lr, mu, wd, mu_lr, nesterov, tiny):
    """``gg = g + p wd`` (wd > 0); ``v = v mu + gg``, 0 where ``|v| < tiny`` (``Ops.flush_subnormal``);
    ``p -= gg lr + v mu_lr`` (Nesterov) or ``v lr``."""
    zero = p.dtype.type(0)
    for e in range(p.shape[0]):
        ge = g[e] + p[e] * wd if wd != 0 else g[e]
        ve = v[e] * mu + ge
        ve = zero if abs(ve) < tiny else ve
        v[e] = ve
        p[e] = (p[e] - ge * lr) - ve * mu_lr if nesterov else p[e] - ve * lr


def adam(p, g, m, v, b1, a1, b2, a2, inv_sqrt_c2, eps, decay, lr_c1, tiny):
    """``m = m b1 + g a1``; ``v = v b2 + g^2 a2``, each 0 where below ``tiny`` in magnitude
    (``Ops.flush_subnormal``); ``p = p decay - m / (sqrt(v) inv_sqrt_c2 + eps) lr_c1``
    (a1 = 1 - b1, a2 = 1 - b2, the bias corrections c1 = 1 - b1^t, c2 = 1 - b2^t, decay = 1 - lr wd).
    inv_sqrt_c2 is a float64, and ``sqrt(v) inv_sqrt_c2`` is done in float64 and rounded, as NumPy
    does with a float64 scalar; every other constant has the arena's dtype."""
    zero = p.dtype.type(0)
    for e in range(p.shape[0]):
        ge = g[e]
        me = m[e] * b1 + ge * a1
        ve = v[e] * b2 + (ge * ge) * a2
        me = zero if abs(me) < tiny else me
        ve = zero if abs(ve) < tiny else ve
        m[e] = me
        v[e] = ve
        root = p.dtype.type(math.sqrt(ve) * inv_sqrt_c2)
        p[e] = p[e] * decay - (me / (root + eps)) * lr_c1


# Convolution and pooling (NHWC; ``ops.Ops`` has their definitions and docstrings): one pass each,
# the channel loop innermost (contiguous), every output element written once in the generic
# version's order of operations, so the results are the same bit for bit.
def im2col(x, k, pad, cols):
    """cols (B, Ho, Wo, k, k, C) = the k x k patches of x (B, H, W, C), zeros where a patch
    reaches past the border by ``pad``."""
    B, H, W, C = x.shape
    Ho, Wo = cols.shape[1], cols.shape[2]
    for b in range(B):
        for oy in range(Ho):
            for ox in range(Wo):
                patch = cols[b, oy, ox]
                for i in range(k):
                    y = oy + i - pad
                    for j in range(k):
                        xx = ox + j - pad
                        dst = patch[i, j]
                        if 0 <= y < H and 0 <= xx < W:
                            src = x[b, y, xx]
                            for c in range(C):
                                dst[c] = src[c]
                        else:
                            dst[:] = 0


def col2im(dcols, pad, out):
    """out (B, H, W, C) = the sum, over the patches that read each element of the input, of their
    gradients dcols (B, Ho, Wo, k, k, C): per image, the k*k offsets added in (i, j) order from zero,
    as the generic version's strided adds do."""
    B, H, W, C = out.shape
    Ho, Wo, k = dcols.shape[1], dcols.shape[2], dcols.shape[3]
    for b in range(B):
        out[b] = 0
        for i in range(k):
            for j in range(k):
                for oy in range(max(0, pad - i), min(Ho, H + pad - i)):
                    for ox in range(max(0, pad - j), min(Wo, W + pad - j)):
                        o, g = out[b, oy + i - pad, ox + j - pad], dcols[b, oy, ox, i, j]
                        for c in range(C):
                            o[c] += g[c]


def maxpool(x, p, out, arg):
    """out (B, Ho, Wo, C) = the max of each p x p window of x, arg its first position (int8); NaN
    propagates to out as ``np.maximum`` does, without moving arg (``np.greater`` is false). A row of
    windows at a time, their positions in order, each over a contiguous run of x."""
    B, Ho, Wo, C = out.shape
    at = np.empty((Wo, C), np.int32)  # the windows' arg in int32: selects into int8 do not vectorize (3x slower)
    for b in range(B):
        for oy in range(Ho):
            m = out[b, oy]
            for q in range(p * p):
                i = q // p
                row = x[b, oy * p + i]
                for ox in range(Wo):
                    v, mo, ao = row[ox * p + q - i * p], m[ox], at[ox]
                    if q == 0:
                        for c in range(C):
                            mo[c] = v[c]
                            ao[c] = 0
                    else:
                        for c in range(C):  # selects, not branches: random data would mispredict half
                            vc, mc = v[c], mo[c]
                            greater = vc > mc
                            mo[c] = vc if greater | (vc != vc) else mc
                            ao[c] = q if greater else ao[c]
            a = arg[b, oy]
            for ox in range(Wo):
                for c in range(C):
                    a[ox, c] = at[ox, c]


def maxpool_backward(d, arg, p, out, relu_of):
    """out (B, H, W, C) = each window's gradient d (B, Ho, Wo, C) at its max (``d * (arg == q)``), zero
    elsewhere, also in the rows and columns no window read. relu_of: None, or the pooling's input
    (B, H, W, C), a relu's output: then times relu's derivative too (``* (relu_of > 0)``, as
    ``relu_backward`` after this pass would)."""
    B, H, W, C = out.shape
    Ho, Wo = d.shape[1], d.shape[2]
    one, zero = out.dtype.type(1), out.dtype.type(0)
    for b in range(B):
        for y in range(H):
            oy = y // p
            if oy >= Ho:  # a row no window read
                out[b, y] = 0
                continue
            out_row, d_row, arg_row = out[b, y], d[b, oy], arg[b, oy]
            for ox in range(Wo):
                dw, at = d_row[ox], arg_row[ox]
                for j in range(p):
                    q, o = (y - oy * p) * p + j, out_row[ox * p + j]
                    if relu_of is not None:
                        a = relu_of[b, y, ox * p + j]
                        for c in range(C):
                            o[c] = (dw[c] * (one if at[c] == q else zero)) * (one if a[c] > 0 else zero)
                    else:
                        for c in range(C):
                            o[c] = dw[c] * (one if at[c] == q else zero)
            out_row[Wo * p:] = 0  # the columns no window read


# relu's forward and backward passes on a conv layer's (rows, C) output, as NumpyOps does them in
# NumPy (``h += b; h *= h > 0`` and ``d *= a > 0``: a product by 1 or 0, so -0.0 and NaN as there)
def bias_relu(h, b):
    """In place: h (R, N) = relu(h + b), b (N,)."""
    one, zero = h.dtype.type(1), h.dtype.type(0)
    for r in range(h.shape[0]):
        for j in range(h.shape[1]):
            v = h[r, j] + b[j]
            h[r, j] = v * (one if v > 0 else zero)


def relu_backward(d, a):
    """In place: d (R, N) *= (a > 0), a (R, N) the layer's relu output."""
    one, zero = d.dtype.type(1), d.dtype.type(0)
    for r in range(d.shape[0]):
        for j in range(d.shape[1]):
            d[r, j] = d[r, j] * (one if a[r, j] > 0 else zero)


def shift_images(x, out, dy, dx, fill):
    """out (B, H, W, C) = image b of x moved by dy[b] rows and dx[b] columns (``Ops.translate``'s shifts),
    ``fill`` where the pixel came from outside."""
    B, H, W, C = x.shape
    for b in range(B):
        for y in range(H):
            sy = y - dy[b]
            for xx in range(W):
                sx = xx - dx[b]
                if 0 <= sy < H and 0 <= sx < W:
                    for c in range(C):
                        out[b, y, xx, c] = x[b, sy, sx, c]
                else:
                    for c in range(C):
                        out[b, y, xx, c] = fill
