"""Shared fixtures: the real data folder, optional PyTorch, optional GPU."""

import gzip
import os
from pathlib import Path

import numpy as np
import pytest

import fastnn

REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    """``$FASTNN_DATA`` or the ``shared/data`` folder beside the checkout."""
    env = os.environ.get("FASTNN_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


def _read_idx_gz(path: Path) -> np.ndarray:
    raw = gzip.open(path).read()
    ndim = raw[3]
    dims = np.frombuffer(raw[4:4 + 4 * ndim], ">u4").astype(int)
    return np.frombuffer(raw[4 + 4 * ndim:], np.uint8).reshape(dims)


@pytest.fixture(scope="session")
def fashion():
    """Fashion-MNIST as uint8 arrays: (x_train (60000, 784), y_train, x_test (10000, 784), y_test)."""
    d = data_root() / "fashion-mnist"
    names = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    if not all((d / n).exists() for n in names):
        pytest.skip(f"Fashion-MNIST not found in {d} (set FASTNN_DATA to the folder holding fashion-mnist/)")
    xtr, ytr, xte, yte = (_read_idx_gz(d / n) for n in names)
    return xtr.reshape(-1, 784), ytr, xte.reshape(-1, 784), yte


@pytest.fixture(scope="session")
def torch():
    return pytest.importorskip("torch", reason="PyTorch is not installed (optional test oracle)")


def gpu_ops():
    problem = fastnn.cuda_status()
    if problem is not None:
        pytest.skip(f"no GPU: {problem}")
    return fastnn.get_ops("gpu")


@pytest.fixture
def cupy_ops():
    return gpu_ops()
