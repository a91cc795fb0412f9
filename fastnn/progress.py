"""One progress display for everything that takes a while: fit, fit_many, the CLI's runs, the
doctor, lr-find and downloads.

A bar is drawn only where a person watches: on a terminal (stderr is a TTY) it redraws in place
and vanishes when its task ends; in a Jupyter notebook it is a text bar on stdout that stays, so
a saved notebook shows its final state. Anywhere else (stderr redirected to a log file or a pipe)
there is no bar, and training writes one line per epoch.
"""

from __future__ import annotations

import sys

from tqdm import tqdm


def in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel (IPython's ZMQ shell)."""
    shell = sys.modules.get("IPython")
    try:
        return shell is not None and type(shell.get_ipython()).__name__ == "ZMQInteractiveShell"
    except AttributeError:
        return False


def watched() -> bool:
    """Whether a person watches the output: a terminal on stderr, or a notebook."""
    return in_notebook() or sys.stderr.isatty()


def bar(total: int | None, desc: str, unit: str = "sample", show: bool = True) -> tqdm:
    """A progress bar for ``total`` units (``bar.update(n)``, ``bar.close()``); a silent one
    (the same methods, no output) unless ``show`` and a person watches."""
    notebook = in_notebook()
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True,
                file=sys.stdout if notebook else sys.stderr, leave=notebook,
                disable=not (show and (notebook or sys.stderr.isatty())))


def epoch_line(rec: dict, epochs: int) -> str:
    """One epoch of ``fit``'s history as the line the CLI and ``fit(verbose=1)`` print."""
    val = "" if rec["val_loss"] is None else f"val loss {rec['val_loss']:.4f} acc {rec['val_accuracy']:.4f}  "
    return (f"epoch {rec['epoch']:3d}/{epochs}  train loss {rec['train_loss']:.4f} acc {rec['train_accuracy']:.4f}  "
            f"{val}{rec['seconds']:.2f} s  {rec['samples_per_s']:,.0f} samples/s")


class EpochProgress:
    """Training's display: a bar per epoch (``update`` after each batch) and a line after it (``end``).

    epochs: the run's length (for "epoch 3/20"); n: samples per epoch; first: the first epoch's
    number (a resumed run's); show_bar / show_lines: what to show (the bar in any case only where
    a person watches). ``update`` also calls ``hook(k)``, the caller's own progress callable.
    """

    def __init__(self, epochs: int, n: int, first: int = 1, show_bar: bool = True, show_lines: bool = True,
                 hook=None):
        self.epochs, self.n, self.epoch, self.hook = int(epochs), n, int(first), hook
        self.show_bar, self.show_lines = show_bar, show_lines
        self.current = None

    def update(self, k: int) -> None:
        """``k`` more samples trained (``fit`` and ``fit_many`` call it after each batch); the
        epoch's bar opens at its first batch."""
        if self.current is None:
            self.current = bar(self.n, f"epoch {self.epoch}/{self.epochs}", show=self.show_bar)
        self.current.update(k)
        if self.hook is not None:
            self.hook(k)

    def end(self, line: str) -> None:
        """Close the epoch's bar and print its line; the next update opens the next epoch's bar."""
        self.close()
        self.epoch += 1
        if self.show_lines:
            print(line, flush=True)

    def close(self) -> None:
        if self.current is not None:
            self.current.close()
            self.current = None
