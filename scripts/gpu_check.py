#!/usr/bin/env python3
"""Everything that needs a GPU, in one command: environment, self-check, GPU tests, benchmarks, sanitizers.

    python3 scripts/gpu_check.py --out DIR [--parts env,selfcheck,tests,bench,stack,sanitize] [--data DIR]

Writes into DIR: ``env.txt`` (nvidia-smi, Python, NumPy, CuPy, CUDA and PyTorch versions),
``selfcheck.log`` (the GPU self-check of fastnn/backends/selfcheck.py as ``get_ops("gpu")`` runs it,
timed, with its table for each GEMM mode), ``pytest-gpu.log`` (``pytest -m gpu``),
``bench-gpu.json``, ``bench-gpu.md`` and ``bench-gpu.png`` (the GPU cases of ``benchmarks/``: fastnn eager and
captured, PyTorch eager and captured, per-sample, batch sizes 32-2048, the width sweep, the
GEMM peak), ``bench-stack-gpu.json`` and ``.md`` (the ``stack`` part: K = 1, 4, 16, 64 models
stacked, captured, sequential, against PyTorch and JAX), ``sanitizer-memcheck.log`` (compute-sanitizer
over every fused kernel at batch sizes 1, 255, 256, 257 and 10000, float32 and float64, cross-entropy
and MSE, every optimizer, stacks, captured steps) and ``sanitizer-racecheck.log`` (a smaller
workload: batch sizes 1 and 257, every kernel with shared memory), and ``summary.md`` with each
part's exit status and duration. The parts run in that order whatever order ``--parts`` gives
(the sanitizers last: the slowest, and the first to be cut short). ``--data`` names the folder
holding ``fashion-mnist/`` (default: ``$FASTNN_DATA`` or ``../shared/data``).

Every command is run with ``python3``, in its own process group (``start_new_session``), killed as
a group (``os.killpg``: compute-sanitizer and the workload it started) at its time limit. The
tests, benchmarks and sanitizers run with ``FASTNN_SELFCHECK=0``: they measure fastnn's own
kernels, never a generic path put in their place. The sanitizers' workload (``--kernels full`` or
``small``) runs with CuPy's memory pool off (``FASTNN_NO_MEMPOOL=1``: ``cupy.cuda.set_allocator(None)``),
so each array is its own allocation and an access one element past its end is outside any
allocation, which memcheck reports.

``--budget SECONDS`` fits every part into one command of that length: each part is stopped at its
cap (``PART_CAPS``) or when its share runs out (at least a minute is kept for each part still to
come), and ``summary.md`` is rewritten as each command of a part ends. ``--tar FILE`` packs the
result files into one ``.tar.gz`` (a device machine hands back at most 8 files) at the same moments,
atomically, so a command stopped from outside still returns everything that ended before. One
command for a 15-minute GPU session, with Fashion-MNIST copied into the ignored folder ``.data``
and carried:

    python3 scripts/gpu_check.py --out /tmp/gpu-check --parts env,selfcheck,tests,bench,stack,sanitize \\
        --budget 510 --tar $OUT/gpu-check.tar.gz --data .data
"""

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PARTS = ("env", "selfcheck", "tests", "bench", "stack", "sanitize")  # the order they run in
PART_CAPS = {"env": 60, "selfcheck": 90, "tests": 120, "bench": 100, "stack": 80}  # seconds; sanitize: the rest
MEMCHECK_SHARE = 0.6  # of the sanitize part's time: memcheck first, racecheck (the smaller workload) after
BATCHES = (1, 255, 256, 257, 10000)
SMALL_BATCHES = (1, 257)  # racecheck's: batch 1, and a ragged tile of more rows than a block's 256 threads
KEEP_FOR_EACH_LATER_PART = 60  # seconds of --budget that a part leaves to each part after it
PER_TEST_SECONDS = 120  # with pytest-timeout installed, a test or benchmark case that hangs fails alone
KILL_GRACE = 5  # seconds between SIGTERM and SIGKILL to a process group at its time limit
PY = "python3"  # in every command spawned: the Python that holds CuPy and PyTorch on the GPU machines
_RUNNING: list[subprocess.Popen] = []  # the command running now (its process group), for the signal handler


def per_test_timeout() -> list[str]:
    """pytest flags that fail any one test after PER_TEST_SECONDS, where pytest-timeout is installed:
    the part goes on and pytest-benchmark still writes the JSON of the cases that ran."""
    import importlib.util

    return ["--timeout", str(PER_TEST_SECONDS)] if importlib.util.find_spec("pytest_timeout") else []


def memory_pool_off() -> None:
    """With FASTNN_NO_MEMPOOL=1: every CuPy array its own cudaMalloc, so the sanitizer sees its end."""
    if os.environ.get("FASTNN_NO_MEMPOOL") == "1":
        import cupy

        cupy.cuda.set_allocator(None)
        cupy.cuda.set_pinned_memory_allocator(None)


def run_kernels(small: bool = False) -> None:
    """Every fused kernel at the edge batch sizes (memcheck's workload); ``small``: batch sizes 1 and
    257, the kernels that use shared memory (layer GEMMs and loss; no optimizer variants, cuBLAS
    epilogues or captured steps), one stack (racecheck's)."""
    import fastnn
    from fastnn.backends.cupy_ops import CupyOps

    memory_pool_off()
    batches = SMALL_BATCHES if small else BATCHES
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (10000, 784), dtype=np.uint8)
    y = rng.integers(0, 10, 10000)
    for dtype in ("float32", "float64"):
        for loss in ("xent", "mse"):
            for opt in ("sgd",) if small else ("sgd", "nesterov", "adam"):
                m = fastnn.MLP([784, 33, 10], activation="tanh" if loss == "mse" else "relu", loss=loss,
                               device="gpu", dtype=dtype)
                for b in batches:
                    fastnn.fit(m, x[:b], y[:b], epochs=1, batch_size=b, lr=1e-3, optimizer=opt, lr_schedule="constant")
                    m.evaluate(x[:b], y[:b], batch_size=b)
                if opt == "sgd" and not small:  # the captured step
                    fastnn.fit(m, x[:1000], y[:1000], epochs=1, batch_size=256, lr=1e-3, cuda_graph=True,
                               optimizer="sgd", lr_schedule="constant")
        if not small:
            m = fastnn.MLP([784, 33, 10], device=CupyOps("cublas"), dtype=dtype)  # the cuBLAS epilogues
            for b in batches:
                fastnn.fit(m, x[:b], y[:b], epochs=1, batch_size=b, lr=1e-3, optimizer="sgd", lr_schedule="constant")
        run_stacks(x, y, dtype, batches, small)
        run_convs(x, y, dtype, small)
    m.ops.synchronize()
    print("kernels ran:", len(batches), "batch sizes x 2 dtypes x 2 losses,", "sgd" if small else "3 optimizers,",
          "stacks, conv nets" if small else "cuBLAS GEMMs, captured steps, stacks and conv nets")


def run_convs(x, y, dtype: str, small: bool) -> None:
    """A conv net (both paddings, pooling windows that leave a row and column over, a weight gradient
    split in parts at batch 257, 1-pixel shifts) on the top-left 12 x 12 pixels of the images, at batch
    1 and 257, evaluated; and a captured step (full workload only)."""
    import fastnn

    x12 = np.ascontiguousarray(x.reshape(-1, 28, 28)[:, :12, :12].reshape(-1, 144))
    m = fastnn.MLP([144, 10], layers="conv5k3s,pool2,conv7k3,pool3,dense9", device="gpu", dtype=dtype, translate=1)
    for b in SMALL_BATCHES:
        fastnn.fit(m, x12[:b], y[:b], epochs=1, batch_size=b, lr=1e-3, lr_schedule="constant")
        m.evaluate(x12[:b], y[:b], batch_size=b)
    if not small:
        fastnn.fit(m, x12[:600], y[:600], epochs=1, batch_size=256, lr=1e-3, cuda_graph=True, lr_schedule="constant")


def run_stacks(x, y, dtype: str, batches, small: bool) -> None:
    """Stacks: models on grid z, per-model hyperparameters and dropout, shared and per-model batch orders."""
    import fastnn

    for opt in ("adam",) if small else ("sgd", "momentum", "adam"):
        for seed in ([0, 1, 2],) if small else (0, [0, 1, 2]):  # one shared batch order, one per model
            st = fastnn.ModelStack([784, 33, 10], [0, 1, 2], device="gpu", dtype=dtype, dropout=[0.0, 0.2, 0.5])
            for b in batches:
                fastnn.fit_many(st, x[:b], y[:b], epochs=1, batch_size=b, lr=[1e-3, 2e-3, 3e-3], optimizer=opt,
                                seed=seed, x_val=x[:b], y_val=y[:b], lr_schedule="constant")
            if not small:
                fastnn.fit_many(st, x[:1000], y[:1000], epochs=1, batch_size=256, lr=[1e-3, 2e-3, 3e-3],
                                optimizer=opt, seed=seed, cuda_graph=True, lr_schedule="constant")


def run_selfcheck() -> int:
    """The GPU self-check as a run meets it: ``get_ops("gpu")`` (timed, with a fresh cache folder, so
    the check runs and writes its file), a second ``get_ops`` (cached), then the table, per GEMM mode.
    Exit status 0 if every kernel passed, 1 if any failed, 2 without a GPU."""
    import tempfile
    import warnings

    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="fastnn-selfcheck-")
    os.environ.pop("FASTNN_SELFCHECK", None)
    import fastnn
    from fastnn.backends import selfcheck

    failed = 0
    for gemm in ("fastnn", "cublas"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            try:
                ops = fastnn.get_ops("gpu", gemm=gemm)
            except fastnn.DeviceError as exc:
                print(f"no GPU: {exc}")
                return 2
            t1 = time.perf_counter()
            results = selfcheck.check_once(ops)
            t2 = time.perf_counter()
        files = sorted(selfcheck.cache_dir().glob("*.json"))
        print(f"## gemm={gemm}: get_ops with the check {t1 - t0:.2f} s, again (cached) {t2 - t1:.4f} s; "
              f"cache files {[f.name for f in files]}\nkey: {selfcheck.device_key(ops)}\n")
        print(selfcheck.table(results), "\n")
        for w in caught:
            print(f"warning: {w.message}\n")
        failed += sum(not r.ok for r in results) if results else 1  # none: the check could not run
    return 1 if failed else 0


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the command's whole process group, SIGKILL after KILL_GRACE seconds if still there."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def sh(cmd, log: Path, env=None, timeout=480) -> int:
    """Run ``cmd`` in its own process group, its output into ``log``; the exit status (124 when its
    time ran out: the whole group is then killed, children such as a sanitizer's workload too)."""
    with open(log, "w") as f:
        f.write("$ " + " ".join(map(str, cmd)) + "\n")
        f.flush()
        try:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                    start_new_session=True)
        except FileNotFoundError as exc:
            f.write(f"\n{exc}\n")
            return 127
        _RUNNING.append(proc)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            f.write(f"\ntimed out after {timeout:.0f} s: process group {proc.pid} killed\n")
            return 124
        finally:
            _RUNNING.remove(proc)


def environment(out: Path) -> int:
    lines = [f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}", f"python: {sys.version.split()[0]}",
             f"numpy: {np.__version__}"]
    try:
        import cupy

        rt = cupy.cuda.runtime
        lines += [f"cupy: {cupy.__version__}", f"cuda runtime: {rt.runtimeGetVersion()}",
                  f"cuda driver: {rt.driverGetVersion()}",
                  f"device: {rt.getDeviceProperties(0)['name'].decode()}"]
    except Exception as exc:  # report, do not stop: the other parts say more
        lines.append(f"cupy: unusable ({type(exc).__name__}: {exc})")
    try:
        import torch

        lines.append(f"torch: {torch.__version__} (cuda {torch.version.cuda}, available {torch.cuda.is_available()})")
    except ImportError:
        lines.append("torch: not installed")
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            lines.append(subprocess.run([smi], capture_output=True, text=True, timeout=30).stdout)
        except subprocess.TimeoutExpired:
            lines.append("nvidia-smi: timed out after 30 s")
    (out / "env.txt").write_text("\n".join(lines) + "\n")
    return 0


def part_timeout(budget: float | None, started: float, parts_left: int, cap: float | None = None) -> float:
    """Seconds the next part may run: 480 without a budget; else what the budget has left after
    keeping KEEP_FOR_EACH_LATER_PART for each of the ``parts_left`` parts after it (at least 30);
    never more than ``cap``."""
    if budget is None:
        left = 480.0
    else:
        left = max(30.0, budget - (time.perf_counter() - started) - KEEP_FOR_EACH_LATER_PART * parts_left)
    return left if cap is None else min(cap, left)


def write_summary(out: Path, results: list[str]) -> None:
    summary = ["| part | file | exit status | seconds |", "| --- | --- | ---: | ---: |", *results]
    (out / "summary.md").write_text("\n".join(summary) + "\n")


def pack(out: Path, tar: Path) -> None:
    """Every result file in ``out`` (the archive itself excepted) as one .tar.gz, written beside ``tar``
    and renamed over it: a command killed while packing leaves the archive of the last part whole."""
    tar.parent.mkdir(parents=True, exist_ok=True)
    tmp = tar.with_name(f".{tar.name}.tmp")
    with tarfile.open(tmp, "w:gz") as t:
        for f in sorted(out.iterdir()):
            if f.is_file() and f.resolve() not in (tar.resolve(), tmp.resolve()):
                t.add(f, arcname=f.name)
    os.replace(tmp, tar)


def run_part(part: str, out: Path, env: dict, limit: float, record) -> None:
    """Run one part; ``record(result file, exit status)`` as soon as each of its commands ends."""
    quiet = dict(env, FASTNN_SELFCHECK="0")  # the tests, benchmarks and sanitizers: fastnn's own kernels
    if part == "env":
        record("env.txt", environment(out))
    elif part == "selfcheck":
        record("selfcheck.log", sh([PY, __file__, "--selfcheck"], out / "selfcheck.log", env, limit))
    elif part == "tests":
        record("pytest-gpu.log", sh([PY, "-m", "pytest", "-m", "gpu", "tests/", "-q", "-rs", "-p", "no:cacheprovider",
                                     *per_test_timeout()], out / "pytest-gpu.log", quiet, limit))
    elif part == "sanitize":
        pool_off, t0 = dict(quiet, FASTNN_NO_MEMPOOL="1"), time.perf_counter()
        for tool, workload in (("memcheck", "full"), ("racecheck", "small")):
            share = limit * MEMCHECK_SHARE if tool == "memcheck" else limit - (time.perf_counter() - t0)
            record(f"sanitizer-{tool}.log", sh(
                ["compute-sanitizer", "--tool", tool, "--error-exitcode", "9", PY, __file__, "--kernels", workload],
                out / f"sanitizer-{tool}.log", pool_off, max(10.0, share)))
    else:  # bench: one model's cases; stack: K models at once (benchmarks/test_stack_speed.py)
        name = "bench-gpu" if part == "bench" else "bench-stack-gpu"
        js, t0 = out / f"{name}.json", time.perf_counter()
        files = ["benchmarks/", "--ignore=benchmarks/test_stack_speed.py"] if part == "bench" else \
            ["benchmarks/test_stack_speed.py"]
        record(f"{name}.json", sh([PY, "-m", "pytest", *files, "--benchmark-only", "-k", "gpu", "-p",
                                   "no:cacheprovider", f"--benchmark-json={js}", *per_test_timeout()],
                                  out / f"{name}.log", quiet, limit))
        if js.exists():
            report = [PY, "scripts/bench_report.py", str(js), "--out", str(out / f"{name}.md")]
            report += ["--png", str(out / f"{name}.png")] if part == "bench" else []
            record(f"{name}.md", sh(report, out / f"{name}-report.log", quiet,
                                    max(10.0, limit - (time.perf_counter() - t0))))


def on_signal(signum, frame) -> None:
    """SIGTERM or SIGINT: the running command's process group goes too (it is in a session of its own)."""
    for proc in list(_RUNNING):
        _kill_group(proc)
    sys.exit(128 + signum)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="folder for the results")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    p.add_argument("--data", help="folder holding fashion-mnist/ (for the benchmarks)")
    p.add_argument("--kernels", nargs="?", const="full", choices=("full", "small"),
                   help="run the sanitizers' workload and exit (small: racecheck's)")
    p.add_argument("--selfcheck", action="store_true", help="run and time the GPU self-check and exit")
    p.add_argument("--budget", type=float, help="seconds for all the parts together (one command)")
    p.add_argument("--tar", type=Path, help="pack the result files into this .tar.gz after each part")
    a = p.parse_args()
    if a.kernels:
        run_kernels(small=a.kernels == "small")
        return 0
    if a.selfcheck:
        return run_selfcheck()
    if a.out is None:
        p.error("--out is required")
    asked = [s for s in a.parts.split(",") if s]
    if set(asked) - set(PARTS):
        p.error(f"unknown part(s) {', '.join(sorted(set(asked) - set(PARTS)))}")
    parts = [part for part in PARTS if part in asked]
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    a.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    if a.data:
        env["FASTNN_DATA"] = str(Path(a.data).resolve())
    results, started = [], time.perf_counter()
    for i, part in enumerate(parts):
        t0 = time.perf_counter()

        def record(name: str, code: int, part=part, t0=t0) -> None:
            """A command of the part ended: its row in summary.md, and everything so far into the archive."""
            results.append(f"| {part} | {name} | {code} | {time.perf_counter() - t0:.0f} s |")
            print(results[-1], flush=True)
            write_summary(a.out, results)
            if a.tar:
                pack(a.out, a.tar)

        run_part(part, a.out, env, part_timeout(a.budget, started, len(parts) - i - 1, PART_CAPS.get(part)), record)
    return max(int(r.split("|")[3]) for r in results) if results else 0


if __name__ == "__main__":
    sys.exit(main())
