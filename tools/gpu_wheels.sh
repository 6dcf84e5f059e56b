#!/usr/bin/env bash
# Fetch, here, the wheels the GPU machine lacks (it has torch, fsspec, ml-dtypes, tensorstore, pytest and
# hypothesis, but not zarr or blake3): Python 3.12, x86-64. They land in .whl/ (ignored by git), which a device run
# carries; tools/gpu_check.sh installs them. Versions follow this machine's venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
mkdir -p .whl
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl \
    zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 crc32c==2.9.post0 google-crc32c==1.9.0 blake3==1.0.11
ls -la .whl
