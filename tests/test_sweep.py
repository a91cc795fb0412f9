"""``fastnn sweep``: search spaces, a sweep end to end, two workers sharing a journal file, and
two workers sharing a real PostgreSQL server (started here when its programs are installed)."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from fastnn import MLP, ConfigError, Preprocessing, cli, fit, sweep
from fastnn.sweep import parse_space

optuna = pytest.importorskip("optuna", reason="Optuna is not installed (the sweep extra)")

SMALL = ["--limit", "2000", "--hidden", "32", "--epochs", "3", "--device", "cpu"]


@pytest.fixture
def data_args(synthetic_dir):
    return ["--data-dir", str(synthetic_dir)]


def test_search_space_text():
    assert parse_space("lr", "0.1") == [0.1]
    assert parse_space("lr", "0.01,0.1") == [0.01, 0.1]
    assert parse_space("lr", "1e-4..1e-2") == (1e-4, 1e-2)
    assert parse_space("seeds", "0..9", int) == (0, 9)
    for bad in ("", "a", "0.1..", "1..1", "0.2..0.1", "nan"):
        with pytest.raises(ConfigError, match="expected a value"):
            parse_space("lr", bad)


@pytest.mark.parametrize("flags,match", [
    (["--lr", "x"], "--lr 'x': expected"),
    (["--lr=-1..1"], "--lr: -1.0 is out of range"),
    (["--dropout", "0,1"], "--dropout: 1.0 is out of range"),
    (["--sampler", "grid", "--lr", "1e-3..1e-2"], "--sampler grid needs lists"),
    (["--val-split", "0"], "--val-split must be above 0"),
    (["--storage", "postgresql://nobody@127.0.0.1:1/none"], "cannot open the database"),
    (["--cuda-graph"], "--cuda-graph needs the GPU"),
])
def test_bad_sweep_flags_are_one_line_errors(flags, match, data_args, tmp_path, capsys):
    assert cli.main(["sweep", *data_args, *SMALL, "--out", str(tmp_path / "o"), *flags]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1


def test_grid_sweep_trains_every_point_once_and_each_trial_is_its_own_model(data_args, tmp_path, capsys, synthetic):
    out = tmp_path / "sweep"
    args = ["sweep", *data_args, *SMALL, "--sampler", "grid", "--lr", "0.001,0.01", "--dropout", "0,0.3",
            "--seeds", "0,1", "--stack", "4", "--pruner", "none", "--dtype", "float64", "--out", str(out)]
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "leaderboard.jsonl").read_text().splitlines()]
    points = {(r["lr"], r["dropout"], r["seed"]) for r in rows}
    assert len(rows) == 8 and len(points) == 8 and all(r["state"] == "complete" for r in rows)
    assert "4 models 784-32-10 trained stacked" in text and "  epoch 3/3: 4 models" in text and "test accuracy" in text
    best = json.loads((out / "best.json").read_text())
    assert best["val_accuracy"] == max(r["val_accuracy"] for r in rows)
    # the best trial, trained on its own with its hyperparameters, gives its reported validation accuracy
    x, y = synthetic[0][:2000], synthetic[1][:2000]
    tr, va = cli.stratified_split(y, 0.1, 0)
    p = best["params"]
    m = MLP([784, 32, 10], seed=p["seed"], dtype="float64", dropout=p["dropout"])
    h = fit(m, x[tr], y[tr], epochs=3, lr=p["lr"], optimizer="adam", weight_decay=p["weight_decay"],
            lr_schedule="cosine", seed=p["seed"], x_val=x[va], y_val=y[va])
    assert h[-1]["val_accuracy"] == best["val_accuracy"]
    np.testing.assert_allclose(MLP.load(out / "best.npz").params, m.params, rtol=0, atol=1e-12)
    # a second run of the same study finds it complete: nothing is trained again
    assert cli.main(args) == 0
    assert "stacked" not in capsys.readouterr().out


def worker_trials(output: str) -> dict[str, list[int]]:
    """{worker: [trial numbers it trained]} from the workers' log lines."""
    found: dict[str, list[int]] = {}
    for w, nums in re.findall(r"worker (\d+): trials ([\d,]+):", output):
        found.setdefault(w, []).extend(int(n) for n in nums.split(","))
    return found


def run_two_workers(data_args, tmp_path, storage, trials=16):
    cmd = [sys.executable, "-m", "fastnn", "sweep", *data_args, "--limit", "3000", "--hidden", "32", "--epochs", "6",
           "--device", "cpu", "--trials", str(trials), "--stack", "2", "--lr", "1e-3..3e-2", "--seeds", "0..3",
           "--workers", "2", "--storage", storage, "--out", str(tmp_path / "out")]
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    done = worker_trials(r.stdout)
    assert set(done) == {"0", "1"}, r.stdout  # both workers trained trials
    numbers = done["0"] + done["1"]
    assert sorted(numbers) == list(range(trials)), r.stdout  # every trial once, none twice
    return r


def check_study(study, trials):
    finished = [t for t in study.get_trials() if t.user_attrs.get("reason", "").find("not run") < 0]
    assert len(finished) == trials
    assert all(t.state.is_finished() for t in finished)
    params = {(t.params["lr"], t.params["seed"]) for t in finished}
    assert len(params) == trials  # the two workers' samplers proposed different trials


def test_two_worker_processes_share_a_journal_file(data_args, tmp_path):
    journal = tmp_path / "sweep.journal"
    run_two_workers(data_args, tmp_path, str(journal))
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    check_study(optuna.load_study(study_name="fastnn", storage=JournalStorage(JournalFileBackend(str(journal)))), 16)


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (d / name).exists():
            return str(d / name)
    return None


@pytest.fixture
def postgres_url():
    """A PostgreSQL server of its own in a temporary folder, for the test's duration."""
    psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed (the sweep-postgres extra)")
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL's initdb and pg_ctl are not installed (Debian: apt-get install postgresql)")
    as_user = []
    folder = Path(tempfile.mkdtemp(prefix="fastnn-pg-"))
    if os.geteuid() == 0:  # the server refuses to run as root
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(folder, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = folder / "data"
    try:
        subprocess.run(as_user + [initdb, "-D", str(data), "-U", "postgres", "--auth=trust"], check=True,
                       capture_output=True)
        subprocess.run(as_user + [pg_ctl, "-D", str(data), "-l", str(folder / "log"), "-w", "-o",
                                  f"-p {port} -k {folder} -h 127.0.0.1", "start"], check=True, capture_output=True)
        for _ in range(50):
            try:
                conn = psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres", autocommit=True)
                break
            except psycopg.OperationalError:
                time.sleep(0.1)
        conn.execute("CREATE DATABASE fastnn")
        conn.close()
        yield f"postgresql://postgres@127.0.0.1:{port}/fastnn"
    finally:
        subprocess.run(as_user + [pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def test_two_workers_share_one_study_on_postgresql(data_args, tmp_path, postgres_url):
    run_two_workers(data_args, tmp_path, postgres_url, trials=12)
    check_study(optuna.load_study(study_name="fastnn", storage=postgres_url), 12)


def test_without_optuna_the_sweep_says_how_to_install_it(data_args, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "optuna", None)
    assert cli.main(["sweep", *data_args, *SMALL, "--out", str(tmp_path / "o")]) == 2
    assert "pip install 'fastnn[sweep]'" in capsys.readouterr().err


def test_a_stopped_worker_leaves_no_trial_running_and_a_rerun_replaces_them(monkeypatch, synthetic):
    real_fit_many = sweep.fit_many

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    study = optuna.create_study(direction="maximize")
    space = sweep.SearchSpace(lr=(1e-3, 1e-2), hidden=[[8]])
    x, y = synthetic[0], synthetic[1]
    data = (x[:100], y[:100], x[100:150], y[100:150], Preprocessing(), list("0123456789"))
    settings = sweep.Settings(epochs=1, stack=4, trials=6)
    monkeypatch.setattr(sweep, "fit_many", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sweep.run_worker(study, space, settings, data, log=lambda m: None)
    first = study.get_trials()
    assert len(first) == 4 and {t.state for t in first} == {optuna.trial.TrialState.FAIL}
    assert {t.user_attrs["reason"] for t in first} == {sweep.UNFINISHED}
    monkeypatch.setattr(sweep, "fit_many", real_fit_many)
    assert sweep.run_worker(study, space, settings, data, log=lambda m: None) == 6  # the budget, trained anew
    done = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.number for t in done) == list(range(4, 10))


def test_a_killed_worker_s_trials_are_failed_and_replaced_by_the_next_worker(data_args, tmp_path):
    """SIGKILL leaves a worker no time to tell the study: the next worker on this machine sees that the
    process that asked the trials is gone, fails them, and trains the whole budget in their place."""
    journal = tmp_path / "sweep.journal"
    cmd = [sys.executable, "-m", "fastnn", "sweep", *data_args, "--limit", "2000", "--hidden", "16", "--device", "cpu",
           "--trials", "4", "--stack", "2", "--pruner", "none", "--storage", str(journal), "--out", str(tmp_path / "o")]
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    worker = subprocess.Popen(cmd + ["--epochs", "100000", "--worker", "0"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    def study():
        return optuna.load_study(study_name="fastnn", storage=JournalStorage(JournalFileBackend(str(journal))))

    try:
        for _ in range(600):  # until the worker trains its first stack
            if worker.poll() is not None:
                pytest.fail(f"the worker exited early: {worker.stdout.read()}")
            if journal.exists() and journal.stat().st_size and any("worker" in t.user_attrs for t in study().trials):
                break
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        worker.kill()
        worker.wait()
    running = study().get_trials(states=(optuna.trial.TrialState.RUNNING,))
    assert [t.number for t in running] == [0, 1] and running[0].user_attrs["worker"]["pid"] == worker.pid
    r = subprocess.run(cmd + ["--epochs", "2"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert "2 trials left running by a worker process that is gone: failed, to be replaced" in r.stdout
    trials = {t.number: t for t in study().trials}
    assert [trials[n].user_attrs["reason"] for n in (0, 1)] == [sweep.ABANDONED] * 2
    assert trials[0].state == trials[1].state == optuna.trial.TrialState.FAIL
    done = [n for n, t in trials.items() if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(done) == [2, 3, 4, 5]  # the budget of 4, trained anew
    assert "unfinished: its worker process was gone" in r.stdout  # the leaderboard says why


def test_a_running_trial_of_a_live_worker_or_another_machine_is_left_alone(monkeypatch):
    study = optuna.create_study(direction="maximize")
    mine, other_host, dead = study.ask(), study.ask(), study.ask()
    mine.set_user_attr("worker", sweep._this_process())
    other_host.set_user_attr("worker", {"host": "elsewhere", "pid": 1, "started": None})
    other_host.set_user_attr("alive", time.time())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # a pid that no process holds now
    dead.set_user_attr("worker", {"host": socket.gethostname(), "pid": child.pid, "started": None})
    assert sweep.fail_abandoned(study, log=lambda m: None) == 1
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.RUNNING] * 2 + [optuna.trial.TrialState.FAIL]
    # a live process that reuses a pid is told apart by its start time
    reused = study.ask()
    reused.set_user_attr("worker", {**sweep._this_process(), "started": "1"})
    if sweep._start_time(os.getpid()) is not None:
        assert sweep.fail_abandoned(study, log=lambda m: None) == 1
        assert study.trials[-1].state == optuna.trial.TrialState.FAIL
    # another machine's worker that has been silent too long is taken for lost
    assert sweep.fail_abandoned(study, log=lambda m: None, silent_s=3600) == 0
    other_host.set_user_attr("alive", time.time() - 3601)
    assert sweep.fail_abandoned(study, log=lambda m: None, silent_s=3600) == 1
    assert study.trials[1].state == optuna.trial.TrialState.FAIL
    assert study.trials[1].user_attrs["reason"] == sweep.ABANDONED


def _tiny_sweep(synthetic, trials=3):
    x, y = synthetic[0], synthetic[1]
    data = (x[:100], y[:100], x[100:150], y[100:150], Preprocessing(), list("0123456789"))
    settings = sweep.Settings(epochs=2, stack=trials, trials=trials, heartbeat_s=0.05)
    return optuna.create_study(direction="maximize"), sweep.SearchSpace(lr=(1e-3, 1e-2), hidden=[[8]]), settings, data


def test_a_training_worker_keeps_its_trials_alive(monkeypatch, synthetic):
    study, space, settings, data = _tiny_sweep(synthetic)
    real_fit_many, seen = sweep.fit_many, []

    def slow(*args, **kwargs):
        asked = [t.user_attrs["alive"] for t in study.trials]
        time.sleep(0.5)
        seen.append([t.user_attrs["alive"] - a for t, a in zip(study.trials, asked)])
        return real_fit_many(*args, **kwargs)

    monkeypatch.setattr(sweep, "fit_many", slow)
    assert sweep.run_worker(study, space, settings, data, log=lambda m: None) == 3
    assert len(seen[0]) == 3 and min(seen[0]) > 0.2  # written while the stack trained
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)


def test_a_trial_failed_by_another_worker_meanwhile_is_dropped_not_told(monkeypatch, synthetic):
    study, space, settings, data = _tiny_sweep(synthetic)
    real_fit_many, log = sweep.fit_many, []

    def failed_elsewhere(*args, **kwargs):  # as another worker does that took this one for lost
        if len(study.trials) == 3:
            study._storage.set_trial_user_attr(study.trials[1]._trial_id, "reason", sweep.ABANDONED)
            study.tell(1, state=optuna.trial.TrialState.FAIL)
        return real_fit_many(*args, **kwargs)

    monkeypatch.setattr(sweep, "fit_many", failed_elsewhere)
    assert sweep.run_worker(study, space, settings, data, log=log.append) == 4  # trial 3 replaces trial 1
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert "  trial 1 was failed by another worker meanwhile: stopped" in log


def test_a_class_weighted_sweep_trains_what_fit_trains_with_those_weights(data_args, tmp_path, synthetic):
    out = tmp_path / "sweep"
    args = ["sweep", *data_args, *SMALL, "--sampler", "grid", "--lr", "0.01", "--stack", "1", "--pruner", "none",
            "--dtype", "float64", "--class-weight", "balanced", "--out", str(out)]
    assert cli.main(args) == 0
    x, y = synthetic[0][:2000], synthetic[1][:2000]
    tr, va = cli.stratified_split(y, 0.1, 0)
    kw = dict(epochs=3, lr=0.01, optimizer="adam", lr_schedule="cosine", x_val=x[va], y_val=y[va])
    weighted, plain = MLP([784, 32, 10], dtype="float64"), MLP([784, 32, 10], dtype="float64")
    fit(weighted, x[tr], y[tr], class_weight="balanced", **kw)
    fit(plain, x[tr], y[tr], **kw)
    best = MLP.load(out / "best.npz")
    np.testing.assert_allclose(best.params, weighted.params, rtol=0, atol=1e-12)
    assert np.abs(best.params - plain.params).max() > 1e-9
