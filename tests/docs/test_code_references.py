"""Every place that names project code in text still names something that exists.

Docs, job specs (their inline scripts included), recipes, bash scripts and Python strings mention modules as
`python -m modelopt_ext.X`, `from modelopt_ext.X import Y` or as a dotted path; a module that moved leaves
such a reference behind, and only a job that runs it would notice. Modules are looked up without being run
(importlib.util.find_spec); names after `import` are looked up in the module's source with `ast`.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SUFFIXES = ("*.md", "*.yaml", "*.yml", "*.sh", "*.toml", "*.jinja", "*.py")
FROM_IMPORT = re.compile(r"from (modelopt_ext(?:\.\w+)*) import ([\w, ]+)")
DOTTED = re.compile(r"\b(modelopt_ext(?:\.\w+)+)")
# Dotted names that are not code: the offline dump's format id and the target server's logger name.
NOT_CODE = {"modelopt_ext.offline", "modelopt_ext.supply.target_server.http"}


# Files that name made-up modules on purpose (planted-cycle fixtures).
PLANTED = {"tests/layout/test_import_cycles.py", "tests/docs/test_code_references.py"}


def _files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", *SUFFIXES], cwd=REPO, capture_output=True, text=True, check=True)
    return [REPO / f for f in out.stdout.split() if f not in PLANTED]


def _module_file(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    return Path(spec.origin) if spec and spec.origin else None


def _defines(module_file: Path, name: str) -> bool:
    if module_file.name == "__init__.py" and (module_file.parent / f"{name}.py").exists():
        return True
    if module_file.name == "__init__.py" and (module_file.parent / name / "__init__.py").exists():
        return True
    tree = ast.parse(module_file.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return True
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [e for t in targets for e in (t.elts if isinstance(t, ast.Tuple) else [t])]
            if any(isinstance(t, ast.Name) and t.id == name for t in names):
                return True
        if isinstance(node, (ast.Import, ast.ImportFrom)) and any(
            (a.asname or a.name.split(".")[0]) == name for a in node.names
        ):
            return True
    return False


def _resolves(dotted: str) -> bool:
    """A module, or an attribute defined in the longest module prefix (e.g. a function's dotted path)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        found = _module_file(".".join(parts[:cut]))
        if found is not None:
            rest = parts[cut:]
            return not rest or (found.suffix == ".py" and _defines(found, rest[0]))
    return False


def test_every_reference_to_project_code_outside_python_resolves():
    bad = []
    for path in _files():
        text = path.read_text(errors="replace")
        rel = path.relative_to(REPO)
        for line_no, line in enumerate(text.splitlines(), 1):
            for module, names in FROM_IMPORT.findall(line):
                target = _module_file(module)
                if target is None:
                    bad.append(f"{rel}:{line_no}: no module {module}")
                    continue
                for name in filter(None, (n.split(" as ")[0].strip() for n in names.split(","))):
                    if not _defines(target, name):
                        bad.append(f"{rel}:{line_no}: {module} defines no {name}")
            for dotted in DOTTED.findall(line):
                if dotted not in NOT_CODE and not _resolves(dotted):
                    bad.append(f"{rel}:{line_no}: {dotted} names nothing")
    assert not bad, "stale references to project code:\n" + "\n".join(sorted(set(bad)))


def test_the_checker_sees_a_stale_reference():
    assert _resolves("modelopt_ext.targets.head.TargetHead")
    assert _resolves("modelopt_ext.supply.vllm.connector")  # found without importing vLLM
    assert not _resolves("modelopt_ext.supply.target_head")
    assert not _resolves("modelopt_ext.targets.head.NoSuchThing")
