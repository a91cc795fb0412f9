"""Property-based fuzzing of every file reader: valid files, truncated, bit-flipped, with edited
headers and inserted bytes. The invariant: a reader returns data or raises DataError naming
the file; never another exception, never a hang, never an allocation sized by an unchecked
header field (each read stays under ``MEMORY_LIMIT`` of new allocations).

About 60 s in all by default; for a longer run:
``python -m pytest tests/test_fuzz_readers.py --hypothesis-profile=fuzz-long``.
"""

import gzip
import io
import pickle
import tracemalloc
from datetime import timedelta

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed (the test extra)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fastnn  # noqa: E402
from fastnn import checkpoint, readers  # noqa: E402


def read_image(path):
    pytest.importorskip("PIL", reason="Pillow is not installed (the images extra)")
    from fastnn.images import read_image as read

    return read(path)

EXAMPLES = max(500, settings.default.max_examples)  # per reader; 20000 with --hypothesis-profile=fuzz-long
MEMORY_LIMIT = 64 << 20  # bytes; the valid files are a few kB
FUZZ = settings(max_examples=EXAMPLES, deadline=timedelta(seconds=10),
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@st.composite
def mutated(draw, valid: bytes):
    """``valid`` truncated, with bytes flipped or overwritten in its header, or with bytes inserted."""
    data = bytearray(valid)
    kind = draw(st.sampled_from(["truncate", "flip", "header", "insert", "mixed"]))
    if kind in ("truncate", "mixed"):
        data = data[:draw(st.integers(0, len(data)))]
    if kind in ("flip", "mixed") and data:
        for i in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=8)):
            data[i] ^= 1 << draw(st.integers(0, 7))
    if kind == "header" and data:
        for i in draw(st.lists(st.integers(0, min(len(data), 40) - 1), min_size=1, max_size=6)):
            data[i] = draw(st.integers(0, 255))
    if kind == "insert":
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


def check(read, path, data: bytes):
    """Write ``data`` to ``path`` and read it: data or a DataError naming the file, in bounded memory."""
    path.write_bytes(data)
    tracemalloc.start()
    try:
        read(path)
    except fastnn.DataError as exc:
        assert str(path) in str(exc), exc
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < MEMORY_LIMIT, f"{peak} bytes allocated reading {len(data)} bytes"


RNG = np.random.default_rng(0)
IMAGES = RNG.integers(0, 256, (12, 4, 4)).astype(np.uint8)
LABELS = (np.arange(12) % 3).astype(np.uint8)


def idx_bytes(a):
    return bytes([0, 0, 8, a.ndim]) + np.array(a.shape, ">u4").tobytes() + a.tobytes()


def csv_bytes():
    rows = ["label," + ",".join(f"p{i}" for i in range(16))]
    rows += [",".join(map(str, [y, *x.ravel()])) for x, y in zip(IMAGES, LABELS)]
    return ("\n".join(rows) + "\n").encode()


def npz_bytes(**arrays):
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def model_and_checkpoint(tmp):
    m = fastnn.MLP([16, 5, 3])
    m.save(tmp / "m.npz")
    path = checkpoint.save_checkpoint(tmp / "ck", m, fastnn.make_optimizer("adam", m, 0.01), 1,
                                      np.random.default_rng(0), {"hidden": [5]}, [])
    return (tmp / "m.npz").read_bytes(), path.read_bytes()


def refused_files(tmp):
    """Model files and a checkpoint that read but must be refused: NaN/inf weights (a diverged training) and a
    header claiming a billion hidden units (its arrays are small: the header alone must not allocate)."""
    from fastnn import npzfile

    m = fastnn.MLP([16, 5, 3])
    params = m.get_params()
    params[2][0, :2] = [np.nan, np.inf]
    m.set_params(params)
    m.save(tmp / "nan.npz")
    meta, arrays = npzfile.load(tmp / "nan.npz", "fastnn-mlp", "model")
    npzfile.save(tmp / "huge.npz", "fastnn-mlp", dict(meta, sizes=[16, 10**9, 3]), arrays)
    ok = fastnn.MLP([16, 5, 3])
    ck = checkpoint.save_checkpoint(tmp / "ck", ok, fastnn.make_optimizer("adam", ok, 0.01), 1,
                                    np.random.default_rng(0), {"hidden": [5]}, [])
    meta, arrays = npzfile.load(ck, "fastnn-checkpoint", "checkpoint")
    arrays["params"] = arrays["params"].copy()
    arrays["params"][-1] = np.nan  # b2
    npzfile.save(tmp / "ck-nan.npz", "fastnn-checkpoint", meta, arrays)
    return {"model-nan": (tmp / "nan.npz").read_bytes(), "model-huge": (tmp / "huge.npz").read_bytes(),
            "checkpoint-nan": (tmp / "ck-nan.npz").read_bytes()}


def png_bytes():
    import struct
    import zlib

    raw = b"".join(b"\x00" + bytes(row) for row in IMAGES[0].repeat(2, 0).repeat(2, 1))
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def read_pickle(path):
    return readers.read_pickle(path, allow_pickle=True)


def read_csv_optional(path):
    return readers.read_csv(path, labels="optional")


@pytest.fixture(scope="module")
def refused(tmp_path_factory):
    return refused_files(tmp_path_factory.mktemp("refused"))


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    model, ckpt = model_and_checkpoint(tmp_path_factory.mktemp("valid"))
    return {
        "idx": idx_bytes(IMAGES), "idx.gz": gzip.compress(idx_bytes(LABELS)), "csv": csv_bytes(),
        "npz": npz_bytes(x_train=IMAGES, y_train=LABELS, x_test=IMAGES[:3], y_test=LABELS[:3]),
        "pickle": pickle.dumps([x for x in IMAGES]), "png": png_bytes(), "model": model, "checkpoint": ckpt,
    }


READERS = {
    "idx": ("x.idx", readers.read_idx), "idx.gz": ("x-idx1-ubyte.gz", readers.read_idx),
    "csv": ("x.csv", readers.read_csv), "npz": ("x.npz", readers.read_npz),
    "pickle": ("x.pkl", read_pickle), "png": ("x.png", read_image),
    "model": ("m.npz", fastnn.MLP.load), "checkpoint": ("c.npz", checkpoint.read_checkpoint),
}


@pytest.mark.parametrize("kind", READERS)
def test_valid_files_read(kind, valid, tmp_path):
    name, read = READERS[kind]
    (tmp_path / name).write_bytes(valid[kind])
    read(tmp_path / name)  # no exception


# What each refused file must be refused for: (its reader's kind, the message after the file's name)
REFUSED = {
    "model-nan": ("model", "parameter W2 (layer 2 weights) holds 2 NaN/inf values: the training that wrote it "
                           "diverged"),
    "model-huge": ("model", "a 16-1000000000-3 network would need "),
    "checkpoint-nan": ("checkpoint", "parameter b2 (layer 2 biases) holds 1 NaN/inf value: the training that "
                                     "wrote it diverged"),
}


@pytest.mark.parametrize("kind", REFUSED)
def test_diverged_and_oversized_files_are_refused_naming_the_problem(kind, refused, tmp_path):
    reader, message = REFUSED[kind]
    name, read = READERS[reader]
    check(read, tmp_path / name, refused[kind])  # a DataError naming the file, in bounded memory
    with pytest.raises(fastnn.DataError) as e:
        read(tmp_path / name)
    assert str(e.value).startswith(f"{tmp_path / name}: {message}")


@pytest.mark.parametrize("kind", [*READERS, *REFUSED])
def test_damaged_files_are_data_errors(kind, valid, refused, tmp_path):
    name, read = READERS[REFUSED[kind][0] if kind in REFUSED else kind]
    corpus = refused if kind in REFUSED else valid

    @FUZZ
    @given(data=mutated(corpus[kind]))
    def fuzz(data):
        check(read, tmp_path / name, data)

    fuzz()


@FUZZ
@given(data=st.binary(max_size=300))
def test_random_bytes_as_csv_for_prediction(tmp_path, data):
    check(read_csv_optional, tmp_path / "r.csv", data)


def test_an_idx_header_claiming_4_billion_images_allocates_nothing(tmp_path):
    header = bytes([0, 0, 8, 3]) + np.array([2 ** 32 - 1, 28, 28], ">u4").tobytes()
    check(readers.read_idx, tmp_path / "huge.idx", header + bytes(100))


def test_a_pickle_memo_index_of_millions_allocates_nothing(tmp_path):
    # EMPTY_LIST, LONG_BINPUT 16777215, STOP: the unpickler would size its memo table for 16.7M entries
    # (found by the fuzzer: one REDUCE byte turned into a LONG_BINPUT)
    data = b"\x80\x02]r\xff\xff\xff\x00."
    check(read_pickle, tmp_path / "memo.pkl", data)  # within the memory limit
    with pytest.raises(fastnn.DataError, match="memo index 16777215 out of sequence"):
        read_pickle(tmp_path / "memo.pkl")
    check(read_pickle, tmp_path / "ok.pkl", pickle.dumps([np.arange(3)] * 3))  # memo puts in sequence: read
