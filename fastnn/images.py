"""Photos and image files of digits, read with Pillow and prepared the way MNIST's digits were.

MNIST's digits are light ink on black, the ink's bounding box scaled to fit 20x20
pixels (aspect ratio kept), then placed in a 28x28 field with its centre of mass at
the centre. A photo of a digit written on paper is dark ink on light paper, large
and anywhere in the frame; ``mnist_style`` makes it look like the training data.
Needs Pillow (``pip install 'fastnn[images]'``).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from .errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
FIELD, BOX = 28, 20  # MNIST: a 20x20 box inside a 28x28 field
INK_LEVEL = 0.25  # a pixel is ink when it is over a quarter of the way to the darkest (after inversion: brightest)


def _pillow():
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise DataError("reading image files needs Pillow: pip install 'fastnn[images]'") from None
    return Image, ImageOps


def read_image(path) -> np.ndarray:
    """Any image Pillow reads -> (H, W) uint8 luma; transparency is composited on white paper."""
    Image, ImageOps = _pillow()
    try:
        raw = Path(path).read_bytes()  # from memory: a chunk length past the data allocates nothing
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        with Image.open(io.BytesIO(raw)) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit gray: to 8 bits by its range
                a = np.asarray(im, np.float64)
                return np.round(a * (255.0 / max(a.max(), 1.0))).astype(np.uint8)
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im = Image.alpha_composite(paper, rgba)
            return np.asarray(im.convert("L"), np.uint8)  # ITU-R 601-2 luma
    except Exception as exc:  # Pillow raises OSError, ValueError, SyntaxError, ... for a broken file
        if is_svg(raw):
            raise svg_error(path) from None
        raise DataError(f"{path}: not an image Pillow can read ({type(exc).__name__}: {exc})") from None


def is_svg(raw: bytes) -> bool:
    """Whether file contents (gunzipped) are an SVG drawing: markup whose first 4 KiB open an <svg> element."""
    head = raw[:4096].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return head.startswith(b"<") and b"<svg" in head


def svg_error(path, expected: str | None = None) -> DataError:
    """The error for an SVG drawing: fastnn reads pixels. As an image to classify, how to get a PNG of it;
    as data, what was ``expected`` instead."""
    if expected is not None:
        return DataError(f"{path}: an SVG vector drawing, which fastnn does not read; expected {expected}")
    p = Path(path)
    png = p.with_suffix(".png") if p.suffix.lower() in (".svg", ".svgz") else p.with_name(p.name + ".png")
    return DataError(f"{path}: an SVG vector drawing, which fastnn does not read: export it as PNG "
                     f"(e.g. `rsvg-convert -w 280 {path} -o {png}`)")


def _border(a: np.ndarray) -> np.ndarray:
    return np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]])


def light_paper(image: np.ndarray) -> bool:
    """Whether an image, (H, W) or square (D,), has a light border: dark ink on light paper."""
    if image.ndim == 1:
        side = int(round(np.sqrt(image.size)))
        if side * side != image.size:
            return False
        image = image.reshape(side, side)
    return min(image.shape) >= 3 and float(np.median(_border(image))) > 127


def mnist_style(gray: np.ndarray, where="image") -> np.ndarray:
    """(H, W) uint8 luma -> (28*28,) uint8 prepared as MNIST's digits were (module docstring):
    inverted when the background (the border) is light, cropped to the ink, scaled to fit
    20x20, centred by the centre of mass in a 28x28 field."""
    Image, _ = _pillow()
    a = gray.astype(np.float64)
    border = _border(a)
    if light_paper(gray):  # dark ink on light paper
        a, border = 255.0 - a, 255.0 - border
    a = np.clip(a - np.median(border), 0, None)  # the paper's own shade to 0
    if a.max() <= 0:
        raise DataError(f"{where}: no ink found (a blank image)")
    rows, cols = np.nonzero(a > INK_LEVEL * a.max())
    a = a[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    h, w = a.shape
    scale = BOX / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = np.asarray(Image.fromarray(np.round(a * (255.0 / a.max())).astype(np.uint8)).resize(
        size, Image.Resampling.LANCZOS), np.float64)
    total = small.sum()
    cy, cx = ((np.arange(small.shape[0]) @ small.sum(axis=1)) / total,
              (np.arange(small.shape[1]) @ small.sum(axis=0)) / total)
    top = int(np.clip(round(FIELD / 2 - 0.5 - cy), 0, FIELD - small.shape[0]))
    left = int(np.clip(round(FIELD / 2 - 0.5 - cx), 0, FIELD - small.shape[1]))
    field = np.zeros((FIELD, FIELD))
    field[top:top + small.shape[0], left:left + small.shape[1]] = small
    return np.round(np.clip(field, 0, 255)).astype(np.uint8).reshape(-1)


def save_gray(image: np.ndarray, path) -> None:
    """Write a (D,) square uint8 image as a PNG (what the network saw, for ``--show``)."""
    Image, _ = _pillow()
    side = int(round(np.sqrt(image.size)))
    Image.fromarray(image.reshape(side, side).astype(np.uint8)).save(path)
