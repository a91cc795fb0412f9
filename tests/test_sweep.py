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

from fastnn import MLP, ConfigError, DataError, Preprocessing, cli, fit, sweep
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


# ------------------------------------------------------------------ the journal file, torn and damaged
BASE = ["--limit", "2000", "--hidden", "32", "--epochs", "2", "--device", "cpu", "--lr", "1e-3..1e-2",
        "--dropout", "0,0.2", "--stack", "2", "--pruner", "none"]


@pytest.fixture(scope="module")
def real_journal(synthetic_dir, tmp_path_factory) -> bytes:
    """The journal file of a real two-trial sweep (BASE), as bytes: its last line tells trial 1 COMPLETE.
    Its worker is a process of its own, gone by the time the tests use the file, as a killed worker is."""
    out = tmp_path_factory.mktemp("journal")
    cmd = [sys.executable, "-m", "fastnn", "sweep", "--data-dir", str(synthetic_dir), *BASE, "--trials", "2",
           "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr
    data = (out / "sweep.journal").read_bytes()
    assert json.loads(data.splitlines()[-1])["op_code"] == 6  # the last tell
    return data


def last_line_cut(data: bytes, keep: int) -> bytes:
    """``data`` with only the first ``keep`` bytes of its last line (its end of line included) left."""
    start = data.rindex(b"\n", 0, len(data) - 1) + 1
    return data[:start + keep]


def backups(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.torn-*"))


def reopen(path: Path):
    """The study in the journal file ``path``, read by a storage of its own (as a later process reads it)."""
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    return optuna.load_study(study_name="fastnn", storage=JournalStorage(JournalFileBackend(str(path))))


def test_a_torn_last_line_is_dropped_with_a_backup_and_the_rerun_completes(real_journal, data_args, tmp_path,
                                                                            capsys):
    out = tmp_path / "out"
    out.mkdir()
    torn = last_line_cut(real_journal, len(real_journal.splitlines()[-1]) // 2)  # the last tell, cut in half
    (out / "sweep.journal").write_bytes(torn)
    assert cli.main(["sweep", *data_args, *BASE, "--trials", "4", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    [backup] = backups(out)
    lines, cut = torn.count(b"\n") + 1, len(torn) - torn.rindex(b"\n") - 1
    assert err == (f"warning: {out / 'sweep.journal'}: dropped its last line {lines}, a record cut short ({cut} bytes: "
                   f"a worker stopped while it wrote, or a full disk); the file as it was is kept as {backup}\n")
    assert backup.read_bytes() == torn  # the damaged file, as it was
    journal = (out / "sweep.journal").read_bytes()
    assert journal.startswith(torn[:-cut]) and sweep.journal.first_damage(out / "sweep.journal") is None
    trials = reopen(out / "sweep.journal").trials
    assert trials[1].user_attrs["reason"] == sweep.ABANDONED  # its tell was lost: failed, and trained anew
    assert [t.number for t in trials if t.state == optuna.trial.TrialState.COMPLETE] == [0, 2, 3, 4]
    assert cli.main(["sweep", *data_args, *BASE, "--trials", "4", "--out", str(out)]) == 0  # and again: nothing to do
    assert capsys.readouterr().err == "" and backups(out) == [backup]


@pytest.mark.parametrize("keep", [0, 1, 11, 40, 0.5, -3, -2, -1])
def test_a_journal_torn_anywhere_in_its_last_line_opens_and_takes_new_trials(real_journal, keep, tmp_path):
    """keep: how much of the last line is left (bytes; a fraction of it; from its end: -2 leaves all
    but the closing brace and the end of line, -1 all but the end of line: a whole record, completed)."""
    whole = len(real_journal.splitlines()[-1]) + 1
    keep = int(keep * whole) if isinstance(keep, float) else keep % whole
    path = tmp_path / "sweep.journal"
    path.write_bytes(torn := last_line_cut(real_journal, keep))
    said = []
    study = sweep.open_study("fastnn", sweep.make_storage(str(path), warn=said.append), None, None)
    assert len(said) == (keep > 0) and backups(tmp_path) == ([] if keep == 0 else [Path(said[0].split()[-1])])
    complete = keep == whole - 1  # only its end of line was missing
    assert (study.trials[1].state == optuna.trial.TrialState.COMPLETE) == complete
    assert ("completed its last record" if complete else "dropped its last line") in "".join(said) or keep == 0
    for value in (0.5, 0.6):  # new records go on their own lines, and every later process reads them back
        t = study.ask({"lr": optuna.distributions.FloatDistribution(1e-3, 1e-2, log=True)})
        study.tell(t, value)
    assert [t.value for t in reopen(path).trials[-2:]] == [0.5, 0.6]
    assert sweep.journal.first_damage(path) is None
    assert [b.read_bytes() for b in backups(tmp_path)] == [torn] * (keep > 0)


def test_every_cut_of_the_last_line_leaves_the_records_before_it(real_journal, tmp_path):
    last = real_journal.splitlines()[-1]
    before = real_journal[:len(real_journal) - len(last) - 1]
    for keep in range(len(last) + 2):
        path = tmp_path / f"{keep}" / "j"
        path.parent.mkdir()
        path.write_bytes(before + (last + b"\n")[:keep])
        sweep.journal.recover(path, warn=lambda m: None)
        assert path.read_bytes() == (real_journal if keep >= len(last) else before), keep


@pytest.mark.parametrize("damage,match", [
    (lambda lines: lines[:10] + [b"garbage"] + lines[11:], "line 11 of {n} is not a journal record"),
    (lambda lines: lines[:-3] + [lines[-3][:40] + lines[-2]] + lines[-1:],  # a torn record, and a rerun wrote on
     "line {m} of {n} is not a journal record"),
    (lambda lines: lines[:-1] + [b"[1, 2]"], "its last line {n} is not a journal record, nor the start of one"),
    (lambda lines: [b"hello"] + lines, "not an Optuna journal file (line 1 is not a journal record)"),
])
def test_damage_before_the_torn_tail_is_refused_and_the_file_left_as_it_is(real_journal, data_args, tmp_path, capsys,
                                                                          damage, match):
    out = tmp_path / "out"
    out.mkdir()
    lines = damage(real_journal.splitlines())
    bad = b"\n".join(lines) + b"\n"
    (out / "sweep.journal").write_bytes(bad)
    assert cli.main(["sweep", *data_args, *BASE, "--trials", "4", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    journal = out / "sweep.journal"
    assert err.startswith(f"error: {journal}: " + match.format(n=len(lines), m=len(lines) - 1)) and err.count("\n") == 1
    if "line 1 is" not in match:
        assert f"cp {journal} {journal}.bak" in err  # how to keep a copy before cutting it
    assert journal.read_bytes() == bad and backups(out) == []


def test_a_stale_lock_file_is_removed_and_a_held_one_waited_for(real_journal, tmp_path, monkeypatch):
    import threading

    path = tmp_path / "sweep.journal"
    lock = Path(f"{path}.lock")
    path.write_bytes(last_line_cut(real_journal, 30))
    monkeypatch.chdir(tmp_path)
    os.symlink("elsewhere/sweep.journal", lock)  # as Optuna links it for a relative path: a link that does not resolve
    os.utime(lock, (time.time() - 100,) * 2, follow_symlinks=False)
    said = []
    worker = threading.Thread(target=sweep.journal.recover, args=(path, said.append), daemon=True)
    worker.start()
    worker.join(20)  # Optuna's own lock waits for this one forever
    assert not worker.is_alive()
    assert said[0] == f"warning: {lock}: removed this lock file, 100 s old: its worker stopped while it wrote"
    assert not os.path.lexists(lock) and sweep.journal.first_damage(path) is None
    path.write_bytes(last_line_cut(real_journal, 30))
    os.symlink(str(path), lock)  # a worker writing
    threading.Timer(0.5, os.unlink, [lock]).start()
    t0 = time.perf_counter()
    sweep.journal.recover(path, warn=said.append)
    assert time.perf_counter() - t0 >= 0.5 and sweep.journal.first_damage(path) is None


def test_a_torn_journal_that_cannot_be_copied_is_left_as_it_is(real_journal, tmp_path, monkeypatch):
    path = tmp_path / "sweep.journal"
    path.write_bytes(torn := last_line_cut(real_journal, 30))

    def full(src, dst):
        Path(dst).write_bytes(b"x")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sweep.journal.shutil, "copy2", full)
    with pytest.raises(DataError, match=r"sweep.journal: its last line is torn, but a copy of the file cannot be "
                                        r"kept before it is cut \(No space left on device\)"):
        sweep.journal.recover(path)
    assert path.read_bytes() == torn and sorted(p.name for p in tmp_path.iterdir()) == ["sweep.journal"]


# ------------------------------------------------------------------ a study goes on over its own space
@pytest.mark.parametrize("flags,was,now", [
    (["--hidden", "64", "32"], "--hidden 32", "--hidden 64 32"),
    (["--lr", "1e-3..3e-2"], "--lr 0.001..0.01", "--lr 0.001..0.03"),
    (["--lr", "0.001"], "--lr 0.001..0.01", "--lr 0.001"),
    (["--dropout", "0.2,0", "--seeds", "0..3"], "--dropout 0,0.2 and --seeds 0",
     "--dropout 0.2,0 and --seeds 0..3 (choices in another order are another space)"),
])
def test_a_changed_search_space_is_refused_before_any_work(real_journal, data_args, tmp_path, capsys, flags, was, now):
    out = tmp_path / "out"
    out.mkdir()
    (out / "sweep.journal").write_bytes(real_journal)
    assert cli.main(["sweep", *data_args, *BASE, *flags, "--trials", "4", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err == (f"error: --out {out}: its study 'fastnn' was searched over {was}; this run asks for {now}: "
                            "use a new --out or --study NAME to start a new study, or give the same space to continue "
                            "it\n")
    assert captured.out == "" and len(reopen(out / "sweep.journal").trials) == 2  # no data read, no trial asked
    journal = tmp_path / "elsewhere.journal"
    journal.write_bytes(real_journal)
    assert cli.main(["sweep", *data_args, *BASE, *flags, "--storage", str(journal), "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith(f"error: --storage {journal}: its study 'fastnn' was searched over")


def test_the_same_search_space_continues_its_study(real_journal, data_args, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "sweep.journal").write_bytes(real_journal)
    assert cli.main(["sweep", *data_args, *BASE, "--trials", "4", "--out", str(out)]) == 0
    assert capsys.readouterr().err == ""
    trials = reopen(out / "sweep.journal").trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 4


def test_a_worker_refuses_another_space_for_its_study(synthetic):
    study, space, settings, data = _tiny_sweep(synthetic, trials=2)
    assert sweep.run_worker(study, space, settings, data, log=lambda m: None) == 2
    other = sweep.SearchSpace(lr=(1e-3, 1e-2), hidden=[[8], [16]])
    with pytest.raises(ConfigError, match=r"^study '.*' was searched over --hidden 8; this run asks for --hidden 8 16"):
        sweep.run_worker(study, other, settings, data, log=lambda m: None)
    assert len(study.trials) == 2
