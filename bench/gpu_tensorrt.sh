#!/usr/bin/env bash
# The TensorRT GPU script, as back-to-back calls. One call carries at most 64 MiB and the working
# tree alone is ~42 MiB (the bundled models' weights), so the TensorRT-RTX 1.7.1.116 libs (a 95 MB
# wheel; its contents travel as one tar.xz of 69 MB) go in pieces of ~15 MB, one git-ignored folder
# each, stashed in /tmp on the machine by consecutive calls (each within 30 s of the last, while
# the machine is warm):
#
#   stage 1     (carry .trt_1: the headers of NVIDIA/TensorRT, the bindings wheel, piece aa)
#     stashes what it carries, builds the C++ plugin library with CMake against the headers
#     (warnings as errors), runs the IPluginV3 life-cycle harness on the GPU (enqueue on real
#     buffers: kcache_attention, rerotate_keys, kv_decode over a real codec bitstream) and compares
#     its outputs with the torch ops; compute-sanitizer memcheck on it (MEMCHECK=0 skips it).
#   stash DIR   (carry DIR: .trt_2, .trt_3, ...) stashes one more piece, nothing else.
#   stage 2     (carry the last folder: the last piece and rtx_libs.sha256) joins the pieces,
#     checks and unpacks the libs, installs the bindings into /tmp/site, exports the reference
#     model with --target tensorrt (kcache and full caches; TensorRT-RTX builds the engines during
#     export, kvcompile nodes through their local functions), builds fusion's check graph and a
#     one-node kv_decode graph, parses the decode graph as exported (nodes naming the plugin
#     namespace), and records what worked.
#
# Preparing the folders (here, once; .gitignore ignores /.trt*/):
#   pip download --no-deps tensorrt-rtx-cu13-libs==1.7.1.116 tensorrt-rtx-cu13-bindings==1.7.1.116 \
#     --python-version 3.12 --only-binary=:all: --platform manylinux_2_28_x86_64 -d /tmp/rtx
#   (cd /tmp/rtx && unzip -q tensorrt_rtx_cu13_libs-*.whl && tar -cf - tensorrt_rtx_libs \
#     tensorrt_rtx_cu13_libs-1.7.1.116.dist-info | xz -T0 -6 > rtx_libs.tar.xz && sha256sum rtx_libs.tar.xz \
#     > rtx_libs.sha256 && split -b 15M rtx_libs.tar.xz rtx_libs.tar.xz.part_)      # aa .. ae
#   n=1; for piece in /tmp/rtx/rtx_libs.tar.xz.part_*; do mkdir -p .trt_$n; cp $piece .trt_$n/; n=$((n+1)); done
#   cp /tmp/rtx/tensorrt_rtx_cu13_bindings-*.whl .trt_1/ && cp /tmp/rtx/rtx_libs.sha256 .trt_$((n-1))/
#   tar -C <NVIDIA/TensorRT checkout> -cJf .trt_1/trt_include.tar.xz include
#
#   OUT=/tmp/out bash bench/gpu_tensorrt.sh 1                    # carry .trt_1
#   OUT=/tmp/out bash bench/gpu_tensorrt.sh stash .trt_2         # carry .trt_2; likewise .trt_3, .trt_4
#   OUT=/tmp/out bash bench/gpu_tensorrt.sh 2 .trt_5             # carry .trt_5 (the last piece + sha256)
# Everything lands under $OUT: gpu_tensorrt_<stage>.log, plugin_build.log, harness_vs_torch.json
# (stage 1); tensorrt_rtx.json, export_{kcache,full}.log (the builder's log), build_engines_*.sh (stage 2).
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:?stage 1, stash DIR or 2 DIR}
source bench/gpu_install.sh
gpu_log "tensorrt_$STAGE"
STASH=/tmp/kvc_trt
mkdir -p "$STASH"

if [ "$STAGE" = stash ]; then
  cp "${2:?the carried folder}"/* "$STASH"/ && ls -la "$STASH" | grep rtx_libs; exit $?
fi

if [ "$STAGE" = 1 ]; then
  SECONDS=0
  cp .trt_1/rtx_libs.tar.xz.part_* .trt_1/*.whl "$STASH"/ && tar -xJf .trt_1/trt_include.tar.xz -C "$STASH" || exit 1
  echo "stashed the first piece and the headers in $STASH (${SECONDS}s)"
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
  [ "${MEMCHECK:-1}" = 1 ] || exit 0  # MEMCHECK=0 saves its minute
  echo "== compute-sanitizer memcheck on the harness"
  timeout 150 compute-sanitizer --tool memcheck --print-limit 10 "$STASH/build/kvcompile_plugin_harness" \
    "" "$STASH/kv_inputs" 2>&1 \
    | grep -E "ERROR SUMMARY|check\(s\) failed|Invalid" | head -12
  exit 0
fi

# stage 2 ----------------------------------------------------------------------------------------
SECONDS=0
LAST=${2:?the folder carrying the last piece and rtx_libs.sha256}
cp "$LAST"/* "$STASH"/ || exit 1
[ -f "$STASH/rtx_libs.tar.xz.part_aa" ] || { echo "the earlier pieces are not in $STASH: run stage 1 and the stash calls right before (machine released?)"; exit 1; }
cat "$STASH"/rtx_libs.tar.xz.part_* > "$STASH/rtx_libs.tar.xz" \
  && (cd "$STASH" && sha256sum -c rtx_libs.sha256) || exit 1   # a missing piece fails here
# the bindings wheel through pip; the libs wheel's files (tensorrt_rtx_libs/ and its dist-info,
# repacked as tar.xz to travel) unpacked beside it: what pip would have installed
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  "$STASH"/tensorrt_rtx_cu13_bindings-*.whl 2>&1 | tail -2
tar -xJf "$STASH/rtx_libs.tar.xz" -C /tmp/site || exit 1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import tensorrt_rtx_bindings as t; print('TensorRT-RTX', t.__version__)" || exit 1
echo "installed (${SECONDS}s)"
install_kvcompile || exit 1
[ -f "$STASH/build/libkvcompile_trt_plugins.so" ] && export KVCOMPILE_TRT_PLUGIN_LIB=$STASH/build/libkvcompile_trt_plugins.so

for CACHE in kcache full; do
  echo "== export reference --cache $CACHE --target tensorrt (engines built by TensorRT-RTX)"
  SECONDS=0
  EXTRA=""; [ "$CACHE" = kcache ] && EXTRA="--topn 64"
  timeout 240 python3 -m kvcompile.cli.main -v export reference --cache "$CACHE" $EXTRA --target tensorrt \
    --max-context 1024 -o "$STASH/ref-$CACHE" 2>&1 | tee "$OUT/export_$CACHE.log" | tail -4  # -v: TensorRT's log too
  echo "export+engines: ${SECONDS}s"
done
echo "== fusion's check graph (export --target onnx --fuse)"
SECONDS=0
timeout 120 python3 -m kvcompile.cli.main export reference --cache kcache --topn 64 --target onnx --fuse \
  -o "$STASH/ref-fuse" 2>&1 | tail -2
echo "fuse export: ${SECONDS}s"

echo "== parse / build record"
timeout 300 python3 - "$STASH" "$OUT" <<'PY'
import json, sys
from pathlib import Path
import onnx
from onnx import TensorProto, helper
import tensorrt_rtx_bindings as trt
from kvcompile.core.layout import GraphSpec
from kvcompile.export.manifest import load_manifest
from kvcompile.export.tensorrt_engines import build_engine, has_plugin_layers
from kvcompile.export.tensorrt_target import EngineProfile, input_shapes

stash, out = Path(sys.argv[1]), Path(sys.argv[2])
record = {"tensorrt_rtx": trt.__version__, "has_plugin_layers": has_plugin_layers(trt), "exports": {}}


def save():  # after every step: a later step that aborts the process loses nothing before it
    (out / "tensorrt_rtx.json").write_text(json.dumps(record, indent=2) + "\n")


def attempt(key, step):
    try:
        record[key] = step()
    except Exception as error:
        record[key] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0]}"}
    print(key, json.dumps(record[key])[:800])
    save()


for cache in ("kcache", "full"):  # the engines TensorRT-RTX built during `kvcompile export`
    def exported(folder=stash / f"ref-{cache}"):
        section = load_manifest(folder, target="tensorrt")["tensorrt"]
        return {k: section[k] for k in ("builder", "engines", "engines_built", "note")}
    attempt(f"export_{cache}", exported)


def fusion_check_graph():  # fusion's check graph (export --target onnx --fuse) through its local functions
    folder = stash / "ref-fuse"
    spec = GraphSpec.from_dict(load_manifest(folder, target="onnx")["graph_spec"])
    names = {i.name for i in onnx.load(str(folder / "check.onnx"), load_external_data=False).graph.input}
    shapes = {n: v for n, v in input_shapes(spec, "prefill", EngineProfile(max_batch=2, max_context=1024)).items()
              if n in names}
    return build_engine(trt, folder / "check.onnx", shapes, stash / "check.plan", None, "check").to_dict()
attempt("fuse_check_graph", fusion_check_graph)


def kv_decode_graph():  # one kv_decode node (the codec's decoder; not part of the model's graphs)
    from kvcompile.ops import onnx_domain
    from kvcompile.ops.kv_decode import onnx_function
    from kvcompile.ops.kv_decode.definition import level_tables

    cdf, halves, base, steps = level_tables(2, 8)
    names = ("data", "chunk_offsets", "bank_cdf", "halves", "table_base", "scale_steps")
    types = (TensorProto.UINT8, TensorProto.INT64, TensorProto.INT32, TensorProto.INT64, TensorProto.INT64,
             TensorProto.FLOAT)
    attributes = onnx_function.node_attributes(8, 2, 32, 32, 4, 1, 0)
    node = helper.make_node("kv_decode", list(names), ["out"], domain=onnx_domain.DOMAIN, **attributes)
    inputs = [helper.make_tensor_value_info(n, t, [None] * r) for n, t, r in zip(names, types, (1, 1, 2, 1, 1, 1))]
    output = helper.make_tensor_value_info("out", attributes["onnx_dtype"], [None] * 5)
    model = helper.make_model(helper.make_graph([node], "kv_decode", inputs, [output]),
                              functions=onnx_domain.function_protos(["kv_decode"]),
                              opset_imports=[helper.make_opsetid("", onnx_domain.STANDARD_OPSET),
                                             helper.make_opsetid(onnx_domain.DOMAIN, onnx_domain.DOMAIN_VERSION)])
    onnx.save(model, str(stash / "kv_decode.onnx"))
    fixed = lambda t: (tuple(t.shape),) * 3
    shapes = {"data": ((4,), (4096,), (1 << 20,)), "chunk_offsets": ((1,), (4,), (64,)), "bank_cdf": fixed(cdf),
              "halves": fixed(halves), "table_base": fixed(base), "scale_steps": fixed(steps)}
    return build_engine(trt, stash / "kv_decode.onnx", shapes, stash / "kv_decode.plan", None, "kv_decode").to_dict()
attempt("kv_decode_graph", kv_decode_graph)

logger = trt.Logger(trt.Logger.WARNING)


def runtime_deserialize():  # TensorRT-RTX's runtime on compute capability 9.0 (expected: refused)
    engine = trt.Runtime(logger).deserialize_cuda_engine((stash / "ref-kcache" / "engines" / "decode.plan").read_bytes())
    return "engine deserialized" if engine is not None else "deserialize_cuda_engine returned None"
attempt("runtime_deserialize", runtime_deserialize)


def decode_as_exported():  # the decode graph's nodes name plugin_namespace; no plugin is registered
    builder = trt.Builder(logger)
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(1 << int(flag) if flag is not None else 0)
    parser = trt.OnnxParser(network, logger)
    parsed = parser.parse_from_file(str(stash / "ref-kcache" / "decode.onnx"))
    return {"parsed": bool(parsed), "errors": [str(parser.get_error(i)) for i in range(parser.num_errors)][:5]}
attempt("decode_as_exported", decode_as_exported)  # last: a parser abort would end the process
PY
echo "== kvcompile run --backend tensorrt (TensorRT-RTX's runtime on compute capability 9.0)"
timeout 120 python3 -m kvcompile.cli.main run "$STASH/ref-kcache" --backend tensorrt --prompt "The" \
  --max-new-tokens 4 2>&1 | tail -2
echo "exit code $?"
for CACHE in kcache full; do
  cp "$STASH/ref-$CACHE/build_engines.sh" "$OUT/build_engines_$CACHE.sh" 2>/dev/null
done
exit 0
