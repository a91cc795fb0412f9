"""Readers, search order, preprocessing and error messages, on files the tests write."""

import gzip
import hashlib
import pickle
import time

import numpy as np
import pytest

from fastnn import DataError
from fastnn.datasets import IDX_FILES, load
from fastnn.readers import read_csv, read_idx


def idx_bytes(a: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, a.ndim]) + np.array(a.shape, ">u4").tobytes() + a.astype(np.uint8).tobytes()


def write_idx_set(folder, n_train=12, n_test=5, gz=True, seed=0, side=4, shape=None):
    rng = np.random.default_rng(seed)
    shape = shape or (side, side)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
        "train_labels": rng.permutation(np.arange(n_train) % 10).astype(np.uint8),  # every class present
        "test_images": rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test).astype(np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for key, stem in IDX_FILES.items():
        data = idx_bytes(arrays[key])
        if gz:
            (folder / (stem + ".gz")).write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)
    return arrays


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("FASTNN_DATA", raising=False)


# ----------------------------------------------------------------- IDX
@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder_roundtrip(tmp_path, gz):
    arrays = write_idx_set(tmp_path / "d", gz=gz)
    ds = load(tmp_path / "d")
    np.testing.assert_array_equal(ds.train_images, arrays["train_images"].reshape(12, 16))
    np.testing.assert_array_equal(ds.test_labels, arrays["test_labels"])
    assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int64
    assert ds.preprocessing.scale == pytest.approx(1 / 255) and ds.preprocessing.shift == 0
    x = ds.x_train
    assert x.dtype == np.float32 and x.shape == (12, 16) and 0 <= x.min() and x.max() <= 1
    np.testing.assert_allclose(x, arrays["train_images"].reshape(12, 16) / 255, rtol=1e-6)


def test_named_dataset_search_order(tmp_path, monkeypatch):
    a_root = write_idx_set(tmp_path / "root" / "kmnist", seed=1)
    write_idx_set(tmp_path / "env", seed=2)  # <dir>/<file> layout
    monkeypatch.setenv("FASTNN_DATA", str(tmp_path / "env"))
    ds = load("kmnist", root=tmp_path / "root", download=False)
    np.testing.assert_array_equal(ds.train_labels, a_root["train_labels"])
    assert ds.classes[1] == "ki"
    ds2 = load("kmnist", download=False)  # no root: $FASTNN_DATA
    assert str(tmp_path / "env") in ds2.source["train_images"]
    monkeypatch.delenv("FASTNN_DATA")
    cached = write_idx_set(tmp_path / "cache" / "fastnn" / "kmnist", seed=3)
    ds3 = load("kmnist", download=False)  # the user cache
    np.testing.assert_array_equal(ds3.test_labels, cached["test_labels"])


def test_named_dataset_missing_offline_says_where_it_looked(tmp_path):
    with pytest.raises(DataError) as info:
        load("mnist", root=tmp_path, download=False)
    msg = str(info.value)
    assert "train-images-idx3-ubyte" in msg and str(tmp_path) in msg and "cache" in msg


@pytest.mark.parametrize("mutate,match", [
    (lambda b: b[:-3], "truncated"),
    (lambda b: b + b"xx", "trailing bytes"),
    (lambda b: b"\x00\x00\x08\x03\x00", "truncated IDX header"),
    (lambda b: b"\x12\x34" + b[2:], "bad IDX magic"),
    (lambda b: b"\x00\x00\x42" + b[3:], "bad IDX magic"),
    (lambda b: b"", "too short"),
    (lambda b: b"<html><body>404</body></html>", "HTML"),
])
def test_broken_idx_files(tmp_path, mutate, match):
    good = idx_bytes(np.zeros((3, 4, 4), np.uint8))
    p = tmp_path / "x-idx3-ubyte"
    p.write_bytes(mutate(good))
    with pytest.raises(DataError, match=match) as info:
        read_idx(p)
    assert str(p) in str(info.value)


def test_gz_that_is_really_an_html_page(tmp_path):
    p = tmp_path / "train-images-idx3-ubyte.gz"
    p.write_bytes(b"<!DOCTYPE html><html><title>Not Found</title></html>")
    with pytest.raises(DataError, match="HTML page, not gzip"):
        read_idx(p)


def test_truncated_gzip(tmp_path):
    p = tmp_path / "a.gz"
    p.write_bytes(gzip.compress(idx_bytes(np.zeros((50, 4, 4), np.uint8)))[:30])
    with pytest.raises(DataError, match="corrupt or truncated gzip"):
        read_idx(p)


def test_image_label_count_mismatch(tmp_path):
    write_idx_set(tmp_path / "d")
    (tmp_path / "d" / "t10k-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(np.zeros(4, np.uint8))))
    with pytest.raises(DataError, match="4 labels for 5 images"):
        load(tmp_path / "d")


def test_labels_out_of_range_for_a_named_set(tmp_path):
    write_idx_set(tmp_path / "mnist")
    (tmp_path / "mnist" / "train-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(np.full(12, 10, np.uint8))))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte.gz: label 10 \(sample 0\) is outside 0..9"):
        load("mnist", root=tmp_path, download=False)


def test_mixed_widths(tmp_path):
    write_idx_set(tmp_path / "d")
    (tmp_path / "d" / "t10k-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(np.zeros((5, 5, 5), np.uint8))))
    with pytest.raises(DataError, match="25 pixels but the training images"):
        load(tmp_path / "d")


# ----------------------------------------------------------------- CSV
def csv_text(images, labels, header=True):
    rows = []
    if header:
        rows.append(",".join(["label"] + [f"pixel{i}" for i in range(images.shape[1])]))
    rows += [",".join(map(str, [lab, *img])) for img, lab in zip(images, labels)]
    return "\n".join(rows) + "\n"


@pytest.mark.parametrize("header", [True, False])
def test_csv_pair(tmp_path, header):
    rng = np.random.default_rng(0)
    tr, te = rng.integers(0, 256, (6, 9)), rng.integers(0, 256, (3, 9))
    (tmp_path / "mnist_train.csv").write_text(csv_text(tr, [0, 1, 2, 3, 4, 5], header))
    (tmp_path / "mnist_test.csv").write_text(csv_text(te, [3, 4, 5], header))
    ds = load(tmp_path)
    np.testing.assert_array_equal(ds.train_images, tr)
    assert ds.train_images.dtype == np.uint8
    np.testing.assert_array_equal(ds.test_labels, [3, 4, 5])
    ds2 = load(None, train=tmp_path / "mnist_train.csv", test=tmp_path / "mnist_test.csv")
    np.testing.assert_array_equal(ds2.test_images, te)


def test_csv_label_column_not_first(tmp_path):
    p = tmp_path / "a.csv"
    p.write_text("p0,p1,label\n1,2,3\n4,5,6\n")
    x, y = read_csv(p)
    np.testing.assert_array_equal(x, [[1, 2], [4, 5]])
    np.testing.assert_array_equal(y, [3, 6])


@pytest.mark.parametrize("body,match", [
    ("label,a,b\n1,2,3\n4,5\n", "line 3 has 2 fields, expected 3"),
    ("label,a,b\n1,2,3\n4,x,6\n", "line 3: non-numeric value 'x'"),
    ("label,a,b\n1,2,3\n4,nan,6\n", "line 3: NaN"),
    ("", "empty file"),
    ("a,b,c\n1,2,3\n", "no 'label' column"),
    ("label,a,b\n", "no data rows"),
    ("label,a,b\n1.5,2,3\n", "whole numbers"),
    ("label,a,b\n-1,2,3\n", "negative label"),
])
def test_broken_csv(tmp_path, body, match):
    p = tmp_path / "bad.csv"
    p.write_text(body)
    with pytest.raises(DataError, match=match) as info:
        read_csv(p)
    assert "bad.csv" in str(info.value)


# ------------------------------------------------------------ NPZ, pickle
def test_npz_keras_layout(tmp_path):
    rng = np.random.default_rng(0)
    p = tmp_path / "mnist.npz"
    np.savez(p, x_train=rng.integers(0, 256, (7, 3, 3), dtype=np.uint8), y_train=np.arange(7),
             x_test=rng.integers(0, 256, (2, 3, 3), dtype=np.uint8), y_test=np.array([1, 0]))
    ds = load(p)
    assert ds.train_images.shape == (7, 9) and list(ds.test_labels) == [1, 0]
    np.savez(p, x_train=np.zeros((2, 4)))
    with pytest.raises(DataError, match="missing arrays y_train, x_test, y_test"):
        load(p)


def test_one_hot_labels_are_accepted_and_checked(tmp_path):
    p = tmp_path / "d.npz"
    onehot = np.eye(3)[[0, 2, 1]]
    np.savez(p, x_train=np.zeros((3, 4), np.uint8), y_train=onehot,
             x_test=np.zeros((1, 4), np.uint8), y_test=np.array([2]))
    assert list(load(p).train_labels) == [0, 2, 1]
    onehot[1, 0] = 1
    np.savez(p, x_train=np.zeros((3, 4), np.uint8), y_train=onehot,
             x_test=np.zeros((1, 4), np.uint8), y_test=np.array([2]))
    with pytest.raises(DataError, match="one-hot label row 1"):
        load(p)


def test_pickles_need_explicit_consent(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "test").mkdir()
    imgs = [rng.integers(0, 256, 16).astype(np.uint8) for _ in range(5)]
    for name, obj in [("images.pkl", imgs), ("labels.pkl", [0, 1, 2, 3, 4]),
                      ("test/test_images.pkl", imgs[:2]), ("test/test_labels.pkl", [4, 3])]:
        with open(tmp_path / name, "wb") as f:
            pickle.dump(obj, f)
    with pytest.raises(DataError, match="refusing to load a pickle.*allow_pickle=True"):
        load(tmp_path)
    ds = load(tmp_path, allow_pickle=True)
    assert ds.train_images.shape == (5, 16) and list(ds.test_labels) == [4, 3]


# ---------------------------------------------------------- preprocessing
def test_one_preprocessing_for_both_splits(tmp_path):
    p = tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    tr = rng.random((20, 6)).astype(np.float32)  # already in [0, 1]
    np.savez(p, x_train=tr, y_train=np.arange(20) % 2, x_test=tr[:3] * 255, y_test=np.zeros(3, int))
    with pytest.raises(DataError, match="pixels range over 0..255 but the training pixels"):
        load(p)
    np.savez(p, x_train=tr, y_train=np.arange(20) % 2, x_test=tr[:3], y_test=np.zeros(3, int))
    ds = load(p)
    assert ds.preprocessing.scale == 1.0  # never rescaled twice
    np.testing.assert_allclose(ds.x_test, tr[:3])


def test_standardize_uses_training_statistics(tmp_path):
    arrays = write_idx_set(tmp_path / "d", n_train=50)
    ds = load(tmp_path / "d", standardize=True)
    x = ds.x_train.astype(np.float64)
    assert abs(x.mean()) < 1e-5 and abs(x.std() - 1) < 1e-5
    raw = arrays["test_images"].reshape(5, -1) / 255.0
    mean, std = (arrays["train_images"] / 255.0).mean(), (arrays["train_images"] / 255.0).std()
    np.testing.assert_allclose(ds.x_test, (raw - mean) / std, rtol=1e-5, atol=1e-5)


def test_unknown_name(tmp_path):
    with pytest.raises(DataError, match="neither a known data set"):
        load(tmp_path / "nothing-here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no data set found"):
        load(tmp_path / "empty")


# ---------------------------------------------------------- the real data
def test_real_fashion_mnist_and_mnist_test_set(real_data_root):
    root = real_data_root  # read before isolated_cache hides FASTNN_DATA
    if not (root / "fashion-mnist" / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"real data not found in {root}")
    t0 = time.perf_counter()
    ds = load("fashion-mnist", root=root, download=False)
    seconds = time.perf_counter() - t0
    print(f"loaded Fashion-MNIST in {seconds:.2f} s")
    assert ds.train_images.shape == (60000, 784) and ds.test_images.shape == (10000, 784)
    assert np.bincount(ds.train_labels).tolist() == [6000] * 10
    assert ds.train_images.max() == 255 and ds.train_images.min() == 0
    assert ds.classes[9] == "Ankle boot"
    labels = read_idx(root / "mnist" / "t10k-labels-idx1-ubyte.gz")
    images = read_idx(root / "mnist" / "t10k-images-idx3-ubyte.gz")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    raw = gzip.decompress((root / "mnist" / "t10k-images-idx3-ubyte.gz").read_bytes())
    assert hashlib.md5(raw).hexdigest() == "2646ac647ad5339dbf082846283269ea"
    np.testing.assert_array_equal(np.frombuffer(raw, np.uint8, offset=16).reshape(10000, 28, 28), images)


# ---------------------------------------------------------- the class count
def npz_set(path, y_train, y_test, d=4):
    np.savez(path, x_train=np.zeros((len(y_train), d), np.uint8), y_train=np.asarray(y_train),
             x_test=np.zeros((len(y_test), d), np.uint8), y_test=np.asarray(y_test))
    return path


def test_one_corrupt_label_is_named_not_trained_as_a_43_class_model(tmp_path):
    y = np.arange(100) % 10
    y[57] = 42
    with pytest.raises(DataError, match=r"d.npz:y_train: label 42 \(sample 57\) leaves classes 10..41 without "
                                         r"a training sample.*pass --classes 43"):
        load(npz_set(tmp_path / "d.npz", y, [0, 1]))


def test_a_huge_corrupt_label_allocates_nothing_by_its_size(tmp_path):
    y = np.arange(100) % 10
    y[3] = 2 ** 40
    with pytest.raises(DataError, match=r"label 1099511627776 \(sample 3\)"):
        load(npz_set(tmp_path / "d.npz", y, [0, 1]))


def test_a_test_label_never_seen_in_training_is_refused(tmp_path):
    with pytest.raises(DataError, match=r"d.npz:y_test: label 3 \(sample 1\) is outside 0..2, the classes of"):
        load(npz_set(tmp_path / "d.npz", np.arange(30) % 3, [0, 3]))


def test_classes_declares_k_when_the_labels_do_not_show_every_class(tmp_path):
    path = npz_set(tmp_path / "d.npz", [0, 1, 3, 3], [4, 0])
    ds = load(path, classes=5)
    assert ds.classes == ["0", "1", "2", "3", "4"]
    with pytest.raises(DataError, match="label 4 .* outside 0..3"):
        load(path, classes=4)


def test_one_class_only_is_refused(tmp_path):
    with pytest.raises(DataError, match="every training label is 0; a classifier needs at least 2 classes"):
        load(npz_set(tmp_path / "d.npz", [0, 0, 0], [0]))


# ------------------------------------------------------- one CSV reader for all
def test_a_headerless_csv_without_a_label_column_is_not_read_label_first(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (4, 16))
    p = tmp_path / "x.csv"
    p.write_text("\n".join(",".join(map(str, r)) for r in images) + "\n")  # 16 = 4x4 pixels, no label
    with pytest.raises(DataError, match=r"x.csv: rows of 16 values and no header: a 4x4 image with no label column"):
        read_csv(p)
    x, y = read_csv(p, labels="optional")  # what predict reads
    np.testing.assert_array_equal(x, images)
    assert y is None


def test_a_csv_row_width_that_fits_no_layout_asks_for_a_header(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("1,2,3\n4,5,6\n")
    with pytest.raises(DataError, match="neither a square image nor a label and a square image; add a header"):
        read_csv(p)


@pytest.mark.parametrize("prefix", ["", "\ufeff"], ids=["plain", "utf8-bom"])
def test_headers_with_and_without_labels_and_a_byte_order_mark(tmp_path, prefix):
    images = np.random.default_rng(1).integers(0, 256, (3, 4))
    labelled = tmp_path / "l.csv"
    labelled.write_text(prefix + csv_text(images, [2, 0, 1]), encoding="utf-8")
    x, y = read_csv(labelled)
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, [2, 0, 1])
    kaggle = tmp_path / "k.csv"  # Kaggle's test.csv: pixel0..pixelN, no label
    rows = ["pixel0,pixel1,pixel2,pixel3"] + [",".join(map(str, r)) for r in images]
    kaggle.write_text(prefix + "\n".join(rows) + "\n", encoding="utf-8")
    x, y = read_csv(kaggle, labels="optional")
    np.testing.assert_array_equal(x, images)
    assert y is None
    with pytest.raises(DataError, match="k.csv: the header row has no 'label' column"):
        read_csv(kaggle)


def test_predict_and_training_read_csv_alike(tmp_path):
    from fastnn.readers import read_images

    images = np.random.default_rng(2).integers(0, 256, (3, 9))
    p = tmp_path / "t.csv"
    p.write_text(csv_text(images, [4, 5, 6], header=False))  # headerless, label first: trains fine
    for x, y in (read_csv(p), read_images(p)):
        np.testing.assert_array_equal(x, images)
        np.testing.assert_array_equal(y, [4, 5, 6])
    (tmp_path / "r.csv").write_text("label,a,b,c,d\n1,2,3,4,5\n1,2,3\n")
    with pytest.raises(DataError, match="r.csv: line 3 has 3 fields, expected 5"):
        read_images(tmp_path / "r.csv")


def test_the_readers_and_the_download_stay_importable_from_datasets():
    """fastnn.cli and older code reach the readers through ``fastnn.datasets``; readers.py
    itself must not import datasets (the split would be a cycle)."""
    import ast
    from pathlib import Path

    from fastnn import datasets, download, readers

    for name in ("read_idx", "read_csv", "read_images", "read_npz", "read_pickle", "flatten_images", "check_labels"):
        assert getattr(datasets, name) is getattr(readers, name)
    assert datasets.download is download.download and datasets.cache_dir is download.cache_dir
    for module in (readers, download):
        tree = ast.parse(Path(module.__file__).read_text())
        imported = {name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                    for name in [getattr(n, "module", None) or ""] + [a.name for a in n.names]}
        assert not any(name.split(".")[-1] == "datasets" for name in imported), module.__name__


# ------------------------------------------------------- separators other than ','
def test_a_semicolon_csv_from_a_european_spreadsheet_is_read(tmp_path):
    """A spreadsheet in a locale whose decimal separator is ',' exports CSV with ';' between the
    values and decimal commas: its 'label' column is found and its values read."""
    rng = np.random.default_rng(3)
    images, labels = rng.integers(0, 256, (6, 4)), [0, 1, 2, 0, 1, 2]
    (tmp_path / "train.csv").write_text(csv_text(images, labels).replace(",", ";"))
    floats = np.round(rng.random((3, 4)), 2)
    (tmp_path / "test.csv").write_text(
        "label;p0;p1;p2;p3\n" + "".join(f"{lab};" + ";".join(f"{v:.2f}".replace(".", ",") for v in img) + "\n"
                                        for lab, img in zip([2, 1, 0], floats)))
    x, y = read_csv(tmp_path / "train.csv")
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, labels)
    x, y = read_csv(tmp_path / "test.csv")
    np.testing.assert_array_equal(x, floats.astype(np.float32))
    np.testing.assert_array_equal(y, [2, 1, 0])
    from fastnn.readers import read_images

    x, y = read_images(tmp_path / "train.csv")  # what fastnn predict reads
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, labels)


def test_a_tab_separated_headerless_csv_is_read(tmp_path):
    images = np.random.default_rng(4).integers(0, 256, (3, 9))
    (tmp_path / "t.tsv.csv").write_text(csv_text(images, [1, 0, 1], header=False).replace(",", "\t"))
    x, y = read_csv(tmp_path / "t.tsv.csv")
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, [1, 0, 1])
    (tmp_path / "r.csv").write_text("label;a;b\n1;2;3\n4;5\n")
    with pytest.raises(DataError, match="r.csv: line 3 has 2 fields, expected 3"):
        read_csv(tmp_path / "r.csv")


def test_a_csv_separated_by_spaces_is_named_as_such(tmp_path):
    (tmp_path / "s.csv").write_text("label p0 p1 p2\n1 2 3 4\n")
    with pytest.raises(DataError, match="s.csv: the values of the first line are separated by spaces; fastnn reads "
                                        "CSV files separated by ',', ';' or tabs"):
        read_csv(tmp_path / "s.csv")


# ------------------------------------------------------- SVG drawings
SVG = '<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="28"><path d="M4 4L20 20"/></svg>'


@pytest.mark.parametrize("name,png", [("photo.svg", "photo.png"), ("photo.svgz", "photo.png"),
                                      ("train-images-idx3-ubyte", "train-images-idx3-ubyte.png")])
def test_an_svg_drawing_is_named_as_one_and_not_as_a_failed_download(tmp_path, name, png):
    from fastnn.readers import read_images

    p = tmp_path / name
    p.write_bytes(gzip.compress(SVG.encode()) if name.endswith("z") else SVG.encode())
    with pytest.raises(DataError) as info:
        read_images(p)
    assert str(info.value) == (f"{p}: an SVG vector drawing, which fastnn does not read: export it as PNG "
                               f"(e.g. `rsvg-convert -w 280 {p} -o {tmp_path / png}`)")


def test_svg_given_as_training_data_says_what_was_expected(tmp_path):
    (tmp_path / "drawing.svg").write_text(SVG)
    (tmp_path / "test.csv").write_text("label,a\n0,1\n1,2\n")
    with pytest.raises(DataError, match=r"drawing.svg: an SVG vector drawing, which fastnn does not read; expected a "
                                        r"\.csv file or an IDX images file"):
        load(None, train=tmp_path / "drawing.svg", test=tmp_path / "test.csv")
    (tmp_path / "svg.csv").write_text(SVG)
    with pytest.raises(DataError, match="svg.csv: an SVG vector drawing, which fastnn does not read; expected CSV"):
        read_csv(tmp_path / "svg.csv")
    (tmp_path / "page.csv").write_text("<!DOCTYPE html><html>Not Found</html>")
    with pytest.raises(DataError, match=r"page.csv: an HTML/XML page, not CSV \(a failed download"):
        read_csv(tmp_path / "page.csv")


# ------------------------------------------------------- image shapes, and the plots drawn at them
def test_a_data_set_knows_its_image_shape_when_its_files_say_it(tmp_path):
    write_idx_set(tmp_path / "idx", shape=(4, 6))
    ds = load(tmp_path / "idx")
    assert ds.image_shape == (4, 6) and ds.limit(5).image_shape == (4, 6)
    np.savez(tmp_path / "d.npz", x_train=np.zeros((3, 2, 5), np.uint8), y_train=[0, 1, 0],
             x_test=np.zeros((1, 2, 5), np.uint8), y_test=[1])
    assert load(tmp_path / "d.npz").image_shape == (2, 5)
    (tmp_path / "train.csv").write_text(csv_text(np.zeros((4, 6), int), [0, 1, 0, 1]))
    (tmp_path / "test.csv").write_text(csv_text(np.zeros((2, 6), int), [0, 1]))
    assert load(None, train=tmp_path / "train.csv", test=tmp_path / "test.csv").image_shape is None  # rows of 6


def plots_run(data_args, plots, capsys, monkeypatch):
    """``fastnn train ... --plots`` in this process; returns (exit status, stderr, the shapes imshow drew)."""
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (the plots extra)")
    import signal

    from matplotlib.axes import Axes

    from fastnn import cli

    drawn, imshow = [], Axes.imshow

    def recording_imshow(ax, a, *args, **kw):
        drawn.append(np.shape(a))
        return imshow(ax, a, *args, **kw)

    monkeypatch.setattr(Axes, "imshow", recording_imshow)
    handler = signal.getsignal(signal.SIGTERM)
    try:
        code = cli.main(["train", *data_args, "--plots", str(plots), "--epochs", "1", "--hidden", "8", "--quiet",
                         "--device", "cpu", "--val-split", "0", "--no-download"])
    finally:
        signal.signal(signal.SIGTERM, handler)
    return code, capsys.readouterr().err, drawn


def test_plots_draw_non_square_images_at_the_shape_their_files_give(tmp_path, capsys, monkeypatch):
    write_idx_set(tmp_path / "d", n_train=40, n_test=30, shape=(4, 7))
    code, err, drawn = plots_run(["--dataset", str(tmp_path / "d")], tmp_path / "p", capsys, monkeypatch)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["confusion.png", "curves.png", "misclassified.png"]
    panels = [s for s in drawn if s != (10, 10)]  # the confusion matrix is the one (10, 10) drawing
    assert panels and set(panels) == {(4, 7)}  # every misclassified image drawn, none left empty


def test_plots_of_non_square_rows_of_pixels_skip_the_image_panels_and_say_why(tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(5)
    (tmp_path / "train.csv").write_text(csv_text(rng.integers(0, 256, (20, 6)), np.arange(20) % 2))
    (tmp_path / "test.csv").write_text(csv_text(rng.integers(0, 256, (10, 6)), np.arange(10) % 2))
    code, err, drawn = plots_run(["--train", str(tmp_path / "train.csv"), "--test", str(tmp_path / "test.csv")],
                                 tmp_path / "p", capsys, monkeypatch)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["confusion.png", "curves.png"]
    assert err.strip() == ("plots: no misclassified.png: the images are rows of 6 pixels, not a square, and the data "
                           "does not say their height and width (IDX files and (N, H, W) arrays do)")
    assert drawn == [(2, 2)]  # the confusion matrix only
