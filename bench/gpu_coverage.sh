#!/usr/bin/env bash
# One GPU call for the model-coverage work: the gpu-marked tests (CUDA exactness of the hybrid,
# soft-capped and sink families; the KCache kernels through the op registry), then the family
# exactness suite under the GPU machine's transformers (the lowest version pyproject admits).
#   OUT=/tmp/out bash bench/gpu_coverage.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_install.sh
gpu_log coverage
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
install_kvcompile || exit 1
python3 -c "from kvcompile.plugins import load_kernels; load_kernels(); print('kernels loaded')"
echo "== gpu tests"
timeout 300 python3 -m pytest tests/test_gpu_runtime.py tests/ops -q -m gpu -p no:cacheprovider -rf 2>&1 | tail -25
echo "== family exactness under this transformers (CPU)"
timeout 240 python3 -m pytest tests/test_families.py tests/core tests/passes -q -p no:cacheprovider -rf -x 2>&1 | tail -25
