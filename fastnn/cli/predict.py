"""``fastnn predict`` and ``fastnn export``: a saved model applied to image files, or written as ONNX."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from .. import datasets
from ..backends import DEVICES
from ..errors import DataError
from ..export import OPSET
from ..images import IMAGE_SUFFIXES, light_paper, save_gray
from ..model import MLP
from ..readers import check_label_range, labels_file
from .flags import OneLineParser
from .output import _probe_folder

PREDICT_HELP = "Classify images with a saved model (the model's preprocessing is applied to them)."

EXPORT_HELP = "Write a saved model as ONNX: its preprocessing, layers, probabilities and the predicted label."


def predict_parser(prog="fastnn predict"):
    p = OneLineParser(prog=prog, description=PREDICT_HELP)
    p.add_argument("model", help="a model saved with --save")
    p.add_argument("inputs", nargs="+", help="IDX image files, CSV files, or image files (PNG, JPEG, ...)")
    p.add_argument("--invert", action="store_true", help="invert pixels (dark ink on light paper)")
    p.add_argument("--no-normalize", dest="normalize", action="store_false",
                   help="image files: only convert to gray (for images already 28x28, centred, light on dark); "
                        "by default they are prepared as MNIST's digits were: inverted if the paper is light, "
                        "cropped to the ink, scaled into 20x20 and centred by mass in 28x28")
    p.add_argument("--show", metavar="DIR", help="write each image file as the network saw it, as PNG, here")
    p.add_argument("--proba", action="store_true", help="also print the probability of every class")
    p.add_argument("--device", choices=DEVICES, default="cpu", help="(default: cpu)")
    return p


def run_predict(argv=None) -> int:
    args = predict_parser().parse_args(argv)
    model = MLP.load(args.model, device=args.device)
    classes = getattr(model, "classes", None) or [str(i) for i in range(model.sizes[-1])]
    inputs = [(path, *read_input(path, args, model, classes)) for path in args.inputs]  # every check first
    for path, images, labels in inputs:
        x = model.preprocess(images)
        proba = model.predict_proba(x) if args.proba else None
        pred = model.predict(x)
        for i, p in enumerate(pred):
            name = f"{path}[{i}]" if len(pred) > 1 else str(path)
            extra = "" if proba is None else "\t" + " ".join(f"{v:.4f}" for v in proba[i])
            print(f"{name}\t{p}\t{classes[p]}{extra}")
        if labels is not None:
            print(f"{path}: accuracy {np.mean(pred == labels):.4f} on {len(labels)} labelled images")
    return 0


def read_input(path, args, model: MLP, classes) -> tuple[np.ndarray, np.ndarray | None]:
    """One input file -> (images (N, D) as the model will see them before preprocessing, labels or None),
    checked against the model: its width, and labels inside the model's classes."""
    images, labels = datasets.read_images(path, normalize=args.normalize)
    images = datasets.flatten_images(images, path)
    if images.shape[1] != model.sizes[0]:
        raise DataError(f"{path}: images have {images.shape[1]} pixels, the model expects {model.sizes[0]}")
    if labels is not None:
        k = model.sizes[-1]
        named = "" if list(classes) == [str(i) for i in range(k)] else f" (0 {classes[0]} .. {k - 1} {classes[-1]})"
        check_label_range(labels, k, labels_file(path), unit="row",
                          whose=f", the model's {k} classes{named}: it cannot predict this label, so no "
                                "accuracy is computed; use a model trained on these classes")
    photo = str(path).lower().endswith(IMAGE_SUFFIXES)
    if args.invert:
        images = (255 - images) if images.dtype == np.uint8 or images.max() > 1 else 1.0 - images
    elif photo and not args.normalize and light_paper(images[0]):
        print(f"{path}: a light background: MNIST-like models expect light ink on black; if this is dark "
              "ink on light paper, pass --invert (or leave out --no-normalize)", file=sys.stderr)
    if photo and args.show:
        Path(args.show).mkdir(parents=True, exist_ok=True)
        save_gray(images[0], Path(args.show) / (Path(path).stem + ".seen.png"))
    return images, labels


def run_export(argv=None) -> int:
    p = OneLineParser(prog="fastnn export", description=EXPORT_HELP)
    p.add_argument("model", help="a model saved with --save")
    p.add_argument("output", help="the .onnx file to write")
    p.add_argument("--input-type", choices=["uint8", "float"], default="uint8",
                   help="uint8: raw pixels, scaled inside the graph; float: network inputs (default: uint8)")
    args = p.parse_args(argv)
    _probe_folder(Path(args.output).parent, "output", args.output)
    MLP.load(args.model).to_onnx(args.output, args.input_type)
    print(f"{args.output}: ONNX opset {OPSET}, input 'images' {args.input_type}, outputs 'probabilities', 'label'")
    return 0
