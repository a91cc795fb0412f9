"""Hyperparameter sweeps on Optuna, trained as stacks of models (``fastnn sweep``).

A worker asks the study for up to ``stack`` trials at a time (Optuna's ask-and-tell),
groups them by network shape, trains each group as one ``ModelStack`` with per-model
learning rate, weight decay, momentum, dropout and seed, reports every model's validation
accuracy after each epoch to its trial (the pruner's input; a pruned model leaves the
stack) and tells the study each result. Workers share the study through Optuna's storage:
a journal file for many processes on one machine, a database URL (PostgreSQL) for many
machines; each is a plain process, so any scheduler can start them.

Search spaces, their text and their Optuna distributions are ``fastnn.sweep_space``; the journal
file's check and recovery, ``fastnn.journal``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from . import journal
from .config import DEFAULTS
from .errors import ConfigError, DataError
from .stack import ModelStack, fit_many
from .sweep_space import (  # noqa: F401 (the search space's names are the sweep's too)
    LOG_SCALE,
    SCALARS,
    SPACE_KEYS,
    SearchSpace,
    check_space,
    optuna,
    parse_space,
    shape_text,
)

OVER_BUDGET = "asked after the study's last trial: not run"
UNFINISHED = "unfinished: its worker stopped"  # Ctrl-C, SIGTERM or an error; a later run replaces it
ABANDONED = "unfinished: its worker process was gone"  # SIGKILL, the OOM killer: found by the next worker
NOT_COUNTED = (OVER_BUDGET, UNFINISHED, ABANDONED)  # failed trials that do not use up the study's budget


@dataclass
class Settings:
    """What every trial of a sweep shares."""

    epochs: int = DEFAULTS.sweep_epochs
    batch_size: int = DEFAULTS.batch_size
    optimizer: str = DEFAULTS.optimizer
    lr_schedule: str = DEFAULTS.lr_schedule
    activation: str = DEFAULTS.activation
    loss: str = DEFAULTS.loss
    dtype: str = DEFAULTS.dtype
    device: str = "cpu"
    stack: int = DEFAULTS.sweep_stack  # models trained at once
    trials: int = DEFAULTS.sweep_trials  # in the whole study, over all workers
    cuda_graph: bool = False  # replay the captured stacked step (GPU)
    class_weight: str | None = None  # "balanced": each class's loss weighed by N / (K * its count)
    heartbeat_s: float = 60.0  # a worker writes the time into each of its running trials this often
    silent_s: float = 600.0  # a running trial of another machine's worker, silent this long, is taken for lost


def make_sampler(kind: str, space: SearchSpace, seed: int | None):
    o = optuna()
    if kind == "grid":
        class AskTellGrid(o.samplers.GridSampler):
            def after_trial(self, study, trial, state, values):
                pass  # GridSampler stops an optimize() loop when the grid is done; here the trial budget does

        return AskTellGrid(space.grid(), seed=seed)
    if kind == "random":
        return o.samplers.RandomSampler(seed=seed)
    if kind == "tpe":
        return o.samplers.TPESampler(seed=seed)
    raise ConfigError(f"unknown sampler {kind!r}: choose grid, random or tpe")


def make_storage(spec: str | None, warn=None):
    """None: in memory; a URL (``postgresql://...``, ``sqlite:///...``): a database; else a journal file,
    checked first and a torn last record recovered (``fastnn.journal.recover``; ``warn`` says what it did)."""
    o = optuna()
    if spec is None:
        return None
    if "://" in spec:
        try:
            return o.storages.RDBStorage(spec)
        except Exception as exc:  # no driver, no server, bad credentials
            raise ConfigError(f"--storage {spec}: cannot open the database ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0]})") from None
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    journal.recover(spec, warn)
    try:
        return JournalStorage(JournalFileBackend(os.path.abspath(spec)))  # its lock file links here: to resolve
    except (ValueError, KeyError, TypeError, AttributeError, AssertionError) as exc:  # records Optuna cannot replay
        raise DataError(f"{spec}: Optuna cannot read this journal file ({type(exc).__name__}: "
                        f"{(str(exc).splitlines() or [''])[0]})") from None


def open_study(name: str, storage, sampler, pruner):
    return optuna().create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                                 direction="maximize", load_if_exists=True)


def run_worker(study, space: SearchSpace, settings: Settings, data, out_dir: Path | None = None,
               log=print) -> int:
    """Ask, train stacked, tell, until the study holds ``settings.trials`` trials (trials a stopped
    worker left unfinished do not count: a later run trains others in their place). Returns the
    number of trials this worker ran.

    data: ``(x_train, y_train, x_val, y_val, preprocessing, classes)``. out_dir: where the model
    of a trial that beats the study's best so far is saved (``trial-<number>.npz``).
    """
    o = optuna()
    check_space(study, space)
    dists = space.distributions()
    ran = 0
    me = _this_process()
    while True:
        fail_abandoned(study, log, settings.silent_s)
        trials = []
        while len(trials) < settings.stack:
            if len(_counted(study)) >= settings.trials:
                break
            t = study.ask(dists)
            t.set_user_attr("worker", me)
            t.set_user_attr("alive", time.time())
            # another worker may have asked for the last ones meanwhile: the lower numbers keep theirs
            if sorted(c.number for c in _counted(study)).index(t.number) >= settings.trials:
                t.set_user_attr("reason", OVER_BUDGET)
                study.tell(t, state=o.trial.TrialState.FAIL)
                break
            trials.append(t)
        if not trials:
            return ran
        groups: dict[str, list] = {}
        for t in trials:
            groups.setdefault(t.params["hidden"], []).append(t)
        told: set[int] = set()  # the trial numbers told their result
        with Heartbeat(trials, settings.heartbeat_s):
            for hidden, group in groups.items():
                try:
                    _train_group(study, group, hidden, settings, data, out_dir, log, told)
                except BaseException as exc:  # Ctrl-C, SIGTERM, an error: no trial is left RUNNING
                    for t in trials:
                        if t.number not in told:
                            with contextlib.suppress(o.exceptions.UpdateFinishedTrialError):  # failed meanwhile
                                t.set_user_attr("reason", UNFINISHED)
                                study.tell(t, state=o.trial.TrialState.FAIL)
                    raise exc
                ran += len(group)


def _train_group(study, trials, hidden: str, settings: Settings, data, out_dir, log, told: set) -> None:
    """Train trials of one shape as one stack; report epochs, prune, tell results (adding to ``told``)."""
    o = optuna()
    x, y, x_val, y_val, preprocessing, classes = data
    p = [t.params for t in trials]
    sizes = [x.shape[1], *[int(n) for n in hidden.split(",")], len(classes)]
    stack = ModelStack(sizes, [int(q["seed"]) for q in p], settings.activation, settings.loss, device=settings.device,
                       dtype=settings.dtype, dropout=[float(q["dropout"]) for q in p])
    stack.preprocessing, stack.classes = preprocessing, classes
    pruned: set[int] = set()
    lost: set[int] = set()  # trials that another worker failed meanwhile (this one was silent too long)
    log(f"trials {','.join(str(t.number) for t in trials)}: {_models(len(trials))} {'-'.join(map(str, sizes))} "
        "trained stacked")
    t0 = time.perf_counter()

    def on_epoch(records):
        stop = []
        for rec in records:
            t = trials[rec["model"]]
            try:
                t.report(rec["val_accuracy"], rec["epoch"])
            except o.exceptions.UpdateFinishedTrialError:
                log(f"  trial {t.number} was failed by another worker meanwhile: stopped")
                lost.add(rec["model"])
                stop.append(rec["model"])
                continue
            if rec["epoch"] < settings.epochs and t.should_prune():
                pruned.add(rec["model"])
                stop.append(rec["model"])
        best = max(records, key=lambda r: r["val_accuracy"])
        log(f"  epoch {best['epoch']}/{settings.epochs}: {_models(len(records))}, best val accuracy "
            f"{best['val_accuracy']:.4f} (trial {trials[best['model']].number}), {len(pruned)} pruned, "
            f"{time.perf_counter() - t0:.0f} s")
        return stop

    hist = fit_many(stack, x, y, epochs=settings.epochs, batch_size=settings.batch_size,
                    lr=[q["lr"] for q in p], optimizer=settings.optimizer, momentum=[q["momentum"] for q in p],
                    weight_decay=[q["weight_decay"] for q in p], x_val=x_val, y_val=y_val,
                    seed=[int(q["seed"]) for q in p], lr_schedule=settings.lr_schedule, on_epoch=on_epoch,
                    cuda_graph=settings.cuda_graph, class_weight=settings.class_weight)
    seconds = time.perf_counter() - t0
    for k, t in enumerate(trials):
        if k not in lost:
            try:
                _tell(study, t, hist[k][-1], k in pruned, seconds, len(trials), lambda k=k: stack.model(k), out_dir)
            except o.exceptions.UpdateFinishedTrialError:
                log(f"  trial {t.number} was failed by another worker meanwhile: not told")
                lost.add(k)
        told.add(t.number)
    done = [k for k in range(len(trials)) if k not in pruned | lost and not hist[k][-1].get("diverged")]
    best = max(done, key=lambda k: hist[k][-1]["val_accuracy"], default=None)
    log(f"  done in {seconds:.1f} s, {len(pruned)} pruned"
        + ("" if best is None else f"; best val accuracy {hist[best][-1]['val_accuracy']:.4f} "
                                   f"(trial {trials[best].number})"))


def _tell(study, t, last: dict, pruned: bool, seconds: float, n_models: int, model, out_dir) -> None:
    """Tell trial t its result: the last epoch's record ``last`` of its model (``model()`` builds it, to
    save when it beats the study's best so far), pruned or diverged; with the stack's size and time."""
    o = optuna()
    for key in ("train_loss", "train_accuracy", "val_loss"):
        t.set_user_attr(key, last[key])
    t.set_user_attr("epochs", last["epoch"])
    t.set_user_attr("stack_size", n_models)
    t.set_user_attr("stack_seconds", seconds)
    if last.get("diverged"):
        t.set_user_attr("reason", f"diverged in epoch {last['epoch']}")
        study.tell(t, state=o.trial.TrialState.FAIL)
    elif pruned:
        study.tell(t, state=o.trial.TrialState.PRUNED)
    else:
        best_before = _best_value(study)
        if out_dir is not None and (best_before is None or last["val_accuracy"] > best_before):
            model().save(Path(out_dir) / f"trial-{t.number}.npz")  # before the study names it best
        study.tell(t, last["val_accuracy"])


def _this_process() -> dict:
    """Who trains a trial: ``{"host", "pid", "started"}`` (started: the process's start time, where the
    system tells it, so that a later process given the same pid is not taken for this one)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": _start_time(os.getpid())}


def _start_time(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks after boot (Linux's /proc), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]  # field 22; the name in (...) may hold spaces
    except (OSError, IndexError):
        return None


def _gone(worker: dict) -> bool:
    """Whether the worker process (on this machine) that asked a trial no longer runs."""
    try:
        os.kill(int(worker["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # a process of another user holds the pid
    started = worker.get("started")
    return started is not None and _start_time(int(worker["pid"])) not in (None, started)


class Heartbeat:
    """While a worker trains, a thread writes the time into each of its running trials (the user
    attribute ``alive``) every ``interval`` seconds: how workers on other machines tell a lost one."""

    def __init__(self, trials: list, interval: float):
        self.trials, self.interval = trials, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="fastnn-sweep-heartbeat", daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def _run(self) -> None:
        o = optuna()
        while not self.stop.wait(self.interval):
            for t in self.trials:
                try:
                    t.set_user_attr("alive", time.time())
                except o.exceptions.UpdateFinishedTrialError:
                    pass  # told already, or failed by another worker


def fail_abandoned(study, log=print, silent_s: float = Settings.silent_s) -> int:
    """Tell FAIL, with the reason ABANDONED, every running trial whose worker process is gone: on this
    machine, a process that no longer runs (killed by SIGKILL or the OOM killer, which leave no time to
    tell the study); on another, one that has not written its ``alive`` time for ``silent_s`` seconds (a
    lost machine). Such trials do not use up the budget, and this worker trains others in their place.
    Returns how many it found."""
    o = optuna()
    found, now = 0, time.time()
    for t in study.get_trials(deepcopy=False, states=(o.trial.TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker")
        if not worker:
            continue
        if worker.get("host") == socket.gethostname():
            if not _gone(worker):
                continue
        elif now - float(t.user_attrs.get("alive", now)) < silent_s:
            continue
        try:
            study._storage.set_trial_user_attr(t._trial_id, "reason", ABANDONED)
            study.tell(t.number, state=o.trial.TrialState.FAIL)
        except (o.exceptions.UpdateFinishedTrialError, ValueError, RuntimeError):
            continue  # another worker found it first
        found += 1
    if found:
        log(f"{found} trial{'' if found == 1 else 's'} left running by a worker process that is gone: failed, "
            "to be replaced")
    return found


def _models(n: int) -> str:
    return f"{n} model{'' if n == 1 else 's'}"


def _counted(study) -> list:
    """The trials that use up the study's budget: all but those failed without being run to the end."""
    return [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("reason") not in NOT_COUNTED]


def _best_value(study) -> float | None:
    done = study.get_trials(deepcopy=False, states=(optuna().trial.TrialState.COMPLETE,))
    return max((t.value for t in done), default=None)


# ------------------------------------------------------------------ leaderboard
def leaderboard(study) -> list[dict]:
    """Every trial that ran, best first: ``{trial, state, val_accuracy, params..., epochs, reason}``."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        reason = t.user_attrs.get("reason", "")
        if reason == OVER_BUDGET:
            continue
        rows.append({"trial": t.number, "state": t.state.name.lower(), "val_accuracy": t.value,
                     **{k: t.params.get(k) for k in SPACE_KEYS}, "epochs": t.user_attrs.get("epochs"),
                     "reason": reason or None})
    rank = {"complete": 0, "pruned": 1}  # a pruned trial's value is its last epoch's, not a final one
    rows.sort(key=lambda r: (rank.get(r["state"], 2), -(r["val_accuracy"] or 0), r["trial"]))
    return rows


def format_leaderboard(rows: list[dict], top: int = 10) -> str:
    head = f"{'rank':>4} {'trial':>5} {'val acc':>8} {'lr':>9} {'wd':>9} {'mom':>5} {'drop':>5} {'seed':>4} " \
           f"{'hidden':<12} {'epochs':>6}  state"
    lines = [head]
    for i, r in enumerate(rows[:top], 1):
        acc = "" if r["val_accuracy"] is None else f"{r['val_accuracy']:.4f}"
        lines.append(f"{i:>4} {r['trial']:>5} {acc:>8} {_g(r['lr']):>9} {_g(r['weight_decay']):>9} "
                     f"{_g(r['momentum']):>5} {_g(r['dropout']):>5} {_g(r['seed']):>4} {r['hidden'] or '':<12} "
                     f"{r['epochs'] or '':>6}  {r['state']}{' (' + r['reason'] + ')' if r['reason'] else ''}")
    if len(rows) > top:
        lines.append(f"     ... {len(rows) - top} more in the JSONL file")
    return "\n".join(lines)


def _g(v) -> str:
    return "" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)


def write_leaderboard(rows: list[dict], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def plot_leaderboard(rows: list[dict], path: Path) -> bool:
    """Validation accuracy against learning rate, one colour per hidden shape; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    done = [r for r in rows if r["val_accuracy"] is not None]
    for shape in sorted({r["hidden"] for r in done}):
        pts = [r for r in done if r["hidden"] == shape]
        ax.scatter([r["lr"] for r in pts], [r["val_accuracy"] for r in pts], label=shape, s=18)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # decades only: minor labels collide
    ax.set_xlabel("learning rate")
    ax.set_ylabel("validation accuracy")
    ax.set_title(f"{len(done)} completed trials")
    if done:
        ax.legend(title="hidden", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def best_model_file(study, out_dir: Path) -> tuple[object, Path | None]:
    """The study's best trial and its saved model in out_dir (None when another machine trained it)."""
    try:
        best = study.best_trial
    except ValueError:
        raise DataError(f"study {study.study_name!r} has no completed trial") from None
    path = Path(out_dir) / f"trial-{best.number}.npz"
    return best, (path if path.exists() else None)
