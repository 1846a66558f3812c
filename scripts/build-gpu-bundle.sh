#!/usr/bin/env bash
# Builds the wheels a bare GPU machine lacks (Python 3.12, manylinux x86-64, no network) into
# gpu-bundle/ and fails if they exceed the 64 MiB that can be carried to it. The machine already
# has torch, transformers, accelerate, tokenizers, safetensors, pyarrow, pyyaml, rich and typer,
# so only the rest of the training stack's closure is fetched, each without its dependencies
# (numpy included: none of those requires it, and datasets and pandas do).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${GPU_BUNDLE_DIR:-gpu-bundle}
LIMIT_MIB=${GPU_BUNDLE_LIMIT_MIB:-64}
rm -rf "$OUT" && mkdir -p "$OUT"

# Binary wheels for the target interpreter and platform, not this machine's.
BINARY=(
  "pydantic==$($PY -c 'import pydantic; print(pydantic.VERSION)')"
  "pydantic-core==$($PY -c 'import pydantic_core; print(pydantic_core.__version__)')"
  annotated-types typing-inspection typing-extensions
  "datasets==$($PY -c 'import datasets; print(datasets.__version__)')"
  numpy dill multiprocess xxhash fsspec pandas python-dateutil pytz tzdata six
  hjson py-cpuinfo msgpack psutil einops ninja
)
$PY -m pip download --quiet --no-deps --only-binary=:all: \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  -d "$OUT" "${BINARY[@]}"

# DeepSpeed ships only as a source distribution: build its pure-Python wheel (no compiled ops;
# the ops it needs are JIT-built or absent on the target, which the check records).
# (version from metadata: importing deepspeed logs to stdout)
DS_VERSION=$($PY -c 'from importlib.metadata import version; print(version("deepspeed"))')
DS_BUILD_OPS=0 $PY -m pip wheel --quiet --no-deps --no-build-isolation -w "$OUT" "deepspeed==$DS_VERSION"

size=$(du -sb "$OUT" | cut -f1)
limit=$((LIMIT_MIB * 1024 * 1024))
printf 'gpu bundle: %d wheels, %.1f MiB (limit %d MiB) in %s\n' \
  "$(ls "$OUT"/*.whl | wc -l)" "$(echo "$size / 1048576" | bc -l)" "$LIMIT_MIB" "$OUT"
if [ "$size" -gt "$limit" ]; then
  echo "gpu bundle exceeds the $LIMIT_MIB MiB limit" >&2
  exit 1
fi
