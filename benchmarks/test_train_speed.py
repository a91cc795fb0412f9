"""What batching buys: one epoch of 784-128-64-10 relu, per-sample against batched.

Run: ``pytest benchmarks/ --benchmark-only`` (add ``--benchmark-json out.json`` and
turn it into a table with ``python scripts/bench_report.py out.json``).

Each case reports ``extra_info``: ``epoch_seconds`` (seconds for 60000 samples;
per-sample cases time a fixed slice and scale it, saying so in ``slice``),
``samples_per_s``, and ``gflops`` where it applies. GPU cases synchronise inside
the timed call, after a warm-up epoch, and skip without CUDA.
"""

import time

import numpy as np
import pytest
from conftest import N_EPOCH, require_gpu
from naive import NaiveMLP

import fastnn

SIZES = [784, 128, 64, 10]
NAIVE_SLICE = 3000
PER_SAMPLE_SLICE = 6000


def flops_per_sample(sizes):
    """Forward 2 fi fo, weight gradient 2 fi fo, input gradient 2 fi fo (not for layer 1)."""
    mac = [fi * fo for fi, fo in zip(sizes[:-1], sizes[1:])]
    return 2 * sum(mac) + 2 * sum(mac) + 2 * sum(mac[1:])


def record(benchmark, n, sizes=SIZES, **info):
    if benchmark.stats is None:  # --benchmark-disable: ran once as a smoke test, nothing timed
        return
    mean = benchmark.stats.stats.mean
    benchmark.extra_info.update(info)
    benchmark.extra_info["samples"] = n
    benchmark.extra_info["epoch_seconds"] = mean * N_EPOCH / n
    benchmark.extra_info["samples_per_s"] = n / mean
    benchmark.extra_info["gflops"] = flops_per_sample(sizes) * n / mean / 1e9
    if n != N_EPOCH:
        benchmark.extra_info["slice"] = f"timed {n} samples, scaled to {N_EPOCH}"


class FastnnEpoch:
    """One training epoch of fastnn on a device, data uploaded once."""

    def __init__(self, device, images, labels, batch, sizes=SIZES, n=None, cuda_graph=False):
        self.model = fastnn.MLP(sizes, device=device)
        self.opt = fastnn.make_optimizer("sgd", self.model, 0.01)
        n = len(labels) if n is None else n
        self.x, self.y = self.model.to_device(images[:n], labels[:n])
        self.batch, self.rng = batch, np.random.default_rng(0)
        self.graph = None
        if cuda_graph:
            from functools import partial

            from fastnn.cuda_graph import CapturedStep

            step = partial(fastnn.train_step, self.model, self.opt, self.x, self.y)
            self.graph = CapturedStep(step, self.model, self.opt, n, batch)

    def __call__(self):  # syncs at the end, when it reads the loss
        fastnn.train_epoch(self.model, self.opt, self.x, self.y, self.batch, self.rng, graph=self.graph)


class TorchEpoch:
    """The same epoch in PyTorch eager mode: data preloaded on the device, SGD, same batch order logic."""

    def __init__(self, torch, device, images, labels, batch, sizes=SIZES):
        self.torch, self.device, self.batch = torch, device, batch
        layers = []
        for i, (fi, fo) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(torch.nn.Linear(fi, fo))
            if i < len(sizes) - 2:
                layers.append(torch.nn.ReLU())
        self.net = torch.nn.Sequential(*layers).to(device)
        self.opt = torch.optim.SGD(self.net.parameters(), lr=0.01)
        self.x = torch.as_tensor(images, device=device)
        self.y = torch.as_tensor(labels, device=device)
        self.gen = torch.Generator(device="cpu").manual_seed(0)

    def __call__(self):
        torch, n = self.torch, self.x.shape[0]
        perm = torch.randperm(n, generator=self.gen).to(self.device)
        total = torch.zeros((), device=self.device)
        for s in range(0, n, self.batch):
            idx = perm[s:s + self.batch]
            xb = self.x[idx].float().mul_(1 / 255)
            loss = torch.nn.functional.cross_entropy(self.net(xb), self.y[idx])
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            total += loss.detach()
        total.item()  # one synchronisation, as fastnn does


class TorchGraphEpoch(TorchEpoch):
    """PyTorch's own captured step (``torch.cuda.CUDAGraph``): gather, forward, loss, backward
    and SGD of one full batch replayed per batch; the ragged last batch runs eagerly."""

    def __init__(self, torch, images, labels, batch):
        super().__init__(torch, "cuda", images, labels, batch)
        self.idx = torch.zeros(batch, dtype=torch.long, device="cuda")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up, as PyTorch's CUDA-graph recipe asks
                self._step(self.idx)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        self.opt.zero_grad(set_to_none=True)
        with torch.cuda.graph(self.graph):
            self.loss = self._step(self.idx, zero_grad=False)

    def _step(self, idx, zero_grad=True):
        xb = self.x[idx].float().mul_(1 / 255)
        loss = self.torch.nn.functional.cross_entropy(self.net(xb), self.y[idx])
        if zero_grad:
            self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach()

    def __call__(self):
        torch, n, b = self.torch, self.x.shape[0], self.batch
        perm = torch.randperm(n, generator=self.gen).to(self.device)
        total = torch.zeros((), device=self.device)
        for s in range(0, n - b + 1, b):
            self.idx.copy_(perm[s:s + b])
            self.graph.replay()
            total += self.loss
        if n % b:
            total += self._step(perm[n - n % b:])
        total.item()


def gpu_sync(fn):
    import cupy

    def run():
        fn()
        cupy.cuda.get_current_stream().synchronize()
    return run


def pedantic(benchmark, fn, rounds=3):
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)


# ---------------------------------------------------------------- CPU, per sample
@pytest.mark.benchmark(group="epoch-cpu")
def test_naive_per_sample_loop(benchmark, epoch_data):
    x, y, what = epoch_data
    xs = x[:NAIVE_SLICE].astype(np.float64) / 255
    net = NaiveMLP(SIZES)
    pedantic(benchmark, lambda: net.train_per_sample(xs, y[:NAIVE_SLICE], 0.01))
    record(benchmark, NAIVE_SLICE, data=what, impl="naive NumPy, column vectors, float64")


@pytest.mark.benchmark(group="epoch-cpu")
def test_naive_looped_minibatch(benchmark, epoch_data):
    x, y, what = epoch_data
    xs = x[:NAIVE_SLICE].astype(np.float64) / 255
    net = NaiveMLP(SIZES)
    pedantic(benchmark, lambda: net.train_looped_minibatch(xs, y[:NAIVE_SLICE], 0.1, 125))
    record(benchmark, NAIVE_SLICE, data=what, impl="per-sample backprop summed over batches of 125")


@pytest.mark.benchmark(group="epoch-cpu")
def test_fastnn_per_sample_cpu(benchmark, epoch_data):
    x, y, what = epoch_data
    pedantic(benchmark, FastnnEpoch("cpu", x, y, 1, n=PER_SAMPLE_SLICE))
    record(benchmark, PER_SAMPLE_SLICE, data=what, impl="fastnn batch 1, float32")


# ---------------------------------------------------------------- CPU, batched
@pytest.mark.benchmark(group="epoch-cpu")
@pytest.mark.parametrize("batch", [32, 128, 512, 2048])
def test_fastnn_batched_cpu(benchmark, epoch_data, batch):
    x, y, what = epoch_data
    pedantic(benchmark, FastnnEpoch("cpu", x, y, batch), rounds=5)
    record(benchmark, N_EPOCH, data=what, impl=f"fastnn batch {batch}")


@pytest.mark.benchmark(group="epoch-cpu")
def test_torch_cpu(benchmark, epoch_data, torch_mod):
    x, y, what = epoch_data
    pedantic(benchmark, TorchEpoch(torch_mod, "cpu", x, y, 128), rounds=5)
    record(benchmark, N_EPOCH, data=what, impl=f"PyTorch {torch_mod.__version__} eager batch 128, "
           f"{torch_mod.get_num_threads()} threads")


# ---------------------------------------------------- CPU, alternating ratios
@pytest.mark.benchmark(group="ratio-cpu")
def test_ratios_alternating_in_one_process(benchmark, epoch_data, torch_mod):
    """Naive slice, fastnn b128 epoch, PyTorch b128 epoch and the epoch's GEMMs, in turn.

    The machine's speed drifts by up to 1.6x over minutes; alternating the cases
    round by round makes their ratios fair. Reports medians and ratios.
    """
    x, y, what = epoch_data
    xs = x[:NAIVE_SLICE].astype(np.float64) / 255
    net = NaiveMLP(SIZES)
    ours, theirs = FastnnEpoch("cpu", x, y, 128), TorchEpoch(torch_mod, "cpu", x, y, 128)
    gemm = GemmsOfEpoch(ours.model, 128)
    times = {"naive": [], "fastnn": [], "torch": [], "gemm": []}

    def one_round():
        for name, fn, scale in (("naive", lambda: net.train_per_sample(xs, y[:NAIVE_SLICE], 0.01),
                                 N_EPOCH / NAIVE_SLICE),
                                ("fastnn", ours, 1), ("torch", theirs, 1), ("gemm", gemm, 1)):
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * scale)

    benchmark.pedantic(one_round, rounds=5, iterations=1, warmup_rounds=1)
    med = {k: float(np.median(v[1:] if len(v) > 5 else v)) for k, v in times.items()}
    benchmark.extra_info.update({f"{k}_epoch_seconds": v for k, v in med.items()})
    benchmark.extra_info["naive_over_fastnn"] = med["naive"] / med["fastnn"]
    benchmark.extra_info["torch_over_fastnn"] = med["torch"] / med["fastnn"]
    benchmark.extra_info["fastnn_over_gemm"] = med["fastnn"] / med["gemm"]
    benchmark.extra_info["data"] = what


class GemmsOfEpoch:
    """Only the 8 GEMMs of a batch-128 epoch, at the training shapes, into the model's buffers."""

    def __init__(self, model, batch):
        self.m, self.ws, self.steps = model, model.workspace(batch), -(-N_EPOCH // batch)

    def __call__(self):
        m, ws, dot = self.m, self.ws, np.dot
        W, G = m.W, m.gW
        for _ in range(self.steps):
            a = ws.x
            for l, w in enumerate(W):
                dot(a, w, out=ws.acts[l])
                a = ws.acts[l]
            for l in reversed(range(len(W))):
                dot((ws.x if l == 0 else ws.acts[l - 1]).T, ws.deltas[l], out=G[l])
                if l > 0:
                    dot(ws.deltas[l], W[l].T, out=ws.deltas[l - 1])


# ---------------------------------------------------------------- GPU
@pytest.mark.benchmark(group="epoch-gpu")
@pytest.mark.parametrize("looped", [False, True], ids=["per-sample", "looped-minibatch"])
def test_naive_on_the_gpu(benchmark, epoch_data, looped):
    """The beginner's loop with CuPy in place of NumPy: a kernel launch per tiny op."""
    require_gpu()
    import cupy

    x, y, what = epoch_data
    n = 1000
    xs, ys = cupy.asarray(x[:n].astype(np.float64) / 255), y[:n]
    net = NaiveMLP(SIZES, xp=cupy)
    fn = (lambda: net.train_looped_minibatch(xs, ys, 0.1, 125)) if looped else \
        (lambda: net.train_per_sample(xs, ys, 0.01))
    pedantic(benchmark, gpu_sync(fn))
    record(benchmark, n, data=what, impl="naive loop on CuPy" + (", batches of 125" if looped else ""))


@pytest.mark.benchmark(group="epoch-gpu")
def test_fastnn_per_sample_gpu(benchmark, epoch_data):
    require_gpu()
    x, y, what = epoch_data
    pedantic(benchmark, gpu_sync(FastnnEpoch("gpu", x, y, 1, n=2000)))
    record(benchmark, 2000, data=what, impl="fastnn batch 1 on the GPU")


def gpu_backend(gemm: str):
    """The GPU backend with fastnn's fused GEMM kernels (``"fastnn"``) or cuBLAS products (``"cublas"``)."""
    require_gpu()
    from fastnn.backends.cupy_ops import CupyOps

    return CupyOps(gemm)


@pytest.mark.benchmark(group="epoch-gpu")
@pytest.mark.parametrize("gemm", ["fastnn", "cublas"])
@pytest.mark.parametrize("batch", [32, 128, 512, 2048])
def test_fastnn_batched_gpu(benchmark, epoch_data, batch, gemm):
    ops = gpu_backend(gemm)
    x, y, what = epoch_data
    pedantic(benchmark, gpu_sync(FastnnEpoch(ops, x, y, batch)), rounds=5)
    record(benchmark, N_EPOCH, data=what, impl=f"fastnn batch {batch} on the GPU, {gemm} GEMMs")


@pytest.mark.benchmark(group="epoch-gpu")
@pytest.mark.parametrize("batch", [128, 512])
def test_fastnn_cuda_graph_gpu(benchmark, epoch_data, batch):
    require_gpu()
    x, y, what = epoch_data
    pedantic(benchmark, gpu_sync(FastnnEpoch("gpu", x, y, batch, cuda_graph=True)), rounds=5)
    record(benchmark, N_EPOCH, data=what, impl=f"fastnn batch {batch} on the GPU, CUDA graph")


@pytest.mark.benchmark(group="epoch-gpu")
@pytest.mark.parametrize("captured", [False, True], ids=["eager", "cuda-graph"])
def test_torch_gpu(benchmark, epoch_data, torch_mod, captured):
    require_gpu()
    if not torch_mod.cuda.is_available():
        pytest.skip("PyTorch has no CUDA here")
    x, y, what = epoch_data
    ep = TorchGraphEpoch(torch_mod, x, y, 128) if captured else TorchEpoch(torch_mod, "cuda", x, y, 128)
    pedantic(benchmark, lambda: (ep(), torch_mod.cuda.synchronize()), rounds=5)
    how = "CUDA graph" if captured else "eager"
    record(benchmark, N_EPOCH, data=what, impl=f"PyTorch {torch_mod.__version__} batch 128 on the GPU, {how}")


# ------------------------------------------------------- width sweep vs GEMM peak
def _device_params():
    return [pytest.param("cpu", id="cpu"), pytest.param("gpu", id="gpu", marks=pytest.mark.gpu),
            pytest.param("gpu-cublas", id="gpu-cublas", marks=pytest.mark.gpu)]


@pytest.mark.benchmark(group="gemm-peak")
@pytest.mark.parametrize("device", _device_params())
def test_gemm_peak(benchmark, device):
    """float32 GEMM throughput of the device: the ceiling for the width sweep."""
    if device == "gpu":
        pytest.skip("the GEMM peak is cuBLAS's: measured once, as gpu-cublas")
    ops = gpu_backend("cublas") if device == "gpu-cublas" else fastnn.get_ops(device)
    n = 2048 if device == "cpu" else 8192
    a = ops.asarray(np.random.default_rng(0).random((n, n), np.float32))
    c = ops.xp.empty_like(a)

    def run():
        ops.matmul(a, a, out=c)
        ops.synchronize()
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    if benchmark.stats is None:
        return
    benchmark.extra_info["gflops"] = 2 * n ** 3 / benchmark.stats.stats.min / 1e9
    benchmark.extra_info["shape"] = f"{n}x{n}x{n}"


@pytest.mark.benchmark(group="width-sweep")
@pytest.mark.parametrize("device", _device_params())
@pytest.mark.parametrize("width", [128, 1024, 4096])
def test_width_sweep(benchmark, epoch_data, width, device):
    """784-W-W-10 at batch 128: the wider, the larger the share of time in GEMMs."""
    x, y, what = epoch_data
    sizes = [784, width, width, 10]
    n = {128: N_EPOCH, 1024: 12800, 4096: 1280}[width]
    backend = "cpu" if device == "cpu" else gpu_backend("cublas" if device == "gpu-cublas" else "fastnn")
    ep = FastnnEpoch(backend, x, y, 128, sizes=sizes, n=n)
    fn = ep if device == "cpu" else gpu_sync(ep)
    pedantic(benchmark, fn)
    record(benchmark, n, sizes=sizes, data=what, impl=f"fastnn 784-{width}-{width}-10 batch 128 on {device}")
