#!/usr/bin/env bash
# The GPU check on a bare GPU machine (no registry reachable): installs the wheels that
# `make gpu-bundle` built elsewhere and that were carried here into a private directory,
# offline, then runs benchmarks/gpu_check.py with it on the path. Without CUDA the same steps
# run on the CPU with a tiny model (the rehearsal).
#
#   bash benchmarks/gpu_check.sh [--out DIR] [--profile gpu|cpu]        (or: make gpu-check)
#
# PYTHON: the interpreter (default python3, the machine's); GPU_BUNDLE_DIR: the wheels (default
# gpu-bundle); GPU_CHECK_SITE: where they go (default gpu-check-out/site).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUNDLE=${GPU_BUNDLE_DIR:-gpu-bundle}
SITE=${GPU_CHECK_SITE:-gpu-check-out/site}
started=$(date +%s)
"$PY" benchmarks/gpu_check.py install "$BUNDLE" "$SITE"
SITE=$(cd "$SITE" && pwd)
rc=0
XSTILTS_GPU_SITE="$SITE" PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" "$PY" benchmarks/gpu_check.py run "$@" || rc=$?
echo "gpu check: $(( $(date +%s) - started )) s in all (install included)"
exit $rc
