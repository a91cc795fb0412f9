#!/usr/bin/env python3
"""Turn pytest-benchmark JSON into a markdown table (and optionally a PNG chart).

    pytest benchmarks/ --benchmark-only --benchmark-json bench.json
    python scripts/bench_report.py bench.json [--png chart.png] [--out results.md]

Seconds per epoch come from each case's ``extra_info["epoch_seconds"]`` (per-sample
cases timed a slice and scaled it; the conv-net cases an epoch of a subset); speedups
are against the naive per-sample loop of the same run and the same network (the
conv-net cases of benchmarks/test_conv_speed.py have none: no speedups for them).
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
    infos = [b.get("extra_info", {}) for b in benches]
    # the naive loop's seconds per epoch by network: None for the MLP's cases, which record no network
    naive = {e.get("network"): e["epoch_seconds"] for b, e in zip(benches, infos)
             if b["name"] == "test_naive_per_sample_loop" and "epoch_seconds" in e}
    machine = data.get("machine_info", {})
    lines = [f"Machine: {machine.get('cpu', {}).get('brand_raw', machine.get('processor', '?'))}, "
             f"{machine.get('cpu', {}).get('count', '?')} cores; run {data.get('datetime', '?')}", ""]
    if any("epoch_seconds" in e for e in infos):
        lines += ["| group | case | seconds per epoch | samples/s | GFLOP/s | speedup over naive | note |",
                  "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for b, e in zip(benches, infos):
        if "epoch_seconds" not in e:
            continue
        base = naive.get(e.get("network"))
        speed = f"{base / e['epoch_seconds']:.1f}x" if base else ""
        lines.append(f"| {b['group']} | {e.get('impl', b['name'])} | {e['epoch_seconds']:.3f} | "
                     f"{e['samples_per_s']:,.0f} | {e.get('gflops', 0):.1f} | {speed} | {note(e)} |")
    for network in dict.fromkeys(e["network"] for e in infos if "network" in e):
        groups = ", ".join(dict.fromkeys(b["group"] for b, e in zip(benches, infos) if e.get("network") == network))
        lines.append(f"\nThe {groups} cases train {network}"
                     + ("." if network in naive else "; no naive loop of this network ran, so no speedups."))
    for b, e in zip(benches, infos):
        if b["group"] == "gemm-peak":
            lines.append(f"\nGEMM peak ({b['name']}): {e['gflops']:.1f} GFLOP/s at {e['shape']} float32")
        line = alternating(e)
        if line:
            lines.append("\nAlternating in one process (medians)" + line)
    lines += stack_table(benches)
    return "\n".join(lines) + "\n"


def note(e) -> str:
    """What a row timed and how it was scaled: the MLP's ``slice``, or a conv-net row's subset, batch, threads."""
    if "images" not in e:
        return e.get("slice", "")
    used = "" if e.get("threads") is None else ", " + threads(e["threads"])
    epoch = round(e["epoch_seconds"] * e["samples_per_s"])  # record()'s scale: images per epoch (60000)
    return f"timed an epoch of the first {e['images']} images at batch {e['batch']}{used}, scaled to {epoch}"


def threads(n) -> str:
    return "its default threads" if n is None else f"{n} thread" + ("s" if n != 1 else "")


def alternating(e) -> str | None:
    """The rest of the sentence for a case alternated round by round in one process (None for any other):
    the MLP's (benchmarks/test_train_speed.py) or one of benchmarks/test_conv_speed.py's ratio cases."""
    if "naive_over_fastnn" in e:
        return (f": naive {e['naive_epoch_seconds']:.2f} s, "
                f"fastnn batch 128 {e['fastnn_epoch_seconds']:.3f} s, PyTorch batch 128 "
                f"{e['torch_epoch_seconds']:.3f} s, the GEMMs alone {e['gemm_epoch_seconds']:.3f} s: "
                f"fastnn is {e['naive_over_fastnn']:.1f}x the naive loop, {e['torch_over_fastnn']:.2f}x "
                f"PyTorch, and takes {e['fastnn_over_gemm']:.2f}x its GEMM time.")
    if "network" not in e:
        return None
    net = e["network"].split(" (")[0]  # "network3 (conv20k5,...)": its name
    if "per_sample_over_batched" in e:
        return (f", {net}, BLAS {threads(e['threads'])}: batch 1 {e['per_sample_us_per_image']:,.0f} us per image "
                f"(epochs of {e['per_sample_images']} images), batch {e['batch']} "
                f"{e['batched_us_per_image']:,.0f} us per image ({e['batched_images']} images): batch 1 takes "
                f"{e['per_sample_over_batched']:.1f}x as long per image.")
    if "torch_over_fastnn" in e:
        return (f", {net}, epochs of {e['images']} images at batch {e['batch']}: fastnn (BLAS "
                f"{threads(e['fastnn_blas_threads'])}) {e['fastnn_seconds']:.3f} s, PyTorch {e['torch']} "
                f"({threads(e['torch_threads'])}) {e['torch_seconds']:.3f} s: PyTorch takes "
                f"{e['torch_over_fastnn']:.2f}x fastnn's time.")
    if "epoch_over_gemms" in e:
        return (f", {net}, BLAS {threads(e['threads'])}: an epoch of {e['images']} images at batch {e['batch']} "
                f"{e['epoch_seconds_measured']:.3f} s, its GEMMs alone ({e['gemms_per_step']} per step) "
                f"{e['gemm_seconds']:.3f} s ({e['gemm_gflops']:.1f} GFLOP/s): the epoch takes "
                f"{e['epoch_over_gemms']:.2f}x its GEMMs' time; \"{e['claim']}\" "
                + ("holds." if e["claim_holds"] else "does not hold."))
    if "fastnn_eager_seconds" in e:
        cases = [k.removesuffix("_seconds") for k in e if k.endswith("_seconds")]
        medians = ", ".join(f"{c.replace('_', ' ')} {e[c + '_seconds']:.3f} s" for c in cases)
        ratios = "; ".join(f"over {base.replace('_', ' ')}: " + ", ".join(
            f"{c.replace('_', ' ')} {e[f'{c}_over_{base}']:.2f}x" for c in cases if c != base)
            for base in ("fastnn_eager", "fastnn_graph"))
        return (f" on {e['device']}, {net}, epochs of {e['images']} images at batch {e['batch']}, PyTorch "
                f"{e['torch']} (cudnn TF32 {'on' if e['cudnn_tf32'] else 'off'}): {medians}; {ratios}.")
    return None


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
