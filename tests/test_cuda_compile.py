"""Every CUDA kernel fastnn builds compiles for sm_80 and sm_90, checked without a GPU.

All of them are in ``fastnn/backends/kernels.cu``, compiled here with NVRTC through
``cupy.cuda.nvrtc`` directly (CuPy's own compile entry points ask for a device
first), with CuPy's compiler options. The kernels are also executed on the CPU
by the CUDA emulator (``test_graph_emulation.py``). Needs ``cupy-cuda12x`` and ``nvidia-cuda-nvrtc-cu12`` (``import
cupy`` works without a driver); skips with the reason where they are absent.
"""

import re
from pathlib import Path

import numpy as np
import pytest

cp = pytest.importorskip("cupy", reason="CuPy is not installed (pip install cupy-cuda12x nvidia-cuda-nvrtc-cu12)")
try:
    from cupy.cuda import nvrtc

    nvrtc.getVersion()
except Exception as exc:  # the NVRTC library is a separate wheel
    pytest.skip(f"NVRTC is not usable ({exc}); pip install nvidia-cuda-nvrtc-cu12", allow_module_level=True)
from cupy._core import core  # noqa: E402

from fastnn.backends import cupy_ops  # noqa: E402

ARCHS = ("compute_80", "compute_90")
REPO = Path(__file__).resolve().parents[1]
SOURCE = cupy_ops.KERNELS_CU.read_text()
OPTIONS = ("-std=c++14",)  # as cupy_ops.module() compiles it


def compile_ptx(source: str, arch: str, options) -> str:
    prog = nvrtc.createProgram(source, "kernels.cu", [], [])
    try:
        try:
            nvrtc.compileProgram(prog, [*options, f"--gpu-architecture={arch}"])
        except nvrtc.NVRTCError:
            pytest.fail(nvrtc.getProgramLog(prog))
        ptx = nvrtc.getPTX(prog)
        return ptx.decode() if isinstance(ptx, bytes) else ptx
    finally:
        nvrtc.destroyProgram(prog)


def cupy_options():
    # CuPy's own options, less the include folder of a local CUDA toolkit: NVRTC brings its headers
    return [o for o in core.assemble_cupy_compiler_options(()) if not o.startswith("-I/usr/local/cuda")]


def launched_kernels() -> set[str]:
    """The kernel names the Python code looks up: ``kernel("x"...)``, and ``_typed("x"...)`` and
    ``_layer_gemm("x"...)`` (both dtypes)."""
    names = set()
    for path in (REPO / "fastnn" / "backends").glob("*.py"):
        text = path.read_text()
        names |= set(re.findall(r'\bkernel\("(\w+)"', text))
        names |= {f"{n}_{s}" for n in re.findall(r'(?:_typed|_layer_gemm)\("(\w+)"', text) for s in ("f32", "f64")}
    return names


@pytest.mark.parametrize("arch", ARCHS)
def test_kernels_cu_compiles_with_cupys_options(arch):
    ptx = compile_ptx(SOURCE, arch, [*cupy_options(), *OPTIONS])
    for name in re.findall(r'extern\s+"C"\s+__global__\s+void\s+(\w+)', SOURCE):
        assert f".entry {name}(" in ptx


def test_every_kernel_the_code_launches_is_in_kernels_cu():
    defined = set(re.findall(r'extern\s+"C"\s+__global__\s+void\s+(\w+)', SOURCE))
    launched = launched_kernels()
    assert {"linear_act_f32", "weight_grad_f64", "stage", "record_f32", "step_count"} <= launched
    assert launched <= defined, launched - defined


def test_a_broken_kernel_fails_to_compile():
    broken = 'extern "C" __global__ void broken(float* h) { h[0] = undefined_name; }'
    with pytest.raises(pytest.fail.Exception, match="undefined_name"):
        compile_ptx(broken, "compute_90", OPTIONS)


def test_set_tf32_switches_cupys_compute_type_after_import():
    from cupy._core import _routines_linalg as linalg

    import fastnn

    # decided already (as after a first GEMM; TF32 itself needs a device to be set): the
    # environment variable alone would change nothing now
    linalg.set_compute_type(np.float32, linalg.COMPUTE_TYPE_FP32)
    fastnn.set_tf32(False)
    assert linalg.get_compute_type(np.float32) == linalg.COMPUTE_TYPE_DEFAULT
