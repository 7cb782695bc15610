"""An experiment's results: its table (per variant, the mean and the standard deviation across seeds of
the validation error during training, the clean test error and diagnostics, the error at chosen noise
levels, the sample quality and the training time: OUT/table.md and OUT/table.csv), its `fae report
--group_by parent` (OUT/report) and, when asked, their copies for docs/results (`--publish`)."""

from __future__ import annotations

import csv
import io
import math
import statistics
from pathlib import Path

from fae.errors import make_folder
from fae.evaluation.results import QUALITY_COLUMNS, error_rows, read_rows
from fae.experiment.spec import Experiment, Run
from fae.experiment.state import finished, read_status
from fae.files import write_text, written


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def last_values(rows: list[dict[str, str]]) -> dict[str, float]:
    """The last non-empty value of every column."""
    values = {}
    for row in rows:
        values.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return values


def at_steps(rows: list[dict[str, str]], key: str, steps: list[int]) -> list[float]:
    """`key` logged at the validation nearest each of `steps` (NaN where none was logged)."""
    logged = [(int(float(r["step"])), float(r[key])) for r in rows if r.get(key)]
    if not logged:
        return [math.nan] * len(steps)
    return [min(logged, key=lambda pair: abs(pair[0] - step))[1] for step in steps]


def summarise_run(run: Run, experiment: Experiment) -> dict[str, float]:
    test_dir = sorted(run.run_dir.glob("test-*/robustness.json"))[-1].parent
    rows = read_rows(test_dir)
    errors = error_rows(rows)
    metric = errors[0].metric
    test = last_values(read_csv(test_dir / "metrics.csv"))
    train = read_csv(run.run_dir / "metrics.csv")
    val_at = experiment.table["val_at"]
    out = {}
    for step, value in zip(val_at, at_steps(train, f"val/recon_{metric}", val_at), strict=True):
        out[f"val {metric} @{step}"] = value
    for name in ("recon_" + metric, "recon_mse", "posterior_fisher", "active_units", "encoder_sigma", "decoder_scale"):
        out[f"test {name}"] = test.get(f"test/{name}", math.nan)
    for kind, levels in experiment.table["levels"].items():
        for level in levels:
            row = next((r for r in errors if r.kind == kind and math.isclose(r.level, level)), None)
            out[f"{kind} {level:g}"] = row.mean if row else math.nan
    for (kind, name), column in QUALITY_COLUMNS.items():  # the quality scores when `fae test` had a feature network
        row = next((r for r in rows if (r.kind, r.metric) == (kind, name)), None)
        out[column] = row.mean if row else math.nan
    out["fit min"] = read_status(run).get("fit_seconds", math.nan) / 60
    return out


def mean_std(values: list[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (0 for one value) and count of the values that are not NaN."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan, 0
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def cell(values: list[float], column: str) -> str:
    mean, std, n = mean_std(values)
    if n == 0:
        return "–"
    digits = 1 if column.endswith(("min", "active_units")) or abs(mean) >= 10 else 4
    return f"{mean:.{digits}f}" if n == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def write_table(runs: list[Run], experiment: Experiment, out: Path) -> Path:
    """OUT/table.md and OUT/table.csv from the finished runs among `runs`; the path of table.md."""
    per_variant: dict[str, list[dict[str, float]]] = {}
    for run in runs:
        if finished(run):
            per_variant.setdefault(run.variant, []).append(summarise_run(run, experiment))
    every = [row for summaries in per_variant.values() for row in summaries]
    columns = [c for c in every[0] if any(not math.isnan(row[c]) for row in every)]  # what no run has, left out
    done = sum(len(summaries) for summaries in per_variant.values())
    lines = [
        f"Budget: {experiment.batches} batches per run; mean ± standard deviation across seeds (one value: one seed)."
    ]
    if done < len(runs):
        lines.append(f"Interim: {done} of the {len(runs)} runs are done; the others are not in this table.")
    lines += ["", "| variant | seeds | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    table_csv = io.StringIO()  # written whole, as every result file (fae.files)
    writer = csv.writer(table_csv)
    writer.writerow(["variant", "seed_count", *[f"{c} {s}" for c in columns for s in ("mean", "std")]])
    for variant, summaries in per_variant.items():
        cells = [cell([r[c] for r in summaries], c) for c in columns]
        lines.append(f"| {variant} | {len(summaries)} | " + " | ".join(cells) + " |")
        spreads = [v for c in columns for v in mean_std([r[c] for r in summaries])[:2]]
        writer.writerow([variant, len(summaries), *spreads])
    write_text(out / "table.csv", table_csv.getvalue())
    table = out / "table.md"
    write_text(table, "\n".join(lines) + "\n")
    return table


def copy_published(out: Path, publish: Path) -> None:
    """The tables and the report's files into `publish` (docs/results/...), each whole, and the report files
    an earlier copy left there that this report does not have removed (the folder's other files stay)."""
    from fae.evaluation.report import is_report_file

    make_folder(publish, "the --publish folder", "give another --publish")
    files = [out / "table.md", out / "table.csv", *sorted(p for p in (out / "report").iterdir() if p.name[0] != ".")]
    for file in files:
        with written(publish / file.name) as copy:
            copy.write(file.read_bytes())
    names = {file.name for file in files}
    for stale in publish.iterdir():
        if stale.is_file() and is_report_file(stale.name) and stale.name not in names:
            stale.unlink()


def report_results(runs: list[Run], out: Path, publish: Path | None) -> None:
    """`fae report --group_by parent` of the finished runs into OUT/report; with `publish`, the tables
    (written before) and the report copied there, saying how many runs they hold."""
    from fae.evaluation.report import report

    done = [run for run in runs if finished(run)]
    report([run.run_dir for run in done], out=out / "report", group_by="parent")
    if publish is not None:
        copy_published(out, publish)
        whole = "every run" if len(done) == len(runs) else f"{len(done)} of the {len(runs)} runs (the others not done)"
        print(f"experiment: copied the tables and figures of {whole} to {publish}", flush=True)


def finish(plan: Experiment, runs: list[Run], out: Path, publish: Path | None) -> None:
    """The table and the report of the finished runs; copies of both in `publish`; a non-zero exit naming
    the runs that are not in them."""
    if not any(finished(run) for run in runs):
        raise SystemExit("fae experiment: no run has finished, so there is no table")
    print(f"experiment: wrote {write_table(runs, plan, out)}", flush=True)
    report_results(runs, out, Path(publish) if publish is not None else None)
    missing = [run.key for run in runs if not finished(run)]
    if missing:
        raise SystemExit(
            f"fae experiment: {len(missing)} of {len(runs)} runs are not in the table: {', '.join(missing)} "
            f"(`--status` says why)"
        )
