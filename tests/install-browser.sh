#!/usr/bin/env bash
# Idempotent: Debian's chromium (driven by Playwright through executable_path) and Playwright for Python.
# Playwright's own browser builds are never downloaded; tests use /usr/bin/chromium.
set -euo pipefail
PY="${PY:-$(dirname "$0")/../.venv/bin/python}"

if ! command -v chromium >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core
fi

if ! "$PY" -c "import playwright" >/dev/null 2>&1; then
  "$PY" -m pip install -q "playwright>=1.45"
fi
