"""A sweep's journal file checked before Optuna opens it, and a torn last record recovered.

Optuna's ``JournalFileBackend`` keeps a study as one JSON object per line, an operation each
(``{"op_code": 4, "worker_id": ..., ...}``), appended with one write (and fsync) each under a lock
file (``<journal>.lock``). A reader skips a last line without its end of line, but the next write
is appended to it, so a record cut short (a worker killed while it wrote, a full disk) becomes a
line that no JSON parser reads: from then on every reader of the study fails with a
JSONDecodeError. ``recover`` finds such a line first. A torn *last* line is a write that never
happened for any reader (they all skipped it), so it is cut off, after a copy of the file is kept
as ``<journal>.torn-<time>``; a last record that lacks only its end of line gets it back. A damaged
line before the end is not cut: the records after it were written by workers that went on, so
what to keep is the user's choice, and the error says how.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError

GRACE_S = 30.0  # seconds: a lock file older than this was left by a worker that stopped (Optuna's grace period)


@dataclass
class Damage:
    """The first line of a journal file that is not a record."""

    line: int  # its number, from 1
    offset: int  # where it starts, in bytes
    text: bytes  # the line, its end of line included when it has one
    lines: int  # the lines in the file


def is_record(line: bytes) -> bool:
    """Whether ``line`` is a whole journal record: a JSON object with an op_code, and its end of line."""
    if not line.endswith(b"\n"):
        return False
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):  # JSONDecodeError, bytes that are not UTF-8, [[[[... nested too deep
        return False
    return isinstance(record, dict) and "op_code" in record


def first_damage(path) -> Damage | None:
    """The first line of the journal file ``path`` that is not a whole record, or None."""
    damage, offset, n = None, 0, 0
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if damage is None and not is_record(line):
                damage = (n, offset, line)
            offset += len(line)
    return None if damage is None else Damage(*damage, lines=n)


def recover(path, warn=None, grace_s: float = GRACE_S) -> None:
    """Check the journal file ``path`` before Optuna opens it (nothing to do when it does not exist).

    A torn last line is cut off, or a last record missing only its end of line completed, after a
    copy of the file is kept beside it (``warn`` says so, in one line; default: stderr). A line that
    is not a record before the last, or a last line that is no torn record, is a DataError naming
    the file and the line. The check and the repair hold the journal's lock file, so a worker writing
    meanwhile is waited for, not cut off; a lock file older than ``grace_s`` was left by a worker
    that stopped while it wrote, and is removed (Optuna waits forever for one whose link is relative)."""
    path = Path(path)
    warn = warn or _stderr
    if not path.is_file():
        return
    _break_stale_lock(path, grace_s, warn)
    if first_damage(path) is None:
        return
    with _locked(path, grace_s, warn):
        damage = first_damage(path)  # again: a record that a worker was writing is whole by now
        if damage is None:
            return
        _refuse(path, damage)
        backup = _backup(path)
        if is_record(damage.text + b"\n"):
            with open(path, "ab") as f:
                f.write(b"\n")
                f.flush()
                os.fsync(f.fileno())
            what = f"completed its last record, line {damage.line}, which lacked its end of line"
        else:
            with open(path, "r+b") as f:
                f.truncate(damage.offset)
                os.fsync(f.fileno())
            what = (f"dropped its last line {damage.line}, a record cut short ({len(damage.text)} bytes: a worker "
                    "stopped while it wrote, or a full disk)")
    warn(f"warning: {path}: {what}; the file as it was is kept as {backup}")


def _refuse(path: Path, damage: Damage) -> None:
    """DataError unless ``damage`` is a torn last record: damage before the end, or not a journal."""
    n = damage.line
    advice = (f"keep a copy (cp {path} {path}.bak) and its first {n - 1} lines (head -n {n - 1} {path}.bak > "
              f"{path}) to go on with the study as it was before, or start a new one with a new --out or --storage")
    if n == 1 and not damage.text.startswith((b"{", b"\0")):
        raise DataError(f"{path}: not an Optuna journal file (line 1 is not a journal record)")
    if n < damage.lines:
        raise DataError(f"{path}: line {n} of {damage.lines} is not a journal record, and only a torn last line "
                        f"can be dropped safely: {advice}")
    if not damage.text.startswith((b"{", b"\0")):  # a torn record starts as one, or is zeros a crash left
        raise DataError(f"{path}: its last line {n} is not a journal record, nor the start of one: {advice}")


def _backup(path: Path) -> Path:
    """A copy of ``path`` beside it, ``<name>.torn-<time>``; a DataError (nothing changed) if it cannot be written."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    backup = path.with_name(f"{path.name}.torn-{stamp}")
    k = 1
    while backup.exists():
        k += 1
        backup = path.with_name(f"{path.name}.torn-{stamp}-{k}")
    tmp = backup.with_name(f".{backup.name}.tmp-{os.getpid()}")
    try:
        shutil.copy2(path, tmp)
        os.replace(tmp, backup)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise DataError(f"{path}: its last line is torn, but a copy of the file cannot be kept before it is cut "
                        f"({exc.strerror or exc}): free some space, or cut the line yourself") from None
    return backup


@contextlib.contextmanager
def _locked(path: Path, grace_s: float, warn):
    """Hold the journal's lock as Optuna's JournalFileSymlinkLock takes it: a symbolic link
    ``<journal>.lock`` that only one process can create (here to the absolute path, so it resolves)."""
    lock, wait = f"{path}.lock", 0.001
    while True:
        try:
            os.symlink(os.path.abspath(path), lock)
            break
        except FileExistsError:
            _break_stale_lock(path, grace_s, warn)
            time.sleep(wait)
            wait = min(2 * wait, 0.2)
    try:
        yield
    finally:
        _remove_lock(lock)


def _break_stale_lock(path: Path, grace_s: float, warn) -> None:
    """Remove the journal's lock file when it is older than ``grace_s`` (a worker takes it for one
    write): its worker stopped while it held it. Its own age, not its target's: the link may not resolve."""
    lock = f"{path}.lock"
    try:
        age = time.time() - os.lstat(lock).st_mtime
    except FileNotFoundError:
        return
    if age > grace_s and _remove_lock(lock):
        warn(f"warning: {lock}: removed this lock file, {age:.0f} s old: its worker stopped while it wrote")


def _remove_lock(lock: str) -> bool:
    """Remove a lock file as Optuna releases one (renamed first, so that only one process removes it)."""
    gone = f"{lock}{uuid.uuid4()}.rename"
    try:
        os.rename(lock, gone)
    except OSError:
        return False  # another process removed it first
    os.unlink(gone)
    return True


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
