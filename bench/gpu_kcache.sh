#!/usr/bin/env bash
# The one GPU script of the KCache op: builds the kernel library, measures the floors
# (bench/floors.py -> floors.json), runs the GPU tests (kernels, CUDA-graph decoder), runs
# compute-sanitizer memcheck and racecheck on small decode steps and a prefill chunk, runs the
# op benchmark against the measured floors. Everything lands under $OUT (logs, floors.json,
# kcache_op.json, kcache_op.png). On the H200 (2026-11-29), with the library prebuilt on the CPU
# machine and carried (build/kvc_cache): floors 13 s, kernel tests 13-17 s, runtime tests ~45 s,
# op benchmark 15-21 s (+ the --score-sweep), memcheck 14 s, racecheck 28 s.
#   OUT=/tmp/out bash bench/gpu_kcache.sh [op benchmark args]
#   STAGES="floors tests bench" ... runs only those of: floors tests sanitizer bench
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_install.sh
gpu_log kcache

echo "== device"; print_device

echo "== install"
install_kvcompile || exit 1

echo "== build"
SECONDS=0
load_kernel_library || exit 1
echo "build+load: ${SECONDS}s"

STAGES=${STAGES:-floors tests sanitizer bench}
has() { [[ " $STAGES " == *" $1 "* ]]; }

has floors && echo "== floors"
if has floors; then
SECONDS=0
timeout 45 python3 bench/floors.py --out "$OUT"
echo "floors: ${SECONDS}s"
fi
FLOORS=()
[ -f "$OUT/floors.json" ] && FLOORS=(--floors "$OUT/floors.json")
[ -n "${FLOORS_JSON:-}" ] && FLOORS=(--floors "$FLOORS_JSON")

if has tests; then
echo "== gpu tests"
SECONDS=0
timeout 60 python3 -m pytest tests/ops/test_kcache_attention.py -q -p no:cacheprovider -m gpu -o addopts="" \
  --maxfail=10 2>&1 | tail -30
timeout 75 python3 -m pytest tests/test_gpu_runtime.py tests/ops/test_cached_attention.py -q -p no:cacheprovider \
  -m gpu -o addopts="" -k "graph_decoder or bf16_kcache_with_full_topn or cuda_decode_path or (hybrid and gpt_oss)" \
  --maxfail=10 2>&1 | tail -30
echo "gpu tests: ${SECONDS}s"
fi

if has sanitizer; then
echo "== compute-sanitizer memcheck (small decode steps and a prefill chunk, both modes, bf16 and fp32)"
SECONDS=0
cat > /tmp/kcache_memcheck.py <<'PY'
import torch, kvcompile.ops
from kvcompile.ops.kcache_attention.definition import kcache_attention_reference as ref
op = torch.ops.kvcompile.kcache_attention
for dtype, T, D in ((torch.bfloat16, 1, 64), (torch.float32, 1, 64), (torch.bfloat16, 1, 128),
                    (torch.bfloat16, 5, 80), (torch.float32, 3, 64)):
    B, Hq, Hkv, P = 2, 8, 2, 1300
    q = torch.randn(B, Hq, T, D, dtype=dtype); k = torch.randn(B, Hkv, T, D, dtype=dtype)
    v = torch.randn(B, Hkv, T, D, dtype=dtype); kc = torch.randn(B, Hkv, P, D, dtype=dtype)
    vh = torch.randn(B, P, Hkv, D, dtype=dtype); bias = torch.zeros(B, 1, T, P + T); bias[1, ..., :50] = -1e30
    bias[..., P:] = torch.full((T, T), -1e30).triu(1)
    for select in ("head", "layer"):
        for topn in (5, 64, P + T):
            got = op(q.cuda(), k.cuda(), v.cuda(), kc.cuda(), vh.pin_memory(), bias.cuda(), 0.125, topn, select, True)
            want = ref(q, k, v, kc, vh, bias, 0.125, topn, select, True)
            err = (got.cpu().float() - want.float()).abs().max().item()
            print(dtype, "T", T, "D", D, select, topn, "max|diff|", err)
import os  # the op pipelined over batch slices (side stream): B = 3 in 2 slices
os.environ["KVC_PIPELINE_PARTS"] = "2"
for T, select in ((1, "head"), (5, "layer")):
    B, Hq, Hkv, P, D = 3, 8, 2, 1300, 128
    q = torch.randn(B, Hq, T, D, dtype=torch.bfloat16); k = torch.randn(B, Hkv, T, D, dtype=torch.bfloat16)
    kc = torch.randn(B, Hkv, P, D, dtype=torch.bfloat16); vh = torch.randn(B, P, Hkv, D, dtype=torch.bfloat16)
    bias = torch.zeros(B, 1, T, P + T); bias[..., P:] = torch.full((T, T), -1e30).triu(1)
    got = op(q.cuda(), k.cuda(), k.cuda(), kc.cuda(), vh.pin_memory(), bias.cuda(), 0.125, 64, select, False)
    want = ref(q, k, k, kc, vh, bias, 0.125, 64, select, False)
    print("pipelined parts=2", select, "T", T, "max|diff|", (got.cpu().float() - want.float()).abs().max().item())
os.environ["KVC_PIPELINE_PARTS"] = "1"
for cluster in ("2", "8"):  # the top-N split over a thread-block cluster (sm_90), both of its paths
    os.environ["KVC_TOPN_CLUSTER"] = cluster
    B, Hq, Hkv, P, D = 2, 8, 2, 9000, 64
    for spread in (1.0, 0.01):  # 0.01: the boundary bin crowded past the candidate list
        q = torch.randn(B, Hq, 1, D) * spread; kc = torch.randn(B, Hkv, P, D); vh = torch.randn(B, P, Hkv, D)
        k = torch.randn(B, Hkv, 1, D); bias = torch.zeros(B, 1, 1, P + 1)
        for select in ("head", "layer"):
            got = op(q.cuda(), k.cuda(), k.cuda(), kc.cuda(), vh.pin_memory(), bias.cuda(), 0.125, 300, select, False)
            want = ref(q, k, k, kc, vh, bias, 0.125, 300, select, False)
            print("top-N cluster", cluster, "spread", spread, select, "max|diff|", (got.cpu() - want).abs().max().item())
os.environ.pop("KVC_TOPN_CLUSTER")
for dtype in (torch.bfloat16, torch.float32):  # the full cache's decode: fused past + merge kernel
    q = torch.randn(2, 8, 1, 64, dtype=dtype, device="cuda"); k = torch.randn(2, 2, 1, 64, dtype=dtype, device="cuda")
    kc = torch.randn(2, 2, 700, 64, dtype=dtype, device="cuda"); b = torch.zeros(2, 1, 1, 701, dtype=dtype, device="cuda")
    got = torch.ops.kvcompile.cached_attention(q, k, k, kc, kc, b, 0.125, 0.0, [0.5] * 8)
    print("full decode", dtype, got.float().abs().sum().item())
import sys; sys.path.insert(0, "bench"); import floors
lib = floors._gather_library()
host = torch.randint(0, 256, (1000, 256), dtype=torch.uint8).pin_memory()
rows = torch.randint(0, 1000, (77,), dtype=torch.int32, device="cuda"); out = torch.empty(77, 256, dtype=torch.uint8, device="cuda")
assert lib.kvc_host_row_gather(host.data_ptr(), 256, rows.data_ptr(), 77, out.data_ptr(), None) == 0
torch.cuda.synchronize()
print("probe ok", torch.equal(out.cpu(), host[rows.long().cpu()]))
PY
timeout 75 compute-sanitizer --tool memcheck --print-limit 20 python3 /tmp/kcache_memcheck.py 2>&1 | tail -34
echo "memcheck: ${SECONDS}s"
echo "== compute-sanitizer racecheck (shared-memory hazards of the same steps)"
SECONDS=0
# cuDNN's generated SDPA kernels (the full-cache step) are not ours and report hazards of their own
timeout 75 compute-sanitizer --tool racecheck --kernel-name-exclude kns=cudnn --print-limit 20 python3 /tmp/kcache_memcheck.py 2>&1 | tail -8
echo "racecheck: ${SECONDS}s"
fi

has bench || exit 0
echo "== benchmark"
SECONDS=0
timeout ${BENCH_TIMEOUT:-200} python3 bench/bench_kcache_op.py --out "$OUT" "${FLOORS[@]}" "$@"
echo "bench: ${SECONDS}s"
