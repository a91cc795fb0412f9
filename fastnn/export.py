"""ONNX export: a trained MLP or conv net as an ONNX graph, its preprocessing included.

``export_onnx(model, path)`` (``model.to_onnx(path)``, ``fastnn export model.npz model.onnx``)
writes a graph built with the ``onnx`` package (opset OPSET) and checked by
``onnx.checker``: input ``images`` (N, D), uint8 raw pixels (scaled by the model's
preprocessing inside the graph) or float network inputs; then per layer a Gemm (dense) or a
Conv (convolution) and the activation, or a MaxPool (pooling); outputs ``probabilities``
(N, K) float32 (``model.predict_proba``) and ``label`` (N,) int64 (``model.predict``).
Needs ``pip install 'fastnn[onnx]'``.

A conv net's images are (H, W, C), channels last, in fastnn and (C, H, W) in ONNX's Conv and
MaxPool: before its first convolution or pooling the graph reshapes the flat (N, D) input to
(N, H, W, C) and transposes it to (N, C, H, W); before the first dense layer it transposes back
to (N, H, W, C) and flattens, so the dense weights are used as fastnn stores them. A conv
weight (k*k*C_in, C_out), rows in (ki, kj, c_in) order, becomes ONNX's (C_out, C_in, k, k);
'same' layers get their ``pad`` zeros on every side; pooling is p x p windows with stride p,
rows and columns past the last whole window dropped (ONNX's floor mode).

The model is taken by its attributes, not its class (this module imports nothing of
``fastnn.model``, which imports it): ``sizes`` (D, ..., K), ``layer_activations`` (one
of relu, sigmoid, tanh, linear per layer), ``loss`` (``"xent"``: a softmax of the outputs;
else the outputs scaled to sum to 1), ``get_params()`` (W0, b0, W1, b1, ... of the layers
that have weights, with W of shape (fan_in, fan_out) and b of (fan_out,), NumPy arrays),
``classes`` (names, stored in the model's metadata when not empty), for uint8 input
``preprocessing`` (its ``uint8_affine()`` gives the scale and shift of raw pixels) and, for a
conv net, ``layers`` (``fastnn.layers.Layer``s: kind, k, pad, shape_in, shape_out) and
``image_shape`` (H, W, C); without ``layers`` every layer is dense.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import ConfigError

OPSET = 17
ACTIVATION_OPS = {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh"}
TO_NCHW, TO_NHWC = [0, 3, 1, 2], [0, 2, 3, 1]  # Transpose perms between fastnn's images and ONNX's


class _Graph:
    """The nodes and initializers of the graph being built; ``node`` adds one and returns its output name."""

    def __init__(self, helper, numpy_helper):
        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes, self.inits = [], []

    def const(self, name: str, value, dtype=np.float32) -> str:
        self.inits.append(self.numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def node(self, op: str, inputs: list, output: str, **attrs) -> str:
        self.nodes.append(self.helper.make_node(op, inputs, [output], **attrs))
        return output


def export_onnx(model: Any, path, input_type: str = "uint8") -> None:
    """Write ``model`` (an ``MLP``, dense or conv, or anything with its attributes: see the module
    docstring) to ``path`` as ONNX; input_type ``"uint8"`` (raw pixels (N, D)) or ``"float"``
    (network inputs (N, D))."""
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as exc:
        raise ConfigError(f"ONNX export needs the onnx package ({exc}): pip install 'fastnn[onnx]'") from None
    if input_type not in ("uint8", "float"):
        raise ConfigError(f"input_type must be 'uint8' or 'float', got {input_type!r}")
    g = _Graph(helper, numpy_helper)
    x = "images"
    if input_type == "uint8":
        scale, shift = model.preprocessing.uint8_affine()
        x = g.node("Cast", [x], "pixels", to=TensorProto.FLOAT)
        x = g.node("Mul", [x, g.const("scale", scale)], "scaled")
        x = g.node("Add", [x, g.const("shift", shift)], "inputs")
    x = _layers(g, model, x)
    if model.loss == "xent":
        g.node("Softmax", [x], "probabilities", axis=1)
    else:  # sigmoid outputs scaled to sum to 1, as predict_proba
        total = g.node("ReduceSum", [x, g.const("axis1", [1], np.int64)], "total", keepdims=1)
        g.node("Div", [x, total], "probabilities")
    g.node("ArgMax", ["probabilities"], "label", axis=1, keepdims=0)
    d, k = model.sizes[0], model.sizes[-1]
    graph = helper.make_graph(
        g.nodes, "fastnn_mlp",
        [helper.make_tensor_value_info("images", TensorProto.UINT8 if input_type == "uint8" else TensorProto.FLOAT,
                                       ["N", d])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", k]),
         helper.make_tensor_value_info("label", TensorProto.INT64, ["N"])], g.inits)
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="fastnn")
    onnx_model.ir_version = 8  # readable by onnxruntime releases from 1.14 on
    if model.classes:
        helper.set_model_props(onnx_model, {"classes": ",".join(model.classes)})
    onnx.checker.check_model(onnx_model, full_check=True)
    onnx.save(onnx_model, str(path))


def _layers(g: _Graph, model: Any, x: str) -> str:
    """The nodes of every layer, from the network inputs ``x`` (N, D) to the outputs (N, K) (logits for
    xent, sigmoid outputs for mse); returns the outputs' name. Between a conv net's layers the tensor is
    (N, C, H, W) after a convolution or pooling, (N, n) after a dense layer."""
    kinds = [layer.kind for layer in model.layers] if hasattr(model, "layers") else ["dense"] * len(model.sizes[1:])
    params = iter(model.get_params())
    image = False  # is x (N, C, H, W) now?
    for l, (kind, act) in enumerate(zip(kinds, model.layer_activations)):
        layer = model.layers[l] if kind != "dense" else None
        if kind != "dense" and not image:  # (N, D) -> (N, H, W, C) -> (N, C, H, W)
            shape = g.const(f"shape{l}", [0, *layer.shape_in], np.int64)  # 0: N, copied from the input
            x = g.node("Transpose", [g.node("Reshape", [x, shape], f"nhwc{l}")], f"nchw{l}", perm=TO_NCHW)
            image = True
        if kind == "pool":
            x = g.node("MaxPool", [x], f"z{l}", kernel_shape=[layer.k] * 2, strides=[layer.k] * 2)
            continue  # pooling carries no activation
        W, b = next(params), next(params)
        if kind == "conv":
            k, c_in, c_out = layer.k, layer.shape_in[2], layer.size
            weight = np.asarray(W).reshape(k, k, c_in, c_out).transpose(3, 2, 0, 1)  # (C_out, C_in, kH, kW)
            x = g.node("Conv", [x, g.const(f"W{l}", weight), g.const(f"b{l}", b)], f"z{l}",
                       kernel_shape=[k, k], strides=[1, 1], pads=[layer.pad] * 4)
        else:
            if image:  # (N, C, H, W) -> (N, H, W, C) -> (N, H*W*C): fastnn's flatten order
                x = g.node("Flatten", [g.node("Transpose", [x], f"nhwc{l}", perm=TO_NHWC)], f"flat{l}", axis=1)
                image = False
            x = g.node("Gemm", [x, g.const(f"W{l}", W), g.const(f"b{l}", b)], f"z{l}")
        if act != "linear":
            x = g.node(ACTIVATION_OPS[act], [x], f"a{l}")
    return x
