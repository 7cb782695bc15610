"""`fae report RUN_DIR... [--out DIR] [--group_by run|parent|model]`: the paper's robustness figures and
tables from saved sweep results.

Reads the rows of each run (fae.evaluation.results: the file itself, a folder holding it, or a
training run whose newest `test-*` folder holds it), and the clean test metrics beside them (that
folder's metrics.csv), and writes to --out:
  robustness_gaussian.png   error vs sigma, one curve per run or group, with a band of +- one standard
                            deviation
  robustness_mask.png       error vs nu, likewise (supplement Figs 1 and 3); one figure per corruption kind
  fid_<kind>.png            the FID of reconstructions against the level, where FIDs were scored
  robustness.md             a summary table (clean error, posterior Fisher divergence, active units,
                            the area under each error curve divided by its level range, the quality
                            scores), then a table of the error per level and one of the FID per level
                            (the text: fae.evaluation.tables)
  reconstructions_<kind>_<level>.png   the runs' grids of reconstructions from corrupted images (true
                            images on odd rows, reconstructions on even rows; supplement Figs 2 and 4),
                            side by side, for every level all runs have a grid of
  reconstructions_clean.png the same for the clean test images (the test's images/ grid)
  tradeoff_<column>.png     each AUC (full range, up to 0.5) and the sample FID against the clean test
                            error, a point per run or group with its 95% intervals: robustness compared
                            at matched clean error (with 2 runs or more)

--group_by pools runs: "run" (default) keeps each run apart, its band and +- the standard deviation
over test images; "parent" pools the runs of one folder (OUT/<variant>/seed0, seed1, ...: the seeds
of one setting) and "model" the runs of one model class. A pooled curve is the mean over its runs of
each run's mean error, and its band and +- are the 95% confidence interval of that mean ACROSS RUNS
(Student t, fae.evaluation.stats); so are the summary columns', and each group of 2 runs or more is
tested against a baseline group (`--baseline`, the VAE's by default) by Welch's t-test per column, the
p-values Holm-corrected within two families: the primary columns (`--primary`; by default the clean error
and the AUCs, the question a robustness comparison asks) and the others (diagnostics, sample quality).
Every AUC comes twice: over a kind's full range, and over its levels up to 0.5 (where models beat the
training set's mean image; the full range rewards blur).
No network and no W&B are needed.

A report is written whole or not at all: it is built in a hidden folder beside --out and swapped into
place in one step (fae.files.replace_folder), so a stop, a crash or a full disk leaves the earlier
report in --out as it was, and a used --out holds only the new report's files afterwards. --out must be
new, empty, or a report (its files only: a folder holding anything else is refused, never emptied).
"""

from __future__ import annotations

import csv
import dataclasses
import fnmatch
import os
import shutil
import statistics
from pathlib import Path
from typing import Literal

from fae.errors import UserError, make_folder
from fae.evaluation.compare import check_alike, common_levels
from fae.evaluation.figures import combine_grids, plot_results, plot_tradeoffs
from fae.evaluation.results import (
    REFERENCE_COLUMN,
    Curves,
    Row,
    error_rows,
    find_results,
    read_rows,
    summary_of,
)
from fae.evaluation.tables import markdown_table
from fae.files import is_write_error, replace_folder, write_failed, write_text

SUMMARY_METRICS = ("posterior_fisher", "active_units", "active_units_rel")  # test/<name>, beside the clean error
REPORT_FILES = (
    "robustness.md",
    "robustness_*.png",
    "fid_*.png",
    "reconstructions_*.png",
    "tradeoff_*.png",
)  # what a report writes
REPORT_MARK = ".fae-report"  # in every report folder: the next report may replace it


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


def read_run(path: Path) -> tuple[list[Row], dict[str, float]]:
    """A run's rows and its clean test metrics, read from its files."""
    file = find_results(path)
    rows = read_rows(file)
    errors = error_rows(rows)
    return rows, clean_metrics(file, errors[0].metric) if errors else {}


def run_curves(rows: list[Row], clean: dict[str, float], levels: set[tuple[str, float]] | None = None) -> Curves:
    """A run's curves; its summary (the AUC columns) over `levels` only, when given."""
    scored = rows if levels is None else [r for r in rows if r.is_quality or (r.kind, r.level) in levels]
    return Curves(rows, summary_of(scored, clean))


def pool(runs: list[Curves]) -> Curves:
    """Runs of one setting as one curve: per level the mean and standard deviation across runs of
    their mean errors; the summary keeps every run's value."""
    key = lambda r: (r.kind, r.level, r.metric)  # noqa: E731
    rows = []
    for level in sorted({key(r) for c in runs for r in c.rows}):
        means = [r.mean for c in runs for r in c.rows if key(r) == level]
        if len(means) != len(runs):
            continue  # a level not every run was swept at
        template = next(r for r in runs[0].rows if key(r) == level)
        std = statistics.stdev(means) if len(means) > 1 else 0.0
        rows.append(dataclasses.replace(template, mean=statistics.mean(means), std=std, n=len(means)))
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


def group_key(path: Path, rows: list[Row], label: str, group_by: str) -> str:
    folder = (path if path.is_dir() else path.parent).resolve()
    if folder.name.startswith("test-") and not (folder / "checkpoints").is_dir():
        folder = folder.parent  # a test folder belongs to its training run
    if group_by == "run":
        return f"{rows[0].model} ({label})"
    if group_by == "parent":
        return folder.parent.name
    if group_by == "model":
        return rows[0].model
    raise UserError(f"--group_by must be 'run', 'parent' or 'model', got {group_by!r}")


def baseline_group(groups: list[str], baseline: str | None) -> str | None:
    """The group the others are tested against: --baseline, else the VAE's when there is one."""
    if baseline is not None:
        if baseline not in groups:
            raise UserError(f"--baseline {baseline} is not a group of this report: give one of {', '.join(groups)}")
        return baseline
    return next((g for g in groups if g.lower().startswith("vae")), None)


def grids_of(results_file: Path) -> dict[str, Path]:
    """A test's reconstruction grids by name: the sweep's (reconstructions_<kind>_<level>) and the
    clean test images' (reconstructions_clean, from images/test_reconstructions_*.png)."""
    folder = results_file.parent
    grids = {p.stem: p for p in folder.glob("reconstructions_*.png")}
    clean = sorted(folder.glob("images/test_reconstructions_*.png"))
    if clean:
        grids["reconstructions_clean"] = clean[-1]
    return grids


def write_report(
    runs: dict[str, Curves],
    out: Path,
    grids: dict[str, dict[str, Path]] | None = None,
    notes: list[str] = (),
    baseline: str | None = None,
    primary: list[str] | None = None,
) -> list[Path]:
    """Figures per corruption kind, the markdown tables and, given {label: {grid name: png}}, the
    combined grids of every name all of them have, in `out`, each file whole or not at all; returns
    the files written."""
    make_folder(out, "the report folder", "give another --out")
    written = []
    if grids and len(grids) == len(runs):
        for name in sorted(set.intersection(*(set(g) for g in grids.values()))):
            combine_grids({label: g[name] for label, g in grids.items()}, out / f"{name}.png")
            written.append(out / f"{name}.png")
    written += plot_results(runs, out)
    if len(runs) > 1:  # a comparison: one point per run or group
        written += plot_tradeoffs(runs, out)
    return [*written, write_text(out / "robustness.md", markdown_table(runs, notes, baseline, primary))]


def check_primary(primary: list[str] | None, runs: dict[str, Curves]) -> None:
    """Every --primary name is a tested summary column of these runs (one line naming them otherwise); the
    mean image's error is a reference, the same for every run, and is not tested."""
    columns = [k for k in dict.fromkeys(k for c in runs.values() for k in c.summary) if k != REFERENCE_COLUMN]
    unknown = [name for name in primary or () if name not in columns]
    if unknown:
        raise UserError(
            f"--primary {unknown[0]!r} is not a tested column of this report: give some of {', '.join(columns)}"
        )


def is_report_file(name: str) -> bool:
    """Whether a file of that name is one a report writes (a folder of only these is a report)."""
    return name == REPORT_MARK or any(fnmatch.fnmatch(name, pattern) for pattern in REPORT_FILES)


def check_out(out: Path) -> None:
    """--out must be a new folder, an empty one, or an earlier report, which the new one replaces whole."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: give the report a folder")
    held = [p.name for p in (out / "robustness.json", out / "metrics.csv") if p.is_file()] + [
        p.name for p in out.glob("**/*.ckpt")
    ]
    if held:  # a report never writes over a run's or a test's results
        raise UserError(f"--out {out} holds a run's results ({held[0]}): give the report a folder of its own")
    entries = list(out.iterdir()) if out.is_dir() else []
    other = sorted(p.name for p in entries if not (p.is_file() and is_report_file(p.name)))
    if other:
        raise UserError(
            f"--out {out} holds {other[0]}, which is not a file of a report: give a new or empty folder (a report "
            "replaces its folder's files with its own)"
        )


def report(
    run_dirs: list[Path],
    out: Path = Path("reports/latest"),
    group_by: Literal["run", "parent", "model"] = "run",
    baseline: str | None = None,
    primary: list[str] | None = None,
) -> None:
    """Compare the robustness sweeps of runs: figures and tables of their errors and sample quality.

    Args:
        run_dirs: run folders, test folders or robustness.json files.
        out: where the figures and the tables are written.
        group_by: pool runs into one curve: each run apart, the runs of one folder (seeds), or of one
            model class.
        baseline: the group every other group of 2 runs or more is tested against (Welch's t-test per
            summary column); default: the VAE's group when there is one.
        primary: the summary columns whose tests form the primary family, Holm-corrected apart from the
            others' (default: the clean error and every AUC), e.g. --primary '["clean bce", "mask AUC ≤0.5"]'.
    """
    out = Path(out)
    check_out(out)
    run_dirs = [Path(p) for p in run_dirs]
    read = {label: (path, *read_run(path)) for path, label in zip(run_dirs, labels_for(run_dirs), strict=True)}
    rows_of = {label: rows for label, (_, rows, _) in read.items()}
    notes = check_alike(rows_of)  # unlike sweeps: one line, nothing written
    levels, level_notes = common_levels(rows_of)
    notes += level_notes
    groups: dict[str, list[Curves]] = {}
    grids: dict[str, dict[str, Path]] = {}
    for label, (path, rows, clean) in read.items():
        key = group_key(path, rows, label, group_by)
        groups.setdefault(key, []).append(run_curves(rows, clean, levels if level_notes else None))
        grids.setdefault(key, grids_of(find_results(path)))  # a group's grids: its first run's
    pooled = any(len(members) > 1 for members in groups.values())  # then a lone run is a group of one
    runs = {key: pool(members) if pooled else members[0] for key, members in groups.items()}
    chosen = baseline_group(list(runs), baseline)
    check_primary(primary, runs)
    if pooled and chosen is None:
        notes.append("no baseline group (a VAE's, or --baseline): no tests between groups")
    for note in notes:
        print(f"fae report: note: {note}")
    make_folder(out.parent, "the report's parent folder", "give another --out")
    build = out.with_name(f".{out.name}.partial-{os.getpid()}")  # beside --out: the same filesystem
    try:
        files = write_report(runs, build, grids, notes, chosen, primary)
        write_text(build / REPORT_MARK, "a report of `fae report`: the next report into this folder replaces it\n")
        replace_folder(build, out)
    except OSError as err:
        if not is_write_error(err):
            raise
        raise write_failed(out, err) from None
    finally:
        shutil.rmtree(build, ignore_errors=True)  # a stop or a failure leaves the earlier report as it was
    for file in files:
        print(f"fae report: wrote {out / file.name}")
