"""The figures of results, drawn from rows in memory: an error (or FID) curve per run against the
corruption level (supplement Figs 1 and 3), and grids of several runs side by side (Figs 2 and 4).
The test's own figures (fae.evaluation.publish) and `fae report`'s are these."""

from __future__ import annotations

import math
from pathlib import Path

from fae.data.noise import corruption_label
from fae.evaluation.results import Curves, error_rows, reference_error
from fae.evaluation.stats import half_width, interval
from fae.files import written


def pyplot():
    """matplotlib's pyplot on the file-only backend (no display anywhere)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_kind(runs: dict[str, Curves], kind: str, file: Path, metric: str | None = None) -> None:
    """Error (or, given `metric`, that quality score) against level, one curve and band per run; a log
    scale when the values span more than a factor of 20 (a diverged run beside working ones), the
    legend beside the axes for many runs."""
    plt = pyplot()
    many = len(runs) > 6
    bands: list[float] = []
    fig, ax = plt.subplots(figsize=(7.5 if many else 5, 3.6))
    colors = plt.get_cmap("tab20" if len(runs) > 10 else "tab10")
    name, plotted = "", []
    pooled = any(c.runs > 1 for c in runs.values())
    for i, (label, curves) in enumerate(runs.items()):
        chosen = error_rows(curves.rows) if metric is None else [r for r in curves.rows if r.metric == metric]
        rows = sorted((r for r in chosen if r.kind == kind), key=lambda r: r.level)
        if not rows:
            continue
        name = rows[0].metric
        levels, means, stds = [r.level for r in rows], [r.mean for r in rows], [r.std for r in rows]
        color = colors(i % colors.N)
        ax.plot(levels, means, marker="o", ms=3, color=color, label=f"{label} (n={curves.runs})" if pooled else label)
        if pooled:  # a pooled row's std and n are across runs: the band is its mean's 95% interval
            stds = [0.0 if math.isnan(h := half_width(r.std, r.n)) else h for r in rows]
        low = [m - s for m, s in zip(means, stds, strict=True)]
        high = [m + s for m, s in zip(means, stds, strict=True)]
        ax.fill_between(levels, low, high, alpha=0.2, color=color)
        plotted += means
        bands += low + high
    reference = mean_image_error(runs) if metric is None else None
    if reference is not None:
        ax.axhline(reference, color="0.4", ls="--", lw=1, label="training set's mean image")
    if plotted and min(plotted) > 0 and max(plotted) / min(plotted) > 20:
        ax.set_yscale("log")
    elif plotted:
        ax.set_ylim(*axis_range(plotted + ([] if reference is None else [reference]), bands))
    ax.set_xlabel(corruption_label(kind))
    what = f"{name.upper()} of reconstructions" if metric else f"reconstruction {name.upper()}"
    ax.set_ylabel(f"{what} vs clean image{'s' if metric else ''}")
    title = "band: 95% confidence interval across runs (n = runs)" if pooled else "band: ±1 sd over test images"
    ax.set_title(title, fontsize=8)
    if many:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with written(file) as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def mean_image_error(runs: dict[str, Curves]) -> float | None:
    """The error of the training set's mean image where the runs share one (one data set), else None."""
    references = {reference_error(c.rows) for c in runs.values()} - {None}
    return next(iter(references)) if len(references) == 1 else None


def axis_range(values: list[float], bands: list[float]) -> tuple[float, float]:
    """The range of a linear axis: the points and their bands where the bands stay near the points, else
    the points padded by a quarter of their spread (a group of 2 seeds has a t-interval 12.7 standard errors
    wide, which would flatten every curve into a line; its band then runs off the axes), a 4% margin
    around that, and never below 0 when no point is (an error)."""
    values, bands = [v for v in values if math.isfinite(v)], [b for b in bands if math.isfinite(b)]
    if not values:
        return (0.0, 1.0)
    low, high = min(values), max(values)
    pad = 0.25 * (high - low) or 0.05 * abs(high) or 1.0
    bottom, top = max(min(bands + [low]), low - pad), min(max(bands + [high]), high + pad)
    margin = 0.04 * (top - bottom)
    return (max(bottom - margin, 0.0) if low >= 0 else bottom - margin), top + margin


def plot_results(runs: dict[str, Curves], out: Path) -> list[Path]:
    """robustness_<kind>.png for every corruption kind and fid_<kind>.png where FIDs were scored; returns them."""
    written = []
    for kind in sorted({r.kind for c in runs.values() for r in error_rows(c.rows)}):
        written.append(out / f"robustness_{kind}.png")
        plot_kind(runs, kind, written[-1])
        if any(r.kind == kind and r.metric == "fid" for c in runs.values() for r in c.rows):
            written.append(out / f"fid_{kind}.png")
            plot_kind(runs, kind, written[-1], metric="fid")
    return written


def combine_grids(grids: dict[str, Path], file: Path, per_row: int = 4) -> None:
    """The runs' grid images side by side, up to `per_row` to a row, titled by run."""
    plt = pyplot()
    images = {label: plt.imread(path) for label, path in grids.items()}
    height, width = next(iter(images.values())).shape[:2]
    rows, columns = math.ceil(len(grids) / per_row), min(per_row, len(grids))
    figsize = (3.2 * columns, (3.2 * height / width + 0.3) * rows)
    fig, axes = plt.subplots(rows, columns, figsize=figsize, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (label, image) in zip(axes.flat, images.items(), strict=False):
        ax.imshow(image, cmap="gray", interpolation="nearest")
        ax.set_title(label, fontsize=8)
    fig.tight_layout()
    with written(file) as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_tradeoffs(runs: dict[str, Curves], out: Path) -> list[Path]:
    """tradeoff_<column>.png: robustness (each kind's AUC, full and up to 0.5) and sample FID against the
    clean test error, a point per run or group with its 95% interval across runs on both axes, so that
    families are compared at matched clean error (a blurrier model can buy robustness with clean error).
    Only where the runs record their clean error, and a column only where some run has a value (a kind
    swept at one level above 0.5 has no low-noise AUC); returns the files written."""
    columns = list(dict.fromkeys(k for c in runs.values() for k in c.summary))
    clean = next((k for k in columns if k.startswith("clean ")), None)
    wanted = [k for k in columns if " AUC" in k or k == "sample FID"]
    if clean is None or not wanted:
        return []
    plt, files, reference = pyplot(), [], mean_image_error(runs)
    for column in wanted:
        drawn = {  # label: ((x, its half-width), (y, its half-width)), the groups with both values
            label: (interval(curves.summary.get(clean, [])), interval(curves.summary.get(column, [])))
            for label, curves in runs.items()
        }
        drawn = {label: xy for label, xy in drawn.items() if not (math.isnan(xy[0][0]) or math.isnan(xy[1][0]))}
        if not drawn:
            continue  # nothing to draw: an empty figure would say nothing
        fig, ax = plt.subplots(figsize=(5, 3.8))
        colors = plt.get_cmap("tab20" if len(runs) > 10 else "tab10")
        points: dict[str, list[float]] = {"x": [], "y": [], "x bars": [], "y bars": []}
        for i, (label, curves) in enumerate(runs.items()):
            if label not in drawn:
                continue
            (x, dx), (y, dy) = drawn[label]
            points["x"].append(x)
            points["y"].append(y)
            points["x bars"] += [x - dx, x + dx] if not math.isnan(dx) else []
            points["y bars"] += [y - dy, y + dy] if not math.isnan(dy) else []
            ax.errorbar(x, y, xerr=None if math.isnan(dx) else dx, yerr=None if math.isnan(dy) else dy, fmt="o",
                        ms=4, capsize=2, color=colors(i % colors.N), label=f"{label} (n={curves.runs})")  # fmt: skip
        if " AUC" in column and reference is not None:  # the mean image's error is the same at every level
            ax.axhline(reference, color="0.4", ls="--", lw=1, label="training set's mean image")
            points["y"].append(reference)
        if points["x"]:  # bars far wider than the points' spread (two seeds) run off the axes
            ax.set_xlim(*axis_range(points["x"], points["x bars"]))
            ax.set_ylim(*axis_range(points["y"], points["y bars"]))
        ax.set_xlabel(f"{clean} (test)")
        ax.set_ylabel(column)
        ax.set_title("bars: 95% confidence interval across runs", fontsize=8)
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.grid(alpha=0.3)
        file = out / f"tradeoff_{column.replace(' ', '_').replace('≤', 'le')}.png"
        with written(file) as f:
            fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        files.append(file)
    return files
