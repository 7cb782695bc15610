"""`fae report RUN_DIR... [--out DIR]`: the paper's robustness figures from saved sweep results.

Reads robustness.json of each run (the file itself, a folder holding it, or a training run whose
newest `test-*` folder holds it), and writes to --out:
  robustness_gaussian.png   error vs sigma, one curve per run, a band of +- one standard deviation
  robustness_mask.png       error vs nu, likewise (supplement Figs 1 and 3)
  robustness.md             a markdown table of mean +- std per level and run
  reconstructions_<kind>_<level>.png   the runs' grids of reconstructions from corrupted images (true
                            images on odd rows, reconstructions on even rows; supplement Figs 2 and 4),
                            side by side, for every level all runs have a grid of
No network and no W&B are needed.
"""

from __future__ import annotations

import json
from pathlib import Path

from fae.errors import UserError

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


def run_label(path: Path, rows: list[dict]) -> str:
    folder = path if path.is_dir() else path.parent
    return f"{rows[0]['model']} ({folder.name})"


def plot_kind(runs: dict[str, list[dict]], kind: str, file: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    metric = ""
    for label, rows in runs.items():
        rows = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["level"])
        if not rows:
            continue
        metric = rows[0].get("metric", "error")
        levels = [r["level"] for r in rows]
        means = [r["mean"] for r in rows]
        stds = [r["std"] for r in rows]
        ax.plot(levels, means, marker="o", ms=3, label=label)
        low = [m - s for m, s in zip(means, stds, strict=True)]
        high = [m + s for m, s in zip(means, stds, strict=True)]
        ax.fill_between(levels, low, high, alpha=0.2)
    ax.set_xlabel(KIND_LABELS.get(kind, kind))
    ax.set_ylabel(f"reconstruction {metric.upper()} vs clean image")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)


def markdown_table(runs: dict[str, list[dict]]) -> str:
    labels = list(runs)
    keys = sorted({(r["kind"], r["level"]) for rows in runs.values() for r in rows})
    lines = ["| noise | level | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for kind, level in keys:
        cells = []
        for label in labels:
            row = next((r for r in runs[label] if (r["kind"], r["level"]) == (kind, level)), None)
            cells.append(f"{row['mean']:.4f} ± {row['std']:.4f}" if row else "")
        lines.append(f"| {kind} | {level:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def combine_grids(grids: dict[str, Path], file: Path) -> None:
    """The runs' grid images side by side, titled by run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(grids), figsize=(3.2 * len(grids), 3.6), squeeze=False)
    for ax, (label, path) in zip(axes[0], grids.items(), strict=True):
        ax.imshow(plt.imread(path), cmap="gray")
        ax.set_title(label, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(file, dpi=150)
    plt.close(fig)


def write_report(runs: dict[str, list[dict]], out: Path, grids: dict[str, dict[str, Path]] | None = None) -> list[Path]:
    """Figures per noise kind, the markdown table and, given {run: {grid name: png}}, the combined
    grids of every name all runs have, in `out`; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if grids and len(grids) == len(runs):
        for name in sorted(set.intersection(*(set(g) for g in grids.values()))):
            file = out / f"{name}.png"
            combine_grids({label: g[name] for label, g in grids.items()}, file)
            written.append(file)
    for kind in sorted({r["kind"] for rows in runs.values() for r in rows}):
        file = out / f"robustness_{kind}.png"
        plot_kind(runs, kind, file)
        written.append(file)
    table = out / "robustness.md"
    table.write_text(markdown_table(runs))
    return [*written, table]


def report(run_dirs: list[Path], out: Path = Path("reports/latest")) -> None:
    """Compare the robustness sweeps of several runs.

    Args:
        run_dirs: run folders (or test folders, or robustness.json files) to compare.
        out: where the figures and the table are written.
    """
    runs, grids = {}, {}
    for path in map(Path, run_dirs):
        rows = load_results(path)
        label = run_label(path, rows)
        runs[label] = rows
        grids[label] = {p.stem: p for p in find_results(path).parent.glob("reconstructions_*.png")}
    for file in write_report(runs, Path(out), grids):
        print(f"fae report: wrote {file}")


def main(args: list[str]) -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="fae report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", help="run folders, test folders or robustness.json files")
    parser.add_argument("--out", default="reports/latest", help="where the figures and the table go")
    config = parser.parse_args(args)
    report([Path(p) for p in config.run_dirs], Path(config.out))
