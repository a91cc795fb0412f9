"""Conv-net training speed: Nielsen's network3 on Fashion-MNIST, fastnn against itself, its GEMMs and PyTorch.

The network is the ``network3`` preset's (``conv20k5,pool2,conv40k5,pool2,dense100`` then 10 outputs),
relu, Adam (lr 1e-3, constant), batch 128, float32, without the preset's dropout (the PyTorch network
has none either). Each epoch runs over the first ``CPU_IMAGES`` training images (``PER_SAMPLE_IMAGES``
at batch 1, ``GPU_IMAGES`` on the GPU) so that a case takes seconds. The cases need the real
Fashion-MNIST (``$FASTNN_DATA`` or ``../shared/data``, as ``conftest.epoch_data`` looks it up) and skip
without it; the PyTorch cases skip without PyTorch, the GPU cases without a GPU.

Run: ``pytest benchmarks/test_conv_speed.py --benchmark-only`` (``-k gpu`` for the GPU cases alone).

* ``conv-cpu`` rows: fastnn at batch 1 and at batch 128 (BLAS limited to 1 and 2 threads), PyTorch
  eager at 1 and 2 threads. Each records, besides ``record``'s ``epoch_seconds`` (scaled to 60000
  images, saying so in ``slice``), ``samples_per_s`` and ``gflops`` (of the GEMM work, ``FLOPS_PER_IMAGE``):
  ``images``, ``batch``, ``threads``, ``device``, ``us_per_image``.
* ``conv-ratio-cpu``: cases alternated round by round in one process (the machine's speed drifts
  over minutes; alternating keeps their ratios fair), medians of the rounds after a warm-up:
  per-sample against batched (``per_sample_over_batched``: what batching buys); fastnn against
  PyTorch at 1 and 2 threads (``torch_over_fastnn``); the epoch against its GEMMs alone
  (``epoch_over_gemms``, and ``claim_holds``: whether a conv epoch takes at most
  ``GEMM_CLAIM`` times its GEMMs' time).
* ``conv-gpu`` rows and ``conv-ratio-gpu``: fastnn eager and with a CUDA graph, PyTorch eager with
  and without ``cudnn.benchmark`` (PyTorch's default TF32 convolutions, recorded as ``cudnn_tf32``;
  fastnn's kernels compute in plain float32), each synchronised inside the timed call.
"""

import contextlib
import os
import time
from functools import partial

import numpy as np
import pytest
from conftest import _data_root, require_gpu
from test_train_speed import FastnnEpoch, TorchEpoch, gpu_sync, pedantic, record

import fastnn
from fastnn.cli.flags import PRESETS
from fastnn.layers import parse

NETWORK3 = PRESETS["network3"]
SPEC = NETWORK3["layers"]  # conv20k5,pool2,conv40k5,pool2,dense100
IMAGE_SHAPE, CLASSES = (28, 28, 1), 10
LAYERS = parse(SPEC, IMAGE_SHAPE, CLASSES)
BATCH = 128
LR = NETWORK3["lr"]
CPU_IMAGES = 2560  # 20 batches of 128: an epoch of them takes about half a second on 2 cores
PER_SAMPLE_IMAGES = 1280
GPU_IMAGES = 12800  # 100 batches
THREADS = (1, 2)
GEMM_CLAIM = 1.5  # "a conv epoch takes <= 1.5x the time of its GEMMs alone"
NETWORK = f"network3 ({SPEC}, relu, Adam, no dropout)"


def flops_per_image(layers=LAYERS) -> int:
    """The GEMM work of one image's training step: per convolution or dense layer, forward
    ``2 rows k*k*C_in C_out``, weight gradient the same, input gradient the same (not for the first
    layer), rows = the output's positions (1 for a dense layer). Pooling, im2col and the rest: none."""
    total = 0
    for l, layer in enumerate(layers):
        if layer.kind == "pool":
            continue
        rows = layer.shape_out[0] * layer.shape_out[1] if layer.kind == "conv" else 1
        fan_in, fan_out = layer.weight_shape
        total += 2 * rows * fan_in * fan_out * (2 if l == 0 else 3)
    return total


FLOPS_PER_IMAGE = flops_per_image()


@pytest.fixture(scope="module")
def fashion(epoch_data):
    """``conftest.epoch_data``, real images only: the conv cases skip on its synthetic stand-in."""
    x, y, what = epoch_data
    if "real data not found" in what:
        pytest.skip(f"Fashion-MNIST not found under {_data_root()} (set FASTNN_DATA to the folder holding "
                    "fashion-mnist/): the conv-net benchmarks run on real images only")
    return x, y, what


def network3(device):
    return fastnn.MLP([784, CLASSES], activation=NETWORK3["activation"], layers=SPEC, image_shape=IMAGE_SHAPE,
                      device=device)


class ConvFastnnEpoch(FastnnEpoch):
    """``FastnnEpoch`` (its ``__call__``: one ``train_epoch``) for network3 with Adam on the first ``n`` images."""

    def __init__(self, device, images, labels, batch, n, cuda_graph=False):
        self.model = network3(device)
        self.opt = fastnn.make_optimizer(NETWORK3["optimizer"], self.model, LR)
        self.x, self.y = self.model.to_device(images[:n], labels[:n])
        self.batch, self.rng, self.graph = batch, np.random.default_rng(0), None
        if cuda_graph:
            from fastnn.cuda_graph import CapturedStep

            step = partial(fastnn.train_step, self.model, self.opt, self.x, self.y)
            self.graph = CapturedStep(step, self.model, self.opt, n, batch)


def torch_network(torch, layers=LAYERS):
    """fastnn's ``layers`` as a PyTorch ``Sequential`` on flat (B, 784) inputs: Conv2d (NCHW), relu,
    MaxPool2d, Flatten before the first Linear; no activation after the output layer."""
    nn, mods = torch.nn, [torch.nn.Unflatten(1, (IMAGE_SHAPE[2], *IMAGE_SHAPE[:2]))]
    for i, layer in enumerate(layers):
        if layer.kind == "conv":
            mods += [nn.Conv2d(layer.shape_in[2], layer.size, layer.k, padding=layer.pad), nn.ReLU()]
        elif layer.kind == "pool":
            mods.append(nn.MaxPool2d(layer.k))
        else:
            if len(layers[i - 1].shape_out) == 3:
                mods.append(nn.Flatten())
            mods.append(nn.Linear(layer.width_in, layer.size))
            if i < len(layers) - 1:
                mods.append(nn.ReLU())
    return nn.Sequential(*mods)


class TorchConvEpoch(TorchEpoch):
    """``TorchEpoch`` (its ``__call__``: the eager epoch, one synchronisation) for network3 with Adam;
    ``cudnn_benchmark``: set ``torch.backends.cudnn.benchmark`` for the epoch (put back after)."""

    def __init__(self, torch, device, images, labels, batch, n, cudnn_benchmark=False):
        self.torch, self.device, self.batch, self.cudnn_benchmark = torch, device, batch, cudnn_benchmark
        torch.manual_seed(0)
        self.net = torch_network(torch).to(device)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=LR)
        self.x = torch.as_tensor(images[:n], device=device)
        self.y = torch.as_tensor(labels[:n], device=device)
        self.gen = torch.Generator(device="cpu").manual_seed(0)

    def __call__(self):
        cudnn = self.torch.backends.cudnn
        before, cudnn.benchmark = cudnn.benchmark, self.cudnn_benchmark
        try:
            super().__call__()
        finally:
            cudnn.benchmark = before


class GemmsOfConvEpoch:
    """Only the GEMMs of a network3 epoch, at the training shapes, into the model's workspace: per
    step, for each convolution the forward ``patches (B*Ho*Wo, k*k*C) @ W (k*k*C, N)`` (the patch
    matrix as the backend stores it, ``Ops.patch_matrix``), the weight gradient ``patches.T @ d`` and
    the input gradient ``d @ W.T`` (into the patches' buffer, as the model does; none for the first
    layer); for each dense layer the same three. ``np.matmul`` and ``np.dot`` as fastnn's NumPy
    backend calls them, into preallocated outputs; no im2col, pooling, activation, loss or optimizer.
    The buffers read are filled with random values first (no NaN or denormals)."""

    def __init__(self, model, batch, n):
        ws, B, rng = model.workspace(batch), batch, np.random.default_rng(0)
        for buf in [*ws.acts, *ws.deltas, *(c for c in ws.cols if c is not None)]:
            buf[...] = rng.standard_normal(buf.shape, np.float32)
        forward, backward = [], []
        for l, layer in enumerate(model.layers):
            if layer.kind == "pool":
                continue
            rows = B * layer.shape_out[0] * layer.shape_out[1] if layer.kind == "conv" else B
            a = model.ops.patch_matrix(ws.cols[l]) if layer.kind == "conv" else (ws.x if l == 0 else ws.acts[l - 1])
            a, out, d = a.reshape(rows, -1), ws.acts[l].reshape(rows, -1), ws.deltas[l].reshape(rows, -1)
            W, gW = model.W[l], model.gW[l]
            forward.append((np.matmul, a, W, out))
            grads = [(np.dot, a.T, d, gW)]
            if l > 0:
                da = ws.cols[l] if layer.kind == "conv" else ws.deltas[l - 1]
                grads.append((np.matmul, d, W.T, da.reshape(rows, -1)))
            backward = grads + backward
        self.gemms, self.steps = forward + backward, -(-n // batch)

    def __call__(self):
        for _ in range(self.steps):
            for gemm, a, b, out in self.gemms:
                gemm(a, b, out=out)


# ---------------------------------------------------------------- helpers
def blas_threads():
    """The thread count of NumPy's BLAS as threadpoolctl sees it (None without threadpoolctl)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    blas = [i for i in threadpool_info() if i["user_api"] == "blas"]
    own = [i for i in blas if "numpy" in i["filepath"]] or blas
    return own[0]["num_threads"] if own else None


def limit_blas(threads):
    """BLAS limited to ``threads`` (threadpoolctl), or nothing done where threadpoolctl is missing
    (``blas_threads`` then records None: whatever BLAS chose)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=threads, user_api="blas")


@contextlib.contextmanager
def torch_threads(torch, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cpu_device():
    return f"cpu ({os.cpu_count()} cores)"


def gpu_name():
    import cupy

    return cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode()


def record_conv(benchmark, n, batch, threads, device, **info):
    """``record`` (``epoch_seconds`` scaled to 60000 images, ``samples_per_s``) with the GEMM FLOPs of
    network3 in place of the MLP's, and what a README row needs: images, batch, threads, device."""
    record(benchmark, n, network=NETWORK, images=n, batch=batch, threads=threads, device=device, **info)
    if benchmark.stats is None:
        return
    mean = benchmark.stats.stats.mean
    benchmark.extra_info["gflops"] = FLOPS_PER_IMAGE * n / mean / 1e9
    benchmark.extra_info["us_per_image"] = mean / n * 1e6


def alternate(benchmark, cases: dict, rounds=5) -> dict:
    """Each of ``cases`` ({name: (fn, scale)}) in turn, round by round, as one benchmark: the median
    over the rounds after the warm-up of each case's seconds times its ``scale``."""
    times = {name: [] for name in cases}

    def one_round():
        for name, (fn, scale) in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * scale)

    benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=1)
    return {name: float(np.median(v[1:] if len(v) > 1 else v)) for name, v in times.items()}


def torch_cuda(torch_mod):
    require_gpu()
    if not torch_mod.cuda.is_available():
        pytest.skip("PyTorch has no CUDA here: no PyTorch GPU baseline")


# ---------------------------------------------------------------- CPU rows
@pytest.mark.benchmark(group="conv-cpu")
def test_conv_fastnn_per_sample_cpu(benchmark, fashion):
    x, y, what = fashion
    pedantic(benchmark, ConvFastnnEpoch("cpu", x, y, 1, PER_SAMPLE_IMAGES))
    record_conv(benchmark, PER_SAMPLE_IMAGES, 1, blas_threads(), cpu_device(), data=what,
                impl="fastnn network3 batch 1, float32")


@pytest.mark.benchmark(group="conv-cpu")
@pytest.mark.parametrize("threads", THREADS, ids=lambda t: f"threads{t}")
def test_conv_fastnn_batched_cpu(benchmark, fashion, threads):
    x, y, what = fashion
    ep = ConvFastnnEpoch("cpu", x, y, BATCH, CPU_IMAGES)
    with limit_blas(threads):
        pedantic(benchmark, ep)
        used = blas_threads()
    record_conv(benchmark, CPU_IMAGES, BATCH, used, cpu_device(), data=what,
                impl=f"fastnn network3 batch {BATCH}, float32, BLAS {used} threads")


@pytest.mark.benchmark(group="conv-cpu")
@pytest.mark.parametrize("threads", THREADS, ids=lambda t: f"threads{t}")
def test_conv_torch_cpu(benchmark, fashion, torch_mod, threads):
    x, y, what = fashion
    ep = TorchConvEpoch(torch_mod, "cpu", x, y, BATCH, CPU_IMAGES)
    with torch_threads(torch_mod, threads):
        pedantic(benchmark, ep)
    record_conv(benchmark, CPU_IMAGES, BATCH, threads, cpu_device(), data=what,
                impl=f"PyTorch {torch_mod.__version__} network3 eager batch {BATCH}, {threads} threads")


# ---------------------------------------------------- CPU, alternating ratios
@pytest.mark.benchmark(group="conv-ratio-cpu")
def test_conv_batching_ratio_cpu(benchmark, fashion):
    """Per-sample (batch 1) against batched (batch 128), alternating: seconds per image, and their ratio."""
    x, y, what = fashion
    one = ConvFastnnEpoch("cpu", x, y, 1, PER_SAMPLE_IMAGES)
    batched = ConvFastnnEpoch("cpu", x, y, BATCH, CPU_IMAGES)
    med = alternate(benchmark, {"per_sample": (one, 1 / PER_SAMPLE_IMAGES), "batched": (batched, 1 / CPU_IMAGES)})
    benchmark.extra_info.update({
        "network": NETWORK, "data": what, "device": cpu_device(), "threads": blas_threads(),
        "per_sample_images": PER_SAMPLE_IMAGES, "batched_images": CPU_IMAGES, "batch": BATCH,
        "per_sample_us_per_image": med["per_sample"] * 1e6, "batched_us_per_image": med["batched"] * 1e6,
        "per_sample_over_batched": med["per_sample"] / med["batched"]})


@pytest.mark.benchmark(group="conv-ratio-cpu")
@pytest.mark.parametrize("threads", THREADS, ids=lambda t: f"threads{t}")
def test_conv_torch_ratio_cpu(benchmark, fashion, torch_mod, threads):
    """fastnn (BLAS limited to ``threads``) and PyTorch eager (``torch.set_num_threads(threads)``),
    batch 128, alternating: seconds per epoch of CPU_IMAGES images and PyTorch's over fastnn's."""
    x, y, what = fashion
    ours = ConvFastnnEpoch("cpu", x, y, BATCH, CPU_IMAGES)
    theirs = TorchConvEpoch(torch_mod, "cpu", x, y, BATCH, CPU_IMAGES)
    with limit_blas(threads), torch_threads(torch_mod, threads):
        med = alternate(benchmark, {"fastnn": (ours, 1), "torch": (theirs, 1)})
        used = blas_threads()
    benchmark.extra_info.update({
        "network": NETWORK, "data": what, "device": cpu_device(), "images": CPU_IMAGES, "batch": BATCH,
        "fastnn_blas_threads": used, "torch_threads": threads, "torch": torch_mod.__version__,
        "fastnn_seconds": med["fastnn"], "torch_seconds": med["torch"],
        "torch_over_fastnn": med["torch"] / med["fastnn"]})


@pytest.mark.benchmark(group="conv-ratio-cpu")
def test_conv_epoch_over_gemms_cpu(benchmark, fashion):
    """A fastnn epoch and the GEMMs of the same epoch alone (GemmsOfConvEpoch), alternating."""
    x, y, what = fashion
    ours = ConvFastnnEpoch("cpu", x, y, BATCH, CPU_IMAGES)
    gemms = GemmsOfConvEpoch(ours.model, BATCH, CPU_IMAGES)
    med = alternate(benchmark, {"epoch": (ours, 1), "gemms": (gemms, 1)})
    ratio = med["epoch"] / med["gemms"]
    benchmark.extra_info.update({
        "network": NETWORK, "data": what, "device": cpu_device(), "images": CPU_IMAGES, "batch": BATCH,
        "threads": blas_threads(), "gemms_per_step": len(gemms.gemms),
        "epoch_seconds_measured": med["epoch"], "gemm_seconds": med["gemms"],
        "gemm_gflops": FLOPS_PER_IMAGE * CPU_IMAGES / med["gemms"] / 1e9,
        "epoch_over_gemms": ratio, "claim": f"a conv epoch takes <= {GEMM_CLAIM}x its GEMMs' time",
        "claim_holds": ratio <= GEMM_CLAIM})


# ---------------------------------------------------------------- GPU
@pytest.mark.benchmark(group="conv-gpu")
@pytest.mark.parametrize("captured", [False, True], ids=["eager", "cuda-graph"])
def test_conv_fastnn_gpu(benchmark, fashion, captured):
    require_gpu()
    x, y, what = fashion
    ep = ConvFastnnEpoch("gpu", x, y, BATCH, GPU_IMAGES, cuda_graph=captured)
    pedantic(benchmark, gpu_sync(ep), rounds=5)
    how = "CUDA graph" if captured else "eager"
    record_conv(benchmark, GPU_IMAGES, BATCH, None, gpu_name(), data=what,
                impl=f"fastnn network3 batch {BATCH} on the GPU, {how}")


@pytest.mark.benchmark(group="conv-gpu")
@pytest.mark.parametrize("tuned", [False, True], ids=["eager", "cudnn-benchmark"])
def test_conv_torch_gpu(benchmark, fashion, torch_mod, tuned):
    torch_cuda(torch_mod)
    x, y, what = fashion
    ep = TorchConvEpoch(torch_mod, "cuda", x, y, BATCH, GPU_IMAGES, cudnn_benchmark=tuned)
    pedantic(benchmark, lambda: (ep(), torch_mod.cuda.synchronize()), rounds=5)
    how = "eager, cudnn.benchmark" if tuned else "eager"
    record_conv(benchmark, GPU_IMAGES, BATCH, None, torch_mod.cuda.get_device_name(), data=what,
                impl=f"PyTorch {torch_mod.__version__} network3 batch {BATCH} on the GPU, {how}",
                cudnn_tf32=bool(torch_mod.backends.cudnn.allow_tf32))


@pytest.mark.benchmark(group="conv-ratio-gpu")
def test_conv_ratios_gpu_alternating(benchmark, fashion, torch_mod):
    """fastnn eager, fastnn captured, PyTorch eager, PyTorch with cudnn.benchmark, alternating;
    each case's seconds over fastnn eager's and over fastnn captured's."""
    torch_cuda(torch_mod)
    x, y, what = fashion
    cases = {
        "fastnn_eager": gpu_sync(ConvFastnnEpoch("gpu", x, y, BATCH, GPU_IMAGES)),
        "fastnn_graph": gpu_sync(ConvFastnnEpoch("gpu", x, y, BATCH, GPU_IMAGES, cuda_graph=True)),
    }
    for name, tuned in (("torch_eager", False), ("torch_cudnn_benchmark", True)):
        ep = TorchConvEpoch(torch_mod, "cuda", x, y, BATCH, GPU_IMAGES, cudnn_benchmark=tuned)
        cases[name] = lambda ep=ep: (ep(), torch_mod.cuda.synchronize())
    med = alternate(benchmark, {name: (fn, 1) for name, fn in cases.items()})
    info = {"network": NETWORK, "data": what, "device": gpu_name(), "images": GPU_IMAGES, "batch": BATCH,
            "torch": torch_mod.__version__, "cudnn_tf32": bool(torch_mod.backends.cudnn.allow_tf32)}
    info.update({f"{name}_seconds": s for name, s in med.items()})
    info.update({f"{name}_over_fastnn_eager": s / med["fastnn_eager"] for name, s in med.items()
                 if name != "fastnn_eager"})
    info.update({f"{name}_over_fastnn_graph": s / med["fastnn_graph"] for name, s in med.items()
                 if name != "fastnn_graph"})
    benchmark.extra_info.update(info)
