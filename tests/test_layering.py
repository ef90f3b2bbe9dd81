"""Every import points down: a layer of dgrpo imports only the layers below it, and the pure layers no Ray.

The layers, bottom up (dgrpo/__init__.py draws the same list):

    errors, precision      user errors; device and precision
    config                 the validated config tree
    corpus, protocols      text and tokenizer; typed messages and their codec
    models                 networks, sampler, replay, rewards, checkpoints, optimizers
    training, learner      pretraining and judge training; GRPO math and the learner core
    actors                 thin Ray shells around models and learner
    orchestration          driver, roles, actor groups, batches, weight sync, cluster
    entrypoints            the Python API, the CLI, pipeline, demo, Tune, reports

Packages of one layer do not import each other. Imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "dgrpo"
LAYERS = [
    {"errors", "precision"},
    {"config"},
    {"corpus", "protocols"},
    {"models"},
    {"training", "learner"},
    {"evaluation"},
    {"actors"},
    {"orchestration"},
    {"entrypoints"},
]
RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}
NO_RAY = {"errors", "precision", "config", "corpus", "protocols", "models", "training", "learner", "evaluation"}


def unit_of(path: Path) -> str:
    """The layer unit of a module file: its top-level package (models, ...) or module (config, ...)."""
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of every module an import statement in `path` names."""
    package = ["dgrpo", *path.relative_to(PACKAGE).with_suffix("").parts[:-1]]
    if path.name == "__init__.py":
        package = ["dgrpo", *path.relative_to(PACKAGE).parts[:-1]]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            # `from . import grpo` / `from .. import config` name modules in the names
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names if not node.module]
    return found


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


def test_every_module_belongs_to_a_layer():
    assert {unit_of(p) for p in modules()} <= set(RANK), "a new package or root module needs a place in LAYERS"
    assert set(RANK) <= {unit_of(p) for p in modules()}


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
    unit = unit_of(path)
    wrong = []
    for line, module in imported_modules(path):
        parts = module.split(".")
        if parts[0] == "ray" and unit in NO_RAY:
            wrong.append(f"line {line}: imports {module} (no Ray below the actors)")
        if parts[0] != "dgrpo" or len(parts) < 2:
            continue
        target = parts[1]
        if target == unit:
            continue
        if target not in RANK:
            wrong.append(f"line {line}: imports {module}, which is in no layer")
        elif RANK[target] >= RANK[unit]:
            wrong.append(f"line {line}: {unit} imports {module} ({target} is not below {unit})")
    assert not wrong, f"{path.relative_to(PACKAGE)}:\n" + "\n".join(wrong)


def test_the_checker_sees_upward_and_sideways_imports(tmp_path, monkeypatch):
    """The test itself: a relative upward import, a sibling import and a Ray import are all caught."""
    fake = tmp_path / "dgrpo"
    (fake / "models").mkdir(parents=True)
    (fake / "models" / "bad.py").write_text(
        "from ..orchestration.driver import Driver\nfrom dgrpo.learner import grpo\n"
        "def f():\n    import ray\n    from ..config import TrainConfig\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    with pytest.raises(AssertionError) as err:
        test_imports_point_down(fake / "models" / "bad.py")
    message = str(err.value)
    assert "line 1: models imports dgrpo.orchestration.driver" in message
    assert "line 2: models imports dgrpo.learner" in message
    assert "line 4: imports ray" in message
    assert "line 5" not in message  # config is below models


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the dgrpo modules it imports (at any depth of its code; a name imported from a package's
    __init__ counts as the package)."""
    names = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in names.items():
        targets = set()
        for _line, module in imported_modules(path):
            while module and module not in names:
                module = module.rpartition(".")[0]
            if module and module != name and module != "dgrpo":
                targets.add(module)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}  # state: 1 on the current path, 2 done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_no_module_imports_itself_round_a_circle():
    """Within a layer too: no chain of imports (inside functions included) leads back to where it started."""
    assert cycles(import_graph()) == []
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
