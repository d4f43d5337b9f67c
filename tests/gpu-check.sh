#!/usr/bin/env bash
# The GPU check (`make gpu-check`; on the lent GPU machine, the call in README.md): with the machine's own python3
# as it is, the wheel bundle of what hldx needs beyond it (`make gpu-bundle`: .gpu-bundle/) installed offline into
# the working tree, then the parts of tests/gpu_check.py in order of importance, each under its time limit:
#   bash tests/gpu-check.sh [full|quick|cpu]      full: at most 9 minutes; quick: at most 4; cpu: the rehearsal
# It writes under the working tree (.hldx/gpu-check/: the bundle's install, HOME, TMPDIR and every cache, each
# part's log and JSON) and $OUT alone (default reports/gpu-check): gpu-check.json, every part merged, rewritten
# after each part. Exit status 1 if a part failed or ran out of time (gpu-check.json's `failed`).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
WORK=$PWD/.hldx/gpu-check
OUT=${OUT:-reports/gpu-check}
rm -rf "$WORK" && mkdir -p "$WORK/home" "$WORK/tmp" "$WORK/cache" "$OUT" || exit
export OUT=$(cd "$OUT" && pwd) GPU_CHECK_WORK=$WORK GPU_BUNDLE=${GPU_BUNDLE:-.gpu-bundle}
export HOME=$WORK/home TMPDIR=$WORK/tmp XDG_CACHE_HOME=$WORK/cache HLDX_CACHE=$WORK/hldx PYTHONPATH=$WORK/site \
  PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PY" tests/gpu_check.py "${1:-full}"
