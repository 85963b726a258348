#!/usr/bin/env bash
# The one GPU script of the KV codec's decoder (issue 13): GPU tests of kv_decode, compute-sanitizer
# memcheck of the decoder on valid and corrupted chunks, then bench/bench_codec_gpu.py (ours beside
# nvCOMP ANS and LMCache's torchac_cuda, links, recompute, floors). Everything lands under $OUT.
#   OUT=/tmp/out bash bench/gpu_codec.sh
# Peers travel as files in the git-ignored .whl/ (carry it): the nvidia-nvcomp-cu13 and
# nvidia-libnvcomp-cu13 wheels and the torchac_cuda sdist, built here against this machine's torch.
# The working tree is ~42 MiB, so the 30 MB libnvcomp wheel cannot travel whole beside it: cut it
# in pieces (`split -b 15M WHEEL WHEEL.part_`, one git-ignored folder a piece), stash the earlier
# pieces with `bash bench/gpu_codec.sh stash DIR` calls right before (each within 30 s of the last),
# and carry the last piece in $WHL: the pieces are joined back into the wheel here.
# A kernel library built beforehand may be named by $KVCOMPILE_KERNELS_LIB (skips the nvcc build).
# PARTS picks what runs (default: tests memcheck bench; racecheck on request), e.g. PARTS="tests bench" with `--skip-8b` for the
# decoder alone: GPU tests of both kernels (v1, v2) and the decode benchmark (v1, v2, peers).
# MEMCHECK_KERNEL (default v2) is the kernel compute-sanitizer checks. The benchmark times bitstream
# format 3 at 4 and 8 channels a stream (--groups) and the fastest kernel on the same chunks as format 2.
set -uo pipefail
PARTS=${PARTS:-tests memcheck bench}
part() { [[ " $PARTS " == *" $1 "* ]]; }
cd "$(dirname "$0")/.."
STASH=/tmp/kvc_whl
if [ "${1:-}" = stash ]; then  # one more piece of a wheel, nothing else
  mkdir -p "$STASH" && cp "${2:?the carried folder}"/* "$STASH"/ && ls -la "$STASH"; exit $?
fi
source bench/gpu_install.sh
gpu_log codec

echo "== device"; print_device

WHL=${WHL:-.whl}  # the folder carrying the peers' wheels and sdist
echo "== install"
SECONDS=0
if compgen -G "$STASH/*.part_*" >/dev/null || compgen -G "$WHL/*.part_*" >/dev/null; then  # wheels in pieces: join
  mkdir -p "$STASH" && cp "$WHL"/* "$STASH"/ 2>/dev/null; WHL=$STASH
  for first in "$STASH"/*.whl.part_aa; do
    cat "${first%.part_aa}".part_* > "${first%.part_aa}" && echo "joined $(basename "${first%.part_aa}")"
  done
fi
if ls "$WHL"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHL"/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
install_kvcompile || exit 1
# LMCache's coder builds in the background while the tests run (16 cores; ~1-2 min)
if ls "$WHL"/torchac_cuda-*.tar.gz >/dev/null 2>&1; then
  mkdir -p /tmp/torchac && tar xzf "$WHL"/torchac_cuda-*.tar.gz -C /tmp/torchac
  (cd /tmp/torchac/torchac_cuda-* && TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=12 \
     python3 setup.py build_ext --inplace >"$OUT/torchac_build.log" 2>&1; echo "torchac build rc=$?" >>"$OUT/torchac_build.log") &
  TORCHAC_BUILD=$!
fi
echo "install: ${SECONDS}s"

echo "== build"
SECONDS=0
load_kernel_library || exit 1
echo "build+load: ${SECONDS}s"

if part tests; then
echo "== gpu tests (both kernels)"
SECONDS=0
timeout 300 python3 -m pytest tests/ops/test_kv_decode.py -q -p no:cacheprovider -m gpu -o addopts="" 2>&1 | tail -15
echo "gpu tests: ${SECONDS}s"
fi

if part memcheck || part racecheck; then
export KVCOMPILE_KV_DECODE_KERNEL=${MEMCHECK_KERNEL:-v2}
cat > /tmp/codec_memcheck.py <<'PY'
import dataclasses, io, pathlib, random, torch
import kvcompile.codec as codec, kvcompile.ops
from kvcompile.codec import chunk
from kvcompile.ops.kv_decode.definition import decode_chunks
rng = random.Random(0)
ok = rejected = 0
# 32 channels: every block spans many (side, layer)s (v2's slow path); 1024: v2's fast path
for level, shape in [(lv, sh) for lv in sorted(codec.LEVELS) for sh in ((2, 2, 80, 16), (2, 8, 48, 128))]:
    g = torch.Generator().manual_seed(level)
    k = torch.randn(*shape, generator=g).half(); v = torch.randn(*shape, generator=g).half()
    blob = codec.encode((k, v), level=level, chunk_tokens=32)
    K, V = codec.decode(blob, device="cuda")
    assert torch.equal(K.cpu(), codec.decode(blob)[0]); ok += 1
    # 8 channels a stream, and the same chunks laid out as format 2 (what restore.onnx reads)
    wide = codec.encode((k, v), level=level, chunk_tokens=32, group=8)
    assert torch.equal(codec.decode(wide, device="cuda")[0].cpu(), codec.decode(wide)[0]); ok += 1
    s = io.BytesIO(blob); h = codec.read_header(s); chunks = [d for _, d in codec.iter_chunks(s, h)]
    old = dataclasses.replace(h, version=2, centres=None, shapes=None)
    full = [chunk.to_format2(h, i, d) for i, d in enumerate(chunks) if h.chunk_span(i)[1] == 32]
    assert torch.equal(decode_chunks(old, full, device="cuda").cpu(), decode_chunks(h, chunks[:len(full)])); ok += 1
    for trial in range(16):
        bad = bytearray(chunks[trial % 2])
        for _ in range(rng.choice([1, 2, 8])):
            bad[rng.randrange(len(bad))] = rng.randrange(256)
        if trial % 5 == 0:
            bad = bad[:rng.randrange(len(bad))]
        try:
            decode_chunks(h, [bytes(bad) + b"\0" * (-len(bad) % 4)], device="cuda"); ok += 1
        except codec.BitstreamError:
            rejected += 1
for path in sorted(pathlib.Path("tests/codec/data").glob("format2_*.kvcb")):  # files of the format-2 encoder
    blob = path.read_bytes()
    assert torch.equal(codec.decode(blob, device="cuda")[0].cpu(), codec.decode(blob)[0]); ok += 1
torch.cuda.synchronize()
print("memcheck script: decoded", ok, "rejected", rejected)
PY
for tool in memcheck racecheck; do  # racecheck: the shared-memory rings and tables (v2), the bank (v1)
  part $tool || continue
  echo "== compute-sanitizer $tool of kernel $KVCOMPILE_KV_DECODE_KERNEL: valid chunks of every level, then corrupted ones"
  SECONDS=0
  timeout 200 compute-sanitizer --tool $tool --print-limit 20 python3 /tmp/codec_memcheck.py 2>&1 | tail -12
  echo "$tool: ${SECONDS}s"
done
unset KVCOMPILE_KV_DECODE_KERNEL
fi

if [ -n "${TORCHAC_BUILD:-}" ]; then
  wait "$TORCHAC_BUILD"; tail -3 "$OUT/torchac_build.log"
  export PYTHONPATH=$(ls -d /tmp/torchac/torchac_cuda-*)${PYTHONPATH:+:$PYTHONPATH}
fi

if part bench; then
echo "== benchmark"
SECONDS=0
timeout 300 python3 bench/bench_codec_gpu.py --out "$OUT" "$@"
echo "bench: ${SECONDS}s"
fi
