"""One run per checkpoint folder: an OS lock held for the run's life.

``FolderLock(folder, flag)`` takes ``fcntl.flock`` on ``<folder>/.fastnn.lock`` and writes who
holds it ("pid 1234 on host x since 2024-05-01 12:00:00") into the file. A second run asking for
the folder gets a ConfigError naming that holder. The kernel drops the lock when its process
ends, however it ends (even by SIGKILL), so a lock file that a dead run left is simply locked
again by the next run. The file itself stays (removing it would let two runs lock two different
files under one name); releasing empties it. Where ``fcntl`` is missing (Windows) nothing is locked.
"""

from __future__ import annotations

import datetime
import errno
import os
import socket
import time
from pathlib import Path

from .errors import ConfigError

try:
    import fcntl
except ImportError:  # pragma: no cover (not POSIX)
    fcntl = None

LOCK_NAME = ".fastnn.lock"


class FolderLock:
    """An exclusive lock on ``folder`` for this process; ``flag`` (e.g. "--checkpoint-dir") names
    the folder in messages. Use as a context manager, or ``acquire()`` / ``release()``."""

    def __init__(self, folder, flag: str = "folder"):
        self.folder, self.flag = Path(folder), flag
        self.path = self.folder / LOCK_NAME
        self.fd: int | None = None
        self.writable = False

    def acquire(self) -> FolderLock:
        """Take the lock, or raise ConfigError naming the run that holds it (never waits)."""
        if fcntl is None or self.fd is not None:
            return self
        fd, writable = self._open()
        if fd is None:
            return self
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read(fd) if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN) else None
            os.close(fd)
            if holder is None:  # e.g. ENOLCK: a file system without locks
                raise ConfigError(f"{self.flag} {self.folder}: cannot lock {LOCK_NAME} ({exc.strerror or exc}): "
                                  "use a folder on a local disk") from None
            raise ConfigError(f"{self.flag} {self.folder}: in use by {holder or 'another run'}: wait for it to "
                              "end, or use another folder") from None
        self.fd, self.writable = fd, writable
        if writable:
            stamp = datetime.datetime.now().isoformat(sep=" ", timespec="seconds")
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()} since {stamp}\n".encode(), 0)
        return self

    def _open(self) -> tuple[int | None, bool]:
        """``(descriptor, writable)`` of the lock file, created if need be. In a folder this process may
        only read (a --resume source kept read-only), an existing lock file is opened to read (flock
        works on it), and a missing one means no run is writing there: ``(None, False)``."""
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666), True
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise ConfigError(f"{self.flag} {self.folder}: cannot create the lock file {LOCK_NAME} "
                                  f"({exc.strerror or exc})") from None
        try:
            return os.open(self.path, os.O_RDONLY), False
        except FileNotFoundError:
            return None, False
        except OSError as exc:
            raise ConfigError(f"{self.flag} {self.folder}: cannot open the lock file {LOCK_NAME} "
                              f"({exc.strerror or exc})") from None

    def release(self) -> None:
        """Empty the lock file and drop the lock (a no-op when not held)."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            if self.writable:
                os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing the descriptor drops the flock

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read(fd: int, wait: float = 1.0) -> str:
    """The holder's line from an open lock file; "" if it has not written it within ``wait`` s
    (it writes right after taking the lock)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            text = os.pread(fd, 200, 0).decode(errors="replace").strip()
        except OSError:
            return ""
        if text or time.monotonic() > deadline:
            return text
        time.sleep(0.02)
