#!/usr/bin/env bash
# One GPU call for the runtime: the gpu-marked runtime tests (exactness on CUDA, kcache vs full
# in bf16), then the KCache quality sweep on the reference model. Results land under $OUT.
#   OUT=/tmp/out bash bench/gpu_runtime.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_install.sh
gpu_log runtime
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
install_kvcompile || exit 1
python3 -c "from kvcompile.plugins import load_kernels; load_kernels(); print('kernels loaded')"
echo "== gpu runtime tests"
timeout 240 python3 -m pytest tests/test_gpu_runtime.py tests/ops -q -m gpu -p no:cacheprovider 2>&1 | tail -15
echo "== kcache quality sweep"
timeout ${SWEEP_TIMEOUT:-300} python3 bench/sweep_kcache_quality.py --out "$OUT" --samples ${SAMPLES:-20} ${SWEEP_ARGS:-}
