"""Run plots as PNG files: loss curve, recall@k base vs adapted, confusion matrix.

matplotlib is imported inside each function and used through its object API with the Agg
canvas (no pyplot, no global backend switch), so plotting is safe in threads and headless.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

from embedft.atomic import write_bytes

DPI = 120


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, out_path: str | Path) -> Path:
    out = Path(out_path)
    fig.tight_layout()
    png = io.BytesIO()  # drawn in memory, written whole by atomic.write_bytes
    fig.savefig(png, format="png")
    write_bytes(out, png.getvalue())
    return out


def _moving_average(values: Sequence[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_loss_curve(steps: Sequence[int], losses: Sequence[float], out_path: str | Path,
                    val_epochs: Sequence[int] | None = None, val_recall: Sequence[float | None] | None = None,
                    val_name: str = "val recall@10") -> Path:
    """Training loss per logged step (raw and smoothed); the per-epoch validation metric (`val_name`:
    recall@10, or kNN macro-F1 for labeled data) on a second axis.

    val_epochs: the optimizer steps at which each epoch's validation ran (x positions).
    """
    fig = _figure(7, 4)
    ax = fig.add_subplot(1, 1, 1)
    steps, losses = list(steps), [float(v) for v in losses]
    ax.plot(steps, losses, color="tab:blue", alpha=0.35 if len(losses) > 20 else 1.0, lw=1, label="train loss")
    if len(losses) > 20:
        ax.plot(steps, _moving_average(losses, max(5, len(losses) // 20)), color="tab:blue", lw=2,
                label="train loss (moving avg)")
    ax.set_xlabel("step")
    ax.set_ylabel("InfoNCE loss")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if val_epochs and val_recall:
        pts = [(x, float(y)) for x, y in zip(val_epochs, val_recall) if y is not None]
        if pts:
            ax2 = ax.twinx()
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="tab:orange", label=val_name)
            ax2.set_ylabel(val_name)
            ax2.set_ylim(0, 1.02)
            h2, l2 = ax2.get_legend_handles_labels()
            handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="best", fontsize=8)
    ax.set_title("training loss")
    return _save(fig, out_path)


def _at(curve: dict, k: int) -> float | None:
    # Curves read back from report.json have string keys.
    v = curve.get(k, curve.get(str(k)))
    return None if v is None else float(v)


def plot_recall_curve(ks: Sequence[int], base: dict[int, float], adapted: dict[int, float],
                      out_path: str | Path) -> Path:
    """Standard recall@k for each k, base vs adapted (base may be empty when it was not evaluated)."""
    fig = _figure(6, 4)
    ax = fig.add_subplot(1, 1, 1)
    ks = sorted(int(k) for k in ks)
    for name, curve, style in (("base", base or {}, "s--"), ("adapted", adapted, "o-")):
        pts = [(k, _at(curve, k)) for k in ks if _at(curve, k) is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=name)
            for k, v in pts:
                ax.annotate(f"{v:.3f}", (k, v), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    if ks and ks[-1] / max(ks[0], 1) >= 20:
        ax.set_xscale("log")
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("k")
    ax.set_ylabel("recall@k")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title("retrieval recall@k = |top k ∩ positives| / |positives| (exact search)", fontsize=9)
    return _save(fig, out_path)


def plot_confusion_matrix(matrix, class_names: Sequence[str], out_path: str | Path, title: str) -> Path:
    """Counts matrix (C, C), rows = true class, columns = predicted; cells shaded by row share."""
    import numpy as np

    m = np.asarray(matrix, dtype=float)  # (C, C)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] != len(class_names):
        raise ValueError(f"confusion matrix of shape {m.shape} does not match {len(class_names)} class names")
    c = m.shape[0]
    row_share = m / np.maximum(m.sum(axis=1, keepdims=True), 1)  # (C, C), shading comparable across classes
    side = min(max(4.0, 0.45 * c + 2), 16.0)
    fig = _figure(side + 1, side)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(row_share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    if c <= 40:
        names = [str(n)[:24] for n in class_names]
        fs = 8 if c <= 15 else 6
        ax.set_xticks(range(c))
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=fs)
        ax.set_yticks(range(c))
        ax.set_yticklabels(names, fontsize=fs)
    if c <= 20:  # counts stay legible only on small matrices
        for i in range(c):
            for j in range(c):
                if m[i, j]:
                    ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", fontsize=7,
                            color="white" if row_share[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return _save(fig, out_path)
