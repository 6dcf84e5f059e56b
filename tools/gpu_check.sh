#!/usr/bin/env bash
# GPU checks: the multi-rank tests with CUDA tensors (NCCL at world size 1; gloo with CUDA tensors above,
# since NCCL refuses two ranks on one GPU), then the demo on CUDA.
# Usage on a machine with an NVIDIA GPU and the project installed: bash tools/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0), torch.__version__)"
SHARDSTORE_TEST_DEVICE=cuda $PY -m pytest -q -p no:cacheprovider tests/dist "$@"
$PY tools/demo.py --nproc 2 --device cuda
