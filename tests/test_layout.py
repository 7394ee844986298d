"""The architecture, written down once: which subpackage stands on which, no circles, short modules.

Shared ground below, the stages side by side above it, the command line on top::

    cli
                                               prediction      (a batch job: stage one's extraction of a model's tap)
    extraction   classification   finetuning                   (stages: never import each other)
    runs                                                        (model folders, reports)
    store        heads                                          (feature stores; stage-two estimators)
    backbones    data                                           (networks; image files)
    core                                                        (errors, runtime, settings, evaluation)
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE = ROOT / "pipeline"
_SHARED = {"core", "backbones", "data", "store", "heads", "runs"}
# Which subpackage may import which (besides itself). The one place this rule is written.
MAY_IMPORT = {
    "core": set(),
    "backbones": {"core"},
    "data": {"core"},
    "store": {"core", "backbones", "data"},
    "heads": {"core", "backbones"},
    "runs": {"core", "backbones", "data", "store", "heads"},
    "extraction": _SHARED,
    "classification": _SHARED,
    "finetuning": _SHARED,
    "prediction": _SHARED | {"extraction"},  # a batch job is an extraction of the model's tap
    "cli": _SHARED | {"extraction", "classification", "finetuning", "prediction"},
    "__main__": {"cli"},
}
# Project modules that load a heavy framework when imported; every other project import sits at a module's
# top. These are imported inside the functions that need them, so that `import pipeline`, `--help`, a cache
# hit and `inspect` load neither Keras nor scikit-learn. Modules that import them at their top are heavy too.
HEAVY = {
    "pipeline.backbones.layers": "Keras (its custom layers are Keras classes)",
    "pipeline.heads.classifiers": "scikit-learn",
    "pipeline.heads.probe": "scikit-learn (its estimator is one)",
    "pipeline.heads.dense": "scikit-learn (its estimator is one)",
}
MAX_LINES = 400


def _name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _area(module: str) -> str:
    """``pipeline.store.virtual`` -> ``store``; ``pipeline.cli`` -> ``cli``; ``pipeline`` -> ``pipeline``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _imports(path: Path) -> list[tuple[str, bool]]:
    """``(module, at_top)`` for every ``pipeline`` module the file imports (a name imported from a package
    counts as its submodule where it is one)."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("pipeline"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.append((sub if sub in MODULES else node.module, id(node) in top))
        elif isinstance(node, ast.Import):
            found += [(a.name, id(node) in top) for a in node.names if a.name.startswith("pipeline")]
    return found


def _heavy() -> set[str]:
    heavy, grew = set(HEAVY), True
    while grew:
        grew = False
        for name, path in MODULES.items():
            if name not in heavy and any(at_top and module in heavy for module, at_top in _imports(path)):
                heavy.add(name)
                grew = True
    return heavy


def test_every_module_is_placed():
    assert {_area(name) for name in MODULES} - {"pipeline"} <= set(MAY_IMPORT)


@pytest.mark.parametrize("name", [n for n in MODULES if n != "pipeline"])
def test_imports_follow_the_layering(name):
    area = _area(name)
    wrong = sorted({module for module, _ in _imports(MODULES[name])
                    if _area(module) not in MAY_IMPORT[area] | {area}})
    assert not wrong, f"{name} ({area}) may import only {sorted(MAY_IMPORT[area])}, not {wrong}"


def test_the_layering_rule_has_no_circle():
    _assert_acyclic({area: deps - {area} for area, deps in MAY_IMPORT.items()})


def test_modules_import_each_other_without_circles():
    _assert_acyclic({name: {m for m, at_top in _imports(path) if at_top and m in MODULES and m != name}
                     for name, path in MODULES.items() if name != "pipeline"})


def test_project_imports_sit_at_the_top_unless_heavy():
    heavy = _heavy()
    inside = {name: sorted({m for m, at_top in _imports(path) if not at_top and m not in heavy})
              for name, path in MODULES.items() if name != "pipeline"}
    assert not {k: v for k, v in inside.items() if v}, \
        f"import these at the module's top (only {sorted(HEAVY)} and modules importing them wait): {inside}"


def test_heavy_modules_are_the_named_ones():
    """The deferral rule must not be widened silently: the heavy set is HEAVY and the stages built on them."""
    assert _heavy() - set(HEAVY) <= {"pipeline.classification.classify", "pipeline.finetuning.finetune"}


def test_modules_stay_readable():
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these modules by concern (over {MAX_LINES} lines): {long}"


def test_pipeline_never_imports_tensorflow_directly():
    """Keras 3 API only, so the same code runs on the TensorFlow, JAX and PyTorch backends."""
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not [n for n in names if n.split(".")[0] == "tensorflow"], name


def _assert_acyclic(graph: dict[str, set[str]]) -> None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                pytest.fail("circle: " + " -> ".join([*path[path.index(nxt):], nxt]))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_the_circle_check_finds_a_circle():
    with pytest.raises(pytest.fail.Exception, match="a -> b -> a"):
        _assert_acyclic({"a": {"b"}, "b": {"a"}})


FIGURE = re.compile(r"\d[\d,.]*\s?(images/s|GB/s|ms\b)|\d(\.\d+)?-\d(\.\d+)?x\b|\d(\.\d+)?x (as fast|faster|as long)")


def test_measured_figures_live_in_documents_not_in_code():
    """Docstrings and --help say what a thing does; speeds are measured on a machine, and go stale in code
    (bench/README.md and bench/NOTES.md hold them, with the machine)."""
    found = {f"{name}:{n}": line.strip() for name, path in MODULES.items()
             for n, line in enumerate(path.read_text().splitlines(), 1) if FIGURE.search(line)}
    assert not found, found


def test_the_figure_check_sees_a_figure():
    assert FIGURE.search("1.65-2.2x pillow's speed") and FIGURE.search("about 600 images/s")
    assert not FIGURE.search("a 3x3 grid") and not FIGURE.search("block4_pool")
