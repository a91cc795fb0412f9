"""The one file format of models and checkpoints: an ``.npz`` of arrays plus JSON metadata.

The metadata is stored as the uint8 array ``meta`` and names its ``format``
(``fastnn-mlp``, ``fastnn-checkpoint``) and ``version``. Files are written through
a temporary file, fsynced and renamed into place, so a crash never leaves half a
file under the real name; they are read without pickles.
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np

from .errors import DataError

FORMAT_VERSION = 1


def atomic_savez(path, arrays: dict) -> None:
    """Write an ``.npz`` through a temporary file, fsync it, then rename it into place."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=folder)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, path) from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # what any new file gets, not mkstemp's 0600
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):  # name the file asked for, not the temporary one
            raise OSError(exc.errno, exc.strerror, path) from None
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_npz(path) -> dict:
    """All arrays of an ``.npz`` file (no pickles); DataError if missing or unreadable."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if magic != b"PK\x03\x04":
        kind = f"it starts with {magic!r}" if magic else "it is empty"
        raise DataError(f"{path}: not an .npz file ({kind}; an .npz is a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise DataError(f"{path}: holds object arrays (pickled Python objects); fastnn reads only "
                            "numeric arrays from .npz files") from None
        raise DataError(f"{path}: not a readable .npz file ({exc})") from None
    except Exception as exc:  # zipfile and NumPy raise many kinds (BadZipFile, EOFError, RuntimeError, ...)
        raise DataError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from None


def save(path, fmt: str, meta: dict, arrays: dict) -> None:
    """Write ``arrays`` and ``meta`` (JSON-able; format and version are added), atomically."""
    meta = dict(meta, format=fmt, version=FORMAT_VERSION)
    blob = np.frombuffer(json.dumps(meta, default=float).encode(), np.uint8)
    atomic_savez(path, dict(arrays, meta=blob))


def load(path, fmt: str, what: str) -> tuple[dict, dict]:
    """``(meta, arrays)`` of a file written by ``save`` with this ``fmt``.

    DataError naming the file when it is unreadable, of another format, or of a
    newer version than this fastnn reads. ``what`` names the kind in messages.
    """
    arrays = read_npz(path)
    try:
        meta = json.loads(arrays.pop("meta").tobytes().decode())
    except (KeyError, ValueError, UnicodeDecodeError):
        raise DataError(f"{path}: not a valid {what} (no readable metadata)") from None
    found = meta.get("format") if isinstance(meta, dict) else None
    if found != fmt:
        raise DataError(f"{path}: not a valid {what} (format {found!r}, expected {fmt!r})")
    version = meta.get("version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise DataError(f"{path}: a {what} of format version {version!r}; this fastnn reads up to "
                        f"version {FORMAT_VERSION} (upgrade fastnn)")
    return meta, arrays
