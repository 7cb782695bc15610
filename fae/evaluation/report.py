"""`fae report RUN_DIR... [--out DIR] [--group_by run|parent|model]`: the paper's robustness figures
from saved sweep results.

Reads robustness.json of each run (the file itself, a folder holding it, or a training run whose
newest `test-*` folder holds it), and the clean test metrics beside it (that folder's metrics.csv),
and writes to --out:
  robustness_gaussian.png   error vs sigma, one curve per run or group, with a band of +- one standard
                            deviation
  robustness_mask.png       error vs nu, likewise (supplement Figs 1 and 3)
  robustness.md             a summary table (clean error, posterior Fisher divergence, active units,
                            and the area under each error curve divided by its level range), then a
                            table of the error per level
  reconstructions_<kind>_<level>.png   the runs' grids of reconstructions from corrupted images (true
                            images on odd rows, reconstructions on even rows; supplement Figs 2 and 4),
                            side by side, for every level all runs have a grid of
  reconstructions_clean.png the same for the clean test images (the test's images/ grid)

--group_by pools runs: "run" (default) keeps each run apart, its band and +- the standard deviation
over test images; "parent" pools the runs of one folder (OUT/<variant>/seed0, seed1, ...: the seeds
of one setting) and "model" the runs of one model class. A pooled curve is the mean over its runs of
each run's mean error, and its band and +- are the standard deviation ACROSS RUNS (the seed spread).
No network and no W&B are needed.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from fae.errors import UserError, make_folder

QUALITY_METRICS = ("fid", "kid")  # rows of sample quality (fae.evaluation.quality); the others are errors
QUALITY_COLUMNS = {  # the summary table's columns of FID/KID rows (kind, metric)
    ("clean", "fid"): "recon FID",
    ("samples", "fid"): "sample FID",
    ("samples", "kid"): "sample KID",
    ("fitted_samples", "fid"): "fitted-sample FID",
    ("fitted_samples", "kid"): "fitted-sample KID",
}
FIELDS = {"model": str, "kind": str, "level": (int, float), "mean": (int, float), "std": (int, float), "n": int}
KIND_LABELS = {"gaussian": "Gaussian noise sigma", "mask": "masking probability nu"}


def find_results(path: Path) -> Path:
    """The robustness.json a user means by `path`."""
    if path.is_file():
        return path
    if (path / "robustness.json").is_file():
        return path / "robustness.json"
    tests = sorted(path.glob("test-*/robustness.json"))
    if tests:
        return tests[-1]
    raise UserError(f"no robustness.json in {path} or its test-* folders: run `fae test --ckpt_path ...` first")


def load_results(path: Path) -> list[dict]:
    """Rows of a robustness.json, checked field by field."""
    file = find_results(path)
    try:
        rows = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{file} is not valid JSON ({err}): re-run `fae test` to write it again") from err
    if not isinstance(rows, list) or not rows:
        raise UserError(f"{file} should hold a non-empty list of result rows: re-run `fae test` to write it again")
    for i, row in enumerate(rows):
        for name, kind in FIELDS.items():
            if not isinstance(row, dict) or not isinstance(row.get(name), kind):
                raise UserError(
                    f"{file} is malformed: row {i} has no valid {name!r} field; re-run `fae test` to write it again"
                )
    return rows


SUMMARY_METRICS = ("posterior_fisher", "active_units")  # test/<name>, beside the clean error


@dataclass
class Curves:
    """The sweep of one run, or of a group of runs pooled (see the module docstring)."""

    rows: list[dict]  # one per (kind, level): mean, std, n
    summary: dict[str, list[float]] = field(default_factory=dict)  # column -> one value per run
    runs: int = 1


def clean_metrics(results_file: Path, metric: str) -> dict[str, float]:
    """The clean test set's error and diagnostics from the metrics.csv beside a robustness.json."""
    path = results_file.parent / "metrics.csv"
    if not path.is_file():
        return {}
    values: dict[str, float] = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            values.update({k: float(v) for k, v in row.items() if k and k.startswith("test/") and v})
    names = {f"clean {metric}": f"test/recon_{metric}", **{n: f"test/{n}" for n in SUMMARY_METRICS}}
    return {column: values[key] for column, key in names.items() if key in values}


def error_rows(rows: list[dict]) -> list[dict]:
    """The reconstruction-error rows of a sweep (its FID/KID rows left out)."""
    return [r for r in rows if r.get("metric") not in QUALITY_METRICS]


def area_under_curve(rows: list[dict], kind: str) -> float:
    """Trapezoidal area under error(level) of one noise kind, divided by the level range: the mean
    error over the range, comparable between runs swept on the same levels."""
    points = sorted((r["level"], r["mean"]) for r in rows if r["kind"] == kind)
    if len(points) < 2:
        return math.nan
    area = sum((b[0] - a[0]) * (a[1] + b[1]) / 2 for a, b in zip(points[:-1], points[1:], strict=True))
    return area / (points[-1][0] - points[0][0])


def run_curves(path: Path) -> Curves:
    file = find_results(path)
    rows = load_results(path)
    errors = error_rows(rows)
    summary = clean_metrics(file, errors[0].get("metric", "error")) if errors else {}
    for kind in sorted({r["kind"] for r in errors}):
        summary[f"{kind} AUC"] = area_under_curve(errors, kind)
    for r in rows:
        if (r["kind"], r.get("metric")) in QUALITY_COLUMNS:
            summary[QUALITY_COLUMNS[(r["kind"], r["metric"])]] = r["mean"]
    return Curves(rows, {k: [v] for k, v in summary.items()})


def pool(runs: list[Curves]) -> Curves:
    """Runs of one setting as one curve: per level the mean and standard deviation across runs of
    their mean errors; the summary keeps every run's value."""
    key = lambda r: (r["kind"], r["level"], r.get("metric", ""))  # noqa: E731
    rows = []
    for level in sorted({key(r) for c in runs for r in c.rows}):
        means = [r["mean"] for c in runs for r in c.rows if key(r) == level]
        if len(means) != len(runs):
            continue  # a level not every run was swept at
        template = next(r for r in runs[0].rows if key(r) == level)
        std = statistics.stdev(means) if len(means) > 1 else 0.0
        rows.append({**template, "mean": statistics.mean(means), "std": std, "n": len(means)})
    columns = dict.fromkeys(k for c in runs for k in c.summary)
    summary = {k: [v for c in runs for v in c.summary.get(k, [])] for k in columns}
    return Curves(rows, summary, runs=len(runs))


def labels_for(paths: list[Path]) -> list[str]:
    """Each run's folder name, lengthened by parent folders until every label is unique."""
    folders = [(p if p.is_dir() else p.parent).resolve() for p in paths]
    depth = 1
    while True:
        labels = ["/".join(f.parts[-depth:]) for f in folders]
        if len(set(labels)) == len(labels) or depth >= max(len(f.parts) for f in folders):
            return labels
        depth += 1


def group_key(path: Path, rows: list[dict], label: str, group_by: str) -> str:
    folder = (path if path.is_dir() else path.parent).resolve()
    if folder.name.startswith("test-") and not (folder / "checkpoints").is_dir():
        folder = folder.parent  # a test folder belongs to its training run
    if group_by == "run":
        return f"{rows[0]['model']} ({label})"
    if group_by == "parent":
        return folder.parent.name
    if group_by == "model":
        return rows[0]["model"]
    raise UserError(f"--group_by must be 'run', 'parent' or 'model', got {group_by!r}")


def plot_kind(runs: dict[str, Curves], kind: str, file: Path, metric: str | None = None) -> None:
    """Error (or, given `metric`, that quality score) against level, one curve and band per run; a log
    scale when the values span more than a factor of 20 (a diverged run beside working ones), the
    legend beside the axes for many runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    many = len(runs) > 6
    fig, ax = plt.subplots(figsize=(7.5 if many else 5, 3.6))
    colors = plt.get_cmap("tab20" if len(runs) > 10 else "tab10")
    name, plotted = "", []
    pooled = any(c.runs > 1 for c in runs.values())
    for i, (label, curves) in enumerate(runs.items()):
        chosen = error_rows(curves.rows) if metric is None else [r for r in curves.rows if r.get("metric") == metric]
        rows = sorted((r for r in chosen if r["kind"] == kind), key=lambda r: r["level"])
        if not rows:
            continue
        name = rows[0].get("metric", "error")
        levels = [r["level"] for r in rows]
        means = [r["mean"] for r in rows]
        stds = [r["std"] for r in rows]
        color = colors(i % colors.N)
        ax.plot(levels, means, marker="o", ms=3, color=color, label=f"{label} (n={curves.runs})" if pooled else label)
        low = [m - s for m, s in zip(means, stds, strict=True)]
        high = [m + s for m, s in zip(means, stds, strict=True)]
        ax.fill_between(levels, low, high, alpha=0.2, color=color)
        plotted += means
    if plotted and min(plotted) > 0 and max(plotted) / min(plotted) > 20:
        ax.set_yscale("log")
    ax.set_xlabel(KIND_LABELS.get(kind, kind))
    what = f"{name.upper()} of reconstructions" if metric else f"reconstruction {name.upper()}"
    ax.set_ylabel(f"{what} vs clean image{'s' if metric else ''}")
    ax.set_title(f"band: ±1 sd {'across runs (n = runs)' if pooled else 'over test images'}", fontsize=8)
    if many:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)


def format_values(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g}"


def markdown_table(runs: dict[str, Curves]) -> str:
    labels = list(runs)
    pooled = any(c.runs > 1 for c in runs.values())
    spread = "standard deviation across runs" if pooled else "standard deviation over test images"
    columns = list(dict.fromkeys(k for c in runs.values() for k in c.summary))
    lines = [
        "| run | runs | " + " | ".join(columns) + " |",
        "|---|---|" + "---|" * len(columns),
        *(
            f"| {label} | {c.runs} | " + " | ".join(format_values(c.summary.get(k, [])) for k in columns) + " |"
            for label, c in runs.items()
        ),
        "",
        f"Error per noise level, mean ± {spread}:",
        "",
        "| noise | level | " + " | ".join(labels) + " |",
        "|---|---|" + "---|" * len(labels),
    ]
    keys = sorted({(r["kind"], r["level"]) for c in runs.values() for r in error_rows(c.rows)})
    for kind, level in keys:
        cells = []
        for label in labels:
            row = next((r for r in error_rows(runs[label].rows) if (r["kind"], r["level"]) == (kind, level)), None)
            cells.append(f"{row['mean']:.4f} ± {row['std']:.4f}" if row else "")
        lines.append(f"| {kind} | {level:g} | " + " | ".join(cells) + " |")
    fid = {label: {(r["kind"], r["level"]): r["mean"] for r in c.rows if r.get("metric") == "fid"}
           for label, c in runs.items()}  # fmt: skip
    keys = sorted({k for values in fid.values() for k in values if k[0] not in ("samples", "fitted_samples")})
    if keys:
        mean = "mean across runs" if pooled else "one value per run"
        lines += ["", f"FID of the reconstructions against the clean test images, per noise level ({mean}):", ""]
        lines += ["| noise | level | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
        for kind, level in keys:
            cells = [f"{fid[label][(kind, level)]:.4g}" if (kind, level) in fid[label] else "" for label in labels]
            lines.append(f"| {kind} | {level:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def combine_grids(grids: dict[str, Path], file: Path, per_row: int = 4) -> None:
    """The runs' grid images side by side, up to `per_row` to a row, titled by run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.savefig(file, dpi=110, bbox_inches="tight")
    plt.close(fig)


def grids_of(results_file: Path) -> dict[str, Path]:
    """A test's reconstruction grids by name: the sweep's (reconstructions_<kind>_<level>) and the
    clean test images' (reconstructions_clean, from images/test_reconstructions_*.png)."""
    folder = results_file.parent
    grids = {p.stem: p for p in folder.glob("reconstructions_*.png")}
    clean = sorted(folder.glob("images/test_reconstructions_*.png"))
    if clean:
        grids["reconstructions_clean"] = clean[-1]
    return grids


def write_report(runs: dict[str, Curves], out: Path, grids: dict[str, dict[str, Path]] | None = None) -> list[Path]:
    """Figures per noise kind, the markdown tables and, given {label: {grid name: png}}, the combined
    grids of every name all of them have, in `out`; returns the files written."""
    make_folder(out, "the report folder", "give another --out")
    written = []
    if grids and len(grids) == len(runs):
        for name in sorted(set.intersection(*(set(g) for g in grids.values()))):
            file = out / f"{name}.png"
            combine_grids({label: g[name] for label, g in grids.items()}, file)
            written.append(file)
    for kind in sorted({r["kind"] for c in runs.values() for r in error_rows(c.rows)}):
        file = out / f"robustness_{kind}.png"
        plot_kind(runs, kind, file)
        written.append(file)
        if any(r["kind"] == kind and r.get("metric") == "fid" for c in runs.values() for r in c.rows):
            file = out / f"fid_{kind}.png"
            plot_kind(runs, kind, file, metric="fid")
            written.append(file)
    table = out / "robustness.md"
    table.write_text(markdown_table(runs))
    return [*written, table]


def report(run_dirs: list[Path], out: Path = Path("reports/latest"), group_by: str = "run") -> None:
    """Compare the robustness sweeps of several runs.

    Args:
        run_dirs: run folders (or test folders, or robustness.json files) to compare.
        out: where the figures and the tables are written.
        group_by: "run", "parent" or "model": which runs are pooled into one curve (module docstring).
    """
    out = Path(out)
    held = [p.name for p in (out / "robustness.json", out / "metrics.csv") if p.is_file()] + [
        p.name for p in out.glob("**/*.ckpt")
    ]
    if held:  # a report never writes over a run's or a test's results
        raise UserError(f"--out {out} holds a run's results ({held[0]}): give the report a folder of its own")
    groups: dict[str, list[Curves]] = {}
    grids: dict[str, dict[str, Path]] = {}
    for path, label in zip(run_dirs, labels_for(run_dirs), strict=True):
        curves = run_curves(path)
        key = group_key(path, curves.rows, label, group_by)
        groups.setdefault(key, []).append(curves)
        grids.setdefault(key, grids_of(find_results(path)))  # a group's grids: its first run's
    runs = {key: members[0] if len(members) == 1 else pool(members) for key, members in groups.items()}
    for file in write_report(runs, Path(out), grids):
        print(f"fae report: wrote {file}")


def main(args: list[str]) -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="fae report", description=__doc__.splitlines()[0], exit_on_error=False)
    parser.add_argument("run_dirs", nargs="+", help="run folders, test folders or robustness.json files")
    parser.add_argument("--out", default="reports/latest", help="where the figures and the tables go")
    parser.add_argument(
        "--group_by",
        default="run",
        choices=["run", "parent", "model"],
        help="pool runs into one curve: each run apart, the runs of one folder (seeds), or of one model class",
    )
    config = parser.parse_args(args)
    report([Path(p) for p in config.run_dirs], Path(config.out), config.group_by)
