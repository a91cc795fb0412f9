"""One fixed-shape training step captured as a CUDA graph, replayed once per batch.

A batched step is about twenty small kernels; launched one by one from Python each
costs 15-25 microseconds of host time, so on a large GPU the epoch is launch-bound.
Captured once (on a non-default stream, after a warm-up that compiles the kernels
and fills CuPy's memory pool) the whole step is one graph launch.

Everything the step reads or writes lives at a fixed device address:

* ``perm``: the epoch's permutation (a new one is copied in each epoch);
* ``counter``: the step number inside the epoch, read by ``stage`` to copy the
  step's indices out of ``perm`` and advanced by ``record``, which files the
  step's loss sum and hit count into ``losses[counter]`` / ``hits[counter]``;
* the batch workspace, the parameter, gradient and optimizer arenas.

The learning rate is a constant of the graph, which is captured again when it
changes (once per epoch under a schedule); Adam's step count is a device
counter, so its bias correction stays right on replay. The ragged last batch of
an epoch runs uncaptured. CuPy itself is reached through ``model.ops`` and
``fastnn.cuda_ops``, the one module that imports it.
"""

from __future__ import annotations

import functools

import numpy as np

from .errors import ConfigError

_SRC = r"""
extern "C" __global__ void stage(const long long* perm, const int* counter, int B, long long* idx) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < B) idx[i] = perm[(long long)counter[0] * B + i];
}
template <typename T>
__device__ void record(const T* loss, const int* hit, int* counter, T* losses, int* hits) {
    int c = counter[0];
    losses[c] = loss[0];
    hits[c] = hit[0];
    counter[0] = c + 1;
}
extern "C" __global__ void record_f32(const float* l, const int* h, int* c, float* ls, int* hs) {
    record<float>(l, h, c, ls, hs);
}
extern "C" __global__ void record_f64(const double* l, const int* h, int* c, double* ls, int* hs) {
    record<double>(l, h, c, ls, hs);
}
"""


@functools.cache
def _module():
    from .cuda_ops import compile_module

    return compile_module(_SRC)


class GraphEpoch:
    """Train epochs of device data with a captured step. CuPy backend only.

    model, opt: the MLP and its optimizer; x_dev (N, D), y_dev (N,) int32: device
    data; batch: the fixed batch size of the captured step.
    """

    def __init__(self, model, opt, x_dev, y_dev, batch: int):
        if model.ops.name != "gpu":
            raise ConfigError("CUDA graphs need the GPU backend (device='gpu')")
        cp = model.ops.xp
        self.cp, self.model, self.opt, self.x, self.y, self.batch = cp, model, opt, x_dev, y_dev, batch
        n = x_dev.shape[0]
        self.full = n // batch
        if self.full == 0:
            raise ConfigError(f"batch size {batch} is larger than the data ({n} samples)")
        self.steps = -(-n // batch)
        self.perm = cp.zeros(n, cp.int64)
        self.counter = cp.zeros(1, cp.int32)
        self.losses = cp.zeros(self.steps, model.dtype)
        self.hits = cp.zeros(self.steps, cp.int32)
        self.ws = model.workspace(batch)
        self.idx = cp.zeros(batch, cp.int64)
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.graph, self.lr = None, None
        mod = _module()
        self._stage = mod.get_function("stage")
        self._record = mod.get_function("record_f32" if model.dtype == np.float32 else "record_f64")

    def _step(self):
        m, ws, b = self.model, self.ws, self.batch
        self._stage(((b + 255) // 256,), (256,), (self.perm, self.counter, np.int32(b), self.idx))
        m.load_batch(ws, self.x, self.y, self.idx)
        m.forward_backward(ws)
        self.opt.step()
        self._record((1,), (1,), (ws.loss, ws.correct, self.counter, self.losses, self.hits))

    def capture(self):
        """Warm up (the state is saved and restored around it) and capture one step."""
        m, opt = self.model, self.opt
        params = m.params.copy()
        state = {k: v.copy() for k, v in opt.state.items()}
        steps = opt.steps
        with self.stream:
            try:
                self.counter.fill(0)
                for _ in range(2):
                    self._step()
            finally:
                m.params[...] = params
                for k, v in opt.state.items():
                    v[...] = state[k]
                opt.steps = steps
            self.counter.fill(0)
            self.stream.synchronize()
            self.stream.begin_capture()
            try:
                self._step()
            finally:
                self.graph = self.stream.end_capture()
                opt.steps = steps
            self.stream.synchronize()
        self.lr = opt.lr

    def __call__(self, perm_host, progress=None) -> tuple[float, int]:
        """One epoch in the order ``perm_host`` (N,) int64 -> (sum of losses, hits)."""
        opt, m = self.opt, self.model
        if self.graph is None or opt.lr != self.lr:
            self.capture()
        with self.stream:
            self.perm.set(np.ascontiguousarray(perm_host, np.int64), stream=self.stream)
            self.counter.fill(0)
            for _ in range(self.full):
                self.graph.launch(self.stream)
                if progress is not None:
                    progress(self.batch)
            opt.steps += self.full
            if self.steps > self.full:  # the ragged last batch, uncaptured
                idx = self.perm[self.full * self.batch:]
                ws = m.workspace(idx.shape[0])
                m.load_batch(ws, self.x, self.y, idx)
                m.forward_backward(ws, self.losses[self.full:], self.hits[self.full:])
                opt.step()
                if progress is not None:
                    progress(idx.shape[0])
            loss = float(self.losses.astype(np.float64).sum())
            hits = int(self.hits.sum())
        return loss, hits
