#!/usr/bin/env bash
# GPU checks: the multi-rank tests with CUDA tensors (NCCL at world size 1; gloo with CUDA tensors above,
# since NCCL refuses two ranks on one GPU), then the training demo and the checkpoint demo on CUDA.
# Usage on a machine with an NVIDIA GPU: bash tools/gpu_check.sh [pytest args]
# Wheels in .whl/ (tools/gpu_wheels.sh) are installed first into /tmp/site; the log goes to $OUT when set.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
LOG=${OUT:-/tmp}/gpu_check.log
{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    $PY -c "import torch, zarr; assert torch.cuda.is_available(), 'no CUDA device'; \
print(torch.cuda.get_device_name(0), 'torch', torch.__version__, 'nccl', torch.cuda.nccl.version(), 'zarr', zarr.__version__)"
    SHARDSTORE_TEST_DEVICE=cuda $PY -m pytest -q -p no:cacheprovider tests/dist "$@"
    $PY tools/train_demo.py --nproc 2 --device cuda
    $PY tools/demo.py --nproc 2 --device cuda
} 2>&1 | tee "$LOG"
