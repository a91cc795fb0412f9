"""Layer specs: what a network is made of, and the shape of every layer's output.

A spec is a comma-separated list of tokens (``--layers``, ``MLP(layers=...)``):

* ``conv20k5``: a convolution to 20 channels with a 5 x 5 kernel, stride 1, "valid" (no padding);
  ``conv32k3s``: the same with "same" padding ((k - 1) / 2 zeros around; odd k only);
* ``pool2``: max pooling over non-overlapping 2 x 2 windows (rows and columns past the last
  whole window are dropped, as PyTorch's default);
* ``dense100``: a fully connected layer of 100 units (the images are flattened before the
  first one).

The output layer (``dense`` to the number of classes) is added by the model. Every layer but
pooling and the output carries the model's activation; dropout applies to dense layers only.
Images are (H, W, C), channels last (NHWC), so a convolution is one GEMM over the batch.
"""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING

import numpy as np

from .config import RULES
from .errors import ConfigError

if TYPE_CHECKING:
    from .backends import Ops

TOKEN = re.compile(r"^(?:conv(?P<c>\d+)k(?P<k>\d+)(?P<same>s?)|pool(?P<p>\d+)|dense(?P<n>\d+))$")
MAX_POOL = 11  # p*p window positions fit the int8 argmax of the pooling kernels
GRAMMAR = "convCkK (or convCkKs for 'same' padding), poolP, denseN; e.g. conv20k5,pool2,conv40k5,pool2,dense100"


@dataclasses.dataclass(frozen=True)
class Layer:
    """One layer: ``kind`` "conv", "pool" or "dense"; ``size`` the output channels (conv) or units
    (dense); ``k`` the kernel side (conv) or window side (pool); ``pad`` conv's zero padding;
    ``shape_in`` / ``shape_out``: (H, W, C) for conv and pool, (N,) for dense."""

    kind: str
    size: int
    k: int
    pad: int
    shape_in: tuple
    shape_out: tuple

    @property
    def width_in(self) -> int:
        return _prod(self.shape_in)

    @property
    def width_out(self) -> int:
        return _prod(self.shape_out)

    @property
    def weight_shape(self) -> tuple:
        """The GEMM operand: (k*k*C_in, C_out) for a convolution, (fan_in, fan_out) for dense; () for pooling."""
        if self.kind == "conv":
            return (self.k * self.k * self.shape_in[2], self.size)
        return (self.width_in, self.size) if self.kind == "dense" else ()

    def token(self) -> str:
        if self.kind == "conv":
            return f"conv{self.size}k{self.k}" + ("s" if self.pad else "")
        return f"pool{self.k}" if self.kind == "pool" else f"dense{self.size}"


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def parse(spec: str, image_shape: tuple, classes: int) -> list[Layer]:
    """The layers of ``spec`` on images of ``image_shape`` (H, W, C), then the output layer of
    ``classes`` units; ConfigError naming the token that is malformed or does not fit."""
    tokens = [t.strip() for t in str(spec).split(",") if t.strip()]
    if not tokens:
        raise ConfigError(f"--layers {spec!r}: no layers ({GRAMMAR})")
    shape, layers = tuple(int(s) for s in image_shape), []
    for t in tokens:
        m = TOKEN.match(t)
        if m is None or any(v is not None and int(v) < 1 for v in m.group("c", "k", "p", "n")):
            raise ConfigError(f"--layers {spec!r}: {t!r} is not a layer ({GRAMMAR})")
        layers.append(_layer(m, t, spec, shape))
        shape = layers[-1].shape_out
    layers.append(Layer("dense", int(classes), 0, 0, (_prod(shape),), (int(classes),)))
    return layers


def _layer(m, token: str, spec: str, shape: tuple) -> Layer:
    if m.group("n") is not None:
        n = int(m.group("n"))
        return Layer("dense", n, 0, 0, (_prod(shape),), (n,))
    if len(shape) != 3:
        raise ConfigError(f"--layers {spec!r}: {token!r} comes after a dense layer (convolutions and pooling "
                          "work on images: put them first)")
    H, W, C = shape
    if m.group("p") is not None:
        p = int(m.group("p"))
        if p > H or p > W:
            raise ConfigError(f"--layers {spec!r}: {token!r} pools {p} x {p} windows of {H} x {W} images")
        if p > MAX_POOL:
            raise ConfigError(f"--layers {spec!r}: {token!r}: pooling windows are at most {MAX_POOL} x {MAX_POOL} "
                              "(a window's max is kept as an int8 position)")
        return Layer("pool", C, p, 0, shape, (H // p, W // p, C))
    c, k, same = int(m.group("c")), int(m.group("k")), bool(m.group("same"))
    if same and k % 2 == 0:
        raise ConfigError(f"--layers {spec!r}: {token!r}: 'same' padding needs an odd kernel")
    pad = (k - 1) // 2 if same else 0
    if H + 2 * pad < k or W + 2 * pad < k:
        raise ConfigError(f"--layers {spec!r}: {token!r} has a {k} x {k} kernel for {H} x {W} images")
    return Layer("conv", c, k, pad, shape, (H + 2 * pad - k + 1, W + 2 * pad - k + 1, c))


def dense_spec(hidden, inputs: int, classes: int) -> list[Layer]:
    """An MLP's layers: dense layers of widths ``hidden`` on ``inputs`` features, then the output."""
    widths = [int(inputs), *[int(n) for n in hidden], int(classes)]
    return [Layer("dense", o, 0, 0, (i,), (o,)) for i, o in zip(widths[:-1], widths[1:])]


def image_shape_of(width: int, image_shape=None) -> tuple:
    """(H, W, C) of images of ``width`` pixels: ``image_shape`` checked against the width, or by
    default a square single-channel image (784 -> (28, 28, 1)); ConfigError if neither fits."""
    if image_shape is not None:
        shape = tuple(int(s) for s in image_shape)
        if len(shape) == 2:
            shape += (1,)
        if len(shape) != 3 or _prod(shape) != int(width) or min(shape) < 1:
            raise ConfigError(f"image_shape {tuple(image_shape)} does not hold {width} input values (H * W * C)")
        return shape
    side = int(round(int(width) ** 0.5))
    if side * side != int(width):
        raise ConfigError(f"{width} input values are not a square image: give image_shape=(H, W, C)")
    return (side, side, 1)


def translated_shape(width: int, image_shape, translate: int) -> tuple:
    """(H, W, C) of the images that ``translate`` pixels move (``image_shape_of``), the shift checked to be
    less than their side."""
    shape = image_shape_of(width, image_shape)
    if translate >= min(shape[:2]):
        raise ConfigError(f"translate must be less than the images' side ({min(shape[:2])} pixels), got {translate}")
    return shape


def dropout_rates(dropout, n_hidden: int) -> list[float]:
    """One dropout probability per hidden layer, from one for all or a list; ConfigError if invalid."""
    rates = [dropout] * n_hidden if np.isscalar(dropout) else list(dropout)
    if len(rates) != n_hidden or not RULES["dropout"].holds_all(rates):
        raise ConfigError(f"dropout must be one probability {RULES['dropout'].text} or one per hidden layer "
                          f"({n_hidden}), got {dropout!r}")
    return [float(p) for p in rates]


def layer_dropout(dropout, layers: list[Layer]) -> list[float]:
    """The dropout of each hidden layer's output: one rate for every dense hidden layer (convolutions
    and pooling get none), or one per hidden layer, 0 for convolutions and pooling."""
    hidden = layers[:-1]
    if np.isscalar(dropout):
        dropout_rates(dropout, 1)  # the rule's check
        return [float(dropout) if l.kind == "dense" else 0.0 for l in hidden]
    rates = dropout_rates(dropout, len(hidden))
    if any(p and l.kind != "dense" for p, l in zip(rates, hidden)):
        raise ConfigError(f"dropout applies to dense layers only, got {dropout!r} for {[l.token() for l in hidden]}")
    return rates


class Workspace:
    """Preallocated buffers for one batch size B.

    x: (B, D) float input batch; y: (B,) int32 labels; w: (B,) float per-sample weights
    (used when ``weighted``); acts[l]: (B, n_{l+1}) activations a[l+1] ((B, H, W, C) after a
    convolution or pooling); deltas[l]: dL/dz of layer l, the same shape; loss (1,) float: the
    sum of the batch's (weighted) per-sample losses; hits (1,) int32: its correct argmaxes.

    For a stack of K models (``stack=(K,)``) acts, deltas, loss and hits get a leading K
    axis, and so do x, y and w when each model has its own batch (``per_model``).
    """

    def __init__(self, ops: Ops, layers: list[Layer], batch: int, dtype, stack: tuple = (), per_model: bool = False):
        xp = ops.xp
        lead = stack if per_model else ()
        self.x = xp.empty(lead + (batch, layers[0].width_in), dtype)
        self.y = xp.empty(lead + (batch,), np.int32)
        self.w = xp.empty(lead + (batch,), dtype)
        self.weighted = False
        self.acts = [xp.empty(stack + (batch, *l.shape_out), dtype) for l in layers]
        self.deltas = [xp.empty(stack + (batch, *l.shape_out), dtype) for l in layers]
        # a convolution's patches (B, Ho, Wo, k, k, C_in), kept from forward for its weight gradient, then
        # overwritten by their gradient (the input gradient's GEMM, after the weight gradient has read them),
        # where the backend writes patches out (``Ops.patches_in_memory``); a pooling layer's argmax
        # (B, Ho, Wo, C) int8; None for the other layers
        self.cols = [xp.empty((batch, *l.shape_out[:2], l.k, l.k, l.shape_in[2]), dtype)
                     if l.kind == "conv" and ops.patches_in_memory else None for l in layers]
        self.args = [xp.empty((batch, *l.shape_out), np.int8) if l.kind == "pool" else None for l in layers]
        self.loss = xp.zeros(stack or (1,), dtype)
        self.hits = xp.zeros(stack or (1,), np.int32)
