"""The shape of the house, checked: no import circle in skpipe, floors (estimators -> engine ->
torch) respected, pure modules free of process machinery, and no module reaching into another
object's private state."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "skpipe"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(name: str) -> set[str]:
    """Every skpipe module ``name`` imports, at any level of the file (lazy imports count)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found |= {f"{target}.{a.name}" for a in node.names}
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: imports(name) for name in MODULES}


def external_imports(path: Path, top_level_only: bool = False) -> set[str]:
    """Absolute imports of a file (those at module level only, when asked)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module)
    return found


def test_no_import_circle():
    def cycle_from(start):
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in GRAPH[node]:
                if nxt == start:
                    return path + [start]
                if nxt not in path and not nxt.startswith(start + "."):
                    stack.append((nxt, path + [nxt]))
        return None

    # a package's __init__ importing its own submodules is how packages re-export, not a circle
    circles = [c for m in MODULES if (c := cycle_from(m)) and not any(
        a.startswith(b + ".") or b.startswith(a + ".") for a, b in zip(c, c[1:]))]
    assert circles == []


def test_engine_never_imports_the_estimators():
    for name, deps in GRAPH.items():
        if name.startswith("skpipe.engine"):
            assert not any(d.startswith("skpipe.estimators") for d in deps), name
            outside = external_imports(MODULES[name])
            assert not {m.split(".")[0] for m in outside} & {"sklearn", "skorch"}, name


@pytest.mark.parametrize("name", ["_schedules", "_partition", "_microbatch", "_budget", "_report",
                                  "_simulate"])
def test_pure_modules_use_no_process_machinery(name):
    full = f"skpipe.engine.{name}"
    closure, todo = set(), [full]
    while todo:
        for dep in GRAPH[todo.pop()]:
            if dep not in closure:
                closure.add(dep)
                todo.append(dep)
    machinery = {"skpipe.engine._pool", "skpipe.engine._groups", "skpipe.engine._spawn",
                 "skpipe.engine._stage", "skpipe.engine._worker_main", "skpipe.engine._runners"}
    assert closure & machinery == set()
    top_level = external_imports(MODULES[full], top_level_only=True)
    assert not [m for m in top_level if m.startswith(("torch.distributed", "subprocess",
                                                      "multiprocessing", "socket"))]


ALLOWED = {"_exit"}  # os._exit: the standard library's way to leave at once


def private_reads(path: Path) -> list[str]:
    """``x._name`` where x is not self/cls and ``_name`` is not defined in this module: a read of
    another room's private state (a module's, or an object's of a class defined elsewhere)."""
    tree = ast.parse(path.read_text())
    own = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    own |= {t.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
            and isinstance(n.ctx, ast.Store) for t in [n]}
    own |= {t.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)
            for t in [n]}
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and node.attr not in own | ALLOWED
            and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
        ):
            found.append(f"{path.name}:{node.lineno} .{node.attr}")
    return found


def test_no_module_reads_another_objects_private_state():
    found = [hit for path in MODULES.values() for hit in private_reads(path)]
    assert found == []
