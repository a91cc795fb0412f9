"""Mutation proofs for kernels.cu and conv_kernels.cu: the emulated workloads fail on each broken twin
of the kernels.

**Every barrier.** ``barriers(source)`` lists every ``__syncthreads()`` call of a CUDA file outside
comments (``cuda_emulator.code_only``), in order of occurrence: barrier ``i`` is the ``i``-th call in
the file. ``test_every_barrier_is_needed`` is parametrized over ``range(len(barriers(kernels.cu)))``
and ``test_every_conv_barrier_is_needed`` over ``range(len(barriers(conv_kernels.cu)))`` when the
tests are collected, so a barrier added to either file is covered without editing this file (and
must guard shared data that the file's workload touches, or its test fails);
``test_the_barrier_enumeration_finds_every_call`` checks that the enumeration finds as many calls as
each text names. Mutant ``i`` is the file with barrier ``i`` replaced by an empty statement (on the
same line), compiled by the emulator with the other file as ``cupy_ops.source()`` joins them;
``WORKLOAD`` (kernels.cu) or ``CONV_WORKLOAD`` (conv_kernels.cu) must fail on it, by a race the
emulator reports or by results unequal to the NumPy oracle, and passes on the files themselves.

**Tile-aligned widths.** A weight_grad that drops the bias gradient exactly when 16 divides the
fan-in (the bias row then has a row tile of its own) passes ragged fan-ins and fails 784, 256, 128.

**Off-by-one indices in conv_kernels.cu.** ``CONV_INDEX_MUTANTS``: small edits (one token, or
``- 1`` added) of the index arithmetic of the convolutions' loaders (the patch's row and padding, the
bias row of ones, the transposed gather of the input gradient), of the weight gradient's split (a
part's end, the partial sums' stride), of pooling and its gradient, and of the translation's hash,
each applied by exact replacement of a text that occurs once in conv_kernels.cu (the fixture fails if
the file changes under it). ``CONV_WORKLOAD`` fails on each by results unequal to the oracle (an
AssertionError, not a race), first in the operation whose kernel holds the edit. Its sizes are what
catches them: padding 1 and 2, kernels 3 and 5, ragged tiles, the weight gradient in one part and in
parts of 10 rows, pool windows that do not divide the image; the pooling gradient's inputs are the
first B images of arrays of B + 1, so that a read one row of windows too far (past the last image)
reads a value that changes the result instead of the emulator's guard page (which would kill the
test process).
"""

import difflib
import re
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from test_backend import check_layer_gemms
from test_conv_cuda import conv_arrays

from fastnn.backends import Ops

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler (c++) for the CUDA emulator")

import cuda_emulator  # noqa: E402

KERNELS_CU = Path(__file__).resolve().parents[1] / "fastnn" / "backends" / "kernels.cu"
CONV_KERNELS_CU = KERNELS_CU.with_name("conv_kernels.cu")
SOURCE = KERNELS_CU.read_text()
CONV_SOURCE = CONV_KERNELS_CU.read_text()
ORACLE = Ops(np)
SEEDS = (0, 1, 2)
BARRIER = re.compile(r"\b__syncthreads\s*\(\s*\)\s*;")
BIAS_ROW = "else if (i == K) gb[j] = acc;"  # weight_grad's store of the bias gradient
BIAS_DROPPED_WHEN_ALIGNED = "else if (i == K && K % TILE) gb[j] = acc;"

# id: (text of conv_kernels.cu, its replacement, the operation of CONV_WORKLOAD whose results then differ)
CONV_INDEX_MUTANTS = {
    "patch-row-from-kk-mod-k": ("(int)(t % s.Ho) + kk / s.k - s.pad", "(int)(t % s.Ho) + kk % s.k - s.pad",
                                "conv_act"),
    "patch-column-pad-added": ("ox + kk % s.k - s.pad", "ox + kk % s.k + s.pad", "conv_act"),
    "input-grad-row-pad-subtracted": ("(int)(t % s.H) + s.pad - kk / s.k", "(int)(t % s.H) - s.pad - kk / s.k",
                                      "conv_input_grad"),
    "bias-row-read-as-patch": ("return r < P ?", "return r <= P ?", "conv_param_grads"),
    "bias-row-not-stored": ("if (i <= P && j < s.N)", "if (i < P && j < s.N)", "conv_param_grads"),
    "split-part-one-row-short": ("? m0 + chunk : M", "? m0 + chunk - 1 : M", "conv_param_grads"),
    "partial-sums-stride-one-row-short": ("part[z * n + e]", "part[z * PN + e]", "conv_param_grads"),
    "pool-window-row-q-mod-p": ("(long long)(q / p) * W", "(long long)(q % p) * W", "maxpool"),
    "pool-gradient-row-past-the-windows": ("y < Ho * p", "y <= Ho * p", "maxpool_backward"),
    "translation-dx-drawn-as-dy": ("h / n % n", "h % n", "translate"),
}


def barriers(source: str) -> list[tuple[int, int]]:
    """The (start, end) of each ``__syncthreads();`` call of ``source`` outside comments, in order."""
    return [m.span() for m in BARRIER.finditer(cuda_emulator.code_only(source))]


def without_barrier(source: str, index: int) -> str:
    start, end = barriers(source)[index]
    return source[:start] + "/* barrier removed */;" + source[end:]


def replaced_once(source: str, old: str, new: str) -> str:
    """``source`` with its one occurrence of ``old`` replaced by ``new`` (AssertionError unless exactly one)."""
    assert source.count(old) == 1, f"{old!r} occurs {source.count(old)} times in the CUDA source, not once"
    return source.replace(old, new)


def module_source(kernels: str, conv: str) -> str:
    """What ``cupy_ops.source()`` compiles from these texts of kernels.cu and conv_kernels.cu
    (``gpu_ops_of`` checks that it still is: the mutants are compiled from it beforehand)."""
    return f'{kernels}\n#line 1 "conv_kernels.cu"\n{conv}'


ORIGINALS = (KERNELS_CU, CONV_KERNELS_CU)
BARRIERS = barriers(SOURCE)
CONV_BARRIERS = barriers(CONV_SOURCE)


def mutant_sources() -> dict:
    """Each mutant's (kernels.cu, conv_kernels.cu) texts, one of them mutated."""
    mutants = {f"barrier {i}": (without_barrier(SOURCE, i), CONV_SOURCE) for i in range(len(BARRIERS))}
    mutants["bias dropped when aligned"] = (replaced_once(SOURCE, BIAS_ROW, BIAS_DROPPED_WHEN_ALIGNED), CONV_SOURCE)
    for i in range(len(CONV_BARRIERS)):
        mutants[f"conv barrier {i}"] = (SOURCE, without_barrier(CONV_SOURCE, i))
    for name, (old, new, _) in CONV_INDEX_MUTANTS.items():
        mutants[name] = (SOURCE, replaced_once(CONV_SOURCE, old, new))
    return mutants


@pytest.fixture(scope="module")
def mutants(tmp_path_factory) -> dict:
    """Each mutant's (kernels.cu, conv_kernels.cu) paths (the original's path for the file it leaves as is);
    the module of every mutant, and of the originals, compiled by the emulator beforehand, two at a time."""
    sources = mutant_sources()
    with ThreadPoolExecutor(max_workers=2) as pool:  # the compiler runs as a subprocess: threads suffice
        list(pool.map(lambda texts: cuda_emulator.compile_kernels(module_source(*texts)),
                      [(SOURCE, CONV_SOURCE), *sources.values()]))
    folder = tmp_path_factory.mktemp("mutants")
    paths = {}
    for i, (name, texts) in enumerate(sources.items()):
        paths[name] = []
        for path, text in zip(ORIGINALS, texts):
            if text != path.read_text():
                path = folder / f"mutant{i}-{path.name}"
                path.write_text(text)
            paths[name].append(path)
    return paths


def gpu_ops_of(paths, monkeypatch):
    """A ``CupyOps`` of the emulated GPU whose kernels are compiled from ``paths`` (kernels.cu, conv_kernels.cu)."""
    from fastnn.backends import cupy_ops

    monkeypatch.setattr(cupy_ops, "KERNELS_CU", paths[0])
    monkeypatch.setattr(cupy_ops, "CONV_KERNELS_CU", paths[1])
    assert cupy_ops.source() == module_source(*(p.read_text() for p in paths)), "cupy_ops.source() changed"
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


CONV_CASES = [  # (B, H, W, C_in, C_out, k, pad)
    (3, 6, 7, 2, 17, 3, 1),  # 126 output rows (8 tiles, the last ragged), 18 patch columns (2 tiles), 17 outputs
    (2, 7, 5, 3, 4, 5, 2),  # k 5, pad 2: 75 patch columns, a 7 x 5 image
]
SPLIT_ROWS = (512, 10)  # the weight gradient's summed rows in one part, and in parts of 10 (not a tile)
POOLS = [((3, 7, 9, 2), 2, False), ((2, 8, 7, 3), 3, True)]  # (shape, p, ties): windows that do not divide H, W
TRANSLATION = ((5, 6, 7, 2), 2, 3, (0, 11))  # shape, limit, seed, steps


def on(ops, host: dict, call, outputs) -> list[np.ndarray]:
    """``call(ops, arrays)`` on ops's copies of the host arrays; the outputs, on the host."""
    a = {k: ops.xp.asarray(v.copy()) for k, v in host.items()}
    call(ops, a)
    return [ops.to_host(a[k]).copy() for k in outputs]


def equal(got: list, want: list, labels: list, tol: float) -> None:
    for g, w, label in zip(got, want, labels):
        assert g.dtype == w.dtype, label
        if tol:
            np.testing.assert_allclose(g, w, rtol=tol, atol=tol, err_msg=label)
        else:
            np.testing.assert_array_equal(g, w, err_msg=label)


def check(ops, what: str, host: dict, call, outputs, tol=1e-12) -> None:
    equal(on(ops, host, call, outputs), on(ORACLE, host, call, outputs), [f"{what}: {o}" for o in outputs], tol)


def pool_results(ops, x, d, arg0, p) -> list[np.ndarray]:
    """maxpool and maxpool_backward of x with d, where d and arg (from arg0) are the first B images of
    arrays of B + 1: a read one row of windows past the last image reads image B, not past the array."""
    xp, B = ops.xp, x.shape[0]
    x_, d_, arg = (xp.asarray(a.copy()) for a in (x, d, arg0))
    out, gx = xp.asarray(np.full(arg0[:B].shape, np.nan)), xp.asarray(np.full(x.shape, np.nan))
    ops.maxpool(x_, p, out, arg[:B])
    ops.maxpool_backward(d_[:B], arg[:B], p, gx)
    return [ops.to_host(a).copy() for a in (out, arg, gx)]


def CONV_WORKLOAD(ops, monkeypatch) -> None:
    """conv_kernels.cu against the generic ``Ops``, float64: per ``CONV_CASES`` convolution, conv_act
    (linear), conv_param_grads with the summed rows in one part and in parts of 10 (``CONV_SPLIT_ROWS``),
    conv_input_grad (within 1e-12); max pooling and its gradient (windows of 2 and 3 that do not divide
    the image, one case with ties) and the translation of 5 images at two steps, bit for bit."""
    cupy_ops = sys.modules[type(ops).__module__]
    for case in CONV_CASES:
        k, pad = case[5], case[6]
        host = conv_arrays(case, np.float64)
        check(ops, f"conv_act {case}", host,
              lambda o, a, pad=pad: o.conv_act(a["x"], a["W"], a["b"], a["cols"], a["out"], "linear", pad), ["out"])

        def grads(o, a, k=k, pad=pad):
            if o is ORACLE:  # the generic version reads the patches
                o.im2col(a["x"], k, pad, a["cols"])
            o.conv_param_grads(a["x"], a["cols"], a["d"], a["gW"], a["gb"], pad)

        for rows in SPLIT_ROWS:
            monkeypatch.setattr(cupy_ops, "CONV_SPLIT_ROWS", rows)
            check(ops, f"conv_param_grads {case} in parts of {rows} rows", host, grads, ["gW", "gb"])
        check(ops, f"conv_input_grad {case}", host,
              lambda o, a, pad=pad: o.conv_input_grad(a["d"], a["W"], a["cols"], a["gx"], pad), ["gx"])
    rng = np.random.default_rng(5)
    for shape, p, ties in POOLS:
        x = rng.integers(-2, 3, shape).astype(float) if ties else rng.standard_normal(shape)
        more = (shape[0] + 1, shape[1] // p, shape[2] // p, shape[3])
        d, arg0 = rng.standard_normal(more), rng.integers(0, p * p, more).astype(np.int8)
        labels = [f"{op} {shape} p={p}: {o}" for op, o in (("maxpool", "out"), ("maxpool", "arg"),
                                                             ("maxpool_backward", "gx"))]
        equal(pool_results(ops, x, d, arg0, p), pool_results(ORACLE, x, d, arg0, p), labels, 0)
    shape, limit, seed, steps = TRANSLATION
    for step in steps:
        host = {"x": rng.standard_normal(shape), "out": np.full(shape, np.nan), "step": np.array([step], np.int32)}
        check(ops, f"translate {shape} limit={limit} step={step}", host,
              lambda o, a: o.translate(a["x"], a["out"], limit, seed, a["step"], -0.5), ["out"], 0)


@pytest.mark.parametrize("source", [SOURCE, CONV_SOURCE], ids=["kernels.cu", "conv_kernels.cu"])
def test_the_barrier_enumeration_finds_every_call(source):
    code = cuda_emulator.code_only(source)
    found = barriers(source)
    assert len(found) == len(re.findall(r"__syncthreads", code)) > 0
    for i in range(len(found)):
        mutant = without_barrier(source, i)
        assert mutant.count("\n") == source.count("\n") and len(barriers(mutant)) == len(found) - 1


def test_the_workload_passes_on_kernels_cu(emulated_gpu, monkeypatch):
    WORKLOAD(gpu_ops_of(ORIGINALS, monkeypatch))


@pytest.mark.parametrize("index", range(len(BARRIERS)))
def test_every_barrier_is_needed(emulated_gpu, mutants, monkeypatch, index):
    """In every one of several orders of the threads (seeds)."""
    where = f"kernels.cu:{SOURCE.count(chr(10), 0, BARRIERS[index][0]) + 1}"
    ops = gpu_ops_of(mutants[f"barrier {index}"], monkeypatch)
    assert_fails_in_every_order(emulated_gpu, lambda: WORKLOAD(ops), f"barrier {index} ({where}) removed")


def assert_fails_in_every_order(emulated_gpu, workload, what: str) -> None:
    """``workload()`` raises (a race the emulator reports, or a wrong result) under each seed of SEEDS."""
    for seed in SEEDS:
        emulated_gpu.seed_emulator(seed)
        with pytest.raises((RuntimeError, AssertionError)) as failure:
            workload()
        print(f"{what}, seed {seed}: {failure.typename}: {str(failure.value).splitlines()[0]}")


@pytest.mark.parametrize("b,m,n", [(33, 784, 32), (32, 256, 24), (16, 128, 10)])
def test_a_bias_gradient_dropped_at_tile_aligned_fan_ins_is_caught(emulated_gpu, mutants, monkeypatch, b, m, n):
    ops = gpu_ops_of(mutants["bias dropped when aligned"], monkeypatch)
    check_layer_gemms(ops, 37, 45, 21)  # the ragged fan-ins of the older tests pass on this mutant
    check_layer_gemms(ops, 1, 17, 16)
    with pytest.raises(AssertionError, match=f"bias gradient of {b}x{m} -> {n}"):
        check_layer_gemms(ops, b, m, n)


def test_the_conv_workload_passes_on_conv_kernels_cu(emulated_gpu, monkeypatch):
    """In every one of several orders of the threads (seeds)."""
    ops = gpu_ops_of(ORIGINALS, monkeypatch)
    for seed in SEEDS:
        emulated_gpu.seed_emulator(seed)
        CONV_WORKLOAD(ops, monkeypatch)


@pytest.mark.parametrize("index", range(len(CONV_BARRIERS)))
def test_every_conv_barrier_is_needed(emulated_gpu, mutants, monkeypatch, index):
    """In every one of several orders of the threads (seeds)."""
    where = f"conv_kernels.cu:{CONV_SOURCE.count(chr(10), 0, CONV_BARRIERS[index][0]) + 1}"
    ops = gpu_ops_of(mutants[f"conv barrier {index}"], monkeypatch)
    assert_fails_in_every_order(emulated_gpu, lambda: CONV_WORKLOAD(ops, monkeypatch),
                                f"barrier {index} ({where}) removed")


@pytest.mark.parametrize("name", CONV_INDEX_MUTANTS)
def test_each_index_mutant_is_one_small_edit(name):
    """Its text occurs once in conv_kernels.cu, within one line, and the replacement is one contiguous
    change of at most two tokens (e.g. ``<`` to ``<=``, ``- 1`` inserted, ``/ n`` dropped)."""
    old, new, _ = CONV_INDEX_MUTANTS[name]
    assert CONV_SOURCE.count(old) == 1 and "\n" not in old + new
    tokens = re.compile(r"\w+|[<>=!]=|\S")
    a, b = tokens.findall(old), tokens.findall(new)
    changes = [(a[i1:i2], b[j1:j2]) for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b).get_opcodes()
               if op != "equal"]
    assert len(changes) == 1 and 0 < max(map(len, changes[0])) <= 2, changes


@pytest.mark.parametrize("name", CONV_INDEX_MUTANTS)
def test_each_off_by_one_index_is_caught(emulated_gpu, mutants, monkeypatch, name):
    """The workload's results differ from the oracle's (an AssertionError, not a race or a crash), first
    in the operation whose kernel holds the mutation."""
    op = CONV_INDEX_MUTANTS[name][2]
    ops = gpu_ops_of(mutants[name], monkeypatch)
    with pytest.raises(AssertionError, match=rf"\b{op} ") as failure:
        CONV_WORKLOAD(ops, monkeypatch)
    print(f"{name}: {' '.join(str(failure.value).split())[:200]}")
