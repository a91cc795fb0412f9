"""Shared fixtures: synthetic MNIST-shaped data, the real data folder, optional PyTorch and GPU.

Tests run on ``synthetic`` data that they make themselves; the real Fashion-MNIST
(``fashion``) is only for the accuracy claims, which skip when it is absent.
"""

import gzip
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

import fastnn

try:  # here, not in the test module: pytest's hypothesis plugin looks the profile up before it imports tests
    from hypothesis import settings as _hypothesis_settings

    _hypothesis_settings.register_profile("fuzz-long", max_examples=20000, deadline=None)
except ImportError:
    pass

REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    """``$FASTNN_DATA`` or the ``shared/data`` folder beside the checkout."""
    env = os.environ.get("FASTNN_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def real_data_root() -> Path:
    """``data_root()`` as it was when the session started (before any test changed the environment)."""
    return data_root()


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


def synthetic_mnist(n_train=6000, n_test=1000, k=10, side=28, seed=0):
    """MNIST-shaped uint8 data that a network can learn but not trivially.

    Each class is a template of four Gaussian ink blobs on a black field; a sample
    is its class template at a random intensity, shifted by up to 2 pixels, plus
    Gaussian noise (std 30 of 255), clipped. Returns x_train (n_train, side*side)
    uint8, y_train (n_train,) int64, x_test, y_test. A 784-32-10 relu network reaches
    about 75% test accuracy after 3 epochs of 2000 samples (Adam, cosine), 784-256-128-10 99.9%
    after 3 epochs of 6000: well away from both chance and 100%.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side]
    templates = np.zeros((k, side, side))
    for c in range(k):
        for _ in range(4):
            cy, cx = rng.uniform(7, side - 7, 2)
            s = rng.uniform(1.5, 3.5)
            templates[c] += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
    templates /= templates.max(axis=(1, 2), keepdims=True)

    def split(n):
        y = rng.integers(0, k, n)
        x = templates[y] * rng.uniform(0.6, 1.2, (n, 1, 1)) * 255
        for i, (dy, dx) in enumerate(rng.integers(-2, 3, (n, 2))):
            x[i] = np.roll(x[i], (dy, dx), axis=(0, 1))
        x += rng.normal(0, 30, x.shape)
        return np.clip(x, 0, 255).astype(np.uint8).reshape(n, -1), y

    return (*split(n_train), *split(n_test))


def write_idx_gz(path: Path, a: np.ndarray) -> None:
    """An IDX file (uint8 data), gzipped, as the MNIST files are stored."""
    header = bytes([0, 0, 0x08, a.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in a.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(a, np.uint8).tobytes())


@pytest.fixture(scope="session")
def synthetic():
    """``synthetic_mnist()``: (x_train (6000, 784) uint8, y_train, x_test (1000, 784), y_test)."""
    return synthetic_mnist()


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory, synthetic):
    """A data folder holding the synthetic set as ``fashion-mnist/`` IDX files, for the CLI."""
    root = tmp_path_factory.mktemp("data")
    (root / "fashion-mnist").mkdir()
    xtr, ytr, xte, yte = synthetic
    for name, a in (("train-images-idx3-ubyte.gz", xtr.reshape(-1, 28, 28)), ("train-labels-idx1-ubyte.gz", ytr),
                    ("t10k-images-idx3-ubyte.gz", xte.reshape(-1, 28, 28)), ("t10k-labels-idx1-ubyte.gz", yte)):
        write_idx_gz(root / "fashion-mnist" / name, a)
    return root


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


_MISSING = object()
_EMULATED_MODULES = ("cupy", "fastnn.backends.cupy_ops", "fastnn.cuda_graph")


@pytest.fixture
def emulated_gpu():
    """The GPU backend with CuPy replaced by ``cuda_emulator.fake_cupy()``: ``CupyOps``, the
    CUDA-graph code and every kernel of ``kernels.cu`` run on the CPU, as device ``"gpu"``.

    Yields the fake ``cupy`` module; ``fastnn.get_ops("gpu")`` is the emulated ``CupyOps``
    for the test's duration, and the real modules (if any) are put back afterwards.
    """
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler (c++) to build the CUDA emulator")
    import cuda_emulator

    import fastnn.backends  # noqa: F401  (the parent packages of the emulated modules)

    saved_modules = {n: sys.modules.get(n, _MISSING) for n in _EMULATED_MODULES}
    # a submodule is also an attribute of its package (``from . import cupy_ops`` reads it): swapped too
    parents = {n: (sys.modules[n.rpartition(".")[0]], n.rpartition(".")[2]) for n in _EMULATED_MODULES[1:]}
    saved_attrs = {n: getattr(pkg, attr, _MISSING) for n, (pkg, attr) in parents.items()}
    fake = cuda_emulator.fake_cupy()
    try:
        sys.modules["cupy"] = fake
        for n, (pkg, attr) in parents.items():
            sys.modules.pop(n, None)
            if hasattr(pkg, attr):
                delattr(pkg, attr)
        yield fake
    finally:
        for n, m in saved_modules.items():
            if m is _MISSING:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m
        for n, (pkg, attr) in parents.items():
            if saved_attrs[n] is _MISSING:
                if hasattr(pkg, attr):
                    delattr(pkg, attr)
            else:
                setattr(pkg, attr, saved_attrs[n])
