"""Every CUDA kernel fastnn builds compiles for sm_80 and sm_90, checked without a GPU.

All of them are in ``fastnn/backends/kernels.cu`` and ``conv_kernels.cu`` (one module), compiled here with NVRTC through
``cupy.cuda.nvrtc`` directly (CuPy's own compile entry points ask for a device
first), with CuPy's compiler options. The kernels are also executed on the CPU
by the CUDA emulator (``test_graph_emulation.py``). Needs ``cupy-cuda12x`` and ``nvidia-cuda-nvrtc-cu12`` (``import
cupy`` works without a driver); skips with the reason where they are absent.
"""

import re
import shutil
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
SOURCE = cupy_ops.source()  # kernels.cu, then conv_kernels.cu
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
    """The kernel names the Python code of fastnn/ looks up (``cupy_ops.py``, ``cuda_graph.py``):
    ``kernel("x"...)``, and ``_typed("x"...)`` and ``_layer_gemm("x"...)`` (both dtypes)."""
    names = set()
    for path in (REPO / "fastnn").rglob("*.py"):
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


SHARED_DECL = re.compile(r"^\s*\.shared \.align \d+ \.b8 (\w+)\[(\d+)\];\s*$", re.M)


def shared_footprints(ptx: str) -> dict[str, int]:
    """Each entry's static shared memory in bytes: the module's ``.shared`` arrays that its body names."""
    sizes = {name: int(n) for name, n in SHARED_DECL.findall(ptx)}
    entries = re.split(r"\.visible \.entry ", SHARED_DECL.sub("", ptx))[1:]
    return {e.split("(")[0]: sum(n for name, n in sizes.items() if re.search(rf"\b{name}\b", e)) for e in entries}


def test_every_kernels_static_shared_memory_fits_a_block_as_the_emulator_counts_it():
    """NVRTC's shared arrays per kernel: at most the 48 KiB a block may have, and what the CUDA
    emulator counts from the declarations (it refuses a launch over 48 KiB)."""
    footprint = shared_footprints(compile_ptx(SOURCE, "compute_90", OPTIONS))
    assert len(footprint) == len(re.findall(r'extern\s+"C"\s+__global__', SOURCE))
    assert max(footprint.values()) <= 48 * 1024
    assert footprint["weight_grad_f64"] == 2 * 16 * 17 * 8 and footprint["row_loss_f32"] == 256 * 4 + 256 * 4
    assert footprint["sgd_f32"] == 0
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler for the CUDA emulator")
    import cuda_emulator

    fake = cuda_emulator.fake_cupy()
    mod = fake.RawModule(code=SOURCE)
    z, y = fake.zeros(16 * 16), fake.zeros(16, np.int32)
    zf = fake.zeros(16 * 16, np.float32)
    gemm_args = (z, z, z, z, np.int32(16), np.int32(15), np.int32(16), *[np.int64(0)] * 3)
    loss_args = (zf, y, zf, zf, zf, y, np.int32(16), np.int32(10), np.int32(1), np.int32(0), np.int32(0),
                 np.int64(0), np.int64(0))
    for name, grid, block, args in (("weight_grad_f64", (1, 1, 1), (16, 16), gemm_args),
                                    ("row_loss_f32", (1,), (256,), loss_args),
                                    ("sgd_f32", (1,), (256,), (zf, zf, np.int64(256), np.float32(0.1), np.float32(0)))):
        k = mod.get_function(name)
        k(grid, block, args)
        assert k.emulated.shared_bytes == footprint[name], name


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
