"""The package's floors, checked on its import graph (read from the source, every import statement, lazy ones in
function bodies included, ``if TYPE_CHECKING:`` blocks excluded).

- The engine imports nothing from ``relations``, ``merging``, ``report`` or ``flows``, directly or through any
  module it imports (hooks plug these in from outside).
- No library package imports ``report``: only the flows (``polytask.flows``, and ``polytask.experiment``, which
  re-exports the run flow) and the CLI may. ``PENDING`` lists modules that still do; it is empty and may only shrink.
- The CLI imports only the flows, plus the config, errors and the registries it lists (suites, methods, merge
  methods and the merge config).
"""

import ast
from functools import cache
from pathlib import Path

import polytask

ROOT = Path(polytask.__file__).parent
FORBIDDEN_FOR_ENGINE = ("polytask.relations", "polytask.merging", "polytask.report", "polytask.flows")
FLOWS = ("polytask.flows", "polytask.experiment", "polytask.cli")
PENDING: dict[str, str] = {}
CLI_MAY_IMPORT = ("polytask.config", "polytask.errors", "polytask.registry", "polytask.tasks", "polytask.methods",
                  "polytask.models",
                  "polytask.merging", "polytask.merging.config", "polytask.continual", "polytask.continual.config")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _statements(tree: ast.AST):
    """Every import statement of ``tree``, skipping ``if TYPE_CHECKING:`` bodies."""
    for node in ast.iter_child_nodes(tree):
        if _type_checking(node):
            yield from (s for n in node.orelse for s in _statements_of(n))
            continue
        yield from _statements_of(node)


def _statements_of(node: ast.AST):
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node
    yield from _statements(node)


def _with_parents(name: str) -> set[str]:
    """A module and the packages above it (importing it runs their ``__init__``), as far as they are ours."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in MODULES}


@cache
def imports_of(name: str) -> frozenset[str]:
    """The polytask modules that module ``name`` imports directly."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in _statements(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            out |= _with_parents(t)
    out.discard(name)
    return frozenset(out)


def closure(name: str) -> dict[str, str]:
    """Every polytask module ``name`` imports, directly or not, with the module that imports it."""
    seen: dict[str, str] = {}
    todo = [name]
    while todo:
        current = todo.pop()
        for dep in imports_of(current):
            if dep not in seen and dep != name:
                seen[dep] = current
                todo.append(dep)
    return seen


def test_the_walker_sees_lazy_imports_and_skips_type_checking_ones():
    assert "polytask.report.merge" in imports_of("polytask.flows.text")
    assert "polytask.report.merge" not in imports_of("polytask.cli")  # cli imports it only through flows.text
    assert "polytask.flows.merge" in imports_of("polytask.cli")  # imported inside merge()
    assert "polytask.engine.state" not in imports_of("polytask.engine.hooks")  # under TYPE_CHECKING only
    assert "polytask.tasks" in imports_of("polytask.engine.data")  # importing polytask.tasks.task runs its __init__


def test_the_engine_imports_no_relations_merging_report_or_flows():
    engine = [m for m in MODULES if _within(m, ("polytask.engine",))]
    assert "polytask.engine.loop" in engine
    bad = []
    for m in engine:
        for dep, via in closure(m).items():
            if _within(dep, FORBIDDEN_FOR_ENGINE):
                bad.append(f"{m} imports {dep} (through {via})")
    assert not bad, "\n".join(sorted(bad))


def test_no_library_package_imports_the_report():
    library = [m for m in MODULES if not _within(m, (*FLOWS, "polytask.report"))]
    offenders = {m: sorted(d for d in imports_of(m) if _within(d, ("polytask.report",))) for m in library}
    offenders = {m: d for m, d in offenders.items() if d}
    new = {m: d for m, d in offenders.items() if m not in PENDING}
    assert not new, f"library modules import polytask.report (move the report call to a flow): {new}"
    gone = sorted(set(PENDING) - set(offenders))
    assert not gone, f"{gone} no longer import polytask.report: remove them from PENDING"


def test_the_cli_imports_only_flows_config_errors_and_listings():
    bad = sorted(d for d in imports_of("polytask.cli")
                 if d != "polytask" and not _within(d, ("polytask.flows",)) and d not in CLI_MAY_IMPORT)
    assert not bad, f"polytask.cli imports {bad}: reach them through polytask.flows"


def test_the_flows_floor_holds_every_flow():
    """relate, group, transfer and merge moved out of the library packages: nothing there trains several jobs."""
    for flow in ("run", "advise", "relate", "group", "transfer", "merge"):
        assert f"polytask.flows.{flow}" in MODULES
    library = [m for m in MODULES if not _within(m, (*FLOWS, "polytask.report"))]
    runner = {m for m in library if "polytask.flows.runner" in imports_of(m) or "polytask.flows" in imports_of(m)}
    assert not runner, f"library modules use the job runner: {sorted(runner)}"
