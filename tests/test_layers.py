"""The import rule of docs/architecture.md, checked on the source: each layer imports only the layers below.

    core (embedline/)  <-  training/, export/  <-  serving/  <-  benchmarks/ (the checkout only)
    client/ stands alone (the core's errors only); serving/ uses it to forward the OpenAI route
    search/ embeds through client/ and is served by serving/
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# folder -> the embedline subpackages its modules must not import
FORBIDDEN = {
    "embedline": ("export", "training", "serving", "client", "search"),
    "training": ("export", "serving", "client", "search"),
    "export": ("training", "serving", "client", "search"),
    "serving": ("training",),
    "client": ("export", "training", "serving", "search"),
    "search": ("export", "training", "serving"),
}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "embedline":  # `from embedline import wire` imports the module embedline.wire
                names.update(f"embedline.{alias.name}" for alias in node.names)
            else:
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


def embedline_imports(folder: str) -> set[str]:
    return {name for path in sorted((REPO / folder).rglob("*.py")) for name in imported_modules(path)
            if name == "embedline" or name.startswith("embedline.")}


def test_serving_takes_from_export_only_the_export_action():
    """Variant policy is the core's (embedline/variants.py); serving runs an export only through ensure."""
    from_export = {name for name in embedline_imports("serving") if name.startswith("embedline.export")}
    assert from_export <= {"embedline.export.ensure"}, from_export


def test_the_client_takes_from_the_core_only_its_errors_and_the_wire_contract():
    core = {name for name in embedline_imports("client") if not name.startswith("embedline.client")}
    assert core <= {"embedline.errors", "embedline.wire"}, core


def test_the_cli_names_every_verb_module_without_importing_it():
    from embedline.cli import VERBS

    source = (REPO / "embedline" / "cli.py").read_text(encoding="utf-8")
    assert all(f'"{module}"' in source for module, _ in VERBS.values())


def test_no_product_function_is_over_80_lines():
    """Long functions hid state and drifted; a function of the product reads on one screen."""
    long = []
    for folder in ("embedline", "client", "export", "serving", "training", "model_repository"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > 80:
                        long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


@pytest.mark.parametrize("product, forbidden", [
    ("simcse", ("fewshot", "diagnostics")),  # the trainer knows nothing of what is built on it
    ("diagnostics", ("simcse", "fewshot")),  # it measures any artifact, trained here or not
    ("fewshot", ("diagnostics",)),           # it trains its body with simcse's trainer
])
def test_training_products_import_only_the_shared_modules_and_what_they_build_on(product, forbidden):
    imports = {name for path in sorted((REPO / "training" / product).rglob("*.py")) for name in imported_modules(path)}
    bad = {name for name in imports for other in forbidden
           if name == f"embedline.training.{other}" or name.startswith(f"embedline.training.{other}.")}
    assert not bad, bad
