"""GPU checks: CuPy training agrees with NumPy, a captured step equals an uncaptured one.

They run where CuPy sees a CUDA device and skip cleanly elsewhere; the kernel-level
GPU tests are in test_backend.py.
"""

import warnings

import numpy as np
import pytest
from conftest import gpu_ops

import fastnn


def one_epoch(device, x, y, optimizer="momentum", lr=0.05, cuda_graph=False, batch=128):
    m = fastnn.MLP([784, 128, 64, 10], device=device, seed=0)
    hist = fastnn.fit(m, x, y, epochs=1, batch_size=batch, lr=lr, optimizer=optimizer, seed=1,
                      cuda_graph=cuda_graph)
    return m, hist[0]


@pytest.mark.gpu
@pytest.mark.parametrize("optimizer,lr", [("momentum", 0.05), ("adam", 1e-3)])
def test_cpu_and_gpu_training_agree(fashion, optimizer, lr):
    gpu_ops()
    x, y = fashion[0][:6000], fashion[1][:6000]
    cpu, hc = one_epoch("cpu", x, y, optimizer, lr)
    gpu, hg = one_epoch("gpu", x, y, optimizer, lr)
    for a, b in zip(cpu.get_params(), gpu.get_params()):
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=2e-5)
    assert hg["train_loss"] == pytest.approx(hc["train_loss"], rel=1e-4)
    xt = fashion[2][:2000]
    assert np.mean(cpu.predict(xt) == gpu.predict(xt)) > 0.995


@pytest.mark.gpu
@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.05), ("nesterov", 0.05), ("adam", 1e-3)])
def test_captured_step_equals_uncaptured(fashion, optimizer, lr):
    gpu_ops()
    x, y = fashion[0][:6000 + 17], fashion[1][:6000 + 17]  # a ragged last batch too
    eager, he = one_epoch("gpu", x, y, optimizer, lr)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed capture warns: fail on it here
        graph, hg = one_epoch("gpu", x, y, optimizer, lr, cuda_graph=True)
    for a, b in zip(eager.get_params(), graph.get_params()):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
    assert hg["train_loss"] == pytest.approx(he["train_loss"], rel=1e-6)
    assert hg["train_accuracy"] == he["train_accuracy"]


@pytest.mark.gpu
def test_gpu_model_saves_and_loads_on_the_cpu(fashion, tmp_path):
    gpu_ops()
    m, _ = one_epoch("gpu", fashion[0][:3000], fashion[1][:3000])
    m.save(tmp_path / "m.npz")
    cpu = fastnn.MLP.load(tmp_path / "m.npz", device="cpu")
    xt = fashion[2][:1000]
    np.testing.assert_array_equal(cpu.predict(xt), m.predict(xt))


def test_cuda_graph_needs_the_gpu_backend():
    x = np.zeros((10, 4), np.float32)
    with pytest.raises(fastnn.ConfigError, match="CUDA graphs need the GPU backend"):
        fastnn.fit(fastnn.MLP([4, 2]), x, np.zeros(10, int), epochs=1, cuda_graph=True)
