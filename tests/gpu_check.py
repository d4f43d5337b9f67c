"""The GPU check's parts, in order of importance, each under a time limit, and their results merged into one
JSON after every part (tests/gpu-check.sh runs this with the machine's python3; the standard library only, since
it runs before the wheel bundle is installed).

    python3 tests/gpu_check.py [full|quick|cpu]     # the parts of a mode, in order (tests/gpu-check.sh)
    python3 tests/gpu_check.py env FILE             # one part: what this interpreter has and sees, as JSON

Modes: `full` (every part, at most 9 minutes with its limits summed), `quick` (the parts that matter most, at
most 4: a first contact), `cpu` (what a CPU can run of it, through the same steps: the rehearsal on an
image-like environment, tests/test_gpu_check.py). A part that fails or runs out of time is recorded and the next
one runs; $OUT/gpu-check.json is rewritten after each part (and names the part running), so a run cut off at
any point still reports what it measured. Exit status 1 if any part failed or timed out.

The 123M and 735M benches run the paper's micro-batch (32 x 512 tokens, train=paper) four times a step
(train.batch_size=128, not the paper's 16: their random teacher cache is built on the CPU, and the paper's 512
rows would cost more of the lease than the steps).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GPU_TESTS = "tests/test_gpu.py"
ENTRY_MODULES = ("hldx.bench",)  # what the parts run besides the GPU tests (python -m hldx.bench)
RESULT = "gpu-check.json"
LOG_CHARS = 60_000  # of each part's log kept in the JSON (its end)
LIMITS = {"full": 540, "quick": 240, "cpu": 300}  # seconds: no mode's parts may add up to more


@dataclass(frozen=True)
class Part:
    name: str
    limit_s: int
    args: tuple[str, ...]  # after the interpreter; {work}, {name} and {bundle} are filled in when it runs
    what: str


def _tests(name: str, limit_s: int, select: str, what: str) -> Part:
    return Part(name, limit_s, ("-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "-m", "gpu", GPU_TESTS,
                                "-k", select, "--junitxml={work}/{name}.xml"), what)


def _bench(name: str, limit_s: int, what: str, *overrides: str) -> Part:
    return Part(name, limit_s, ("-m", "hldx.bench", *overrides, "bench.json={work}/{name}.json"), what)


PAPER = ("teacher=gemma3-3.4b", "train=paper", "bench.warmup=2", "bench.steps=3")
STUDENT = (*PAPER, "train.batch_size=128", "bench.methods=[nll,kd,hldc,ht]")  # 4 micro-batches of 32 x 512
INSTALL = Part("install", 15, ("-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                               "--no-cache-dir", "--target", "{work}/site", "--find-links", "{bundle}",
                               "-r", "tests/gpu-bundle.txt"),
               "the wheel bundle, offline, into a folder of the working tree (PYTHONPATH)")
ENV = Part("env", 20, ("tests/gpu_check.py", "env", "{work}/env.json"),
           "the interpreter, its packages, the GPU and driver; hldx's entry points and GPU tests import")
TESTS = _tests("tests", 85, "not compiled", "the GPU tests but the compiled steps")
BENCH_123M = _bench("bench-gemma3-123m-compile-false", 45, "NLL, KD, HLDC, HT (HLDF phase 1) of the 123M student: "
                    "tokens/s, MFU, peak memory against the plan", "student=gemma3-123m", *STUDENT,
                    "train.compile=false")
BENCH_123M_COMPILED = _bench("bench-gemma3-123m-compile-true", 75, "the same, torch.compile on",
                             "student=gemma3-123m", *STUDENT, "train.compile=true")
TESTS_COMPILED = _tests("tests-compiled", 60, "compiled", "the GPU tests of the compiled steps")
PLANS: dict[str, tuple[Part, ...]] = {
    "quick": (INSTALL, ENV, TESTS, BENCH_123M, BENCH_123M_COMPILED),
    "full": (
        INSTALL, ENV, TESTS, BENCH_123M, BENCH_123M_COMPILED,
        TESTS_COMPILED,
        _bench("bench-gemma3-735m-compile-false", 50, "the 735M student's steps", "student=gemma3-735m", *STUDENT,
               "train.compile=false"),
        _bench("bench-loader", 40, "the loader's host and device sides, top-k and sampled logits, bfloat16 / "
               "float8 / sr2 hidden states, 128 rows",
               "student=gemma3-123m", *PAPER, "train.batch_size=128", "bench.methods=[loader]"),
        _bench("bench-build", 50, "the teacher cache's build against the 3.4B teacher's forward",
               "student=gemma3-123m", *PAPER, "bench.methods=[build]"),
        _bench("bench-gemma3-3.4b-fsdp", 50, "the 3.4B teacher's NLL step under FSDP2 (4 micro-batches of 2)",
               "student=gemma3-3.4b", "method=nll", *PAPER, "train.batch_size=8", "train.micro_batch_size=2",
               "train.parallel=fsdp", "bench.methods=[nll]"),
        *(_bench(f"bench-gemma3-123m-{p}", 20, f"the 123M NLL step, train.parallel={p} on one rank",
                 "student=gemma3-123m", *PAPER, "train.batch_size=64", f"train.parallel={p}", "bench.methods=[nll]")
          for p in ("none", "ddp")),
    ),
    "cpu": (  # the same parts, at a CPU's limits; the GPU tests collected (their imports hold) and skipped
        replace(INSTALL, limit_s=30), replace(ENV, limit_s=45), replace(TESTS, limit_s=45),
        replace(TESTS_COMPILED, limit_s=45),
        _bench("bench-tiny", 135, "every step, the loader and the build on the tiny shapes", "train.seq_len=32",
               "train.batch_size=4", "data.max_train_tokens=32768", "bench.warmup=1", "bench.steps=2",
               "cache.batch_rows=4", "bench.methods=[nll,kd,hldc,ht,loader,build]"),
    ),
}


def run_part(part: Part, py: str, work: Path, bundle: str) -> dict:
    """Run one part in a process group of its own, killed whole at its limit; its outcome and log."""
    args = [a.format(work=work, name=part.name, bundle=bundle) for a in part.args]
    log = work / f"{part.name}.log"
    start = time.monotonic()
    if part.name == INSTALL.name and not Path(bundle).is_dir():
        return {"status": "skipped", "seconds": 0.0, "limit_s": part.limit_s, "what": part.what,
                "log": f"no wheel bundle at {bundle}: the parts use what {py} has"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([py, *args], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=part.limit_s)
            status = "passed" if code == 0 else f"failed (exit status {code})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = f"timed out at {part.limit_s} s"
    text = log.read_text(errors="replace")
    return {"status": status, "seconds": round(time.monotonic() - start, 1), "limit_s": part.limit_s,
            "what": part.what, "command": " ".join([py, *args]), "log": text[-LOG_CHARS:]}


def _failed(part: dict) -> bool:
    return part["status"].startswith(("failed", "timed out"))


def merge(mode: str, parts: dict[str, dict], work: Path) -> dict:
    """Every part's outcome, the GPU tests' outcomes, every bench.json whole, and the figures made of them."""
    plan = PLANS[mode]
    merged: dict = {"mode": mode, "failed": [n for n, p in parts.items() if _failed(p)],
                    "plan": {p.name: p.limit_s for p in plan}, "limit_s": sum(p.limit_s for p in plan),
                    "parts": {p.name: parts.get(p.name, {"status": "not reached", "limit_s": p.limit_s,
                                                         "what": p.what}) for p in plan}}
    if (work / "env.json").is_file():
        merged["env"] = json.loads((work / "env.json").read_text())
    merged["tests"] = {}
    for xml in sorted(work.glob("tests*.xml")):
        try:
            cases = ET.parse(xml).getroot().iter("testcase")
        except ET.ParseError:  # cut off while writing it
            continue
        merged["tests"] |= {f"{c.get('classname')}::{c.get('name')}": next(
            (child.tag for child in c if child.tag in ("failure", "error", "skipped")), "passed") for c in cases}
    benches = {}
    for p in sorted(work.glob("bench-*.json")):
        try:
            benches[p.stem.removeprefix("bench-")] = json.loads(p.read_text())
        except ValueError:
            continue
    merged["students"] = {name: {k: b.get(k) for k in ("tokens_per_s", "mfu", "peak_mem_gib", "plan_mem_gib",
                                                        "micro_batch_size", "batch_size", "compile")}
                          for name, b in benches.items() if "step_s" in b}
    loader = benches.get("loader", {})
    student = benches.get("gemma3-123m-compile-true") or benches.get("gemma3-123m-compile-false", {})
    merged["loader_vs_student_123m"] = {k: v / student["tokens_per_s"][m]
                                        for k, v in loader.get("tokens_per_s", {}).items()
                                        if (m := k.split("_")[2]) in student.get("tokens_per_s", {})}
    if build := benches.get("build"):
        merged["build"] = {"tokens_per_s": build["tokens_per_s"].get("build"),
                           "forward_tokens_per_s": build["tokens_per_s"].get("build_forward"),
                           "ratio_build_forward": build["ratio"].get("build_forward")}
    if "gemma3-123m-none" in benches and "gemma3-123m-ddp" in benches:
        none, ddp = (benches[f"gemma3-123m-{m}"]["tokens_per_s"]["nll"] for m in ("none", "ddp"))
        merged["ratio_ddp1_none_123m"] = ddp / none
    merged["benches"] = benches
    return merged


def write(out: Path, merged: dict) -> None:
    """$OUT/gpu-check.json, replaced whole (a reader never sees half of it)."""
    tmp = out / f".{RESULT}.tmp"
    tmp.write_text(json.dumps(merged, indent=2) + "\n")
    os.replace(tmp, out / RESULT)


def check(mode: str, py: str, work: Path, out: Path, bundle: str) -> int:
    parts: dict[str, dict] = {}
    for part in PLANS[mode]:
        print(f"== {part.name} (at most {part.limit_s} s): {part.what}", flush=True)
        parts[part.name] = {"status": "running", "limit_s": part.limit_s, "what": part.what}
        write(out, merge(mode, parts, work))
        parts[part.name] = run_part(part, py, work, bundle)
        done = parts[part.name]
        print(f"   {done['status']} in {done['seconds']} s", flush=True)
        if _failed(done):  # the end of its log here too: what the device's reply shows
            print("\n".join("   | " + line for line in done["log"].splitlines()[-8:]), flush=True)
        write(out, merge(mode, parts, work))
    merged = merge(mode, parts, work)
    print(summary(merged))
    return 1 if merged["failed"] else 0


def summary(merged: dict) -> str:
    """The short table printed last: each part, each student's tokens/s and MFU, the derived ratios."""
    lines = [f"gpu-check {merged['mode']}: " + ", ".join(
        f"{n} {p['status']}" + (f" {p['seconds']} s" if "seconds" in p else "") for n, p in merged["parts"].items())]
    for name, s in merged["students"].items():
        mfu = s.get("mfu") or {}
        lines.append(f"  {name}: " + ", ".join(f"{m} {tps:,.0f} tok/s" + (f" MFU {mfu[m]:.1%}" if m in mfu else "")
                                               for m, tps in (s.get("tokens_per_s") or {}).items()))
    for key in ("loader_vs_student_123m", "build", "ratio_ddp1_none_123m"):
        if merged.get(key):
            lines.append(f"  {key}: {json.dumps(merged[key])}")
    tests = merged.get("tests", {})
    if tests:
        counts = {o: sum(v == o for v in tests.values()) for o in sorted(set(tests.values()))}
        lines.append("  tests: " + ", ".join(f"{n} {o}" for o, n in counts.items()))
    lines.append(f"  failed: {', '.join(merged['failed']) or 'nothing'}")
    return "\n".join(lines)


def env(path: str) -> int:
    """Write what this interpreter has and sees as JSON to `path`; exit 1 if hldx's entry points or the GPU
    tests cannot be imported."""
    import importlib
    import importlib.metadata as md
    import platform

    info: dict = {"python": platform.python_version(), "executable": sys.executable, "packages": {}}
    for dist in ("torch", "triton", "transformers", "tokenizers", "safetensors", "accelerate", "numpy",
                 "hydra-core", "omegaconf", "antlr4-python3-runtime", "pyyaml", "xxhash", "filelock", "pytest"):
        try:
            info["packages"][dist] = md.version(dist)
        except md.PackageNotFoundError:
            info["packages"][dist] = None
    failed = []
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # as `python -m` and pytest see them, from the tree's root
    for module in (*ENTRY_MODULES, Path(GPU_TESTS).stem):
        try:
            importlib.import_module(module)
        except Exception as err:  # noqa: BLE001 - every import problem is reported, not raised
            failed.append(f"{module}: {type(err).__name__}: {err}")
    info["imports_failed"] = failed
    import torch

    info["cuda"] = {"available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda,
                    "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["cuda"] |= {"device": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": p.total_memory / 2**30,
                         "multiprocessors": p.multi_processor_count}
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True) if shutil.which("nvidia-smi") else None
    info["nvidia_smi"] = smi.stdout.strip() if smi else None
    pip = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    info["pip_check"] = (pip.stdout + pip.stderr).strip().splitlines()
    Path(path).write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    mode = argv[0] if argv else "full"
    if mode == "env":
        return env(argv[1])
    if mode not in PLANS:
        print(f"mode={mode} is invalid: expected one of {[*PLANS, 'env']}", file=sys.stderr)
        return 2
    py, work, out = sys.executable, Path(os.environ["GPU_CHECK_WORK"]), Path(os.environ["OUT"])
    return check(mode, py, work, out, os.environ.get("GPU_BUNDLE", ".gpu-bundle"))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
