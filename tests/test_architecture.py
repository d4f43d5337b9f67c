"""The architecture is enforced, not described: import-linter's contracts (pyproject.toml) hold, they fail on
an upward import, the import graph has no cycle at all, and no module outgrows a sitting's reading."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("hldx", "analysis", "hydra_plugins")
OURS = ("hldx", "analysis", "hydra_plugins.hldx_sweeper")  # hydra_plugins also holds the Hydra plugins installed
LINT = str(Path(sys.executable).with_name("lint-imports"))
MAX_LINES = 400


def test_the_layer_contracts_hold():
    done = subprocess.run([LINT], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "0 broken" in done.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    """A copy of the tree where the foundation imports an entry point: lint-imports fails and names it."""
    for name in PACKAGES:
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("corpus", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    config = tmp_path / "hldx" / "config.py"
    config.write_text(config.read_text() + "\nfrom hldx import run  # noqa: E402 - the upward import\n")
    done = subprocess.run([LINT, "--no-cache"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(tmp_path)})
    assert done.returncode == 1, done.stdout[-3000:]
    assert "hldx.config -> hldx.run" in done.stdout and "BROKEN" in done.stdout


def test_no_import_cycle_at_all():
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    ours = [m for m in graph.modules if any(m == p or m.startswith(p + ".") for p in OURS)]
    cycles = [(a, b) for a in ours for b in graph.find_modules_directly_imported_by(a)
              if graph.chain_exists(importer=b, imported=a)]
    assert cycles == []
    assert len(ours) > 30  # the graph holds the whole tree


def test_no_module_is_longer_than_a_sitting():
    lengths = {str(p.relative_to(ROOT)): len(p.read_text().splitlines())
               for name in PACKAGES for p in (ROOT / name).rglob("*.py")}
    assert len(lengths) > 30
    assert {p: n for p, n in lengths.items() if n > MAX_LINES} == {}
