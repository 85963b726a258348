#!/usr/bin/env bash
# The GPU measurements the codec's runtime half needs (issue 13, parts 4 and 5, and the fuzzing):
#   1. host-link gather rates for rows of 64 B .. 8 KiB (bench/floors.py): whether short,
#      compressed V rows would gather at the link's bytes/s or at its rows/s (docs/CODEC.md,
#      "KCache's host-resident V")
#   2. codec decode on the GPU at two sizes: one 256-token chunk of 8B-shaped KV, and one KCache
#      step's rows (1 Mi values): GB/s of fp16 produced, the input of bench/sim_codec_streaming.py
#   2b. time to first token from a restored context vs prefill, reference model on the GPU
#   3. the fuzz corpus (bench/fuzz_corpus.py, 10,000 mutants; the survivors and the resealed chunks
#      the CPU refuses) decoded by the kv_decode kernel and by the CPU decoder, under
#      compute-sanitizer memcheck: the same outcome each, and no out-of-bounds access
#   4. the streaming simulation again with the decode rate of step 2
# Everything lands under $OUT (logs, floors.json, codec_decode.json, codec_restore.json, fuzz replay,
# codec_streaming.*).
#   OUT=/tmp/out bash bench/gpu_codec_runtime.sh        # ~8 min on an H200
#   STEPS="3 2b" ...                                     runs only those steps, in the script's order
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_install.sh
gpu_log codec_runtime

echo "== device"; print_device

echo "== install"
install_kvcompile || exit 1
python3 -c "from kvcompile.plugins import build, load_kernels; load_kernels()" || exit 1
STEPS=${STEPS:-1 2 2b 3 4}
step() { [[ " $STEPS " == *" $1 "* ]]; }

if step 1; then
echo "== 1. floors: host gather by row size"
SECONDS=0
timeout 240 python3 bench/floors.py --out "$OUT" || echo "floors failed"
echo "floors: ${SECONDS}s"
fi


if step 2; then
echo "== 2. codec decode on the GPU"
SECONDS=0
timeout 180 python3 - "$OUT" <<'PY' || echo "decode timing failed"
import json, sys, time
import torch
import kvcompile.codec as codec

out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
       "rows": []}
shapes = {"8B chunk (32 layers, 8 KV heads, 256 tokens, d 128)": (32, 8, 256, 128),
          "KCache step rows (8 seq x 8 heads x 128 rows, d 128)": (1, 8, 8 * 128, 128)}
generator = torch.Generator().manual_seed(0)
from kvcompile.ops.kv_decode.definition import decode_chunks
for name, shape in shapes.items():
    kv = tuple((torch.randn(shape, generator=generator) * 0.5).to(torch.bfloat16) for _ in "kv")
    for level in (1, 2, 3):
        blob = codec.encode(kv, level=level, chunk_tokens=shape[2])
        import io
        stream = io.BytesIO(blob); header = codec.read_header(stream)
        chunks = [d for _, d in codec.iter_chunks(stream, header)]
        decode = lambda: decode_chunks(header, chunks, "cuda")  # the kv_decode op: the CUDA kernel
        decode(); torch.cuda.synchronize()
        best = float("inf")
        for _ in range(5):
            torch.cuda.synchronize(); start = time.perf_counter()
            decode(); torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        fp16 = 2 * 2 * kv[0].numel()
        row = {"shape": name, "level": level, "bytes": len(blob), "decode_us": round(best * 1e6, 1),
               "gbps_fp16_out": round(fp16 / best / 1e9, 4), "note": "one op call incl. host->device copy of the bytes"}
        out["rows"].append(row); print(row)
json.dump(out, open(f"{sys.argv[1]}/codec_decode.json", "w"), indent=1)
PY
echo "decode: ${SECONDS}s"
fi


if step 2b; then
echo "== 2b. restore vs prefill on the GPU (reference model; restore graph = kv_decode kernel)"
SECONDS=0
timeout 240 python3 bench/bench_codec_restore.py --out "$OUT" --device cuda --repeats 5 || echo "restore bench failed"
echo "restore: ${SECONDS}s"
fi


if step 3; then
echo "== 3. fuzz corpus: CPU vs GPU decode, under compute-sanitizer memcheck"
SECONDS=0
timeout 200 python3 bench/fuzz_corpus.py --count 10000 --keep-errors --out /tmp/fuzz_corpus > "$OUT/fuzz_cpu.json"
tail -20 "$OUT/fuzz_cpu.json"
if command -v compute-sanitizer >/dev/null 2>&1; then
  timeout 300 compute-sanitizer --tool memcheck --error-exitcode 9 --log-file "$OUT/memcheck.log" \
    python3 bench/fuzz_corpus.py --replay /tmp/fuzz_corpus --device cuda > "$OUT/fuzz_replay.json"
  echo "memcheck exit code: $?"; tail -5 "$OUT/memcheck.log"; cat "$OUT/fuzz_replay.json"
else
  echo "compute-sanitizer not found: replay without it"
  timeout 200 python3 bench/fuzz_corpus.py --replay /tmp/fuzz_corpus --device cuda | tee "$OUT/fuzz_replay.json"
fi
echo "fuzz: ${SECONDS}s"
fi


step 4 || exit 0
echo "== 4. streaming simulation with the measured decode rate"
RATE=$(python3 -c "
import json; rows = json.load(open('$OUT/codec_decode.json'))['rows']
rate = max(r['gbps_fp16_out'] for r in rows if r['shape'].startswith('8B') and r['level'] == 2)
print(rate if rate >= 1 else 59)  # below 1 GB/s codec.decode is not on the GPU yet: keep the peer's rate" \
  2>/dev/null || echo 59)
python3 bench/sim_codec_streaming.py --out "$OUT" --decode-gbps "$RATE" | tee "$OUT/sim.txt"
