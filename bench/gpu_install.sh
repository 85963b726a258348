# Sourced by the bench/gpu_*.sh scripts: makes `import kvcompile` (with kvcompile.passes and
# kvcompile.plugins, which live in ./passes and ./plugins) work on the GPU machine, whose image
# has torch and transformers but not this package. `pip` there may belong to another Python, so
# it is always `python3 -m pip`. Checked from /tmp: the repo root would shadow the install.
install_kvcompile() {
  if ! (cd /tmp && python3 -c "import kvcompile.plugins, kvcompile.passes.kcache") 2>/dev/null; then
    python3 -m pip install -e . --no-deps --no-build-isolation -q --root-user-action=ignore 2>&1 | tail -3
  fi
  if ! (cd /tmp && python3 -c "import kvcompile.plugins, kvcompile.passes.kcache") 2>/dev/null; then
    echo "editable install failed: falling back to PYTHONPATH and links for kvcompile.passes/plugins"
    ln -sfn ../plugins kvcompile/plugins
    ln -sfn ../passes kvcompile/passes
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  fi
  (cd /tmp && python3 -c "import kvcompile.plugins as m; print('kvcompile.plugins from', m.__file__)")
}

# Every GPU script starts the same way: `gpu_log NAME` makes $OUT (default .gpu_out/NAME),
# makes Python's output unbuffered, reuses a kernel library built before from the same sources
# (plugins/build.py) and copies everything printed into $OUT/gpu_NAME.log.
gpu_log() {
  OUT=${OUT:-$PWD/.gpu_out/$1}
  mkdir -p "$OUT"
  export PYTHONUNBUFFERED=1
  export KVCOMPILE_CACHE_DIR=${KVCOMPILE_CACHE_DIR:-$PWD/build/kvc_cache}
  exec > >(tee "$OUT/gpu_$1.log") 2>&1
}

# The device and torch a run measures on, for its log.
print_device() {
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
}

# `load_kernel_library [TIMEOUT_S]` builds the kernel library (or finds it in the cache: the
# sources' hash names it, plugins/build.py), prints its path and loads it. $KVCOMPILE_KERNELS_LIB
# pins a prebuilt library instead (e.g. one built on the CPU machine from the same sources and
# carried along). No TIMEOUT_S (0): no limit.
load_kernel_library() {
  timeout "${1:-0}" python3 -c "
import os
from kvcompile.plugins import build, load_kernels
print(os.environ.get('KVCOMPILE_KERNELS_LIB') or build.library_path())
load_kernels()"
}
