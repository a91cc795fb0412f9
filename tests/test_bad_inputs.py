"""Bad data, files and flags, as a user gives them to the CLI: each is one line naming the file
or flag, with exit status 2, never a traceback. The cases run through ``fastnn.cli.main`` in
this process (the same code the scripts run); test_cli.py runs the scripts themselves."""

import gzip
import pickle
import signal

import numpy as np
import pytest
from conftest import write_idx_gz

import fastnn
from fastnn import cli
from fastnn.datasets import IDX_FILES


def idx(a: np.ndarray, type_byte=0x08) -> bytes:
    return bytes([0, 0, type_byte, a.ndim]) + np.array(a.shape, ">u4").tobytes() + a.astype(np.uint8).tobytes()


def csv(rows, header=None) -> str:
    lines = [header] if header else []
    return "\n".join(lines + [",".join(map(str, r)) for r in rows]) + "\n"


def good_rows(n=20, pixels=9, k=3, seed=0):
    rng = np.random.default_rng(seed)
    return [[i % k, *rng.integers(0, 256, pixels)] for i in range(n)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A folder of bad (and a few good) inputs; returns a function name -> path (as str)."""
    d = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)

    def idx_folder(name, **override):
        f = d / name
        f.mkdir()
        arrays = {"train_images": rng.integers(0, 256, (30, 4, 4)), "train_labels": np.arange(30) % 3,
                  "test_images": rng.integers(0, 256, (6, 4, 4)), "test_labels": np.arange(6) % 3}
        for key, stem in IDX_FILES.items():
            if override.get(key) is None and key in override:
                continue
            raw = override.get(key, idx(arrays[key]))
            (f / (stem + ".gz")).write_bytes(gzip.compress(raw) if isinstance(raw, bytes) else raw)
        return f

    good = good_rows()
    text = {
        "good.csv": csv(good), "ragged.csv": csv(good[:3]) + "1,2,3\n", "nan.csv": csv(good[:3] + [[1] + ["nan"] * 9]),
        "text.csv": csv(good[:2] + [[1, "x", *range(8)]]), "empty.csv": "",
        "nolabel.csv": csv([r[1:] for r in good], header=",".join(f"pixel{i}" for i in range(9))),
        "headerless16.csv": csv([list(range(16))] * 3), "headeronly.csv": "label," + ",".join("p" * 9) + "\n",
        "gap.csv": csv([[r[0] if i else 42, *r[1:]] for i, r in enumerate(good)]),
        "unseen.csv": csv([[7, *good[0][1:]]] + good[1:3]), "wide.csv": csv(good_rows(pixels=16)),
        "negative.csv": csv([[-1, *good[0][1:]]] + good[1:]), "fraction.csv": csv([[0.5, *good[0][1:]]] + good[1:]),
        "toobright.csv": csv([[0, *([300.5] * 9)]] + good[1:]),
        "label3.csv": csv(good[:4] + [[3, *good[4][1:]]] + good[5:]),
        "spaces.csv": csv(good).replace(",", " "),
        "photo.svg": '<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"><path d="M1 1L8 8"/></svg>',
        "junk.npz": "this is not a zip file", "model.txt": "not a model",
    }
    for name, t in text.items():
        (d / name).write_text(t)
    np.savez(d / "missing.npz", x_train=np.zeros((3, 4)))
    np.savez(d / "objects.npz", x_train=np.array([[1], [1, 2]], dtype=object), y_train=np.zeros(2),
             x_test=np.zeros((1, 4)), y_test=np.zeros(1))
    (d / "one.pkl").write_bytes(pickle.dumps([np.zeros(4)]))
    pk = d / "pickles"
    (pk / "test").mkdir(parents=True)
    for name in ("images.pkl", "labels.pkl", "test/test_images.pkl", "test/test_labels.pkl"):
        (pk / name).write_bytes(pickle.dumps([0, 1]))
    idx_folder("partial", test_images=None, test_labels=None)
    idx_folder("truncated", train_images=idx(np.zeros((30, 4, 4)))[:-7])
    idx_folder("wrongtype", train_images=idx(rng.integers(0, 256, (30, 4, 4)), type_byte=0x0B))
    idx_folder("jpeg", train_images=b"\xff\xd8\xff\xe0" + bytes(100))
    idx_folder("html", train_images=b"<!DOCTYPE html><html>Not Found</html>")
    idx_folder("count", train_labels=idx(np.arange(29) % 3))
    (d / "afile").write_text("x")
    (d / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(100))
    model = fastnn.MLP([9, 4, 3])
    model.save(d / "model.npz")
    model.classes = ["cat", "dog", "eel"]
    model.save(d / "named-model.npz")
    model.classes = None
    (d / "idxpair").mkdir()
    write_idx_gz(d / "idxpair" / "images-idx3-ubyte.gz", rng.integers(0, 256, (4, 3, 3)))
    write_idx_gz(d / "idxpair" / "labels-idx1-ubyte.gz", np.array([0, 5, 1, 2]))
    ck = d / "ck"
    ck.mkdir()
    state_path = d / "ckpt"
    from fastnn import checkpoint

    checkpoint.save_checkpoint(state_path, model, fastnn.make_optimizer("sgd", model, 0.1), 1,
                               np.random.default_rng(0), {}, [])
    write_idx_gz(d / "images-idx3-ubyte.gz", np.zeros((2, 5, 5), np.uint8))
    return lambda name: str(d / name)


T = ["--epochs", "1", "--quiet", "--device", "cpu", "--no-download"]
CASES = {  # id: (argv from the files fixture, what stderr must contain)
    # data folders and files
    "data-dir-missing": (lambda f: ["--data-dir", f("nope")], "the data folder does not exist"),
    "data-dir-is-a-file": (lambda f: ["--data-dir", f("afile")], "the data folder is a file"),
    "idx-partial": (lambda f: ["--dataset", f("partial")], "holds 2 of the four IDX files; missing t10k-images"),
    "idx-truncated": (lambda f: ["--dataset", f("truncated")], "truncated"),
    "idx-wrong-type-byte": (lambda f: ["--dataset", f("wrongtype")], "a wrong type byte"),
    "idx-is-a-jpeg": (lambda f: ["--dataset", f("jpeg")], "a JPEG image, not IDX data"),
    "idx-is-html": (lambda f: ["--dataset", f("html")], "an HTML/XML page, not IDX data"),
    "idx-label-count": (lambda f: ["--dataset", f("count")], "29 labels for 30 images"),
    "npz-junk": (lambda f: ["--dataset", f("junk.npz")], "not an .npz file"),
    "npz-missing-arrays": (lambda f: ["--dataset", f("missing.npz")], "missing arrays y_train"),
    "npz-objects": (lambda f: ["--dataset", f("objects.npz"), "--allow-pickle"], "holds object arrays"),
    "single-pickle": (lambda f: ["--dataset", f("one.pkl")], "only with --allow-pickle"),
    "pickles-not-allowed": (lambda f: ["--dataset", f("pickles")], "refusing to load a pickle"),
    "dataset-missing": (lambda f: ["--dataset", "/no/such/place"], "/no/such/place: neither a known data set"),
    # CSV
    "csv-ragged": (lambda f: ["--train", f("ragged.csv"), "--test", f("good.csv")], "line 4 has 3 fields"),
    "csv-nan": (lambda f: ["--train", f("nan.csv"), "--test", f("good.csv")], "line 4: NaN or infinite"),
    "csv-text": (lambda f: ["--train", f("text.csv"), "--test", f("good.csv")], "non-numeric value 'x'"),
    "csv-empty": (lambda f: ["--train", f("empty.csv"), "--test", f("good.csv")], "empty.csv: empty file"),
    "csv-no-label": (lambda f: ["--train", f("nolabel.csv"), "--test", f("good.csv")], "no 'label' column"),
    "csv-headerless-no-label": (lambda f: ["--train", f("headerless16.csv"), "--test", f("good.csv")],
                                "a 4x4 image with no label column"),
    "csv-header-only": (lambda f: ["--train", f("headeronly.csv"), "--test", f("good.csv")], "no data rows"),
    "csv-label-gap": (lambda f: ["--train", f("gap.csv"), "--test", f("good.csv")], "label 42 (sample 0) leaves"),
    "csv-unseen-test-label": (lambda f: ["--train", f("good.csv"), "--test", f("unseen.csv")],
                              "unseen.csv: label 7 (sample 0) is outside 0..2"),
    "csv-widths-differ": (lambda f: ["--train", f("good.csv"), "--test", f("wide.csv")], "16 pixels but the training"),
    "csv-negative-label": (lambda f: ["--train", f("negative.csv"), "--test", f("good.csv")], "negative label -1"),
    "csv-fractional-label": (lambda f: ["--train", f("fraction.csv"), "--test", f("good.csv")], "whole numbers"),
    "csv-pixels-out-of-range": (lambda f: ["--train", f("toobright.csv"), "--test", f("good.csv")],
                                "pixel values outside 0..255"),
    "csv-separated-by-spaces": (lambda f: ["--train", f("spaces.csv"), "--test", f("good.csv")],
                                "spaces.csv: the values of the first line are separated by spaces"),
    "svg-as-training-data": (lambda f: ["--train", f("photo.svg"), "--test", f("good.csv")],
                             "photo.svg: an SVG vector drawing, which fastnn does not read; expected a .csv file"),
    "train-without-test": (lambda f: ["--train", f("good.csv")], "--train and --test go together"),
    # flags
    "lr-negative": (lambda f: ["--lr", "-1"], "argument --lr: must be >= 0, got -1"),
    "lr-nan": (lambda f: ["--lr", "nan"], "argument --lr: must be >= 0, got nan"),
    "hidden-bad": (lambda f: ["--hidden", "12,x"], "argument --hidden: expected widths"),
    "optimizer-unknown": (lambda f: ["--optimizer", "rmsprop"], "argument --optimizer: invalid choice"),
    "activation-unknown": (lambda f: ["--activation", "swish"], "argument --activation: invalid choice"),
    "device-unknown": (lambda f: ["--device", "tpu"], "argument --device: invalid choice"),
    "epochs-zero": (lambda f: ["--epochs", "0"], "argument --epochs: must be a positive number"),
    "batch-zero": (lambda f: ["--batch-size", "0"], "argument --batch-size: must be a positive number"),
    "momentum-negative": (lambda f: ["--momentum", "-0.5"], "argument --momentum: must be in [0, 1), got -0.5"),
    "momentum-one": (lambda f: ["--momentum", "1"], "argument --momentum: must be in [0, 1), got 1"),  # as optim's rule
    "seed-negative": (lambda f: ["--seed", "-5"], "argument --seed: must be >= 0, got -5"),
    "classes-zero": (lambda f: ["--classes", "0"], "argument --classes: must be a positive number"),
    "classes-vs-named-set": (lambda f: ["--dataset", "mnist", "--classes", "7"], "mnist has 10 classes, not 7"),
    "cuda-graph-with-cublas": (lambda f: ["--gpu-gemm", "cublas", "--cuda-graph"], "--cuda-graph needs fastnn's"),
    "tf32-without-cublas": (lambda f: ["--tf32"], "--tf32 applies to cuBLAS GEMMs only"),
    # outputs, checked before any training
    "resume-missing": (lambda f: ["--resume", "/no/such/dir"], "/no/such/dir: no checkpoint found"),
    "metrics-no-folder": (lambda f: ["--metrics", "/no/such/dir/m.jsonl"], "/no/such/dir"),
    "metrics-is-a-folder": (lambda f: ["--metrics", f("ck")], "is a folder"),
    "save-no-folder": (lambda f: ["--save", "/no/such/dir/m.npz"], "the folder to save the model in does not exist"),
    "save-is-a-folder": (lambda f: ["--save", f("ck")], "is a folder; give a file name"),
    "save-unwritable": (lambda f: ["--save", "/proc/m.npz"], "cannot write in /proc"),
    "checkpoint-dir-below-a-file": (lambda f: ["--checkpoint-dir", f("afile") + "/ck"], "cannot write in"),
    "plots-below-a-file": (lambda f: ["--plots", f("afile") + "/p"], "cannot write in"),
    "checkpoint-dir-of-another-run": (lambda f: ["--checkpoint-dir", f("ckpt")], "holds the checkpoints of another"),
}
PREDICT_CASES = {
    "model-junk": (lambda f: [f("model.txt"), f("good.csv")], "model.txt: not an .npz file"),
    "model-is-a-checkpoint": (lambda f: [f("ckpt") + "/ckpt-epoch-0001.npz", f("good.csv")],
                              "not a valid fastnn model file"),
    "model-missing": (lambda f: ["/no/model.npz", f("good.csv")], "/no/model.npz: no such file"),
    "input-bad-jpeg": (lambda f: [f("model.npz"), f("photo.jpg")], "photo.jpg: not an image Pillow can read"),
    "input-missing": (lambda f: [f("model.npz"), "/no/such.csv"], "/no/such.csv: no such file"),
    "input-ragged": (lambda f: [f("model.npz"), f("ragged.csv")], "line 4 has 3 fields"),
    "input-wrong-width": (lambda f: [f("model.npz"), f("wide.csv")], "images have 16 pixels, the model expects 9"),
    "input-idx-wrong-size": (lambda f: [f("model.npz"), f("images-idx3-ubyte.gz")], "25 pixels, the model expects 9"),
    "input-svg": (lambda f: [f("model.npz"), f("photo.svg")],
                  "photo.svg: an SVG vector drawing, which fastnn does not read: export it as PNG (e.g. `rsvg-convert"),
    # labels the model cannot have: refused as training refuses them, not scored into an accuracy
    "input-label-outside-model": (lambda f: [f("model.npz"), f("good.csv"), f("label3.csv")],
                                  "label3.csv: label 3 (row 4) is outside 0..2, the model's 3 classes"),
    "input-label-outside-named-model": (lambda f: [f("named-model.npz"), f("unseen.csv")],
                                        "label 7 (row 0) is outside 0..2, the model's 3 classes (0 cat .. 2 eel)"),
    "input-idx-label-outside-model": (lambda f: [f("model.npz"), f("idxpair/images-idx3-ubyte.gz")],
                                      "labels-idx1-ubyte.gz: label 5 (row 1) is outside 0..2"),
}
NEEDS_PILLOW = {"input-bad-jpeg"}  # without Pillow the message is "reading image files needs Pillow"


def one_line_error(argv, capsys):
    handler = signal.getsignal(signal.SIGTERM)
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    finally:
        signal.signal(signal.SIGTERM, handler)
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("case", CASES)
def test_a_bad_training_input_is_one_line_and_exit_2(case, files, capsys):
    make_argv, match = CASES[case]
    code, err = one_line_error(["train", *make_argv(files), *T], capsys)
    assert code == 2, err
    assert match in err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("case", PREDICT_CASES)
def test_a_bad_prediction_input_is_one_line_and_exit_2(case, files, capsys):
    if case in NEEDS_PILLOW:
        pytest.importorskip("PIL", reason="Pillow is not installed: image files cannot be read at all")
    make_argv, match = PREDICT_CASES[case]
    code, err = one_line_error(["predict", *make_argv(files)], capsys)
    assert code == 2, err
    assert match in err
    assert len(err.strip().splitlines()) == 1, err


def test_every_input_is_checked_before_anything_is_predicted(files, capsys):
    code = cli.main(["predict", files("model.npz"), files("good.csv"), files("label3.csv")])
    out, err = capsys.readouterr()
    assert code == 2 and "label 3 (row 4)" in err
    assert out == ""  # good.csv's predictions and accuracy are not printed before label3.csv is refused


def test_the_tables_hold_at_least_forty_cases():
    assert len(CASES) + len(PREDICT_CASES) >= 40
