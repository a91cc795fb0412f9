"""Mutation proofs for kernels.cu: the emulated workloads fail on each broken twin of the kernels.

**Every barrier.** ``barriers(source)`` lists every ``__syncthreads()`` call of kernels.cu outside
comments (``cuda_emulator.code_only``), in order of occurrence: barrier ``i`` is the ``i``-th call in
the file. ``test_every_barrier_is_needed`` is parametrized over ``range(len(barriers(kernels.cu)))``
when the tests are collected, so a barrier added to kernels.cu is covered without editing this file
(and must guard shared data that ``WORKLOAD`` touches, or this test fails for it);
``test_the_barrier_enumeration_finds_every_call`` checks that the enumeration finds as many calls as
the text names. Mutant ``i`` is kernels.cu with barrier ``i`` replaced by an empty statement (on the
same line), compiled by the emulator as kernels.cu is; ``WORKLOAD`` must fail on it, by a race the
emulator reports or by results unequal to the NumPy oracle, and passes on kernels.cu itself.

**Tile-aligned widths.** A weight_grad that drops the bias gradient exactly when 16 divides the
fan-in (the bias row then has a row tile of its own) passes ragged fan-ins and fails 784, 256, 128.
"""

import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from test_backend import check_layer_gemms

from fastnn.backends import Ops

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler (c++) for the CUDA emulator")

import cuda_emulator  # noqa: E402

KERNELS_CU = Path(__file__).resolve().parents[1] / "fastnn" / "backends" / "kernels.cu"
SOURCE = KERNELS_CU.read_text()
SEEDS = (0, 1, 2)
BARRIER = re.compile(r"\b__syncthreads\s*\(\s*\)\s*;")
BIAS_ROW = "else if (i == K) gb[j] = acc;"  # weight_grad's store of the bias gradient
BIAS_DROPPED_WHEN_ALIGNED = "else if (i == K && K % TILE) gb[j] = acc;"


def barriers(source: str) -> list[tuple[int, int]]:
    """The (start, end) of each ``__syncthreads();`` call of ``source`` outside comments, in order."""
    return [m.span() for m in BARRIER.finditer(cuda_emulator.code_only(source))]


def without_barrier(source: str, index: int) -> str:
    start, end = barriers(source)[index]
    return source[:start] + "/* barrier removed */;" + source[end:]


BARRIERS = barriers(SOURCE)


def mutant_sources() -> dict:
    mutants = {f"barrier {i}": without_barrier(SOURCE, i) for i in range(len(BARRIERS))}
    assert SOURCE.count(BIAS_ROW) == 1
    mutants["bias dropped when aligned"] = SOURCE.replace(BIAS_ROW, BIAS_DROPPED_WHEN_ALIGNED)
    return mutants


@pytest.fixture(scope="module")
def mutants(tmp_path_factory) -> dict:
    """Each mutant's kernels.cu (a path), compiled by the emulator beforehand, two at a time."""
    sources = mutant_sources()
    with ThreadPoolExecutor(max_workers=2) as pool:  # the compiler runs as a subprocess: threads suffice
        list(pool.map(cuda_emulator.compile_kernels, sources.values()))
    folder = tmp_path_factory.mktemp("mutants")
    paths = {}
    for i, (name, text) in enumerate(sources.items()):
        paths[name] = folder / f"mutant{i}.cu"
        paths[name].write_text(text)
    return paths


def gpu_ops_of(source_path: Path, monkeypatch):
    """A ``CupyOps`` of the emulated GPU whose kernels are compiled from ``source_path``."""
    from fastnn.backends import cupy_ops

    monkeypatch.setattr(cupy_ops, "KERNELS_CU", source_path)
    cupy_ops.module.cache_clear()
    cupy_ops.kernel.cache_clear()
    return cupy_ops.CupyOps()  # not get_ops("gpu"): its self-check would replace a wrong kernel


def loss_results(ops, z, y, mse: int) -> list[np.ndarray]:
    """The gradient, loss, hits and probabilities of z (B, C) or a stack's (K, B, C)."""
    models = z.shape[:-2] or (1,)
    grad, loss, hits = ops.xp.zeros(z.shape), ops.xp.zeros(models), ops.xp.zeros(models, np.int32)
    (ops.mse if mse else ops.xent)(z, y, grad, loss, hits)
    proba = ops.xp.empty(z.shape)
    ops.probabilities(z, "mse" if mse else "xent", proba)
    return [ops.to_host(a) for a in (grad, loss, hits, proba)]


def WORKLOAD(ops) -> None:
    """The kernels with __shared__ memory, against the generic ``Ops``: the layer GEMMs at a ragged and
    a tile-aligned fan-in (over one tile of the summed axis), and the losses of 300 rows (more than
    the loss block's 256 threads), one model and a stack of two."""
    check_layer_gemms(ops, 37, 45, 21)
    check_layer_gemms(ops, 32, 128, 16)
    rng, oracle = np.random.default_rng(7), Ops(np)
    for shape in ((300, 10), (2, 300, 10)):
        z, y = rng.random(shape), rng.integers(0, 10, 300).astype(np.int32)
        for mse in (0, 1):
            got = loss_results(ops, ops.xp.asarray(z), ops.xp.asarray(y), mse)
            want = loss_results(oracle, z, y, mse) if len(shape) == 2 else [
                np.stack(parts) for parts in zip(*(loss_results(oracle, zk, y, mse) for zk in z))]
            for g, w in zip(got, want):
                np.testing.assert_allclose(g.reshape(w.shape), w, rtol=1e-12, atol=1e-15)


def test_the_barrier_enumeration_finds_every_call():
    code = cuda_emulator.code_only(SOURCE)
    assert len(BARRIERS) == len(re.findall(r"__syncthreads", code)) > 0
    for i in range(len(BARRIERS)):
        mutant = without_barrier(SOURCE, i)
        assert mutant.count("\n") == SOURCE.count("\n") and len(barriers(mutant)) == len(BARRIERS) - 1


def test_the_workload_passes_on_kernels_cu(emulated_gpu, monkeypatch):
    WORKLOAD(gpu_ops_of(KERNELS_CU, monkeypatch))


@pytest.mark.parametrize("index", range(len(BARRIERS)))
def test_every_barrier_is_needed(emulated_gpu, mutants, monkeypatch, index):
    """In every one of several orders of the threads (seeds)."""
    line = SOURCE.count("\n", 0, BARRIERS[index][0]) + 1
    ops = gpu_ops_of(mutants[f"barrier {index}"], monkeypatch)
    for seed in SEEDS:
        emulated_gpu.seed_emulator(seed)
        with pytest.raises((RuntimeError, AssertionError)) as failure:
            WORKLOAD(ops)
        print(f"barrier {index} (kernels.cu:{line}) removed, seed {seed}: {failure.typename}: "
              f"{str(failure.value).splitlines()[0]}")


@pytest.mark.parametrize("b,m,n", [(33, 784, 32), (32, 256, 24), (16, 128, 10)])
def test_a_bias_gradient_dropped_at_tile_aligned_fan_ins_is_caught(emulated_gpu, mutants, monkeypatch, b, m, n):
    ops = gpu_ops_of(mutants["bias dropped when aligned"], monkeypatch)
    check_layer_gemms(ops, 37, 45, 21)  # the ragged fan-ins of the older tests pass on this mutant
    check_layer_gemms(ops, 1, 17, 16)
    with pytest.raises(AssertionError, match=f"bias gradient of {b}x{m} -> {n}"):
        check_layer_gemms(ops, b, m, n)
