"""An experiment file read and checked, and the grid of runs it names.

An experiment file (experiments/*.yaml):

    budget:   {batches: 3000, val_every: 500}   # the same for every variant (for every family a step is a batch)
    seeds:    [0, 1, 2]                         # a variant may list its own
    flags:    {--model.width: 16}               # `fae fit`/`fae test` flags of every run
    table:    {val_at: [500, 3000], levels: {gaussian: [0.5], mask: [0.8]}}
    variants:
      vae:    {config: configs/mnist_vae.yaml}
      fisher: {config: configs/mnist_fisher.yaml, flags: {--model.decoder_scale: 0.5}, seeds: [0, 1]}
    slurm:                                      # optional: what each run asks of a SLURM cluster
      partition: gpu
      time: 240                                 # minutes, or SLURM's D-HH:MM:SS
      gpus_per_task: 1                          # each run on its own GPU; 2 or more: DDP across them
      cpus_per_task: 8
      mem_gb: 32
      account: proj
      qos: normal
      array_parallelism: 8                      # runs of the array at a time (default: all)
      signal_delay_s: 120                       # the warning signal (USR2) this long before the limit
      max_requeues: 20                          # requeues after a time limit before a run gives up
      setup: [module load cuda]                 # shell lines before each task
      extra: [--constraint=a100]                # further sbatch lines

Each (variant, seed) is a `Run` in OUT/VARIANT/seedS, with OUT/VARIANT/seedS.log (what its `fae`
commands printed), .lock (held while a process runs it) and .json (its status) beside the folder.
The file's stem is the experiment's name: W&B groups its runs by it and names each `VARIANT/seedS`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import yaml

from fae.errors import UserError


@dataclass(frozen=True)
class Run:
    """One (variant, seed) of an experiment: its config, its flags and its folder."""

    variant: str
    seed: int
    config: Path
    flags: tuple[str, ...]
    run_dir: Path

    @property
    def key(self) -> str:
        return f"{self.variant}/seed{self.seed}"

    def beside(self, suffix: str) -> Path:
        return self.run_dir.with_name(self.run_dir.name + suffix)

    @property
    def log(self) -> Path:
        return self.beside(".log")

    @property
    def lock(self) -> Path:
        return self.beside(".lock")

    @property
    def status_file(self) -> Path:
        return self.beside(".json")


@dataclass(frozen=True)
class Slurm:
    """What each run of the grid asks of SLURM (the `slurm:` block, then the command's flags)."""

    partition: str | None = None
    time: int | None = None  # minutes
    gpus_per_task: int = 1
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    account: str | None = None
    qos: str | None = None
    array_parallelism: int | None = None
    signal_delay_s: int = 120
    max_requeues: int = 20
    setup: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()

    def sbatch_parameters(self, job_name: str) -> dict:
        """The parameters of submitit's SlurmExecutor (sbatch's names) for one task per run."""
        if self.time is None:
            raise UserError(
                "a SLURM job needs a time limit: give `time:` (minutes or D-HH:MM:SS) in the experiment's slurm: "
                "block, or --time"
            )
        parameters = dict(
            job_name=job_name,
            time=self.time,
            nodes=1,
            ntasks_per_node=1,
            signal_delay_s=self.signal_delay_s,
            additional_parameters=extra_sbatch(self.extra),
        )
        if self.gpus_per_task:
            parameters["gpus_per_node"] = self.gpus_per_task
        if self.mem_gb is not None:
            parameters["mem"] = (
                f"{int(self.mem_gb)}GB" if self.mem_gb == int(self.mem_gb) else f"{self.mem_gb * 1024:.0f}MB"
            )
        if self.array_parallelism is not None:
            parameters["array_parallelism"] = self.array_parallelism
        if self.setup:
            parameters["setup"] = list(self.setup)
        for key in ("partition", "cpus_per_task", "account", "qos"):
            if getattr(self, key) is not None:
                parameters[key] = getattr(self, key)
        return parameters


@dataclass(frozen=True)
class Experiment:
    """An experiment file, checked."""

    name: str
    path: Path
    batches: int
    val_every: int
    seeds: tuple[int, ...]
    flags: dict
    table: dict
    variants: dict
    slurm: Slurm = field(default_factory=Slurm)

    def grid(self, out: Path, data_dir: Path | None = None) -> list[Run]:
        """Every (variant, seed) of the experiment, in the file's order."""
        common = flag_list(self.flags)
        if data_dir is not None:
            common += ["--data.data_dir", str(data_dir)]
        runs = []
        for variant, entry in self.variants.items():
            config = self.config_path(variant, entry["config"])
            for seed in entry.get("seeds", self.seeds):
                flags = [*common, *flag_list(entry.get("flags")), "--seed_everything", str(seed)]
                flags += ["--experiment", self.name, "--variant", variant]
                runs.append(Run(variant, int(seed), config, tuple(flags), out / variant / f"seed{seed}"))
        return runs

    def config_path(self, variant: str, config: str) -> Path:
        """A variant's config: as given from the working folder, else beside the experiment file or in its
        parent (experiments/x.yaml names configs/y.yaml of the project)."""
        for base in (Path.cwd(), self.path.parent, self.path.parent.parent):
            candidate = (base / config).resolve()
            if candidate.is_file():
                return candidate
        raise UserError(
            f"{self.path}: variant {variant}'s config {config} does not exist (looked from the working folder and "
            f"from {self.path.parent}): fix the path"
        )


def seed_major(runs: list[Run]) -> list[Run]:
    """The runs in the order they start: every variant's first seed before any variant's second, and so on,
    so that a grid stopped half way still compares every variant (the table keeps the file's order)."""
    rank = {}
    for run in runs:
        rank.setdefault(run.variant, {}).setdefault(run.seed, len(rank[run.variant]))
    return sorted(runs, key=lambda run: rank[run.variant][run.seed])  # stable: the file's order within a rank


def read_experiment(path: Path) -> Experiment:
    """The experiment file at `path`, or a UserError naming what is missing or wrong in it."""
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(
            f"experiment file {path} does not exist: give one such as experiments/mnist_ablation.yaml"
        ) from None
    except (OSError, yaml.YAMLError) as err:
        raise UserError(f"cannot read the experiment file {path}: {' '.join(str(err).split())[:200]}") from None
    if not isinstance(spec, dict):
        raise UserError(f"{path} is not an experiment file: it must map budget, seeds, flags, table and variants")
    budget = require(spec, "budget", dict, path)
    variants = require(spec, "variants", dict, path)
    table = require(spec, "table", dict, path)
    if not variants:
        raise UserError(f"{path}: variants is empty: name at least one, each with its config")
    for name, entry in variants.items():
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", str(name)):
            raise UserError(
                f"{path}: variant name {name!r} must be letters, digits, '_', '-' or '.' (it names a folder)"
            )
        if not isinstance(entry, dict) or not isinstance(entry.get("config"), str) or not entry["config"]:
            raise UserError(f"{path}: variant {name} needs a config (variants.{name}.config: configs/....yaml)")
    for key in ("batches", "val_every"):
        if not isinstance(budget.get(key), int) or budget[key] <= 0:
            raise UserError(f"{path}: budget.{key} must be a positive number of batches, got {budget.get(key)!r}")
    table.setdefault("val_at", [budget["batches"]])
    table.setdefault("levels", {})
    check_shapes(spec, table, path)
    return Experiment(
        name=path.stem,
        path=path.resolve(),
        batches=budget["batches"],
        val_every=budget["val_every"],
        seeds=tuple(spec.get("seeds") or [0]),
        flags=spec.get("flags") or {},
        table=table,
        variants=variants,
        slurm=slurm_block(spec.get("slurm") or {}, path),
    )


def check_shapes(spec: dict, table: dict, path: Path) -> None:
    """A UserError for a value of the wrong shape (a number for a list, a list for a mapping), before any run."""
    lists = {"seeds": spec.get("seeds", [0]), "table.val_at": table["val_at"]}
    mappings = {"flags": spec.get("flags") or {}, "slurm": spec.get("slurm") or {}, "table.levels": table["levels"]}
    for name, entry in spec["variants"].items():
        lists[f"variants.{name}.seeds"] = entry.get("seeds", [0])
        mappings[f"variants.{name}.flags"] = entry.get("flags") or {}
    for kind, levels in table["levels"].items() if isinstance(table["levels"], dict) else ():
        lists[f"table.levels.{kind}"] = levels
    for key, value in lists.items():
        if not isinstance(value, list) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in value
        ):
            raise UserError(f"{path}: {key} must be a list of numbers (e.g. [0, 1, 2]), got {value!r}")
    for key, value in mappings.items():
        if not isinstance(value, dict):
            raise UserError(f"{path}: {key} must be a mapping (key: value lines), got {value!r}")
        if key.endswith("flags") and (bad := [f for f in value if not str(f).startswith("--")]):
            raise UserError(f"{path}: {key}: {bad[0]!r} is not a flag of fae fit: write it as on the command line "
                            f"(--{str(bad[0]).lstrip('-')}: value)")  # fmt: skip


def require(spec: dict, key: str, kind: type, path: Path):
    if key not in spec:
        raise UserError(f"{path}: `{key}:` is missing (see `fae experiment --help` for the file's format)")
    if not isinstance(spec[key], kind):
        raise UserError(f"{path}: `{key}:` must be a mapping, got {spec[key]!r}")
    return spec[key]


def slurm_block(block: dict, path: Path | str) -> Slurm:
    known = {f.name for f in fields(Slurm)}
    unknown = sorted(set(block) - known)
    if unknown:
        raise UserError(
            f"{path}: slurm.{unknown[0]} is not a setting; the slurm: block takes {', '.join(sorted(known))}"
        )
    values = dict(block)
    if values.get("time") is not None:
        values["time"] = minutes(values["time"])
    for key in ("setup", "extra"):
        if key in values:  # one line, or a list of lines
            lines = values[key] or []
            values[key] = (str(lines),) if isinstance(lines, str) else tuple(str(line) for line in lines)
    return Slurm(**values)


def with_overrides(slurm: Slurm, **overrides) -> Slurm:
    """The block with the command's flags (those given) over it."""
    given = {key: value for key, value in overrides.items() if value is not None}
    if given.get("time") is not None:
        given["time"] = minutes(given["time"])
    return replace(slurm, **given)


def minutes(value: int | str) -> int:
    """A SLURM time limit in minutes: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS."""
    text = str(value).strip()
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not match:
        raise UserError(f"time {value!r} is not a SLURM time limit: give minutes (240) or D-HH:MM:SS (0-04:00:00)")
    days, first, second, third = match.groups()
    parts = [int(p) for p in (first, second, third) if p is not None]
    if days is not None:  # D-HH[:MM[:SS]]
        hours, mins, secs = (parts + [0, 0])[:3]
        total = int(days) * 1440 + hours * 60 + mins + secs / 60
    elif len(parts) == 3:
        total = parts[0] * 60 + parts[1] + parts[2] / 60
    elif len(parts) == 2:
        total = parts[0] + parts[1] / 60
    else:
        total = parts[0]
    if total <= 0:
        raise UserError(f"time {value!r} must be longer than zero")
    return max(1, math.ceil(total))  # as SLURM, a part of a minute counts as a minute


def extra_sbatch(lines: tuple[str, ...]) -> dict:
    """Further sbatch lines (`--constraint=a100`, `--exclusive`) as submitit's additional parameters."""
    out = {}
    for line in lines:
        match = re.fullmatch(r"(?:#SBATCH\s+)?--([A-Za-z][\w-]*)(?:[= ](.+))?", line.strip())
        if not match:
            raise UserError(f"slurm.extra line {line!r} is not an sbatch option: write it as --name=value or --flag")
        out[match.group(1)] = match.group(2).strip() if match.group(2) is not None else True
    return out


def flag_list(flags: dict | None) -> list[str]:
    """{"--key": value} -> ["--key", "value"], values as YAML would read them back."""
    out = []
    for key, value in (flags or {}).items():
        out += [key, value if isinstance(value, str) else json.dumps(value)]
    return out
