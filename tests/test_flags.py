"""Every flag a user is told to type (README, docs, config headers, fae's messages and docstrings, scripts)
is spelled one way, the short form (`--data.data_dir`, never `--data.init_args.data_dir`), and parses."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml

from .helpers import CONFIGS

ROOT = CONFIGS.parent
FLAG = re.compile(r"--([a-z_]+(?:\.[a-z_]+)+)")
# top-level arguments and those of other commands (fae report, fae experiment) need no dotted key
SOURCES = [
    "README.md",
    "docs/**/*.md",
    "configs/**/*.yaml",
    "fae/**/*.py",
    "scripts/*",
    "Makefile",
    "experiments/*.yaml",
]


def told_flags() -> dict[str, list[str]]:
    """{dotted flag: [files that mention it]}."""
    found: dict[str, list[str]] = {}
    for pattern in SOURCES:
        for path in sorted(ROOT.glob(pattern)):
            for flag in FLAG.findall(path.read_text()):
                found.setdefault(flag, []).append(str(path.relative_to(ROOT)))
    return found


def config_keys(node, prefix: str = "") -> dict:
    """{dotted key in the short form: its value} of a printed config."""
    keys: dict = {}
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "class_path":
                continue
            if key in ("init_args", "dict_kwargs"):
                keys |= config_keys(value, prefix)
                continue
            keys[prefix + key] = value
            keys |= config_keys(value, f"{prefix}{key}.")
    elif isinstance(node, list):
        for item in node:
            keys |= config_keys(item, prefix)
    return keys


def print_config(main, args: list[str], out: Path) -> dict:
    saved = sys.stdout
    with open(out, "w") as sys.stdout:
        try:
            main(["fit", *args, "--print_config"])
        except SystemExit as exit_:
            assert exit_.code in (0, None), args
        finally:
            sys.stdout = saved
    return yaml.safe_load(out.read_text())


@pytest.fixture(scope="module")
def accepted(tmp_path_factory) -> dict[str, tuple[list[str], object]]:
    """{key: (arguments of a config that has it, its value there)} over every shipped config and the
    corruptions a test may add, as `fae fit --print_config` prints them."""
    from fae.cli import main

    keys: dict[str, tuple[list[str], object]] = {}
    runs = [["--config", str(c)] for c in sorted(CONFIGS.glob("**/*.yaml"))]
    vae = str(CONFIGS / "mnist_vae.yaml")
    runs += [["--config", vae, "--data.corruption", f"fae.data.{c}", f"--data.corruption.{k}", "0.5"]
             for c, k in (("GaussianNoise", "sigma"), ("BinaryMask", "nu"))]  # fmt: skip
    runs.append(["--config", vae, "--sweep.corruptions+=tests.corruptions.Speckle", "--sweep.corruptions.level", "0.5"])
    out = tmp_path_factory.mktemp("print") / "out.yaml"
    for args in runs:
        for key, value in config_keys(print_config(main, args, out)).items():
            keys.setdefault(key, (args, value))
    return keys


def test_no_flag_a_user_is_told_to_type_has_init_args():
    long_form = {flag: files for flag, files in told_flags().items() if ".init_args" in flag}
    assert not long_form, long_form


@pytest.mark.slow
def test_every_flag_a_user_is_told_to_type_parses(accepted, monkeypatch, tmp_path):
    """Each flag is a key of some config and, given on the command line in the short form with a value
    of its type, parses and lands there."""
    from fae.cli import main

    monkeypatch.setattr(sys, "argv", ["fae"])
    flags = told_flags()
    helps = [flag for flag in flags if flag.endswith(".help")]  # `--model.help CLASS`: the help of a class key
    assert all(isinstance(accepted[flag.removesuffix(".help")][1], dict) for flag in helps), helps
    flags = {flag: files for flag, files in flags.items() if flag not in helps}
    unknown = {flag: files for flag, files in flags.items() if flag not in accepted}
    assert not unknown, unknown
    by_config: dict[tuple[str, ...], dict[str, object]] = {}  # the flags of one config are given at once
    for flag in flags:
        args, value = accepted[flag]
        if not isinstance(value, dict):  # a class: its own keys are flags of their own
            by_config.setdefault(tuple(args), {})[flag] = value
    for args, values in by_config.items():
        given = {
            f: yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip() for f, v in values.items()
        }
        command = [*args, *(part for flag, text in given.items() for part in (f"--{flag}", text))]
        printed = config_keys(print_config(main, command, tmp_path / "out.yaml"))
        for flag, value in values.items():
            assert printed[flag] == value, (flag, given[flag], printed[flag])
