"""The ``fastnn`` command (also ``python -m fastnn``, ``scripts/train.py``, ``scripts/predict.py``).

Commands (with none, ``fastnn`` trains):

- ``fastnn train``: train an MLP and report its test accuracy (``train.py``, flags in ``flags.py``)
- ``fastnn doctor``: check data, initialisation, gradients and a trial run (``train.py``)
- ``fastnn lr-find``: the learning-rate range test (``train.py``)
- ``fastnn predict``: classify images with a saved model (``predict.py``)
- ``fastnn export``: write a saved model as ONNX (``predict.py``)
- ``fastnn sweep``: a hyperparameter search with Optuna (``sweep.py``)

What a run prints and writes, and its final report, are in ``output.py``.

Exit codes: 0 done; 1 training diverged (or the doctor found an error); 2 bad flag, bad data or a
bad file (one line on stderr, no traceback); 130 interrupted by Ctrl-C; 143 terminated (SIGTERM).
"""

from __future__ import annotations

import signal
import sys
import textwrap

from .. import __version__
from ..errors import FastnnError
from ..loop import stratified_split as stratified_split  # re-exported: tests/test_sweep.py uses cli.stratified_split
from .flags import DOCTOR_HELP, TRAIN_HELP
from .output import Terminated
from .predict import EXPORT_HELP, PREDICT_HELP, run_export, run_predict
from .sweep import SWEEP_HELP, run_sweep
from .train import LR_FIND_HELP, run_train

COMMANDS = {"train": TRAIN_HELP, "predict": PREDICT_HELP, "doctor": DOCTOR_HELP, "lr-find": LR_FIND_HELP,
            "export": EXPORT_HELP, "sweep": SWEEP_HELP}


def usage() -> str:
    """``fastnn --help``: the commands."""
    lines = ["usage: fastnn [COMMAND] [FLAGS]", "", "commands:"]
    lines += [textwrap.fill(text, 88, initial_indent=f"  {name:<9}", subsequent_indent=" " * 11)
              for name, text in COMMANDS.items()]
    lines += ["", "With no command, fastnn trains. 'fastnn COMMAND --help' lists a command's flags;",
              "'fastnn --version' prints the version. Exit status: 0 done, 1 training diverged (or the",
              "doctor found an error), 2 bad flag, data or file, 130 interrupted, 143 terminated."]
    return "\n".join(lines)


def _terminate(signum, frame):
    raise Terminated()


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if threading_main():
        signal.signal(signal.SIGTERM, _terminate)
    if argv[:1] in (["-h"], ["--help"]):
        print(usage())
        return 0
    if argv[:1] == ["--version"]:
        print(f"fastnn {__version__}")
        return 0
    cmd = argv[0] if argv and argv[0] in COMMANDS else None
    if cmd:
        argv = argv[1:]
    try:
        if cmd == "predict":
            return run_predict(argv)
        if cmd == "export":
            return run_export(argv)
        if cmd == "sweep":
            return run_sweep(argv)
        return run_train(argv, command=cmd or "train")
    except FastnnError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. --metrics or --save into a folder that does not exist
        print(f"error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print("terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130


def threading_main() -> bool:
    """Signal handlers can be set only from the main thread (``main`` may be called from others)."""
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
