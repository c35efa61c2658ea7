"""The layer contract (pyproject.toml, [tool.importlinter]): imports go one way.

stilltag (the command line) -> bench -> demo -> worker | training -> shared. Function-level
imports count too. Breaking it once showed, e.g., "shared is not allowed to import worker:
shared.runtime -> worker.service".
"""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_imports_go_one_way():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert lint, "import-linter is not installed: run ./scripts/test (it installs the dev tools)"
    done = subprocess.run([lint], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "1 kept, 0 broken" in done.stdout


def test_the_contract_names_every_top_level_package():
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert set(config["tool"]["importlinter"]["root_packages"]) == packages
    assert set(config["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]) == packages
