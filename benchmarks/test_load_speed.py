"""Reading a 60000-row CSV in the first seed's layout (label, 784 pixels): time and peak memory.

    pytest benchmarks/test_load_speed.py --benchmark-only

The peak is NumPy's and Python's allocations during the read, as ``tracemalloc`` sees them.
"""

import tracemalloc

import numpy as np
import pytest

from fastnn.readers import read_csv


@pytest.fixture(scope="module")
def mnist_csv(tmp_path_factory):
    rng = np.random.default_rng(0)
    table = rng.integers(0, 256, (60000, 785))
    table[:, 0] %= 10
    path = tmp_path_factory.mktemp("csv") / "mnist_train.csv"
    header = "label," + ",".join(f"pixel{i}" for i in range(784))
    np.savetxt(path, table, fmt="%d", delimiter=",", header=header, comments="")
    return path


@pytest.mark.benchmark(group="load")
def test_read_csv_60000_rows(benchmark, mnist_csv):
    benchmark.pedantic(read_csv, args=(mnist_csv,), rounds=3, iterations=1, warmup_rounds=0)
    tracemalloc.start()
    x, y = read_csv(mnist_csv)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert x.shape == (60000, 784) and x.dtype == np.uint8
    benchmark.extra_info["file_mb"] = mnist_csv.stat().st_size / 1e6
    benchmark.extra_info["peak_mb"] = peak / 1e6
