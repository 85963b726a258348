#!/usr/bin/env bash
# Nsight Compute profile of one KCache decode step (32K context, B=8, 32/8 heads, d=128, bf16,
# head selection N=128): speed of light, occupancy, warp stalls and memory of every stage.
# Writes $OUT/ncu_kcache_op.txt. Needs the kernel library built (bench/gpu_kcache.sh does it).
#   OUT=/tmp/out bash bench/ncu_kcache_op.sh [--select layer] [--context N]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/.gpu_out/ncu}
mkdir -p "$OUT"
export KVCOMPILE_CACHE_DIR=${KVCOMPILE_CACHE_DIR:-$PWD/build/kvc_cache}
source bench/gpu_install.sh
install_kvcompile || exit 1
python3 -c "from kvcompile.plugins import load_kernels; load_kernels()" || exit 1
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
[ -n "$NCU" ] || { echo "ncu not found"; exit 1; }
cat > /tmp/kcache_one_step.py <<'PY'
import argparse, sys, torch, kvcompile.ops
sys.path.insert(0, "bench")
import bench_kcache_op as bench
ap = argparse.ArgumentParser(); ap.add_argument("--select", default="head"); ap.add_argument("--context", type=int, default=32768)
ap.add_argument("--topn", type=int, default=128); args = ap.parse_args()
inputs, _, _ = bench.make_case(args.context)
op = torch.ops.kvcompile.kcache_attention
for _ in range(3):  # the profiled call is the third: library loaded, workspace warm
    op(inputs["query"], inputs["key"], inputs["value"], inputs["key_cache"], inputs["value_host"],
       inputs["attn_bias"], 128 ** -0.5, args.topn, args.select, False)
torch.cuda.synchronize()
PY
"$NCU" --kernel-name-base demangled --kernel-name regex:kvc:: --launch-skip 12 --launch-count 6 --section SpeedOfLight --section Occupancy \
  --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis \
  --section SchedulerStats python3 /tmp/kcache_one_step.py "$@" 2>&1 | tee "$OUT/ncu_kcache_op.txt" | tail -150
