"""The import rule of docs/architecture.md, checked on the source: each layer imports only the layers below.

    core (embedline/)  <-  training/, export/  <-  serving/  <-  benchmarks/ (the checkout only)
    client/ stands alone (the core's errors only); serving/ uses it to forward the OpenAI route
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# folder -> the embedline subpackages its modules must not import
FORBIDDEN = {
    "embedline": ("export", "training", "serving", "client"),
    "training": ("export", "serving", "client"),
    "export": ("training", "serving", "client"),
    "serving": ("training",),
    "client": ("export", "training", "serving"),
}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_each_layer_imports_only_the_layers_below(folder):
    bad = {
        f"{path.relative_to(REPO)}: {name}"
        for path in sorted((REPO / folder).rglob("*.py"))
        for name in imported_modules(path)
        if any(name == f"embedline.{layer}" or name.startswith(f"embedline.{layer}.") for layer in FORBIDDEN[folder])
        # benchmarks/ is not installed: no product code may import it
        or name == "benchmarks" or name.startswith("benchmarks.")
    }
    assert not bad, "imports against the layer rule:\n" + "\n".join(sorted(bad))


def test_the_cli_names_every_verb_module_without_importing_it():
    from embedline.cli import VERBS

    source = (REPO / "embedline" / "cli.py").read_text(encoding="utf-8")
    assert all(f'"{module}"' in source for module, _ in VERBS.values())
