"""W&B: the mode follows WANDB_MODE and credentials; a failed online start falls back to offline."""

from __future__ import annotations

import pytest

from fae.tracking import WandbLogger, resolve_wandb_mode, wandb_credentials_found


@pytest.fixture
def no_wandb_env(monkeypatch, tmp_path):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    return tmp_path


def test_mode_without_credentials_is_offline(no_wandb_env):
    assert not wandb_credentials_found()
    assert resolve_wandb_mode("auto") == "offline"
    assert resolve_wandb_mode("disabled") == "disabled"


def test_mode_with_credentials_is_online(no_wandb_env, monkeypatch):
    (no_wandb_env / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    (no_wandb_env / ".netrc").chmod(0o600)
    assert wandb_credentials_found()
    assert resolve_wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")  # WANDB_MODE is honoured over everything
    assert resolve_wandb_mode("auto") == "offline"
    assert resolve_wandb_mode("online") == "offline"


@pytest.mark.slow
def test_failed_online_start_falls_back_to_offline(no_wandb_env, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens: connection refused
    logger = WandbLogger(save_dir=str(no_wandb_env), init_timeout=1)
    assert logger.mode == "online"
    with pytest.warns(UserWarning, match="online start failed"):
        run = logger.experiment
    assert logger.mode == "offline" and run.settings.mode == "offline"
    logger.log_metrics({"val/loss": 1.0}, step=0)
    run.finish()
    assert list((no_wandb_env / "wandb").glob("offline-run-*/run-*.wandb"))


def test_a_tests_summaries_go_to_its_training_run_only_when_it_is_there_and_not_still_training(no_wandb_env, caplog):
    import logging

    from fae.runs import RunLock

    run = no_wandb_env / "run"
    (run / "wandb" / "offline-run-20260101_000000-abc123").mkdir(parents=True)
    logger = WandbLogger(save_dir=str(no_wandb_env), mode="disabled")
    logger.set_run_folder(run / "test-1", evaluates=run, job_type="test", summarize_into=run)
    assert logger.write_to_training_run({"robustness/auc_mask": 0.2}) is None  # W&B off: nothing anywhere
    logger = WandbLogger(save_dir=str(no_wandb_env), mode="offline")
    logger.set_run_folder(run / "test-1", evaluates=run, job_type="test", summarize_into=None)
    assert logger.write_to_training_run({"robustness/auc_mask": 0.2}) is None  # not a checkpoint of that run
    logger.set_run_folder(run / "test-1", evaluates=run, job_type="test", summarize_into=run)
    lock = RunLock(run, "fit")  # as while the run still trains
    try:
        with caplog.at_level(logging.INFO):
            assert logger.write_to_training_run({"robustness/auc_mask": 0.2}) is None
    finally:
        lock.release()
    assert "is still training; the test's summaries stay in the test run" in caplog.text
    assert sorted(p.name for p in (run / "wandb").iterdir()) == ["offline-run-20260101_000000-abc123"]


def test_credentials_that_only_wandb_login_finds_count(no_wandb_env, monkeypatch):
    """Beyond WANDB_API_KEY and netrc, whatever `wandb.login(prompt=False, verify=False)` finds (a key in W&B's
    settings file, an identity token file) counts, asked so that it prompts no one and reaches no server.
    (wandb itself is replaced here: a real login that finds a key starts wandb's service, seconds per case;
    checked by hand with a settings file and a token file, each True in a fresh process.)"""
    import wandb

    calls = []

    def login(**kwargs):
        calls.append(kwargs)
        return answer

    monkeypatch.setattr(wandb, "login", login)
    for answer in (True, False):
        assert wandb_credentials_found() is answer
    assert calls == [{"prompt": False, "verify": False}] * 2
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)  # found without asking wandb
    assert wandb_credentials_found() and len(calls) == 2
