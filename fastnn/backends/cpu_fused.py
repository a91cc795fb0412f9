"""The NumPy backend's optimizer updates as single fused loops, compiled by Numba when it is
installed (``pip install 'fastnn[fast]'``; ``FASTNN_NUMBA=0`` turns them off).

NumPy runs an Adam step as 13 passes over the parameter arena, each a separate ufunc call, and
at an MLP's sizes those passes, not the arithmetic, are the cost (a third of a default epoch).
Here each update is one pass, element by element, doing exactly the float operations of
``NumpyOps``' sequence in the same order, with the same constants rounded to the arena's dtype
first (the caller passes them), and no fused multiply-add (Numba compiles without fastmath):
so the result is the same bit for bit, whichever path runs (``tests/test_backend.py``).

Each function takes 1-D arrays of one dtype (float32 or float64) and scalars of that dtype.
``compiled()`` gives them compiled (on first use: ``import fastnn`` does not import Numba), or None.
"""

from __future__ import annotations

import math
import os
import types

_compiled: list = []  # [namespace or None], filled on first use


def compiled() -> types.SimpleNamespace | None:
    """``sgd``, ``momentum`` and ``adam`` compiled by Numba (cached on disk), or None without Numba
    or with ``FASTNN_NUMBA=0``."""
    if not _compiled:
        try:
            if os.environ.get("FASTNN_NUMBA", "1") == "0":
                raise ImportError
            import numba
        except Exception:  # not installed, or not usable with this NumPy: the NumPy sequences run
            _compiled.append(None)
        else:
            jit = numba.njit(cache=True, nogil=True, error_model="numpy")
            _compiled.append(types.SimpleNamespace(sgd=jit(sgd), momentum=jit(momentum), adam=jit(adam)))
    return _compiled[0]


def sgd(p, g, decay, lr):
    """``p = p * decay - g * lr`` (decay = 1 - lr wd, rounded)."""
    for e in range(p.shape[0]):
        p[e] = p[e] * decay - g[e] * lr


def momentum(p, g, v, lr, mu, wd, mu_lr, nesterov):
    """``gg = g + p wd`` (wd > 0); ``v = v mu + gg``; ``p -= gg lr + v mu_lr`` (Nesterov) or ``v lr``."""
    for e in range(p.shape[0]):
        ge = g[e] + p[e] * wd if wd != 0 else g[e]
        ve = v[e] * mu + ge
        v[e] = ve
        p[e] = (p[e] - ge * lr) - ve * mu_lr if nesterov else p[e] - ve * lr


def adam(p, g, m, v, b1, a1, b2, a2, inv_sqrt_c2, eps, decay, lr_c1):
    """``m = m b1 + g a1``; ``v = v b2 + g^2 a2``; ``p = p decay - m / (sqrt(v) inv_sqrt_c2 + eps) lr_c1``
    (a1 = 1 - b1, a2 = 1 - b2, the bias corrections c1 = 1 - b1^t, c2 = 1 - b2^t, decay = 1 - lr wd).
    inv_sqrt_c2 is a float64, and ``sqrt(v) inv_sqrt_c2`` is done in float64 and rounded, as NumPy
    does with a float64 scalar; every other constant has the arena's dtype."""
    for e in range(p.shape[0]):
        ge = g[e]
        me = m[e] * b1 + ge * a1
        ve = v[e] * b2 + (ge * ge) * a2
        m[e] = me
        v[e] = ve
        root = p.dtype.type(math.sqrt(ve) * inv_sqrt_c2)
        p[e] = p[e] * decay - (me / (root + eps)) * lr_c1
