#!/usr/bin/env bash
# The one GPU script of the KCache end-to-end benchmark: installs kvcompile, builds (or reuses)
# the kernel library, then runs bench/bench_kcache_e2e.py at full size (1B-shaped Llama, bf16,
# 16K context, 24 GiB GPU KV budget). Everything lands under $OUT (log, kcache_e2e.json/.png).
#   OUT=/tmp/out bash bench/gpu_kcache_e2e.sh [extra bench args, e.g. --floors DIR/floors.json]
# (bench/gpu_kcache.sh --score-sweep leaves score_variant.env: source it first to run the
# fastest score-kernel variant here too)
# E2E_TESTS="tests/runtime/test_microbatch.py ..." runs those files' gpu-marked tests first
# (their log lands in the same file); $KVCOMPILE_KERNELS_LIB pins a prebuilt kernel library.
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_install.sh
gpu_log kcache_e2e

echo "== device"; date -u
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
free -g | head -2
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python3 -c "import matplotlib" 2>/dev/null || echo "matplotlib missing: JSON only, plot later with --plot"

echo "== install"
install_kvcompile || exit 1

echo "== kernel library (\$KVCOMPILE_KERNELS_LIB pins a prebuilt one, e.g. of committed sources)"
SECONDS=0
load_kernel_library || exit 1
echo "build+load: ${SECONDS}s"
git log -1 --format='HEAD %h %s' 2>/dev/null; git status --short plugins 2>/dev/null | head

if [ -n "${E2E_TESTS:-}" ]; then
  echo "== gpu tests: $E2E_TESTS"
  SECONDS=0
  timeout ${TESTS_TIMEOUT:-150} python3 -m pytest $E2E_TESTS -q -m gpu -p no:cacheprovider 2>&1 | tail -15
  echo "tests rc=${PIPESTATUS[0]} in ${SECONDS}s"
fi

echo "== benchmark"
SECONDS=0
timeout ${E2E_TIMEOUT:-470} python3 bench/bench_kcache_e2e.py --out "$OUT" "$@"
echo "bench rc=$? in ${SECONDS}s"
