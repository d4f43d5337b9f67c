#!/usr/bin/env bash
# `make gpu-check`: on one CUDA GPU, every figure the GPU can give in one go (about 10 minutes on an H100).
# The GPU tests (bf16 step against fp32, no host sync in the hot loop, the paper students' KD step within
# 80 GB); the bench of the 123M and 735M students at the paper's micro-batch, torch.compile off and on,
# the loader next to them; the 3.4B teacher's NLL step under FSDP2 (a process group of one) at micro-batch 8.
# Every bench.json lands in reports/gpu-check/ (override with OUT=DIR), merged into gpu-check.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-reports/gpu-check}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.csv"
"$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/test_gpu.txt"
PAPER=(teacher=gemma3-3.4b train=paper train.batch_size=32 bench.warmup=3 bench.steps=5)
for student in gemma3-123m gemma3-735m; do
  for compile in false true; do
    "$PY" -m hldx.bench student=$student "${PAPER[@]}" train.compile=$compile \
      bench.methods=[nll,kd,hldc,ht,bare] bench.json="$OUT/bench-$student-compile-$compile.json"
  done
done
"$PY" -m hldx.bench student=gemma3-123m "${PAPER[@]}" bench.methods=[loader] bench.json="$OUT/bench-loader.json"
"$PY" -m hldx.bench student=gemma3-3.4b method=nll "${PAPER[@]}" train.batch_size=8 train.micro_batch_size=8 train.parallel=fsdp \
  bench.methods=[nll] bench.json="$OUT/bench-gemma3-3.4b-fsdp.json"
for parallel in none ddp; do  # DDP on one rank against no wrapper: what the engine itself costs
  "$PY" -m hldx.bench student=gemma3-123m "${PAPER[@]}" train.parallel=$parallel bench.methods=[nll] \
    bench.json="$OUT/bench-gemma3-123m-$parallel.json"
done
"$PY" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
merged = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("bench-*.json"))}
none, ddp = (merged[f"bench-gemma3-123m-{m}"]["tokens_per_s"]["nll"] for m in ("none", "ddp"))
merged["ratio_ddp1_none_123m"] = ddp / none
(out / "gpu-check.json").write_text(json.dumps(merged, indent=2) + "\n")
print(f"gpu-check: {out / 'gpu-check.json'} (DDP on 1 rank / no wrapper, 123M NLL: {ddp / none:.3f})")
PY
