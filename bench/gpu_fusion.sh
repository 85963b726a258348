#!/usr/bin/env bash
# The one GPU script of KV fusion (issue 14): builds (or reuses) the kernel library, runs the
# fusion GPU tests (overlapped layer-wise loading from pinned memory equals the CPU, every
# selector, decoding on full and kcache caches, the causal prefill in bf16, compressed chunk caches
# decoded on the GPU, the rerotate kernel), then the TTFT benchmark on the 8B shape (HF prefill,
# our prefill, full reuse, fusion at 15% with two selectors, from codec bitstreams; each as a
# ratio to the floor measured in the same run). Everything lands under $OUT: gpu_fusion.log,
# fusion_tests.log, fusion_ttft.json, fusion_ttft.png. Budget: under 4 minutes on an H200.
#   OUT=/tmp/out bash bench/gpu_fusion.sh [benchmark args, e.g. --repeats 3 --codec-levels ""]
#   STAGES="bench" ... runs only those of: tests bench attention (the recompute attention's kernels
#   side by side, bench/bench_fused_attention.py, ~1 min)
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_install.sh
gpu_log fusion

echo "== device"; print_device

echo "== install"
install_kvcompile || exit 1

echo "== kernel library"
SECONDS=0
# The re-rotation and the codec's decoder are CUDA kernels of the library; without it fusion
# still runs (torch re-rotation) and the codec row says why it was not measured.
{ load_kernel_library 120 && python3 -c "
from kvcompile.ops.rerotate_keys import kernels
print('rerotate kernel available:', kernels.kernels_available())"; } || echo "kernel library unavailable: torch fallbacks"
echo "kernels: ${SECONDS}s"

STAGES=${STAGES:-tests bench attention}
has() { [[ " $STAGES " == *" $1 "* ]]; }

if has tests; then
echo "== gpu tests"
SECONDS=0
timeout 100 python3 -m pytest tests/fusion/test_fusion_cuda.py tests/ops/test_rerotate_keys.py tests/ops/test_cached_attention.py -q -p no:cacheprovider \
  -m gpu -o addopts="" --maxfail=20 2>&1 | tee "$OUT/fusion_tests.log" | tail -30
timeout 40 python3 -m pytest tests/test_gpu_runtime.py -q -p no:cacheprovider -m gpu -o addopts="" -k fusion \
  2>&1 | tee -a "$OUT/fusion_tests.log" | tail -5
echo "gpu tests: ${SECONDS}s"
fi

if has bench; then
echo "== TTFT benchmark (8B shape, bf16)"
SECONDS=0
timeout 150 python3 bench/bench_fusion_ttft.py --out "$OUT" "$@"
echo "bench: ${SECONDS}s"
fi

if has attention; then
echo "== the recompute's masked attention, kernel by kernel"
SECONDS=0
timeout 120 python3 bench/bench_fused_attention.py --out "$OUT" | grep -v '^ \|^{\|^}'
echo "attention: ${SECONDS}s"
fi
