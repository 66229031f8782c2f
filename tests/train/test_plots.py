"""results.csv plotting: metrics validated every other epoch still draw lines; never-filled columns get no panel."""

from __future__ import annotations

from pathlib import Path

from train.plots import plot_results, results_figure


def test_sparse_metric_columns_are_plotted_and_empty_columns_skipped(tmp_path: Path) -> None:
    csv = tmp_path / "results.csv"
    csv.write_text(
        "epoch,train/box_loss,metrics/mAP50,class_weight/a\n1,3.0,,\n2,2.5,0.10,\n3,2.2,,\n4,2.0,0.30,\n",
        encoding="utf-8",
    )
    fig = results_figure(csv)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["train/box_loss", "metrics/mAP50"]
    (line,) = fig.axes[1].get_lines()
    assert list(line.get_xdata()) == [2.0, 4.0]
    assert list(line.get_ydata()) == [0.10, 0.30]
    assert plot_results(tmp_path).is_file()
