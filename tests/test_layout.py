"""The package's layers and size limits, read from the source (nothing is imported).

Layers, lowest first; a module may import from its own layer or a lower one, never a higher one:

    inputs  errors, lbdpo.data.*, models                             (typed errors; preference data → batches; HF models)
    core    beta_head, losses, logprobs, metrics, scoring, dpo_model, modeling (the method, the forward, the model object)
    build   build                                                     (a Hydra config → models, head, datasets)
    train   lbdpo.train.*                                             (the loop, checkpoints, run output)
    eval    lbdpo.eval.*                                              (evaluation, figures, comparisons)

The package's ``__init__`` (the public names), the ``export`` command (a checkpoint and its eval results → a
model folder) and the ``experiment`` runner (arms × seeds → trained, evaluated, compared) stand above them all.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lbdpo"
LAYERS = {"inputs": 0, "core": 1, "build": 2, "train": 3, "eval": 4, "package": 5}
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 80
REASON = "Long:"  # a docstring that gives this reason lets a module or function pass the size limit


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ("export", "experiment"):  # the package's __init__, the two commands
        return LAYERS["package"]
    if parts[1] in ("errors", "data", "models"):
        return LAYERS["inputs"]
    return LAYERS.get(parts[1], LAYERS["core"])


def lbdpo_imports(path: Path) -> set[str]:
    """Every lbdpo module that ``path`` imports at run time, at module level or inside functions
    (``if TYPE_CHECKING:`` blocks, which only annotations see, do not count)."""
    tree = ast.parse(path.read_text())
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    annotation_only = {id(n) for block in ast.walk(tree)
                       if isinstance(block, ast.If) and getattr(block.test, "id", None) == "TYPE_CHECKING"
                       for n in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in annotation_only:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "lbdpo"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "lbdpo":
                found.add(target)
    return found


MODULES = sorted(SRC.rglob("*.py"))


def test_layout_is_what_the_docstring_says():
    names = {module_name(p) for p in MODULES}
    assert {"lbdpo.beta_head", "lbdpo.losses", "lbdpo.logprobs", "lbdpo.dpo_model", "lbdpo.modeling", "lbdpo.build",
            "lbdpo.train.trainer", "lbdpo.eval.evaluate", "lbdpo.data.collator", "lbdpo.models"} <= names
    assert all(layer_of(n) in LAYERS.values() for n in names)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_point_down(path):
    me = module_name(path)
    for target in lbdpo_imports(path):
        assert layer_of(target) <= layer_of(me), f"{me} (layer {layer_of(me)}) imports {target} (layer {layer_of(target)})"


def test_no_import_cycle():
    graph = {module_name(p): {t for t in lbdpo_imports(p) if t != module_name(p)} for p in MODULES}
    graph = {k: {t for t in v if t in graph} for k, v in graph.items()}  # `from .x import name` → module x
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " → ".join(stack + [node, nxt]))
            if not state.get(nxt):
                visit(nxt, stack + [node])
        state[node] = 2

    for node in graph:
        if not state.get(node):
            visit(node, [])


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_sizes(path):
    tree = ast.parse(path.read_text())
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_MODULE_LINES or REASON in (ast.get_docstring(tree) or ""), f"{path.name}: {lines} lines"
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            assert length <= MAX_FUNCTION_LINES or REASON in (ast.get_docstring(node) or ""), \
                f"{path.name}:{node.lineno} {node.name} is {length} lines"
