"""The GPU check as the lent GPU machine will run it (tests/gpu-check.sh, tests/gpu_check.py): the wheel bundle
holds what the check imports beyond the machine's image; each mode's parts fit its time, most important first,
each killed whole at its limit; every bench part is a bench that runs; the merge reports every part, also of a
run cut off; and, slow, a rehearsal on an environment like the image (CPython 3.12, torch 2.11, the image's
versions, the bundle installed offline) through the same script."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from filelock import FileLock

import gpu_bundle
import gpu_check as G
from hldx import bench as B
from hldx import config as C
from hldx import job
from hldx.budget import check_memory

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def derived() -> gpu_bundle.Derivation:
    """What the check needs, derived once (a fresh interpreter imports its entry points: seconds)."""
    return gpu_bundle.derive()


def test_the_bundle_holds_what_the_check_imports_beyond_the_image(derived):
    assert not derived.problems
    pinned, needed = set(gpu_bundle.pins()), set(derived.bundle)
    assert pinned == needed, (f"the GPU check imports what neither the GPU machine's image nor tests/gpu-bundle.txt "
                              f"holds ({sorted(needed - pinned)}), or no longer needs {sorted(pinned - needed)}: "
                              f"run `make gpu-bundle` and commit tests/gpu-bundle.txt")
    held = gpu_bundle.image()
    assert {"torch", "transformers", "tokenizers", "numpy"} <= {k for k, n in derived.needs.items()
                                                                 if n.source == "image"} <= set(held)
    assert not pinned & set(held)


def test_each_mode_fits_its_time_most_important_first():
    for mode, parts in G.PLANS.items():
        assert sum(p.limit_s for p in parts) <= G.LIMITS[mode], mode
        assert len({p.name for p in parts}) == len(parts)
    assert G.LIMITS["full"] <= 9 * 60 and G.LIMITS["quick"] <= 4 * 60
    full = [p.name for p in G.PLANS["full"]]
    assert full[:5] == ["install", "env", "tests", "bench-gemma3-123m-compile-false", "bench-gemma3-123m-compile-true"]
    assert G.PLANS["quick"] == G.PLANS["full"][:5]  # a first contact is the head of the whole check
    # Today's parts, all of them in the whole check: every GPU test, every bench.
    assert {"tests", "tests-compiled", "bench-loader", "bench-build", "bench-gemma3-3.4b-fsdp",
            "bench-gemma3-735m-compile-false", "bench-gemma3-123m-none", "bench-gemma3-123m-ddp"} <= set(full)


@pytest.mark.parametrize("part", [p for mode in ("full", "cpu") for p in G.PLANS[mode] if "hldx.bench" in p.args],
                         ids=lambda p: p.name)
def test_every_bench_part_is_a_bench_that_runs(hldx_cache, part):
    """Each bench part's overrides compose, pass the bench's and the job's checks, and (GPU parts) fit one
    80 GB GPU by the plan, as on the machine."""
    overrides = [a for a in part.args[2:] if not a.startswith("bench.json=")]
    cfg = C.compose(overrides)
    B.check(cfg)
    job.check(cfg, launch=False)
    if part in G.PLANS["full"]:
        check_memory(cfg, 1)


def test_a_part_past_its_limit_is_killed_whole(tmp_path):
    """The part and the process it started are killed at the limit; the next part runs."""
    pid_file = tmp_path / "child.pid"
    code = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
            f"time.sleep(60)']); open({str(pid_file)!r}, 'w').write(str(p.pid)); print('started', flush=True); "
            f"time.sleep(60)")
    start = time.monotonic()
    r = G.run_part(G.Part("slow", 2, ("-c", code), "sleeps"), sys.executable, tmp_path, str(tmp_path))
    assert r["status"] == "timed out at 2 s" and 2 <= time.monotonic() - start < 10 and "started" in r["log"]
    child = int(pid_file.read_text())
    for _ in range(50):  # the child is gone (reaped by init) within moments
        if not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the part's child {child} outlived its limit")
    r = G.run_part(G.Part("ok", 5, ("-c", "print('fine')"), "prints"), sys.executable, tmp_path, str(tmp_path))
    assert r["status"] == "passed" and r["log"] == "fine\n"


def test_the_merge_reports_every_part_even_of_a_run_cut_off(tmp_path):
    """Written while `tests-compiled` runs: the parts done with their outcomes, the one running, the rest not
    reached; the benches whole and the figures made of them."""
    nll, kd = 1000.0, 800.0
    (tmp_path / "bench-gemma3-123m-compile-false.json").write_text(json.dumps(
        {"step_s": {"nll": 1.0}, "tokens_per_s": {"nll": nll, "kd": kd}, "mfu": {"nll": 0.3}, "compile": False}))
    (tmp_path / "bench-loader.json").write_text(json.dumps({"tokens_per_s": {"loader_host_kd": 4 * kd,
                                                                             "loader_device_kd_sampled": 2 * kd}}))
    (tmp_path / "bench-gemma3-123m-compile-true.json").write_text('{"step_s": {"nl')  # killed while writing it
    (tmp_path / "tests.xml").write_text(
        '<testsuites><testsuite><testcase classname="tests.test_gpu" name="a"/><testcase classname="tests.test_gpu"'
        ' name="b"><failure message="x"/></testcase></testsuite></testsuites>')
    parts = {"install": {"status": "passed", "seconds": 1.0}, "env": {"status": "passed", "seconds": 2.0},
             "tests": {"status": "failed (exit status 1)", "seconds": 3.0},
             "bench-gemma3-123m-compile-false": {"status": "passed", "seconds": 4.0},
             "bench-gemma3-123m-compile-true": {"status": "timed out at 75 s", "seconds": 75.0},
             "tests-compiled": {"status": "running"}}
    merged = G.merge("full", parts, tmp_path)
    assert merged["failed"] == ["tests", "bench-gemma3-123m-compile-true"]
    assert list(merged["parts"]) == [p.name for p in G.PLANS["full"]] and merged["limit_s"] <= 540
    assert merged["parts"]["tests-compiled"]["status"] == "running"
    assert merged["parts"]["bench-loader"]["status"] == "not reached"
    assert merged["tests"] == {"tests.test_gpu::a": "passed", "tests.test_gpu::b": "failure"}
    assert set(merged["benches"]) == {"gemma3-123m-compile-false", "loader"}
    assert merged["students"]["gemma3-123m-compile-false"]["mfu"] == {"nll": 0.3}
    assert merged["loader_vs_student_123m"] == {"loader_host_kd": 4.0, "loader_device_kd_sampled": 2.0}
    G.write(tmp_path, merged)
    assert json.loads((tmp_path / G.RESULT).read_text()) == merged and "failed: tests" in G.summary(merged)


# The rehearsal: an environment like the GPU machine's image, built once into a cache folder outside the
# repository (its downloads are gigabytes: the package index's torch 2.11 for Linux x86-64 is a CUDA build, with
# CUDA's libraries, which it loads even on a CPU) and reused by later runs; the bundle, downloaded here,
# installed offline by the script itself.
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hldx"


def image_python() -> str:
    """CPython 3.12, the image's minor version, where this machine has one; else this interpreter's."""
    found = [*sorted(map(str, Path.home().glob(".pyenv/versions/3.12*/bin/python3.12"))), shutil.which("python3.12")]
    return next((p for p in found if p and subprocess.run([p, "-c", ""]).returncode == 0), sys.executable)


def image_like(python: str, needs: dict[str, gpu_bundle.Need]) -> Path:
    """A virtual environment of `python` holding the image's packages that the check needs, at the image's
    versions (torch 2.11, transformers 5.17, ...), their own requirements at the image's versions where known."""
    held = gpu_bundle.image()
    wanted = sorted(f"{n.name}=={n.version}" if n.version else n.name for n in needs.values() if n.source == "image")
    constraints = sorted(f"{name}=={v}" for name, v in held.items() if v)
    version = subprocess.run([python, "-c", "import platform; print(platform.python_version())"],
                             capture_output=True, text=True, check=True).stdout.strip()
    key = hashlib.sha256("\n".join([version, *wanted, *constraints]).encode()).hexdigest()[:16]
    venv = CACHE / f"gpu-image-{key}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with FileLock(str(venv) + ".lock"):
        if not (venv / "ready").exists():
            for old in CACHE.glob("gpu-image-*"):  # about 5 GB each: a new one replaces the others (and a torso)
                if old.is_dir():
                    shutil.rmtree(old, ignore_errors=True)
            subprocess.run([python, "-m", "venv", str(venv)], check=True)
            (venv / "constraints.txt").write_text("\n".join(constraints) + "\n")
            subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                            "-c", str(venv / "constraints.txt"), *wanted], check=True)
            (venv / "ready").write_text("\n".join(wanted) + "\n")
    return venv


@pytest.mark.slow
def test_the_check_runs_on_an_image_like_environment(tmp_path, derived):
    started = time.monotonic()
    python = image_python()
    venv = image_like(python, derived.needs)
    built = time.monotonic()
    bundle = tmp_path / "bundle"
    gpu_bundle.download(gpu_bundle.pins(), bundle)
    out, home, tmp = tmp_path / "out", tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HLDX", "VIRTUAL_ENV"))}
    env |= {"PY": str(venv / "bin" / "python"), "OUT": str(out), "GPU_BUNDLE": str(bundle), "HOME": str(home),
            "TMPDIR": str(tmp)}
    try:
        r = subprocess.run(["bash", "tests/gpu-check.sh", "cpu"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=G.LIMITS["cpu"] + 60)
        print(r.stdout[-3000:], r.stderr[-3000:])
        assert [p.name for p in out.iterdir()] == [G.RESULT]
        merged = json.loads((out / G.RESULT).read_text())
        print(json.dumps({k: v for k, v in merged.items() if k not in ("parts", "benches")}, indent=1))
        print(f"image-like environment: {time.monotonic() - started:.0f} s in all, {built - started:.0f} s to "
              f"find or build it")
        assert r.returncode == 0, merged["failed"]
        assert all(p["status"] == "passed" for p in merged["parts"].values())
        e = merged["env"]
        assert e["python"].startswith("3.12") or python == sys.executable
        assert e["packages"]["torch"].startswith("2.11") and e["packages"]["transformers"] == "5.17.0"
        assert {k: e["packages"][k] for k in ("hydra-core", "omegaconf")} == {
            k: v for k, v in gpu_bundle.pins().items() if k in ("hydra-core", "omegaconf")}
        assert not e["imports_failed"] and e["cuda"]["available"] is False
        # Every GPU test collected (their imports hold) and skipped, split between the eager and compiled parts.
        assert len(merged["tests"]) == 16 and set(merged["tests"].values()) == {"skipped"}
        assert "12 skipped, 4 deselected" in merged["parts"]["tests"]["log"]
        assert "4 skipped, 12 deselected" in merged["parts"]["tests-compiled"]["log"]
        tiny = merged["benches"]["tiny"]
        assert tiny["torch"].startswith("2.11") and set(tiny["step_s"]) == {"nll", "kd", "hldc", "ht"}
        assert {"loader_host_kd", "loader_device_kd_sampled", "loader_host_hldc_sr2", "loader_device_ht_float8_e4m3",
                "build"} <= set(tiny["tokens_per_s"])
        assert not list(home.iterdir()) and not list(tmp.iterdir())  # nothing written outside the tree and $OUT
    finally:
        shutil.rmtree(ROOT / ".hldx" / "gpu-check", ignore_errors=True)
