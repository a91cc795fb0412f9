"""Many models at once: K = 1, 4, 16, 64 networks of 784-128-64-10 relu, batch 128, SGD.

Per K and device, the cases run in turn, round after round, in one process (the machine's
speed drifts over minutes; alternating keeps the ratios fair), and the medians are reported:

* ``stacked``: one ``ModelStack`` of K models, one shared batch order (``fit_many``'s step);
* ``stacked_graph`` (GPU): the same step captured as a CUDA graph, replayed per batch;
* ``stacked_cublas`` (GPU): the stack's GEMMs as cuBLAS batched GEMMs (``gemm="cublas"``);
* ``sequential``: K separate fastnn models, one epoch each;
* ``one_model``: a single fastnn model's epoch (the goal on a GPU: K = 64 stacked within 10x);
* ``torch_loop``: K PyTorch models, one eager epoch each;
* ``torch_vmap``: ``torch.func.stack_module_state`` + ``vmap(grad(...))`` over the K models;
* ``jax_vmap``: ``jax.jit`` of ``vmap(grad(...))`` and the SGD update (where JAX is installed).

Each case trains on a slice of ``SLICE_SAMPLES[K]`` samples (whole batches) and is scaled to
60000. ``extra_info`` holds ``<case>_epoch_seconds``, ``models_per_s`` (model-epochs per
second, stacked) and the ratios ``sequential_over_stacked``, ``stacked_over_one_model``,
``torch_loop_over_stacked``, ``torch_vmap_over_stacked``, ``jax_vmap_over_stacked``.
"""

import os
import time

import numpy as np
import pytest
from conftest import N_EPOCH, require_gpu

import fastnn
from fastnn.loop import DeviceData, capture_step

# JAX takes 75% of the GPU's memory at import unless told not to; CuPy and PyTorch share the GPU here
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
SIZES = [784, 128, 64, 10]
BATCH = 128
KS = [1, 4, 16, 64]
SLICE_SAMPLES = {"cpu": {1: 60032, 4: 15104, 16: 6016, 64: 2048}, "gpu": {1: 60032, 4: 30080, 16: 15104, 64: 6016}}


class StackEpoch:
    def __init__(self, device, k, x, y, cuda_graph=False):
        self.stack = fastnn.ModelStack(SIZES, list(range(k)), device=device)
        self.opt = fastnn.make_optimizer("sgd", self.stack, 0.01)
        self.x, self.y = self.stack.to_device(x, y)
        self.rng = np.random.default_rng(0)
        data = DeviceData(self.x, self.y, None, None)
        self.graph = capture_step(self.stack, self.opt, data, BATCH) if cuda_graph else None

    def __call__(self):  # one synchronisation at the end, when it reads the losses
        fastnn.train_epoch(self.stack, self.opt, self.x, self.y, BATCH, self.rng, graph=self.graph)


class SequentialEpochs:
    def __init__(self, device, k, x, y):
        self.models = [fastnn.MLP(SIZES, device=device, seed=i) for i in range(k)]
        self.opts = [fastnn.make_optimizer("sgd", m, 0.01) for m in self.models]
        self.x, self.y = self.models[0].to_device(x, y)
        self.rng = np.random.default_rng(0)

    def __call__(self):
        for m, o in zip(self.models, self.opts):
            fastnn.train_epoch(m, o, self.x, self.y, BATCH, self.rng)


def torch_net(torch, device):
    layers = []
    for i, (fi, fo) in enumerate(zip(SIZES[:-1], SIZES[1:])):
        layers.append(torch.nn.Linear(fi, fo))
        if i < len(SIZES) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers).to(device)


class TorchLoop:
    """K PyTorch models, an eager epoch each, data on the device, one sync at the end."""

    def __init__(self, torch, device, k, x, y):
        self.torch = torch
        self.nets = [torch_net(torch, device) for _ in range(k)]
        self.opts = [torch.optim.SGD(n.parameters(), lr=0.01) for n in self.nets]
        self.x, self.y = torch.as_tensor(x, device=device), torch.as_tensor(y, device=device)
        self.gen = torch.Generator().manual_seed(0)

    def __call__(self):
        torch, n = self.torch, self.x.shape[0]
        total = torch.zeros((), device=self.x.device)
        for net, opt in zip(self.nets, self.opts):
            perm = torch.randperm(n, generator=self.gen).to(self.x.device)
            for s in range(0, n, BATCH):
                idx = perm[s:s + BATCH]
                loss = torch.nn.functional.cross_entropy(net(self.x[idx].float().mul_(1 / 255)), self.y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.detach()
        total.item()


class TorchVmap:
    """``torch.func``: the K models' parameters stacked, ``vmap(grad(loss))`` per batch, SGD in place."""

    def __init__(self, torch, device, k, x, y):
        from torch.func import functional_call, grad, stack_module_state, vmap

        self.torch = torch
        nets = [torch_net(torch, device) for _ in range(k)]
        self.params, self.buffers = stack_module_state(nets)
        base = torch_net(torch, "meta")

        def loss(p, b, xb, yb):
            return torch.nn.functional.cross_entropy(functional_call(base, (p, b), (xb,)), yb)

        self.grads = vmap(grad(loss), in_dims=(0, 0, None, None))
        self.x, self.y = torch.as_tensor(x, device=device), torch.as_tensor(y, device=device)
        self.gen = torch.Generator().manual_seed(0)

    def __call__(self):
        torch, n = self.torch, self.x.shape[0]
        perm = torch.randperm(n, generator=self.gen).to(self.x.device)
        for s in range(0, n, BATCH):
            idx = perm[s:s + BATCH]
            g = self.grads(self.params, self.buffers, self.x[idx].float().mul_(1 / 255), self.y[idx])
            with torch.no_grad():
                torch._foreach_add_(list(self.params.values()), [g[k] for k in self.params], alpha=-0.01)
        next(iter(self.params.values())).sum().item()


class JaxVmap:
    """JAX: one jitted step (gather, ``vmap(grad(loss))`` over the K models, SGD) per batch."""

    def __init__(self, jax, k, x, y):
        jnp = jax.numpy
        self.jax = jax
        keys = jax.random.split(jax.random.PRNGKey(0), len(SIZES) - 1)
        self.params = [(jax.random.normal(kk, (k, fi, fo), jnp.float32) * np.sqrt(2 / fi), jnp.zeros((k, fo)))
                       for kk, fi, fo in zip(keys, SIZES[:-1], SIZES[1:])]
        self.x, self.y = jnp.asarray(x), jnp.asarray(y, jnp.int32)

        def loss(params, xb, yb):
            h = xb
            for W, b in params[:-1]:
                h = jax.nn.relu(h @ W + b)
            z = h @ params[-1][0] + params[-1][1]
            return jnp.mean(jax.nn.logsumexp(z, axis=1) - jnp.take_along_axis(z, yb[:, None], axis=1)[:, 0])

        grads = jax.vmap(jax.grad(loss), in_axes=(0, None, None))

        @jax.jit
        def step(params, idx):
            xb = self.x[idx].astype(jnp.float32) / 255
            g = grads(params, xb, self.y[idx])
            return jax.tree_util.tree_map(lambda p, d: p - 0.01 * d, params, g)

        self.step = step
        self.rng = np.random.default_rng(0)

    def __call__(self):
        n = self.x.shape[0]
        perm = self.jax.numpy.asarray(self.rng.permutation(n))
        for s in range(0, n - n % BATCH, BATCH):  # whole batches: one compiled shape
            self.params = self.step(self.params, perm[s:s + BATCH])
        self.jax.block_until_ready(self.params)


def _optional(name):
    try:
        return __import__(name)
    except ImportError:
        return None


@pytest.mark.parametrize("device", ["cpu", "gpu"])
@pytest.mark.parametrize("k", KS)
def test_stacked_against_sequential_pytorch_and_jax(benchmark, epoch_data, device, k):
    if device == "gpu":
        require_gpu()
        import cupy
    x_all, y_all, what = epoch_data
    n = SLICE_SAMPLES[device][k]
    x = np.concatenate([x_all] * (-(-n // len(x_all))))[:n]
    y = np.concatenate([y_all] * (-(-n // len(y_all))))[:n]
    cases = {"stacked": StackEpoch(device, k, x, y), "sequential": SequentialEpochs(device, k, x, y),
             "one_model": SequentialEpochs(device, 1, x, y)}
    if device == "gpu":
        cases["stacked_graph"] = StackEpoch(device, k, x, y, cuda_graph=True)
        cases["stacked_cublas"] = StackEpoch(fastnn.get_ops("gpu", gemm="cublas"), k, x, y)
    torch, jax = _optional("torch"), _optional("jax")
    tdev = "cuda" if device == "gpu" else "cpu"
    if torch is not None and (device == "cpu" or torch.cuda.is_available()):
        cases["torch_loop"] = TorchLoop(torch, tdev, k, x, y)
        cases["torch_vmap"] = TorchVmap(torch, tdev, k, x, y)
    if jax is not None and (device == "cpu") == (jax.default_backend() == "cpu"):
        cases["jax_vmap"] = JaxVmap(jax, k, x, y)
    sync = cupy.cuda.get_current_stream().synchronize if device == "gpu" else (lambda: None)
    times = {name: [] for name in cases}

    def one_round():
        for name, fn in cases.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append((time.perf_counter() - t0) * N_EPOCH / n)

    benchmark.group = f"stack-{device}"
    benchmark.pedantic(one_round, rounds=3, iterations=1, warmup_rounds=1)
    med = {name: float(np.median(v[1:])) for name, v in times.items()}  # the warm-up round left out
    info = benchmark.extra_info
    info.update({f"{name}_epoch_seconds": s for name, s in med.items()})
    info.update(models=k, samples=n, data=what, slice=f"timed {n} samples, scaled to {N_EPOCH}",
                models_per_s=k / med["stacked"], sequential_over_stacked=med["sequential"] / med["stacked"],
                stacked_over_one_model=med["stacked"] / med["one_model"])
    for name in ("torch_loop", "torch_vmap", "jax_vmap"):
        if name in med:
            info[f"{name}_over_stacked"] = med[name] / med["stacked"]
    if "stacked_graph" in med:  # the goal on an H100: K = 64 within 10x one model's epoch
        info["stacked_graph_over_one_model"] = med["stacked_graph"] / med["one_model"]
