"""MNIST-family data sets: find them, download them, read them strictly.

``load(name_or_path)`` returns a ``Dataset``: raw pixels of both splits, integer
labels, class names, where the files came from, and one preprocessing
(``x * scale + shift``) derived from the training split and applied to both, so
train and test inputs can never be scaled differently.

The registry of named data sets (mirrors, MD5s, class names) is here; the file
readers (IDX, CSV, NPZ, pickles, image files) are in ``fastnn.readers``, the search
folders and the download in ``fastnn.download``. Every problem raises ``DataError``
with the file and the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import readers
from .download import cache_dir, download, find_file, search_dirs
from .errors import DataError
from .preprocessing import Preprocessing
from .readers import check_label_range, check_labels, flatten_images, read_csv, read_idx, read_npz, read_pickle
from .readers import read_images as read_images  # re-exported: fastnn.cli reads images as datasets.read_images

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


# ---------------------------------------------------------------- the dataset
@dataclass
class Dataset:
    """Both splits of a data set.

    train_images / test_images: (N, D) raw pixels, uint8 (0..255) or float32;
    train_labels / test_labels: (N,) int64 in 0..K-1; classes: K names;
    preprocessing: how raw pixels become network inputs (``x * scale + shift``
    for pixels of range pixel_max: 255 for raw pixels, 1 for images already in
    [0, 1]), derived from the training split; source: where each file came from;
    image_shape: the images' (H, W) when the files hold them as such (IDX files,
    arrays of shape (N, H, W)); None for rows of pixels (CSV), whose shape is unknown.
    """

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    source: dict = field(default_factory=dict)
    image_shape: tuple[int, int] | None = None  # (H, W) when the files say (IDX, (N, H, W) arrays), else None

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
                       self.preprocessing, dict(self.source), self.image_shape)


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
    shape = tuple(int(n) for n in np.shape(train_images)[1:])
    shape = shape if len(shape) == 2 and shape == tuple(np.shape(test_images)[1:]) else None
    train_images = flatten_images(train_images, tr)
    test_images = flatten_images(test_images, te)
    if train_images.shape[1] != test_images.shape[1]:
        raise DataError(f"{te}: images have {test_images.shape[1]} pixels but the training images "
                        f"({tr}) have {train_images.shape[1]}")
    train_labels = check_labels(train_labels, train_images.shape[0], source.get("train_labels", tr))
    test_labels = check_labels(test_labels, test_images.shape[0], source.get("test_labels", te))
    classes = class_names(classes, train_labels, source.get("train_labels", tr))
    check_label_range(train_labels, len(classes), source.get("train_labels", "train_labels"))
    check_label_range(test_labels, len(classes), source.get("test_labels", "test_labels"),
                      whose=", the classes of the training labels")
    prep = fit_preprocessing(train_images, test_images, standardize, tr, te)
    return Dataset(name, train_images, train_labels, test_images, test_labels, list(classes), prep, dict(source),
                   shape)


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
        what = readers.describe(p) if p.is_file() else "no such file"
        raise DataError(f"{p}: {what or 'unknown format'}; expected a .csv file or an IDX images file")

    xtr, ytr = one(train)
    xte, yte = one(test)
    src = {"train_images": str(train), "train_labels": str(train),
           "test_images": str(test), "test_labels": str(test)}
    return finish(train.stem, xtr, ytr, xte, yte, classes, src, standardize)
