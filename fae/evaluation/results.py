"""The results of `fae test` as rows: the one schema, its files, and the numbers drawn from them.

A `Row` is one (kind, level, metric) of a sweep: the mean, spread and count of the reconstruction
error at one corruption level (metric "bce" or "mse"), or one sample-quality score (metric "fid",
"kid", "precision" or "recall"; kind "clean", "samples", "fitted_samples", "gmm_samples", or a
corruption level). The sweep makes them, the
report and the experiment runner read them, the publisher writes them:

  - `write_rows(rows, folder)`: robustness.json (a list of rows) and robustness.csv (the same rows),
    each written beside its destination and renamed over it, so that neither is ever half written;
  - `read_rows(path)`: the rows of a robustness.json (the file, a folder holding it, or a training run
    whose newest test-* folder holds it), checked field by field;
  - `area_under_curve(rows, kind, up_to)`: the trapezoidal area under error(level) divided by the level
    range, i.e. the mean error over the swept range (or over its levels up to `up_to`: the summaries
    give both the full range and the low-noise one, levels <= LOW_NOISE, where models beat the mean
    image and the full range's weight on high noise does not reward blur);
  - `QUALITY_COLUMNS`: the summary columns of the quality rows.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from fae.errors import UserError
from fae.files import write_text

# rows of sample quality (fae.evaluation.quality); the others are errors
QUALITY_METRICS = ("fid", "kid", "precision", "recall")
GENERATED = {"samples": "sample", "fitted_samples": "fitted-sample", "gmm_samples": "GMM-sample"}  # kind: label
GENERATED_KINDS = tuple(GENERATED)  # quality rows of generated images: the prior's, the fits of the codes'
SAMPLE_KINDS = ("clean", *GENERATED_KINDS)  # the quality rows that are not at a corruption level
QUALITY_COLUMNS = {  # the summary table's column of each quality row (kind, metric)
    ("clean", "fid"): "recon FID",
    **{
        (kind, metric): f"{label} {name}"
        for kind, label in GENERATED.items()
        for metric, name in (("fid", "FID"), ("kid", "KID"), ("precision", "precision"), ("recall", "recall"))
    },
}


RESULTS_NAME = "robustness.json"


@dataclass(frozen=True, kw_only=True)
class Row:
    """One row of robustness.json and robustness.csv."""

    model: str  # the family's class name
    dataset: str = ""  # the data module's class name
    checkpoint: str = ""  # the checkpoint tested
    kind: str  # a corruption kind (gaussian, mask, ...), or a quality row's SAMPLE_KINDS
    level: float  # the corruption level (0 for the quality rows of SAMPLE_KINDS)
    metric: str = "error"  # bce, mse (errors against the clean image), fid, kid, precision, recall
    mean: float
    std: float  # over the test images (an error), over KID's subsets, or across runs once pooled
    n: int  # test images, or runs once pooled
    # what else makes two sweeps comparable (fae report checks them); a file of an older fae lacks them
    split: str = ""  # the data split swept ("test")
    noise_seed: int = -1  # the corruptions' seed (--sweep.seed); -1: not recorded
    features: str = ""  # quality rows: the feature network file's SHA-256 (its first 16 hex digits)
    network: str = ""  # quality rows: which network that is (fae.evaluation.features: Frozen.name)
    components: int = -1  # gmm_samples rows: K, the Gaussians of the mixture fitted to the codes
    neighborhood: int = -1  # precision and recall rows: k, the nearest neighbour whose distance is a radius

    @property
    def is_quality(self) -> bool:
        return self.metric in QUALITY_METRICS


FIELDS = {f.name: f for f in dataclasses.fields(Row)}
TYPES = {"str": (str,), "float": (int, float), "int": (int,)}


REFERENCE_KIND = "mean_image"  # the row of the error of the training set's mean image, the same at every level
REFERENCE_COLUMN = "mean-image error"


def error_rows(rows: list[Row]) -> list[Row]:
    """The reconstruction-error rows of a sweep (its FID/KID rows and its reference row left out)."""
    return [r for r in rows if not r.is_quality and r.kind != REFERENCE_KIND]


def reference_error(rows: list[Row]) -> float | None:
    """The error of predicting the training set's mean image for every test image (None when not recorded):
    a model above it at some level does worse there than ignoring its input."""
    return next((r.mean for r in rows if r.kind == REFERENCE_KIND), None)


LOW_NOISE = 0.5  # the low-noise AUC: sigma and nu up to this, where models beat the mean image


def area_under_curve(rows: list[Row], kind: str, up_to: float = math.inf) -> float:
    """Trapezoidal area under error(level) of one corruption kind (its levels up to `up_to`), divided by
    the level range: the mean error over the range, comparable between runs swept on the same levels."""
    points = sorted((r.level, r.mean) for r in error_rows(rows) if r.kind == kind and r.level <= up_to)
    if len(points) < 2:
        return math.nan
    area = sum((b[0] - a[0]) * (a[1] + b[1]) / 2 for a, b in zip(points[:-1], points[1:], strict=True))
    return area / (points[-1][0] - points[0][0])


def write_rows(rows: list[Row], folder: Path) -> list[Path]:
    """robustness.json and robustness.csv in `folder`; returns them."""
    folder.mkdir(parents=True, exist_ok=True)
    records = [dataclasses.asdict(r) for r in rows]
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(FIELDS))
    writer.writeheader()
    writer.writerows(records)
    files = [folder / RESULTS_NAME, folder / "robustness.csv"]
    write_text(files[0], json.dumps(records, indent=1))
    write_text(files[1], table.getvalue())
    return files


def find_results(path: Path) -> Path:
    """The robustness.json a user means by `path`: the file, a folder holding it, or a run whose newest
    test-* folder holds it."""
    if path.is_file():
        return path
    if (path / RESULTS_NAME).is_file():
        return path / RESULTS_NAME
    tests = sorted(path.glob(f"test-*/{RESULTS_NAME}"))
    if tests:
        return tests[-1]
    raise UserError(f"no robustness.json in {path} or its test-* folders: run `fae test --ckpt_path ...` first")


def read_rows(path: Path) -> list[Row]:
    """The rows of the robustness.json `path` means (`find_results`), checked field by field."""
    file = find_results(path)
    try:
        records = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{file} is not valid JSON ({err}): re-run `fae test` to write it again") from err
    if not isinstance(records, list) or not records:
        raise UserError(f"{file} should hold a non-empty list of result rows: re-run `fae test` to write it again")
    return [row_of(record, file, i) for i, record in enumerate(records)]


def row_of(record: object, file: Path, i: int) -> Row:
    """A Row from one JSON record; fields with a default may be missing (files of older versions)."""
    values = {}
    for name, spec in FIELDS.items():
        value = record.get(name) if isinstance(record, dict) else None
        required = spec.default is dataclasses.MISSING
        if value is None and not required:
            continue
        if not isinstance(value, TYPES[spec.type]) or isinstance(value, bool):
            raise UserError(
                f"{file} is malformed: row {i} has no valid {name!r} field; re-run `fae test` to write it again"
            )
        values[name] = value
    return Row(**values)


@dataclass
class Curves:
    """The results of one run, or of a group of runs pooled: its rows (per kind, level and metric) and
    its summary {column: one value per run}."""

    rows: list[Row]
    summary: dict[str, list[float]] = field(default_factory=dict)
    runs: int = 1


def summary_of(rows: list[Row], clean: dict[str, float] | None = None) -> dict[str, list[float]]:
    """A run's summary: its clean test metrics (given), the AUC of each corruption kind, and its quality
    scores, each as a list of one value."""
    summary = dict(clean or {})
    for kind in sorted({r.kind for r in error_rows(rows)}):
        summary[f"{kind} AUC"] = area_under_curve(rows, kind)
        summary[f"{kind} AUC ≤{LOW_NOISE:g}"] = area_under_curve(rows, kind, up_to=LOW_NOISE)
    if (reference := reference_error(rows)) is not None:
        summary[REFERENCE_COLUMN] = reference
    for r in rows:
        if (r.kind, r.metric) in QUALITY_COLUMNS:
            summary[QUALITY_COLUMNS[(r.kind, r.metric)]] = r.mean
    return {column: [value] for column, value in summary.items()}
