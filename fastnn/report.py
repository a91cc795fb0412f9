"""Text reports and optional plots of a finished run."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import ConfigError


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


def write_plots(folder, history, cm, classes, images, y_true, y_pred, side=28) -> list[Path]:
    """Write curves.png, confusion.png and misclassified.png into ``folder`` (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plots needs matplotlib: pip install 'fastnn[plots]'") from None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
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
    out.append(folder / "curves.png")
    fig.savefig(out[-1], dpi=100)
    plt.close(fig)

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
    out.append(folder / "confusion.png")
    fig.savefig(out[-1], dpi=100)
    plt.close(fig)

    wrong = np.flatnonzero(np.asarray(y_true) != np.asarray(y_pred))[:36]
    fig, axes = plt.subplots(6, 6, figsize=(9, 10))
    for ax, i in zip(axes.flat, list(wrong) + [None] * 36):
        ax.axis("off")
        if i is None:
            continue
        img = np.asarray(images[i])
        if img.size == side * side:
            ax.imshow(img.reshape(side, side), cmap="gray")
        ax.set_title(f"true {classes[y_true[i]]}\npred {classes[y_pred[i]]}", fontsize=7)
    fig.suptitle("misclassified test images")
    fig.tight_layout()
    out.append(folder / "misclassified.png")
    fig.savefig(out[-1], dpi=100)
    plt.close(fig)
    return out
