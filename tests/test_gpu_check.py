"""scripts/gpu_check.py's bookkeeping, on the CPU: the time budget shared by the parts, the summary
written after each part, and the archive that comes back from a device machine as one file."""

import importlib.util
import subprocess
import sys
import tarfile
import time

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
