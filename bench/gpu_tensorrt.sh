#!/usr/bin/env bash
# The TensorRT GPU script, as two back-to-back calls (one call carries at most 64 MiB, and the
# TensorRT-RTX libs wheel alone is 95 MB, so it travels split in two git-ignored folders):
#
#   stage 1 (carry .trt_a: half of the libs wheel, the bindings wheel, TensorRT's public headers)
#     stashes its part in /tmp, builds the C++ plugin library with CMake against the headers
#     (warnings as errors), runs the IPluginV3 life-cycle harness on the GPU (enqueue on real
#     buffers: kcache_attention, rerotate_keys, kv_decode over a real codec bitstream) and compares
#     its outputs with the torch ops; compute-sanitizer memcheck on it.
#   stage 2 (carry .trt_b: the other half; within 30 s of stage 1, while the machine is warm)
#     joins and installs TensorRT-RTX 1.7 into /tmp/site, exports the reference model with
#     --target tensorrt (kcache and full caches; TensorRT-RTX builds the engines during export,
#     kvcompile nodes through their local functions), parses the decode graph as exported (nodes
#     naming the plugin namespace) and the fusion check graph, and records what worked.
#
#   OUT=/tmp/out bash bench/gpu_tensorrt.sh 1     # then
#   OUT=/tmp/out bash bench/gpu_tensorrt.sh 2
# Everything lands under $OUT: gpu_tensorrt_<stage>.log, harness_vs_torch.json, tensorrt_rtx.json.
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:?stage 1 or 2}
source bench/gpu_install.sh
gpu_log "tensorrt_$STAGE"
STASH=/tmp/kvc_trt
mkdir -p "$STASH"

if [ "$STAGE" = 1 ]; then
  SECONDS=0
  cp .trt_a/libs.part.aa .trt_a/*.whl "$STASH"/ && tar -xJf .trt_a/trt_include.tar.xz -C "$STASH" || exit 1
  echo "stashed part a and the headers in $STASH (${SECONDS}s)"
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  install_kvcompile || exit 1
  echo "== plugin library (CMake, headers of NVIDIA/TensorRT $(grep -m1 'TRT_MAJOR_ENTERPRISE ' "$STASH/include/NvInferVersion.h" | awk '{print $3}').x)"
  SECONDS=0
  cmake -S plugins/tensorrt -B "$STASH/build" -G Ninja -DTensorRT_ROOT="$STASH" -DCMAKE_CUDA_ARCHITECTURES=90 \
    > "$OUT/plugin_build.log" 2>&1 && cmake --build "$STASH/build" -j 16 >> "$OUT/plugin_build.log" 2>&1
  echo "build rc=$? (${SECONDS}s)"; tail -3 "$OUT/plugin_build.log"
  nm -D --defined-only "$STASH/build/libkvcompile_trt_plugins.so" | grep " T "
  echo "== life-cycle harness (enqueue on the GPU)"
  rm -rf "$STASH/dump" "$STASH/kv_inputs" && mkdir -p "$STASH/dump"
  python3 plugins/tensorrt/harness/check_against_torch.py "$STASH/kv_inputs" --write-kv-inputs  # a codec bitstream
  timeout 120 "$STASH/build/kvcompile_plugin_harness" "$STASH/dump" "$STASH/kv_inputs" > "$STASH/harness.log" 2>&1
  echo "harness exit $? ($(grep -c '^PASS' "$STASH/harness.log") checks passed)"; grep -v "^PASS" "$STASH/harness.log" | tail -30
  echo "== plugin outputs vs the torch ops"
  timeout 120 python3 plugins/tensorrt/harness/check_against_torch.py "$STASH/dump" --json "$OUT/harness_vs_torch.json"
  echo "== compute-sanitizer memcheck on the harness"
  timeout 150 compute-sanitizer --tool memcheck --print-limit 10 "$STASH/build/kvcompile_plugin_harness" \
    "" "$STASH/kv_inputs" 2>&1 \
    | grep -E "ERROR SUMMARY|check\(s\) failed|Invalid" | head -12
  exit 0
fi

# stage 2 ----------------------------------------------------------------------------------------
SECONDS=0
WHEEL=tensorrt_rtx_cu13_libs-1.7.1.116-py3-none-manylinux_2_28_x86_64.whl
[ -f "$STASH/libs.part.aa" ] || { echo "stage 1's part is not in $STASH: run stage 1 right before (machine released?)"; exit 1; }
cat "$STASH/libs.part.aa" .trt_b/libs.part.ab > "$STASH/$WHEEL" && (cd "$STASH" && sha256sum -c "$OLDPWD/.trt_b/libs.sha256") || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  "$STASH/$WHEEL" "$STASH"/tensorrt_rtx_cu13_bindings-*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import tensorrt_rtx_bindings as t; print('TensorRT-RTX', t.__version__)" || exit 1
echo "installed (${SECONDS}s)"
install_kvcompile || exit 1
[ -f "$STASH/build/libkvcompile_trt_plugins.so" ] && export KVCOMPILE_TRT_PLUGIN_LIB=$STASH/build/libkvcompile_trt_plugins.so

for CACHE in kcache full; do
  echo "== export reference --cache $CACHE --target tensorrt (engines built by TensorRT-RTX)"
  SECONDS=0
  EXTRA=""; [ "$CACHE" = kcache ] && EXTRA="--topn 64"
  timeout 240 python3 -m kvcompile.cli.main export reference --cache "$CACHE" $EXTRA --target tensorrt \
    --max-context 1024 -o "$STASH/ref-$CACHE" 2>&1 | tail -4
  echo "export+engines: ${SECONDS}s"
done
echo "== fusion's check graph (export --target onnx --fuse)"
SECONDS=0
timeout 120 python3 -m kvcompile.cli.main export reference --cache kcache --topn 64 --target onnx --fuse \
  -o "$STASH/ref-fuse" 2>&1 | tail -2
echo "fuse export: ${SECONDS}s"

echo "== parse / build record"
timeout 300 python3 - "$STASH" "$OUT" <<'PY'
import json, sys, time
from pathlib import Path
import tensorrt_rtx_bindings as trt
from kvcompile.export.manifest import load_manifest
from kvcompile.export.tensorrt_engines import build_engine, has_plugin_layers
from kvcompile.export.tensorrt_target import EngineProfile, input_shapes
from kvcompile.core.layout import GraphSpec

stash, out = Path(sys.argv[1]), Path(sys.argv[2])
record = {"tensorrt_rtx": trt.__version__, "has_plugin_layers": has_plugin_layers(trt), "exports": {}}
for cache in ("kcache", "full"):
    folder = stash / f"ref-{cache}"
    try:
        section = load_manifest(folder, target="tensorrt")["tensorrt"]
        record["exports"][cache] = {k: section[k] for k in ("builder", "engines", "engines_built", "note")}
    except Exception as error:  # the export itself failed: say how
        record["exports"][cache] = {"error": str(error).splitlines()[0]}
    print(cache, json.dumps(record["exports"][cache])[:600])

# The decode graph AS EXPORTED (kcache nodes naming plugin_namespace="kvcompile"), given to a
# parser with no kvcompile plugin registered: does it fall back to the local function?
logger = trt.Logger(trt.Logger.WARNING)
builder = trt.Builder(logger)
flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED") else 0
network = builder.create_network(flags)
parser = trt.OnnxParser(network, logger)
decode = stash / "ref-kcache" / "decode.onnx"
ok = parser.parse_from_file(str(decode)) if decode.exists() else False
record["decode_as_exported"] = {"parsed": bool(ok), "errors": [str(parser.get_error(i)) for i in range(parser.num_errors)][:5]}
print("decode.onnx as exported (plugin-named nodes, no plugin registered):", record["decode_as_exported"])

# fusion's check graph through its local functions
check = stash / "ref-fuse" / "check.onnx"
if check.exists():
    spec = GraphSpec.from_dict(load_manifest(stash / "ref-fuse", target="onnx")["graph_spec"])
    import onnx
    names = {i.name for i in onnx.load(str(check), load_external_data=False).graph.input}
    shapes = {n: s for n, s in input_shapes(spec, "prefill", EngineProfile(max_batch=2, max_context=1024)).items() if n in names}
    result = build_engine(trt, check, shapes, stash / "check.plan", None, "check")
    record["fuse_check_graph"] = result.to_dict()

# the runtime on this GPU (TensorRT-RTX refuses compute capability 9.0: recorded, not fatal)
plan = stash / "ref-kcache" / "engines" / "decode.plan"
if plan.exists():
    try:
        engine = trt.Runtime(logger).deserialize_cuda_engine(plan.read_bytes())
        record["runtime_deserialize"] = "engine deserialized" if engine is not None else "deserialize returned None"
    except Exception as error:
        record["runtime_deserialize"] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
    print("runtime:", record["runtime_deserialize"])
(out / "tensorrt_rtx.json").write_text(json.dumps(record, indent=2) + "\n")
PY
echo "== kvcompile run --backend tensorrt (TensorRT-RTX's runtime on compute capability 9.0)"
timeout 120 python3 -m kvcompile.cli.main run "$STASH/ref-kcache" --backend tensorrt --prompt "The" \
  --max-new-tokens 4 2>&1 | tail -2
echo "exit code $?"
for CACHE in kcache full; do
  cp "$STASH/ref-$CACHE/build_engines.sh" "$OUT/build_engines_$CACHE.sh" 2>/dev/null
done
exit 0
