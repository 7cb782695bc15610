"""The package's layering (README, "Develop"): a module imports only from layers below its own, or
from its own subpackage; nothing imports upward."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fae"
LAYERS = {  # the first component under fae -> its layer
    **dict.fromkeys(["errors", "objectives", "likelihoods", "priors", "tracking", "checkpoint", "runs"], 0),
    "data": 1,
    "nets": 2,
    "models": 3,
    "evaluation": 4,
    "cli": 5,
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
    assert set(LAYERS) == {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir() if p.name != "__init__.py"
                           and (p.suffix == ".py" or (p / "__init__.py").is_file())}  # fmt: skip
