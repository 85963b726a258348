#!/usr/bin/env bash
# reference-long: one GPU call that trains (or continues) the long-context reference model under a
# hard wall-clock stop, saves the fp32 checkpoint into $OUT/ckpt, exports bf16 weights (to /tmp,
# loaded back with plain transformers) and scores them at 2K/4K/8K with what time remains.
#
#   OUT=/tmp/out bash bench/gpu_train_long.sh          # carry build/corpus (the corpus pack)
#
# Before the call, here: python -m kvcompile.reference.corpus_pack --out build/corpus/stdlib.pack.xz
# Times are seconds from this script's start (the run's timeout should be >= HARD_S + 10):
#   TRAIN_S (500) training stops and the checkpoint is written, whatever the step
#   EVAL_S  (545) no evaluation task starts after this
#   HARD_S  (558) the Python process is interrupted, then killed 5 s later
# What comes back (the return path takes 8 files): $OUT/gpu_train_long.log and $OUT/ckpt/ with
# model.safetensors.part00..03 (fp32 weights, 51 MB: the optimizer moments would add 51 MB more
# and do not fit, so a resume re-warms the learning rate), state.json, train_log.jsonl, eval.json.
# Resume: RESUME=kvcompile/reference/weights_long bash bench/gpu_train_long.sh (the shipped bf16 weights
# carry their training_state.json). A resumed job defaults to the chain-teaching mix and curriculum
# (docs/REFERENCE_MODEL.md, "Teaching the chain"): MIX text,retrieval,program,long_program,chain =
# 0.2,0.05,0.25,0.05,0.45 and CURRICULUM 2048:0.4,4096:0.9,8192:1; a fresh job keeps the first job's.
# CPU smoke run of the whole path (tiny model, ~1-2 minutes): see tests/reference/test_long.py
#   SIZE=long-tiny TRAIN_S=40 EVAL_S=60 HARD_S=120 CURRICULUM=256:0.5,1024:1 BATCH_TOKENS=2048 \
#   WORKERS=1 FINAL_EVAL=2 PPL_WINDOWS=2 TASKS_EVERY=1e9 OUT=/tmp/out bash bench/gpu_train_long.sh
set -uo pipefail
START=$(date +%s)
cd "$(dirname "$0")/.."
source bench/gpu_install.sh
gpu_log train_long

TRAIN_S=${TRAIN_S:-500}; EVAL_S=${EVAL_S:-545}; HARD_S=${HARD_S:-558}
CORPUS=${CORPUS:-build/corpus/stdlib.pack.xz}

echo "== device"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi (CPU run)"
echo "== install"
install_kvcompile || exit 1
if [ ! -f "$CORPUS" ]; then
  echo "no corpus pack at $CORPUS: build it with python -m kvcompile.reference.corpus_pack --out $CORPUS and carry it"
  exit 1
fi
RESUME_ARGS=()
DEFAULT_MIX=0.3,0.2,0.15,0.35; DEFAULT_CURRICULUM=1024:0.15,4096:0.5,8192:1
if [ -n "${RESUME:-}" ]; then
  RESUME_ARGS=(--resume "$RESUME")
  # The copy skill is missing at every distance: chain documents and the short programs (the
  # densest copy asserts) take 70%. 2048 first (short-range chains), then 4096 (6 x 512 + question
  # fits, ~15% faster than 8192); the last 10% at 8192 keeps retrieval at the full context in practice.
  DEFAULT_MIX=0.2,0.05,0.25,0.05,0.45; DEFAULT_CURRICULUM=2048:0.4,4096:0.9,8192:1
fi
echo "mix ${MIX:-$DEFAULT_MIX}, curriculum ${CURRICULUM:-$DEFAULT_CURRICULUM}"

echo "== train (setup took $(( $(date +%s) - START )) s; training stops at +${TRAIN_S} s)"
timeout --signal=INT --kill-after=5 $(( START + HARD_S - $(date +%s) )) \
  python3 -m kvcompile.reference.train --size "${SIZE:-long}" --out "$OUT/ckpt" --corpus "$CORPUS" \
    --stop-at $(( START + TRAIN_S )) --eval-stop-at $(( START + EVAL_S )) --minutes 600 \
    --total-steps 10000000 --decay-steps 1 --decay-frac "${DECAY_FRAC:-0.2}" \
    --curriculum "${CURRICULUM:-$DEFAULT_CURRICULUM}" --batch-tokens "${BATCH_TOKENS:-65536}" \
    --lr "${LR:-2e-3}" --warmup-steps "${WARMUP:-150}" --mix "${MIX:-$DEFAULT_MIX}" --answer-weight "${ANSWER_WEIGHT:-3}" \
    --no-optimizer-state --workers "${WORKERS:-10}" --log-every "${LOG_EVERY:-50}" --bpb-every-s 30 \
    --tasks-every-s "${TASKS_EVERY:-90}" --save-every-s 120 \
    --export "${EXPORT_DIR:-/tmp/reference_long_export}" --final-eval "${FINAL_EVAL:-100}" \
    --final-ppl-windows "${PPL_WINDOWS:-256}" "${RESUME_ARGS[@]}"
echo "train exit: $? after $(( $(date +%s) - START )) s"
echo "== returned files (at most 8 come back)"
find "$OUT" -type f | sort | xargs ls -la
n=$(find "$OUT" -type f | wc -l)
[ "$n" -le 8 ] || echo "WARNING: $n files under \$OUT, only 8 come back"
