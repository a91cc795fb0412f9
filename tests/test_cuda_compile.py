"""Every CUDA kernel fastnn builds compiles for sm_80 and sm_90, checked without a GPU.

Each ElementwiseKernel is generated exactly as CuPy generates it at its first call
(CuPy's own code generator and type resolution, for every dtype fastnn calls it
with), each RawModule source as it is; all are compiled with NVRTC through
``cupy.cuda.nvrtc`` directly, since CuPy's own compile entry points ask for a
device first. Needs ``cupy-cuda12x`` and ``nvidia-cuda-nvrtc-cu12`` (``import
cupy`` works without a driver); skips with the reason where they are absent.
"""

import numpy as np
import pytest

cp = pytest.importorskip("cupy", reason="CuPy is not installed (pip install cupy-cuda12x nvidia-cuda-nvrtc-cu12)")
try:
    from cupy.cuda import nvrtc

    nvrtc.getVersion()
except Exception as exc:  # the NVRTC library is a separate wheel
    pytest.skip(f"NVRTC is not usable ({exc}); pip install nvidia-cuda-nvrtc-cu12", allow_module_level=True)
from cupy._core import _carray, _kernel, _scalar, core  # noqa: E402

from fastnn.backends import cuda_graph, cupy_ops  # noqa: E402

ARCHS = ("compute_80", "compute_90")
F32, F64, I32, I64, U8 = (np.dtype(t) for t in ("f4", "f8", "i4", "i8", "u1"))


class Scalar:
    """A scalar argument of this dtype (CuPy passes it by value, not as an array)."""

    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)


def elementwise_calls():
    """(factory name, kernel, argument dtypes) for every way fastnn calls each ElementwiseKernel."""
    calls = []
    for t in (F32, F64):
        s = Scalar(t)
        calls += [("_bias_act_kernel", cupy_ops._bias_act_kernel(act), (t, t)) for act in cupy_ops._ACT_FORWARD]
        calls += [("_act_backward_kernel", cupy_ops._act_backward_kernel(act), (t, t))
                  for act in cupy_ops._ACT_BACKWARD]
        calls += [("_gather_kernel", cupy_ops._gather_kernel(), (u, I64, Scalar(I64), s, s, t)) for u in (U8, t)]
        calls += [
            ("_optim_kernel", cupy_ops._optim_kernel("sgd"), (t, s, s, t)),
            ("_optim_kernel", cupy_ops._optim_kernel("momentum"), (t, s, s, s, Scalar(I32), t, t)),
            ("_optim_kernel", cupy_ops._optim_kernel("adam"), (t, I32, s, s, s, s, s, t, t, t)),
        ]
    calls += [("_label_kernel", cupy_ops._label_kernel(), (I32, I64, I32)),
              ("_optim_kernel", cupy_ops._optim_kernel("count"), (I32,))]
    return calls


def raw_sources():
    """(name, CUDA source, options) of every RawModule fastnn compiles."""
    opts = ("-std=c++14",)
    return [("cupy_ops._ROW_LOSS_SRC", cupy_ops._ROW_LOSS_SRC, opts), ("cuda_graph._SRC", cuda_graph._SRC, opts)]


def elementwise_source(kernel, dtypes) -> str:
    """The CUDA source CuPy generates for ``kernel`` called with arrays and scalars of these dtypes."""
    n_in = len(kernel.in_params)
    in_arrays = tuple(None if isinstance(d, Scalar) else d for d in dtypes[:n_in])
    in_types, out_types, type_map = _kernel._decide_params_type(
        kernel.in_params, kernel.out_params, in_arrays, tuple(dtypes[n_in:]))
    infos = []
    for i, d in enumerate(dtypes):
        if isinstance(d, Scalar):
            infos.append(_kernel._ArgInfo(3, _scalar.CScalar, np.dtype(in_types[i]), 0, True, True))
        else:
            infos.append(_kernel._ArgInfo(1, cp.ndarray, d, 1, True, True))
    infos.append(_kernel._ArgInfo(2, _carray.Indexer, None, 1, True, True))
    code = _kernel._get_elementwise_kernel_code(tuple(infos), type_map, kernel.params, kernel.operation,
                                                kernel.name, kernel.preamble)
    return "".join(f"#include <{h}>\n" for h in core._cupy_header_list) + code


def compile_ptx(source: str, arch: str, options) -> str:
    prog = nvrtc.createProgram(source, "fastnn_kernel.cu", [], [])
    try:
        try:
            nvrtc.compileProgram(prog, [*options, f"--gpu-architecture={arch}"])
        except nvrtc.NVRTCError:
            pytest.fail(nvrtc.getProgramLog(prog))
        ptx = nvrtc.getPTX(prog)
        return ptx.decode() if isinstance(ptx, bytes) else ptx
    finally:
        nvrtc.destroyProgram(prog)


def call_id(call) -> str:
    chars = "".join((d.dtype if isinstance(d, Scalar) else d).char for d in call[2])
    return f"{call[1].name}-{chars}"


def cupy_options():
    # CuPy's own options, less the include folder of a local CUDA toolkit: NVRTC brings its headers
    return [o for o in core.assemble_cupy_compiler_options(()) if not o.startswith("-I/usr/local/cuda")]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("call", elementwise_calls(), ids=lambda c: call_id(c))
def test_elementwise_kernel_compiles(call, arch):
    _, kernel, dtypes = call
    ptx = compile_ptx(elementwise_source(kernel, dtypes), arch, cupy_options())
    assert f".entry {kernel.name}(" in ptx


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name,source,options", raw_sources(), ids=[n for n, _, _ in raw_sources()])
def test_raw_module_compiles(name, source, options, arch):
    ptx = compile_ptx(source, arch, options)
    for fn in ("row_loss_f32", "row_loss_f64") if "ROW_LOSS" in name else ("stage", "record_f32", "record_f64"):
        assert f".entry {fn}(" in ptx


def test_every_kernel_factory_is_covered():
    factories = {name for name in vars(cupy_ops) if name.startswith("_") and name.endswith("_kernel")}
    assert factories == {name for name, _, _ in elementwise_calls()}
    sources = {f"{m.__name__.split('.')[-1]}.{n}" for m in (cupy_ops, cuda_graph)
               for n in vars(m) if n.endswith("_SRC")}
    assert sources == {name for name, _, _ in raw_sources()}


def test_a_broken_kernel_fails_to_compile():
    broken = cp.ElementwiseKernel("T b", "T h", "h = b + undefined_name;", "fastnn_broken")
    with pytest.raises(pytest.fail.Exception, match="undefined_name"):
        compile_ptx(elementwise_source(broken, (F32, F32)), "compute_90", cupy_options())


def test_set_tf32_switches_cupys_compute_type_after_import():
    from cupy._core import _routines_linalg as linalg

    import fastnn

    # decided already (as after a first GEMM; TF32 itself needs a device to be set): the
    # environment variable alone would change nothing now
    linalg.set_compute_type(np.float32, linalg.COMPUTE_TYPE_FP32)
    fastnn.set_tf32(False)
    assert linalg.get_compute_type(np.float32) == linalg.COMPUTE_TYPE_DEFAULT
