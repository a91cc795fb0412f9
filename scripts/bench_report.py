#!/usr/bin/env python3
"""Turn pytest-benchmark JSON into a markdown table (and optionally a PNG chart).

    pytest benchmarks/ --benchmark-only --benchmark-json bench.json
    python scripts/bench_report.py bench.json [--png chart.png] [--out results.md]

Seconds per epoch come from each case's ``extra_info["epoch_seconds"]`` (per-sample
cases timed a slice and scaled it); speedups are against the naive per-sample loop
of the same run.
"""

import argparse
import json
import sys
from pathlib import Path


def load(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        sys.exit(f"error: {path}: not a readable pytest-benchmark JSON file ({exc})")


def table(data) -> str:
    benches = data.get("benchmarks", [])
    by_name = {b["name"]: b for b in benches}
    naive = by_name.get("test_naive_per_sample_loop", {}).get("extra_info", {}).get("epoch_seconds")
    machine = data.get("machine_info", {})
    lines = [f"Machine: {machine.get('cpu', {}).get('brand_raw', machine.get('processor', '?'))}, "
             f"{machine.get('cpu', {}).get('count', '?')} cores; run {data.get('datetime', '?')}", ""]
    if any("epoch_seconds" in b.get("extra_info", {}) for b in benches):
        lines += ["| group | case | seconds per epoch | samples/s | GFLOP/s | speedup over naive | note |",
                  "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for b in benches:
        e = b.get("extra_info", {})
        if "epoch_seconds" not in e:
            continue
        speed = f"{naive / e['epoch_seconds']:.1f}x" if naive else ""
        lines.append(f"| {b['group']} | {e.get('impl', b['name'])} | {e['epoch_seconds']:.3f} | "
                     f"{e['samples_per_s']:,.0f} | {e.get('gflops', 0):.1f} | {speed} | {e.get('slice', '')} |")
    for b in benches:
        e = b.get("extra_info", {})
        if b["group"] == "gemm-peak":
            lines.append(f"\nGEMM peak ({b['name']}): {e['gflops']:.1f} GFLOP/s at {e['shape']} float32")
        if "naive_over_fastnn" in e:
            lines.append(
                f"\nAlternating in one process (medians): naive {e['naive_epoch_seconds']:.2f} s, "
                f"fastnn batch 128 {e['fastnn_epoch_seconds']:.3f} s, PyTorch batch 128 "
                f"{e['torch_epoch_seconds']:.3f} s, the GEMMs alone {e['gemm_epoch_seconds']:.3f} s: "
                f"fastnn is {e['naive_over_fastnn']:.1f}x the naive loop, {e['torch_over_fastnn']:.2f}x "
                f"PyTorch, and takes {e['fastnn_over_gemm']:.2f}x its GEMM time.")
    lines += stack_table(benches)
    return "\n".join(lines) + "\n"


STACK_CASES = ("stacked", "stacked_graph", "stacked_cublas", "sequential", "one_model", "torch_loop", "torch_vmap",
               "jax_vmap")


def stack_table(benches) -> list[str]:
    """K models at once (benchmarks/test_stack_speed.py): seconds per epoch of all K, each case."""
    rows = [b for b in benches if "models_per_s" in b.get("extra_info", {})]
    if not rows:
        return []
    out = ["", "| device | K | " + " | ".join(STACK_CASES) + " | sequential / stacked | stacked / one model |",
           "| --- | ---: |" + " ---: |" * (len(STACK_CASES) + 2)]
    for b in rows:
        e = b["extra_info"]
        cells = [f"{e[c + '_epoch_seconds']:.2f}" if c + "_epoch_seconds" in e else "" for c in STACK_CASES]
        out.append(f"| {b['group'].removeprefix('stack-')} | {e['models']} | " + " | ".join(cells)
                   + f" | {e['sequential_over_stacked']:.2f}x | {e['stacked_over_one_model']:.1f}x |")
    return out + ["", "Seconds per epoch of 60000 samples for all K models (slices scaled; medians of rounds "
                      "alternating in one process)."]


def chart(data, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("error: --png needs matplotlib: pip install 'fastnn[plots]'")
    rows = [(b["extra_info"].get("impl", b["name"]), b["extra_info"]["epoch_seconds"])
            for b in data["benchmarks"] if "epoch_seconds" in b.get("extra_info", {})
            and b["group"].startswith("epoch")]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1))
    ax.barh([r[0] for r in rows], [r[1] for r in rows])
    ax.set_xscale("log")
    ax.set_xlabel("seconds per epoch of 60000 samples (log scale)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json")
    p.add_argument("--png")
    p.add_argument("--out")
    a = p.parse_args()
    data = load(a.json)
    text = table(data)
    if a.out:
        Path(a.out).write_text(text)
    print(text)
    if a.png:
        chart(data, a.png)


if __name__ == "__main__":
    main()
