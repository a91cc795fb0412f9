"""Run fastnn's CUDA code on the CPU: a CUDA-kernel emulator and a stand-in for CuPy.

**The kernels.** ``compile_kernels(source)`` compiles CUDA C++ (``kernels.cu``) with
the system C++ compiler, after a prelude that defines ``threadIdx``, ``blockIdx``,
``blockDim``, ``gridDim``, ``__shared__`` and ``__syncthreads``. A launch runs the
grid's blocks one after another; the threads of a block are fibers (ucontext) on
one OS thread, each run until it reaches ``__syncthreads`` or returns, so every
thread of a block passes a barrier before any thread goes past it, as on a GPU.
A barrier reached by only some threads of a block is reported as an error. (A
kernel whose last launch reached no barrier runs its threads as plain calls, ten
times faster; a barrier met then is reported as an error too.) Each
argument is checked against the kernel's C signature (pointee type, scalar type,
contiguity), since CuPy passes whatever it is given.

**CuPy.** ``fake_cupy()`` returns a module to put in ``sys.modules["cupy"]`` that
holds device arrays as NumPy arrays, each placed just before an inaccessible
guard page (a kernel that reads or writes past an array's end crashes the test
at once, with the Python traceback). RawModule kernels run on the emulator.
Between ``Stream.begin_capture`` and ``end_capture`` kernel launches are recorded
into a graph, replayed by ``Graph.launch`` with the argument values they had when
recorded, and CuPy's and CUDA's rules for a capture are enforced: cuBLAS
(``matmul``, ``dot``) raises as CuPy raises, and so do allocations, host copies,
synchronisations, array operations outside the project's kernels, and launches
on another stream. Streams otherwise run their work at once, in program order.
"""

from __future__ import annotations

import ctypes
import hashlib
import mmap
import re
import subprocess
import tempfile
import types
from pathlib import Path

import numpy as np

PRELUDE = r"""
#include <cmath>
#include <csetjmp>
#include <cstdio>
#include <functional>
#include <string>
#include <type_traits>
#include <ucontext.h>
#include <utility>
#include <vector>
using std::exp; using std::log; using std::tanh; using std::sqrt; using std::pow;
struct dim3 { unsigned x, y, z; dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {} };
static dim3 threadIdx, blockIdx, blockDim, gridDim;
#define __global__
#define __device__
#define __shared__ static
static ucontext_t emu_main;
static std::vector<ucontext_t> emu_ctx;
static std::vector<int> emu_state;  // 0 runnable, 1 waiting at __syncthreads, 2 returned
static std::vector<std::vector<char>> emu_stacks;
static int emu_cur;
static const std::function<void()>* emu_body;
static char emu_error[512];
static int emu_direct, emu_barriers;  // direct: threads run as plain calls (a kernel seen with no barrier)
static jmp_buf emu_jmp;
static void __syncthreads() {
    ++emu_barriers;
    if (emu_direct) longjmp(emu_jmp, 1);
    emu_state[emu_cur] = 1;
    swapcontext(&emu_ctx[emu_cur], &emu_main);
}
static void emu_entry() { (*emu_body)(); emu_state[emu_cur] = 2; }
extern "C" const char* emu_last_error() { return emu_error; }
extern "C" int emu_last_barriers() { return emu_barriers; }
static int emu_launch(dim3 g, dim3 b, const std::function<void()>& body, int direct) {
    emu_error[0] = 0;
    emu_barriers = 0;
    emu_direct = direct;
    const int n = b.x * b.y * b.z;
    if (n < 1 || n > 1024 || g.x * g.y * g.z < 1) {
        snprintf(emu_error, sizeof emu_error, "bad launch: grid (%u,%u,%u), block (%u,%u,%u)",
                 g.x, g.y, g.z, b.x, b.y, b.z);
        return 1;
    }
    gridDim = g; blockDim = b; emu_body = &body;
    emu_ctx.assign(n, ucontext_t()); emu_state.assign(n, 0);
    if ((int)emu_stacks.size() < n) emu_stacks.resize(n, std::vector<char>(1 << 16));
    for (unsigned bz = 0; bz < g.z; ++bz) for (unsigned by = 0; by < g.y; ++by) for (unsigned bx = 0; bx < g.x; ++bx) {
        blockIdx = dim3(bx, by, bz);
        if (direct) {
            for (int t = 0; t < n; ++t) {
                threadIdx = dim3(t % b.x, (t / b.x) % b.y, t / (b.x * b.y));
                if (setjmp(emu_jmp)) {
                    snprintf(emu_error, sizeof emu_error, "__syncthreads() in a launch run without barriers");
                    return 1;
                }
                body();
            }
            continue;
        }
        for (int t = 0; t < n; ++t) {
            getcontext(&emu_ctx[t]);
            emu_ctx[t].uc_stack.ss_sp = emu_stacks[t].data();
            emu_ctx[t].uc_stack.ss_size = emu_stacks[t].size();
            emu_ctx[t].uc_link = &emu_main;
            makecontext(&emu_ctx[t], emu_entry, 0);
            emu_state[t] = 0;
        }
        for (;;) {
            for (int t = 0; t < n; ++t) {
                if (emu_state[t] == 2) continue;
                threadIdx = dim3(t % b.x, (t / b.x) % b.y, t / (b.x * b.y));
                emu_cur = t;
                emu_state[t] = 0;
                swapcontext(&emu_main, &emu_ctx[t]);
            }
            int done = 0;
            for (int t = 0; t < n; ++t) done += emu_state[t] == 2;
            if (done == n) break;
            if (done > 0) {
                snprintf(emu_error, sizeof emu_error, "__syncthreads() reached by %d of the %d threads of block "
                         "(%u,%u,%u): the others returned", n - done, n, bx, by, bz);
                return 1;
            }
        }
    }
    return 0;
}
template <typename T> std::string emu_type() {
    using U = std::remove_cv_t<std::remove_pointer_t<T>>;
    std::string p = std::is_pointer_v<T> ? "*" : "";
    if constexpr (std::is_same_v<U, float>) return p + "f4";
    else if constexpr (std::is_same_v<U, double>) return p + "f8";
    else if constexpr (std::is_same_v<U, int>) return p + "i4";
    else if constexpr (std::is_same_v<U, long long>) return p + "i8";
    else if constexpr (std::is_same_v<U, unsigned char>) return p + "u1";
    else if constexpr (std::is_same_v<U, unsigned int>) return p + "u4";
    else return p + "?";
}
template <typename... A> const char* emu_sig(void (*)(A...)) {
    static std::string s;
    s.clear();
    ((s += emu_type<A>() + ","), ...);
    return s.c_str();
}
template <typename... A, size_t... I> void emu_apply(void (*fn)(A...), void** argv, std::index_sequence<I...>) {
    fn(*static_cast<A*>(argv[I])...);
}
template <typename... A> int emu_run(void (*fn)(A...), unsigned* dims, void** argv, int direct) {
    std::function<void()> body = [&] { emu_apply(fn, argv, std::index_sequence_for<A...>{}); };
    return emu_launch(dim3(dims[0], dims[1], dims[2]), dim3(dims[3], dims[4], dims[5]), body, direct);
}
"""

KERNEL_NAME = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(')
CUBLAS_IN_CAPTURE = "calling cuBLAS API during stream capture is currently unsupported"  # CuPy's words


class CaptureError(RuntimeError):
    """Something a CUDA stream capture does not allow (CUDA would invalidate the capture)."""


def kernel_names(source: str) -> list[str]:
    return KERNEL_NAME.findall(source)


def compile_kernels(source: str, cache_dir: Path | None = None) -> ctypes.CDLL:
    """CUDA C++ ``source`` compiled for the CPU, with a launcher per ``extern "C" __global__`` kernel."""
    wrappers = "".join(
        f'extern "C" int emu_launch_{n}(unsigned* dims, void** argv, int direct) {{ '
        f'return emu_run({n}, dims, argv, direct); }}\n'
        f'extern "C" const char* emu_sig_{n}() {{ return emu_sig({n}); }}\n' for n in kernel_names(source))
    code = PRELUDE + "\n#line 1 \"kernels.cu\"\n" + source + "\n" + wrappers
    cache_dir = Path(cache_dir or Path(tempfile.gettempdir()) / "fastnn-cuda-emulator")
    cache_dir.mkdir(parents=True, exist_ok=True)
    lib = cache_dir / f"kernels-{hashlib.sha256(code.encode()).hexdigest()[:16]}.so"
    if not lib.exists():
        src = lib.with_suffix(".cpp")
        src.write_text(code)
        tmp = lib.with_suffix(".tmp.so")
        proc = subprocess.run(["c++", "-std=c++17", "-O1", "-shared", "-fPIC", "-o", str(tmp), str(src)],
                              capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"the C++ compiler rejected the CUDA source:\n{proc.stderr[-4000:]}")
        tmp.replace(lib)
    dll = ctypes.CDLL(str(lib))
    dll.emu_last_error.restype = ctypes.c_char_p
    return dll


_SCALARS = {"f4": ctypes.c_float, "f8": ctypes.c_double, "i4": ctypes.c_int32, "i8": ctypes.c_int64,
            "u1": ctypes.c_uint8, "u4": ctypes.c_uint32}


class EmulatedKernel:
    """One kernel of a compiled module, launched as CuPy launches a RawKernel: ``k(grid, block, args)``."""

    def __init__(self, dll: ctypes.CDLL, name: str):
        self.name = name
        self._launch = getattr(dll, f"emu_launch_{name}")
        self._launch.argtypes = [ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_void_p), ctypes.c_int]
        self._barriers = dll.emu_last_barriers
        self.direct = False  # after a launch that reached no barrier, threads run as plain calls
        sig = getattr(dll, f"emu_sig_{name}")
        sig.restype = ctypes.c_char_p
        self.params = sig().decode().rstrip(",").split(",")
        self._error = dll.emu_last_error

    def check_args(self, args) -> list:
        """The ctypes values for ``args``; TypeError for an argument the kernel would misread."""
        if len(args) != len(self.params):
            raise TypeError(f"{self.name} takes {len(self.params)} arguments, got {len(args)}")
        values = []
        for i, (param, a) in enumerate(zip(self.params, args)):
            if param.startswith("*"):
                if not isinstance(a, np.ndarray) or a.dtype != np.dtype(param[1:]) or not a.flags.c_contiguous:
                    raise TypeError(f"{self.name} argument {i}: expected a C-contiguous {np.dtype(param[1:])} "
                                    f"array, got {type(a).__name__} {getattr(a, 'dtype', '')}")
                values.append(ctypes.c_void_p(a.ctypes.data))
            else:
                if not isinstance(a, np.generic) or a.dtype != np.dtype(param):
                    raise TypeError(f"{self.name} argument {i}: expected a NumPy {np.dtype(param)} scalar "
                                    f"(CuPy passes other types as they are), got {a!r} of {type(a).__name__}")
                values.append(_SCALARS[param](a.item()))
        return values

    def run(self, grid, block, values) -> None:
        g = tuple(grid) + (1,) * (3 - len(grid))
        b = tuple(block) + (1,) * (3 - len(block))
        dims = (ctypes.c_uint * 6)(*g, *b)
        argv = (ctypes.c_void_p * max(1, len(values)))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p)
                                                         for v in values])
        if self._launch(dims, argv, int(self.direct)):
            raise RuntimeError(f"{self.name}: {self._error().decode()}")
        self.direct = self._barriers() == 0


# ------------------------------------------------------------------ fake CuPy
def fake_cupy(kernels_cache: Path | None = None) -> types.ModuleType:
    """A new stand-in for the ``cupy`` module (see the module docstring), with its own state."""
    state = types.SimpleNamespace(capture=None, capture_stream=None, streams=[], launches=0, graph_launches=0)
    page = mmap.PAGESIZE

    def no_capture(what: str) -> None:
        if state.capture is not None:
            state.capture.invalid = True
            raise CaptureError(f"{what} during stream capture")

    def device_empty(shape, dtype) -> np.ndarray:
        """An uninitialised device array whose last byte is followed by a guard page."""
        dtype = np.dtype(dtype)
        shape = (shape,) if np.isscalar(shape) else tuple(shape)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        data_pages = -(-max(nbytes, 1) // page)
        mm = mmap.mmap(-1, (data_pages + 1) * page)
        raw = np.frombuffer(mm, np.uint8)
        base = raw.ctypes.data
        if _mprotect(base + data_pages * page, page, 0):
            raise OSError("mprotect failed")
        start = data_pages * page - nbytes
        return raw[start:start + nbytes].view(dtype).reshape(shape).view(DeviceArray)

    class DeviceArray(np.ndarray):
        def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
            no_capture(f"NumPy ufunc {ufunc.__name__}")
            inputs = [i.view(np.ndarray) if isinstance(i, DeviceArray) else i for i in inputs]
            if out is not None:
                kwargs["out"] = tuple(o.view(np.ndarray) if isinstance(o, DeviceArray) else o for o in out)
            result = getattr(ufunc, method)(*inputs, **kwargs)
            if out is not None:
                return out[0] if len(out) == 1 else out
            if isinstance(result, tuple):
                return tuple(r.view(DeviceArray) if isinstance(r, np.ndarray) else r for r in result)
            return result.view(DeviceArray) if isinstance(result, np.ndarray) else result

        def __array_function__(self, func, types_, args, kwargs):
            no_capture(f"array function {func.__name__}")
            return super().__array_function__(func, types_, args, kwargs)

        def __setitem__(self, key, value):
            no_capture("array assignment")
            super().__setitem__(key, value)

        def fill(self, value):
            no_capture("fill")
            super().fill(value)

        def copy(self, order="C"):
            no_capture("copy")
            out = device_empty(self.shape, self.dtype)
            np.copyto(out.view(np.ndarray), self.view(np.ndarray))
            return out

        def astype(self, dtype, *args, **kwargs):
            no_capture("astype")
            out = device_empty(self.shape, dtype)
            np.copyto(out.view(np.ndarray), self.view(np.ndarray), casting="unsafe")
            return out

        def set(self, arr, stream=None):
            no_capture("host-to-device copy")
            np.copyto(self.view(np.ndarray), np.asarray(arr))

        def get(self, stream=None):
            no_capture("device-to-host copy")
            return np.array(self.view(np.ndarray))

        def __float__(self):
            no_capture("a synchronising read")
            return float(self.view(np.ndarray))

        def __int__(self):
            no_capture("a synchronising read")
            return int(self.view(np.ndarray))

        def __bool__(self):
            no_capture("a synchronising read")
            return bool(self.view(np.ndarray))

    def to_device(a, dtype=None):
        if isinstance(a, DeviceArray) and (dtype is None or a.dtype == np.dtype(dtype)):
            return a
        host = np.asarray(a.view(np.ndarray) if isinstance(a, DeviceArray) else a, dtype=dtype)
        out = device_empty(host.shape, host.dtype)
        np.copyto(out.view(np.ndarray), host)
        return out

    def allocator(fn):
        def alloc(*args, **kwargs):
            no_capture(f"allocation ({fn.__name__})")
            args = [a.view(np.ndarray) if isinstance(a, DeviceArray) else a for a in args]
            return to_device(fn(*args, **kwargs))
        return alloc

    def cublas(fn):
        def call(*args, **kwargs):
            if state.capture is not None:
                state.capture.invalid = True
                raise NotImplementedError(CUBLAS_IN_CAPTURE)
            return fn(*args, **kwargs)
        return call

    class Graph:
        def __init__(self):
            self.nodes, self.invalid = [], False

        def launch(self, stream=None):
            no_capture("graph launch")
            state.graph_launches += 1
            for node in self.nodes:
                node()

    class Stream:
        def __init__(self, non_blocking=False):
            self.non_blocking = non_blocking

        def __enter__(self):
            state.streams.append(self)
            return self

        def __exit__(self, *exc):
            state.streams.pop()

        def record(self, event=None):
            return object()

        def wait_event(self, event):
            pass

        def synchronize(self):
            no_capture("stream synchronisation")

        def is_capturing(self):
            return state.capture_stream is self

        def begin_capture(self, mode=None):
            if state.capture is not None:
                raise CaptureError("a capture is already under way")
            state.capture, state.capture_stream = Graph(), self

        def end_capture(self):
            graph, stream = state.capture, state.capture_stream
            if stream is not self:
                raise CaptureError("end_capture on a stream that is not capturing")
            state.capture = state.capture_stream = None
            if graph.invalid:
                raise CaptureError("the capture was invalidated by an earlier error")
            return graph

    null_stream = Stream()

    def get_current_stream():
        return state.streams[-1] if state.streams else null_stream

    class Kernel:
        def __init__(self, emulated: EmulatedKernel):
            self.emulated = emulated

        def __call__(self, grid, block, args, shared_mem=0, stream=None):
            values = self.emulated.check_args(args)
            stream = stream or get_current_stream()
            if state.capture is not None:
                if stream is not state.capture_stream:
                    state.capture.invalid = True
                    raise CaptureError(f"{self.emulated.name} launched on another stream during a capture")
                state.capture.nodes.append(lambda: self.emulated.run(grid, block, values))
            else:
                self.emulated.run(grid, block, values)
            state.launches += 1

    class RawModule:
        def __init__(self, code, options=()):
            self.dll = compile_kernels(code, kernels_cache)

        def get_function(self, name):
            return Kernel(EmulatedKernel(self.dll, name))

    def getattr_(name):  # NumPy's, with CuPy's array makers returning guarded device arrays
        if name in ("zeros", "empty", "ones", "full", "arange", "zeros_like", "empty_like", "ones_like",
                    "array", "concatenate", "ascontiguousarray"):
            return allocator(getattr(np, name))
        return getattr(np, name)

    mod = types.ModuleType("cupy")
    mod.__getattr__ = getattr_
    mod.ndarray = DeviceArray

    def asarray(a, dtype=None):
        no_capture("host-to-device copy")
        return to_device(a, dtype)

    def asnumpy(a, stream=None):
        no_capture("device-to-host copy")
        return np.array(np.asarray(a).view(np.ndarray))

    mod.asarray, mod.asnumpy = asarray, asnumpy
    mod.matmul, mod.dot = cublas(np.matmul), cublas(np.dot)
    mod.RawModule = RawModule
    mod.cuda = types.SimpleNamespace(
        Stream=Stream, Graph=Graph, get_current_stream=get_current_stream,
        runtime=types.SimpleNamespace(getDeviceCount=lambda: 1))
    mod.emulator_state = state
    mod.device_empty = device_empty
    return mod


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def _mprotect(addr: int, length: int, prot: int) -> int:
    return _libc.mprotect(ctypes.c_void_p(addr), length, prot)
