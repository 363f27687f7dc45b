"""The sweep tables' bar figures stay legible: a long title wraps inside the figure, long row labels neither
leave the figure nor overlap, and the teacher's legend does not cover a bar. The seeds note does not claim n
seeds for a row that has fewer."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.image import imread  # noqa: E402

from pipeline.experiments.sweep import SweepTable  # noqa: E402
from pipeline.experiments.tables import RowStats, bar_figure, seeds_note  # noqa: E402


def _rows(n: int, label_len: int, seeds: int = 3) -> list[RowStats]:
    rows = []
    for i in range(n):
        label = f"row {i}: " + "pair + DSMD with a long description of what changes " * 3
        results = [{"metrics": {"rsum": 100.0 + 10 * i + s}} for s in range(seeds)]
        rows.append(RowStats(label[:label_len], seeds, results, list(range(seeds))))
    return rows


def _boxes(path, rows, title):
    """Render through bar_figure and return (figure bbox, title bbox, tick label bboxes, legend bbox, bar bboxes)."""
    captured = {}
    import pipeline.experiments.tables as tables

    real = tables.Figure

    def keep(*args, **kwargs):
        captured["fig"] = real(*args, **kwargs)
        return captured["fig"]

    tables.Figure = keep
    try:
        assert bar_figure(SweepTable("t", title, "", (0, 1, 2), ()), rows,
                          {"name": "strong", "metrics": {"rsum": 400.0}}, path) == path
    finally:
        tables.Figure = real
    fig = captured["fig"]
    FigureCanvasAgg(fig).draw()  # lay out as savefig did, on a canvas that can measure text
    r = fig.canvas.get_renderer()
    ax = fig.axes[0]
    texts = [fig._suptitle, ax.xaxis.label]
    return (fig.bbox, [t.get_window_extent(r) for t in texts], [t.get_window_extent(r) for t in ax.get_yticklabels()],
            fig.legends[0].get_window_extent(r), [p.get_window_extent(r) for p in ax.patches])


def _inside(inner, outer) -> bool:
    return inner.x0 >= outer.x0 - 1 and inner.x1 <= outer.x1 + 1 and inner.y0 >= outer.y0 - 1 and \
        inner.y1 <= outer.y1 + 1


def test_long_titles_and_labels_stay_inside_and_apart(tmp_path):
    title = "Table X: " + "the default student distilled from the strong teacher with everything switched on " * 2
    fig, (title_box, xlabel), ticks, legend, bars = _boxes(tmp_path / "f.png", _rows(7, 150), title)
    assert _inside(title_box, fig), "the title runs out of the figure"
    assert not legend.overlaps(xlabel) and not legend.overlaps(title_box)
    assert all(_inside(t, fig) for t in ticks), "a row label runs out of the figure"
    for a, b in zip(ticks, ticks[1:]):
        assert not a.overlaps(b), "two row labels overlap"
    assert not any(legend.overlaps(b) for b in bars), "the legend covers a bar"
    assert imread(tmp_path / "f.png").shape[0] > 300  # a real picture was written


def test_few_rows_too(tmp_path):
    fig, (title_box, xlabel), ticks, legend, bars = _boxes(tmp_path / "g.png", _rows(2, 20), "Table Y: short")
    assert _inside(title_box, fig) and all(_inside(t, fig) for t in ticks) and not legend.overlaps(xlabel)
    assert not any(legend.overlaps(b) for b in bars)


def test_seeds_note_never_claims_more_seeds_than_a_row_has():
    table = SweepTable("t", "T", "", (0, 1, 2), ())
    assert seeds_note(table, _rows(2, 10)) == "Mean ± sample std over 3 seeds (seeds 0, 1, 2)."
    short = _rows(2, 10)
    short[1].results = short[1].results[:1]
    assert "3 seeds" not in seeds_note(table, short)
    assert "each row's seeds column" in seeds_note(table, short)
