#!/usr/bin/env bash
# The one GPU script of the KCache op: builds the kernel library, runs the GPU tests, runs
# compute-sanitizer memcheck on a small decode step, runs the op benchmark. Everything lands
# under $OUT (logs, kcache_op.json, kcache_op.png).
#   OUT=/tmp/out bash bench/gpu_kcache.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_install.sh
gpu_log kcache

echo "== device"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"

echo "== install"
install_kvcompile || exit 1

echo "== build"
SECONDS=0
python3 -c "from kvcompile.plugins import build, load_kernels; print(build.library_path()); load_kernels()" || exit 1
echo "build+load: ${SECONDS}s"

echo "== gpu tests"
SECONDS=0
timeout 300 python3 -m pytest tests/ops/test_kcache_attention.py -q -p no:cacheprovider -m gpu \
  -o addopts="" 2>&1 | tail -40
echo "gpu tests: ${SECONDS}s"

echo "== compute-sanitizer memcheck (small decode steps, both modes, bf16 and fp32)"
SECONDS=0
cat > /tmp/kcache_memcheck.py <<'PY'
import torch, kvcompile.ops
from kvcompile.ops.kcache_attention.definition import kcache_attention_reference as ref
op = torch.ops.kvcompile.kcache_attention
for dtype in (torch.bfloat16, torch.float32):
    B, Hq, Hkv, P, D = 2, 8, 2, 300, 64
    q = torch.randn(B, Hq, 1, D, dtype=dtype); k = torch.randn(B, Hkv, 1, D, dtype=dtype)
    v = torch.randn(B, Hkv, 1, D, dtype=dtype); kc = torch.randn(B, Hkv, P, D, dtype=dtype)
    vh = torch.randn(B, P, Hkv, D, dtype=dtype); bias = torch.zeros(B, 1, 1, P + 1); bias[1, ..., :50] = -1e30
    for select in ("head", "layer"):
        for topn in (5, 64, P + 1):
            got = op(q.cuda(), k.cuda(), v.cuda(), kc.cuda(), vh.pin_memory(), bias.cuda(), 0.125, topn, select, True)
            want = ref(q, k, v, kc, vh, bias, 0.125, topn, select, True)
            err = (got.cpu().float() - want.float()).abs().max().item()
            print(dtype, select, topn, "max|diff|", err)
torch.cuda.synchronize()
PY
timeout 300 compute-sanitizer --tool memcheck --print-limit 20 python3 /tmp/kcache_memcheck.py 2>&1 | tail -30
echo "memcheck: ${SECONDS}s"
echo "== compute-sanitizer racecheck (shared-memory hazards of the same steps)"
SECONDS=0
timeout 300 compute-sanitizer --tool racecheck --print-limit 20 python3 /tmp/kcache_memcheck.py 2>&1 | tail -8
echo "racecheck: ${SECONDS}s"

echo "== benchmark"
SECONDS=0
timeout 300 python3 bench/bench_kcache_op.py --out "$OUT"
echo "bench: ${SECONDS}s"
