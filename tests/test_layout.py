"""The architecture: stages stand side by side on shared ground and never import each other."""

from __future__ import annotations

import ast

from conftest import ROOT

STAGES = {"pipeline.extraction.extract", "pipeline.classification.classify", "pipeline.finetuning.finetune", "pipeline.prediction.predict"}
ENTRY_POINTS = {"pipeline.cli", "pipeline", "pipeline.__main__"}  # what calls the stages
MAX_LINES = 410


def _imports(path) -> set[str]:
    """Every ``pipeline...`` module a file imports, at any depth (lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in STAGES)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("pipeline"))
    return found


def _modules():
    for path in sorted((ROOT / "pipeline").glob("*.py")):
        name = "pipeline" if path.stem == "__init__" else f"pipeline.{path.stem}"
        yield name, path


def test_no_module_imports_a_stage_except_the_entry_points():
    offenders = {name: sorted(_imports(path) & (STAGES - {name}))
                 for name, path in _modules() if name not in ENTRY_POINTS}
    assert not {k: v for k, v in offenders.items() if v}, offenders


def test_modules_stay_readable():
    long = {name: n for name, path in _modules() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these modules (over {MAX_LINES} lines): {long}"


def test_pipeline_never_imports_tensorflow_directly():
    """Keras 3 API only, so the same code runs on the TensorFlow, JAX and PyTorch backends."""
    for name, path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not [n for n in names if n.split(".")[0] == "tensorflow"], name
