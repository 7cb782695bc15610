"""scripts/experiment.py: variants trained at one budget, each swept by `fae test`, one table and one
report; finished runs are reused, unfinished ones are never written into."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from .helpers import CONFIGS

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "experiment.py"


def run_experiment(spec: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(spec), "--out", str(out), "--jobs", "3", *extra],
                          capture_output=True, text=True, timeout=600)  # fmt: skip


@pytest.mark.slow
def test_experiment_trains_tests_and_tabulates_every_variant_at_one_budget(tmp_path):
    spec = {
        "budget": {"batches": 4, "val_every": 2},
        "seeds": [0, 1],
        "flags": {
            "--model.width": 4,
            "--trainer.logger": False,
            "--sweep.sigmas": [0.5],
            "--sweep.nus": [0.8],
        },
        "table": {"val_at": [2, 4], "levels": {"mask": [0.8]}},
        "variants": {
            "vae": {"config": str(CONFIGS / "quickstart" / "digits_vae.yaml")},
            "wae": {"config": str(CONFIGS / "quickstart" / "digits_wae_gan.yaml"), "seeds": [0]},
        },
    }
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    out = tmp_path / "exp"
    first = run_experiment(spec_file, out, "--publish", str(tmp_path / "docs"))
    assert first.returncode == 0, first.stdout + first.stderr
    for variant, seeds in (("vae", (0, 1)), ("wae", (0,))):
        for seed in seeds:
            run = out / variant / f"seed{seed}"
            ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
            assert ckpt["global_step"] == 4  # the same budget in batches for both families
            assert len(list(run.glob("test-*/robustness.json"))) == 1
    rows = {r["variant"]: r for r in csv.DictReader(open(out / "table.csv"))}
    assert set(rows) == {"vae", "wae"} and rows["vae"]["seed_count"] == "2"
    clean = []
    for seed in (0, 1):
        (test_dir,) = (out / "vae" / f"seed{seed}").glob("test-*")
        values = [
            r["test/recon_bce"] for r in csv.DictReader(open(test_dir / "metrics.csv")) if r.get("test/recon_bce")
        ]
        clean.append(float(values[-1]))
    assert abs(float(rows["vae"]["test recon_bce mean"]) - sum(clean) / 2) < 1e-6
    mask = json.loads(next((out / "wae" / "seed0").glob("test-*/robustness.json")).read_text())
    assert "| wae | 1 |" in (out / "table.md").read_text() and mask[-1]["level"] == 0.8
    assert "| vae | 2 |" in (out / "report" / "robustness.md").read_text()  # the seeds pooled per variant
    assert "--experiment spec --variant vae" in (out / "vae" / "seed1.log").read_text()  # its W&B group and name
    published = sorted(p.name for p in (tmp_path / "docs").iterdir())
    assert published == [
        "reconstructions_clean.png",
        "reconstructions_mask_0.8.png",
        "robustness.md",
        "robustness_gaussian.png",
        "robustness_mask.png",
        "table.csv",
        "table.md",
    ]

    # a second start: finished runs are reused, not trained again; an unfinished folder is never written
    # into; a run another process of the experiment holds (its lock) is left to it
    for test_dir in (out / "vae").glob("seed*/test-*"):  # as if the runs had stopped before their tests
        test_dir.rename(test_dir.with_name("moved-" + test_dir.name))
    (out / "vae" / "seed1.lock").touch()  # as while another process of the experiment trains it
    again = run_experiment(spec_file, out)
    assert again.returncode != 0 and again.stdout.count("done earlier, reused") == 1  # wae seed 0
    assert len(list((out / "wae" / "seed0").glob("test-*"))) == 1
    assert "vae seed 0: LEFT OUT" in again.stdout and "exists but has no finished test" in again.stdout
    assert not list((out / "vae").glob("seed*/test-*"))  # nothing written into them
    assert "vae seed 1: LEFT OUT, another experiment process is running it" in again.stdout
