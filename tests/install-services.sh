#!/usr/bin/env bash
# The real services the slow tests start: a single-node SLURM cluster and headless Chromium.
# Idempotent; needs root (CI runs as root). Without root, say what is missing and let those tests skip.
set -euo pipefail
cd "$(dirname "$0")"
if [ "$(id -u)" != 0 ]; then
  echo "not root: skipping the install of SLURM and Chromium (the slow tests that need them will skip)" >&2
  exit 0
fi
bash install-slurm.sh
bash install-browser.sh
