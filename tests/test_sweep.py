"""The robustness sweep: one pass equals a slow per-level, per-sample loop; every model sees the same
corrupted images; two DDP processes give the sweep of one."""

from __future__ import annotations

import json
import math

import lightning as L
import numpy as np
import pytest
import scipy.stats
import torch

from fae.data import DigitsDataModule
from fae.errors import UserError
from fae.evaluation import RobustnessSweep
from fae.models import VAE, WAEGAN
from fae.models.load import load_model
from fae.nets import MNISTDecoder, MNISTEncoder
from fae.objectives import reconstruction_bce

from .helpers import QUICK, QUIET, TINY, fake_run, last_value, rows_of, run_fae

SIGMAS, NUS = [0.1, 0.8], [0.3, 0.9]


def sweep_of(model, eval_batch_size=64) -> RobustnessSweep:
    sweep = RobustnessSweep(sigmas=SIGMAS, nus=NUS, seed=3, grid_images=0)
    L.Trainer(callbacks=[sweep], **QUIET).test(
        model, datamodule=DigitsDataModule(eval_batch_size=eval_batch_size), verbose=False
    )
    return sweep


def test_one_pass_sweep_equals_a_slow_reference_loop():
    torch.manual_seed(0)
    model = VAE(MNISTEncoder, MNISTDecoder, latent_dim=8, width=4, grid_images=0).eval()
    results = sweep_of(model, eval_batch_size=37).results
    dm = DigitsDataModule()
    dm.setup()
    clean = dm.to_float(dm.splits["test"])
    *results, reference = results
    # the reference row: the error of the training set's mean image, taken image by image
    mean_image = dm.to_float(dm.splits["train"]).double().mean(0, keepdim=True).float()
    errors = torch.tensor([reconstruction_bce(mean_image, clean[i : i + 1]).item() for i in range(len(clean))])
    assert (reference.kind, reference.level, reference.n) == ("mean_image", 0.0, 500)
    assert abs(reference.mean - errors.double().mean().item()) < 1e-6
    for result, corruption in zip(results, RobustnessSweep(SIGMAS, NUS, seed=3).corruptions, strict=True):
        errors = []
        for i in range(len(clean)):  # one sample at a time
            noisy = corruption(clean[i : i + 1], torch.tensor([i]))
            errors.append(reconstruction_bce(model.reconstruct(noisy), clean[i : i + 1]).item())
        errors = torch.tensor(errors, dtype=torch.float64)
        assert (result.kind, result.level, result.n) == (corruption.kind, corruption.level, 500)
        assert abs(result.mean - errors.mean().item()) < 1e-6
        assert abs(result.std - errors.std().item()) < 1e-6
    assert results[1].mean > results[0].mean and results[3].mean > results[2].mean  # more noise, more error


def test_two_models_see_byte_identical_corrupted_images():
    seen = {}
    for name, model in [
        ("vae", VAE(MNISTEncoder, MNISTDecoder, latent_dim=8, width=4, grid_images=0)),
        ("wae", WAEGAN(MNISTEncoder, MNISTDecoder, latent_dim=8, width=8, grid_images=0)),
    ]:
        inputs = []
        original = model.reconstruct
        model.reconstruct = lambda x, _o=original, _i=inputs: (_i.append(x.clone()), _o(x))[1]
        sweep_of(model, eval_batch_size=64 if name == "vae" else 100)
        seen[name] = inputs
    vae = [torch.cat(seen["vae"][k::4][:8]) for k in range(4)]  # the 4 levels of each batch, in turn
    wae = [torch.cat(seen["wae"][k::4][:5]) for k in range(4)]
    for a, b in zip(vae, wae, strict=True):
        assert a.numpy().tobytes() == b.numpy().tobytes()


@pytest.mark.multiprocess
def test_sweep_on_two_ddp_processes_equals_one(tmp_path, digits_mnist, trained_run, fae_here):
    """Errors, FID and KID rows alike: each test image counts once, the samples are the same draws."""
    ckpt = str(trained_run("vae", "runs/m") / "checkpoints" / "last.ckpt")
    sweep = ["--sweep.sigmas", str(SIGMAS), "--sweep.nus", str(NUS), "--sweep.features", str(digits_mnist[1]),
             "--sweep.kid_subset_size", "200"]  # fmt: skip
    one = fae_here("test", *QUICK, *TINY, *sweep, "--ckpt_path", ckpt, "--run_dir", "runs/one", cwd=tmp_path)
    two = run_fae("test", *QUICK, *TINY, *sweep, "--ckpt_path", ckpt, "--run_dir", "runs/two",
                  "--trainer.devices", "2", "--trainer.strategy", "ddp", "--data.init_args.eval_batch_size", "64",
                  cwd=tmp_path, timeout=400)  # fmt: skip
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-2000:], two.stderr[-2000:])
    (one_dir,), (two_dir,) = ((tmp_path / "runs" / name).glob("test-*") for name in ("one", "two"))
    rows_one = json.loads((one_dir / "robustness.json").read_text())
    rows_two = json.loads((two_dir / "robustness.json").read_text())
    assert [r["n"] for r in rows_two] == [500] * (5 + 5 + 12)  # 500 test digits: the padded duplicates count once
    # errors at 4 levels and the mean image's; FID of reconstructions (clean and 4 levels); FID, KID, precision
    # and recall of the prior's samples and of the Gaussian's and the mixture's fitted to the codes
    assert [r["metric"] for r in rows_one] == ["bce"] * 5 + ["fid"] * 5 + ["fid", "kid", "precision", "recall"] * 3
    assert rows_one[4]["kind"] == "mean_image"
    for a, b in zip(rows_one, rows_two, strict=True):
        assert (a["kind"], a["level"], a["metric"]) == (b["kind"], b["level"], b["metric"])
        assert a["mean"] == pytest.approx(b["mean"], rel=1e-5, abs=1e-6), a
        assert a["std"] == pytest.approx(b["std"], rel=1e-5, abs=1e-6), a
    assert rows_one[-3]["metric"] == "kid" and rows_one[-3]["std"] > 0  # the KID's spread over its subsets


def test_report_makes_figures_and_table_and_rejects_malformed_files(tmp_path):
    from fae.errors import UserError
    from fae.evaluation.report import report
    from fae.evaluation.results import write_rows

    vae = VAE(MNISTEncoder, MNISTDecoder, latent_dim=8, width=4, grid_images=0)
    wae = WAEGAN(MNISTEncoder, MNISTDecoder, latent_dim=8, width=4, grid_images=0)
    for name, model in [("vae", vae), ("wae", wae)]:
        write_rows(sweep_of(model).results, tmp_path / name / "test-1")
    report([tmp_path / "vae", tmp_path / "wae"], out=tmp_path / "report")
    for figure in ("robustness_gaussian.png", "robustness_mask.png"):
        assert (tmp_path / "report" / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "report" / "robustness.md").read_text().split("\n\n")
    summary = next(part for part in table if part.startswith("| run |")).splitlines()
    levels = next(part for part in table if part.startswith("| noise |")).splitlines()
    assert (
        summary[0] == "| run | runs | gaussian AUC | gaussian AUC ≤0.5 | mask AUC | mask AUC ≤0.5 | mean-image error |"
    )
    assert len(summary) == 2 + 2
    assert levels[0] == "| noise | level | VAE (vae) | WAEGAN (wae) |" and len(levels) == 2 + 4
    assert "±" in levels[2]
    broken = tmp_path / "broken" / "robustness.json"
    broken.parent.mkdir()
    broken.write_text(json.dumps([{"model": "VAE", "kind": "mask", "level": 0.1, "std": 0.0, "n": 3}]))
    with pytest.raises(UserError, match=r"broken/robustness.json is malformed: row 0 has no valid 'mean' field"):
        report([tmp_path / "vae", broken.parent])
    broken.write_text("{not json")
    with pytest.raises(UserError, match="is not valid JSON"):
        report([broken])


@pytest.mark.slow
def test_fae_test_writes_the_sweeps_files_and_grids_and_fae_report_reads_them(tmp_path, fae_here, trained_run):
    """(What W&B receives: tests/test_wandb.py.)"""
    run = trained_run("vae", "runs/m")
    test = fae_here("test", *QUICK, *TINY, "--sweep.sigmas", "[0.2, 0.5]", "--sweep.nus", "[0.2, 0.5]",
                    "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), cwd=tmp_path)  # fmt: skip
    assert test.returncode == 0, test.stderr[-2000:]
    (folder,) = run.glob("test-*")
    rows = json.loads((folder / "robustness.json").read_text())
    assert [(r["kind"], r["level"], r["n"]) for r in rows] == [
        *((kind, level, 500) for kind in ("gaussian", "mask") for level in (0.2, 0.5)),
        ("mean_image", 0.0, 500),
    ]
    for name in ("robustness_gaussian.png", "robustness_mask.png", "reconstructions_mask_0.8.png"):
        assert (folder / name).read_bytes()[:4] == b"\x89PNG"
    assert (folder / "robustness.csv").read_text().startswith("model,dataset,checkpoint,kind")
    logged = rows_of(folder / "metrics.csv")  # the CSV's scalars: each level, each kind's AUC
    for kind in ("gaussian", "mask"):  # two levels: the normalised area is the mean of their errors
        means = [r["mean"] for r in rows if r["kind"] == kind]
        assert last_value(logged, f"robustness/auc_{kind}") == pytest.approx(sum(means) / 2, rel=1e-6)
        assert last_value(logged, f"robustness/{kind}/0.5") == pytest.approx(means[1], rel=1e-6)
    report = fae_here("report", str(run), str(folder), "--out", "cmp", cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "cmp" / "reconstructions_mask_0.8.png").is_file()
    bad = fae_here("report", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("fae: error: no robustness.json in")


def test_report_pools_seeds_by_folder_with_the_spread_across_runs(tmp_path):
    from fae.evaluation.report import report

    levels = [("mask", 0.0), ("mask", 0.5), ("mask", 1.0)]
    runs = {"fisher": [[1.0, 2.0, 4.0], [3.0, 2.0, 6.0], [2.0, 5.0, 5.0]], "vae": [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]}
    for family, seeds in runs.items():
        for seed, means in enumerate(seeds):
            fake_run(
                tmp_path / "exp" / family / f"seed{seed}",
                family,
                dict(zip(levels, means, strict=True)),
                clean=0.1 * (seed + 1),
            )
    paths = [str(p) for p in sorted((tmp_path / "exp").glob("*/seed*"))]
    report(paths, out=tmp_path / "report", group_by="parent")
    text = (tmp_path / "report" / "robustness.md").read_text()
    parts = text.split("\n\n")
    summary, levels_table = (next(part for part in parts if part.startswith(head)) for head in ("| run |", "| noise |"))
    assert "written by an older fae, the robustness.json does not record its split and noise seed" in text

    def ci(values):  # scipy's own interval of a mean (t.interval), the reference of the report's
        low, high = scipy.stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=scipy.stats.sem(values))
        return np.mean(values), (high - low) / 2

    # per level: the mean of the runs' means, ± its 95% confidence interval across runs
    for level, column in ((0.5, 1), (1.0, 2)):
        (f_mean, f_half), (v_mean, v_half) = (
            ci([m[column] for m in runs["fisher"]]),
            ci([m[column] for m in runs["vae"]]),
        )
        assert f"| mask | {level:g} | {f_mean:.4f} ± {f_half:.4f} | {v_mean:.4f} ± {v_half:.4f} |" in levels_table
    # summary: clean error across seeds, the normalised area under the curve (trapezoids / level range) over all
    # levels and over those up to 0.5
    auc = [(0.5 * (a + b) + 0.5 * (b + c)) / 2 for a, b, c in runs["fisher"]]
    low = [(a + b) / 2 for a, b, _ in runs["fisher"]]
    cells = [ci([0.1, 0.2, 0.3]), ci([0.2, 0.4, 0.6]), ci(auc), ci(low)]
    expected = " | ".join(f"{mean:.4g} ± {half:.2g}" for mean, half in cells)
    assert summary.splitlines()[2] == f"| fisher | 3 | {expected} |"
    # fisher against the VAE's group (the default baseline): Welch's test per column, Holm within each family:
    # the primary columns (clean error, the AUCs) and the others (here the posterior Fisher divergence alone)
    vae_auc = [(0.5 * (a + b) + 0.5 * (b + c)) / 2 for a, b, c in runs["vae"]]
    vae_low = [(a + b) / 2 for a, b, _ in runs["vae"]]
    clean, fisher = ([0.1, 0.2, 0.3], [0.1, 0.2]), ([0.2, 0.4, 0.6], [0.2, 0.4])

    def expected_cells(pairs):  # a family's cells as the report must write them: difference (Holm-adjusted Welch p)
        raw = [scipy.stats.ttest_ind(a, b, equal_var=False).pvalue for a, b in pairs]
        order = np.argsort(raw)
        m = len(raw)
        holm = np.maximum.accumulate([min(1, (m - rank) * raw[i]) for rank, i in enumerate(order)])[np.argsort(order)]
        cells = zip(pairs, holm, strict=True)
        return " | ".join(f"{np.mean(a) - np.mean(b):+.3g} (p = {p:.2g})" for (a, b), p in cells)

    primary, secondary = text.split("Secondary tests")
    assert "Primary tests, the columns the comparison asks about: the clean error and the robustness AUCs." in text
    assert "Each group against vae: the difference of the means, and in brackets the two-sided p-value" in text
    assert "Holm-corrected over the 3 tests of this table" in primary and "over the 1 test of" in secondary
    assert "\n| run | clean bce | mask AUC | mask AUC ≤0.5 |\n" in primary
    assert "\n| fisher | " + expected_cells([clean, (auc, vae_auc), (low, vae_low)]) + " |\n" in primary
    assert "\n| fisher | " + expected_cells([fisher]) + " |\n" in secondary
    # --primary names the family instead; a name that is no column is refused in one line, nothing written
    report(paths, out=tmp_path / "chosen", group_by="parent", primary=["mask AUC ≤0.5"])
    chosen = (tmp_path / "chosen" / "robustness.md").read_text()
    chosen_primary, chosen_secondary = chosen.split("Secondary tests")
    assert "\n| fisher | " + expected_cells([(low, vae_low)]) + " |\n" in chosen_primary
    assert "\n| fisher | " + expected_cells([clean, fisher, (auc, vae_auc)]) + " |\n" in chosen_secondary
    with pytest.raises(UserError, match=r"^--primary 'mask AUC<0.5' is not a tested column of this report: give"):
        report(paths, out=tmp_path / "refused", group_by="parent", primary=["mask AUC<0.5"])
    assert not (tmp_path / "refused").exists()
    # the trade-off: each AUC against the clean error, a point per group
    for column in ("mask_AUC", "mask_AUC_le0.5"):
        assert (tmp_path / "report" / f"tradeoff_{column}.png").read_bytes()[:4] == b"\x89PNG"


def test_groups_without_spread_get_no_test(tmp_path):
    from fae.evaluation.report import report
    from fae.evaluation.stats import welch

    # Welch's statistic is 0/0 or x/0 when neither group varies (a count such as active units): no p-value
    assert math.isnan(welch([8.0, 8.0, 8.0], [7.0, 7.0])) and math.isnan(welch([8.0], [7.0, 6.0]))
    assert welch([1.0, 2.0, 3.0], [2.0, 2.0]) == pytest.approx(
        scipy.stats.ttest_ind([1.0, 2.0, 3.0], [2.0, 2.0], equal_var=False).pvalue
    )
    # in the report: the difference, marked untested, and left out of the Holm family
    for family, clean, masks in (("vae", 0.1, [[1.0, 2.0], [1.5, 2.5]]), ("fisher", 0.2, [[1.0, 3.0], [2.0, 4.0]])):
        for seed, means in enumerate(masks):
            fake_run(tmp_path / family / f"seed{seed}", family, {("mask", 0.0): means[0], ("mask", 1.0): means[1]},
                     clean=clean)  # fmt: skip
    report([str(p) for p in sorted(tmp_path.glob("*/seed*"))], out=tmp_path / "report", group_by="parent")
    text = (tmp_path / "report" / "robustness.md").read_text()
    p = scipy.stats.ttest_ind([2.0, 3.0], [1.5, 2.0], equal_var=False).pvalue  # the mask AUCs, (a + b) / 2
    assert "Holm-corrected over the 1 test of this table" in text
    assert f"\n| fisher | +0.1 (no test) | +0.75 (p = {p:.2g}) |  |" in text
    assert "Secondary tests" not in text  # its one column (posterior_fisher) varies in neither group
    # the trade-off of the full mask AUC is drawn; the low-noise AUC (one level up to 0.5: no range) has no point
    figures = {p.name for p in (tmp_path / "report").glob("tradeoff_*.png")}
    assert figures == {"tradeoff_mask_AUC.png"}


def test_a_wide_band_does_not_flatten_the_curves():
    from fae.evaluation.figures import axis_range

    curves = [0.3, 0.5, 0.9]
    # two seeds' t-interval reaching far outside the curves: the axis is the curves padded by a quarter of
    # their spread (0.15), then a 4% margin
    assert axis_range(curves, [-2.0, 4.0]) == pytest.approx((0.15 - 0.036, 1.05 + 0.036))
    # a narrow band is shown whole; points without bands count; an error axis never goes below 0
    assert axis_range(curves, [0.28, 0.95]) == pytest.approx((0.28 - 0.0268, 0.95 + 0.0268))
    assert axis_range(curves, [0.45, 0.55]) == pytest.approx((0.3 - 0.024, 0.9 + 0.024))
    assert axis_range([0.01, 0.2], [-0.5, 0.21, float("nan")]) == pytest.approx((0.0, 0.21 + 0.0099))


def test_report_labels_runs_with_the_same_folder_name_apart(tmp_path):
    from fae.evaluation.report import report

    for parent, mean in (("a", 1.0), ("b", 2.0)):
        fake_run(tmp_path / parent / "fisher", "FisherAE", {("mask", 0.1): mean, ("mask", 0.2): mean})
    report([tmp_path / "a" / "fisher", tmp_path / "b" / "fisher"], out=tmp_path / "r")
    table = (tmp_path / "r" / "robustness.md").read_text()
    assert "| FisherAE (a/fisher) | 1 |" in table and "| FisherAE (b/fisher) | 1 |" in table


@pytest.mark.slow
def test_a_new_corruption_kind_is_one_class_and_a_config_line(tmp_path, fae_here, trained_run, monkeypatch):
    """tests.corruptions.Speckle, swept beside the shorthand levels by a config line: its rows equal a slow
    per-sample loop, it is keyed by the sweep's seed, and the report draws its curve on its own axis."""
    from matplotlib.axes import Axes

    from fae.evaluation.results import read_rows

    from .corruptions import Speckle

    run = trained_run("vae")
    labels = []
    original = Axes.set_xlabel
    monkeypatch.setattr(
        Axes, "set_xlabel", lambda ax, text, *a, **k: labels.append(text) or original(ax, text, *a, **k)
    )
    config = tmp_path / "speckle.yaml"
    config.write_text(
        "sweep:\n  corruptions:\n    - class_path: tests.corruptions.Speckle\n      init_args: {level: 0.5}\n"
    )
    test = fae_here("test", *QUICK, "--config", str(config), *TINY, "--sweep.sigmas", "[0.1]", "--sweep.nus", "[]",
                    "--sweep.seed", "3", "--sweep.corruptions+=tests.corruptions.Speckle",
                    "--sweep.corruptions.level", "1.0", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
                    cwd=tmp_path)  # fmt: skip
    assert test.returncode == 0, test.stderr[-2000:]
    (folder,) = run.glob("test-*")
    rows = read_rows(folder)
    assert [(r.kind, r.level) for r in rows] == [
        ("gaussian", 0.1),
        ("speckle", 0.5),
        ("speckle", 1.0),
        ("mean_image", 0),
    ]
    model = load_model(run / "checkpoints" / "last.ckpt")
    dm = DigitsDataModule()
    dm.setup()
    clean = dm.to_float(dm.splits["test"])
    corrupt = Speckle(1.0, seed=3)
    slow = [
        reconstruction_bce(model.reconstruct(corrupt(clean[i : i + 1], torch.tensor([i]))), clean[i : i + 1])
        for i in range(len(clean))
    ]
    assert rows[2].mean == pytest.approx(torch.cat(slow).double().mean().item(), abs=1e-6)
    assert (folder / "robustness_speckle.png").is_file() and "speckle noise level" in labels  # its figure's axis
