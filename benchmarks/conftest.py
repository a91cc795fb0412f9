"""Benchmark fixtures: one epoch of Fashion-MNIST (or synthetic data of its shape), backends."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest

import fastnn

sys.path.insert(0, str(Path(__file__).resolve().parent))
N_EPOCH = 60000


def _data_root():
    env = os.environ.get("FASTNN_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def epoch_data():
    """(images (60000, 784) uint8, labels (60000,) int64, description)."""
    try:
        ds = fastnn.datasets.load("fashion-mnist", root=_data_root(), download=False)
        return ds.train_images, ds.train_labels, "Fashion-MNIST train"
    except fastnn.DataError:
        rng = np.random.default_rng(0)
        return (rng.integers(0, 256, (N_EPOCH, 784), dtype=np.uint8), rng.integers(0, 10, N_EPOCH),
                "synthetic uint8 data of Fashion-MNIST's shape (real data not found)")


@pytest.fixture(scope="session")
def torch_mod():
    return pytest.importorskip("torch", reason="PyTorch not installed: no PyTorch baseline")


def require_gpu():
    problem = fastnn.cuda_status()
    if problem is not None:
        pytest.skip(f"no GPU: {problem}")
