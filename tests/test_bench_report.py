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



NET = "network3 (conv20k5,pool2,conv40k5,pool2,dense100, relu, Adam, no dropout)"
MLP_NAIVE = {"name": "test_naive_per_sample_loop", "group": "epoch-cpu",
             "extra_info": {"impl": "naive", "epoch_seconds": 12.0, "samples_per_s": 5000.0, "gflops": 2.0,
                            "slice": "timed 3000 samples, scaled to 60000"}}
MLP_RATIO = {"name": "test_ratios_alternating_in_one_process", "group": "ratio-cpu",
             "extra_info": {"naive_epoch_seconds": 16.0, "fastnn_epoch_seconds": 0.4, "torch_epoch_seconds": 0.8,
                            "gemm_epoch_seconds": 0.25, "naive_over_fastnn": 40.0, "torch_over_fastnn": 2.0,
                            "fastnn_over_gemm": 1.6}}


def conv_row(name, group, impl, images, batch, threads, seconds):
    """A conv-net row as benchmarks/test_conv_speed.py's record_conv writes it: ``seconds`` for ``images``."""
    return {"name": name, "group": group, "extra_info": {
        "network": NET, "images": images, "samples": images, "batch": batch, "threads": threads, "impl": impl,
        "device": "cpu (2 cores)", "epoch_seconds": seconds * 60000 / images, "samples_per_s": images / seconds,
        "gflops": 10.0, "us_per_image": seconds / images * 1e6, "slice": f"timed {images} samples, scaled to 60000"}}


CONV_ROWS = [
    conv_row("test_conv_fastnn_per_sample_cpu", "conv-cpu", "fastnn network3 batch 1, float32", 1280, 1, 2, 2.56),
    conv_row("test_conv_fastnn_batched_cpu[threads1]", "conv-cpu", "fastnn network3 batch 128, BLAS 1 threads",
             2560, 128, 1, 1.28),
    conv_row("test_conv_fastnn_gpu[eager]", "conv-gpu", "fastnn network3 batch 128 on the GPU, eager",
             12800, 128, None, 0.64),
]
CONV_RATIOS = [
    {"name": "test_conv_batching_ratio_cpu", "group": "conv-ratio-cpu", "extra_info": {
        "network": NET, "threads": 2, "per_sample_images": 1280, "batched_images": 2560, "batch": 128,
        "per_sample_us_per_image": 2000.0, "batched_us_per_image": 250.0, "per_sample_over_batched": 8.0}},
    {"name": "test_conv_torch_ratio_cpu[threads1]", "group": "conv-ratio-cpu", "extra_info": {
        "network": NET, "images": 2560, "batch": 128, "fastnn_blas_threads": 1, "torch_threads": 1,
        "torch": "2.13.0+cpu", "fastnn_seconds": 0.5, "torch_seconds": 0.6, "torch_over_fastnn": 1.2}},
    {"name": "test_conv_epoch_over_gemms_cpu", "group": "conv-ratio-cpu", "extra_info": {
        "network": NET, "images": 2560, "batch": 128, "threads": 2, "gemms_per_step": 11,
        "epoch_seconds_measured": 0.45, "gemm_seconds": 0.25, "gemm_gflops": 80.0, "epoch_over_gemms": 1.8,
        "claim": "a conv epoch takes <= 1.5x its GEMMs' time", "claim_holds": False}},
    {"name": "test_conv_ratios_gpu_alternating", "group": "conv-ratio-gpu", "extra_info": {
        "network": NET, "device": "NVIDIA H100", "images": 12800, "batch": 128, "torch": "2.13.0",
        "cudnn_tf32": True, "fastnn_eager_seconds": 0.2, "fastnn_graph_seconds": 0.1, "torch_eager_seconds": 0.3,
        "fastnn_graph_over_fastnn_eager": 0.5, "torch_eager_over_fastnn_eager": 1.5,
        "fastnn_eager_over_fastnn_graph": 2.0, "torch_eager_over_fastnn_graph": 3.0}},
]


def report(tmp_path, benchmarks) -> str:
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"benchmarks": benchmarks}))
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_report.py"), str(path)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_conv_rows_say_what_was_timed_and_have_no_speedup_without_their_own_naive_loop(tmp_path):
    text = report(tmp_path, CONV_ROWS)
    assert ("| conv-cpu | fastnn network3 batch 1, float32 | 120.000 | 500 | 10.0 |  | timed an epoch of the "
            "first 1280 images at batch 1, 2 threads, scaled to 60000 |") in text
    assert ("| conv-cpu | fastnn network3 batch 128, BLAS 1 threads | 30.000 | 2,000 | 10.0 |  | timed an epoch "
            "of the first 2560 images at batch 128, 1 thread, scaled to 60000 |") in text
    assert ("| conv-gpu | fastnn network3 batch 128 on the GPU, eager | 3.000 | 20,000 | 10.0 |  | timed an "
            "epoch of the first 12800 images at batch 128, scaled to 60000 |") in text
    assert f"The conv-cpu, conv-gpu cases train {NET}; no naive loop of this network ran, so no speedups." in text


def test_conv_ratio_cases_each_get_a_line(tmp_path):
    text = report(tmp_path, CONV_RATIOS)
    assert ("Alternating in one process (medians), network3, BLAS 2 threads: batch 1 2,000 us per image (epochs of "
            "1280 images), batch 128 250 us per image (2560 images): batch 1 takes 8.0x as long per image.") in text
    assert ("Alternating in one process (medians), network3, epochs of 2560 images at batch 128: fastnn (BLAS "
            "1 thread) 0.500 s, PyTorch 2.13.0+cpu (1 thread) 0.600 s: PyTorch takes 1.20x fastnn's time.") in text
    assert ("Alternating in one process (medians), network3, BLAS 2 threads: an epoch of 2560 images at batch 128 "
            "0.450 s, its GEMMs alone (11 per step) 0.250 s (80.0 GFLOP/s): the epoch takes 1.80x its GEMMs' "
            "time; \"a conv epoch takes <= 1.5x its GEMMs' time\" does not hold.") in text
    assert ("Alternating in one process (medians) on NVIDIA H100, network3, epochs of 12800 images at batch 128, "
            "PyTorch 2.13.0 (cudnn TF32 on): fastnn eager 0.200 s, fastnn graph 0.100 s, torch eager 0.300 s; "
            "over fastnn eager: fastnn graph 0.50x, torch eager 1.50x; over fastnn graph: fastnn eager 2.00x, "
            "torch eager 3.00x.") in text
    assert text.count("Alternating in one process") == 4
    assert "| group |" not in text  # no rows: no table


def test_mixed_file_speedups_only_within_a_network(tmp_path):
    mlp_batched = {"name": "test_fastnn_batched_cpu[128]", "group": "epoch-cpu",
                   "extra_info": {"impl": "fastnn batch 128", "epoch_seconds": 0.3, "samples_per_s": 200000.0,
                                  "gflops": 60.0}}
    text = report(tmp_path, [MLP_NAIVE, mlp_batched, *CONV_ROWS[:2], MLP_RATIO, CONV_RATIOS[1]])
    assert "| epoch-cpu | naive | 12.000 | 5,000 | 2.0 | 1.0x | timed 3000 samples, scaled to 60000 |" in text
    assert "| epoch-cpu | fastnn batch 128 | 0.300 | 200,000 | 60.0 | 40.0x |  |" in text
    assert "| conv-cpu | fastnn network3 batch 128, BLAS 1 threads | 30.000 | 2,000 | 10.0 |  | timed" in text
    assert "| conv-cpu | fastnn network3 batch 1, float32 | 120.000 | 500 | 10.0 |  | timed" in text
    assert ("Alternating in one process (medians): naive 16.00 s, fastnn batch 128 0.400 s, PyTorch batch 128 "
            "0.800 s, the GEMMs alone 0.250 s: fastnn is 40.0x the naive loop, 2.00x PyTorch, and takes 1.60x "
            "its GEMM time.") in text
    assert "PyTorch takes 1.20x fastnn's time." in text
    assert f"The conv-cpu, conv-ratio-cpu cases train {NET}; no naive loop" in text
