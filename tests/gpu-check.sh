#!/usr/bin/env bash
# `make gpu-check`: on one CUDA GPU, every figure the GPU can give in one go (about 10 minutes on an H100/H200,
# offline once installed). Each part runs whatever became of the ones before it; the exit status is 1 if any
# part failed, and gpu-check.json says which.
#   tests   the GPU tests (tests/test_gpu.py and any other `-m gpu` test: bf16 against fp32, no host sync in the
#           hot loop, flash/cuDNN attention, the loader's overlap, FSDP2 against one process, DCP resume with
#           fused AdamW, the paper students' peak memory against the plan, the NaN guard)
#   bench   NLL, KD, HLDC and HLDF phase 1 (HT) at the paper's step (512 x 512 tokens in micro-batches of 32,
#           train=paper, what the plan checks fits) for the 123M and 735M students, torch.compile off and on;
#           the loader on the device (copies and decoding included); the teacher cache's build against the
#           teacher's forward; the 3.4B teacher's NLL step under FSDP2; DDP on one rank against no wrapper
# Every bench.json and the tests' report land in reports/gpu-check/ (OUT=DIR), merged into gpu-check.json.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-reports/gpu-check}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
FAILED=()
part() {  # part NAME SECONDS COMMAND...: run it under a time limit, log it, remember a failure
  local name=$1 limit=$2; shift 2
  echo "== $name"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1 || { echo "   FAILED (status $?): $OUT/$name.log"; FAILED+=("$name"); }
  tail -n 3 "$OUT/$name.log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1 || FAILED+=(nvidia-smi)
cat "$OUT/gpu.csv"
part tests 240 "$PY" -m pytest -q -rA -m gpu tests/ -p no:cacheprovider --junitxml="$OUT/tests.xml"
PAPER=(teacher=gemma3-3.4b train=paper bench.warmup=2 bench.steps=3)
for student in gemma3-123m gemma3-735m; do
  for compile in false true; do
    part "bench-$student-compile-$compile" 150 "$PY" -m hldx.bench student=$student "${PAPER[@]}" \
      train.compile=$compile bench.methods=[nll,kd,hldc,ht] bench.json="$OUT/bench-$student-compile-$compile.json"
  done
done
part bench-loader 120 "$PY" -m hldx.bench student=gemma3-123m "${PAPER[@]}" bench.methods=[loader] \
  bench.json="$OUT/bench-loader.json"
part bench-build 150 "$PY" -m hldx.bench student=gemma3-123m "${PAPER[@]}" bench.methods=[build] \
  bench.json="$OUT/bench-build.json"
part bench-gemma3-3.4b-fsdp 150 "$PY" -m hldx.bench student=gemma3-3.4b method=nll "${PAPER[@]}" train.batch_size=16 \
  train.micro_batch_size=8 train.parallel=fsdp bench.methods=[nll] bench.json="$OUT/bench-gemma3-3.4b-fsdp.json"
for parallel in none ddp; do  # DDP on one rank against no wrapper: what the engine itself costs
  part "bench-gemma3-123m-$parallel" 90 "$PY" -m hldx.bench student=gemma3-123m "${PAPER[@]}" train.batch_size=64 \
    train.parallel=$parallel bench.methods=[nll] bench.json="$OUT/bench-gemma3-123m-$parallel.json"
done
"$PY" - "$OUT" "${FAILED[@]}" <<'PY'
import json, sys
import xml.etree.ElementTree as ET
from pathlib import Path
out, failed = Path(sys.argv[1]), sys.argv[2:]
benches = {p.stem.removeprefix("bench-"): json.loads(p.read_text()) for p in sorted(out.glob("bench-*.json"))}
merged = {"failed": failed, "benches": benches, "students": {}}
if (out / "tests.xml").exists():
    cases = ET.parse(out / "tests.xml").getroot().iter("testcase")
    merged["tests"] = {f"{c.get('classname')}::{c.get('name')}": next(
        (child.tag for child in c if child.tag in ("failure", "error", "skipped")), "passed") for c in cases}
for name, b in benches.items():  # tokens/s, MFU and peak memory against the plan of each student's methods
    if "step_s" in b:
        merged["students"][name] = {k: b.get(k) for k in ("tokens_per_s", "mfu", "peak_mem_gib", "plan_mem_gib",
                                                         "micro_batch_size", "compile")}
loader, student = benches.get("loader", {}), benches.get("gemma3-123m-compile-true", {})
merged["loader_vs_student_123m"] = {k: v / student["tokens_per_s"][m] for k, v in loader.get("tokens_per_s", {}).items()
                                    if (m := k.split("_")[1]) in student.get("tokens_per_s", {})}
build = benches.get("build", {})
merged["build"] = {"tokens_per_s": build.get("tokens_per_s", {}).get("build"),
                   "forward_tokens_per_s": build.get("tokens_per_s", {}).get("build_forward"),
                   "ratio_build_forward": build.get("ratio", {}).get("build_forward")}
if "gemma3-123m-none" in benches and "gemma3-123m-ddp" in benches:
    none, ddp = (benches[f"gemma3-123m-{m}"]["tokens_per_s"]["nll"] for m in ("none", "ddp"))
    merged["ratio_ddp1_none_123m"] = ddp / none
(out / "gpu-check.json").write_text(json.dumps(merged, indent=2) + "\n")
print(f"gpu-check: {out / 'gpu-check.json'}; failed: {', '.join(failed) or 'nothing'}")
PY
[ ${#FAILED[@]} -eq 0 ]
