"""Run fastnn's CUDA code on the CPU: a CUDA-kernel emulator and a stand-in for CuPy.

**The kernels.** ``compile_kernels(source)`` compiles CUDA C++ (``kernels.cu``) with
the system C++ compiler, after a prelude that defines ``threadIdx``, ``blockIdx``,
``blockDim``, ``gridDim`` and ``__syncthreads``. A launch runs the grid's blocks one
after another; the threads of a block are fibers on one OS thread (on x86-64 a
register switch of a few instructions, elsewhere ucontext), each run until it reaches
``__syncthreads`` or returns, so every thread of a block passes a barrier before any
thread goes past it, as on a GPU. Between two barriers (an *epoch*) the threads run in
a new random order, from a seeded generator (``fake_cupy(seed=...)``, ``$FASTNN_EMU_SEED``,
default 0; ``seed_emulator(seed)`` reseeds): a kernel's results must not depend on it.
A barrier reached by only some threads of a block is reported as an error. (A kernel
whose last launch reached no barrier runs its threads as plain calls; a barrier met
then is reported as an error too.) Each fiber's stack lies above an inaccessible guard page.

**Shared memory, checked.** Each ``__shared__ T name[A][B]...;`` is rewritten (on its
own line, ``instrument_shared``) into an ``emu_shared`` array whose elements record, per
epoch, the thread and source line of their last write and of their readers. A launch
fails, naming the kernel, the element (``As[3][5]``, its byte), the declaration, the
two threads and the two source lines, at: a read of an element another thread wrote in
the same epoch, a write of one another thread read or wrote in the same epoch (a race:
a missing barrier), a read of an element no thread of the block has written (each block's
arrays start poisoned, 0xFF bytes: NaN in floating types, -1 in integers), an index out
of a dimension's bounds. ``extern __shared__`` and scalar ``__shared__`` variables are
refused (ValueError), as are file-scope ones (they do not compile). An element is only
checked where it is indexed: ``auto v = s[i]`` keeps a reference read later, and a
pointer into a shared array does not compile.

**Launch limits.** As a GPU refuses them: grid.x over 2^31 - 1, grid.y or grid.z over
65535, a block over (1024, 1024, 64) or 1024 threads, and more than 48 KiB of static
``__shared__`` memory in a block (the arrays whose declarations a block ran;
``EmulatedKernel.shared_bytes`` after a launch). Each argument is checked against the
kernel's C signature (pointee type, scalar type, contiguity), since CuPy passes whatever
it is given.

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
import os
import re
import subprocess
import tempfile
import types
import uuid
from pathlib import Path

import numpy as np

PRELUDE = r"""
#include <cmath>
#include <csetjmp>
#include <cstdint>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>
#include <sys/mman.h>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif
using std::exp; using std::log; using std::tanh; using std::sqrt; using std::pow;
struct dim3 { unsigned x, y, z; dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {} };
static dim3 threadIdx, blockIdx, blockDim, gridDim;
#define __global__
#define __device__
#define EMU_INLINE inline __attribute__((always_inline))
#define EMU_API extern "C" __attribute__((visibility("default")))  // all else is hidden (see compile_kernels)
#define EMU_FAIL(...) do { if (!emu_error[0]) snprintf(emu_error, sizeof emu_error, __VA_ARGS__); } while (0)

// ------------------------------------------------------------- a launch's state
static char emu_error[1024];  // the first error of the launch ("" if none)
static int emu_cur, emu_direct, emu_barriers;  // the running thread (linear index in its block)
static unsigned long long emu_epoch = 1, emu_block_epoch = 1;  // epoch: a block's stretch between barriers
static size_t emu_shared_bytes, emu_shared_peak;  // static __shared__ bytes of this block, most of any block
static const size_t EMU_SHARED_LIMIT = 48 * 1024;
static std::vector<int> emu_state;  // per thread: 0 runnable, 1 waiting at __syncthreads, 2 returned
static const std::function<void()>* emu_body;
static unsigned long long* emu_rng;  // the caller's generator state (splitmix64): the threads' order
static jmp_buf emu_jmp;

static std::string emu_thread(int t) {
    return "(" + std::to_string(t % blockDim.x) + "," + std::to_string(t / blockDim.x % blockDim.y) + "," +
           std::to_string(t / (blockDim.x * blockDim.y)) + ")";
}
static std::string emu_block() {
    return "(" + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," + std::to_string(blockIdx.z) + ")";
}

// ------------------------------------------------------------------- fibers
static const size_t EMU_STACK = 1 << 16;  // a fiber's stack, above an inaccessible guard page (overflow: SIGSEGV)
static std::vector<char*> emu_stacks;  // each stack's lowest usable byte
static void emu_grow_stacks(size_t n) {
    const size_t page = 4096;
    while (emu_stacks.size() < n) {
        char* p = (char*)mmap(nullptr, EMU_STACK + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED || mprotect(p, page, PROT_NONE)) { perror("emulator fiber stack"); abort(); }
        emu_stacks.push_back(p + page);
    }
}
static void emu_fiber_body() { (*emu_body)(); emu_state[emu_cur] = 2; }
#if defined(__x86_64__)
// A switch pushes the callee-saved registers on the old stack and pops them from the new one: no
// system call (swapcontext saves the signal mask with one, 20 times slower).
extern "C" __attribute__((visibility("hidden"))) void emu_switch(void** save_sp, void* to_sp);
asm(".pushsection .text\n.globl emu_switch\n.hidden emu_switch\n.type emu_switch,@function\nemu_switch:\n"
    "pushq %rbp\npushq %rbx\npushq %r12\npushq %r13\npushq %r14\npushq %r15\nmovq %rsp, (%rdi)\nmovq %rsi, %rsp\n"
    "popq %r15\npopq %r14\npopq %r13\npopq %r12\npopq %rbx\npopq %rbp\nret\n.size emu_switch, .-emu_switch\n"
    ".popsection\n");
static void* emu_main_sp;
static std::vector<void*> emu_sp;
[[noreturn]] static void emu_fiber_entry() {
    emu_fiber_body();
    void* finished;
    emu_switch(&finished, emu_main_sp);
    __builtin_unreachable();
}
static void emu_fiber_start(int t) {  // a frame that emu_switch "returns" into emu_fiber_entry from
    void** f = (void**)((uintptr_t)(emu_stacks[t] + EMU_STACK) & ~(uintptr_t)15) - 8;
    for (int i = 0; i < 8; ++i) f[i] = nullptr;
    f[6] = (void*)&emu_fiber_entry;
    emu_sp[t] = f;
}
static void emu_fibers(size_t n) { emu_sp.resize(n); }
static void emu_resume(int t) { emu_switch(&emu_main_sp, emu_sp[t]); }
static void emu_yield() { emu_switch(&emu_sp[emu_cur], emu_main_sp); }
#else
static ucontext_t emu_main_uc;
static std::vector<ucontext_t> emu_uc;
static void emu_fiber_start(int t) {
    getcontext(&emu_uc[t]);
    emu_uc[t].uc_stack.ss_sp = emu_stacks[t];
    emu_uc[t].uc_stack.ss_size = EMU_STACK;
    emu_uc[t].uc_link = &emu_main_uc;
    makecontext(&emu_uc[t], emu_fiber_body, 0);
}
static void emu_fibers(size_t n) { emu_uc.resize(n); }
static void emu_resume(int t) { swapcontext(&emu_main_uc, &emu_uc[t]); }
static void emu_yield() { swapcontext(&emu_uc[emu_cur], &emu_main_uc); }
#endif
static void __syncthreads() {
    ++emu_barriers;
    if (emu_direct) longjmp(emu_jmp, 1);
    emu_state[emu_cur] = 1;
    emu_yield();
}

// ------------------------------------------------- __shared__ arrays, checked
// compile_kernels rewrites `__shared__ T name[A][B];` into `static emu_shared<T[A][B]> name("name");
// name.enter();`. Indexing gives an emu_ref (an element: reads by conversion, writes by assignment)
// that records, per element, the last write and the readers of the current epoch.
struct emu_meta { unsigned long long w_epoch, r_epoch; int w_thread, w_line, r_thread, r_line, r2_thread, r2_line; };
struct emu_array {
    const char* name; const char* file; int line;
    size_t count, elem, bytes;
    std::vector<size_t> dims;
    unsigned char* data;
    std::vector<emu_meta> meta;
    unsigned long long gen = 0;  // the block whose declaration ran last
    void enter() {  // the declaration, run by each thread: a new block's array starts poisoned
        if (gen == emu_block_epoch) return;
        gen = emu_block_epoch;
        std::memset(data, 0xFF, bytes);  // NaN in every floating type, -1 in every integer type
        emu_shared_bytes += bytes;
        if (emu_shared_bytes > emu_shared_peak) emu_shared_peak = emu_shared_bytes;
        if (emu_shared_bytes > EMU_SHARED_LIMIT)
            EMU_FAIL("%zu bytes of static __shared__ memory in a block (the last: %s, %zu bytes, %s:%d), over "
                     "the 48 KiB (%zu bytes) a block may have", emu_shared_bytes, name, bytes, file, line,
                     EMU_SHARED_LIMIT);
    }
    std::string at(size_t i) const {  // "As[3][5] (byte 212)"
        std::string s = name;
        size_t stride = count, r = i;
        for (size_t d : dims) { stride /= d; s += "[" + std::to_string(r / stride) + "]"; r %= stride; }
        return s + " (byte " + std::to_string(i * elem) + ")";
    }
    [[gnu::noinline, gnu::cold]] void conflict(size_t i, int line, const char* op, int other, const char* other_op,
                                                int other_line) {
        EMU_FAIL("race on __shared__ %s (declared at %s:%d) in block %s: thread %s %s it at line %d after thread %s "
                 "%s it at line %d, with no __syncthreads() between", at(i).c_str(), file, this->line,
                 emu_block().c_str(), emu_thread(emu_cur).c_str(), op, line, emu_thread(other).c_str(), other_op,
                 other_line);
    }
    [[gnu::noinline, gnu::cold]] void uninitialised(size_t i, int line) {
        EMU_FAIL("uninitialised read of __shared__ %s (declared at %s:%d) in block %s: thread %s reads it at line %d "
                 "before any thread of the block wrote it", at(i).c_str(), file, this->line, emu_block().c_str(),
                 emu_thread(emu_cur).c_str(), line);
    }
    [[gnu::noinline, gnu::cold]] void out_of_bounds(long long j, long long n, int line) {
        EMU_FAIL("index %lld out of the bounds [0, %lld) of __shared__ %s (declared at %s:%d): thread %s of block %s "
                 "at line %d", j, n, name, file, this->line, emu_thread(emu_cur).c_str(), emu_block().c_str(), line);
    }
    EMU_INLINE void read(size_t i, int line) {
        emu_meta& m = meta[i];
        if (__builtin_expect(m.w_epoch < emu_block_epoch, 0)) uninitialised(i, line);
        else if (__builtin_expect(m.w_epoch == emu_epoch && m.w_thread != emu_cur, 0))
            conflict(i, line, "reads", m.w_thread, "wrote", m.w_line);
        if (m.r_epoch != emu_epoch) { m.r_epoch = emu_epoch; m.r_thread = emu_cur; m.r_line = line; m.r2_thread = -1; }
        else if (m.r_thread != emu_cur && m.r2_thread < 0) { m.r2_thread = emu_cur; m.r2_line = line; }
    }
    EMU_INLINE void write(size_t i, int line) {
        emu_meta& m = meta[i];
        if (__builtin_expect(m.w_epoch == emu_epoch && m.w_thread != emu_cur, 0))
            conflict(i, line, "writes", m.w_thread, "wrote", m.w_line);
        else if (__builtin_expect(m.r_epoch == emu_epoch && m.r_thread != emu_cur, 0))
            conflict(i, line, "writes", m.r_thread, "read", m.r_line);
        else if (__builtin_expect(m.r_epoch == emu_epoch && m.r2_thread >= 0, 0))
            conflict(i, line, "writes", m.r2_thread, "read", m.r2_line);
        m.w_epoch = emu_epoch; m.w_thread = emu_cur; m.w_line = line;
    }
};
template <typename E> struct emu_ref {  // one element of a __shared__ array
    emu_array* a; size_t i; int line;
    EMU_INLINE E get() const { a->read(i, line); return reinterpret_cast<E*>(a->data)[i]; }
    EMU_INLINE operator E() const { return get(); }
    EMU_INLINE const emu_ref& set(E v) const { a->write(i, line); reinterpret_cast<E*>(a->data)[i] = v; return *this; }
    EMU_INLINE const emu_ref& operator=(E v) const { return set(v); }
    EMU_INLINE const emu_ref& operator=(const emu_ref& o) const { return set(o.get()); }
#define EMU_COMPOUND(op) \
    template <typename V> EMU_INLINE const emu_ref& operator op##=(const V& v) const { return set((E)(get() op v)); }
    EMU_COMPOUND(+) EMU_COMPOUND(-) EMU_COMPOUND(*) EMU_COMPOUND(/) EMU_COMPOUND(%)
    EMU_COMPOUND(&) EMU_COMPOUND(|) EMU_COMPOUND(^) EMU_COMPOUND(<<) EMU_COMPOUND(>>)
    EMU_INLINE const emu_ref& operator++() const { return set(get() + 1); }
    EMU_INLINE const emu_ref& operator--() const { return set(get() - 1); }
    EMU_INLINE E operator++(int) const { E v = get(); set(v + 1); return v; }
    EMU_INLINE E operator--(int) const { E v = get(); set(v - 1); return v; }
};
struct emu_idx {  // an index, with the source line of the expression it indexes
    long long v; int line;
    template <typename I, std::enable_if_t<std::is_integral_v<I> || std::is_enum_v<I>, int> = 0>
    EMU_INLINE emu_idx(I i, int l = __builtin_LINE()) : v((long long)i), line(l) {}
    template <typename I, std::enable_if_t<std::is_class_v<I>, int> = 0>
    EMU_INLINE emu_idx(const I& i, int l = __builtin_LINE()) : v((long long)i), line(l) {}
};
template <typename A> struct emu_view {  // the sub-array of type A at element `off`
    emu_array* a; size_t off;
    EMU_INLINE auto operator[](emu_idx k) const {
        using R = std::remove_extent_t<A>;
        constexpr long long n = (long long)std::extent_v<A>;
        long long j = k.v;
        if (__builtin_expect(j < 0 || j >= n, 0)) { a->out_of_bounds(j, n, k.line); j = 0; }
        if constexpr (std::is_array_v<R>)
            return emu_view<R>{a, off + (size_t)j * (sizeof(R) / sizeof(std::remove_all_extents_t<R>))};
        else
            return emu_ref<R>{a, off + (size_t)j, k.line};
    }
};
template <typename A> std::vector<size_t> emu_extents() {
    std::vector<size_t> d;
    if constexpr (std::is_array_v<A>) {
        d.push_back(std::extent_v<A>);
        for (size_t e : emu_extents<std::remove_extent_t<A>>()) d.push_back(e);
    }
    return d;
}
template <typename A> struct emu_shared : emu_array {
    using E = std::remove_all_extents_t<A>;
    alignas(16) unsigned char storage[sizeof(A)];
    explicit emu_shared(const char* n, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
        name = n; file = f; line = l;
        elem = sizeof(E); bytes = sizeof(A); count = bytes / elem;
        dims = emu_extents<A>(); data = storage; meta.assign(count, emu_meta{});
    }
    EMU_INLINE auto operator[](emu_idx k) { return emu_view<A>{this, 0}[k]; }
};

// ------------------------------------------------------------------- launches
static EMU_INLINE unsigned long long emu_random() {
    unsigned long long z = (*emu_rng += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}
static void emu_shuffle(std::vector<int>& v) {  // Fisher-Yates; j = the top 32 random bits scaled to [0, i)
    for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[((emu_random() >> 32) * i) >> 32]);
}
static void emu_set_thread(int t) {
    threadIdx = dim3(t % blockDim.x, t / blockDim.x % blockDim.y, t / (blockDim.x * blockDim.y));
    emu_cur = t;
}
static int emu_run_block(int n, std::vector<int>& order) {  // one block, its threads as fibers
    for (int t = 0; t < n; ++t) { emu_fiber_start(t); emu_state[t] = 0; }
    for (;;) {
        emu_shuffle(order);  // a new order for every stretch between barriers
        for (int t : order) {
            if (emu_state[t] == 2) continue;
            emu_set_thread(t);
            emu_state[t] = 0;
            emu_resume(t);
            if (emu_error[0]) return 1;
        }
        int done = 0;
        for (int t = 0; t < n; ++t) done += emu_state[t] == 2;
        if (done == n) return 0;
        if (done > 0) {
            EMU_FAIL("__syncthreads() reached by %d of the %d threads of block %s: the others returned", n - done, n,
                     emu_block().c_str());
            return 1;
        }
        ++emu_epoch;  // every thread is past the barrier
    }
}
static int emu_launch(dim3 g, dim3 b, const std::function<void()>& body, int direct, unsigned long long* rng) {
    emu_error[0] = 0;
    emu_barriers = 0;
    emu_shared_peak = 0;
    emu_direct = direct;
    emu_rng = rng;
    const int n = b.x * b.y * b.z;
    if (n < 1 || n > 1024 || g.x < 1 || g.y < 1 || g.z < 1) {
        EMU_FAIL("bad launch: grid (%u,%u,%u), block (%u,%u,%u)", g.x, g.y, g.z, b.x, b.y, b.z);
        return 1;
    }
    gridDim = g; blockDim = b; emu_body = &body;
    emu_state.assign(n, 0);
    std::vector<int> order(n);
    for (int t = 0; t < n; ++t) order[t] = t;
    if (!direct) {
        emu_grow_stacks(n);
        emu_fibers(emu_stacks.size());
    }
    for (unsigned bz = 0; bz < g.z; ++bz) for (unsigned by = 0; by < g.y; ++by) for (unsigned bx = 0; bx < g.x; ++bx) {
        blockIdx = dim3(bx, by, bz);
        emu_block_epoch = ++emu_epoch;
        emu_shared_bytes = 0;
        if (!direct) {
            if (emu_run_block(n, order)) return 1;
            continue;
        }
        emu_shuffle(order);
        for (int t : order) {  // threads as plain calls, one after another
            emu_set_thread(t);
            if (setjmp(emu_jmp)) {
                EMU_FAIL("__syncthreads() in a launch run without barriers");
                return 1;
            }
            body();
            if (emu_error[0]) return 1;
        }
    }
    return 0;
}
EMU_API const char* emu_last_error() { return emu_error; }
EMU_API int emu_last_barriers() { return emu_barriers; }
EMU_API unsigned long long emu_last_shared_bytes() { return emu_shared_peak; }
template <typename T> std::string emu_type() {
    using U = std::remove_cv_t<std::remove_pointer_t<T>>;
    std::string p = std::is_pointer_v<T> ? "*" : "";
    if constexpr (std::is_same_v<U, float>) return p + "f4";
    else if constexpr (std::is_same_v<U, double>) return p + "f8";
    else if constexpr (std::is_same_v<U, int>) return p + "i4";
    else if constexpr (std::is_same_v<U, long long>) return p + "i8";
    else if constexpr (std::is_same_v<U, unsigned char>) return p + "u1";
    else if constexpr (std::is_same_v<U, signed char>) return p + "i1";
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
template <typename... A> int emu_run(void (*fn)(A...), unsigned* dims, void** argv, int direct,
                                     unsigned long long* rng) {
    std::function<void()> body = [&] { emu_apply(fn, argv, std::index_sequence_for<A...>{}); };
    return emu_launch(dim3(dims[0], dims[1], dims[2]), dim3(dims[3], dims[4], dims[5]), body, direct, rng);
}
"""

KERNEL_NAME = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(')
SHARED_DECL = re.compile(r"__shared__\s+(?P<type>[A-Za-z_][\w:<>,\s]*?)\s+(?P<name>[A-Za-z_]\w*)\s*"
                         r"(?P<dims>(?:\[[^\[\]]+\]\s*)+);")
COMMENT_OR_STRING = re.compile(r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"', re.S)
CUBLAS_IN_CAPTURE = "calling cuBLAS API during stream capture is currently unsupported"  # CuPy's words
GRID_LIMITS = (2 ** 31 - 1, 65535, 65535)  # a CUDA grid's x, y, z (every GPU since compute capability 3.0)
BLOCK_LIMITS = (1024, 1024, 64)  # a block's x, y, z, and at most 1024 threads in all
# Each library keeps its symbols to itself: a function's static locals (the __shared__ arrays) would
# otherwise be STB_GNU_UNIQUE symbols, which the dynamic linker binds to ONE object in the process,
# shared by every library loaded (kernels.cu and its mutants) whatever RTLD_LOCAL says.
CXXFLAGS = ("-std=c++17", "-O1", "-fno-threadsafe-statics", "-fno-gnu-unique", "-fvisibility=hidden",
            "-fvisibility-inlines-hidden", "-shared", "-fPIC")
SEED_ENV = "FASTNN_EMU_SEED"  # the default seed of the threads' order (fake_cupy(seed=...) for another)


class CaptureError(RuntimeError):
    """Something a CUDA stream capture does not allow (CUDA would invalidate the capture)."""


def kernel_names(source: str) -> list[str]:
    return KERNEL_NAME.findall(source)


def code_only(source: str) -> str:
    """``source`` with its comments and string literals blanked: the same length, on the same lines."""
    return COMMENT_OR_STRING.sub(lambda m: re.sub(r"[^\n]", " ", m[0]), source)


def instrument_shared(source: str) -> str:
    """Each ``__shared__ T name[A]...;`` of ``source`` as a checked array (``emu_shared``, see PRELUDE),
    on the same line; ValueError for a ``__shared__`` the emulator cannot check (``extern``, a scalar)."""
    code, out, pos = code_only(source), [], 0
    for m in SHARED_DECL.finditer(code):
        ctype = " ".join(t for t in m["type"].split() if t != "volatile")
        name = m["name"]
        out += [source[pos:m.start()], f'static emu_shared<{ctype}{" ".join(m["dims"].split())}> {name}("{name}"); '
                f'{name}.enter();', "\n" * m[0].count("\n")]
        pos = m.end()
    result = "".join(out) + source[pos:]
    left = code_only(result).find("__shared__")
    if left >= 0:
        line = result.count("\n", 0, left) + 1
        raise ValueError(f"the CUDA emulator checks only __shared__ arrays of static size (__shared__ T name[N]...;), "
                         f"not line {line}: {result.splitlines()[line - 1].strip()}")
    return result


def compile_kernels(source: str, cache_dir: Path | None = None) -> ctypes.CDLL:
    """CUDA C++ ``source`` compiled for the CPU, with a launcher per ``extern "C" __global__`` kernel."""
    wrappers = "".join(
        f'EMU_API int emu_launch_{n}(unsigned* dims, void** argv, int direct, unsigned long long* rng) {{ '
        f'return emu_run({n}, dims, argv, direct, rng); }}\n'
        f'EMU_API const char* emu_sig_{n}() {{ return emu_sig({n}); }}\n' for n in kernel_names(source))
    code = PRELUDE + "\n#line 1 \"kernels.cu\"\n" + instrument_shared(source) + "\n" + wrappers
    cache_dir = Path(cache_dir or Path(tempfile.gettempdir()) / "fastnn-cuda-emulator")
    cache_dir.mkdir(parents=True, exist_ok=True)
    lib = cache_dir / f"kernels-{hashlib.sha256(code.encode()).hexdigest()[:16]}.so"
    if not lib.exists():
        unique = uuid.uuid4().hex  # concurrent compilations (processes, threads) write files of their own
        src = lib.with_suffix(f".{unique}.cpp")
        src.write_text(code)
        tmp = lib.with_suffix(f".{unique}.tmp.so")
        proc = subprocess.run(["c++", *CXXFLAGS, "-o", str(tmp), str(src)], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"the C++ compiler rejected the CUDA source:\n{proc.stderr[-4000:]}")
        tmp.replace(lib)
        src.replace(lib.with_suffix(".cpp"))
    dll = ctypes.CDLL(str(lib))
    dll.emu_last_error.restype = ctypes.c_char_p
    dll.emu_last_shared_bytes.restype = ctypes.c_ulonglong
    return dll


def check_launch(grid, block) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(grid, block)`` as 3-tuples; RuntimeError for a launch a GPU refuses (CUDA's invalid configuration)."""
    g = tuple(grid) + (1,) * (3 - len(grid))
    b = tuple(block) + (1,) * (3 - len(block))
    if len(g) != 3 or len(b) != 3 or not all(isinstance(v, (int, np.integer)) for v in g + b):
        raise TypeError(f"grid {grid!r} and block {block!r} must be up to 3 integers each")
    over = [f"grid.{a} = {v} (at most {m})" for a, v, m in zip("xyz", g, GRID_LIMITS) if not 1 <= v <= m]
    over += [f"block.{a} = {v} (at most {m})" for a, v, m in zip("xyz", b, BLOCK_LIMITS) if not 1 <= v <= m]
    if b[0] * b[1] * b[2] > 1024:
        over.append(f"{b[0] * b[1] * b[2]} threads per block (at most 1024)")
    if over:
        raise RuntimeError(f"invalid launch configuration, grid {g}, block {b}: " + "; ".join(over))
    return tuple(map(int, g)), tuple(map(int, b))


_SCALARS = {"f4": ctypes.c_float, "f8": ctypes.c_double, "i4": ctypes.c_int32, "i8": ctypes.c_int64,
            "u1": ctypes.c_uint8, "u4": ctypes.c_uint32, "i1": ctypes.c_int8}


def seed_state(seed: int | None = None) -> ctypes.c_uint64:
    """The generator state for the threads' order from ``seed`` (default: ``$FASTNN_EMU_SEED``, else 0)."""
    seed = int(os.environ.get(SEED_ENV, "0")) if seed is None else int(seed)
    return ctypes.c_uint64((seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % 2 ** 64)


class EmulatedKernel:
    """One kernel of a compiled module, launched as CuPy launches a RawKernel: ``k(grid, block, args)``.

    ``rng``: the state of the generator that orders the threads (shared by the kernels of a fake CuPy)."""

    def __init__(self, dll: ctypes.CDLL, name: str, rng: ctypes.c_uint64 | None = None):
        self.name = name
        self._launch = getattr(dll, f"emu_launch_{name}")
        self._launch.argtypes = [ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_void_p), ctypes.c_int,
                                 ctypes.POINTER(ctypes.c_uint64)]
        self._barriers = dll.emu_last_barriers
        self._shared_bytes = dll.emu_last_shared_bytes
        self.rng = seed_state() if rng is None else rng
        self.direct = False  # after a launch that reached no barrier, threads run as plain calls
        self.shared_bytes = 0  # the static __shared__ memory of a block of the last launch (its largest)
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
        try:
            g, b = check_launch(grid, block)
        except RuntimeError as exc:
            raise RuntimeError(f"{self.name}: {exc}") from None
        dims = (ctypes.c_uint * 6)(*g, *b)
        argv = (ctypes.c_void_p * max(1, len(values)))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p)
                                                         for v in values])
        failed = self._launch(dims, argv, int(self.direct), ctypes.byref(self.rng))
        self.shared_bytes = self._shared_bytes()
        if failed:
            raise RuntimeError(f"{self.name}: {self._error().decode()}")
        self.direct = self._barriers() == 0


# ------------------------------------------------------------------ fake CuPy
def fake_cupy(kernels_cache: Path | None = None, seed: int | None = None) -> types.ModuleType:
    """A new stand-in for the ``cupy`` module (see the module docstring), with its own state; ``seed``
    (default ``$FASTNN_EMU_SEED``, else 0) seeds the threads' order, and ``seed_emulator(seed)`` reseeds it."""
    state = types.SimpleNamespace(capture=None, capture_stream=None, streams=[], launches=0, graph_launches=0,
                                  rng=seed_state(seed), kernels_launched=set())
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
            state.kernels_launched.add(self.emulated.name)

    class RawModule:
        def __init__(self, code, options=()):
            self.dll = compile_kernels(code, kernels_cache)

        def get_function(self, name):
            return Kernel(EmulatedKernel(self.dll, name, state.rng))

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
    mod.seed_emulator = lambda seed: setattr(state.rng, "value", seed_state(seed).value)
    mod.device_empty = device_empty
    return mod


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def _mprotect(addr: int, length: int, prot: int) -> int:
    return _libc.mprotect(ctypes.c_void_p(addr), length, prot)
