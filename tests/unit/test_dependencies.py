"""The demo installs only runtime dependencies, and the code runs on them alone.

``./scripts/demo`` syncs without the dev group (pytest, moto and its server's dependencies) and
``./scripts/test`` adds it back; everything ``shared/``, ``worker/``, ``training/`` and ``demo/``
import must then come from ``[project].dependencies`` (or what they pull in), never the dev group.
"""

from __future__ import annotations

import ast
import re
import shlex
import sys
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUNTIME_PACKAGES = ("shared", "worker", "training", "demo")
PROJECT = "stilltag"


def uv_commands(script: str) -> list[list[str]]:
    """The ``uv ...`` commands a shell script runs (comments left out), as argument lists."""
    commands = []
    for line in (ROOT / "scripts" / script).read_text().splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["exec"]:
            words = words[1:]
        if words[:1] == ["uv"]:
            commands.append(words)
    return commands


def test_demo_installs_runtime_dependencies_only():
    commands = uv_commands("demo")
    syncs = [c for c in commands if c[1] == "sync"]
    runs = [c for c in commands if c[1] == "run"]
    assert syncs and all("--no-dev" in c for c in syncs), syncs
    # Without --no-sync (or --no-dev) `uv run` would sync the default groups again, dev included.
    assert runs and all("--no-sync" in c or "--no-dev" in c for c in runs), runs


def test_tests_install_the_dev_group():
    commands = uv_commands("test")
    syncs = [c for c in commands if c[1] == "sync"]
    assert syncs and all("--no-dev" not in c and "--no-default-groups" not in c for c in syncs), syncs
    assert any("--group" in c and c[c.index("--group") + 1] == "dev" for c in syncs), syncs
    assert all("--no-sync" in c for c in commands if c[1] == "run")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_distributions() -> set[str]:
    """What ``uv sync --no-dev`` installs: the project's dependencies in uv.lock, with their extras,
    transitively."""
    packages = {normalize(p["name"]): p for p in tomllib.loads((ROOT / "uv.lock").read_text())["package"]}
    seen: set[str] = set()
    todo = [{"name": PROJECT}]
    while todo:
        dep = todo.pop()
        name = normalize(dep["name"])
        package = packages[name]
        new_extras = [e for e in dep.get("extra", []) if (name, e) not in seen]
        if name in seen and not new_extras:
            continue
        seen.add(name)
        todo.extend(package.get("dependencies", []))
        for extra in new_extras:
            seen.add((name, extra))
            todo.extend(package.get("optional-dependencies", {}).get(extra, []))
    return {s for s in seen if isinstance(s, str)}


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imported_top_level_modules() -> dict[str, set[str]]:
    """Third-party top-level modules imported anywhere in the runtime packages (at module level or
    inside functions), with the files importing each; ``if TYPE_CHECKING:`` imports left out."""
    own = set(RUNTIME_PACKAGES)
    found: dict[str, set[str]] = {}
    for package in RUNTIME_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                if _type_checking_only(node, parents):
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in own and top != "__future__":
                        found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_runtime_code_imports_only_runtime_dependencies():
    runtime = runtime_distributions()
    assert "pytest" not in runtime and "moto" not in runtime  # the dev group stays out
    providers = metadata.packages_distributions()
    imports = imported_top_level_modules()
    assert {"torch", "fastai", "celery", "sqlalchemy"} <= imports.keys()  # the walk sees lazy imports too
    wrong = {}
    for module, files in sorted(imports.items()):
        dists = {normalize(d) for d in providers.get(module, [])}
        if not dists & runtime:
            wrong[module] = (sorted(dists) or "no installed distribution", sorted(files))
    assert not wrong, f"imported by runtime code but not a runtime dependency (add it to [project].dependencies): {wrong}"
