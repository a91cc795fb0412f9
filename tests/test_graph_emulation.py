"""The GPU training step, CUDA graph included, run on the CPU through the CUDA emulator.

``emulated_gpu`` (conftest.py) replaces CuPy with ``cuda_emulator.fake_cupy()``: the
real ``CupyOps``, ``CapturedStep``, ``fit``, model and optimizer code launch the
real kernels of ``kernels.cu``, compiled for the CPU, and a capture is held to
CuPy's and CUDA's rules (no cuBLAS, allocation, host copy or synchronisation
inside it). So without a GPU this proves that the step can be captured, that a
captured epoch equals an uncaptured one bit for bit, and that the kernels compute
what the NumPy backend computes.
"""

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import fastnn

SIZES = (40, 33, 18, 4)  # widths over and under the GEMM tile (16), and not multiples of it (784-256-128-10 below)


def data(n, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, SIZES[-1], n)
    x = rng.integers(0, 256, (n, SIZES[0])).astype(np.uint8)
    x[:, : SIZES[-1]] = np.where(np.eye(SIZES[-1], dtype=bool)[y], 255, x[:, : SIZES[-1]] // 4)  # learnable
    return x, y


def train(x, y, optimizer, batch, epochs=1, cuda_graph=False, dtype="float32", device="gpu", dropout=0.0, **kw):
    """A model, its optimizer and the history after ``fit``; every warning fails the test (the GPU
    self-check's too: a kernel it replaced by the generic path would pass unseen)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = fastnn.MLP(SIZES, device=device, dtype=dtype, seed=3, dropout=dropout)
        lr = 1e-2 if optimizer == "adam" else 0.1
        opt = fastnn.make_optimizer(optimizer, model, lr, momentum=0.9, weight_decay=1e-3)
        hist = fastnn.fit(model, x, y, epochs=epochs, batch_size=batch, optimizer=opt, seed=1,
                          cuda_graph=cuda_graph, **kw)
    return model, opt, hist


def assert_bitwise_equal(a, b):
    (ma, oa, ha), (mb, ob, hb) = a, b
    for pa, pb in zip(ma.get_params(), mb.get_params()):
        np.testing.assert_array_equal(pb, pa)
    assert [(h["train_loss"], h["train_accuracy"]) for h in hb] == [(h["train_loss"], h["train_accuracy"]) for h in ha]
    assert ob.steps == oa.steps
    for k, v in oa.state.items():
        np.testing.assert_array_equal(ob.ops.to_host(ob.state[k]), oa.ops.to_host(v), err_msg=k)


CASES = {  # (n, batch): what the epoch's batches look like
    "ragged": (103, 16),  # 6 full batches and one of 7
    "exact": (64, 16),
    "batch-1": (6, 1),  # per-sample training
    "under-2-batches": (24, 16),  # one full batch (the warm-up must not read a second)
    "one-batch": (16, 16),  # n == batch
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "nesterov", "adam"])
def test_captured_epochs_equal_uncaptured_bit_for_bit(emulated_gpu, optimizer, case):
    n, batch = CASES[case]
    x, y = data(n)
    eager = train(x, y, optimizer, batch, epochs=2)
    assert emulated_gpu.emulator_state.graph_launches == 0
    captured = train(x, y, optimizer, batch, epochs=2, cuda_graph=True)
    assert_bitwise_equal(eager, captured)
    assert emulated_gpu.emulator_state.graph_launches == 2 * (n // batch)  # every full batch was a replay


def test_a_learning_rate_change_recaptures_the_step(emulated_gpu):
    x, y = data(103)
    eager = train(x, y, "momentum", 16, epochs=3, lr_schedule="cosine")
    captured = train(x, y, "momentum", 16, epochs=3, lr_schedule="cosine", cuda_graph=True)
    assert len({h["lr"] for h in captured[2]}) == 3
    assert_bitwise_equal(eager, captured)


@pytest.mark.parametrize("optimizer", ["momentum", "adam"])
def test_emulated_gpu_training_equals_cpu_training_in_float64(emulated_gpu, optimizer):
    x, y = data(103)
    gpu = train(x, y, optimizer, 16, epochs=2, dtype="float64", cuda_graph=True)
    cpu = train(x, y, optimizer, 16, epochs=2, dtype="float64", device="cpu")
    for pg, pc in zip(gpu[0].get_params(), cpu[0].get_params()):
        np.testing.assert_allclose(pg, pc, rtol=1e-10, atol=1e-12)
    assert gpu[2][-1]["train_loss"] == pytest.approx(cpu[2][-1]["train_loss"], rel=1e-10)


@pytest.mark.parametrize("optimizer", ["momentum", "adam"])
def test_dropout_captured_equals_uncaptured_and_the_cpu(emulated_gpu, optimizer):
    x, y = data(103)
    eager = train(x, y, optimizer, 16, epochs=2, dropout=[0.3, 0.5])
    captured = train(x, y, optimizer, 16, epochs=2, dropout=[0.3, 0.5], cuda_graph=True)
    assert_bitwise_equal(eager, captured)
    assert int(captured[0].ops.to_host(captured[0].step)[0]) == 14  # one mask per step, counted on the device
    gpu = train(x, y, optimizer, 16, epochs=2, dtype="float64", dropout=[0.3, 0.5], cuda_graph=True)
    cpu = train(x, y, optimizer, 16, epochs=2, dtype="float64", dropout=[0.3, 0.5], device="cpu")
    for pg, pc in zip(gpu[0].get_params(), cpu[0].get_params()):
        np.testing.assert_allclose(pg, pc, rtol=1e-10, atol=1e-12)  # the same masks on both backends


def test_class_weighted_training_captured_equals_uncaptured_and_the_cpu(emulated_gpu):
    x, y = data(103)
    eager = train(x, y, "momentum", 16, epochs=2, class_weight="balanced")
    captured = train(x, y, "momentum", 16, epochs=2, class_weight="balanced", cuda_graph=True)
    assert_bitwise_equal(eager, captured)
    gpu = train(x, y, "adam", 16, dtype="float64", class_weight={1: 3.0}, cuda_graph=True)
    cpu = train(x, y, "adam", 16, dtype="float64", class_weight={1: 3.0}, device="cpu")
    for pg, pc in zip(gpu[0].get_params(), cpu[0].get_params()):
        np.testing.assert_allclose(pg, pc, rtol=1e-10, atol=1e-12)


def test_emulated_gpu_training_at_tile_aligned_widths_equals_cpu_training(emulated_gpu):
    """784-256-128-10: every fan-in a multiple of the GEMM tile (16), so each weight_grad's bias row is
    a row tile of its own; and a ragged last batch (40 = 16 + 16 + 8)."""
    rng = np.random.default_rng(2)
    y = rng.integers(0, 10, 40)
    x = (rng.random((40, 784)) * 64 + 160 * np.eye(10)[y].repeat(79, axis=1)[:, :784]).astype(np.uint8)
    runs = []
    for device in ("gpu", "cpu"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model = fastnn.MLP([784, 256, 128, 10], device=device, dtype="float64", seed=3)
            opt = fastnn.make_optimizer("momentum", model, 0.05, momentum=0.9, weight_decay=1e-3)
            hist = fastnn.fit(model, x, y, epochs=1, batch_size=16, optimizer=opt, seed=1,
                              cuda_graph=device == "gpu")
        runs.append((model, hist))
    (gpu, hg), (cpu, hc) = runs
    for pg, pc in zip(gpu.get_params(), cpu.get_params()):
        np.testing.assert_allclose(pg, pc, rtol=1e-10, atol=1e-12)
    assert hg[-1]["train_loss"] == pytest.approx(hc[-1]["train_loss"], rel=1e-10)


def test_emulated_gpu_training_learns_in_float32(emulated_gpu):
    x, y = data(400)
    model, _, hist = train(x, y, "adam", 32, epochs=3, cuda_graph=True)
    assert hist[-1]["train_accuracy"] > 0.9
    xt, yt = data(200, seed=1)
    assert model.evaluate(xt, yt)["accuracy"] > 0.9


def test_cublas_in_a_capture_is_refused_and_training_goes_on_uncaptured(emulated_gpu):
    from fastnn.backends.cupy_ops import CupyOps

    x, y = data(64)
    want = train(x, y, "sgd", 16, device=CupyOps("cublas"))
    model = fastnn.MLP(SIZES, device=CupyOps("cublas"), seed=3)
    opt = fastnn.make_optimizer("sgd", model, 0.1, weight_decay=1e-3)
    with pytest.warns(RuntimeWarning, match="calling cuBLAS API during stream capture is currently unsupported"):
        hist = fastnn.fit(model, x, y, epochs=1, batch_size=16, optimizer=opt, seed=1, cuda_graph=True,
                          lr_schedule="constant")
    assert_bitwise_equal(want, (model, opt, hist))


@pytest.mark.parametrize("forbidden", ["allocation", "host copy", "synchronisation", "array operation"])
def test_the_emulated_capture_refuses_what_cuda_refuses(emulated_gpu, forbidden):
    from cuda_emulator import CaptureError

    cp = emulated_gpu
    a = cp.zeros(4, np.float32)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        with pytest.raises(CaptureError):
            {"allocation": lambda: cp.zeros(3), "host copy": lambda: cp.asnumpy(a),
             "synchronisation": stream.synchronize, "array operation": lambda: a + 1}[forbidden]()
        with pytest.raises(CaptureError, match="invalidated"):
            stream.end_capture()


def test_the_emulator_checks_kernel_arguments_and_barriers(emulated_gpu, tmp_path):
    cp = emulated_gpu
    src = r"""
    extern "C" __global__ void half_barrier(float* x, int n) {
        if (threadIdx.x < 8) __syncthreads();
        x[threadIdx.x] = n;
    }"""
    k = cp.RawModule(code=src).get_function("half_barrier")
    x = cp.zeros(16, np.float32)
    with pytest.raises(TypeError, match="expected a NumPy int32 scalar"):
        k((1,), (16,), (x, 16))  # a Python int: CuPy would pass 8 bytes for a 4-byte int
    with pytest.raises(TypeError, match="expected a C-contiguous float32 array"):
        k((1,), (16,), (cp.zeros(16, np.float64), np.int32(16)))
    with pytest.raises(RuntimeError, match=r"__syncthreads\(\) reached by 8 of the 16 threads"):
        k((1,), (16,), (x, np.int32(16)))


def test_a_kernel_reading_past_an_array_crashes_at_once(emulated_gpu):
    # the stage kernel asked for batch 1 of an epoch of one batch reads perm past its end
    script = (
        "import sys, numpy as np; sys.path.insert(0, 'tests'); import cuda_emulator\n"
        "cp = cuda_emulator.fake_cupy()\n"
        "k = cp.RawModule(code=open('fastnn/backends/kernels.cu').read()).get_function('stage')\n"
        "perm, counter, idx = cp.arange(1024, dtype=np.int64), cp.ones(1, np.int32), cp.zeros(1024, np.int64)\n"
        "args = (np.int32(1024), np.int64(1024), np.int32(1024), idx)\n"
        "k((4,), (256,), (perm, counter * 0, *args))\n"
        "print('in bounds ok', flush=True)\n"
        "k((4,), (256,), (perm, counter, *args))\n"
        "print('not caught')\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert "in bounds ok" in proc.stdout and "not caught" not in proc.stdout
    assert proc.returncode < 0  # killed by SIGSEGV at the guard page


# ---------------------------------------------------------------- stacks of models
STACK_HYPER = {"sgd": [0.1, 0.05, 0.02], "momentum": [0.1, 0.05, 0.02], "nesterov": [0.1, 0.05, 0.02],
               "adam": [1e-2, 3e-3, 1e-3]}


def train_stack(x, y, optimizer, order, device="gpu", dtype="float32", **kw):
    """A stack of three models with per-model lr, momentum, weight decay and dropout; every warning fails."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        st = fastnn.ModelStack(SIZES, [1, 2, 3], device=device, dtype=dtype, dropout=[0.0, 0.2, [0.3, 0.1]])
        hist = fastnn.fit_many(st, x, y, epochs=3, batch_size=16, lr=STACK_HYPER[optimizer], optimizer=optimizer,
                               momentum=[0.9, 0.5, 0.0], weight_decay=[0, 1e-3, 1e-2],
                               seed=[1, 2, 3] if order == "per-model" else 5, x_val=x[:40], y_val=y[:40], **kw)
    return st.ops.to_host(st.params), hist


@pytest.mark.parametrize("optimizer", list(STACK_HYPER))
@pytest.mark.parametrize("order", ["shared", "per-model"])
def test_stacked_gpu_kernels_compute_what_numpy_computes(emulated_gpu, optimizer, order):
    """The stacked launches (models on grid z, one loss block per model, the *_stack optimizers)."""
    x, y = data(103)
    gpu, hg = train_stack(x, y, optimizer, order, dtype="float64")
    cpu, hc = train_stack(x, y, optimizer, order, device="cpu", dtype="float64")
    np.testing.assert_allclose(gpu, cpu, rtol=0, atol=1e-12)
    for k in range(3):
        assert [r["val_loss"] for r in hg[k]] == pytest.approx([r["val_loss"] for r in hc[k]], rel=1e-10)


@pytest.mark.parametrize("order", ["shared", "per-model"])
def test_class_weighted_stacks_on_the_gpu_compute_what_numpy_computes(emulated_gpu, order):
    """The weights of each model's batch gathered by the stacked gather kernel ((K, B) orders)."""
    x, y = data(103)
    gpu, _ = train_stack(x, y, "momentum", order, dtype="float64", class_weight={0: 3.0, 1: 0.5})
    cpu, _ = train_stack(x, y, "momentum", order, device="cpu", dtype="float64", class_weight={0: 3.0, 1: 0.5})
    plain, _ = train_stack(x, y, "momentum", order, device="cpu", dtype="float64")
    np.testing.assert_allclose(gpu, cpu, rtol=0, atol=1e-12)
    assert np.abs(plain - cpu).max() > 1e-4


@pytest.mark.parametrize("optimizer", ["momentum", "adam"])
@pytest.mark.parametrize("order", ["shared", "per-model"])
def test_captured_stacked_step_equals_uncaptured(emulated_gpu, optimizer, order):
    """A stack's step captured (no cuBLAS, no allocation in it), recaptured for the cosine schedule's
    new rates and after a model leaves the stack: the same bits as eager launches."""
    x, y = data(103)
    kw = dict(lr_schedule="cosine", on_epoch=lambda recs: [1] if recs[0]["epoch"] == 2 else [])
    eager, he = train_stack(x, y, optimizer, order, **kw)
    launches = emulated_gpu.emulator_state.graph_launches
    captured, hc = train_stack(x, y, optimizer, order, cuda_graph=True, **kw)
    assert emulated_gpu.emulator_state.graph_launches - launches == 3 * 6  # 6 full batches of 16 per epoch
    np.testing.assert_array_equal(captured, eager)
    for k in range(3):
        assert [(r["train_loss"], r["train_accuracy"]) for r in hc[k]] == \
            [(r["train_loss"], r["train_accuracy"]) for r in he[k]]
