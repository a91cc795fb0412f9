"""What a run writes: its messages, findings and metrics file (``Output``), the model file, and the
pieces of the final report (per-class table, confusion matrix, plots) that ``cli/train.py``'s
``report`` puts together."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np

from ..errors import ConfigError, FastnnError
from ..model import MLP


class Terminated(KeyboardInterrupt):
    """SIGTERM (``docker stop``, cluster schedulers), handled as Ctrl-C is: weights saved, resume hint."""


class Output:
    """What a run says (unless --quiet), its doctor's findings and the metrics file (the progress
    bar and the epoch lines are ``fit``'s, through ``fastnn.progress``)."""

    def __init__(self, quiet, metrics_path, resumed_after=None):
        """resumed_after: the checkpoint's epoch when resuming: the metrics file is kept up to
        that epoch (records a killed run wrote after it are dropped) and appended to."""
        self.quiet = quiet
        if metrics_path and resumed_after is not None:
            _truncate_metrics(metrics_path, resumed_after)
        mode = "a" if resumed_after is not None else "w"
        self.metrics = open(metrics_path, mode) if metrics_path else None  # noqa: SIM115

    def say(self, text=""):
        if not self.quiet:
            print(text, flush=True)

    def record(self, obj):
        if self.metrics:
            self.metrics.write(json.dumps(obj) + "\n")
            self.metrics.flush()

    def finding(self, f, **where):
        """Print a doctor's finding (even with --quiet) and file it in the metrics."""
        print(f)
        self.record({"type": "finding", **where, **dataclasses.asdict(f)})

    def close(self):
        if self.metrics:
            self.metrics.close()


def _truncate_metrics(path, last_epoch: int) -> None:
    """Drop the records of epochs after ``last_epoch`` (and the result) from a metrics file, atomically."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return
    keep = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if rec.get("type") == "result" or (rec.get("epoch") or 0) > last_epoch:
            continue
        keep.append(line + "\n")
    tmp = Path(path).with_name(f".{Path(path).name}.tmp-{os.getpid()}")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)


def _probe_folder(folder: Path, flag: str, given, create=False) -> None:
    """Create ``folder`` if asked, then write and remove a file in it; ConfigError if that fails."""
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".fastnn-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except FileExistsError:
        raise ConfigError(f"{flag} {given}: {folder} is a file, not a folder") from None
    except OSError as exc:
        raise ConfigError(f"{flag} {given}: cannot write in {folder} ({exc.strerror or exc})") from None


def save_model(model: MLP, path) -> None:
    """``model.save(path)``; if writing fails after training, the weights go to a file in the
    temporary folder and the error names both paths (the run is not lost)."""
    try:
        model.save(path)
    except OSError as exc:
        rescue = Path(tempfile.gettempdir()) / f"fastnn-model-{os.getpid()}.npz"
        try:
            model.save(rescue)
            kept = f"the trained model was saved to {rescue} instead"
        except OSError as exc2:
            kept = f"saving it to {rescue} failed too ({exc2.strerror or exc2})"
        raise FastnnError(f"--save {path}: cannot write the model ({exc.strerror or exc}); {kept}") from None


def confusion_matrix(y_true, y_pred, k: int) -> np.ndarray:
    """(k, k) int64 counts; rows are true classes, columns predicted classes."""
    return np.bincount(np.asarray(y_true) * k + np.asarray(y_pred), minlength=k * k).reshape(k, k)


def format_report(cm: np.ndarray, classes) -> str:
    """Per-class accuracy table and the confusion matrix, as text."""
    k = cm.shape[0]
    width = max(5, max(len(str(c)) for c in classes))
    lines = [f"{'class':<{width}}  accuracy  correct / total"]
    for i in range(k):
        total = int(cm[i].sum())
        acc = cm[i, i] / total if total else float("nan")
        lines.append(f"{str(classes[i]):<{width}}  {acc:8.4f}  {int(cm[i, i]):7d} / {total}")
    lines.append("")
    lines.append("confusion matrix (rows: true class, columns: predicted class)")
    cell = max(5, len(str(int(cm.max()))) + 1)
    lines.append(" " * (width + 1) + "".join(f"{j:>{cell}}" for j in range(k)))
    for i in range(k):
        lines.append(f"{str(classes[i])[:width]:<{width}} " + "".join(f"{int(v):>{cell}}" for v in cm[i]))
    return "\n".join(lines)


def panel_shape(ds) -> tuple[int, int] | None:
    """The (H, W) to draw a data set's images at: as its files say (``Dataset.image_shape``), else a square
    when the pixel count is one; None when neither (a factorisation near square would be a guess)."""
    if getattr(ds, "image_shape", None):
        return tuple(ds.image_shape)
    d = ds.test_images.shape[1]
    side = int(round(math.sqrt(d)))
    return (side, side) if side * side == d else None


def write_plots(folder, history, cm, classes, images, y_true, y_pred, shape=(28, 28)) -> list[Path]:
    """Write curves.png, confusion.png and misclassified.png into ``folder`` (needs matplotlib); images
    are drawn at ``shape`` (H, W), and with shape None misclassified.png is not drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plots needs matplotlib: pip install 'fastnn[plots]'") from None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = [_plot_curves(plt, folder / "curves.png", history),
           _plot_confusion(plt, folder / "confusion.png", cm, classes)]
    if shape is not None:
        out.append(_plot_misclassified(plt, folder / "misclassified.png", classes, images, y_true, y_pred, shape))
    return out


def _plot_curves(plt, path: Path, history) -> Path:
    ep = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(ep, [h["train_loss"] for h in history], label="train")
    a2.plot(ep, [h["train_accuracy"] for h in history], label="train")
    if history and history[0].get("val_loss") is not None:
        a1.plot(ep, [h["val_loss"] for h in history], label="validation")
        a2.plot(ep, [h["val_accuracy"] for h in history], label="validation")
    a1.set(xlabel="epoch", ylabel="loss", title="loss")
    a2.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    a1.legend()
    a2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_confusion(plt, path: Path, cm, classes) -> Path:
    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(cm, cmap="Blues")
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xlabel="predicted", ylabel="true",
           title="confusion matrix")
    ax.set_xticklabels(classes, rotation=45, ha="right")
    ax.set_yticklabels(classes)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    fig.colorbar(im)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_misclassified(plt, path: Path, classes, images, y_true, y_pred, shape) -> Path:
    """The first 36 misclassified test images, each drawn at ``shape`` (H, W), with their classes."""
    wrong = np.flatnonzero(np.asarray(y_true) != np.asarray(y_pred))[:36]
    fig, axes = plt.subplots(6, 6, figsize=(9, 10))
    for ax, i in zip(axes.flat, list(wrong) + [None] * 36):
        ax.axis("off")
        if i is None:
            continue
        ax.imshow(np.asarray(images[i]).reshape(shape), cmap="gray")
        ax.set_title(f"true {classes[y_true[i]]}\npred {classes[y_pred[i]]}", fontsize=7)
    fig.suptitle("misclassified test images")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
