"""The wheel bundle that the GPU check (tests/gpu-check.sh) takes to the lent GPU machine: what the check imports
that the machine's image (tests/gpu-image.txt) does not hold. Derived, never hand-kept:

    .venv/bin/python tests/gpu_bundle.py          # derive it; (re)write tests/gpu-bundle.txt, its pins
    .venv/bin/python tests/gpu_bundle.py DIR      # ... and download its wheels into DIR (make gpu-bundle: .gpu-bundle)

What the check imports: a fresh interpreter imports the check's entry points (tests/gpu_check.py: hldx.bench, and
the GPU tests through pytest's collection) and records every module that code of this repository imports. Each
maps to the distribution installed here that provides it, and each distribution's requirements (for the image's
CPython 3.12 on Linux x86-64) are followed until they reach one the image holds. What the image lacks is the
bundle, at the versions installed here (the ones hldx is tested with): binary wheels for cp312 manylinux x86-64,
or, for a pure-Python package published as source alone, a py3-none-any wheel built here. A requirement that the
image's version of a package does not meet (where tests/gpu-image.txt knows that version) is an error.
tests/test_gpu_check.py fails when the check imports what neither the image nor tests/gpu-bundle.txt holds.
"""
from __future__ import annotations

import builtins
import importlib
import importlib.metadata as md
import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
IMAGE = ROOT / "tests" / "gpu-image.txt"
PINS = ROOT / "tests" / "gpu-bundle.txt"
FIRST_PARTY = ("hldx", "analysis", "hydra_plugins")
# The image's interpreter, for requirement markers and wheel tags.
PYTHON = "3.12"
MARKERS = {"implementation_name": "cpython", "platform_python_implementation": "CPython", "os_name": "posix",
           "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
           "python_version": PYTHON, "python_full_version": "3.12.3", "implementation_version": "3.12.3",
           "extra": ""}
PLATFORMS = ["manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64",
             *(f"manylinux_2_{n}_x86_64" for n in range(5, 40))]


def normal(name: str) -> str:
    """A distribution's name as the package index compares names (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def image() -> dict[str, str | None]:
    """The image's distributions: normal name -> version (None where tests/gpu-image.txt does not know it)."""
    lines = [line.split("#")[0].strip() for line in IMAGE.read_text().splitlines()]
    return {normal(n): (v or None) for n, _, v in (line.partition("==") for line in lines if line)}


def pins(path: Path = PINS) -> dict[str, str]:
    """The bundle's pins as tests/gpu-bundle.txt holds them: normal name -> version."""
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return {normal(n): v for n, _, v in (line.partition("==") for line in lines if line)}


def _record(out: str) -> None:
    """In a fresh interpreter: import the check's entry points, and write (as JSON) each top-level module that
    code of this repository imports, with the modules that import it."""
    prefix, seen = Path(sys.prefix).resolve(), {}
    real = builtins.__import__

    def ours(path: str | None) -> bool:
        p = Path(path).resolve() if path else None
        return bool(p) and p.is_relative_to(ROOT) and not p.is_relative_to(prefix)

    def spy(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and globals and ours(globals.get("__file__")):
            seen.setdefault(name.partition(".")[0], set()).add(globals.get("__name__"))
        return real(name, globals, locals, fromlist, level)

    builtins.__import__ = spy
    sys.path.insert(0, str(ROOT / "tests"))
    import gpu_check  # noqa: F401 - the runner's own imports count too
    import pytest

    for module in gpu_check.ENTRY_MODULES:
        importlib.import_module(module)
    if pytest.main(["--collect-only", "-qq", "-p", "no:cacheprovider", "--rootdir", str(ROOT),
                    str(ROOT / gpu_check.GPU_TESTS)]) != 0:
        raise SystemExit("the GPU tests could not be collected")
    builtins.__import__ = real
    third = {m: sorted(by) for m, by in seen.items() if m not in sys.stdlib_module_names and not any(
        ours(p) for p in [getattr(sys.modules.get(m), "__file__", None),
                          *getattr(sys.modules.get(m), "__path__", [])])}
    Path(out).write_text(json.dumps(third))


def imported() -> dict[str, list[str]]:
    """Top-level third-party module -> the modules of this repository that import it, when the check's entry
    points are imported (in a fresh interpreter, this one's)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "imported.json"
        subprocess.run([sys.executable, __file__, "--record", str(out)], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


@dataclass(frozen=True)
class Need:
    name: str            # the distribution's name as installed here
    version: str | None  # the image's (where known) or, for the bundle, the one installed here
    source: str          # "image" or "bundle"
    why: str             # who imports or requires it


@dataclass(frozen=True)
class Derivation:
    needs: dict[str, Need]   # normal name -> what the check needs
    problems: list[str]      # requirements the image's versions do not meet; imports no distribution provides

    @property
    def bundle(self) -> dict[str, str]:
        return {k: n.version for k, n in sorted(self.needs.items()) if n.source == "bundle"}


def derive(modules: dict[str, list[str]] | None = None) -> Derivation:
    """What the check needs (imported() and the requirements of what it imports, down to the image), and what
    does not fit."""
    modules = imported() if modules is None else modules
    held, provides, problems = image(), md.packages_distributions(), []
    needs: dict[str, Need] = {}
    todo: list[tuple[str, str]] = []
    for module, by in sorted(modules.items()):
        if module not in provides:
            problems.append(f"{module} (imported by {', '.join(by)}) is provided by no installed distribution")
        todo += [(dist, f"{by[0]} imports {module}") for dist in provides.get(module, [])]
    requirers = [("hldx", r) for r in md.requires("hldx") or []]  # hldx's own, on what it turns out to need
    while todo:
        dist, why = todo.pop(0)
        key = normal(dist)
        if key in needs:
            continue
        if key in held:
            needs[key] = Need(dist, held[key], "image", why)
            continue
        try:
            version, requires = md.version(dist), md.requires(dist) or []
        except md.PackageNotFoundError:
            problems.append(f"{dist} ({why}) is not installed here: cannot pin it")
            continue
        needs[key] = Need(dist, version, "bundle", why)
        for text in requires:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate(MARKERS):
                requirers.append((dist, text))
                todo.append((req.name, f"{dist} requires {text}"))
    for who, text in requirers:
        req = Requirement(text)
        need = needs.get(normal(req.name))
        if need and need.source == "image" and need.version and (req.marker is None or req.marker.evaluate(MARKERS)) \
                and not req.specifier.contains(need.version, prereleases=True):
            problems.append(f"{who} requires {text}, and the image has {need.name} {need.version}")
    return Derivation(needs, problems)


def write_pins(bundle: dict[str, str], path: Path = PINS) -> None:
    head = ("# The GPU check's wheel bundle: what it imports beyond the GPU machine's image (tests/gpu-image.txt).\n"
            "# Written by tests/gpu_bundle.py (make gpu-bundle), derived from the check's imports: do not edit.\n")
    path.write_text(head + "".join(f"{name}=={version}\n" for name, version in bundle.items()))


def download(bundle: dict[str, str], into: Path) -> list[Path]:
    """Each pinned distribution's wheel for the image (cp312, manylinux x86-64, binary only) into `into`,
    emptied of wheels first; one the package index has as source alone is built here, and must be pure Python."""
    into.mkdir(parents=True, exist_ok=True)
    for old in into.glob("*.whl"):
        old.unlink()
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    tags = ["--python-version", PYTHON, "--implementation", "cp", "--abi", "cp312", "--abi", "abi3",
            "--abi", "none", *(a for p in PLATFORMS for a in ("--platform", p))]
    for name, version in bundle.items():
        spec = f"{name}=={version}"
        got = subprocess.run(pip + ["download", "--no-deps", "--only-binary=:all:", *tags, "-d", str(into), spec],
                             capture_output=True, text=True)
        if got.returncode:
            with tempfile.TemporaryDirectory() as tmp:  # no wheel for the image: a pure-Python one built here
                subprocess.run(pip + ["wheel", "--no-deps", "-w", tmp, spec], check=True)
                (wheel,) = Path(tmp).glob("*.whl")
                if not wheel.name.endswith("-none-any.whl"):
                    raise SystemExit(f"{spec}: no wheel for CPython {PYTHON} manylinux x86-64, and the one built "
                                     f"here is not pure Python ({wheel.name})\n{got.stderr}")
                shutil.move(wheel, into / wheel.name)
    return sorted(into.glob("*.whl"))


def travelling_bytes(extra: Path) -> int:
    """What the device call carries: the tracked and untracked-not-ignored files, and `extra`."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    files = [ROOT / f for f in listed if f and (ROOT / f).is_file()]
    return sum(f.stat().st_size for f in files) + sum(f.stat().st_size for f in extra.rglob("*") if f.is_file())


def main(argv: list[str]) -> int:
    if argv[:1] == ["--record"]:
        _record(argv[1])
        return 0
    derived = derive()
    for key, need in sorted(derived.needs.items(), key=lambda kv: (kv[1].source, kv[0])):
        print(f"{need.source:6} {need.name}=={need.version or '?'}  ({need.why})")
    if derived.problems:
        print("\n".join(["cannot make the bundle:", *derived.problems]), file=sys.stderr)
        return 1
    if not PINS.exists() or pins() != derived.bundle:
        write_pins(derived.bundle)
        print(f"wrote {PINS.relative_to(ROOT)}: commit it")
    if argv:
        into = Path(argv[0])
        wheels = download(derived.bundle, into)
        size = travelling_bytes(into)
        print("\n".join(f"{w.stat().st_size / 2**10:9.0f} KiB  {w.name}" for w in wheels))
        print(f"bundle {sum(w.stat().st_size for w in wheels) / 2**20:.2f} MiB; with the working tree, "
              f"{size / 2**20:.1f} MiB travel (at most 60)")
        if size >= 60 * 2**20:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
