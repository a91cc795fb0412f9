"""Where named data sets are looked for, and their download: mirrors, MD5 check, cache.

``search_dirs(name, root)`` lists the folders searched for a named data set (``root``,
``$FASTNN_DATA``, the user cache ``cache_dir()``, ``/usr/share/datasets``);
``find_file`` finds an IDX file in them (``.gz`` or raw); ``download`` fetches a file
from the first mirror that works, checked against its MD5, and never leaves a partial
or corrupt file under the final name.
"""

from __future__ import annotations

import hashlib
import os
import urllib.request
from pathlib import Path

from .errors import DataError
from .progress import bar as progress_bar


# -------------------------------------------------------------- locations
def cache_dir() -> Path:
    """The user cache: ``$XDG_CACHE_HOME/fastnn`` or ``~/.cache/fastnn``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastnn"


def search_dirs(name: str, root=None) -> list[Path]:
    """Folders searched for a named data set, in order (each also as ``<dir>/<name>``)."""
    bases = []
    if root is not None:
        bases.append(Path(root))
    if os.environ.get("FASTNN_DATA"):
        bases.append(Path(os.environ["FASTNN_DATA"]))
    bases.append(cache_dir())
    bases.append(Path("/usr/share/datasets"))
    out = []
    for b in bases:
        for d in (b / name, b) if b != Path("/usr/share/datasets") else (b / name,):
            if d not in out:
                out.append(d)
    return out


def find_file(stem: str, dirs) -> Path | None:
    """``<dir>/<stem>.gz`` or ``<dir>/<stem>`` in the first folder that has one."""
    dotted = stem.replace("-idx", ".idx")  # train-images.idx3-ubyte, as some archives name them
    for d in dirs:
        for cand in (d / (stem + ".gz"), d / stem, d / (dotted + ".gz"), d / dotted):
            if cand.is_file():
                return cand
    return None


# --------------------------------------------------------------- download
def download(urls, dest, md5: str, timeout: float = 30.0, progress: bool | None = None) -> Path:
    """Fetch the first URL that works into ``dest``, verified against ``md5``.

    The bytes go to a temporary file beside ``dest``, which is renamed into place
    only after the size and MD5 check, so an interrupted or corrupt download never
    leaves a file that looks valid. Raises DataError listing every failure.
    """
    dest = Path(dest)
    created = _make_folder(dest.parent)
    errors = []
    for url in urls:
        tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}")
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as f:
                total = int(resp.headers.get("Content-Length") or 0)
                digest, done = hashlib.md5(), 0
                bar = progress_bar(total or None, dest.name, unit="B", show=progress is not False)
                while True:
                    chunk = resp.read(1 << 16)
                    if not chunk:
                        break
                    f.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    bar.update(len(chunk))
                bar.close()
                if total and done != total:
                    raise OSError(f"connection closed after {done} of {total} bytes")
                if digest.hexdigest() != md5:
                    raise OSError(f"MD5 {digest.hexdigest()} does not match the expected {md5}")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest)
            return dest
        except Exception as exc:  # URLError, HTTPError, timeouts, IncompleteRead, ...
            errors.append(f"{url}: {exc}")
        finally:
            if tmp.exists():
                tmp.unlink()
    _remove_empty(created)
    raise DataError(f"{dest.name}: download failed from every mirror: " + "; ".join(errors))


def _make_folder(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; returns those it created, deepest first."""
    created, d = [], folder
    while not d.exists() and d != d.parent:
        created.append(d)
        d = d.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _remove_empty(created)
        raise DataError(f"{folder}: cannot create the download folder ({exc.strerror or exc})") from None
    return created


def _remove_empty(folders) -> None:
    """Remove the folders a failed download created, deepest first, while they are empty (a file another
    download put there meanwhile keeps its folder)."""
    for d in folders:
        try:
            d.rmdir()
        except OSError:
            return
