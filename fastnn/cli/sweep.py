"""``fastnn sweep``: its flags, the worker processes, and the leaderboard and best model at the end
(the Optuna side, search spaces and the worker loop, is ``fastnn.sweep``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from ..backends import ACTIVATIONS, DEVICES, get_ops
from ..config import DEFAULTS as RUN
from ..config import LOSSES, LR_SCHEDULES, OPTIMIZERS, flag_type
from ..errors import ConfigError, FastnnError
from ..model import MLP
from .flags import OneLineParser, _data_flags, _hidden, resolve_config
from .output import _probe_folder
from .train import load_data, model_inputs

SWEEP_HELP = ("Search learning rate, weight decay, momentum, dropout, hidden sizes and seeds with Optuna (grid, "
              "random or TPE), training up to --stack models at once; a leaderboard, the best model, and its "
              "test accuracy (the test set read once). Workers share the study through --storage.")


def sweep_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="fastnn sweep", description=SWEEP_HELP)
    S = argparse.SUPPRESS

    def add(group, flag, help=None, **kw):
        group.add_argument(flag, help=help, **kw)

    _data_flags(p, add, S)
    g = p.add_argument_group("search space: a value (0.1), choices (0.01,0.1,0.3) or a range (1e-4..1e-2; "
                             "log scale for --lr and --weight-decay)")
    g.add_argument("--lr", dest="lr_space", metavar="SPACE", help="(default: 3e-4..3e-3 for adam, 0.01..0.3 otherwise)")
    g.add_argument("--weight-decay", dest="weight_decay_space", metavar="SPACE", default=f"{RUN.weight_decay:g}",
                   help=f"(default: {RUN.weight_decay:g})")
    g.add_argument("--momentum", dest="momentum_space", metavar="SPACE", default=f"{RUN.momentum:g}",
                   help=f"momentum and nesterov (default: {RUN.momentum:g})")
    g.add_argument("--dropout", dest="dropout_space", metavar="SPACE", default=f"{RUN.dropout:g}",
                   help=f"(default: {RUN.dropout:g})")
    g.add_argument("--seeds", dest="seed_space", metavar="SPACE", default=str(RUN.seed),
                   help=f"init and batch-order seeds of the models, e.g. 0..9 (default: {RUN.seed})")
    shape = ",".join(map(str, RUN.hidden))
    g.add_argument("--hidden", dest="hidden_space", nargs="+", type=_hidden, default=[list(RUN.hidden)],
                   metavar="WIDTHS", help=f"one or more shapes, e.g. 128,64 256,128 (default: {shape})")
    g = p.add_argument_group("search")
    g.add_argument("--sampler", choices=["grid", "random", "tpe"], default="tpe", help="(default: tpe)")
    g.add_argument("--trials", type=flag_type("trials"), help="trials in the study, over all workers (default: "
                   f"{RUN.sweep_trials}; the grid's size with --sampler grid)")
    g.add_argument("--stack", type=flag_type("stack"), default=RUN.sweep_stack,
                   help=f"models trained at once (default: {RUN.sweep_stack})")
    g.add_argument("--pruner", choices=["median", "none"], default="median",
                   help="from epoch 2 on, stop a model whose validation accuracy is below the median of the "
                        "completed trials at the same epoch, once 5 have completed (default: median)")
    g.add_argument("--seed", type=flag_type("seed"), default=S, help="seed of the sampler and the validation split "
                   f"(default: {RUN.seed})")
    g = p.add_argument_group("training, shared by every trial")
    add(g, "--device", f"(default: {RUN.device})", choices=DEVICES, default=S)
    add(g, "--optimizer", f"(default: {RUN.optimizer})", choices=OPTIMIZERS, default=S)
    add(g, "--epochs", f"(default: {RUN.sweep_epochs})", type=flag_type("epochs"), default=RUN.sweep_epochs)
    add(g, "--batch-size", f"(default: {RUN.batch_size})", type=flag_type("batch_size"), default=S)
    add(g, "--lr-schedule", f"(default: {RUN.lr_schedule})", choices=LR_SCHEDULES, default=S)
    add(g, "--val-split", f"validation fraction of the training data (default: {RUN.val_split:g})",
        type=flag_type("val_split"), default=S)
    add(g, "--activation", choices=ACTIVATIONS, default=S)
    add(g, "--loss", choices=LOSSES, default=S)
    add(g, "--dtype", choices=["float32", "float64"], default=S)
    add(g, "--class-weight", "balanced: weigh each class's loss by N / (K * its count), for imbalanced data",
        choices=["balanced"], default=S)
    g.add_argument("--cuda-graph", action="store_true", help="GPU: capture each stack's step as a CUDA graph")
    g = p.add_argument_group("study and workers")
    g.add_argument("--study", default="fastnn", help="the study's name in the storage (default: fastnn)")
    g.add_argument("--storage", help="a journal file shared by processes on one machine, or a database URL "
                   "(postgresql://user:password@host/db) shared by machines (default: OUT/sweep.journal)")
    g.add_argument("--out", default="sweep", help="folder for the leaderboard, plot and best model (default: sweep)")
    g.add_argument("--workers", type=flag_type("workers"), default=1,
                   help="worker processes on this machine (default: 1)")
    g.add_argument("--devices", help="GPU numbers, e.g. 0,1,2,3: one worker process per GPU")
    g.add_argument("--worker", type=flag_type("worker"), help=S)  # a worker's index, given by another fastnn sweep
    return p


def run_sweep(argv=None) -> int:
    """``fastnn sweep``: the study's workers (this process, or one process per --workers/--devices),
    then the leaderboard, the best model and its test accuracy."""
    from .. import sweep

    argv = list(sys.argv[1:] if argv is None else argv)
    args = sweep_parser().parse_args(argv)
    cfg = resolve_config(args)
    if not cfg["val_split"]:
        raise ConfigError("a sweep ranks trials on validation data: --val-split must be above 0")
    space = sweep.SearchSpace(
        lr=sweep.parse_space("lr", args.lr_space or ("3e-4..3e-3" if cfg["optimizer"] == "adam" else "0.01..0.3")),
        weight_decay=sweep.parse_space("weight_decay", args.weight_decay_space),
        momentum=sweep.parse_space("momentum", args.momentum_space),
        dropout=sweep.parse_space("dropout", args.dropout_space),
        seed=sweep.parse_space("seeds", args.seed_space, int), hidden=args.hidden_space)
    space.check()
    grid = args.sampler == "grid"
    trials = args.trials or (int(np.prod([len(v) for v in space.grid().values()])) if grid else RUN.sweep_trials)
    devices = [d.strip() for d in args.devices.split(",") if d.strip()] if args.devices else []
    settings = sweep.Settings(epochs=args.epochs, batch_size=cfg["batch_size"], optimizer=cfg["optimizer"],
                              lr_schedule=cfg["lr_schedule"], activation=cfg["activation"], loss=cfg["loss"],
                              dtype=cfg["dtype"], device="gpu" if devices else cfg["device"], stack=args.stack,
                              trials=trials, cuda_graph=args.cuda_graph, class_weight=cfg["class_weight"])
    if args.cuda_graph and not devices and get_ops(cfg["device"]).name != "gpu":
        raise ConfigError("--cuda-graph needs the GPU: add --device gpu (or --devices)")
    out = Path(args.out)
    _probe_folder(out, "--out", out, create=True)
    storage_spec = args.storage or str(out / "sweep.journal")
    pruner = (sweep.optuna().pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2) if args.pruner == "median"
              else sweep.optuna().pruners.NopPruner())
    worker = args.worker is not None
    # each worker's sampler its own seed: two seeded alike would propose the same trials
    sampler_seed = int(np.random.SeedSequence([cfg["seed"], args.worker or 0]).generate_state(1)[0])
    study = sweep.open_study(args.study, sweep.make_storage(storage_spec),
                             sweep.make_sampler(args.sampler, space, sampler_seed), pruner)
    # a study goes on over its own space: another one is refused here, before any data is read
    sweep.check_space(study, space, f"--storage {args.storage}" if args.storage else f"--out {args.out}")
    ds = load_data(cfg)
    inputs = model_inputs(ds, cfg["val_split"], cfg["seed"])
    data = (inputs.x_train, inputs.y_train, inputs.x_val, inputs.y_val, ds.preprocessing, ds.classes)
    who = f"worker {args.worker}: " if worker else ""
    if worker or (args.workers == 1 and not devices):
        if not worker:
            print(f"fastnn sweep: study {args.study!r} in {storage_spec}, {trials} trials, up to {args.stack} "
                  f"models at once, {ds.name} ({len(inputs.y_train)} train / {len(inputs.y_val)} validation)")
        sweep.run_worker(study, space, settings, data, out, log=lambda m: print(who + m, flush=True))
        if worker:
            return 0
    else:
        _run_workers(argv, storage_spec, devices, args.workers)
    return _sweep_report(study, out, ds, inputs)


def _run_workers(argv, storage_spec, devices, n_workers) -> None:
    """Start one ``fastnn sweep --worker`` process per device (or --workers of them) and wait for all."""
    import subprocess

    drop = {"--workers", "--devices", "--storage", "--worker"}
    child, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in drop:
            skip = True
        elif not any(a.startswith(d + "=") for d in drop):
            child.append(a)
    cmd = [sys.executable, "-m", "fastnn", "sweep", *child, "--storage", storage_spec]
    slots = [{"CUDA_VISIBLE_DEVICES": d} for d in devices] or [{} for _ in range(n_workers)]
    procs = [subprocess.Popen(cmd + ["--worker", str(i)] + (["--device", "gpu"] if env else []),
                              env={**os.environ, **env}) for i, env in enumerate(slots)]
    print(f"fastnn sweep: {len(procs)} worker processes on {storage_spec}"
          + (f", GPUs {','.join(devices)}" if devices else ""), flush=True)
    codes = [p.wait() for p in procs]
    if any(codes):
        raise FastnnError(f"worker processes exited with {codes}: see their messages above")


def _sweep_report(study, out: Path, ds, inputs) -> int:
    """Leaderboard (table, JSONL, plot); the best trial's model as best.npz with best.json; its test accuracy."""
    from .. import sweep

    rows = sweep.leaderboard(study)
    print(sweep.format_leaderboard(rows))
    sweep.write_leaderboard(rows, out / "leaderboard.jsonl")
    files = [out / "leaderboard.jsonl"]
    if sweep.plot_leaderboard(rows, out / "leaderboard.png"):
        files.append(out / "leaderboard.png")
    best, path = sweep.best_model_file(study, out)
    info = {"trial": best.number, "val_accuracy": best.value, "params": best.params, **best.user_attrs}
    if path is None:
        print(f"best: trial {best.number} (val accuracy {best.value:.4f}); its model was saved by the worker that "
              f"trained it, as trial-{best.number}.npz in that worker's --out folder")
    else:
        model = MLP.load(path)
        model.save(out / "best.npz")
        info["test_accuracy"] = model.evaluate(inputs.x_test, ds.test_labels)["accuracy"]
        files.append(out / "best.npz")
        print(f"best: trial {best.number}, val accuracy {best.value:.4f}, test accuracy {info['test_accuracy']:.4f} "
              f"(the test set, read once)")
    (out / "best.json").write_text(json.dumps(info, indent=1) + "\n")
    print("wrote " + ", ".join(map(str, files + [out / "best.json"])))
    return 0
