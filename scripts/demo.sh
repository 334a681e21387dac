#!/usr/bin/env bash
# DuoMem in miniature, offline on a CPU, through the package's own commands only.
#
#   target family   TextWorld `cooking`: "You are hungry! ... Check the cookbook": the steps
#                   (inventory, examine cookbook, take the listed ingredient, prepare meal, eat
#                   meal) are in the world, never in the task text.
#   student_base    a tiny qwen3 "instruct model": pretrained to follow step-by-step goals in
#                   TextWorld `simple` games (detailed goals), never a cooking game.
#   teacher         a larger tiny qwen3, same tokenizer, trained on oracle cooking
#                   trajectories with full history; it then plays the train split through
#                   `teach --teacher mlx:` (real top-k distributions, rule memories).
#   variants        student_base, student_memory, student_lora, duomem, student_selfmem,
#                   teacher: the same held-out test games (checked: held out by content).
#
# Sizes are environment variables (defaults fit ~20 min on 2 free CPU cores); seeds fixed.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${DEMO_OUT:-demo-out}
PKG=${DEMO_PACKAGE:-converted/demo}
CLI=${DUOMEM_CLI:-.venv/bin/duomem-mlx}
PY=${DUOMEM_PYTHON:-.venv/bin/python}
SEED=${DEMO_SEED:-0}
PRETRAIN_GAMES=${DEMO_PRETRAIN_GAMES:-40}    # TextWorld simple (detailed goals) for the student's pretraining
TEACHER_GAMES=${DEMO_TEACHER_GAMES:-40}      # cooking train games: the teacher's oracle data, then its own play
TEST_GAMES=${DEMO_TEST_GAMES:-20}            # held-out cooking test games every variant plays
STUDENT=(--layers "${DEMO_STUDENT_LAYERS:-4}" --hidden "${DEMO_STUDENT_HIDDEN:-64}")
TEACHER=(--layers "${DEMO_TEACHER_LAYERS:-4}" --hidden "${DEMO_TEACHER_HIDDEN:-128}")
PRETRAIN_ITERS=${DEMO_PRETRAIN_ITERS:-80}
TEACHER_ITERS=${DEMO_TEACHER_ITERS:-80}
DISTILL_ITERS=${DEMO_DISTILL_ITERS:-60}
MAX_STEPS=${DEMO_MAX_STEPS:-10}               # the walkthrough is 5 steps
BATCH=${DEMO_BATCH:-4}
rm -rf "$OUT" && mkdir -p "$OUT/eval"
STAGES="$OUT/stages.tsv"
: > "$STAGES"
START=$SECONDS
stage_start=$SECONDS
stage_name=""

stage() {  # close the running stage (its seconds go to stages.tsv), open the next
  [ -n "$stage_name" ] && printf '%s\t%s\n' "$stage_name" "$((SECONDS - stage_start))" >> "$STAGES"
  stage_name="$1"
  stage_start=$SECONDS
  [ -n "$1" ] && printf '\n== [%4ds] %s\n' "$((SECONDS - START))" "$2"
  return 0
}
full=(--kd off --adapter full --num-layers -1 --learning-rate 2e-3 --batch-size "$BATCH" --max-seq-length 1200 --seed "$SEED")
evaluate() {  # NAME [eval options]: the held-out test games
  local name=$1
  shift
  $CLI eval --env textworld --tasks cooking --split test --episodes "$TEST_GAMES" --max-steps "$MAX_STEPS" \
    --seed "$SEED" --out "$OUT/eval/$name.json" --log "$OUT/eval/$name.jsonl" "$@"
}

stage models "tiny models: the student and a larger teacher, one tokenizer"
$CLI tiny-model "$OUT/student-init" "${STUDENT[@]}" --seed "$SEED"
$CLI tiny-model "$OUT/teacher-init" "${TEACHER[@]}" --seed "$SEED" --tokenizer-from "$OUT/student-init"

stage pretrain "student_base: pretrain the student to follow detailed goals (TextWorld simple, no cooking)"
$CLI teach --teacher oracle --teacher-tokenizer "$OUT/student-init" --env textworld --tasks simple --split train \
  --episodes "$PRETRAIN_GAMES" --seed "$SEED" --out "$OUT/pretrain-cache"
$CLI distill --student "$OUT/student-init" --cache "$OUT/pretrain-cache" "${full[@]}" --iters "$PRETRAIN_ITERS" --out "$OUT/pretrain"
$CLI quantize --model "$OUT/student-init" --adapters "$OUT/pretrain" --bits 16 --out "$OUT/student"

stage teacher "teacher: trained on oracle cooking trajectories of the train split"
$CLI teach --teacher oracle --teacher-tokenizer "$OUT/student-init" --env textworld --tasks cooking --split train \
  --episodes "$TEACHER_GAMES" --seed "$SEED" --out "$OUT/oracle-cache"
$CLI distill --student "$OUT/teacher-init" --cache "$OUT/oracle-cache" "${full[@]}" --iters "$TEACHER_ITERS" --out "$OUT/teacher-train"
$CLI quantize --model "$OUT/teacher-init" --adapters "$OUT/teacher-train" --bits 16 --out "$OUT/teacher"

stage teach "the teacher plays the train split: cache of its kept episodes, top-20 distributions, rule memories"
$CLI teach --teacher "mlx:$OUT/teacher" --env textworld --tasks cooking --split train --episodes "$TEACHER_GAMES" \
  --max-steps "$MAX_STEPS" --top-k 20 --seed "$SEED" --out "$OUT/teacher-cache"
$CLI cache info "$OUT/teacher-cache"
$CLI memory build --cache "$OUT/teacher-cache" --embedder "$OUT/student" --out "$OUT/bank"

stage distill "distill: LoRA on the teacher's cache, without (student_lora) and with its memories (duomem)"
$CLI distill --student "$OUT/student" --cache "$OUT/teacher-cache" --iters "$DISTILL_ITERS" --seed "$SEED" \
  --batch-size "$BATCH" --learning-rate 2e-3 --num-layers -1 --out "$OUT/lora"
$CLI distill --student "$OUT/student" --cache "$OUT/teacher-cache" --memory-bank "$OUT/bank" --iters "$DISTILL_ITERS" \
  --seed "$SEED" --batch-size "$BATCH" --learning-rate 2e-3 --num-layers -1 --out "$OUT/duomem"

stage heldout "held-out test games, checked by content against every training game"
evaluate oracle --policy oracle
$PY scripts/check_heldout.py --train "$OUT/pretrain-cache" "$OUT/oracle-cache" "$OUT/teacher-cache" \
  --test "$OUT/eval/oracle.jsonl" --json "$OUT/heldout.json"

stage eval "the variants on the same held-out games"
evaluate student_base --policy "model:$OUT/student"
evaluate student_memory --policy "model:$OUT/student" --memory "$OUT/bank"
evaluate student_lora --policy "model:$OUT/student" --adapter-path "$OUT/lora"
evaluate duomem --policy "model:$OUT/student" --adapter-path "$OUT/duomem" --memory "$OUT/duomem/memory"
evaluate teacher --policy "model:$OUT/teacher"

stage selfmem "student_selfmem: memories the student writes (rules) from its own successes on the train split"
$CLI eval --env textworld --tasks cooking --split train --episodes "$TEACHER_GAMES" --max-steps "$MAX_STEPS" --seed "$SEED" \
  --policy "model:$OUT/student" --out "$OUT/student-train.json" --log "$OUT/student-train.jsonl"
selfmem=()
if $CLI memory write --episodes "$OUT/student-train.jsonl" --writer rules --out "$OUT/self-memories.jsonl"; then
  $CLI memory build --memories "$OUT/self-memories.jsonl" --embedder "$OUT/student" --out "$OUT/self-bank"
  evaluate student_selfmem --policy "model:$OUT/student" --memory "$OUT/self-bank"
  selfmem=(--variant "student_selfmem=$OUT/eval/student_selfmem.json,memory=$OUT/self-bank")
else
  echo "student_selfmem skipped: the student won none of the train games, so it has no memories of its own to write"
fi

stage package "the winner (duomem) to 4 bit in $PKG, its bank rebuilt in the quantized model's space"
rm -rf "$PKG"
$CLI quantize --model "$OUT/student" --adapters "$OUT/duomem" --bits 4 --group-size 32 --out "$PKG"
$CLI quantize --model "$OUT/student" --adapters "$OUT/duomem" --bits 16 --out "$OUT/duomem-bf16"
evaluate duomem_4bit --policy "model:$PKG" --memory "$PKG/memory"

stage bench "on-device speed: teacher vs bf16 student vs 4-bit student, side by side"
$CLI bench "$OUT/teacher" "$OUT/duomem-bf16" "$PKG" --json "$OUT/bench.json" --plot "$PKG/bench.png"

stage ""  # closes the last stage
$PY scripts/demo_report.py --out "$PKG" --seeds "$SEED" --wall-clock "$((SECONDS - START))" \
  --stages "$STAGES" --heldout "$OUT/heldout.json" --bench "$OUT/bench.json" \
  --variant "student_base=$OUT/eval/student_base.json" \
  --variant "student_memory=$OUT/eval/student_memory.json,memory=$OUT/bank" \
  --variant "student_lora=$OUT/eval/student_lora.json,adapters=$OUT/lora" \
  --variant "duomem=$OUT/eval/duomem.json,adapters=$OUT/duomem,memory=$OUT/duomem/memory" \
  --variant "duomem_4bit=$OUT/eval/duomem_4bit.json,adapters=$OUT/duomem,memory=$PKG/memory" \
  ${selfmem[@]+"${selfmem[@]}"} \
  --teacher "$OUT/eval/teacher.json"
$CLI upload "$PKG" --repo you/duomem-demo --dry-run

printf '\nstage seconds:\n'
awk -F'\t' '{ printf "  %-10s %6d s\n", $1, $2 }' "$STAGES"
printf '\nDone in %ds. Table: %s/results.md (json, png beside it); package: %s (try `%s chat --model %s`);\n' \
  "$((SECONDS - START))" "$PKG" "$PKG" "$CLI" "$PKG"
printf 'working files (caches, banks, adapters, eval logs): %s/\n' "$OUT"
