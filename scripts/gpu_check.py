#!/usr/bin/env python3
"""Everything that needs a GPU, in one command: environment, GPU tests, sanitizers, benchmarks.

    python scripts/gpu_check.py --out DIR [--parts env,tests,sanitize,bench] [--data DIR]

Writes into DIR: ``env.txt`` (nvidia-smi, Python, NumPy, CuPy, CUDA and PyTorch versions),
``pytest-gpu.log`` (``pytest -m gpu``), ``sanitizer-memcheck.log`` and
``sanitizer-racecheck.log`` (compute-sanitizer over every fused kernel at batch sizes
1, 255, 256, 257 and 10000, float32 and float64, cross-entropy and MSE, every optimizer),
``bench-gpu.json``, ``bench-gpu.md`` and ``bench-gpu.png`` (the GPU cases of ``benchmarks/``: fastnn eager and
captured, PyTorch eager and captured, per-sample, batch sizes 32-2048, the width sweep, the
GEMM peak), ``bench-stack-gpu.json`` and ``.md`` (the ``stack`` part: K = 1, 4, 16, 64 models
stacked, captured, sequential, against PyTorch and JAX), and ``summary.md`` with each part's
exit status and duration. ``--data`` names
the folder holding ``fashion-mnist/`` (default: ``$FASTNN_DATA`` or ``../shared/data``).
``--kernels`` is the sanitizers' workload, run under compute-sanitizer by the ``sanitize`` part.

``--budget SECONDS`` fits every part into one command of that length: the parts run in the order
given, each stopped when its share runs out (at least a minute is kept for each part still to
come), and ``summary.md`` is rewritten after each part, so a command stopped from outside still
leaves it. ``--tar FILE`` packs the result files into one ``.tar.gz`` at the end (a device
machine hands back at most 8 files). One command for a 15-minute GPU session, with
Fashion-MNIST copied into the ignored folder ``.data`` and carried:

    python scripts/gpu_check.py --out /tmp/gpu-check --parts env,tests,bench,sanitize,stack \\
        --budget 500 --tar $OUT/gpu-check.tar.gz --data .data
"""

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PARTS = ("env", "tests", "sanitize", "bench", "stack")
BATCHES = (1, 255, 256, 257, 10000)
KEEP_FOR_EACH_LATER_PART = 60  # seconds of --budget that a part leaves to each part after it
PER_TEST_SECONDS = 120  # with pytest-timeout installed, a test or benchmark case that hangs fails alone


def per_test_timeout() -> list[str]:
    """pytest flags that fail any one test after PER_TEST_SECONDS, where pytest-timeout is installed:
    the part goes on and pytest-benchmark still writes the JSON of the cases that ran."""
    import importlib.util

    return ["--timeout", str(PER_TEST_SECONDS)] if importlib.util.find_spec("pytest_timeout") else []


def run_kernels() -> None:
    """Every fused kernel at the edge batch sizes (the sanitizers' workload)."""
    import fastnn
    from fastnn.backends.cupy_ops import CupyOps

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (10000, 784), dtype=np.uint8)
    y = rng.integers(0, 10, 10000)
    for dtype in ("float32", "float64"):
        for loss in ("xent", "mse"):
            for opt in ("sgd", "nesterov", "adam"):
                m = fastnn.MLP([784, 33, 10], activation="tanh" if loss == "mse" else "relu", loss=loss,
                               device="gpu", dtype=dtype)
                for b in BATCHES:
                    fastnn.fit(m, x[:b], y[:b], epochs=1, batch_size=b, lr=1e-3, optimizer=opt, lr_schedule="constant")
                    m.evaluate(x[:b], y[:b], batch_size=b)
                if opt == "sgd":  # the captured step
                    fastnn.fit(m, x[:1000], y[:1000], epochs=1, batch_size=256, lr=1e-3, cuda_graph=True,
                               optimizer="sgd", lr_schedule="constant")
        m = fastnn.MLP([784, 33, 10], device=CupyOps("cublas"), dtype=dtype)  # the cuBLAS epilogues
        for b in BATCHES:
            fastnn.fit(m, x[:b], y[:b], epochs=1, batch_size=b, lr=1e-3, optimizer="sgd", lr_schedule="constant")
        for opt in ("sgd", "momentum", "adam"):  # stacks: models on grid z, per-model hyperparameters and dropout
            for seed in (0, [0, 1, 2]):  # one shared batch order, one per model
                st = fastnn.ModelStack([784, 33, 10], [0, 1, 2], device="gpu", dtype=dtype, dropout=[0.0, 0.2, 0.5])
                for b in BATCHES:
                    fastnn.fit_many(st, x[:b], y[:b], epochs=1, batch_size=b, lr=[1e-3, 2e-3, 3e-3], optimizer=opt,
                                    seed=seed, x_val=x[:b], y_val=y[:b], lr_schedule="constant")
                fastnn.fit_many(st, x[:1000], y[:1000], epochs=1, batch_size=256, lr=[1e-3, 2e-3, 3e-3],
                                optimizer=opt, seed=seed, cuda_graph=True, lr_schedule="constant")
    m.ops.synchronize()
    print("kernels ran:", len(BATCHES), "batch sizes x 2 dtypes x 2 losses x 3 optimizers, cuBLAS GEMMs, and stacks")


def sh(cmd, log: Path, env=None, timeout=480) -> int:
    """Run ``cmd``, its output into ``log``; the exit status (124 on time-out)."""
    with open(log, "w") as f:
        f.write("$ " + " ".join(map(str, cmd)) + "\n")
        f.flush()
        try:
            return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            f.write(f"\ntimed out after {timeout} s\n")
            return 124
        except FileNotFoundError as exc:
            f.write(f"\n{exc}\n")
            return 127


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
        lines.append(subprocess.run([smi], capture_output=True, text=True).stdout)
    (out / "env.txt").write_text("\n".join(lines) + "\n")
    return 0


def part_timeout(budget: float | None, started: float, parts_left: int) -> float:
    """Seconds the next part may run: 480 without a budget; else what the budget has left after
    keeping KEEP_FOR_EACH_LATER_PART for each of the ``parts_left`` parts after it (at least 30)."""
    if budget is None:
        return 480
    left = budget - (time.perf_counter() - started) - KEEP_FOR_EACH_LATER_PART * parts_left
    return max(30.0, left)


def write_summary(out: Path, results: list[str]) -> None:
    summary = ["| part | file | exit status | seconds |", "| --- | --- | ---: | ---: |", *results]
    (out / "summary.md").write_text("\n".join(summary) + "\n")


def pack(out: Path, tar: Path) -> None:
    """Every result file in ``out`` (the archive itself excepted) as one .tar.gz."""
    tar.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar, "w:gz") as t:
        for f in sorted(out.iterdir()):
            if f.is_file() and f.resolve() != tar.resolve():
                t.add(f, arcname=f.name)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="folder for the results")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    p.add_argument("--data", help="folder holding fashion-mnist/ (for the benchmarks)")
    p.add_argument("--kernels", action="store_true", help="run the sanitizers' workload and exit")
    p.add_argument("--budget", type=float, help="seconds for all the parts together (one command)")
    p.add_argument("--tar", type=Path, help="pack the result files into this .tar.gz at the end")
    a = p.parse_args()
    if a.kernels:
        run_kernels()
        return 0
    if a.out is None:
        p.error("--out is required")
    parts = [s for s in a.parts.split(",") if s]
    if set(parts) - set(PARTS):
        p.error(f"unknown part(s) {', '.join(sorted(set(parts) - set(PARTS)))}")
    a.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    if a.data:
        env["FASTNN_DATA"] = str(Path(a.data).resolve())
    py, results, started = sys.executable, [], time.perf_counter()
    for i, part in enumerate(parts):
        t0 = time.perf_counter()
        limit = part_timeout(a.budget, started, len(parts) - i - 1)
        if part == "env":
            codes = {"env.txt": environment(a.out)}
        elif part == "tests":
            codes = {"pytest-gpu.log": sh([py, "-m", "pytest", "-m", "gpu", "tests/", "-q", "-rs", "-p",
                                           "no:cacheprovider", *per_test_timeout()], a.out / "pytest-gpu.log",
                                          env, limit)}
        elif part == "sanitize":
            codes = {f"sanitizer-{tool}.log": sh(["compute-sanitizer", "--tool", tool, "--error-exitcode", "9",
                                                  py, __file__, "--kernels"], a.out / f"sanitizer-{tool}.log", env,
                                                 limit / 2)
                     for tool in ("memcheck", "racecheck")}
        else:  # bench: one model's cases; stack: K models at once (benchmarks/test_stack_speed.py)
            name = "bench-gpu" if part == "bench" else "bench-stack-gpu"
            js = a.out / f"{name}.json"
            files = ["benchmarks/", "--ignore=benchmarks/test_stack_speed.py"] if part == "bench" else \
                ["benchmarks/test_stack_speed.py"]
            codes = {f"{name}.json": sh([py, "-m", "pytest", *files, "--benchmark-only", "-k", "gpu",
                                         "-p", "no:cacheprovider", f"--benchmark-json={js}", *per_test_timeout()],
                                        a.out / f"{name}.log", env, limit)}
            if js.exists():
                report = [py, "scripts/bench_report.py", str(js), "--out", str(a.out / f"{name}.md")]
                report += ["--png", str(a.out / f"{name}.png")] if part == "bench" else []
                codes[f"{name}.md"] = sh(report, a.out / f"{name}-report.log", env)
        for name, code in codes.items():
            results.append(f"| {part} | {name} | {code} | {time.perf_counter() - t0:.0f} s |")
            print(results[-1], flush=True)
        write_summary(a.out, results)
    if a.tar:
        pack(a.out, a.tar)
    return max(int(r.split("|")[3]) for r in results) if results else 0


if __name__ == "__main__":
    sys.exit(main())
