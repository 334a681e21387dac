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
# Independent work runs two at a time (its output then goes to OUT/logs/); the evals run one by
# one so their seconds per episode stay comparable. DEMO_RESUME=1 keeps OUT and skips the stages
# an earlier (interrupted) run finished.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${DEMO_OUT:-demo-out}
PKG=${DEMO_PACKAGE:-converted/demo}
CLI=${DUOMEM_CLI:-.venv/bin/duomem-mlx}
PY=${DUOMEM_PYTHON:-.venv/bin/python}
SEED=${DEMO_SEED:-0}
PRETRAIN_GAMES=${DEMO_PRETRAIN_GAMES:-40}    # TextWorld simple (detailed goals) for the student's pretraining
ORACLE_GAMES=${DEMO_ORACLE_GAMES:-120}        # cooking train games whose oracle chats train the teacher
TEACHER_GAMES=${DEMO_TEACHER_GAMES:-40}      # cooking train games the teacher then plays for the cache
TEST_GAMES=${DEMO_TEST_GAMES:-20}            # held-out cooking test games every variant plays
STUDENT=(--layers "${DEMO_STUDENT_LAYERS:-4}" --hidden "${DEMO_STUDENT_HIDDEN:-64}")
TEACHER=(--layers "${DEMO_TEACHER_LAYERS:-4}" --hidden "${DEMO_TEACHER_HIDDEN:-128}")
PRETRAIN_ITERS=${DEMO_PRETRAIN_ITERS:-80}
TEACHER_ITERS=${DEMO_TEACHER_ITERS:-240}
DISTILL_ITERS=${DEMO_DISTILL_ITERS:-150}
RANK=${DEMO_RANK:-16}
LORA_LR=${DEMO_LORA_LR:-8e-4}                 # with mlx-lm's LoRA scale 20; 2e-3 never gets below ~4 nats
ALPHA=${DEMO_ALPHA:-0.8}                      # loss = alpha * CE on the teacher's kept actions + (1 - alpha) * KD
MAX_STEPS=${DEMO_MAX_STEPS:-10}               # the walkthrough is 5 steps
BATCH=${DEMO_BATCH:-4}
if [ "${DEMO_RESUME:-0}" != 1 ]; then rm -rf "$OUT"; fi
mkdir -p "$OUT/eval" "$OUT/logs" "$OUT/done"
STAGES="$OUT/stages.tsv"   # stage, wall seconds, CPU seconds (all processes)
touch "$STAGES"
START=$SECONDS

cpu_seconds() {  # CPU of this shell's finished children, into $CPU (bash `times`, second line)
  times > "$OUT/.times"
  CPU=$(awk 'NR == 2 { s = 0; for (i = 1; i <= 2; i++) { split($i, t, /[ms]/); s += 60 * t[1] + t[2] } printf "%d", s }' "$OUT/.times")
}

stage() {  # NAME "what it does": run stage_NAME, time it; with DEMO_RESUME=1 skip it if done
  printf '\n== [%4ds] %s\n' "$((SECONDS - START))" "$2"
  if [ -e "$OUT/done/$1" ]; then echo "   done in an earlier run (DEMO_RESUME=1): skipped"; return 0; fi
  local wall=$SECONDS cpu
  cpu_seconds; cpu=$CPU
  "stage_$1"
  cpu_seconds
  printf '%s\t%s\t%s\n' "$1" "$((SECONDS - wall))" "$((CPU - cpu))" >> "$STAGES"
  touch "$OUT/done/$1"
}

together() {  # JOB...: run shell functions at once, each logging to OUT/logs/JOB.log; fails if one fails
  local names=("$@") pids=() name i failed=0
  echo "   in parallel: $* (logs: $OUT/logs/)"
  for name in "${names[@]}"; do "$name" > "$OUT/logs/$name.log" 2>&1 & pids+=($!); done
  for i in "${!names[@]}"; do
    name=${names[$i]}
    if wait "${pids[$i]}"; then
      printf '   [%4ds] %s done\n' "$((SECONDS - START))" "$name"
    else
      failed=1
      printf '   %s failed; the end of %s:\n' "$name" "$OUT/logs/$name.log"
      tail -n 5 "$OUT/logs/$name.log" | sed 's/^/     /'
    fi
  done
  return $failed
}

full=(--kd off --adapter full --num-layers -1 --learning-rate 2e-3 --batch-size "$BATCH" --max-seq-length 1200 --seed "$SEED")
lora=(--adapter lora --rank "$RANK" --alpha "$ALPHA" --num-layers -1 --learning-rate "$LORA_LR" --batch-size "$BATCH" --iters "$DISTILL_ITERS" --seed "$SEED")
distill_to() {  # OUT [distill options]: a run finished in an earlier try is kept, a killed one continued
  local out=$1
  shift
  if [ -e "$out/duomem.json" ]; then echo "   $out: finished in an earlier run, kept"; return 0; fi
  $CLI distill "$@" --resume --out "$out"
}
evaluate() {  # NAME [eval options]: the held-out test games
  local name=$1
  shift
  $CLI eval --env textworld --tasks cooking --split test --episodes "$TEST_GAMES" --max-steps "$MAX_STEPS" \
    --seed "$SEED" --out "$OUT/eval/$name.json" --log "$OUT/eval/$name.jsonl" "$@"
}

stage_models() {
  $CLI tiny-model "$OUT/student-init" "${STUDENT[@]}" --seed "$SEED"
  $CLI tiny-model "$OUT/teacher-init" "${TEACHER[@]}" --seed "$SEED" --tokenizer-from "$OUT/student-init"
}

pretrain_games() {  # oracle chats of simple games (detailed goals), with their rule memories
  $CLI teach --teacher oracle --teacher-tokenizer "$OUT/student-init" --env textworld --tasks simple --split train \
    --episodes "$PRETRAIN_GAMES" --seed "$SEED" --resume --out "$OUT/pretrain-cache"
}
cooking_train_games() {
  $CLI teach --teacher oracle --teacher-tokenizer "$OUT/student-init" --env textworld --tasks cooking --split train \
    --episodes "$ORACLE_GAMES" --seed "$SEED" --resume --out "$OUT/oracle-cache"
}
cooking_test_games() {
  evaluate oracle --policy oracle
}
stage_games() {
  together pretrain_games cooking_train_games cooking_test_games
}

pretrain_student() {  # detailed goals in the task, memories of simple games in the prompt: it learns to read
  $CLI memory build --cache "$OUT/pretrain-cache" --embedder "$OUT/student-init" --force --out "$OUT/pretrain-bank"
  distill_to "$OUT/pretrain" --student "$OUT/student-init" --cache "$OUT/pretrain-cache" --memory-bank "$OUT/pretrain-bank" \
    "${full[@]}" --iters "$PRETRAIN_ITERS"
  $CLI quantize --model "$OUT/student-init" --adapters "$OUT/pretrain" --bits 16 --force --out "$OUT/student"
  rm -rf "$OUT/student/memory"  # the simple games' memories were pretraining data: student_base reads no bank
}
train_teacher() {
  distill_to "$OUT/teacher-train" --student "$OUT/teacher-init" --cache "$OUT/oracle-cache" "${full[@]}" --iters "$TEACHER_ITERS"
  $CLI quantize --model "$OUT/teacher-init" --adapters "$OUT/teacher-train" --bits 16 --force --out "$OUT/teacher"
}
stage_pretrain() {
  together pretrain_student train_teacher
}

stage_teach() {
  $CLI teach --teacher "mlx:$OUT/teacher" --env textworld --tasks cooking --split train --episodes "$TEACHER_GAMES" \
    --max-steps "$MAX_STEPS" --top-k 20 --seed "$SEED" --resume --out "$OUT/teacher-cache"
  $CLI cache info "$OUT/teacher-cache"
  $CLI memory build --cache "$OUT/teacher-cache" --embedder "$OUT/student" --force --out "$OUT/bank"
}

distill_lora() {
  distill_to "$OUT/lora" --student "$OUT/student" --cache "$OUT/teacher-cache" "${lora[@]}"
}
distill_duomem() {
  distill_to "$OUT/duomem" --student "$OUT/student" --cache "$OUT/teacher-cache" --memory-bank "$OUT/bank" "${lora[@]}"
}
stage_distill() {
  together distill_lora distill_duomem
}

stage_heldout() {
  $PY scripts/check_heldout.py --train "$OUT/pretrain-cache" "$OUT/oracle-cache" "$OUT/teacher-cache" \
    --test "$OUT/eval/oracle.jsonl" --json "$OUT/heldout.json"
}

stage_eval() {
  evaluate student_base --policy "model:$OUT/student"
  evaluate student_memory --policy "model:$OUT/student" --memory "$OUT/bank"
  evaluate student_lora --policy "model:$OUT/student" --adapter-path "$OUT/lora"
  evaluate duomem --policy "model:$OUT/student" --adapter-path "$OUT/duomem" --memory "$OUT/duomem/memory"
  evaluate teacher --policy "model:$OUT/teacher"
}

stage_selfmem() {
  $CLI eval --env textworld --tasks cooking --split train --episodes "$TEACHER_GAMES" --max-steps "$MAX_STEPS" --seed "$SEED" \
    --policy "model:$OUT/student" --out "$OUT/student-train.json" --log "$OUT/student-train.jsonl"
  if $CLI memory write --episodes "$OUT/student-train.jsonl" --writer rules --out "$OUT/self-memories.jsonl" --force; then
    $CLI memory build --memories "$OUT/self-memories.jsonl" --embedder "$OUT/student" --out "$OUT/self-bank" --force
    evaluate student_selfmem --policy "model:$OUT/student" --memory "$OUT/self-bank"
  else
    echo "student_selfmem skipped: the student won none of the train games, so it has no memories of its own to write"
  fi
}

stage_package() {
  rm -rf "$PKG"
  $CLI quantize --model "$OUT/student" --adapters "$OUT/duomem" --bits 4 --group-size 32 --out "$PKG"
  $CLI quantize --model "$OUT/student" --adapters "$OUT/duomem" --bits 16 --out "$OUT/duomem-bf16" --force
  evaluate duomem_4bit --policy "model:$PKG" --memory "$PKG/memory"
}

stage_bench() {
  $CLI bench "$OUT/teacher" "$OUT/duomem-bf16" "$PKG" --json "$OUT/bench.json" --plot "$PKG/bench.png"
}

stage models "tiny models: the student and a larger teacher, one tokenizer"
stage games "games: oracle plays of simple (pretraining) and cooking train games, and the cooking test games"
stage pretrain "student_base (pretrained on simple games: detailed goals, their memories in the prompt) and the teacher (oracle cooking chats)"
stage teach "the teacher plays the train split: cache of its kept episodes, top-20 distributions, rule memories"
stage distill "distill: LoRA on the teacher's cache, without (student_lora) and with its memories (duomem)"
stage heldout "held-out test games, checked by content against every training game"
stage eval "the variants on the same held-out games"
stage selfmem "student_selfmem: memories the student writes (rules) from its own successes on the train split"
stage package "the winner (duomem) to 4 bit in $PKG, its bank rebuilt in the quantized model's space"
stage bench "on-device speed: teacher vs bf16 student vs 4-bit student, side by side"

selfmem=()
if [ -e "$OUT/eval/student_selfmem.json" ]; then
  selfmem=(--variant "student_selfmem=$OUT/eval/student_selfmem.json,memory=$OUT/self-bank")
fi
WALL=$(awk -F'\t' '{ s += $2 } END { print s + 0 }' "$STAGES")  # all stages, also across resumed runs
$PY scripts/demo_report.py --out "$PKG" --seeds "$SEED" --wall-clock "$WALL" \
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
awk -F'\t' '{ printf "  %-10s %6d s wall %6d s CPU\n", $1, $2, $3 }' "$STAGES"
printf '\nDone in %ds. Table: %s/results.md (json, png beside it); package: %s (try `%s chat --model %s`);\n' \
  "$((SECONDS - START))" "$PKG" "$PKG" "$CLI" "$PKG"
printf 'working files (caches, banks, adapters, eval logs): %s/\n' "$OUT"
