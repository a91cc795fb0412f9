"""MNIST-family data: find it, download it (mirrors, MD5, cache), read it strictly.

``load(name_or_path)`` returns a ``Dataset``: raw pixels of both splits, integer
labels, class names, where the files came from, and one preprocessing
(``x * scale + shift``) derived from the training split and applied to both, so
train and test inputs can never be scaled differently.

Readers: IDX (``.gz`` or raw), CSV (header with a ``label`` column, or headerless
label-first), NPZ (Keras ``mnist.npz`` layout) and, only on explicit request,
pickled lists of images and labels. Every problem raises ``DataError`` with the
file and the reason.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import pickle
import pickletools
import sys
import urllib.request
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import npzfile
from .errors import DataError
from .images import IMAGE_SUFFIXES, mnist_style, read_image
from .preprocessing import Preprocessing

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# Mirrors are tried in order; the MD5s are those of the published .gz files
# (the lists torchvision checks downloads against).
REGISTRY = {
    "mnist": {
        "mirrors": ["https://ossci-datasets.s3.amazonaws.com/mnist/",
                    "http://yann.lecun.com/exdb/mnist/"],
        "md5": {"train_images": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                "train_labels": "d53e105ee54ea40749a09fcbcd1e9432",
                "test_images": "9fb629c4189551a2d022fa330f9573f3",
                "test_labels": "ec29112dd5afa0611ce80d1b7f02629c"},
        "classes": [str(i) for i in range(10)],
    },
    "fashion-mnist": {
        "mirrors": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
        "md5": {"train_images": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                "train_labels": "25c81989df183df01b3e8a0aad5dffbe",
                "test_images": "bef4ecab320f06d8554ea6380940ec79",
                "test_labels": "bb300cfdad3c16e7a12a480ee83fd310"},
        "classes": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                    "Sneaker", "Bag", "Ankle boot"],
    },
    "kmnist": {
        "mirrors": ["http://codh.rois.ac.jp/kmnist/dataset/kmnist/"],
        "md5": {"train_images": "bdb82020997e1d708af4cf47b453dcf7",
                "train_labels": "e144d726b3acfaa3e44228e80efcd344",
                "test_images": "5c965bf0a639b31b8f53240b1b52f4d7",
                "test_labels": "7320c461ea6c1c855c0b718fb2a4b134"},
        "classes": ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"],
    },
}
ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist"}
CSV_PAIRS = [("mnist_train.csv", "mnist_test.csv"), ("train.csv", "test.csv")]
PICKLE_FILES = ("images.pkl", "labels.pkl", "test/test_images.pkl", "test/test_labels.pkl")
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# ---------------------------------------------------------------- the dataset
@dataclass
class Dataset:
    """Both splits of a data set.

    train_images / test_images: (N, D) raw pixels, uint8 (0..255) or float32;
    train_labels / test_labels: (N,) int64 in 0..K-1; classes: K names;
    preprocessing: how raw pixels become network inputs (``x * scale + shift``
    for pixels of range pixel_max: 255 for raw pixels, 1 for images already in
    [0, 1]), derived from the training split; source: where each file came from.
    """

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    source: dict = field(default_factory=dict)

    def preprocess(self, images) -> np.ndarray:
        """Raw images (N, D) of this data set's pixel range -> float32 network inputs."""
        return self.preprocessing.from_raw(images, np.float32, pixel_max=self.preprocessing.pixel_max)

    @property
    def x_train(self) -> np.ndarray:
        """(N, D) float32 training inputs, preprocessed."""
        return self.preprocess(self.train_images)

    @property
    def x_test(self) -> np.ndarray:
        """(N, D) float32 test inputs, preprocessed the same way as the training inputs."""
        return self.preprocess(self.test_images)

    @property
    def y_train(self) -> np.ndarray:
        return self.train_labels

    @property
    def y_test(self) -> np.ndarray:
        return self.test_labels

    def limit(self, n_train: int | None = None, n_test: int | None = None) -> Dataset:
        """A copy holding only the first n_train / n_test samples (same preprocessing)."""
        return Dataset(self.name, self.train_images[:n_train], self.train_labels[:n_train],
                       self.test_images[:n_test], self.test_labels[:n_test], self.classes,
                       self.preprocessing, dict(self.source))


def fit_preprocessing(train, test, standardize=False, train_name="train", test_name="test") -> Preprocessing:
    """Derive the preprocessing from the training images; check the test images match.

    uint8 (or integral 0..255) pixels get ``scale = 1/255``; floats already in [0, 1]
    keep ``scale = 1`` (never rescaled twice). ``standardize`` then maps the
    training pixels to mean 0, standard deviation 1.
    """
    def kind(a):
        if a.dtype == np.uint8:
            return 255.0
        hi, lo = float(a.max(initial=0)), float(a.min(initial=0))
        if lo < 0 or hi > 255:
            return None
        return 255.0 if hi > 1.0 else 1.0

    k_train, k_test = kind(train), kind(test)
    if k_train is None:
        raise DataError(f"{train_name}: pixel values outside 0..255; expected raw pixels or values in [0, 1]")
    if k_test is None:
        raise DataError(f"{test_name}: pixel values outside 0..255; expected raw pixels or values in [0, 1]")
    if k_train != k_test and test.size and np.asarray(test).max() > 0:
        rng = {255.0: "0..255", 1.0: "0..1"}
        raise DataError(f"{test_name}: pixels range over {rng[k_test]} but the training pixels "
                        f"({train_name}) over {rng[k_train]}; scale both splits the same way")
    scale, shift = 1.0 / k_train, 0.0
    if standardize:
        x = train.astype(np.float64) * scale
        mean, std = float(x.mean()), float(x.std())
        if std == 0:
            raise DataError(f"{train_name}: every pixel has the same value; cannot standardize")
        scale, shift = scale / std, -mean / std
    return Preprocessing(scale, shift, k_train)


def finish(name, train_images, train_labels, test_images, test_labels, classes, source,
           standardize=False) -> Dataset:
    """Validate the four arrays together and build the Dataset."""
    tr, te = source.get("train_images", "train"), source.get("test_images", "test")
    train_images = flatten_images(train_images, tr)
    test_images = flatten_images(test_images, te)
    if train_images.shape[1] != test_images.shape[1]:
        raise DataError(f"{te}: images have {test_images.shape[1]} pixels but the training images "
                        f"({tr}) have {train_images.shape[1]}")
    train_labels = check_labels(train_labels, train_images.shape[0], source.get("train_labels", tr))
    test_labels = check_labels(test_labels, test_images.shape[0], source.get("test_labels", te))
    classes = class_names(classes, train_labels, source.get("train_labels", tr))
    for split, y in (("train_labels", train_labels), ("test_labels", test_labels)):
        if int(y.max()) >= len(classes):
            i = int(np.argmax(y >= len(classes)))
            seen = "" if split == "train_labels" else ", the classes of the training labels"
            raise DataError(f"{source.get(split, split)}: label {int(y[i])} (sample {i}) is outside "
                            f"0..{len(classes) - 1}{seen}")
    prep = fit_preprocessing(train_images, test_images, standardize, tr, te)
    return Dataset(name, train_images, train_labels, test_images, test_labels, list(classes), prep, dict(source))


def class_names(classes, train_labels, where) -> list[str]:
    """The class names of a data set: the one place the number of classes K is decided.

    classes: the names a named data set declares, or K (``--classes K``), or None:
    then the training labels must be exactly 0..K-1 with every class present. A
    gap in the label range is the signature of a corrupt label, and is refused
    naming the label, its sample and the file (a model with 43 outputs for 10
    classes would train without a word).
    """
    if isinstance(classes, (int, np.integer)) and not isinstance(classes, bool):
        if classes < 2:
            raise DataError(f"a classifier needs at least 2 classes, not {classes}")
        return [str(i) for i in range(int(classes))]
    if classes is not None:
        return list(classes)
    present = np.unique(train_labels)  # sorted; no allocation sized by the largest label
    if present[-1] != len(present) - 1:
        gap = int(np.argmax(present != np.arange(len(present))))  # the first class with no sample
        label = int(present[gap])
        i = int(np.argmax(train_labels == label))
        raise DataError(f"{where}: label {label} (sample {i}) leaves class{'es' if label - gap > 1 else ''} "
                        f"{gap}{'..' + str(label - 1) if label - gap > 1 else ''} without a training sample; "
                        f"labels must be 0..K-1 with every class present, and a gap is the mark of a corrupt "
                        f"label. If there really are {int(present[-1]) + 1} classes, pass --classes "
                        f"{int(present[-1]) + 1} (classes= in fastnn.datasets.load)")
    if len(present) < 2:
        raise DataError(f"{where}: every training label is {int(present[0])}; a classifier needs at least 2 classes")
    return [str(i) for i in range(len(present))]


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


def read_idx(path) -> np.ndarray:
    """An IDX file (``.gz`` or raw) -> array of its declared shape and type; strict."""
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DataError(f"{path}: {len(raw)} bytes, too short for an IDX header")
    if raw.lstrip()[:1] == b"<":
        raise DataError(f"{path}: an HTML/XML page, not IDX data (a failed download? delete it and retry)")
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
    Ragged rows, non-numeric or NaN cells raise a DataError naming the line.
    """
    raw = _read_bytes(path)
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    end = raw.find(b"\n")
    first_line = raw[:end if end >= 0 else len(raw)].decode("utf-8", errors="replace").strip()
    if not first_line:
        raise DataError(f"{path}: empty file" if not raw.strip() else f"{path}: the first line is empty")
    first = [c.strip().strip('"') for c in first_line.split(",")]
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
    table = _parse_rows(body, width, path, first_row)
    del body
    if label_col is None:
        return flatten_images(table, path), None
    y = table[:, label_col]
    images = np.delete(table, label_col, axis=1)
    return flatten_images(images, path), check_labels(y, len(y), path)


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


def _parse_rows(body: io.BytesIO, width: int, path, first_row: int) -> np.ndarray:
    """CSV rows of ``width`` numbers from the current position of ``body`` -> (N, width):
    uint8 when every value is, else float32."""
    start = body.tell()
    for dtype in (np.uint8, np.float32):  # uint8 first: 4x less memory for the common case
        body.seek(start)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "input contained no data": said below
                table = np.loadtxt(body, delimiter=",", dtype=dtype, ndmin=2, quotechar='"')
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
        cells = line.split(",")
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
    images = read_idx(p)
    labels_path = p.with_name(p.name.replace("images-idx3", "labels-idx1"))
    labels = read_idx(labels_path) if "images-idx3" in p.name and labels_path.is_file() else None
    return images, labels


# -------------------------------------------------------------- locations
def cache_dir() -> Path:
    """The user cache: ``$XDG_CACHE_HOME/fastnn`` or ``~/.cache/fastnn``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastnn"


def search_dirs(name: str, root=None) -> list[Path]:
    """Folders searched for a named data set, in order (each also as ``<dir>/<name>``)."""
    bases = []
    if root is not None:
        bases.append(Path(root))
    if os.environ.get("FASTNN_DATA"):
        bases.append(Path(os.environ["FASTNN_DATA"]))
    bases.append(cache_dir())
    bases.append(Path("/usr/share/datasets"))
    out = []
    for b in bases:
        for d in (b / name, b) if b != Path("/usr/share/datasets") else (b / name,):
            if d not in out:
                out.append(d)
    return out


def find_file(stem: str, dirs) -> Path | None:
    """``<dir>/<stem>.gz`` or ``<dir>/<stem>`` in the first folder that has one."""
    dotted = stem.replace("-idx", ".idx")  # train-images.idx3-ubyte, as some archives name them
    for d in dirs:
        for cand in (d / (stem + ".gz"), d / stem, d / (dotted + ".gz"), d / dotted):
            if cand.is_file():
                return cand
    return None


# --------------------------------------------------------------- download
def download(urls, dest, md5: str, timeout: float = 30.0, progress: bool | None = None) -> Path:
    """Fetch the first URL that works into ``dest``, verified against ``md5``.

    The bytes go to a temporary file beside ``dest``, which is renamed into place
    only after the size and MD5 check, so an interrupted or corrupt download never
    leaves a file that looks valid. Raises DataError listing every failure.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for url in urls:
        tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}")
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as f:
                total = int(resp.headers.get("Content-Length") or 0)
                digest, done = hashlib.md5(), 0
                bar = _progress_bar(total, dest.name, progress)
                while True:
                    chunk = resp.read(1 << 16)
                    if not chunk:
                        break
                    f.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
                if bar is not None:
                    bar.close()
                if total and done != total:
                    raise OSError(f"connection closed after {done} of {total} bytes")
                if digest.hexdigest() != md5:
                    raise OSError(f"MD5 {digest.hexdigest()} does not match the expected {md5}")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest)
            return dest
        except Exception as exc:  # URLError, HTTPError, timeouts, IncompleteRead, ...
            errors.append(f"{url}: {exc}")
        finally:
            if tmp.exists():
                tmp.unlink()
    raise DataError(f"{dest.name}: download failed from every mirror: " + "; ".join(errors))


def _progress_bar(total, label, progress):
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total or None, unit="B", unit_scale=True, desc=label, leave=False)


# ------------------------------------------------------------------- load
def load(name_or_path, root=None, download=True, allow_pickle=False, standardize=False,
         train=None, test=None, mirrors=None, timeout=30.0, progress=None, classes=None) -> Dataset:
    """Load a data set by name (mnist, fashion-mnist, kmnist) or path.

    name_or_path: a registered name; a folder holding the four IDX files, a
    train/test CSV pair, or the pickles ``images.pkl, labels.pkl,
    test/test_images.pkl, test/test_labels.pkl``; or an ``.npz`` file. Or pass
    ``train=`` and ``test=`` files (CSV, or IDX image files with their labels
    files beside them) and leave name_or_path None.
    root: a folder searched first for named data sets (then $FASTNN_DATA, the
    user cache, /usr/share/datasets); missing files are downloaded into the
    cache when ``download`` is true.
    classes: the number of classes K, for data whose labels do not show every
    class (see ``class_names``); a named data set declares its own.
    """
    if train is not None or test is not None:
        if train is None or test is None:
            raise DataError("give both a training file and a test file")
        return _load_pair(Path(train), Path(test), standardize, classes)
    key = str(name_or_path).lower()
    key = ALIASES.get(key, key)
    if key in REGISTRY:
        if classes is not None and classes != len(REGISTRY[key]["classes"]):
            raise DataError(f"{key} has {len(REGISTRY[key]['classes'])} classes, not {classes}")
        return _load_named(key, root, download, standardize, mirrors, timeout, progress)
    path = Path(name_or_path)
    if path.is_dir():
        return _load_dir(path, allow_pickle, standardize, classes)
    if path.is_file():
        if path.suffix.lower() == ".npz":
            xtr, ytr, xte, yte = read_npz(path)
            src = {"train_images": f"{path}:x_train", "train_labels": f"{path}:y_train",
                   "test_images": f"{path}:x_test", "test_labels": f"{path}:y_test"}
            return finish(path.stem, xtr, ytr, xte, yte, classes, src, standardize)
        if path.suffix.lower() in (".pkl", ".pickle"):
            raise DataError(f"{path}: pickles are read only from a folder holding {', '.join(PICKLE_FILES)}, "
                            "and only with --allow-pickle (allow_pickle=True): unpickling can run arbitrary code")
        raise DataError(f"{path}: a single file must be an .npz with x_train, y_train, x_test, y_test; "
                        "for a CSV pair pass the folder or --train/--test")
    raise DataError(f"{name_or_path}: neither a known data set ({', '.join(REGISTRY)}) nor an "
                    "existing file or folder")


def _load_named(name, root, allow_download, standardize, mirrors, timeout, progress):
    if root is not None and not Path(root).is_dir():
        raise DataError(f"{root}: the data folder {'is a file' if Path(root).exists() else 'does not exist'}")
    entry = REGISTRY[name]
    dirs = search_dirs(name, root)
    files = {}
    for key, stem in IDX_FILES.items():
        found = find_file(stem, dirs)
        if found is None and allow_download:
            urls = [m + stem + ".gz" for m in (mirrors or entry["mirrors"])]
            try:
                found = download(urls, cache_dir() / name / (stem + ".gz"), entry["md5"][key],
                                 timeout, progress)
            except DataError as exc:
                raise DataError(f"{name}: {stem}(.gz) not found in {', '.join(map(str, dirs))}, and "
                                f"{exc}. Put the four IDX files in one of those folders "
                                f"(or set FASTNN_DATA)") from None
        if found is None:
            raise DataError(f"{name}: {stem}(.gz) not found in {', '.join(map(str, dirs))} "
                            "(downloads are off). Put the four IDX files in one of those folders")
        files[key] = found
    return _from_idx(name, files, entry["classes"], standardize)


def _from_idx(name, files, classes, standardize):
    arrays = {k: read_idx(p) for k, p in files.items()}
    return finish(name, arrays["train_images"], arrays["train_labels"], arrays["test_images"],
                  arrays["test_labels"], classes, {k: str(p) for k, p in files.items()}, standardize)


def _load_dir(path, allow_pickle, standardize, classes=None):
    files = {k: find_file(stem, [path]) for k, stem in IDX_FILES.items()}
    if any(files.values()) and not all(files.values()):
        missing = [IDX_FILES[k] for k, f in files.items() if f is None]
        raise DataError(f"{path}: holds {sum(map(bool, files.values()))} of the four IDX files; missing "
                        f"{', '.join(missing)} (.gz or raw)")
    if all(files.values()):
        entry = REGISTRY.get(ALIASES.get(path.name.lower(), path.name.lower()), {})
        return _from_idx(path.name, files, entry.get("classes", classes), standardize)
    for tr, te in CSV_PAIRS:
        if (path / tr).is_file() and (path / te).is_file():
            return _load_pair(path / tr, path / te, standardize, classes)
    pk = [path / f for f in PICKLE_FILES]
    if all(p.is_file() for p in pk):
        imgs, labels, timgs, tlabels = (read_pickle(p, allow_pickle) for p in pk)
        src = dict(zip(IDX_FILES, map(str, pk)))
        return finish(path.name, imgs, labels, timgs, tlabels, classes, src, standardize)
    raise DataError(f"{path}: no data set found; expected the four IDX files "
                    f"({', '.join(IDX_FILES.values())}, .gz or raw), a CSV pair "
                    f"({' / '.join(a + ' + ' + b for a, b in CSV_PAIRS)}), or the pickles "
                    f"{', '.join(PICKLE_FILES)}")


def _load_pair(train: Path, test: Path, standardize, classes=None):
    def one(p: Path):
        if p.suffix.lower() == ".csv" or p.name.lower().endswith(".csv.gz"):
            return read_csv(p)
        if "idx3" in p.name:
            labels = p.with_name(p.name.replace("images-idx3", "labels-idx1"))
            if not labels.is_file():
                raise DataError(f"{p}: its labels file {labels.name} is not beside it")
            return read_idx(p), read_idx(labels)
        raise DataError(f"{p}: unknown format; expected a .csv file or an IDX images file")

    xtr, ytr = one(train)
    xte, yte = one(test)
    src = {"train_images": str(train), "train_labels": str(train),
           "test_images": str(test), "test_labels": str(test)}
    return finish(train.stem, xtr, ytr, xte, yte, classes, src, standardize)
