"""GPU checks: CuPy training agrees with NumPy, a captured step equals an uncaptured one.

They run where CuPy sees a CUDA device and skip cleanly elsewhere; the kernel-level
GPU tests are in test_backend.py. Devices are compared tightly in float64 and
loosely in float32, where two trajectories that differ in the last bit of a GEMM's
summation order drift apart within a few dozen steps.
"""

import warnings

import numpy as np
import pytest
from conftest import gpu_ops

import fastnn


def one_epoch(device, x, y, optimizer="momentum", lr=0.05, cuda_graph=False, batch=128, dtype="float32"):
    m = fastnn.MLP([784, 128, 64, 10], device=device, seed=0, dtype=dtype)
    hist = fastnn.fit(m, x, y, epochs=1, batch_size=batch, lr=lr, optimizer=optimizer, seed=1,
                      cuda_graph=cuda_graph, lr_schedule="constant")
    return m, hist[0]


@pytest.mark.gpu
@pytest.mark.parametrize("optimizer,lr", [("momentum", 0.05), ("adam", 1e-3)])
def test_cpu_and_gpu_training_agree_in_float64(synthetic, optimizer, lr):
    gpu_ops()
    x, y = synthetic[0], synthetic[1]
    cpu, hc = one_epoch("cpu", x, y, optimizer, lr, dtype="float64")
    gpu, hg = one_epoch("gpu", x, y, optimizer, lr, dtype="float64")
    for a, b in zip(cpu.get_params(), gpu.get_params()):
        np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-11)
    assert hg["train_loss"] == pytest.approx(hc["train_loss"], rel=1e-10)


@pytest.mark.gpu
@pytest.mark.parametrize("optimizer,lr", [("momentum", 0.05), ("adam", 1e-3)])
def test_cpu_and_gpu_training_agree_loosely_in_float32(synthetic, optimizer, lr):
    gpu_ops()
    x, y, xt = synthetic[0], synthetic[1], synthetic[2]
    cpu, hc = one_epoch("cpu", x, y, optimizer, lr)
    gpu, hg = one_epoch("gpu", x, y, optimizer, lr)
    assert hg["train_loss"] == pytest.approx(hc["train_loss"], rel=1e-2)
    assert np.mean(cpu.predict(xt) == gpu.predict(xt)) > 0.97


@pytest.mark.gpu
@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.05), ("nesterov", 0.05), ("adam", 1e-3)])
def test_captured_step_equals_uncaptured(synthetic, optimizer, lr):
    gpu_ops()
    x, y = synthetic[0][:5000 + 17], synthetic[1][:5000 + 17]  # a ragged last batch too
    eager, he = one_epoch("gpu", x, y, optimizer, lr)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed capture warns: fail on it here
        graph, hg = one_epoch("gpu", x, y, optimizer, lr, cuda_graph=True)
    for a, b in zip(eager.get_params(), graph.get_params()):
        np.testing.assert_array_equal(b, a)
    assert hg["train_loss"] == he["train_loss"]
    assert hg["train_accuracy"] == he["train_accuracy"]


@pytest.mark.gpu
def test_gpu_model_saves_and_loads_on_the_cpu(synthetic, tmp_path):
    gpu_ops()
    m, _ = one_epoch("gpu", synthetic[0][:3000], synthetic[1][:3000])
    m.save(tmp_path / "m.npz")
    cpu = fastnn.MLP.load(tmp_path / "m.npz", device="cpu")
    xt = synthetic[2]
    np.testing.assert_array_equal(cpu.predict(xt), m.predict(xt))


def test_cuda_graph_needs_the_gpu_backend():
    x = np.zeros((10, 4), np.float32)
    with pytest.raises(fastnn.ConfigError, match="CUDA graphs need the GPU backend"):
        fastnn.fit(fastnn.MLP([4, 2]), x, np.zeros(10, int), epochs=1, cuda_graph=True, optimizer="sgd",
                   lr_schedule="constant", lr=0.1)
