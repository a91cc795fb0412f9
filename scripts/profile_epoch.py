#!/usr/bin/env python3
"""Where the time of one batched epoch goes, kernel by kernel.

    python scripts/profile_epoch.py [--device cpu] [--batch-size 128] [--data-dir DIR]

Wraps every kernel of the backend in a timer (synchronising after each on the GPU,
which slows the GPU epoch itself), runs a few epochs of 784-128-64-10 relu with SGD,
and prints each kernel's share of the last epoch. Falls back to synthetic data of
Fashion-MNIST's shape when the real data is not found.
"""

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fastnn  # noqa: E402

KERNELS = ["gather_rows", "gather_labels", "linear_act", "input_grad", "param_grads", "xent", "mse", "sgd",
           "momentum", "adam"]  # the calls the model and optimizer make


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    a = p.parse_args()
    try:
        ds = fastnn.datasets.load("fashion-mnist", root=a.data_dir, download=False)
        x, y, what = ds.train_images, ds.train_labels, "Fashion-MNIST"
    except fastnn.DataError:
        rng = np.random.default_rng(0)
        x, y, what = rng.integers(0, 256, (60000, 784), dtype=np.uint8), rng.integers(0, 10, 60000), "synthetic"
    model = fastnn.MLP([784, 128, 64, 10], device=a.device)
    opt = fastnn.make_optimizer("sgd", model, 0.01)
    xd, yd = model.to_device(x, y)
    ops = model.ops
    totals, counts = defaultdict(float), defaultdict(int)
    for name in KERNELS:
        fn = getattr(ops, name)

        def timed(*args, _fn=fn, _name=name, **kw):
            t0 = time.perf_counter()
            _fn(*args, **kw)
            ops.synchronize()
            totals[_name] += time.perf_counter() - t0
            counts[_name] += 1
        setattr(ops, name, timed)
    rng = np.random.default_rng(0)
    for _ in range(3):
        totals.clear()
        counts.clear()
        rec = fastnn.train_epoch(model, opt, xd, yd, a.batch_size, rng)
    epoch = rec["seconds"]
    print(f"one epoch of {len(y)} samples ({what}), 784-128-64-10 relu, SGD, batch {a.batch_size}, "
          f"device {model.device}: {epoch:.3f} s")
    print(f"{'kernel':<14}{'calls':>8}{'seconds':>10}{'share':>8}")
    for name, t in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"{name:<14}{counts[name]:>8}{t:>10.4f}{t / epoch:>8.1%}")
    rest = epoch - sum(totals.values())
    print(f"{'python/other':<14}{'':>8}{rest:>10.4f}{rest / epoch:>8.1%}")
    gemm = totals["linear_act"] + totals["input_grad"] + totals["param_grads"]
    print(f"share of the three layer calls (GEMMs with their epilogues): {gemm / epoch:.1%}")


if __name__ == "__main__":
    main()
