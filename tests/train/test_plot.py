"""The demo's comparison plot: label placement (no two labels overlap), frozen as a line, re-drawing a results.json."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vidret.cli import main
from vidret.train.plot import Box, place_labels

pytest.importorskip("matplotlib")


def _disjoint(a: Box, b: Box) -> bool:
    return a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def _inside(a: Box, bounds: Box) -> bool:
    return a[0] >= bounds[0] and a[1] >= bounds[1] and a[2] <= bounds[2] and a[3] <= bounds[3]


def test_near_identical_points_get_disjoint_labels() -> None:
    anchors = [(300 + 0.3 * i, 200 + 0.2 * i) for i in range(8)]  # eight points within 3 pixels
    sizes = [(70.0, 12.0)] * 8
    markers = [(x - 4, y - 4, x + 4, y + 4) for x, y in anchors]
    bounds = (0.0, 0.0, 600.0, 400.0)
    boxes = place_labels(anchors, sizes, obstacles=markers, bounds=bounds, gap=7)
    assert len(boxes) == 8
    for a, b in itertools.combinations(boxes, 2):
        assert _disjoint(a, b), (a, b)
    for box, (w, h) in zip(boxes, sizes):
        assert all(_disjoint(box, m) for m in markers) and _inside(box, bounds)
        assert (box[2] - box[0], box[3] - box[1]) == pytest.approx((w, h))
    assert boxes == place_labels(anchors, sizes, obstacles=markers, bounds=bounds, gap=7)  # deterministic
    # the first label keeps its own row: labels move only when they must
    assert (boxes[0][1] + boxes[0][3]) / 2 == pytest.approx(anchors[0][1])


def test_a_label_at_the_right_edge_goes_left_of_its_point() -> None:
    (box,) = place_labels([(590.0, 100.0)], [(50.0, 10.0)], bounds=(0.0, 0.0, 600.0, 200.0), gap=4)
    assert box[2] <= 590.0 - 4 and _inside(box, (0.0, 0.0, 600.0, 200.0))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0, 100), st.floats(0, 100), st.floats(5, 80), st.floats(5, 20)), min_size=1, max_size=12
    )
)
def test_labels_never_overlap_each_other_or_markers(points: list[tuple[float, float, float, float]]) -> None:
    anchors = [(x, y) for x, y, _, _ in points]
    sizes = [(w, h) for _, _, w, h in points]
    markers = [(x - 2, y - 2, x + 2, y + 2) for x, y in anchors]
    boxes = place_labels(anchors, sizes, obstacles=markers, bounds=(-50.0, -50.0, 150.0, 150.0), gap=3)
    for a, b in itertools.combinations(boxes, 2):
        assert _disjoint(a, b)
    assert all(_disjoint(box, m) for box in boxes for m in markers)


def _row(method: str, share: float, r1: float, std: float = 0.5) -> dict:
    return {
        "method": method,
        "percent_non_embedding": share,
        "t2v": {"R1": {"mean": r1, "std": std}},
        "pair_accuracy": {"mean": 50.0, "std": 0.0},
    }


# MV-Adapter and bottleneck on top of each other (the overlap the issue saw), and a 0-parameter row
RESULTS = {
    "seeds": [0, 1],
    "rows": [
        _row("frozen", 0.0, 26.2, 0.0),
        _row("full", 100.0, 38.3),
        _row("mv_adapter", 3.67, 32.6),
        _row("cross_modal", 6.87, 44.7),
        _row("lora", 3.53, 32.4),
        _row("bottleneck", 3.68, 32.5),
    ],
}


def test_comparison_plot_labels_are_disjoint_and_frozen_is_a_line() -> None:
    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    from vidret.train.plot import comparison_figure

    fig = comparison_figure(RESULTS)
    try:
        fig.canvas.draw()
        ax = fig.axes[1]
        renderer = fig.canvas.get_renderer()
        # the text's own box (an Annotation's extent would include its connector line)
        labels = {t.get_text(): Text.get_window_extent(t, renderer) for t in ax.texts}
        assert set(labels) == {"frozen (0 trainable)", "full", "mv_adapter", "cross_modal", "lora", "bottleneck"}
        for (na, a), (nb, b) in itertools.combinations(labels.items(), 2):
            assert not a.overlaps(b), (na, nb)
        frame = ax.get_window_extent(renderer)
        assert all(
            frame.x0 <= e.x0 and e.x1 <= frame.x1 and frame.y0 <= e.y0 and e.y1 <= frame.y1 for e in labels.values()
        )
        # frozen: a horizontal line at its R@1, and no point at any made-up x on the log axis
        flat = [ln for ln in ax.get_lines() if list(ln.get_ydata()) == [26.2, 26.2]]
        assert len(flat) == 1 and flat[0].get_linestyle() == "--"
        xs = sorted(x for ln in ax.get_lines() if ln.get_marker() == "o" for x in ln.get_xdata())
        assert xs == sorted([100.0, 3.67, 6.87, 3.53, 3.68])
    finally:
        plt.close(fig)


def test_vidret_plot_redraws_a_demo_results_json(tmp_path: Path) -> None:
    src = tmp_path / "results.json"
    src.write_text(json.dumps(RESULTS))
    assert main(["plot", str(src)]) == 0
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["plot", str(src), "--out", str(tmp_path / "other.png")]) == 0
    assert (tmp_path / "other.png").read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "bad.json").write_text(json.dumps({"rows": 3}))
    assert main(["plot", str(tmp_path / "bad.json")]) == 1
