"""kd's import structure, read from the source: imports flow one way (no circle, function-level imports included),
at most 9 floors from kd.cli down to the leaves, no module above 400 lines, and only shared modules at the top."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

KD = Path(__file__).resolve().parent.parent / "kd"
MODULES = {".".join(p.relative_to(KD.parent).with_suffix("").parts).removesuffix(".__init__"): p
           for p in KD.rglob("*.py")}
SHARED = {"kd.cli", "kd.config", "kd.console", "kd.errors", "kd.files", "kd.flags", "kd.registry", "kd.seeding",
          "kd.tables", "kd.versions"}


def _imports(module: str) -> set[str]:
    """The kd modules ``module`` imports when it runs (anywhere in it; typing-only imports left out)."""
    tree = ast.parse(MODULES[module].read_text())
    typing_only = {id(node) for block in ast.walk(tree)
                   if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
                   for node in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kd"):
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                      for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("kd")}
    return {name for name in found if name in MODULES and name != module}


GRAPH = {module: _imports(module) for module in MODULES}


def _circle_from(start: str) -> list[str] | None:
    """A path of imports from ``start`` back to itself, if there is one."""
    todo, seen = [(start, [start])], set()
    while todo:
        module, path = todo.pop()
        for imported in GRAPH[module]:
            if imported == start:
                return [*path, start]
            if imported not in seen:
                seen.add(imported)
                todo.append((imported, [*path, imported]))
    return None


def test_no_module_imports_itself_through_others():
    circles = [circle for module in MODULES if (circle := _circle_from(module))]
    assert not circles, " ; ".join(" -> ".join(circle) for circle in circles)


def test_at_most_nine_floors_from_the_command_line_down():
    @functools.lru_cache(None)
    def floors(module: str) -> tuple[int, tuple[str, ...]]:
        below = max((floors(m) for m in GRAPH[module]), default=(0, ()))
        return below[0] + 1, (module, *below[1])

    height, chain = floors("kd.cli")
    assert height <= 9, " -> ".join(chain)


def test_no_module_is_above_400_lines():
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > 400}
    assert not long, long


def test_only_the_modules_every_layer_shares_stay_at_the_top_of_kd():
    top = {name for name, path in MODULES.items() if path.parent == KD and path.name != "__init__.py"}
    assert top <= SHARED, sorted(top - SHARED)


def test_flags_offer_exactly_the_choices_of_the_tables_they_name():
    """kd/config.py keeps its choice lists as text, so that --help, --print_config and a mistyped flag answer
    without importing torch; each list must be the keys of the table it names."""
    from kd.config import FIELDS
    from kd.data.transforms import RECIPES
    from kd.deploy.export import FORMATS
    from kd.train.optim import OPTIMIZERS, SCHEDULERS

    tables = {"augment": RECIPES, "optimizer": OPTIMIZERS, "scheduler": SCHEDULERS, "export": FORMATS}
    assert {flag: set(FIELDS[flag].metadata["choices"]) for flag in tables} == {
        flag: set(table) for flag, table in tables.items()}


def test_names_imported_for_typing_only_are_used_in_annotations_only():
    """A name under ``if TYPE_CHECKING:`` does not exist when kd runs: using it outside an annotation is a NameError."""
    misused = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        blocks = [node for node in ast.walk(tree)
                  if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)]
        inside = {id(node) for block in blocks for node in ast.walk(block)}
        typing_names = {alias.asname or alias.name.rpartition(".")[2] for block in blocks for node in ast.walk(block)
                        if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
        annotations = {id(node) for owner in ast.walk(tree) for part in
                       ([owner.annotation] if isinstance(owner, (ast.arg, ast.AnnAssign)) and owner.annotation else
                        [owner.returns] if isinstance(owner, ast.FunctionDef) and owner.returns else [])
                       for node in ast.walk(part)}
        misused += [f"{module}:{node.lineno} {node.id}" for node in ast.walk(tree) if isinstance(node, ast.Name)
                    and node.id in typing_names and id(node) not in annotations | inside]
    assert not misused, misused
