"""scripts/gpu_check.py's bookkeeping, on the CPU: the time budget shared by the parts, the summary
written after each part, and the archive that comes back from a device machine as one file."""

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import time
import types
from pathlib import Path

from conftest import REPO


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_each_part_leaves_a_minute_to_each_later_one():
    gc = load_gpu_check()
    now = time.perf_counter()
    assert gc.part_timeout(None, now, 3) == 480  # no budget: each part its own 8 minutes
    assert abs(gc.part_timeout(500, now, 4) - (500 - 4 * gc.KEEP_FOR_EACH_LATER_PART)) < 1
    assert abs(gc.part_timeout(500, now - 100, 0) - 400) < 1  # the last part gets what is left
    assert gc.part_timeout(500, now - 490, 2) == 30  # never less than 30 s
    assert gc.part_timeout(500, now, 0, cap=90) == 90  # nor more than its cap
    assert sum(gc.PART_CAPS.values()) <= 510 - 60  # a minute at least for the sanitizers, in the command of 510 s


def test_one_command_writes_the_summary_and_packs_every_file(tmp_path):
    out, tar = tmp_path / "results", tmp_path / "back" / "gpu-check.tar.gz"
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--out", str(out), "--parts", "env",
                        "--budget", "60", "--tar", str(tar)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "| env | env.txt | 0 |" in (out / "summary.md").read_text()
    with tarfile.open(tar) as t:
        names = sorted(t.getnames())
        assert names == ["env.txt", "summary.md"]
        assert b"numpy:" in t.extractfile("env.txt").read()


def process_gone(pid: int, seconds: float = 10.0) -> bool:
    """Whether process ``pid`` has ended (gone, or a zombie nobody reaped) within ``seconds``."""
    stat = Path(f"/proc/{pid}/stat")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                return True
        except (FileNotFoundError, ProcessLookupError):
            return True
        time.sleep(0.05)
    return False


def test_a_command_out_of_time_is_killed_with_its_whole_process_group(tmp_path, monkeypatch):
    """A fake sanitizer that ignores SIGTERM and starts a child that does too: at the limit the whole
    group gets SIGTERM, then SIGKILL, and nothing of it lives on."""
    gc = load_gpu_check()
    monkeypatch.setattr(gc, "KILL_GRACE", 1)
    fake = tmp_path / "fake-sanitizer"
    fake.write_text(f"#!/bin/sh\ntrap '' TERM\nsleep 300 &\necho $$ $! > {tmp_path / 'pids'}\nwait\n")
    fake.chmod(0o755)
    t0 = time.monotonic()
    code = gc.sh([str(fake)], tmp_path / "log", timeout=1.0)
    assert code == 124 and time.monotonic() - t0 < 8
    parent, child = map(int, (tmp_path / "pids").read_text().split())
    assert parent != os.getpgid(0)  # it ran in a process group of its own
    assert process_gone(parent) and process_gone(child)
    assert "timed out after 1 s: process group" in (tmp_path / "log").read_text()
    assert gc._RUNNING == []


FAKE_SANITIZER = """#!{python}
import json, os, sys, tarfile
with tarfile.open(os.environ["CHECK_TAR"]) as t:
    packed = sorted(t.getnames())
with open(os.environ["CHECK_LOG"], "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "pool_off": os.environ.get("FASTNN_NO_MEMPOOL"),
                        "selfcheck": os.environ.get("FASTNN_SELFCHECK"), "own_session": os.getsid(0) == os.getpid(),
                        "packed": packed}}) + "\\n")
"""


def test_the_parts_run_in_order_and_each_is_packed_as_it_ends(tmp_path):
    """--parts in any order: env, selfcheck, then sanitize (compute-sanitizer faked): memcheck's full
    workload, racecheck's small one, both with the memory pool off, the self-check off, in a session
    of their own; when the sanitizers start, the archive already holds what the earlier parts wrote."""
    out, tar, bin_dir = tmp_path / "results", tmp_path / "back" / "gpu-check.tar.gz", tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "compute-sanitizer").write_text(FAKE_SANITIZER.format(python=sys.executable))
    (bin_dir / "compute-sanitizer").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", CHECK_TAR=str(tar),
               CHECK_LOG=str(tmp_path / "calls"))
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--out", str(out), "--parts",
                        "sanitize,selfcheck,env", "--budget", "200", "--tar", str(tar)], capture_output=True,
                       text=True, timeout=300, env=env)
    summary = (out / "summary.md").read_text()
    assert [line.split("|")[1].strip() for line in summary.splitlines()[2:]] == ["env", "selfcheck", "sanitize",
                                                                                  "sanitize"], summary
    assert "| sanitize | sanitizer-memcheck.log | 0 |" in summary and "| env | env.txt | 0 |" in summary
    calls = [json.loads(line) for line in (tmp_path / "calls").read_text().splitlines()]
    assert [c["argv"][:2] + c["argv"][-2:] for c in calls] == [["--tool", "memcheck", "--kernels", "full"],
                                                               ["--tool", "racecheck", "--kernels", "small"]]
    assert all(c["argv"][4] == "python3" and c["pool_off"] == "1" and c["selfcheck"] == "0" and c["own_session"]
               for c in calls), calls
    assert calls[0]["packed"] == ["env.txt", "selfcheck.log", "summary.md"]  # packed before the sanitizers ran
    assert calls[1]["packed"] == ["env.txt", "sanitizer-memcheck.log", "selfcheck.log", "summary.md"]  # memcheck's
    with tarfile.open(tar) as t:
        assert sorted(t.getnames()) == ["env.txt", "sanitizer-memcheck.log", "sanitizer-racecheck.log",
                                        "selfcheck.log", "summary.md"]
    assert sorted(p.name for p in tar.parent.iterdir()) == ["gpu-check.tar.gz"]  # no temporary left
    assert "$ python3 " in (out / "selfcheck.log").read_text()
    assert r.returncode == max(int(line.split("|")[3]) for line in summary.splitlines()[2:])


def test_the_sanitizers_workload_turns_the_memory_pool_off(monkeypatch):
    gc = load_gpu_check()
    calls = []
    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(set_allocator=lambda a: calls.append(("device", a)),
                                                            set_pinned_memory_allocator=lambda a: calls.append(
                                                                ("pinned", a))))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.delenv("FASTNN_NO_MEMPOOL", raising=False)
    gc.memory_pool_off()
    assert calls == []
    monkeypatch.setenv("FASTNN_NO_MEMPOOL", "1")
    gc.memory_pool_off()
    assert calls == [("device", None), ("pinned", None)]


def test_the_selfcheck_part_on_the_emulated_gpu(emulated_gpu, monkeypatch, tmp_path, capsys):
    from fastnn.backends import selfcheck

    gc = load_gpu_check()
    monkeypatch.setattr(selfcheck, "_DONE", {})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # run_selfcheck points it at a new folder; put back after
    monkeypatch.setenv("FASTNN_SELFCHECK", "0")  # which it ignores
    assert gc.run_selfcheck() == 0
    text = capsys.readouterr().out
    from fastnn.backends.cupy_ops import CupyOps

    checks = 2 * len(selfcheck.fused_kernels(CupyOps))  # each kernel in float32 and float64
    assert checks >= 40 and text.count(f"{checks} of {checks} checks passed") == 2
    assert "## gemm=fastnn" in text and "## gemm=cublas" in text
    assert "warning" not in text


def test_racechecks_small_workload_runs_on_the_emulated_gpu(emulated_gpu, monkeypatch, capsys):
    """The workload racecheck runs (``--kernels small``), end to end on the emulator; the full one (memcheck's)
    is the same code with more batch sizes, optimizers, cuBLAS epilogues and captured steps."""
    gc = load_gpu_check()
    monkeypatch.setenv("FASTNN_SELFCHECK", "0")  # as the sanitize part runs it
    launches = emulated_gpu.emulator_state.launches
    gc.run_kernels(small=True)
    assert "kernels ran: 2 batch sizes x 2 dtypes x 2 losses, sgd stacks, conv nets" in capsys.readouterr().out
    assert {"conv_act_f32", "conv_weight_grad_f64", "conv_grad_sum_f32", "conv_input_grad_f64", "maxpool_f32",
            "maxpool_backward_f64", "translate_f32"} <= emulated_gpu.emulator_state.kernels_launched
    assert emulated_gpu.emulator_state.launches - launches > 100
