"""No import cycles between the project's modules (launcher/ and modelopt_ext/).

The graph is built from the source with `ast`, counting every import, including those inside functions
(a lazy import still ties two modules together; it only hides the cycle until run time), but not those
under `if TYPE_CHECKING:` (they never run). A cycle fails the test with the modules that form it.
"""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("launcher", "modelopt_ext")


def _modules(root: Path) -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")):
            parts = list(f.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join(parts)] = f
    return mods


@lru_cache(maxsize=2)  # the two repository tests share one parse of the tree
def import_graph(root: Path = REPO) -> dict[str, set[str]]:
    """module -> the project modules it imports (a name imported from a package counts as that submodule
    when it is one, else as the package)."""
    mods = _modules(root)

    def known(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        deps: set[str] = set()
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        tree = ast.parse(path.read_text(), str(path))
        typing_only = {
            id(n)
            for block in ast.walk(tree)
            if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
            for stmt in block.body
            for n in ast.walk(stmt)
        }
        for node in ast.walk(tree):
            if id(node) in typing_only:  # `if TYPE_CHECKING:` imports never run
                continue
            if isinstance(node, ast.Import):
                deps.update(filter(None, (known(a.name) for a in node.names)))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                deps.update(filter(None, (known(f"{base}.{a.name}") for a in node.names)))
        deps.discard(mod)
        graph[mod] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_the_cycle_finder_finds_a_planted_cycle(tmp_path):
    pkg = tmp_path / "modelopt_ext"
    pkg.mkdir()
    (tmp_path / "launcher").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from modelopt_ext.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from . import c\n")
    (pkg / "c.py").write_text("import modelopt_ext.a\n")
    (pkg / "d.py").write_text("from modelopt_ext import a\n")
    (pkg / "e.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from modelopt_ext import f\n")
    (pkg / "f.py").write_text("import modelopt_ext.e\n")
    assert cycles(import_graph(tmp_path)) == [["modelopt_ext.a", "modelopt_ext.b", "modelopt_ext.c"]]


def test_no_import_cycle_between_modules():
    graph = import_graph()
    assert len(graph) > 100 and "modelopt_ext.training.parts" in graph["modelopt_ext.training.trainer"]
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


# The drafter-generic modules of drafters/: the interface, the folder reader, the layer rule's application.
GENERIC_DRAFTER_MODULES = ("modelopt_ext.drafters.base", "modelopt_ext.drafters.hf_folder", "modelopt_ext.drafters.layers")


def package_of(module: str) -> str:
    """`launcher`, `modelopt_ext.<package>`, or a top-level module of modelopt_ext (a command) itself."""
    parts = module.split(".")
    return parts[0] if parts[0] == "launcher" else ".".join(parts[:2])


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The module graph collapsed to packages (imports inside a package dropped)."""
    out: dict[str, set[str]] = {}
    for mod, deps in graph.items():
        a = package_of(mod)
        out.setdefault(a, set()).update(b for b in map(package_of, deps) if b != a)
    return out


def test_no_import_cycle_between_packages():
    """The packages layer (each imports only those before it): util; targets, data, telemetry; drafters;
    config, deploy; supply; training; acceptance; then the commands, launcher/ and bench/. A cycle names
    the packages and the module imports that close it."""
    graph = import_graph()
    pkgs = package_graph(graph)
    assert {"modelopt_ext.drafters", "modelopt_ext.supply", "modelopt_ext.targets"} <= set(pkgs)
    found = cycles(pkgs)
    detail = []
    for comp in found:
        inside = set(comp)
        detail += sorted(
            f"{m} -> {d}" for m, deps in graph.items() for d in deps
            if package_of(m) in inside and package_of(d) in inside and package_of(m) != package_of(d)
        )  # fmt: skip
    assert not found, "package cycles: " + "; ".join(" <-> ".join(c) for c in found) + " via " + "; ".join(detail)


def test_the_package_cycle_finder_sees_a_lazy_import(tmp_path):
    pkg = tmp_path / "modelopt_ext"
    for sub in ("low", "high"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (tmp_path / "launcher").mkdir()
    (pkg / "high" / "a.py").write_text("from modelopt_ext.low.b import f\n")
    (pkg / "low" / "b.py").write_text("def f():\n    from modelopt_ext.high import a\n")
    assert cycles(package_graph(import_graph(tmp_path))) == [["modelopt_ext.high", "modelopt_ext.low"]]


def test_generic_code_imports_no_particular_drafter():
    """Drafters are plugins: outside drafters/ (and the developer benchmarks of one drafter in bench/), code
    reaches a drafter only through `modelopt_ext.drafters` (resolve_drafter, drafter_for_config)."""
    graph = import_graph()
    allowed = ("modelopt_ext.drafters.", "modelopt_ext.bench.")
    leaks = sorted(
        f"{mod} -> {dep}"
        for mod, deps in graph.items()
        if not mod.startswith(allowed)
        for dep in deps
        if dep.startswith("modelopt_ext.drafters.") and dep not in GENERIC_DRAFTER_MODULES
    )
    assert not leaks, "generic code imports a drafter directly: " + "; ".join(leaks)
