"""The shape of the house, checked: no import circle in skpipe, floors (estimators -> engine ->
torch, and between the engine's parts) respected, the parts that split and plan free of process
machinery, the workers reached only through the runners, and no module reaching into another
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


# -- the floors between the engine's parts --------------------------------------------------------
ENGINE = "skpipe.engine"
# what each part of the engine may import besides itself: every arrow points down this table
FLOORS = {
    "split": set(),                                                   # network -> layers or pieces
    "parallel": {"split"},                                            # devices, groups, shards
    "plan": {"split"},                                                # the Plan, made once
    "state": {"split"},                                               # state by name, streamed
    "planner": {"split", "plan", "asyncpipe"},                        # measure, simulate, choose
    "asyncpipe": {"split", "plan"},                                   # the asynchronous schedules
    "workers": {"split", "plan", "state", "parallel", "asyncpipe"},   # processes hosting stages
    "runners": {"split", "plan", "state", "parallel", "workers", "asyncpipe"},  # where stages live
}
# process machinery: what starts, joins or talks to other processes
MACHINERY_PARTS = {"parallel", "workers", "runners"}
MACHINERY_IMPORTS = ("torch.distributed", "subprocess", "multiprocessing", "socket")
# torch's pipe_split() mark and schedule table live here; importing it starts no process
NOT_MACHINERY = ("torch.distributed.pipelining",)


def part_of(name: str) -> str | None:
    """The engine part a module belongs to ('plan' for skpipe.engine.plan._plan), else None."""
    if not name.startswith(ENGINE + "."):
        return None
    return name.split(".")[2]


def closure(name: str) -> set[str]:
    """Every skpipe module ``name`` imports, directly or through others."""
    seen, todo = set(), [name]
    while todo:
        for dep in GRAPH[todo.pop()]:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_every_engine_module_lives_in_a_part():
    loose = [n for n in MODULES if n.startswith(ENGINE + ".") and part_of(n) not in FLOORS]
    assert loose == []


@pytest.mark.parametrize("part", sorted(FLOORS))
def test_a_part_imports_only_the_parts_below_it(part):
    upward = {
        f"{name} -> {dep}"
        for name, deps in GRAPH.items() if part_of(name) == part
        for dep in deps if part_of(dep) not in (None, part) and part_of(dep) not in FLOORS[part]
    }
    assert upward == set()


def test_the_planner_never_imports_a_runner_or_a_worker():
    for name in MODULES:
        if part_of(name) == "planner":
            assert {part_of(d) for d in closure(name)} & {"runners", "workers"} == set(), name


@pytest.mark.parametrize("part", ["split", "plan"])
def test_split_and_plan_use_no_process_machinery(part):
    for name in MODULES:
        if part_of(name) != part:
            continue
        assert {part_of(d) for d in closure(name)} & MACHINERY_PARTS == set(), name
        top_level = external_imports(MODULES[name], top_level_only=True)
        assert not [m for m in top_level if m.startswith(MACHINERY_IMPORTS)
                    and not m.startswith(NOT_MACHINERY)], name


def test_nothing_imports_the_workers_but_the_runners():
    # skpipe/__init__ names shutdown_workers as a string (imported on first use), not an import
    reached = {f"{name} -> {dep}" for name, deps in GRAPH.items()
               if part_of(name) not in ("runners", "workers")
               for dep in deps if part_of(dep) == "workers"}
    assert reached == set()


@pytest.mark.parametrize("name", ["plan._schedules", "split._partition", "plan._microbatch",
                                  "plan._budget", "plan._report", "planner._simulate",
                                  "asyncpipe._ticks", "asyncpipe._inprocess"])
def test_pure_modules_use_no_process_machinery(name):
    full = f"{ENGINE}.{name}"
    machinery = {f"{ENGINE}.workers._pool", f"{ENGINE}.parallel._groups",
                 f"{ENGINE}.runners._spawn", f"{ENGINE}.workers._stage",
                 f"{ENGINE}.workers._worker_main", f"{ENGINE}.runners._runners"}
    assert closure(full) & machinery == set()
    top_level = external_imports(MODULES[full], top_level_only=True)
    assert not [m for m in top_level if m.startswith(MACHINERY_IMPORTS)]


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
