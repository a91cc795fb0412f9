"""ONNX export: a trained MLP as an ONNX graph, its preprocessing included.

``export_onnx(model, path)`` (``model.to_onnx(path)``, ``fastnn export model.npz model.onnx``)
writes a graph built with the ``onnx`` package (opset OPSET) and checked by
``onnx.checker``: input ``images`` (N, D), uint8 raw pixels (scaled by the model's
preprocessing inside the graph) or float network inputs; a Gemm and the activation per
layer; outputs ``probabilities`` (N, K) float32 (``model.predict_proba``) and ``label``
(N,) int64 (``model.predict``). Needs ``pip install 'fastnn[onnx]'``.

The model is taken by its attributes, not its class (this module imports nothing of
``fastnn.model``, which imports it): ``sizes`` (D, ..., K), ``layer_activations`` (one
of relu, sigmoid, tanh, linear per layer), ``loss`` (``"xent"``: a softmax of the outputs;
else the outputs scaled to sum to 1), ``get_params()`` (W0, b0, W1, b1, ... with
W of shape (fan_in, fan_out) and b of (fan_out,), NumPy arrays), ``classes`` (names,
stored in the model's metadata when not empty) and, for uint8 input, ``preprocessing``
(its ``uint8_affine()`` gives the scale and shift of raw pixels).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import ConfigError

OPSET = 17
ACTIVATION_OPS = {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh"}


def export_onnx(model: Any, path, input_type: str = "uint8") -> None:
    """Write ``model`` (an ``MLP``, or anything with its attributes: see the module docstring) to
    ``path`` as ONNX; input_type ``"uint8"`` (raw pixels) or ``"float"``."""
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as exc:
        raise ConfigError(f"ONNX export needs the onnx package ({exc}): pip install 'fastnn[onnx]'") from None
    if getattr(model, "layer_spec", None) is not None:
        raise ConfigError("ONNX export of conv nets is not supported yet (dense networks only)")
    if input_type not in ("uint8", "float"):
        raise ConfigError(f"input_type must be 'uint8' or 'float', got {input_type!r}")
    nodes, inits = [], []

    def const(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    x = "images"
    if input_type == "uint8":
        scale, shift = model.preprocessing.uint8_affine()
        nodes += [helper.make_node("Cast", [x], ["pixels"], to=TensorProto.FLOAT),
                  helper.make_node("Mul", ["pixels", const("scale", scale)], ["scaled"]),
                  helper.make_node("Add", ["scaled", const("shift", shift)], ["inputs"])]
        x = "inputs"
    params = model.get_params()
    for l, act in enumerate(model.layer_activations):
        z = f"z{l}"
        nodes.append(helper.make_node("Gemm", [x, const(f"W{l}", params[2 * l]), const(f"b{l}", params[2 * l + 1])],
                                      [z]))
        x = z if act == "linear" else f"a{l}"
        if act != "linear":
            nodes.append(helper.make_node(ACTIVATION_OPS[act], [z], [x]))
    if model.loss == "xent":
        nodes.append(helper.make_node("Softmax", [x], ["probabilities"], axis=1))
    else:  # sigmoid outputs scaled to sum to 1, as predict_proba
        nodes += [helper.make_node("ReduceSum", [x, "axis1"], ["total"], keepdims=1),
                  helper.make_node("Div", [x, "total"], ["probabilities"])]
        inits.append(numpy_helper.from_array(np.array([1], np.int64), "axis1"))
    nodes.append(helper.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0))
    d, k = model.sizes[0], model.sizes[-1]
    graph = helper.make_graph(
        nodes, "fastnn_mlp",
        [helper.make_tensor_value_info("images", TensorProto.UINT8 if input_type == "uint8" else TensorProto.FLOAT,
                                       ["N", d])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", k]),
         helper.make_tensor_value_info("label", TensorProto.INT64, ["N"])], inits)
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="fastnn")
    onnx_model.ir_version = 8  # readable by onnxruntime releases from 1.14 on
    if model.classes:
        helper.set_model_props(onnx_model, {"classes": ",".join(model.classes)})
    onnx.checker.check_model(onnx_model, full_check=True)
    onnx.save(onnx_model, str(path))
