"""The file readers of data sets and of images to classify: strict, every problem a DataError.

Formats: IDX (``.gz`` or raw), CSV (header with a ``label`` column, or headerless
label-first), NPZ (Keras ``mnist.npz`` layout), pickled lists of images and labels
(only on explicit request, through an unpickler that builds lists, numbers and NumPy
arrays and nothing else), and single image files through Pillow (``fastnn.images``).
A file in another common format (a JPEG, a zip archive, an HTML page from a failed
download) is named as such by its first bytes (``MAGIC``). Every problem raises
``DataError`` with the file and the reason, and no allocation is sized by a header
field before it is checked against the data.

``flatten_images`` and ``check_labels`` check the arrays a reader returns;
``fastnn.datasets`` checks the four arrays of a data set with them too.
"""

from __future__ import annotations

import gzip
import io
import math
import pickle
import pickletools
import re
import warnings
import zlib
from pathlib import Path

import numpy as np

from . import npzfile
from .errors import DataError
from .images import IMAGE_SUFFIXES, is_svg, mnist_style, read_image, svg_error

IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# ----------------------------------------------------------- array checks
def flatten_images(images, where) -> np.ndarray:
    """(N, H, W) or (N, D) numeric -> (N, D) uint8 when integral 0..255, else float32."""
    a = np.asarray(images)
    if a.ndim == 3:
        a = a.reshape(a.shape[0], -1)
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise DataError(f"{where}: expected images of shape (N, H, W) or (N, D), got {a.shape}")
    if a.dtype == np.uint8:
        return a
    if a.dtype.kind not in "iuf":
        raise DataError(f"{where}: images have non-numeric type {a.dtype}")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        row = int(np.argwhere(~np.isfinite(a))[0][0])
        raise DataError(f"{where}: image {row} contains NaN or infinite values")
    if a.min() >= 0 and a.max() <= 255 and a.max() > 1 and np.array_equal(a, np.round(a)):
        return a.astype(np.uint8)
    return a.astype(np.float32)


def check_labels(labels, n, where) -> np.ndarray:
    """Labels -> (n,) int64 class indices; DataError for one-hot, fractional or negative labels."""
    y = np.asarray(labels)
    if y.ndim == 2 and y.shape[0] == n and y.shape[1] > 1:
        sums = y.sum(axis=1)
        if not (np.isin(y, (0, 1)).all() and np.all(sums == 1)):
            bad = int(np.argmax((sums != 1) | ~np.isin(y, (0, 1)).all(axis=1)))
            raise DataError(f"{where}: one-hot label row {bad} does not hold exactly one 1")
        y = y.argmax(axis=1)
    if y.ndim != 1:
        raise DataError(f"{where}: expected a vector of labels, got shape {y.shape}")
    if y.shape[0] != n:
        raise DataError(f"{where}: {y.shape[0]} labels for {n} images")
    if y.dtype.kind == "f":
        if not np.isfinite(y).all() or not np.array_equal(y, np.round(y)):
            raise DataError(f"{where}: labels must be whole numbers")
    elif y.dtype.kind not in "iu":
        raise DataError(f"{where}: labels have non-numeric type {y.dtype}")
    if y.min() < 0:
        raise DataError(f"{where}: negative label {int(y.min())}")
    return y.astype(np.int64)


def check_label_range(y: np.ndarray, k: int, where, unit: str = "sample", whose: str = "") -> None:
    """DataError naming the first label outside 0..k-1 and its ``unit`` (sample, row) in ``where``;
    ``whose`` follows the range in the message (``", the classes of the training labels"``)."""
    if len(y) and int(y.max()) >= k:
        i = int(np.argmax(y >= k))
        raise DataError(f"{where}: label {int(y[i])} ({unit} {i}) is outside 0..{k - 1}{whose}")

# ---------------------------------------------------------------- readers
def _read_bytes(path) -> bytes:
    """File contents, gunzipped when they start with the gzip magic number."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path}: corrupt or truncated gzip data ({exc})") from None
    if path.suffix == ".gz":
        head = raw[:200].lstrip().lower()
        if is_svg(raw):
            raise svg_error(path, "gzip data (the name ends in .gz)")
        if head.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head")):
            raise DataError(f"{path}: an HTML page, not gzip data (a failed download? delete it and retry)")
        if not raw:
            raise DataError(f"{path}: empty file")
        raise DataError(f"{path}: not gzip data although the name ends in .gz")
    return raw


MAGIC = {b"\xff\xd8\xff": "a JPEG image", b"\x89PNG": "a PNG image", b"\x93NUMPY": "a NumPy .npy file",
         b"PK\x03\x04": "a zip archive (an .npz?)", b"GIF8": "a GIF image", b"BM": "a BMP image",
         b"\x80": "a Python pickle"}


def _known_format(raw: bytes) -> str | None:
    """What a file is, by its first bytes, when it is a common format that is not IDX."""
    return next((what for magic, what in MAGIC.items() if raw.startswith(magic)), None)


def _refuse_markup(raw: bytes, path, expected: str) -> None:
    """DataError for a file of markup where ``expected`` data was: an SVG drawing, or an HTML/XML page
    (a failed download's error page, as a rule)."""
    if is_svg(raw):
        raise svg_error(path, expected)
    if raw.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"<":
        raise DataError(f"{path}: an HTML/XML page, not {expected} (a failed download? delete it and retry)")


def describe(path) -> str | None:
    """What a file is by its first bytes (an SVG drawing, an HTML page, a JPEG, a zip archive, ...), or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if is_svg(head):
        return "an SVG vector drawing, which fastnn does not read"
    if head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"<":
        return "an HTML/XML page (a failed download?)"
    return _known_format(head)


def read_idx(path) -> np.ndarray:
    """An IDX file (``.gz`` or raw) -> array of its declared shape and type; strict."""
    return _parse_idx(_read_bytes(path), path)


def _parse_idx(raw: bytes, path) -> np.ndarray:
    """The contents of an IDX file (gunzipped) -> array; DataError naming ``path`` for anything else."""
    if len(raw) < 4:
        raise DataError(f"{path}: {len(raw)} bytes, too short for an IDX header")
    _refuse_markup(raw, path, "IDX data")
    if _known_format(raw):
        raise DataError(f"{path}: {_known_format(raw)}, not IDX data")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES or raw[3] == 0:
        raise DataError(f"{path}: bad IDX magic number {raw[:4].hex()} (expected 0000 08 0N)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(raw[4:header], ">u4"))
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    want = int(np.prod(dims)) * dtype.itemsize
    got = len(raw) - header
    if got != want:
        fits = [f"0x{code:02x} ({np.dtype(t).name})" for code, t in IDX_DTYPES.items()
                if int(np.prod(dims)) * np.dtype(t).itemsize == got]
        if fits:
            raise DataError(f"{path}: the header's type byte 0x{raw[2]:02x} ({dtype.name}) does not fit its "
                            f"{got} bytes of data, which fit type {fits[0]}: a wrong type byte")
        raise DataError(f"{path}: {got} bytes of data, but the header {dims} needs {want} "
                        f"({'truncated' if got < want else 'trailing bytes'})")
    return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def read_csv(path, labels: str = "required") -> tuple[np.ndarray, np.ndarray | None]:
    """A CSV of images -> (images (N, D), labels (N,) or None): the one CSV reader.

    Layouts: a header row (a ``label`` column, if any, holds the labels; the other
    columns are pixels), or no header: then a row of 1 + side*side values is a label
    followed by a square image (785 = 1 + 28*28), and a row of side*side values is an
    image with no label. labels: ``"required"`` (training: a file without labels is
    a DataError) or ``"optional"`` (prediction). A UTF-8 byte-order mark is skipped.
    The separator is ``,``, or ``;`` or a tab when the first line has one (``separator``).
    Ragged rows, non-numeric or NaN cells raise a DataError naming the line.
    """
    raw = _read_bytes(path)
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    _refuse_markup(raw, path, "CSV")
    end = raw.find(b"\n")
    first_line = raw[:end if end >= 0 else len(raw)].decode("utf-8", errors="replace").strip()
    if not first_line:
        raise DataError(f"{path}: empty file" if not raw.strip() else f"{path}: the first line is empty")
    sep = separator(first_line, path)
    if sep != "," and b"," in raw:  # decimal commas (0,5): the ';' export of a spreadsheet in a European locale
        raw = raw.replace(b",", b".")
        first_line = first_line.replace(",", ".")
    first = [c.strip().strip('"') for c in first_line.split(sep)]
    width = len(first)
    if not all(_is_number(c) for c in first):  # a header row
        names = [c.lower() for c in first]
        label_col = names.index("label") if "label" in names else None
        if label_col is None and labels == "required":
            raise DataError(f"{path}: the header row has no 'label' column (training needs labels)")
        body, first_row = io.BytesIO(raw), 2
        body.seek(end + 1 if end >= 0 else len(raw))  # no copy of the data rows
    else:
        label_col = _headerless_label_column(width, path, labels)
        body, first_row = io.BytesIO(raw), 1
    del raw
    table = _parse_rows(body, width, path, first_row, sep)
    del body
    if label_col is None:
        return flatten_images(table, path), None
    y = table[:, label_col]
    images = np.delete(table, label_col, axis=1)
    return flatten_images(images, path), check_labels(y, len(y), path)


def separator(first_line: str, path="CSV") -> str:
    """A CSV's separator, from its first line: ``;`` (the CSV export of a spreadsheet in a locale whose
    decimal separator is the comma), else a tab, else ``,``. Quoted cells are left out of the look; a
    line of values separated by spaces alone is a DataError that says so."""
    bare = re.sub(r'"[^"]*"', "", first_line)
    sep = next((sep for sep in (";", "\t", ",") if sep in bare), None)
    if sep is None and len(bare.split()) > 1:
        raise DataError(f"{path}: the values of the first line are separated by spaces; fastnn reads CSV files "
                        "separated by ',', ';' or tabs")
    return sep or ","


def _headerless_label_column(width: int, path, labels: str) -> int | None:
    """0 when a headerless row is a label and a square image, None when it is a square image alone."""
    if _is_square(width - 1):
        return 0
    if _is_square(width):
        if labels == "required":
            raise DataError(f"{path}: rows of {width} values and no header: a {int(round(width ** 0.5))}x"
                            f"{int(round(width ** 0.5))} image with no label column (training needs labels: put "
                            f"the label first, or add a header row naming the 'label' column)")
        return None
    raise DataError(f"{path}: rows of {width} values and no header: neither a square image nor a label and a "
                    f"square image; add a header row naming the 'label' column and the pixel columns")


def _is_square(n: int) -> bool:
    return n > 0 and int(round(n ** 0.5)) ** 2 == n


def _parse_rows(body: io.BytesIO, width: int, path, first_row: int, sep: str = ",") -> np.ndarray:
    """CSV rows of ``width`` numbers from the current position of ``body`` -> (N, width):
    uint8 when every value is, else float32."""
    start = body.tell()
    for dtype in (np.uint8, np.float32):  # uint8 first: 4x less memory for the common case
        body.seek(start)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "input contained no data": said below
                table = np.loadtxt(body, delimiter=sep, dtype=dtype, ndmin=2, quotechar='"')
        except ValueError:
            continue
        if table.shape[0] == 0:
            raise DataError(f"{path}: no data rows")
        if table.shape[1] != width:
            break
        bad = ~np.isfinite(table) if dtype != np.uint8 else None
        if bad is not None and bad.any():
            raise DataError(f"{path}: line {int(np.argwhere(bad)[0][0]) + first_row}: NaN or infinite value")
        return table
    lines = body.getvalue()[start:].decode("utf-8", errors="replace").split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        cells = line.split(sep)
        if len(cells) != width:
            raise DataError(f"{path}: line {i + first_row} has {len(cells)} fields, expected {width}")
        for c in cells:
            if not _is_number(c.strip().strip('"')):
                raise DataError(f"{path}: line {i + first_row}: non-numeric value {c.strip()!r}")
    raise DataError(f"{path}: cannot parse as CSV")


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def read_npz(path):
    """An ``.npz`` with x_train, y_train, x_test, y_test -> those four arrays."""
    arrays = npzfile.read_npz(path)
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays]
    if missing:
        raise DataError(f"{path}: missing arrays {', '.join(missing)} "
                        "(expected x_train, y_train, x_test, y_test)")
    return arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"]


def read_pickle(path, allow_pickle=False):
    """A pickled list/array (of images or labels). Refused unless allow_pickle; even then only
    lists, numbers and NumPy arrays are unpickled (``_ArrayUnpickler``)."""
    if not allow_pickle:
        raise DataError(f"{path}: refusing to load a pickle: unpickling can run arbitrary code. "
                        "If you trust this file, pass allow_pickle=True (--allow-pickle)")
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        _check_pickle_ops(raw)
        obj = _ArrayUnpickler(io.BytesIO(raw)).load()
    except Exception as exc:
        raise DataError(f"{path}: cannot unpickle ({type(exc).__name__}: {exc})") from None
    try:
        return np.asarray([np.asarray(o).reshape(-1) if np.ndim(o) > 1 else o for o in obj])
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: not a list of equally sized images or labels ({exc})") from None


def _check_pickle_ops(raw: bytes) -> None:
    """Walk the opcodes before unpickling: every length field is checked against the data (the
    unpickler would allocate what a corrupt one claims before finding it missing), and memo
    indices must come in sequence (the unpickler sizes its memo table by the largest index)."""
    memo = 0
    for op, arg, _ in pickletools.genops(raw):
        if op.name == "MEMOIZE":
            memo += 1
        elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
            if int(arg) > memo:
                raise pickle.UnpicklingError(f"memo index {arg} out of sequence (next is {memo})")
            memo = max(memo, int(arg) + 1)


class _CheckedArray(np.ndarray):
    """An ndarray whose pickled state is checked before NumPy allocates it (shape against data)."""

    def __setstate__(self, state):
        shape, dtype, data = state[1], state[2], state[-1]
        if isinstance(data, (bytes, bytearray)):
            if any(int(n) < 0 for n in shape) or math.prod(int(n) for n in shape) * dtype.itemsize != len(data):
                raise pickle.UnpicklingError(f"array of shape {tuple(shape)} does not match its {len(data)} bytes")
        super().__setstate__(state)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles lists, numbers and NumPy arrays, and nothing else: no other class or function is
    looked up, so the file cannot run code, and no array is allocated by a size its data lacks."""

    ALLOWED = {("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "scalar"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed (only lists, numbers and NumPy arrays)")
        return _CheckedArray if name == "ndarray" else super().find_class(module, name)


def read_images(path, normalize: bool = True):
    """Images to classify -> (images (N, D), labels or None).

    IDX image files (labels read when the matching labels file is beside them), CSV
    files (labels when there is a label column), or one image file that Pillow reads
    (PNG, JPEG, ...): prepared as MNIST's digits were (``images.mnist_style``), or with
    normalize False only converted to gray.
    """
    p = Path(path)
    name = p.name.lower()
    if name.endswith(IMAGE_SUFFIXES):
        gray = read_image(p)
        return (mnist_style(gray, p) if normalize else gray.reshape(-1))[None], None
    if name.endswith((".csv", ".csv.gz")):
        return read_csv(p, labels="optional")
    raw = _read_bytes(p)
    if is_svg(raw):
        raise svg_error(p)  # with how to make a PNG of it, which fastnn predict reads
    images = _parse_idx(raw, p)
    del raw
    labels_path = labels_file(p)
    if labels_path == p or not labels_path.is_file():
        return images, None
    return images, check_labels(read_idx(labels_path), len(images), labels_path)


def labels_file(path) -> Path:
    """Where the labels of an image file read by ``read_images`` are: an IDX images file's labels
    file beside it (``...images-idx3...`` -> ``...labels-idx1...``); a CSV's are in the file itself."""
    p = Path(path)
    return p.with_name(p.name.replace("images-idx3", "labels-idx1")) if "images-idx3" in p.name else p
