"""The CUDA emulator refuses what a GPU would get wrong or refuse, so that CPU runs can prove the kernels.

Small CUDA kernels run through ``cuda_emulator.fake_cupy()``: a correct kernel passes under several
seeds of the threads' order, and its broken twin fails with an error that names the kernel, the
``__shared__`` element, the source lines and the threads. Checked: races on ``__shared__`` memory
between two barriers (read after another thread's write, write after another thread's read or
write), reads of ``__shared__`` memory no thread of the block wrote (poisoned: NaN, -1), indices
out of a ``__shared__`` array's bounds, the 48 KiB of static ``__shared__`` memory a block may
have, the grid and block limits of a launch, a fiber overflowing its stack, and that the threads'
order changes with the seed and between barriers.
"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler (c++) for the CUDA emulator")

import cuda_emulator  # noqa: E402

SEEDS = (0, 1, 2)
N = 64  # threads per block of the kernels below
SOURCE = r"""
#define N 64
// out = x shifted by one within each block of N (through shared memory); sync 0 leaves out the barrier
extern "C" __global__ void neighbour(const float* x, float* out, int sync) {
    __shared__ float s[N];
    const int t = threadIdx.x, base = blockIdx.x * N;
    s[t] = 0;
    __syncthreads();
    s[t] = x[base + t];
    if (sync) __syncthreads();
    out[base + t] = s[(t + 1) % N];  // NEIGHBOUR READ
}

// out = the sum of two rounds of shifted x; sync2 0 leaves out the barrier that ends a round
extern "C" __global__ void two_rounds(const float* x, float* out, int sync2) {
    __shared__ float s[N];
    const int t = threadIdx.x;
    float acc = 0;
    for (int r = 0; r < 2; ++r) {
        s[t] = x[t] + r;  // ROUND WRITE
        __syncthreads();
        acc += s[(t + 1) % N];
        if (sync2) __syncthreads();
    }
    out[t] = acc;
}

// the block's sum of x into out[blockIdx.x], by a tree reduction in a 2-D shared array
extern "C" __global__ void block_sum(const double* x, double* out) {
    __shared__ double s[2][N / 2];
    const int t = threadIdx.x;
    s[t / (N / 2)][t % (N / 2)] = x[blockIdx.x * N + t];
    __syncthreads();
    for (int w = N / 2; w > 0; w /= 2) {
        if (t < w) s[t / (N / 2)][t % (N / 2)] += s[(t + w) / (N / 2)][(t + w) % (N / 2)];
        __syncthreads();
    }
    if (t == 0) out[blockIdx.x] = s[0][0];
}

// reads shared memory that only block 0 writes: a GPU's other blocks read whatever is there
extern "C" __global__ void block0_writes(const int* x, int* out) {
    __shared__ int s[N];
    if (blockIdx.x == 0) s[threadIdx.x] = x[threadIdx.x];
    __syncthreads();
    out[blockIdx.x * N + threadIdx.x] = s[threadIdx.x];
}

extern "C" __global__ void unwritten_f(float* out) {
    __shared__ float s[N];
    out[threadIdx.x] = s[threadIdx.x];
}

extern "C" __global__ void unwritten_i(int* out) {
    __shared__ int s[N];
    out[threadIdx.x] = s[threadIdx.x];
}

extern "C" __global__ void past_the_end(float* out) {
    __shared__ float s[N][4];
    s[threadIdx.x][threadIdx.x % 5] = 1;  // OUT OF BOUNDS
    out[threadIdx.x] = 0;
}

extern "C" __global__ void shared_48k(double* out) {
    __shared__ double s[6144];  // 49152 bytes: all a block may have
    s[threadIdx.x] = 1;
    out[0] = s[threadIdx.x];
}

extern "C" __global__ void shared_over_48k(double* out) {
    __shared__ double a[4096];
    __shared__ float b[4097];  // 32768 + 16388 bytes
    a[threadIdx.x] = 1;
    b[threadIdx.x] = 1;
    out[0] = a[threadIdx.x] + b[threadIdx.x];
}

// the thread that runs last wins (a race on global memory, on purpose): the threads' order
extern "C" __global__ void last_thread(int* out) {
    out[0] = threadIdx.x;
    __syncthreads();
    out[1] = threadIdx.x;
}

extern "C" __global__ void trivial(int* out) {
    if (blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0 && threadIdx.x == 0) out[0] = gridDim.y;
}
"""
LINES = {tag: i + 1 for i, line in enumerate(SOURCE.splitlines()) for tag in ("NEIGHBOUR READ", "ROUND WRITE",
                                                                              "OUT OF BOUNDS") if tag in line}


def module(seed=0):
    cp = cuda_emulator.fake_cupy(seed=seed)
    return cp, cp.RawModule(code=SOURCE)


@pytest.mark.parametrize("seed", SEEDS)
def test_a_correct_kernel_gives_the_same_results_in_every_order(seed):
    cp, mod = module(seed)
    x = np.arange(3 * N, dtype=np.float32)
    out = cp.zeros(3 * N, np.float32)
    mod.get_function("neighbour")((3,), (N,), (cp.asarray(x), out, np.int32(1)))
    np.testing.assert_array_equal(out.get(), np.roll(x.reshape(3, N), -1, axis=1).ravel())
    out = cp.zeros(N, np.float32)
    mod.get_function("two_rounds")((1,), (N,), (cp.asarray(x[:N]), out, np.int32(1)))
    np.testing.assert_array_equal(out.get(), 2 * np.roll(x[:N], -1) + 1)
    xd = np.random.default_rng(seed).standard_normal(4 * N)
    sums = cp.zeros(4, np.float64)
    for _ in range(2):  # the second launch of a kernel: fibers again (it reached barriers)
        mod.get_function("block_sum")((4,), (N,), (cp.asarray(xd), sums))
        np.testing.assert_allclose(sums.get(), xd.reshape(4, N).sum(axis=1), rtol=1e-13)


@pytest.mark.parametrize("seed", SEEDS)
def test_a_read_after_another_threads_write_is_a_race(seed):
    cp, mod = module(seed)
    out = cp.zeros(N, np.float32)
    with pytest.raises(RuntimeError, match=r"^neighbour: race on __shared__ s\[\d+\] \(byte \d+\) \(declared at "
                                           r"kernels.cu:5\) in block \(0,0,0\): thread \(\d+,0,0\) (reads|writes) "
                                           r"it at line \d+ after thread \(\d+,0,0\) (wrote|read) it at line \d+, "
                                           r"with no __syncthreads\(\) between"):
        mod.get_function("neighbour")((1,), (N,), (cp.arange(N, dtype=np.float32), out, np.int32(0)))


def test_a_race_names_the_lines_of_both_accesses():
    # in thread order 0, 1, ...: thread 0 reads s[1] (its write at line 9 still to come), thread 1 writes it
    cp, mod = module()
    out = cp.zeros(N, np.float32)
    messages = set()
    for seed in range(6):
        cp.seed_emulator(seed)
        with pytest.raises(RuntimeError, match="race on __shared__ s") as err:
            mod.get_function("neighbour")((1,), (N,), (cp.arange(N, dtype=np.float32), out, np.int32(0)))
        messages.add(str(err.value).split(": thread ")[1])
    read, write = LINES["NEIGHBOUR READ"], LINES["NEIGHBOUR READ"] - 2
    for m in messages:
        assert (f"reads it at line {read} after" in m and f"wrote it at line {write}," in m) or \
               (f"writes it at line {write} after" in m and f"read it at line {read}," in m), m
    assert len(messages) > 1  # the seeds gave different orders


@pytest.mark.parametrize("seed", SEEDS)
def test_a_write_after_another_threads_read_is_a_race(seed):
    cp, mod = module(seed)
    x, out = cp.arange(N, dtype=np.float32), cp.zeros(N, np.float32)
    write, read = LINES["ROUND WRITE"], LINES["ROUND WRITE"] + 2  # round 2's write, round 1's read: one epoch
    with pytest.raises(RuntimeError, match=r"^two_rounds: race on __shared__ s\[\d+\]") as err:
        mod.get_function("two_rounds")((1,), (N,), (x, out, np.int32(0)))
    assert re.search(rf"writes it at line {write} after thread \(\d+,0,0\) read it at line {read},|"
                     rf"reads it at line {read} after thread \(\d+,0,0\) wrote it at line {write},", str(err.value))


@pytest.mark.parametrize("seed", SEEDS)
def test_shared_memory_starts_every_block_unwritten(seed):
    # the old emulator kept __shared__ arrays static: block 1 read block 0's values and passed
    cp, mod = module(seed)
    x, out = cp.arange(N, dtype=np.int32), cp.zeros(2 * N, np.int32)
    with pytest.raises(RuntimeError, match=r"^block0_writes: uninitialised read of __shared__ s\[\d+\] .* in block "
                                           r"\(1,0,0\): thread \(\d+,0,0\) reads it at line \d+ before any thread of "
                                           r"the block wrote it"):
        mod.get_function("block0_writes")((2,), (N,), (x, out))
    np.testing.assert_array_equal(out.get()[:N], np.arange(N))  # block 0 was right


@pytest.mark.parametrize("dtype,poison", [(np.float32, np.nan), (np.int32, -1)])
def test_unwritten_shared_memory_reads_as_poison(dtype, poison):
    cp, mod = module()
    out = cp.zeros(N, dtype)
    name = "unwritten_f" if dtype == np.float32 else "unwritten_i"
    with pytest.raises(RuntimeError, match=rf"^{name}: uninitialised read of __shared__ s\["):
        mod.get_function(name)((1,), (N,), (out,))
    got = out.get()
    poisoned = np.isnan(got) if np.isnan(poison) else got == poison
    assert poisoned.sum() == 1 and (got[~poisoned] == 0).all()  # the one thread that ran read the poison


def test_an_index_out_of_a_shared_arrays_bounds_is_refused():
    cp, mod = module()
    with pytest.raises(RuntimeError, match=rf"^past_the_end: index 4 out of the bounds \[0, 4\) of __shared__ s "
                                           rf"\(declared at kernels.cu:\d+\): thread \(4,0,0\) of block \(0,0,0\) at "
                                           rf"line {LINES['OUT OF BOUNDS']}"):
        mod.get_function("past_the_end")((1,), (8,), (cp.zeros(8, np.float32),))


def test_static_shared_memory_is_limited_to_48_kib_per_block():
    cp, mod = module()
    ok = mod.get_function("shared_48k")
    ok((2,), (32,), (cp.zeros(1),))
    assert ok.emulated.shared_bytes == 49152
    over = mod.get_function("shared_over_48k")
    with pytest.raises(RuntimeError, match=r"^shared_over_48k: 49156 bytes of static __shared__ memory in a block "
                                           r"\(the last: b, 16388 bytes, kernels.cu:\d+\), over the 48 KiB"):
        over((1,), (32,), (cp.zeros(1),))


def test_the_shared_footprint_of_the_gemm_and_loss_kernels():
    """From the declarations each kernel runs: the GEMM tiles (2 x 16 x 17 elements), the loss's 256 + 256."""
    cp = cuda_emulator.fake_cupy()
    mod = cp.RawModule(code=(Path(__file__).parents[1] / "fastnn" / "backends" / "kernels.cu").read_text())
    z = cp.zeros(16 * 16)
    k = mod.get_function("weight_grad_f64")
    k((1, 1, 1), (16, 16), (z, z, z, z, np.int32(16), np.int32(15), np.int32(16), *[np.int64(0)] * 3))
    assert k.emulated.shared_bytes == 2 * 16 * 17 * 8
    loss = mod.get_function("row_loss_f32")
    zf, y = cp.zeros(40, np.float32), cp.zeros(4, np.int32)
    loss((1,), (256,), (zf, y, zf, zf, zf, y, np.int32(4), np.int32(10), np.int32(1), np.int32(0), np.int32(0),
                        np.int64(0), np.int64(0)))
    assert loss.emulated.shared_bytes == 256 * 4 + 256 * 4


def test_the_threads_order_changes_with_the_seed_and_between_barriers():
    winners = []
    for seed in range(8):
        cp, mod = module(seed)
        out = cp.zeros(2, np.int32)
        mod.get_function("last_thread")((1,), (256,), (out,))
        winners.append(tuple(out.get()))
        cp2, mod2 = module(seed)
        again = cp2.zeros(2, np.int32)
        mod2.get_function("last_thread")((1,), (256,), (again,))
        assert tuple(again.get()) == winners[-1]  # a seed gives the same order
    assert len({w[0] for w in winners}) >= 4  # the old emulator's fixed order: always 255
    assert any(a != b for a, b in winners)  # a new order after the barrier


@pytest.mark.parametrize("grid,block,limit", [
    ((1, 65536), (1,), "grid.y = 65536 (at most 65535)"),
    ((1, 1, 65536), (1,), "grid.z = 65536 (at most 65535)"),
    ((2 ** 31,), (1,), "grid.x = 2147483648 (at most 2147483647)"),
    ((0,), (1,), "grid.x = 0"),
    ((1,), (1025,), "block.x = 1025 (at most 1024)"),
    ((1,), (1, 1, 65), "block.z = 65 (at most 64)"),
    ((1,), (32, 33), "1056 threads per block (at most 1024)"),
])
def test_a_launch_over_the_hardware_limits_is_refused(grid, block, limit):
    cp, mod = module()
    with pytest.raises(RuntimeError, match=r"^trivial: invalid launch configuration, .*" + re.escape(limit)):
        mod.get_function("trivial")(grid, block, (cp.zeros(1, np.int32),))


def test_launches_at_the_hardware_limits_run():
    cuda_emulator.check_launch((2 ** 31 - 1, 65535, 65535), (1024,))
    cuda_emulator.check_launch((1,), (16, 4, 16))
    cp, mod = module()
    out = cp.zeros(1, np.int32)
    mod.get_function("trivial")((1, 65535), (1,), (out,))
    assert out.get()[0] == 65535


@pytest.mark.parametrize("declaration", ["extern __shared__ float s[];", "__shared__ float s;"])
def test_shared_declarations_the_emulator_cannot_check_are_refused(declaration):
    src = f'extern "C" __global__ void k(float* out) {{\n    {declaration}\n    out[0] = 0;\n}}'
    with pytest.raises(ValueError, match=r"checks only __shared__ arrays of static size .* not line 2"):
        cuda_emulator.instrument_shared(src)


def test_instrumented_declarations_keep_their_lines():
    src = "a\n__shared__ volatile unsigned int s[4]\n    [8];\nb\n"
    out = cuda_emulator.instrument_shared(src)
    assert out.splitlines()[1] == 'static emu_shared<unsigned int[4] [8]> s("s"); s.enter();'
    assert out.splitlines()[3] == "b" and out.count("\n") == src.count("\n")
    assert cuda_emulator.instrument_shared("// __shared__ float x;\n") == "// __shared__ float x;\n"


def test_a_fiber_overflowing_its_stack_crashes_at_once():
    script = (
        "import sys, numpy as np; sys.path.insert(0, 'tests'); import cuda_emulator\n"
        "cp = cuda_emulator.fake_cupy()\n"
        "src = '__device__ int depth(int n) { volatile char frame[1024]; frame[0] = n; '\\\n"
        "      '  return n ? depth(n - 1) + frame[0] : 0; }'\\\n"
        "      'extern \"C\" __global__ void deep(int* out, int n) { __syncthreads(); out[0] = depth(n); }'\n"
        "k = cp.RawModule(code=src).get_function('deep')\n"
        "out = cp.zeros(1, np.int32)\n"
        "k((1,), (2,), (out, np.int32(20)))\n"
        "print('20 frames:', out.get()[0], flush=True)\n"
        "k((1,), (2,), (out, np.int32(200)))\n"
        "print('not caught')\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert "20 frames: 210" in proc.stdout  # 20 KiB of stack is fine
    assert "not caught" not in proc.stdout and proc.returncode < 0, proc.stderr[-2000:]  # 200 KiB is not
