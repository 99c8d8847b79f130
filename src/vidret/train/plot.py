"""``vidret plot RUN``: a run's loss and learning-rate curves (and final recalls) to PNG, from metrics.jsonl; the
demo's comparison plot from its results.json (``vidret plot demo_out/results.json``), re-drawn without training."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vidret.errors import VidretError


def _plot_demo_results(path: Path, out: str | Path | None) -> Path:
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise VidretError(f"cannot read {path}: {e}") from e
    if not isinstance(results, dict) or not isinstance(results.get("rows"), list) or "seeds" not in results:
        raise VidretError(f"{path} is not the results.json of `vidret demo`; pass it, or a run folder")
    try:
        return plot_comparison(results, Path(out) if out else path.with_suffix(".png"))
    except (KeyError, TypeError) as e:
        raise VidretError(f"{path}: a row lacks {e} (written by another vidret version?)") from e


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise VidretError(f"{path} not found: pass a run folder written by `vidret train`")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw loss and lr against step (plus T2V/V2T recall bars when results.json exists); returns the PNG path.

    ``run_dir`` may also be a ``vidret demo`` results.json: its comparison plot (default: ``results.png`` beside it).
    """
    if Path(run_dir).is_file() and Path(run_dir).suffix == ".json":
        return _plot_demo_results(Path(run_dir), out)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise VidretError("plotting needs matplotlib: pip install 'vidret[plot]'") from e
    run = Path(run_dir)
    records = read_metrics(run)
    if not records:
        raise VidretError(f"{run}/metrics.jsonl has no records yet")
    results = json.loads((run / "results.json").read_text()) if (run / "results.json").is_file() else None
    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(1, 3 if results else 2, figsize=(13 if results else 9, 3.6))
    axes[0].plot(steps, [r["loss"] for r in records])
    axes[0].set(xlabel="step", ylabel="loss", title="training loss")
    axes[1].plot(steps, [r["lr"] for r in records], color="tab:orange")
    axes[1].set(xlabel="step", ylabel="lr", title="learning rate")
    if results:
        keys = ["R1", "R5", "R10"]
        x = range(len(keys))
        axes[2].bar([i - 0.2 for i in x], [results["t2v"][k] for k in keys], width=0.4, label="T2V")
        axes[2].bar([i + 0.2 for i in x], [results["v2t"][k] for k in keys], width=0.4, label="V2T")
        axes[2].set_xticks(list(x), keys)
        axes[2].set(ylabel="%", title="test recall")
        axes[2].legend()
    fig.tight_layout()
    path = Path(out) if out else run / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------
# The demo's comparison: recall per method, and recall against trainable parameters
# --------------------------------------------------------------------------------------------------

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in display pixels


def _overlaps(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def place_labels(
    anchors: Sequence[tuple[float, float]],
    sizes: Sequence[tuple[float, float]],
    *,
    obstacles: Sequence[Box] = (),
    bounds: Box | None = None,
    gap: float = 4.0,
) -> list[Box]:
    """Boxes for text labels beside their points, no two overlapping (display pixels; deterministic).

    Greedy, in the given order: each label tries the slot right of its anchor (left of it when the right one leaves
    ``bounds``), vertically centred on it, then the slots one label height above and below, two heights, ...; it takes
    the first that overlaps no label placed before it and no obstacle (the markers) and lies inside ``bounds``. A
    finite set of boxes leaves a free slot within ``len(placed) + len(obstacles) + 1`` steps either way, so the search
    ends; when only slots outside ``bounds`` are free, the nearest of those is taken (still overlapping nothing).

    Args:
        anchors: the labelled points, ``(x, y)``.
        sizes: each label's ``(width, height)``.
        obstacles: boxes no label may cover, e.g. the markers.
        bounds: the area labels should stay in (the axes), or None.
        gap: pixels between a point and its label, and between stacked labels.

    Returns:
        One ``(x0, y0, x1, y1)`` box per label.
    """
    placed: list[Box] = []
    for (x, y), (w, h) in zip(anchors, sizes, strict=True):
        sides = [x + gap, x - gap - w]
        if bounds is not None and x + gap + w > bounds[2]:
            sides.reverse()  # the right slot would leave the axes: try the left first
        steps = len(placed) + len(obstacles) + 1
        fallback: Box | None = None
        chosen: Box | None = None
        for k in range(2 * steps + 1):
            dy = (k + 1) // 2 * (h + gap) * (1 if k % 2 else -1)  # 0, +1, -1, +2, -2, ... heights
            for x0 in sides:
                box = (x0, y + dy - h / 2, x0 + w, y + dy + h / 2)
                if any(_overlaps(box, other) for other in (*placed, *obstacles)):
                    continue
                inside = bounds is None or (
                    box[0] >= bounds[0] and box[1] >= bounds[1] and box[2] <= bounds[2] and box[3] <= bounds[3]
                )
                if inside:
                    chosen = box
                    break
                fallback = fallback or box
            if chosen is not None:
                break
        chosen = chosen or fallback
        if chosen is None:  # unreachable by the counting argument above; kept so the result is always total
            top = max(b[3] for b in (*placed, *obstacles))
            chosen = (sides[0], top + gap, sides[0] + w, top + gap + h)
        placed.append(chosen)
    return placed


def _bar_panel(ax: Any, results: dict[str, Any]) -> None:
    rows = results["rows"]
    x = range(len(rows))
    ax.bar(
        x,
        [r["t2v"]["R1"]["mean"] for r in rows],
        yerr=[r["t2v"]["R1"]["std"] for r in rows],
        color="tab:blue",
        label="T2V R@1",
    )
    ax.errorbar(
        x,
        [r["pair_accuracy"]["mean"] for r in rows],
        yerr=[r["pair_accuracy"]["std"] for r in rows],
        fmt="o-",
        color="tab:red",
        label="reversed pairs %",
    )
    ax.axhline(50, ls="--", color="grey", lw=0.8)
    ax.set_xticks(list(x), [r["method"] for r in rows], rotation=30)
    ax.set_ylabel("%")
    ax.set_title(f"pocket world test split ({len(results['seeds'])} seed(s))")
    ax.legend()


def _scatter_panel(ax: Any, rows: list[dict[str, Any]]) -> None:
    """T2V R@1 against the trainable share (log axis); no-parameter rows are dashed lines, not points at a fake x."""
    from matplotlib.ticker import FuncFormatter

    trained = [r for r in rows if r["percent_non_embedding"] > 0]
    frozen = [r for r in rows if r["percent_non_embedding"] <= 0]
    share = [r["percent_non_embedding"] for r in trained]
    r1 = [r["t2v"]["R1"]["mean"] for r in trained]
    ax.errorbar(share, r1, yerr=[r["t2v"]["R1"]["std"] for r in trained], fmt="o", color="tab:blue", capsize=2)
    for r in frozen:
        ax.axhline(r["t2v"]["R1"]["mean"], ls="--", color="grey", lw=1)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    lo, hi = (min(share), max(share)) if share else (0.1, 100.0)
    ax.set_xlim(lo / 2.5, hi * 2.5)
    ys = r1 + [r["t2v"]["R1"]["mean"] for r in frozen]
    pad = max(3.0, 0.12 * (max(ys) - min(ys)))
    ax.set_ylim(min(ys) - pad, max(ys) + pad)
    ax.set_xlabel("trainable, % of non-embedding parameters (log)")
    ax.set_ylabel("T2V R@1")
    ax.set_title("quality vs parameters")
    # Labels are placed in pixels, after the layout is final: tight_layout must not move the axes afterwards.
    fig = ax.figure
    fig.tight_layout()
    renderer = fig.canvas.get_renderer()
    to_px = ax.transData.transform
    texts = [f"{r['method']} (0 trainable)" for r in frozen] + [r["method"] for r in trained]
    sizes = []
    for t in texts:
        probe = ax.text(0, 0, t, fontsize=9)
        ext = probe.get_window_extent(renderer)
        sizes.append((ext.width, ext.height))
        probe.remove()
    box = ax.get_window_extent(renderer)
    bounds: Box = (box.x0 + 2, box.y0 + 2, box.x1 - 2, box.y1 - 2)
    # a no-parameter row's label sits just above its line, at the left edge
    anchors = [
        (bounds[0], float(to_px((1.0, r["t2v"]["R1"]["mean"]))[1]) + h / 2 + 2) for r, (_, h) in zip(frozen, sizes)
    ]
    anchors += [(float(p[0]), float(p[1])) for p in (to_px(xy) for xy in zip(share, r1))]
    radius = 4.0  # the marker's half-size in pixels; labels start beyond it
    markers = [(x - radius, y - radius, x + radius, y + radius) for x, y in anchors[len(frozen) :]]
    inverse = ax.transData.inverted()
    boxes = place_labels(anchors, sizes, obstacles=markers, bounds=bounds, gap=radius + 3)
    for i, (t, b) in enumerate(zip(texts, boxes)):
        xy_text = inverse.transform((b[0], b[1]))
        if i < len(frozen):
            ax.text(*xy_text, t, fontsize=9, ha="left", va="bottom", color="dimgrey")
            continue
        centre_y = (b[1] + b[3]) / 2
        moved = abs(centre_y - anchors[i][1]) > 1
        ax.annotate(
            t,
            xy=(share[i - len(frozen)], r1[i - len(frozen)]),
            xytext=xy_text,
            fontsize=9,
            ha="left",
            va="bottom",
            arrowprops={"arrowstyle": "-", "color": "grey", "lw": 0.6, "shrinkA": 0, "shrinkB": 4} if moved else None,
        )


def comparison_figure(results: dict[str, Any]) -> Any:
    """The demo's two panels: recall and reversed-pair accuracy per method; recall against trainable share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    _bar_panel(axes[0], results)
    _scatter_panel(axes[1], results["rows"])
    return fig


def plot_comparison(results: dict[str, Any], path: str | Path) -> Path:
    """Write :func:`comparison_figure` of a ``vidret demo`` results dict (its ``results.json``) to a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise VidretError("plotting needs matplotlib: pip install 'vidret[plot]'") from e
    fig = comparison_figure(results)
    # No bbox_inches="tight": the labels were placed in this figure's pixels; dpi scales them all alike.
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
