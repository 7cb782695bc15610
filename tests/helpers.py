"""What several test files share: the configs and flags of tiny runs, the `fae` command run in a
subprocess or in this process, readers of run folders (metrics.csv, checkpoints, offline W&B files),
and one-line-error checks. Tests import from here; no test imports another test file."""

from __future__ import annotations

import csv
import fcntl
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fae.data.celeba import IMAGES, PARTITION

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
QUICK = ["--config", str(CONFIGS / "quickstart" / "digits_vae.yaml")]
FISHER = ["--config", str(CONFIGS / "quickstart" / "digits_fisher.yaml")]
WAE = ["--config", str(CONFIGS / "quickstart" / "digits_wae_gan.yaml")]
TINY = ["--model.width", "4", "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "5"]  # fmt: skip
QUICKSTART = {"vae": QUICK, "fisher": FISHER, "wae_gan": WAE}

# A Trainer for tests: CPU, no files, no bars; evaluation with gradients (as the CLI sets it), which the
# posterior Fisher divergence and the Fisher objective need.
QUIET = dict(
    accelerator="cpu",
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    inference_mode=False,
)


def made_once(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], object]) -> Path:
    """The folder NAME, made by `make(folder)` once per test session. Under pytest-xdist each worker holds its
    own session fixtures, so a fixture that trains would train once per worker: here the workers share the
    session's folder, the first makes it under an flock, the others wait for it and read it (read only). A
    folder half made by a worker that failed is made again."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the session's folder, above each worker's own
    folder, done = base / "made-once" / name, base / "made-once" / f"{name}.done"
    folder.parent.mkdir(exist_ok=True)
    with open(folder.parent / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            make(folder)
            done.touch()
    return folder


def run_fae(*args: str, cwd: Path, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `fae ARGS` in a subprocess: for several processes (DDP re-executes sys.argv), signals, limits."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)  # tests.callbacks
    full_env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONPATH": path, **(env or {})}
    full_env.pop("FAE_RUN_DIR", None)
    return subprocess.run(
        [sys.executable, "-m", "fae.cli", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def run_in_process(args: list[str], cwd: Path, env: dict[str, str] | None = None, capture=None) -> int:
    """`fae ARGS` in this process (one device), in `cwd` with `env`; its exit status. `capture`, a
    pytest capfd, points Lightning's log handlers at the captured stderr."""
    from fae.cli import main

    with pytest.MonkeyPatch.context() as scoped:
        scoped.chdir(cwd)
        scoped.setattr(sys, "argv", ["fae"])
        scoped.setenv("WANDB_MODE", "offline")
        scoped.delenv("FAE_RUN_DIR", raising=False)
        for key, value in (env or {}).items():
            scoped.setenv(key, value)
        if capture is not None:
            capture.readouterr()
            for name in ("lightning", "lightning.pytorch", "lightning.fabric"):  # handlers keep their import's stderr
                for handler in logging.getLogger(name).handlers:
                    if type(handler) is logging.StreamHandler:  # not pytest's own capturing handlers
                        handler.stream = sys.stderr  # not setStream: it flushes the old one, maybe closed
        try:
            main(list(args))
            return 0
        except SystemExit as exit_:
            return exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)


def one_line_error(out: subprocess.CompletedProcess, starts: str) -> None:
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith(f"fae: error: {starts}"), out.stderr[-800:]


def rows_of(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def steps_of(path: Path, key: str) -> list[int]:
    return [int(r["step"]) for r in rows_of(path) if r.get(key)]


def last_value(rows: list[dict[str, str]], key: str) -> float:
    return float([r[key] for r in rows if r.get(key)][-1])


def step_of(ckpt: Path) -> int:
    return torch.load(ckpt, weights_only=False, map_location="cpu")["global_step"]


def wandb_records(path: Path) -> list:
    """The protobuf records of an offline W&B run's transaction log (a LevelDB-style log in 32 KiB blocks);
    wandb itself has no reader of these files."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, pending, raw = path.read_bytes(), 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            raw.append(chunk)
        elif kind in (2, 3):  # first, middle
            pending = (pending if kind == 3 else b"") + chunk
        elif kind == 4:  # last
            raw.append(pending + chunk)
    records = []
    for item in raw:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(item)
        records.append(record)
    return records


def wandb_runs(run_folder: Path) -> list[dict]:
    """What each offline W&B run under run_folder/wandb recorded (a resumed run: one folder more), oldest
    first: {"run": the run record, "config", "summary": {key: value}, "metrics": {name: its step metric},
    "history": [row], "artifacts": [(name, type, [file])]} (values decoded from JSON)."""
    runs = []
    for path in sorted(run_folder.glob("wandb/offline-run-*/run-*.wandb")):
        out: dict = {"run": None, "config": {}, "summary": {}, "metrics": {}, "history": [], "artifacts": []}
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                out["run"] = record.run
            elif kind == "config":
                out["config"] |= {u.key: json.loads(u.value_json) for u in record.config.update}
            elif kind == "summary":
                out["summary"] |= {
                    u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in record.summary.update
                }
            elif kind == "metric" and record.metric.name:
                out["metrics"][record.metric.name] = record.metric.step_metric
            elif kind == "history":
                out["history"].append(
                    {u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in record.history.item}
                )
            elif kind == "artifact":
                files = [entry.path for entry in record.artifact.manifest.contents]
                out["artifacts"].append((record.artifact.name, record.artifact.type, files))
        runs.append(out)
    return runs


def wandb_run_records(run_folder: Path) -> dict:
    """The one offline W&B run under run_folder (`wandb_runs`)."""
    (run,) = wandb_runs(run_folder)
    return run


def write_idx(folder: Path, name: str, array: np.ndarray) -> None:
    """An MNIST IDX file: magic (0, 0, type 0x08 = uint8, number of dimensions), the sizes, the bytes."""
    with open(folder / name, "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def fake_checkpoint(
    path: Path,
    step: int = 10,
    family: str = "fae.models.VAE",
    optimizer: bool = True,
    best: str | None = None,
    epochs: int = 0,
) -> Path:
    """A file with the fields of a Lightning checkpoint the planner reads (no weights): for rules."""
    path.parent.mkdir(parents=True, exist_ok=True)
    content = {
        "pytorch-lightning_version": "2.6.6",
        "global_step": step,
        "epoch": epochs,
        "state_dict": {},
        "hyper_parameters": {"_class_path": family},
        "optimizer_states": [{}] if optimizer else [],
        "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": epochs}}}},
        "callbacks": {"Checkpoint{'monitor': 'val/loss'}": {"best_model_path": best or ""}},
    }
    torch.save(content, path)
    return path


FAKE_SLURM = {  # name -> body of a fake SLURM command (bash); each records its argv in $FAKE_SLURM/calls
    "sbatch": """n=$(( $(cat "$FAKE_SLURM/next_id" 2>/dev/null || echo 4241) + 1 )); echo $n > "$FAKE_SLURM/next_id"
cp "${@: -1}" "$FAKE_SLURM/sbatch-$n.sh"; echo "Submitted batch job $n\"""",
    "sacct": 'echo "JobID|State|NodeList"; cat "$FAKE_SLURM/sacct" 2>/dev/null; true',
    "squeue": 'cat "$FAKE_SLURM/squeue" 2>/dev/null; true',
    "scancel": "true",
    "scontrol": "true",
    # srun as a one-task step: its options dropped, the command run in its place in a process group of
    # its own, the step's (a signal to the step reaches each of its processes, as SLURM's does), stdout
    # and stderr in the files sbatch's script names
    "srun": """out=/dev/null; err=/dev/null
while [ $# -gt 0 ]; do
  case "$1" in --output) out=$2; shift 2;; --error) err=$2; shift 2;; --*) shift;; *) break;; esac
done
name() { echo "$1" | sed -e "s/%A/$SLURM_ARRAY_JOB_ID/g; s/%a/$SLURM_ARRAY_TASK_ID/g; s/%j/$SLURM_JOB_ID/g; s/%t/0/g"; }
exec setsid "$@" >> "$(name "$out")" 2>> "$(name "$err")\"""",
}


def fake_slurm(folder: Path) -> dict[str, str]:
    """sbatch, sacct, squeue, scancel, scontrol and srun as scripts in folder/bin that record how they
    were called (folder/calls: one line per call, `name arg...`); sbatch keeps each script it is given as
    folder/sbatch-<job id>.sh and answers as SLURM does; sacct and squeue print folder/sacct and
    folder/squeue. The environment (PATH first) that puts them in place of SLURM's, as submitit's tests do."""
    bin_dir = folder / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, body in FAKE_SLURM.items():
        script = bin_dir / name
        script.write_text(f'#!/bin/bash\necho "{name} $*" >> "$FAKE_SLURM/calls"\n{body}\n')
        script.chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM": str(folder)}


def slurm_calls(folder: Path, name: str) -> list[str]:
    """The argument lines of each call of the fake SLURM command `name` (fake_slurm)."""
    calls = folder / "calls"
    lines = calls.read_text().splitlines() if calls.is_file() else []
    return [line[len(name) + 1 :] for line in lines if line.split(" ", 1)[0] == name]


def slurm_task_env(array_job: str, task: int, job_id: int) -> dict[str, str]:
    """The environment SLURM gives task `task` of job array `array_job` (one node, one task)."""
    return {
        "SLURM_ARRAY_JOB_ID": array_job, "SLURM_ARRAY_TASK_ID": str(task), "SLURM_JOB_ID": str(job_id),
        "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
        "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "node1",
    }  # fmt: skip


def fake_run(folder, model: str, means: dict[tuple[str, float], float], clean: float | None = None, **facts):
    """A run folder as `fae test` leaves it: test-*/robustness.json and, optionally, metrics.csv; `facts`
    are more fields of every row (split, noise_seed, n, ...)."""
    test = folder / "test-20260101-000000"
    test.mkdir(parents=True)
    rows = [
        {"model": model, "kind": k, "level": lv, "metric": "bce", "mean": m, "std": 0.1, "n": 10, **facts}
        for (k, lv), m in means.items()
    ]
    (test / "robustness.json").write_text(json.dumps(rows))
    if clean is not None:
        (test / "metrics.csv").write_text(f"step,test/recon_bce,test/posterior_fisher\n0,{clean},{2 * clean}\n")


# CelebA's split codes (0 train, 1 validation, 2 test) of the tiny folder `make_celeba` writes
CODES = [0, 0, 1, 0, 2, 0, 0, 1, 2, 0, 0, 2, 0, 1, 0, 2, 0, 0, 1, 2, 0]


def make_celeba(folder: Path, seed: int = 0) -> dict[str, list[str]]:
    """img_align_celeba/ with 21 smooth 178 x 218 JPEG 'faces' and list_eval_partition.txt; returns the
    file names of each split in the partition file's order."""
    rng = np.random.default_rng(seed)
    (folder / IMAGES).mkdir(parents=True)
    yy, xx = np.mgrid[0:218, 0:178] / 218.0
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    lines = []
    for i, code in enumerate(CODES, 1):
        colour, slope = rng.uniform(20, 235, 3), rng.uniform(-60, 60, (2, 3))
        cy, cx, r = rng.uniform(0.3, 0.7), rng.uniform(0.25, 0.55), rng.uniform(0.1, 0.25)
        image = colour + yy[..., None] * slope[0] + xx[..., None] * slope[1]
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = rng.uniform(0, 255, 3)  # a disk: some structure
        name = f"{i:06d}.jpg"
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(folder / IMAGES / name, quality=95)
        lines.append(f"{name} {code}")
        splits[["train", "val", "test"][code]].append(name)
    (folder / PARTITION).write_text("\n".join(lines) + "\n")
    return splits
