"""The package's layering (docs/develop.md, "Layout"): a module imports only from layers below its own, or
from its own subpackage; nothing imports upward."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fae"
LAYERS = {  # the first component under fae -> its layer
    **dict.fromkeys(
        [
            "errors",
            "files",
            "objectives",
            "likelihoods",
            "priors",
            "tracking",
            "images",
            "checkpoint",
            "loop_state",
            "runs",
            "metrics_log",
            "plan",
        ],
        0,
    ),
    "data": 1,
    "nets": 2,
    "models": 3,
    "evaluation": 4,
    "cli": 5,
    "experiment": 5,  # the cli names it in its table of tools, importing nothing of it
}


def fae_imports(path: Path) -> set[str]:
    """The fae modules `path` imports, as dotted names under fae (e.g. "models.base")."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fae."):
            names.add(node.module[len("fae.") :])
        elif isinstance(node, ast.Import):
            names |= {alias.name[len("fae.") :] for alias in node.names if alias.name.startswith("fae.")}
    return names


def test_no_module_imports_from_a_layer_above_its_own():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        part = path.relative_to(PACKAGE).with_suffix("").parts[0]
        if part == "__init__":
            continue
        for name in fae_imports(path):
            other = name.split(".")[0]
            same_layer = LAYERS[other] == LAYERS[part] and LAYERS[part] > 0  # the bottom layer shares helpers
            if other != part and (LAYERS[other] > LAYERS[part] or same_layer):
                upward.append(f"{path.relative_to(PACKAGE)} imports fae.{name}")
    assert not upward, upward
    assert set(LAYERS) == {
        p.stem if p.is_file() else p.name
        for p in PACKAGE.iterdir()
        if p.name != "__init__.py" and (p.suffix == ".py" or (p / "__init__.py").is_file())
    }


def test_every_room_is_small_enough_to_hold_one_job():
    """No module over 400 lines, no class over 250, no function over 60; the README for a newcomer, at
    most 320 lines (its details live in docs/)."""
    too_large = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        name = path.relative_to(PACKAGE)
        if source.count("\n") > 400:
            too_large.append(f"{name}: {source.count(chr(10))} lines")
        for node in ast.walk(ast.parse(source)):
            limit = {ast.ClassDef: 250, ast.FunctionDef: 60, ast.AsyncFunctionDef: 60}.get(type(node))
            if limit and node.end_lineno - node.lineno + 1 > limit:
                too_large.append(f"{name}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines")
    readme = (PACKAGE.parent / "README.md").read_text().count("\n")
    assert not too_large and readme <= 320, (too_large, readme)
