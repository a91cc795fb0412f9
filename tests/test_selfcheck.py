"""The GPU self-check (fastnn/backends/selfcheck.py) on the CUDA emulator: every fused kernel
passes; a wrong one is caught, warned about by name and replaced by the generic path; the results
are cached per device, driver and fastnn version, in a file written atomically."""

import json
import warnings

import numpy as np
import pytest

import fastnn
from fastnn.backends import selfcheck
from fastnn.backends.ops import Ops

KERNELS = ["act_backward", "adam", "bias_act", "conv_act", "conv_input_grad", "conv_param_grads", "count",
           "gather_labels", "gather_rows", "input_grad", "linear_act", "maxpool", "maxpool_backward", "momentum", "mse",
           "param_grads", "probabilities", "sgd", "translate", "xent"]


@pytest.fixture
def gpu(emulated_gpu, tmp_path, monkeypatch):
    """The emulated GPU, with no self-check results in this process yet and the cache under tmp_path."""
    monkeypatch.setattr(selfcheck, "_DONE", {})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("FASTNN_SELFCHECK", raising=False)
    return emulated_gpu


def name_the_device(cp, monkeypatch, name=b"Emulated H200", driver=13000):
    """Give the fake CuPy's runtime what a real one tells: the device's name, driver and runtime versions."""
    rt = cp.cuda.runtime
    monkeypatch.setattr(rt, "getDevice", lambda: 0, raising=False)
    monkeypatch.setattr(rt, "getDeviceProperties", lambda i: {"name": name}, raising=False)
    monkeypatch.setattr(rt, "driverGetVersion", lambda: driver, raising=False)
    monkeypatch.setattr(rt, "runtimeGetVersion", lambda: 12080, raising=False)


def cache_files(tmp_path):
    return sorted((tmp_path / "cache" / "fastnn" / "gpu-selfcheck").glob("*"))


def perturb_launch(monkeypatch, kernel: str, out_arg: int, dtype=None, by=1e-3):
    """Make the CUDA kernel ``kernel`` (of ``dtype``, or both) add ``by`` to its output argument
    ``out_arg`` after each launch: a kernel that computes a wrong result, the method code unchanged."""
    from fastnn.backends import cupy_ops

    real = cupy_ops._typed

    def typed(name, dt):
        k = real(name, dt)
        if name != kernel or (dtype is not None and dt != dtype):
            return k

        def wrong(grid, block, args):
            k(grid, block, args)
            args[out_arg][...] += by
        return wrong

    monkeypatch.setattr(cupy_ops, "_typed", typed)


def test_the_kernels_checked_are_those_the_gpu_backend_overrides(gpu):
    from fastnn.backends.cupy_ops import CupyOps

    assert selfcheck.fused_kernels(CupyOps) == KERNELS
    assert sorted(selfcheck.CASES) == KERNELS  # each has its cases

    class MoreOps(CupyOps):
        def matmul(self, a, b, out):
            raise AssertionError("never called")

    assert "matmul" in selfcheck.fused_kernels(MoreOps)  # a new override is found, and without cases it fails
    [r] = selfcheck.run(MoreOps(), ("float64",), ["matmul"])
    assert not r.ok and "no self-check case" in r.case


@pytest.mark.parametrize("gemm", ["fastnn", "cublas"])
def test_every_kernel_passes_on_the_emulated_gpu(gpu, gemm):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops = fastnn.get_ops("gpu", gemm=gemm)
    results = selfcheck._DONE[next(iter(selfcheck._DONE))]
    assert [(r.kernel, r.dtype) for r in results] == [(k, d) for d in ("float32", "float64") for k in KERNELS]
    assert all(r.ok for r in results), selfcheck.table(results)
    assert not set(vars(ops)) & set(KERNELS)  # nothing replaced
    f32 = [r for r in results if r.dtype == "float32"]
    assert max(r.max_rel for r in f32) < selfcheck.TOLERANCES["float32"][0]
    assert f"{2 * len(KERNELS)} of {2 * len(KERNELS)} checks passed" in selfcheck.table(results)


def test_a_wrong_kernel_is_caught_warned_about_and_replaced_by_the_generic_path(gpu, monkeypatch):
    perturb_launch(monkeypatch, "linear_act", 3, dtype=np.float32)  # out += 1e-3, in float32 only
    with pytest.warns(RuntimeWarning, match=r"CUDA kernel linear_act differs .*float32: max abs error 0\.001"):
        ops = fastnn.get_ops("gpu")
    results = next(iter(selfcheck._DONE.values()))
    assert {(r.kernel, r.dtype) for r in results if not r.ok} == {("linear_act", "float32")}
    assert "replaced by the generic path: linear_act" in selfcheck.table(results)
    assert "linear_act" in vars(ops)  # this instance runs the generic method, for both dtypes
    rng = np.random.default_rng(0)
    a, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((5, 7), (7, 3), (3,)))
    got, generic, kernel = (ops.xp.empty((5, 3), np.float32) for _ in range(3))
    ops.linear_act(ops.asarray(a), ops.asarray(w), ops.asarray(b), got, "tanh")
    Ops.linear_act(ops, ops.asarray(a), ops.asarray(w), ops.asarray(b), generic, "tanh")
    type(ops).linear_act(ops, ops.asarray(a), ops.asarray(w), ops.asarray(b), kernel, "tanh")
    np.testing.assert_array_equal(ops.to_host(got), ops.to_host(generic))  # the generic result
    want = np.empty((5, 3), np.float32)
    Ops(np).linear_act(a, w, b, want, "tanh")
    np.testing.assert_allclose(ops.to_host(got), want, rtol=1e-6, atol=1e-7)
    assert np.abs(ops.to_host(kernel) - want).max() > 5e-4  # the kernel is still wrong
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fastnn.get_ops("gpu") is ops  # once per process: no second check, no second warning


@pytest.mark.parametrize("kernel, out_arg, method", [
    ("weight_grad", 2, "param_grads"), ("input_grad", 3, "input_grad"), ("row_loss", 3, "xent"),
    ("gather_rows_u8", -1, "gather_rows"), ("adam_stack", 0, "adam"), ("bias_act", 0, "bias_act")])
def test_each_kernel_off_by_a_little_fails(gpu, monkeypatch, kernel, out_arg, method):
    perturb_launch(monkeypatch, kernel, out_arg, by=1e-4)
    from fastnn.backends.cupy_ops import CupyOps

    results = selfcheck.run(CupyOps(), kernels=[method])
    assert [r.kernel for r in results] == [method, method]
    for r in results:  # float32 and float64
        assert not r.ok and r.max_abs == pytest.approx(1e-4, rel=0.1), r


@pytest.mark.parametrize("kernel, axis", [("linear_act", 0), ("input_grad", 1)])
def test_a_kernel_wrong_only_in_a_partial_tile_is_caught(gpu, monkeypatch, kernel, axis):
    """The cases have ragged tiles: a GEMM that is wrong only in its last, partial tile of rows (or columns) fails."""
    from fastnn.backends import cupy_ops

    real = cupy_ops._typed

    def typed(name, dt):
        k = real(name, dt)

        def wrong(grid, block, args):
            k(grid, block, args)
            n = args[3].shape[axis]
            if n % cupy_ops.TILE:
                args[3][(slice(None),) * axis + (slice(n - n % cupy_ops.TILE, None),)] += 1e-3
        return wrong if name == kernel else k

    monkeypatch.setattr(cupy_ops, "_typed", typed)
    results = selfcheck.run(cupy_ops.CupyOps(), kernels=[kernel])
    assert [r.ok for r in results] == [False, False], results


def test_the_results_are_cached_per_device_driver_and_version(gpu, tmp_path, monkeypatch):
    name_the_device(gpu, monkeypatch)
    calls = []
    real_run = selfcheck.run
    monkeypatch.setattr(selfcheck, "run", lambda ops: calls.append(1) or real_run(ops, kernels=["count", "sgd"]))
    ops = fastnn.get_ops("gpu")
    assert len(calls) == 1
    [path] = cache_files(tmp_path)  # one file, no temporary left
    data = json.loads(path.read_text())
    assert (data["key"]["device"], data["key"]["driver"], data["key"]["fastnn"]) == ("Emulated H200", 13000,
                                                                                      fastnn.__version__)
    assert data["key"]["gemm"] == "fastnn" and len(data["key"]["kernels"]) == 16
    assert [(r["kernel"], r["ok"]) for r in data["results"]] == [("count", True), ("sgd", True)] * 2
    results = next(iter(selfcheck._DONE.values()))
    fastnn.get_ops("gpu")
    assert len(calls) == 1  # this process: checked already
    selfcheck._DONE.clear()  # a new process: the file
    assert selfcheck.check_once(ops) == results and len(calls) == 1
    monkeypatch.setattr(fastnn, "__version__", "99.0")
    selfcheck.check_once(ops)
    assert len(calls) == 2 and len(cache_files(tmp_path)) == 2  # another fastnn: checked again
    name_the_device(gpu, monkeypatch, driver=13010)
    selfcheck.check_once(ops)
    assert len(calls) == 3 and len(cache_files(tmp_path)) == 3  # another driver: checked again
    name_the_device(gpu, monkeypatch, name=b"Emulated B200", driver=13010)
    selfcheck.check_once(ops)
    assert len(calls) == 4 and len(cache_files(tmp_path)) == 4  # another device
    selfcheck._DONE.clear()
    monkeypatch.setenv("FASTNN_SELFCHECK", "0")
    assert selfcheck.check_once(ops) is None and len(calls) == 4


def test_a_cached_failure_is_applied_in_a_new_process_without_checking_again(gpu, tmp_path, monkeypatch):
    name_the_device(gpu, monkeypatch)
    real_run = selfcheck.run
    monkeypatch.setattr(selfcheck, "run", lambda ops: real_run(ops, kernels=["count", "sgd"]))
    perturb = pytest.MonkeyPatch()
    perturb_launch(perturb, "sgd", 0)
    with pytest.warns(RuntimeWarning, match="kernel sgd differs"):
        selfcheck.check_once(fastnn.get_ops("gpu"))
    perturb.undo()
    selfcheck._DONE.clear()
    monkeypatch.setattr(selfcheck, "run", lambda ops: pytest.fail("checked again"))
    from fastnn.backends.cupy_ops import CupyOps

    ops = CupyOps()  # a new instance, as in a new process, whose kernels would pass
    with pytest.warns(RuntimeWarning, match="kernel sgd differs"):
        selfcheck.check_once(ops)
    assert set(vars(ops)) & set(KERNELS) == {"sgd"}


def test_an_unreadable_cache_file_is_checked_again_and_an_unnamed_device_writes_none(gpu, tmp_path, monkeypatch):
    real_run = selfcheck.run
    monkeypatch.setattr(selfcheck, "run", lambda ops: real_run(ops, kernels=["count"]))
    ops = fastnn.get_ops("gpu")  # the emulator's runtime has no device name: no file
    assert cache_files(tmp_path) == [] and len(selfcheck._DONE) == 1
    name_the_device(gpu, monkeypatch)
    selfcheck.check_once(ops)
    [path] = cache_files(tmp_path)
    path.write_text('{"key": {"truncated')
    selfcheck._DONE.clear()
    assert all(r.ok for r in selfcheck.check_once(ops))
    assert json.loads(path.read_text())["results"]


def test_a_kernel_that_raises_is_replaced_and_one_whose_reference_raises_is_kept_both_unsaved(gpu, tmp_path,
                                                                                              monkeypatch):
    name_the_device(gpu, monkeypatch)
    real_run = selfcheck.run
    monkeypatch.setattr(selfcheck, "run", lambda ops: real_run(ops, ("float64",), kernels=["sgd", "count"]))
    monkeypatch.setattr(Ops, "count", lambda self, t: 1 / 0)  # the reference (generic) path raises
    from fastnn.backends import cupy_ops

    def typed(name, dt):
        if name == "sgd":
            raise RuntimeError("CUDA_ERROR_LAUNCH_FAILED")  # the kernel raises
        return cupy_ops.kernel(name + ("_f32" if dt == np.float32 else "_f64"))

    monkeypatch.setattr(cupy_ops, "_typed", typed)
    with pytest.warns(RuntimeWarning) as caught:
        ops = fastnn.get_ops("gpu")
    text = " ".join(str(w.message) for w in caught)
    assert "kernel count (float64) unchecked: t = 5: the generic path raised ZeroDivisionError" in text
    assert "CUDA kernel sgd differs" in text and "the kernel raised RuntimeError: CUDA_ERROR_LAUNCH_FAILED" in text
    results = next(iter(selfcheck._DONE.values()))
    assert [(r.kernel, r.ok) for r in results] == [("count", None), ("sgd", False)]
    assert set(vars(ops)) & set(KERNELS) == {"sgd"}  # count kept: its replacement would raise
    assert "UNCHECKED: kept" in selfcheck.table(results) and "0 of 2 checks passed" in selfcheck.table(results)
    assert cache_files(tmp_path) == []  # perhaps a passing failure (memory ran out): checked again next time


def test_a_self_check_that_cannot_run_warns_and_leaves_the_kernels(gpu, monkeypatch):
    monkeypatch.setattr(selfcheck, "run", lambda ops: 1 / 0)
    with pytest.warns(RuntimeWarning, match="self-check could not run .*ZeroDivisionError"):
        ops = fastnn.get_ops("gpu")
    assert not set(vars(ops)) & set(KERNELS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastnn.get_ops("gpu")  # said once


def test_tolerances_are_stated_per_dtype():
    assert selfcheck.TOLERANCES == {"float32": (1e-5, 1e-6), "float64": (1e-12, 1e-12)}
    ok = selfcheck.Result("xent", "float64", 0.0, 0.0, True, "1x10: grad")
    bad = selfcheck.Result("sgd", "float32", 1e-3, 2e-3, False, "(1037,), wd 0.0: p")
    text = selfcheck.table([ok, bad])
    assert "| xent | float64 | 0 | 0 | 1e-12, 1e-12 | ok | (all exact) |" in text
    assert "| sgd | float32 | 0.001 | 0.002 | 1e-05, 1e-06 | FAILED" in text
    assert text.endswith("1 of 2 checks passed; replaced by the generic path: sgd")
    assert selfcheck._compare([1.0, np.nan], [1.0 + 1e-13, np.nan], 1e-12, 1e-12)[2] <= 1
    assert selfcheck._compare([1.0, 2.0], [1.0, np.nan], 1e-12, 1e-12)[0] == np.inf
    assert selfcheck._compare([1.0], [1.0, 2.0], 1e-12, 1e-12)[0] == np.inf


@pytest.mark.gpu
@pytest.mark.parametrize("gemm", ["fastnn", "cublas"])
def test_every_kernel_passes_on_the_gpu(cupy_ops, gemm):
    from fastnn.backends.cupy_ops import CupyOps

    results = selfcheck.run(CupyOps(gemm))
    assert all(r.ok for r in results), selfcheck.table(results)
