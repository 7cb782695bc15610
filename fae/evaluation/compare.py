"""Whether the sweeps of several runs may be compared, and over which levels.

Two sweeps measure the same thing only if they corrupted the same images the same way and scored them
the same way: the data set, its split and the number of images tested, the error metric, the noise
seed (--sweep.seed) and, for the quality scores, the feature network (its file's hash), the mixture's K
(gmm_samples) and the k of precision and recall. `check_alike` refuses, in
one line naming two runs and the difference, runs that differ in any of these; a robustness.json of an
older fae that does not record one is not checked on it, and a note says so. Runs swept at different
levels are compared over the levels every run has: `common_levels` returns them and the note that the
report prints and puts under its table; the report computes its summaries (the AUC columns) on those.
"""

from __future__ import annotations

from fae.errors import UserError
from fae.evaluation.results import Row, error_rows

FACTS = {  # Row field -> what it is, in a message; the empty string or -1: not recorded
    "dataset": "data set",
    "split": "split",
    "n": "number of test images",
    "metric": "error metric",
    "noise_seed": "noise seed (--sweep.seed)",
}

QUALITY_FACTS = {  # Row field -> (what it is, the flag that sets it), for the quality rows that record it
    "components": ("mixture for the GMM samples (K Gaussians)", "--sweep.gmm_components"),
    "neighborhood": ("k of precision and recall", "--sweep.prc_neighborhood"),
}


def facts_of(rows: list[Row]) -> dict[str, object]:
    """What fixes a run's sweep, from its error rows (written alike) and its FID/KID rows (the network)."""
    errors = error_rows(rows)
    facts: dict[str, object] = {name: getattr(errors[0], name) for name in FACTS} if errors else {}
    networks = {r.features for r in rows if r.is_quality}
    if networks:
        facts["features"] = networks.pop() if len(networks) == 1 else ""
    for name in QUALITY_FACTS:
        values = {getattr(r, name) for r in rows if r.is_quality and known(getattr(r, name))}
        if len(values) == 1:
            facts[name] = values.pop()
    return facts


def known(value: object) -> bool:
    return value not in ("", -1, None)


def check_alike(runs: dict[str, list[Row]]) -> list[str]:
    """Refuse runs whose sweeps differ (a UserError naming the first two and the difference); returns
    the notes on what could not be checked."""
    labels = list(runs)
    facts = {label: facts_of(rows) for label, rows in runs.items()}
    first = labels[0]
    for label in labels[1:]:
        for name, what in FACTS.items():
            a, b = facts[first].get(name), facts[label].get(name)
            if known(a) and known(b) and a != b:
                raise UserError(
                    f"{first} and {label} were not swept alike ({what}: {a} against {b}): their numbers measure "
                    "different things; compare runs tested with the same data, test images and --sweep.seed"
                )
        a, b = facts[first].get("features"), facts[label].get("features")
        if known(a) and known(b) and a != b:
            raise UserError(
                f"{first} and {label} scored FID/KID with different feature networks ({a} against {b}, the "
                "files' SHA-256): their scores are not comparable; test both with the same --sweep.features"
            )
        for name, (what, flag) in QUALITY_FACTS.items():
            a, b = facts[first].get(name), facts[label].get(name)
            if known(a) and known(b) and a != b:
                raise UserError(
                    f"{first} and {label} were scored with a different {what} ({a} against {b}): their scores are "
                    f"not comparable; test both with the same {flag}"
                )
    recorded = lambda label: all(known(facts[label].get(name)) for name in ("split", "noise_seed"))  # noqa: E731
    unrecorded = [label for label in labels if not recorded(label)]
    if len(labels) > 1 and unrecorded:
        return [
            f"{', '.join(unrecorded)}: written by an older fae, the robustness.json does not record its split and "
            "noise seed, so they were not checked against the other runs' (`fae test` again records them)"
        ]
    return []


def common_levels(runs: dict[str, list[Row]]) -> tuple[set[tuple[str, float]], list[str]]:
    """The (kind, level) pairs every run was swept at, and a note when some run has others."""
    levels = {label: {(r.kind, r.level) for r in error_rows(rows)} for label, rows in runs.items()}
    common = set.intersection(*levels.values()) if levels else set()
    extra = sorted(set.union(*levels.values()) - common) if levels else []
    if not extra:
        return common, []
    left_out = ", ".join(f"{kind} {level:g}" for kind, level in extra)
    kept = ", ".join(f"{kind} {level:g}" for kind, level in sorted(common)) or "none"
    return common, [
        f"the runs were not swept at the same levels: the AUC columns are over the levels every run has ({kept}); "
        f"left out of them: {left_out} (a pooled curve keeps the levels all its runs have)"
    ]
