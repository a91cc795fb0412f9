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

For a stack of models (``fastnn.stack``) the same holds with a model axis: ``perm``
is (K, n) with one order per model, losses and hits are (steps, K).

The optimizer's hyperparameters and the input preprocessing are constants of the
graph, which is captured again when any of them changes (the learning rate once
per epoch under a schedule; a stack's per-model hyperparameters are device arrays,
and a new array is a change); Adam's step count is a device counter, so its bias
correction stays right on replay. The graph's stream waits for the work queued
on the caller's stream before each capture and epoch, and the caller's stream
waits for the graph's afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import cupy as cp
import numpy as np

from .backends.cupy_ops import kernel

if TYPE_CHECKING:
    from .model import MLP, Workspace
    from .optim import Optimizer


# step(ws, idx): one training step on rows idx of the device data, batch buffers in ws
StepFn = Callable[["Workspace", object], None]


class CapturedStep:
    """The training step at batch size ``batch`` over ``n`` device samples, as a CUDA graph.

    step: the eager step (``fastnn.loop.train_step`` bound to the model, optimizer
    and data); model, opt: what it updates (their state is restored after the warm-up);
    per_model: a stack trained with one batch order per model.
    """

    def __init__(self, step: StepFn, model: MLP, opt: Optimizer, n: int, batch: int, per_model: bool = False):
        self.step, self.model, self.opt, self.batch, self.n = step, model, opt, batch, n
        steps = -(-n // batch)
        lead = model.stack if per_model else ()
        self.perm = cp.zeros(lead + (n,), cp.int64)
        self.counter = cp.zeros(1, cp.int32)
        self.losses = cp.zeros((steps,) + model.stack, model.dtype)
        self.hits = cp.zeros((steps,) + model.stack, cp.int32)
        self.idx = cp.zeros(lead + (batch,), cp.int64)
        self.ws = model.workspace(batch, per_model)  # held here: the graph writes into these buffers
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.graph, self.key = None, None
        self._stage = kernel("stage")  # idx = perm[counter * batch:][:batch]
        self._record = kernel("record_f32" if model.dtype == np.float32 else "record_f64")

    def _key(self) -> tuple:
        """What the captured kernels hold as constants, or the device arrays they read (a stack's
        per-model hyperparameters); a change means a new capture."""
        return self.opt.hyperparameters() + self.model.preprocessing.astuple()

    def _stale(self) -> bool:
        """Whether the graph was captured with other constants or other arrays than now."""
        if self.graph is None:
            return True
        now = self._key()
        return len(now) != len(self.key) or any(
            a is not b and (isinstance(a, cp.ndarray) or isinstance(b, cp.ndarray) or a != b)
            for a, b in zip(now, self.key))

    def _captured_region(self) -> None:
        b, ws, total = self.batch, self.ws, self.idx.size
        self._stage(((total + 255) // 256,), (256,), (self.perm, self.counter, np.int32(b), np.int64(self.n),
                                                      np.int32(total), self.idx))
        self.step(ws, self.idx)
        self._record((1,), (1,), (ws.loss, ws.hits, self.counter, np.int32(ws.loss.size), self.losses, self.hits))

    def capture(self) -> None:
        """Warm up twice on batch 0 (parameters, optimizer state and the model's step counter are
        saved and restored around it), then capture."""
        m, opt = self.model, self.opt
        params, state, steps = m.params.copy(), {k: v.copy() for k, v in opt.state.items()}, opt.steps
        model_step = m.step.copy()  # the dropout counter, advanced by the warm-up too
        self.graph = None
        outer = cp.cuda.get_current_stream()
        self.stream.wait_event(outer.record())
        with self.stream:
            try:
                for _ in range(2):  # compiles every kernel and fills the memory pool
                    self.counter.fill(0)  # both read perm[:batch] and write losses[0]: in bounds
                    self._captured_region()
            finally:
                m.params[...] = params
                m.step[...] = model_step
                for k, v in opt.state.items():
                    v[...] = state[k]
                opt.steps = steps
            self.counter.fill(0)
            self.stream.synchronize()
            self.stream.begin_capture()
            try:
                self._captured_region()
            except BaseException:
                with contextlib.suppress(Exception):  # the step's own error is the one to report
                    self.stream.end_capture()
                raise
            finally:
                opt.steps = steps
            graph = self.stream.end_capture()
            self.stream.synchronize()
        outer.wait_event(self.stream.record())
        self.graph, self.key = graph, self._key()

    @contextlib.contextmanager
    def epoch(self, order: np.ndarray):
        """Run an epoch in the order ``order`` (N,) int64 on the graph's stream.

        Yields ``(perm, losses, hits)``: the device permutation and the per-step
        loss sums and hit counts, all at the addresses the graph was captured with
        (order (K, N) and losses (steps, K) for a stack).
        """
        if self._stale():
            self.capture()
        outer = cp.cuda.get_current_stream()
        self.stream.wait_event(outer.record())
        try:
            with self.stream:
                self.perm.set(np.ascontiguousarray(order, np.int64), stream=self.stream)
                self.counter.fill(0)
                yield self.perm, self.losses, self.hits
        finally:  # also after an error or Ctrl-C: later work on the caller's stream waits for the graph's
            outer.wait_event(self.stream.record())

    def replay(self) -> None:
        """One captured step: the next full batch of the epoch."""
        self.graph.launch(self.stream)
        self.opt.steps += 1
