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
