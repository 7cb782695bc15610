"""Train named variants at one batch budget, sweep each with `fae test`, and compare them in one table
and one `fae report`.

    python scripts/experiment.py experiments/mnist_ablation.yaml [--out DIR] [--jobs 2] [--data_dir DIR]

An experiment file (experiments/*.yaml) names the variants, each a config plus flags (and, optionally,
its own seeds), the seeds, and the budget in batches, the same for every variant (for every family a
step is a batch). For every
(variant, seed) this runs, as a new user would,

    fae fit  --config C FLAGS --seed_everything S --experiment E --variant VARIANT --trainer.max_steps BUDGET \
             --run_dir OUT/VARIANT/seedS
    fae test --config C FLAGS --seed_everything S --experiment E --variant VARIANT \
             --ckpt_path OUT/VARIANT/seedS/checkpoints/last.ckpt

(E, the experiment's name, is the file's stem: W&B groups its runs by it, names each `VARIANT/seedS` and
tags it with its variant.)

`--jobs` at a time, each process on one thread (OMP_NUM_THREADS=1: on a 2-core machine two one-thread
runs finish several times sooner than two two-thread ones). The output of each is in
OUT/VARIANT/seedS.log. Then it writes OUT/table.md (and table.csv): per variant, the mean and the
standard deviation across seeds of the validation error during training, the clean test error and
diagnostics, and the error at chosen noise levels; and `fae report OUT/*/seed* --group_by parent`
in OUT/report. `--publish DIR` copies the tables and the report's figures and tables to DIR (small
files, for docs/results/).

A run that has finished its test is kept and reused, so an interrupted experiment continues where it
stopped, and several processes of one experiment share its runs (each takes a run by its lock file,
OUT/VARIANT/seedS.lock, and leaves those taken by another out of its own table). A run folder left
unfinished is never written into: it is left out of the table, named, until it is removed. The script
exits non-zero when a run is left out or failed.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import yaml

from fae.evaluation.results import QUALITY_COLUMNS, error_rows, read_rows

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Job:
    variant: str
    seed: int
    config: str
    flags: list[str]
    run_dir: Path

    @property
    def log(self) -> Path:
        return self.run_dir.parent / f"{self.run_dir.name}.log"

    @property
    def lock(self) -> Path:
        return self.run_dir.parent / f"{self.run_dir.name}.lock"

    @property
    def timing(self) -> Path:
        return self.run_dir.parent / f"{self.run_dir.name}.json"


def flag_list(flags: dict | None) -> list[str]:
    """{"--key": value} -> ["--key", "value"], values as YAML would read them back."""
    out = []
    for key, value in (flags or {}).items():
        text = value if isinstance(value, str) else json.dumps(value)
        out += [key, text]
    return out


def plan(spec: dict, out: Path, data_dir: str | None, name: str) -> list[Job]:
    common = flag_list(spec.get("flags"))
    if data_dir:
        common += ["--data.data_dir", data_dir]
    jobs = []
    for variant, entry in spec["variants"].items():
        for seed in entry.get("seeds", spec.get("seeds", [0])):
            flags = [*common, *flag_list(entry.get("flags")), "--seed_everything", str(seed)]
            flags += ["--experiment", name, "--variant", variant]
            jobs.append(Job(variant, seed, entry["config"], flags, out / variant / f"seed{seed}"))
    return jobs


def finished(job: Job) -> bool:
    return any(job.run_dir.glob("test-*/robustness.json"))


def fae(args: list[str], log, env: dict) -> int:
    log.write(f"$ fae {' '.join(args)}\n")
    log.flush()
    return subprocess.run(
        [sys.executable, "-m", "fae.cli", *args], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT
    ).returncode


def run(job: Job, spec: dict) -> str:
    """Fit then test one (variant, seed), unless it is done or taken; returns a one-line status."""
    if finished(job):
        return f"{job.variant} seed {job.seed}: done earlier, reused ({job.run_dir})"
    job.run_dir.parent.mkdir(parents=True, exist_ok=True)
    try:  # the run belongs to this process while its lock file exists
        lock = os.open(job.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return f"{job.variant} seed {job.seed}: LEFT OUT, another experiment process is running it ({job.lock})"
    try:
        if job.run_dir.exists():
            return (
                f"{job.variant} seed {job.seed}: LEFT OUT, {job.run_dir} exists but has no finished test (an "
                "interrupted run?): remove it to train it again (runs are never overwritten)"
            )
        return fit_and_test(job, spec)
    finally:
        os.close(lock)
        job.lock.unlink()


def fit_and_test(job: Job, spec: dict) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("FAE_RUN_DIR", None)
    budget = spec["budget"]
    quiet = ["--trainer.enable_progress_bar", "false"]
    fit = ["fit", "--config", job.config, *job.flags, *quiet, "--run_dir", str(job.run_dir),
           "--trainer.max_steps", str(budget["batches"]), "--trainer.max_epochs", "-1",
           "--trainer.check_val_every_n_epoch", "null",
           "--trainer.val_check_interval", str(budget["val_every"])]  # fmt: skip
    test = ["test", "--config", job.config, *job.flags, *quiet,
            "--ckpt_path", str(job.run_dir / "checkpoints" / "last.ckpt")]  # fmt: skip
    with open(job.log, "a") as log:
        start = time.time()
        if fae(fit, log, env) != 0:
            return f"{job.variant} seed {job.seed}: fit FAILED, see {job.log}"
        fit_seconds = time.time() - start
        if fae(test, log, env) != 0:
            return f"{job.variant} seed {job.seed}: test FAILED, see {job.log}"
    test_seconds = time.time() - start - fit_seconds
    job.timing.write_text(json.dumps({"fit_seconds": fit_seconds, "test_seconds": test_seconds}))
    return f"{job.variant} seed {job.seed}: fit {fit_seconds / 60:.1f} min, test {test_seconds / 60:.1f} min"


# --- the table ---------------------------------------------------------------------------------


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


def summarise_run(job: Job, spec: dict) -> dict[str, float]:
    test_dir = sorted(job.run_dir.glob("test-*/robustness.json"))[-1].parent
    rows = read_rows(test_dir)
    errors = error_rows(rows)
    metric = errors[0].metric
    test = last_values(read_csv(test_dir / "metrics.csv"))
    train = read_csv(job.run_dir / "metrics.csv")
    out = {}
    for step, value in zip(
        spec["table"]["val_at"], at_steps(train, f"val/recon_{metric}", spec["table"]["val_at"]), strict=True
    ):
        out[f"val {metric} @{step}"] = value
    for name in ("recon_" + metric, "recon_mse", "posterior_fisher", "active_units", "encoder_sigma", "decoder_scale"):
        out[f"test {name}"] = test.get(f"test/{name}", math.nan)
    for kind, levels in spec["table"]["levels"].items():
        for level in levels:
            row = next((r for r in errors if r.kind == kind and math.isclose(r.level, level)), None)
            out[f"{kind} {level:g}"] = row.mean if row else math.nan
    for (kind, name), column in QUALITY_COLUMNS.items():  # FID/KID when `fae test` had a feature network
        row = next((r for r in rows if (r.kind, r.metric) == (kind, name)), None)
        out[column] = row.mean if row else math.nan
    timing = json.loads(job.timing.read_text()) if job.timing.is_file() else {}
    out["fit min"] = timing.get("fit_seconds", math.nan) / 60
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


def write_table(jobs: list[Job], spec: dict, out: Path) -> Path:
    per_variant: dict[str, list[dict[str, float]]] = {}
    for job in jobs:
        if finished(job):
            per_variant.setdefault(job.variant, []).append(summarise_run(job, spec))
    columns = list(next(iter(per_variant.values()))[0])
    lines = [
        f"Budget: {spec['budget']['batches']} batches per run; mean ± standard deviation across seeds "
        "(one value: one seed).",
        "",
        "| variant | seeds | " + " | ".join(columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    with open(out / "table.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["variant", "seed_count", *[f"{c} {s}" for c in columns for s in ("mean", "std")]])
        for variant, runs in per_variant.items():
            cells = [cell([r[c] for r in runs], c) for c in columns]
            lines.append(f"| {variant} | {len(runs)} | " + " | ".join(cells) + " |")
            writer.writerow([variant, len(runs), *[v for c in columns for v in mean_std([r[c] for r in runs])[:2]]])
    table = out / "table.md"
    table.write_text("\n".join(lines) + "\n")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", type=Path, help="an experiment file, e.g. experiments/mnist_ablation.yaml")
    parser.add_argument("--out", type=Path, help="where the runs, the table and the report go (default runs/<spec>)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    parser.add_argument("--publish", type=Path, help="copy the tables and the report's figures here")
    parser.add_argument("--data_dir", help="passed to every run as --data.data_dir (default: the configs')")
    args = parser.parse_args()
    spec = yaml.safe_load(args.spec.read_text())
    out = (args.out or Path("runs") / args.spec.stem).resolve()
    data_dir = str(Path(args.data_dir).resolve()) if args.data_dir else None  # the runs start in ROOT
    jobs = plan(spec, out, data_dir, args.spec.stem)
    print(f"experiment: {len(jobs)} runs of {spec['budget']['batches']} batches into {out}", flush=True)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for status in pool.map(lambda job: run(job, spec), jobs):
            print(f"experiment: {status}", flush=True)
    runs = [str(job.run_dir) for job in jobs if finished(job)]
    if not runs:
        raise SystemExit("experiment: no run has finished, so there is no table")
    table = write_table(jobs, spec, out)
    print(f"experiment: wrote {table}")
    subprocess.run([sys.executable, "-m", "fae.cli", "report", *runs, "--group_by", "parent",
                    "--out", str(out / "report")], check=True, cwd=ROOT)  # fmt: skip
    if args.publish:
        args.publish.mkdir(parents=True, exist_ok=True)
        for file in [out / "table.md", out / "table.csv", *sorted((out / "report").iterdir())]:
            shutil.copy2(file, args.publish / file.name)
        print(f"experiment: copied the tables and figures to {args.publish}")
    missing = [f"{job.variant} seed {job.seed}" for job in jobs if not finished(job)]
    if missing:
        raise SystemExit(f"experiment: {len(missing)} of {len(jobs)} runs are not in the table: {', '.join(missing)}")


if __name__ == "__main__":
    main()
