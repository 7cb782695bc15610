"""Sample quality: the feature networks, FID/KID against slow references, the sweep's FID/KID rows,
`fae classifier` and the report's quality figures."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat

import lightning as L
import numpy as np
import pytest
import torch
from scipy import linalg
from torch.utils.data import DistributedSampler

from fae.data import DigitsDataModule
from fae.data.mnist import CLASSIFIER_FILE
from fae.errors import UserError
from fae.evaluation import RobustnessSweep
from fae.evaluation.features import load_features
from fae.evaluation.quality import GeneratedScores, QualityScores, first_visit_mask
from fae.evaluation.results import GENERATED_KINDS
from fae.models import VAE
from fae.models.ae import AE
from fae.nets import MNISTDecoder, MNISTEncoder

from .helpers import QUIET


def test_fae_classifier_trains_once_caches_and_prints_its_test_accuracy(digits_mnist, tmp_path, fae_here):
    root, file = digits_mnist
    content = torch.load(file, weights_only=True)
    assert content["test_accuracy"] > 0.9  # 2 epochs on 4500 digits, 500 held out
    before = file.stat().st_mtime_ns
    out = fae_here("classifier", "--data_dir", str(root), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"classifier cached, reused: {file}; MNIST test accuracy {100 * content['test_accuracy']:.2f}%" in out.stdout
    assert "not Inception FIDs" in out.stdout
    assert file.stat().st_mtime_ns == before  # never trained again, never rewritten
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~umask  # the other users of a shared data folder read it
    missing = fae_here("classifier", "--data_dir", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert missing.returncode == 2 and "MNIST not found" in missing.stderr.strip().splitlines()[-1]
    corrupt = tmp_path / "corrupt"
    (corrupt / "MNIST").mkdir(parents=True)
    (corrupt / CLASSIFIER_FILE).write_bytes(file.read_bytes()[:300])
    out = fae_here("classifier", "--data_dir", str(corrupt), cwd=tmp_path)
    assert out.returncode == 2 and "cannot read the feature network" in out.stderr.strip().splitlines()[-1]


def reference_fid(real: np.ndarray, fake: np.ndarray) -> float:
    """Heusel et al.'s formula with scipy's matrix square root, in float64."""
    m1, m2 = real.mean(0), fake.mean(0)
    c1, c2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    root = linalg.sqrtm(c1 @ c2).real
    return float(((m1 - m2) ** 2).sum() + np.trace(c1 + c2 - 2 * root))


def reference_kid(real: np.ndarray, fake: np.ndarray) -> float:
    """The unbiased MMD^2 with the kernel (x.y / d + 1)^3, every pair written out."""
    d = real.shape[1]
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    n, m = len(real), len(fake)
    k_rr, k_ff, k_rf = k(real, real), k(fake, fake), k(real, fake)
    return float(
        (k_rr.sum() - np.trace(k_rr)) / (n * (n - 1)) + (k_ff.sum() - np.trace(k_ff)) / (m * (m - 1)) - 2 * k_rf.mean()
    )


def test_fid_and_kid_match_slow_references_near_zero_for_the_test_set_itself_larger_for_noisy_copies(digits_mnist):
    features = load_features(digits_mnist[1], (1, 28, 28))
    dm = DigitsDataModule()
    dm.setup("test")
    clean = dm.to_float(dm.splits["test"])  # (500, 1, 28, 28)
    index = torch.arange(len(clean))
    noisy = (clean + 0.3 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    shifted = torch.roll(clean, shifts=3, dims=3)
    scores = QualityScores(
        features, [("gaussian", 0.3), ("shift", 3.0)], sample_kinds=["samples"], kid_subset_size=1000
    )
    for batch in torch.split(index, 128):  # in batches, as the sweep feeds it
        scores.update_real(clean[batch], batch)
        scores.update_recon(0, clean[batch])
        scores.update_recon(1, noisy[batch])
        scores.update_recon(2, shifted[batch])
        scores.update_samples("samples", noisy[batch], batch)
    result = scores.compute()
    keys = [("clean", 0.0, "fid"), ("gaussian", 0.3, "fid"), ("shift", 3.0, "fid")]
    itself, fid_noisy, fid_shifted = (result[key][0] for key in keys)
    real, fake = features(clean).double().numpy(), features(noisy).double().numpy()
    assert abs(itself) < 1e-6
    assert fid_noisy == pytest.approx(reference_fid(real, fake), rel=1e-6)
    assert fid_noisy > 1.0 and fid_shifted > 1.0  # "clearly larger": the FID's scale here is the features' (0-10)
    assert result[("samples", 0.0, "fid")][0] == pytest.approx(fid_noisy, rel=1e-9)
    kid, kid_std = result[("samples", 0.0, "kid")]  # 500 images < subset size: one subset of all of them
    assert kid == pytest.approx(reference_kid(real, fake), rel=1e-9)
    assert kid_std == 0.0 and kid > 0


def test_kid_subsets_do_not_depend_on_the_order_the_devices_gather_in():
    gen = torch.Generator().manual_seed(0)
    real, fake = torch.randn(300, 16, generator=gen), torch.randn(300, 16, generator=gen) + 0.3
    values = []
    for order in (torch.arange(300), torch.randperm(300, generator=gen)):  # one device's order, another's
        kid = GeneratedScores(16, subset_size=100, subsets=20)
        for part in torch.split(order, 64):
            kid.update(real[part], real=True, index=part)
            kid.update(fake[part], real=False, index=part)
        values.append(kid.compute()["kid"])
    assert values[0][0] > 0 and values[0][1] > 0  # 20 subsets: a spread
    assert values[0] == values[1]
    # the subsets: 20 pairs of draws of 100 from a generator seeded 0, each scored by the slow reference
    draws = torch.Generator().manual_seed(0)
    subsets = [
        (torch.randperm(300, generator=draws)[:100], torch.randperm(300, generator=draws)[:100]) for _ in range(20)
    ]
    expected = [reference_kid(real[a].double().numpy(), fake[b].double().numpy()) for a, b in subsets]
    assert values[0][0] == pytest.approx(np.mean(expected), rel=1e-9)
    assert values[0][1] == pytest.approx(np.std(expected), rel=1e-6)
    kid.update(real[:5], real=True, index=torch.arange(300, 305))  # computing leaves it ready for more
    assert set(kid.compute()) == {"kid", "precision", "recall"}


def reference_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """Kynkaanniemi et al. 2019 written out: each image's ball reaches its k-th nearest neighbour in its own set
    (itself excluded); precision, the share of fakes inside some real ball; recall, of reals inside a fake ball."""
    distance = lambda a, b: np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))  # noqa: E731
    radius_real = np.sort(distance(real, real), axis=1)[:, k]  # column 0 is the image itself
    radius_fake = np.sort(distance(fake, fake), axis=1)[:, k]
    precision = np.mean([(distance(f[None], real)[0] <= radius_real).any() for f in fake])
    recall = np.mean([(distance(r[None], fake)[0] <= radius_fake).any() for r in real])
    return float(precision), float(recall)


def test_precision_and_recall_match_a_slow_reference_and_tell_fidelity_from_coverage():
    """Samples all from one half of the data: precise (they look real) but recalling half of it at most; samples
    spread wider than the data: they cover it (recall) but many fall outside it (precision). Any device order."""
    gen = torch.Generator().manual_seed(0)
    real = torch.randn(400, 8, generator=gen)
    half = real[real[:, 0] > 0]
    narrow = half[torch.randint(len(half), (400,), generator=gen)] + 0.05 * torch.randn(400, 8, generator=gen)
    wide = 3 * torch.randn(400, 8, generator=gen)
    found = {}
    for name, fake in (("narrow", narrow), ("wide", wide)):
        scores = GeneratedScores(8, subset_size=100, subsets=2, neighborhood=3)
        order = torch.randperm(400, generator=gen)  # a device's order: the scores put the rows in index order
        for part in torch.split(order, 64):
            scores.update(real[part], real=True, index=part)
            scores.update(fake[part], real=False, index=part)
        result = scores.compute()
        found[name] = (result["precision"][0], result["recall"][0])
        expected = reference_precision_recall(real.double().numpy(), fake.double().numpy(), 3)
        assert found[name] == pytest.approx(expected, abs=1e-6), name  # shares of 400 images, in float32
    assert found["narrow"][0] > 0.9 and found["narrow"][1] < 0.6
    assert found["wide"][1] > 0.9 and found["wide"][0] < 0.5


@pytest.mark.parametrize("n_images, world", [(10, 3), (500, 2), (7, 4), (2, 4)])
def test_first_visits_count_every_image_once_under_a_distributed_sampler(n_images, world):
    orders = torch.tensor(
        [list(DistributedSampler(range(n_images), num_replicas=world, rank=r, shuffle=False)) for r in range(world)]
    )
    keep = first_visit_mask(orders, n_images)
    kept = orders[keep]
    assert sorted(kept.tolist()) == list(range(n_images))  # every image once, padding duplicates dropped


def test_the_sweep_writes_fid_rows_for_samples_and_each_level_and_the_report_plots_them(digits_mnist, tmp_path):
    from fae.evaluation.report import report
    from fae.evaluation.results import write_rows

    torch.manual_seed(0)
    vae = VAE(MNISTEncoder, MNISTDecoder, latent_dim=8, width=4, grid_images=0)
    vae.reconstruct = lambda x: x.clamp(0, 1)  # a perfect auto-encoder: its FID is the corruption's
    results = {}
    for name, model in [("vae", vae), ("ae", AE(MNISTEncoder, MNISTDecoder, latent_dim=8, width=4, grid_images=0))]:
        sweep = RobustnessSweep(sigmas=[0.1, 1.0], nus=[0.3], seed=3, grid_images=0, features=str(digits_mnist[1]))
        L.Trainer(callbacks=[sweep], **QUIET).test(model, datamodule=DigitsDataModule(), verbose=False)
        results[name] = sweep.results
        write_rows(sweep.results, tmp_path / name / "test-1")
    rows = {(r.kind, r.level, r.metric): r for r in results["vae"]}
    assert set(rows) == {
        *[("gaussian", s, "bce") for s in (0.1, 1.0)],
        ("mask", 0.3, "bce"),
        ("mean_image", 0.0, "bce"),
        ("clean", 0.0, "fid"),
        *[("gaussian", s, "fid") for s in (0.1, 1.0)],
        ("mask", 0.3, "fid"),
        *[
            (kind, 0.0, metric)
            for kind in ("samples", "fitted_samples", "gmm_samples")
            for metric in ("fid", "kid", "precision", "recall")
        ],
    }
    # fitted_samples: the sweep fits the codes again with the tested weights, on the validation images
    data = DigitsDataModule()
    data.setup()
    codes = vae.eval().encode(data.to_float(data.splits["val"])).double()
    torch.testing.assert_close(vae.code_fit.mean, codes.mean(0))
    torch.testing.assert_close(vae.code_fit.cov, torch.cov(codes.T))
    torch.testing.assert_close(vae.code_mixture.codes.double(), codes)  # the mixture's EM data: the same codes
    assert all(r.n == 500 for r in results["vae"])
    assert all(0 <= rows[(kind, 0.0, m)].mean <= 1 for kind in GENERATED_KINDS for m in ("precision", "recall"))
    assert abs(rows[("clean", 0.0, "fid")].mean) < 1e-3
    assert rows[("gaussian", 1.0, "fid")].mean > rows[("gaussian", 0.1, "fid")].mean > 0.01  # more noise, worse
    ae_rows = {(r.kind, r.metric) for r in results["ae"]}
    assert ("samples", "fid") not in ae_rows  # no prior; fits of its codes
    assert {("fitted_samples", "fid"), ("gmm_samples", "recall")} <= ae_rows
    report([tmp_path / "vae", tmp_path / "ae"], out=tmp_path / "report")
    for figure in ("robustness_gaussian.png", "fid_gaussian.png", "fid_mask.png"):
        assert (tmp_path / "report" / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "report" / "robustness.md").read_text()
    summary = next(part for part in table.split("\n\n") if part.startswith("| run |")).splitlines()
    scores = ("FID", "KID", "precision", "recall")
    assert summary[0] == (
        "| run | runs | gaussian AUC | gaussian AUC ≤0.5 | mask AUC | mask AUC ≤0.5 | mean-image error | recon FID | "
        + " | ".join(f"{label} {score}" for label in ("sample", "fitted-sample", "GMM-sample") for score in scores)
        + " |"
    )
    vae_line = summary[2].split(" | ")
    assert vae_line[8] == f"{rows[('samples', 0.0, 'fid')].mean:.4g}"
    assert vae_line[9] == f"{rows[('samples', 0.0, 'kid')].mean:.4g}"
    assert "FID of the reconstructions against the clean test images" in table
    assert "The feature network: fae classifier." in table and "converted Inception" not in table
    written = json.loads((tmp_path / "vae" / "test-1" / "robustness.json").read_text())
    assert {r["metric"] for r in written} == {"bce", "fid", "kid", "precision", "recall"}


def test_a_missing_feature_network_is_one_line_or_a_note(digits_mnist, tmp_path, caplog):
    model = VAE(MNISTEncoder, MNISTDecoder, latent_dim=8, width=4, grid_images=0)
    run = lambda **kw: L.Trainer(callbacks=[RobustnessSweep(sigmas=[0.1], nus=[], grid_images=0, **kw)], **QUIET).test(  # noqa: E731
        model, datamodule=DigitsDataModule(), verbose=False
    )
    with pytest.raises(UserError, match=r"^--sweep.quality: no feature network for FID/KID .*fae classifier"):
        run(quality="on")
    with pytest.raises(UserError, match=f"{tmp_path / 'none.pt'} not found"):
        run(features=str(tmp_path / "none.pt"))
    with caplog.at_level(logging.INFO):
        run()  # auto: the sweep runs and says why FID/KID are not there
    assert "fae: FID/KID not scored (DigitsDataModule has no default network)" in caplog.text
    with pytest.raises(UserError, match=r"MNIST classifier, for \(1, 28, 28\) images; these are \(3, 64, 64\)"):
        load_features(digits_mnist[1], (3, 64, 64))


def test_inception_weights_from_a_local_file(tmp_path, monkeypatch):
    """FID's Inception for CelebA reads a weights file the user has; here one of random weights, made
    by building the network without loading any (no download anywhere)."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    empty = tmp_path / "empty.pth"
    torch.save({}, empty)
    with monkeypatch.context() as scoped:
        scoped.setattr(NoTrainInceptionV3, "load_state_dict", lambda self, state, strict=True: None)
        net = NoTrainInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty), antialias=False
        )
    weights = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(net.state_dict(), weights)
    features = load_features(weights, (3, 64, 64))
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    out = features(images)
    assert out.shape == (3, 2048) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert torch.equal(out, net(((images * 255).round()).to(torch.uint8)).reshape(3, -1))
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(UserError, match="is neither a `fae classifier` file nor FID's Inception weights"):
        load_features(tmp_path / "wrong.pth", (3, 64, 64))


def test_the_fashion_mnist_classifier_is_cached_under_its_own_name(digits_mnist, tmp_path):
    """The same net trained on Fashion-MNIST's layout (here the embedded digits copied into it), cached as
    fae_fashion_mnist_classifier.pt beside FashionMNIST/, never as MNIST's."""
    from fae.evaluation.classifier import train_classifier

    root, _ = digits_mnist
    shutil.copytree(root / "MNIST" / "raw", tmp_path / "FashionMNIST" / "raw")
    file = train_classifier(tmp_path, epochs=1, limit_batches=2, dataset="fashion_mnist")
    assert file == tmp_path / "fae_fashion_mnist_classifier.pt" and not (tmp_path / CLASSIFIER_FILE).exists()
    assert load_features(file, (1, 28, 28))(torch.rand(3, 1, 28, 28)).shape[0] == 3
