"""scripts/bench_report.py on a small pytest-benchmark JSON written here."""

import json
import subprocess
import sys

from conftest import REPO


def test_table_and_speedups(tmp_path):
    data = {"datetime": "2026-11-23", "machine_info": {"cpu": {"brand_raw": "Test CPU", "count": 2}},
            "benchmarks": [
                {"name": "test_naive_per_sample_loop", "group": "epoch-cpu",
                 "extra_info": {"impl": "naive", "epoch_seconds": 12.0, "samples_per_s": 5000.0,
                                "gflops": 2.0, "slice": "timed 3000 samples"}},
                {"name": "test_fastnn_batched_cpu[128]", "group": "epoch-cpu",
                 "extra_info": {"impl": "fastnn batch 128", "epoch_seconds": 0.3, "samples_per_s": 200000.0,
                                "gflops": 60.0}},
                {"name": "test_stacked[16-cpu]", "group": "stack-cpu",
                 "extra_info": {"models": 16, "models_per_s": 2.0, "stacked_epoch_seconds": 8.0,
                                "sequential_epoch_seconds": 10.0, "one_model_epoch_seconds": 0.5,
                                "torch_vmap_epoch_seconds": 9.0, "sequential_over_stacked": 1.25,
                                "stacked_over_one_model": 16.0}},
                {"name": "test_gemm_peak[cpu]", "group": "gemm-peak",
                 "extra_info": {"gflops": 170.0, "shape": "2048x2048x2048"}},
            ]}
    path = tmp_path / "b.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "r.md"
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_report.py"), str(path), "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    assert "| epoch-cpu | fastnn batch 128 | 0.300 | 200,000 | 60.0 | 40.0x |  |" in text
    assert "| epoch-cpu | naive | 12.000 | 5,000 | 2.0 | 1.0x | timed 3000 samples |" in text
    assert "GEMM peak (test_gemm_peak[cpu]): 170.0 GFLOP/s" in text
    assert "Test CPU, 2 cores" in text
    assert "| cpu | 16 | 8.00 |  |  | 10.00 | 0.50 |  | 9.00 |  | 1.25x | 16.0x |" in text
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_report.py"), str(bad)],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "not a readable pytest-benchmark JSON" in r.stderr

