"""The multilayer perceptron: flat parameter arena, forward, backward.

All parameters live in one 1-D array (the *arena*) and all gradients in another
of the same layout; ``W[l]`` (fan_in, fan_out) and ``b[l]`` (fan_out,) are views
into them. An optimizer step is therefore one kernel over the whole arena.

One training step on a batch ``x`` (B, D), labels ``y`` (B,) int32::

    forward:   a[0] = x;  a[l+1] = act(a[l] @ W[l] + b[l])      one GEMM per layer
    loss:      delta[L-1] = dL/dz of the last layer              fused (softmax/MSE)
    backward:  gW[l] = a[l].T @ delta[l];  gb[l] = sum_rows(delta[l])
               delta[l-1] = (delta[l] @ W[l].T) * act'(a[l])    two GEMMs per layer

Each layer is three backend calls, ``linear_act``, ``param_grads`` and
``input_grad``: a GEMM with what follows it, fused into one kernel on the GPU.

Per-sample training is the same code with B = 1 (``a.T @ delta`` is then the
outer product). Buffers for a batch size live in a ``Workspace``, built once.
"""

from __future__ import annotations

import warnings

import numpy as np

from . import npzfile
from .backends import ACTIVATIONS, Dropout, get_ops, resolve_dtype
from .config import INITS, LOSSES, check
from .errors import ConfigError, DataError
from .guards import DIVERGED, check_fits, describe_nonfinite, file_params, nonfinite_params
from .layers import Workspace, dense_spec, dropout_rates, image_shape_of, layer_dropout, parse, translated_shape
from .preprocessing import Preprocessing

__all__ = ["MLP", "Workspace", "LOSSES", "INITS", "dropout_rates"]


class MLP:
    """A dense network ``sizes[0] -> ... -> sizes[-1]`` with biases.

    sizes: layer widths, e.g. ``(784, 128, 64, 10)``; activation: hidden-layer
    activation, one of relu, sigmoid, tanh; loss: ``"xent"`` (softmax
    cross-entropy on linear logits) or ``"mse"`` (sigmoid outputs, squared error
    against one-hot targets); init: xavier/glorot, he or normal (default: he for
    relu, xavier otherwise); device: cpu, gpu or auto; dtype: float32 or float64.
    dropout: the dropout probability of the hidden layers' outputs during training, one
    for all or one per hidden layer (inverted dropout, fused into the layer kernels, masks
    from a hash of seed, step, layer and element; off in evaluation and prediction).
    translate: in training, each image moved by up to this many pixels each way (images of
    ``image_shape``, square single-channel ones by default; an MLP's too), a hash of seed, step and
    row choosing the shift; 0: off.

    ``preprocessing`` (a ``Preprocessing``: scale, shift, pixel range) maps raw
    uint8 inputs to network inputs; float inputs are used as given. Set it to the
    data set's (``model.preprocessing = ds.preprocessing``); it is saved with the model.

    Parameters live in one flat arena ``params`` (P,) and gradients in ``grads`` (P,);
    ``W[l]`` (sizes[l], sizes[l+1]) and ``b[l]`` (sizes[l+1],) are views into
    ``params``, ``gW[l]`` and ``gb[l]`` the same views into ``grads``.
    """

    stack: tuple = ()  # (K,) in a ModelStack: the leading axis of every arena, view and activation

    def __init__(self, sizes, activation="relu", loss="xent", init=None, device="cpu",
                 dtype="float32", seed=0, dropout=0.0, layers=None, image_shape=None, translate=0):
        sizes = tuple(int(n) for n in sizes)
        if len(sizes) < 2 or min(sizes) < 1:
            raise ConfigError(f"sizes must list at least two positive widths, got {sizes}")
        self.layer_spec, self.image_shape = layers, None  # a conv net's spec (fastnn.layers); (H, W, C) of images
        if layers is None:
            self.layers = dense_spec(sizes[1:-1], sizes[0], sizes[-1])
        else:
            if self.stack:
                raise ConfigError("a stack of conv nets is not supported yet: train them one at a time")
            self.image_shape = image_shape_of(sizes[0], image_shape)
            self.layers = parse(layers, self.image_shape, sizes[-1])
            sizes = (sizes[0], *(l.width_out for l in self.layers))  # every layer's output, flattened
        if activation not in ACTIVATIONS:
            raise ConfigError(f"unknown activation {activation!r}: choose one of {', '.join(ACTIVATIONS)}")
        check("loss", loss)
        init = check("init", ("he" if activation == "relu" else "xavier") if init is None else init)
        check("seed", seed)
        if loss == "xent" and sizes[-1] < 2:
            raise ConfigError("softmax cross-entropy needs at least 2 output classes")
        self.dropout = layer_dropout(dropout, self.layers)
        self.translate = check("translate", translate)
        if translate:  # the images' shape: a conv net's, or for an MLP the one given (square by default)
            self.image_shape = translated_shape(sizes[0], self.image_shape or image_shape, translate)
        self.sizes = sizes
        self.activation = activation
        self.loss = loss
        self.init = init
        self.seed = seed
        self.dtype = resolve_dtype(dtype)
        # before a byte is allocated (a conv net: its layers give the parameters and the patch buffers)
        check_fits(sizes, self.dtype, int(np.prod(self.stack)), layers=self.layers if layers else None, spec=layers)
        self.ops = get_ops(device)
        self.device = self.ops.name
        self.preprocessing = Preprocessing()
        self.classes = None  # optional class names, saved with the model
        # the activation of each layer's output: hidden layers, then the output layer
        self.layer_activations = ["linear" if l.kind == "pool" else activation for l in self.layers[:-1]] + [
            "linear" if loss == "xent" else "sigmoid"]
        self.shapes = []  # [W0, b0, W1, b1, ...] shapes, in arena order (pooling layers have none)
        for l in self.layers:
            self.shapes += [l.weight_shape, (l.size,)] if l.kind != "pool" else []
        self.size = sum(int(np.prod(s)) for s in self.shapes)
        xp = self.ops.xp
        try:
            self.params = xp.zeros(self.stack + (self.size,), self.dtype)  # (P,) the arena ((K, P) in a stack)
            self.grads = xp.zeros(self.stack + (self.size,), self.dtype)  # the gradient arena, same layout
        except MemoryError:  # check_fits counts the whole machine; others may be using it
            raise ConfigError(f"a {'-'.join(map(str, sizes))} network does not fit in the memory free on "
                              f"{self.device} now ({self.size} parameters in {self.dtype.name})") from None
        self.W, self.b = self._views(self.params)  # W[l]: (n_l, n_{l+1}); b[l]: (n_{l+1},)
        self.gW, self.gb = self._views(self.grads)  # dL/dW[l], dL/db[l]
        self._workspaces: dict[int, Workspace] = {}
        self.step = xp.zeros(1, np.int32)  # training steps taken: the dropout masks' counter, on the device
        self.set_params(self._init_params(np.random.default_rng(seed)))

    # ------------------------------------------------------------ parameters
    @property
    def n_layers(self) -> int:
        return len(self.sizes) - 1

    @property
    def uses_dropout(self) -> bool:
        """Whether a training step draws random numbers (dropout masks, translations) from ``step``."""
        return any(self.dropout) or self.translate > 0

    def _views(self, arena) -> tuple[list, list]:
        """Per-layer views ``(W, b)`` into a 1-D arena laid out as ``W0, b0, W1, b1, ...``
        (in a stack's (K, P) arena: W (K, n_l, n_{l+1}) and b (K, 1, n_{l+1}))."""
        views, off = [], 0
        for shape in self.shapes:
            n = int(np.prod(shape))
            view_shape = self.stack + ((1,) + shape if self.stack and len(shape) == 1 else shape)
            views.append(arena[..., off:off + n].reshape(view_shape))
            off += n
        pairs = iter(zip(views[0::2], views[1::2]))  # pooling layers: (None, None)
        W, b = zip(*[(None, None) if l.kind == "pool" else next(pairs) for l in self.layers])
        return list(W), list(b)

    def param_list(self, arena_views=None) -> list:
        """``[W0, b0, W1, b1, ...]``: the parameter views (or ``(gW, gb)``'s), interleaved."""
        ws, bs = arena_views or (self.W, self.b)
        return [t for pair in zip(ws, bs) for t in pair if t is not None]

    def _init_params(self, rng):
        out = []
        for layer in (l for l in self.layers if l.kind != "pool"):
            fi, fo = layer.weight_shape
            fan_out = fo * layer.k * layer.k if layer.kind == "conv" else fo  # as PyTorch counts a conv's
            if self.init in ("xavier", "glorot"):
                std = np.sqrt(2.0 / (fi + fan_out))
            elif self.init == "he":
                std = np.sqrt(2.0 / fi)
            else:  # "normal": N(0, 1/fan_in), as in Nielsen's network.py
                std = np.sqrt(1.0 / fi)
            out += [rng.standard_normal((fi, fo)) * std, np.zeros(fo)]
        return out

    def get_params(self) -> list[np.ndarray]:
        """``[W1, b1, W2, b2, ...]`` as NumPy copies; W (fan_in, fan_out), b (fan_out,)."""
        return [self.ops.to_host(v).copy() for v in self.param_list()]

    def set_params(self, params) -> None:
        """Copy ``[W1, b1, ...]`` (NumPy or device arrays) into the arena."""
        params = list(params)
        if len(params) != len(self.shapes):
            raise ConfigError(f"expected {len(self.shapes)} arrays, got {len(params)}")
        for i, (view, p) in enumerate(zip(self.param_list(), params)):
            if tuple(p.shape) != view.shape:
                raise ConfigError(f"parameter {i} has shape {tuple(p.shape)}, expected {view.shape}")
            view[...] = self.ops.asarray(p, self.dtype)

    # ------------------------------------------------------------------ data
    def workspace(self, batch: int, per_model: bool = False) -> Workspace:
        """The buffers for batch size ``batch``, kept for the few sizes used most recently
        (the training batch, the ragged last batch, evaluation batches); per_model: a
        stack's workspace with one batch per model."""
        key = (batch, per_model)
        ws = self._workspaces.pop(key, None)
        if ws is None:
            ws = Workspace(self.ops, self.layers, batch, self.dtype, self.stack, per_model)
            while len(self._workspaces) >= 4:
                self._workspaces.pop(next(iter(self._workspaces)))
        self._workspaces[key] = ws  # most recently used last
        return ws

    def check_inputs(self, x, y=None, name="x"):
        """Validate host arrays before they are uploaded; raises DataError."""
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.sizes[0]:
            raise DataError(f"{name} has shape {tuple(x.shape)}, the model expects (N, {self.sizes[0]})")
        if x.shape[0] == 0:
            raise DataError(f"{name} is empty")
        xp = self.ops.xp if not isinstance(x, np.ndarray) else np
        if x.dtype.kind == "f":
            if not bool(xp.isfinite(x).all()):
                raise DataError(f"{name} contains NaN or infinite values")
        elif x.dtype != np.uint8:
            raise DataError(f"{name} has dtype {x.dtype}: use float inputs or uint8 pixels")
        if y is not None:
            y = np.asarray(y) if isinstance(y, (list, tuple)) else y
            if y.ndim != 1 or y.shape[0] != x.shape[0]:
                raise DataError(f"labels have shape {tuple(y.shape)}, expected ({x.shape[0]},) integers")
            if y.dtype.kind not in "iu":
                raise DataError(f"labels have dtype {y.dtype}: expected integer class labels")
            lo, hi = int(y.min()), int(y.max())
            k = self.sizes[-1]
            if lo < 0 or hi >= k:
                raise DataError(f"labels must be in 0..{k - 1}, found values in {lo}..{hi}")
        return x, y

    def to_device(self, x, y=None, name="x"):
        """Upload validated inputs once: uint8 pixels stay uint8 (the model's preprocessing
        scales each gathered batch), floats become the model dtype; labels become int32."""
        x, y = self.check_inputs(x, y, name)
        xd = self.ops.upload_images(x, self.dtype)
        yd = None if y is None else self.ops.asarray(y, np.int32)
        return xd, yd

    def load_batch(self, ws: Workspace, x_dev, y_dev, idx, w_dev=None, train=False) -> None:
        """Gather rows ``idx`` (B,) int64 of device data into ``ws.x``/``ws.y`` (and the
        per-sample weights w_dev (N, 1), model dtype, into ``ws.w``); idx (K, B) for a
        stack's per-model workspace.

        uint8 pixels are converted and preprocessed on the way; float inputs are copied. train: a
        training batch, each image moved at random by up to ``translate`` pixels (``Ops.translate``;
        the pixels moved in are a blank pixel as the network sees it: a raw 0 pixel, preprocessed,
        for uint8 and float inputs alike).
        """
        pixel_scale, blank = self.preprocessing.uint8_affine()  # blank: a raw 0 pixel as the network sees it
        scale, shift = (pixel_scale, blank) if x_dev.dtype == np.uint8 else (1.0, 0.0)
        if train and self.translate:
            raw = self.ops.scratch(ws.x.shape, ws.x.dtype)
            self.ops.gather_rows(x_dev, idx, raw, scale, shift)
            shape = (ws.x.shape[0], *self.image_shape)
            self.ops.translate(raw.reshape(shape), ws.x.reshape(shape), self.translate, self.seed, self.step, blank)
        else:
            self.ops.gather_rows(x_dev, idx, ws.x, scale, shift)
        if y_dev is not None:
            self.ops.gather_labels(y_dev, idx, ws.y)
        ws.weighted = w_dev is not None
        if ws.weighted:
            self.ops.gather_rows(w_dev, idx, ws.w[..., None], 1.0, 0.0)

    def preprocess(self, images) -> np.ndarray:
        """Raw images (N, D) in any form -> network inputs (NumPy, model dtype); see
        ``Preprocessing.from_raw``."""
        return self.preprocessing.from_raw(images, self.dtype)

    # --------------------------------------------------------- forward/back
    def _drop(self, l: int) -> Dropout | None:
        """The dropout of layer l's output in training (None for the output layer or p = 0)."""
        p = self.dropout[l] if l < len(self.dropout) else 0.0
        return Dropout(p, self.seed & 0xFFFFFFFF, self.step, l) if p > 0 else None

    def forward(self, ws: Workspace, train: bool = False, rowwise: bool | None = None):
        """ws.x (B, D) -> ws.acts[-1] (B, K): logits for xent, sigmoid outputs for mse.

        train: apply dropout (the training step); off for evaluation and prediction. rowwise (default:
        ``not train``): compute the products row by row, so a row's outputs do not depend on the other
        rows of its batch, which BLAS's GEMM, whose summation order changes with the batch's size,
        cannot promise (prediction); ``evaluate``'s aggregate figures take the batch GEMM."""
        rowwise = not train if rowwise is None else rowwise
        ops, a = self.ops, ws.x
        for l, layer in enumerate(self.layers):
            out, act = ws.acts[l], self.layer_activations[l]
            if self.layer_spec is not None:  # a conv net: each layer sees its input in its own shape
                a = a.reshape((a.shape[0], *layer.shape_in))
            if layer.kind == "conv":
                ops.conv_act(a, self.W[l], self.b[l], ws.cols[l], out, act, layer.pad, rowwise)
            elif layer.kind == "pool":
                ops.maxpool(a, layer.k, out, ws.args[l])
            else:
                ops.linear_act(a, self.W[l], self.b[l], out, act, self._drop(l) if train else None, rowwise)
            a = out  # (B, n_{l+1}), or (B, H, W, C)
        return a

    def loss_and_delta(self, ws: Workspace, loss_out=None, hits_out=None, want_grad=True) -> None:
        """Loss of the batch in ws.acts[-1] against ws.y, and dL/dz into ws.deltas[-1].

        loss_out / hits_out: 1-element device arrays (default ws.loss/ws.hits) that
        receive the sum of per-sample losses and the number of correct argmaxes.
        """
        kernel = self.ops.xent if self.loss == "xent" else self.ops.mse
        kernel(ws.acts[-1], ws.y, ws.deltas[-1] if want_grad else None,
               ws.loss if loss_out is None else loss_out,
               ws.hits if hits_out is None else hits_out, ws.w if ws.weighted else None)

    def backward(self, ws: Workspace) -> None:
        """From ws.deltas[-1], write the gradient of the batch-mean loss into the arena."""
        ops = self.ops
        for l in reversed(range(self.n_layers)):
            a_prev = ws.x if l == 0 else ws.acts[l - 1]
            d = ws.deltas[l]  # (B, n_{l+1}), or (B, H, W, C)
            if self.layer_spec is not None:
                self._conv_net_backward(ws, l, a_prev, d)
                continue
            ops.param_grads(a_prev, d, self.gW[l], self.gb[l])
            if l > 0:
                ops.input_grad(d, self.W[l], a_prev, ws.deltas[l - 1], self.layer_activations[l - 1],
                               self._drop(l - 1))

    def _conv_net_backward(self, ws: Workspace, l: int, a_prev, d) -> None:
        """Layer l's part of ``backward`` in a conv net: its parameters' gradients, then dL/dz of the
        layer below (``ws.deltas[l - 1]``) through a convolution (col2im), pooling (to each window's
        max) or a dense layer, and the activation derivative of the layer below."""
        ops, layer = self.ops, self.layers[l]
        B = d.shape[0]
        if layer.kind == "conv":
            ops.conv_param_grads(a_prev.reshape((B, *layer.shape_in)), ws.cols[l], d, self.gW[l], self.gb[l], layer.pad)
        elif layer.kind == "dense":
            ops.param_grads(a_prev.reshape(B, -1), d, self.gW[l], self.gb[l])
        if l == 0:
            return
        d_prev, act, drop = ws.deltas[l - 1], self.layer_activations[l - 1], self._drop(l - 1)
        if layer.kind == "dense":
            ops.input_grad(d, self.W[l], a_prev.reshape(B, -1), d_prev.reshape(B, -1), act, drop)
            return
        if layer.kind == "conv":
            ops.conv_input_grad(d, self.W[l], ws.cols[l], d_prev, layer.pad)  # overwrites the patches, read above
            ops.act_backward(d_prev, a_prev, act, drop)
        else:
            ops.maxpool_act_backward(d, ws.args[l], layer.k, d_prev, a_prev, act, drop)

    def forward_backward(self, ws: Workspace, loss_out=None, hits_out=None) -> None:
        """The step before the update: forward, loss, backward of the batch in ``ws``.

        The gradient of the batch-mean loss lands in the gradient arena; loss_out /
        hits_out as in ``loss_and_delta``. Dropout, if any, uses the masks of step ``self.step``.
        """
        self.forward(ws, train=True)
        self.loss_and_delta(ws, loss_out, hits_out)
        self.backward(ws)

    def clone(self, device=None, dtype=None) -> MLP:
        """A new model with this one's configuration, preprocessing and weights."""
        c = MLP.from_config(self.config(), device or self.device, dtype)
        c.set_params(self.get_params())
        c.step[...] = c.ops.asarray(self.ops.to_host(self.step))
        return c

    # ------------------------------------------------------- public helpers
    def gradients(self, x, y, sample_weight=None):
        """Mean loss (float) and its gradients ``[dW1, db1, ...]`` (NumPy) on the batch (x, y);
        with sample_weight (N,), of ``sum_i w_i loss_i / N``."""
        xd, yd = self.to_device(x, y)
        n = xd.shape[0]
        wd = None if sample_weight is None else self.ops.asarray(np.asarray(sample_weight).reshape(n, 1), self.dtype)
        ws = self.workspace(n)
        self.load_batch(ws, xd, yd, self.ops.xp.arange(n), wd)
        self.forward_backward(ws)
        loss = self.ops.to_host(ws.loss).astype(np.float64) / n  # (1,), or (K,) for a stack
        return (loss if self.stack else float(loss[0])), [self.ops.to_host(g).copy()
                                                          for g in self.param_list((self.gW, self.gb))]

    def _batches(self, x, y, batch_size):
        return self._batches_device(*self.to_device(x, y), batch_size)

    def _eval_batch(self, batch_size: int) -> int:
        """The batch size for evaluation and prediction: ``batch_size``, or for a conv net, whose
        patch buffers are large, as many images as take about 64 MB of buffers."""
        if self.layer_spec is None:
            return batch_size
        per_sample = sum((l.k * l.k * l.width_in if l.kind == "conv" else 0) + 2 * l.width_out for l in self.layers)
        return max(1, min(batch_size, (64 << 20) // (per_sample * self.dtype.itemsize)))

    def _batches_device(self, xd, yd, batch_size):
        n, batch_size = xd.shape[0], self._eval_batch(batch_size)
        idx_all = self.ops.xp.arange(n)
        for s in range(0, n, batch_size):
            idx = idx_all[s:s + batch_size]
            ws = self.workspace(idx.shape[0])
            self.load_batch(ws, xd, yd, idx)
            yield ws

    def outputs(self, x, batch_size=10000) -> np.ndarray:
        """Network outputs (N, K) as NumPy: logits (xent) or sigmoid outputs (mse); a stack's (K_models, N, K)."""
        parts = [self.ops.to_host(self.forward(ws)).copy() for ws in self._batches(x, None, batch_size)]
        return np.concatenate(parts, axis=-2)

    def predict(self, x, batch_size=10000) -> np.ndarray:
        """Predicted labels (N,) int64 for inputs x (N, D); uint8 pixels are scaled first."""
        xp = self.ops.xp
        parts = [xp.argmax(self.forward(ws), axis=1) for ws in self._batches(x, None, batch_size)]
        return self.ops.to_host(xp.concatenate(parts)).astype(np.int64)

    def predict_proba(self, x, batch_size=10000) -> np.ndarray:
        """Class probabilities (N, K) float64 for inputs x (N, D): the softmax of the logits
        (xent), or the sigmoid outputs scaled to sum to 1 (mse), by the loss kernels'
        ``probabilities``, in float64 from the model-dtype outputs; a stack's
        (K_models, N, K)."""
        parts = []
        for ws in self._batches(x, None, batch_size):
            out = self.forward(ws)
            proba = self.ops.xp.empty(out.shape, np.float64)
            self.ops.probabilities(out, self.loss, proba)
            parts.append(self.ops.to_host(proba))
        return np.concatenate(parts, axis=-2)

    def evaluate(self, x, y, batch_size=10000) -> dict:
        """``{"loss": mean loss, "accuracy": fraction correct}`` over (x, y), in large batches.

        Sums stay on the device until the end: one synchronisation for the whole set.
        """
        return self.evaluate_device(*self.to_device(x, y), batch_size)

    def evaluate_device(self, x_dev, y_dev, batch_size=10000) -> dict:
        """``evaluate`` on data already uploaded by ``to_device`` (fit's validation set)."""
        xp, n, batch_size = self.ops.xp, y_dev.shape[0], self._eval_batch(batch_size)
        n_batches = -(-n // batch_size)
        losses = xp.zeros((n_batches,) + self.stack, self.dtype)
        hits = xp.zeros((n_batches,) + self.stack, np.int32)
        for i, ws in enumerate(self._batches_device(x_dev, y_dev, batch_size)):
            self.forward(ws, rowwise=False)
            self.loss_and_delta(ws, losses[i:i + 1], hits[i:i + 1], want_grad=False)
        loss = self.ops.to_host(losses.astype(np.float64).sum(axis=0)) / n
        acc = self.ops.to_host(hits.sum(axis=0)) / n
        if self.stack:  # (K,) arrays, one value per model
            return {"loss": loss, "accuracy": acc}
        return {"loss": float(loss), "accuracy": float(acc)}

    # --------------------------------------------------------------- saving
    def __getstate__(self) -> dict:
        """Pickling (joblib, multiprocessing, copy.deepcopy): configuration and host arrays."""
        return {"config": self.config(), "device": self.device, "params": self.get_params(),
                "step": int(self.ops.to_host(self.step)[0])}

    def __setstate__(self, state) -> None:
        cfg, device = state["config"], state["device"]
        if device == "gpu":
            from .backends import cuda_status

            problem = cuda_status()
            if problem is not None:
                warnings.warn(f"this model was on the GPU, which is not usable here ({problem}); "
                              "it is loaded on the CPU", RuntimeWarning, stacklevel=2)
                device = "cpu"
        self.__dict__.update(MLP.from_config(cfg, device).__dict__)
        self.set_params(state["params"])
        self.step[...] = state.get("step", 0)

    @classmethod
    def from_config(cls, cfg: dict, device="cpu", dtype=None) -> MLP:
        """A model of the architecture ``cfg`` (``config()``'s dict, as model files, checkpoints and
        pickles hold it) with its preprocessing and class names, initialised from its seed, on
        ``device`` (a name or an ``Ops``), in ``dtype`` (default: the config's)."""
        sizes = [cfg["sizes"][0], cfg["sizes"][-1]] if cfg.get("layers") else cfg["sizes"]
        model = cls(sizes, cfg["activation"], cfg["loss"], cfg["init"], device=device,
                    dtype=dtype or cfg["dtype"], seed=cfg.get("seed", 0), dropout=cfg.get("dropout", 0.0),
                    layers=cfg.get("layers"), image_shape=cfg.get("image_shape"), translate=cfg.get("translate", 0))
        model.preprocessing = Preprocessing.from_config(cfg)
        model.classes = cfg.get("classes")
        return model

    def config(self) -> dict:
        """The architecture, preprocessing and class names (``from_config`` builds the model back)."""
        return {"sizes": list(self.sizes), "activation": self.activation, "loss": self.loss,
                "init": self.init, "dtype": self.dtype.name, "seed": self.seed, "dropout": self.dropout,
                "translate": self.translate,
                **self.preprocessing.to_config(), "classes": self.classes,
                **({"layers": self.layer_spec} if self.layer_spec else {}),
                **({"image_shape": list(self.image_shape)} if self.image_shape else {})}

    def to_onnx(self, path, input_type: str = "uint8") -> None:
        """Export to ONNX (``fastnn.export.export_onnx``): preprocessing, layers, probabilities, label."""
        from .export import export_onnx

        export_onnx(self, path, input_type)

    def save(self, path) -> None:
        """Write weights and configuration to an ``.npz`` file, atomically."""
        npzfile.save(path, "fastnn-mlp", self.config(), {f"p{i}": p for i, p in enumerate(self.get_params())})

    @classmethod
    def load(cls, path, device="cpu") -> MLP:
        """Load a model saved by ``save`` onto ``device``.

        DataError naming the file when it is unreadable, when its header's sizes would not fit in
        memory or disagree with its arrays' shapes (checked before anything is allocated), or when
        a parameter holds NaN or infinite values (the training that wrote it diverged).
        """
        meta, arrays = npzfile.load(path, "fastnn-mlp", "fastnn model file")
        try:
            params = file_params(path, meta, arrays)
            bad = nonfinite_params(params)
            if not bad:
                model = cls.from_config(meta, device)
                model.set_params(params)
        except DataError:
            raise
        except (KeyError, ValueError, TypeError, OverflowError, ConfigError) as exc:
            raise DataError(f"{path}: not a valid fastnn model file ({exc})") from None
        if bad:
            raise DataError(f"{path}: {describe_nonfinite(bad)}: {DIVERGED}")
        return model
