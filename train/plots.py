"""PNG plots of a run and of an evaluation: loss/metric curves from ``results.csv``, PR curves, F1-confidence curve,
confusion matrix and per-class AP bars.

Uses matplotlib's object API with the Agg canvas (no pyplot, no global backend switch), so it is safe in worker
threads and on machines without a display.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from train.evaluate import CONF_GRID, RECALL_THRESHOLDS, EvalResult

__all__ = [
    "plot_confusion_matrix",
    "plot_eval",
    "plot_f1_curve",
    "plot_per_class_ap",
    "plot_pr_curves",
    "plot_results",
]


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=150)
    return path


def plot_pr_curves(result: EvalResult, path: Path) -> Path:
    """Interpolated precision-recall curve at IoU 0.5 per class (thin) and their mean (thick)."""
    fig = Figure(figsize=(7, 5.5), layout="constrained")
    ax = fig.add_subplot()
    valid = ~np.isnan(result.ap[:, 0])
    for c, name in enumerate(result.class_names):
        if valid[c]:
            ax.plot(RECALL_THRESHOLDS, result.pr_precision[c], linewidth=1, label=f"{name} {result.ap[c, 0]:.3f}")
    if valid.any():
        mean = result.pr_precision[valid].mean(axis=0)
        ax.plot(RECALL_THRESHOLDS, mean, linewidth=3, color="black", label=f"all classes {result.map50:.3f} mAP50")
    ax.set(xlabel="Recall", ylabel="Precision", xlim=(0, 1), ylim=(0, 1.01), title="Precision-recall (IoU 0.5)")
    ax.legend(loc="lower left", fontsize="small")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_f1_curve(result: EvalResult, path: Path) -> Path:
    """F1 against confidence per class and on average, marking the confidence where P/R/F1 are reported."""
    fig = Figure(figsize=(7, 5.5), layout="constrained")
    ax = fig.add_subplot()
    valid = ~np.isnan(result.ap[:, 0])
    for c, name in enumerate(result.class_names):
        if valid[c]:
            ax.plot(CONF_GRID, result.f1_curve[c], linewidth=1, label=name)
    if valid.any():
        ax.plot(CONF_GRID, result.f1_curve[valid].mean(axis=0), linewidth=3, color="black", label="all classes")
        ax.axvline(result.conf_at_best_f1, color="grey", linestyle="--", linewidth=1)
    ax.set(xlabel="Confidence", ylabel="F1", xlim=(0, 1), ylim=(0, 1.01))
    ax.set_title(f"F1 {result.f1:.3f} at confidence {result.conf_at_best_f1:.3f} (IoU 0.5)")
    ax.legend(loc="lower left", fontsize="small")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_confusion_matrix(result: EvalResult, path: Path, *, normalize: bool = True) -> Path:
    """Confusion matrix (columns: true class, rows: predicted; last row/column: background) at conf 0.25, IoU 0.45.

    With ``normalize`` each column is divided by its total, so the diagonal reads as per-class recall.
    """
    names = [*result.class_names, "background"]
    matrix = result.confusion.astype(np.float64)
    if normalize:
        matrix = matrix / np.maximum(matrix.sum(axis=0, keepdims=True), 1)
    size = max(5.0, 0.7 * len(names) + 2)
    fig = Figure(figsize=(size + 1, size), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    fig.colorbar(image, ax=ax, shrink=0.8)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set(xlabel="True", ylabel="Predicted", title="Confusion matrix" + (" (column-normalised)" if normalize else ""))
    if len(names) <= 30:
        top = matrix.max() or 1.0
        for (i, j), value in np.ndenumerate(matrix):
            if value:
                text = f"{value:.2f}" if normalize else f"{int(value)}"
                color = "white" if value > 0.5 * top else "black"
                ax.text(j, i, text, ha="center", va="center", fontsize="x-small", color=color)
    return _save(fig, path)


def plot_per_class_ap(result: EvalResult, path: Path) -> Path:
    """Bars of AP50 and AP50-95 per class, with the instance count under each class name."""
    n = len(result.class_names)
    fig = Figure(figsize=(max(6.0, 1.1 * n + 2), 4.5), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(n)
    ap50 = np.nan_to_num(result.ap[:, 0])
    ap = np.nan_to_num(result.ap.mean(axis=1))
    ax.bar(x - 0.2, ap50, width=0.4, label=f"AP50 (mAP {result.map50:.3f})")
    ax.bar(x + 0.2, ap, width=0.4, label=f"AP50-95 (mAP {result.map50_95:.3f})")
    labels = [f"{name}\n({result.per_class[name]['instances']})" for name in result.class_names]
    ax.set_xticks(x, labels, rotation=30 if n > 6 else 0, fontsize="small")
    ax.set(ylabel="AP", ylim=(0, 1), title="Per-class AP (instances)")
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_eval(result: EvalResult, out_dir: Path) -> list[Path]:
    """All evaluation plots into ``out_dir``: PR_curve.png, F1_curve.png, confusion_matrix.png, per_class_ap.png."""
    out_dir = Path(out_dir)
    return [
        plot_pr_curves(result, out_dir / "PR_curve.png"),
        plot_f1_curve(result, out_dir / "F1_curve.png"),
        plot_confusion_matrix(result, out_dir / "confusion_matrix.png"),
        plot_per_class_ap(result, out_dir / "per_class_ap.png"),
    ]


def _read_results(csv_path: Path) -> tuple[list[float], dict[str, list[float]]]:
    with csv_path.open(newline="", encoding="utf-8") as f:
        rows = [{k.strip(): v.strip() for k, v in row.items() if k} for row in csv.DictReader(f)]
    if not rows:
        raise ValueError(f"{csv_path}: no rows to plot")
    columns: dict[str, list[float]] = {}
    for key in rows[0]:
        try:
            columns[key] = [float(r[key]) if r.get(key, "") != "" else math.nan for r in rows]
        except ValueError:
            continue  # a text column (e.g. a timestamp): not plotted
    epochs = columns.pop("epoch", [float(i) for i in range(len(rows))])
    return epochs, columns


def plot_results(run_dir: Path | str, *, max_panels: int = 24) -> Path:
    """One panel per numeric column of ``run_dir/results.csv`` against ``epoch`` -> ``run_dir/results.png``.

    Column names come from the trainer (losses, metrics, lr, class weights); nothing here hard-codes them.
    """
    run_dir = Path(run_dir)
    return _save(results_figure(run_dir / "results.csv", max_panels=max_panels), run_dir / "results.png")


def results_figure(csv_path: Path, *, max_panels: int = 24) -> Figure:
    """The figure :func:`plot_results` saves: one axes per column that has at least one value."""
    epochs, columns = _read_results(csv_path)
    # Metrics are empty on epochs without validation (--val-interval) and class weights on uniform-sampler runs:
    # plot only the epochs that have a value, and no panel for a column that never has one.
    present = {name: np.isfinite(np.asarray(v, dtype=float)) for name, v in columns.items()}
    names = [name for name in columns if present[name].any()][:max_panels]
    cols = min(5, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / cols))
    fig = Figure(figsize=(3.2 * cols, 2.6 * rows), layout="constrained")
    for k, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, k + 1)
        mask = present[name]
        x, y = np.asarray(epochs, dtype=float)[mask], np.asarray(columns[name], dtype=float)[mask]
        ax.plot(x, y, marker="." if len(x) < 30 else None, linewidth=1.5)
        ax.set_title(name, fontsize="small")
        ax.tick_params(labelsize="x-small")
        ax.grid(alpha=0.3)
    return fig
