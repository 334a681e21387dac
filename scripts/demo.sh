#!/usr/bin/env bash
# DuoMem in miniature on a real instruct student, offline on a CPU, through the package's commands only.
#
#   family          TextWorldExpress (`twx`): four game types a 135M teacher learns, each its own
#                   procedure (coin, mapreader, simonsays, twc); test-fold games held out. arithmetic
#                   (sums a 135M model cannot do: 10%) and peckingorder (20%) kept the teacher at 62%
#                   (runs 6-9, docs/demo.md); DEMO_TASKS brings them back.
#   memories        MemP's kind `both` (DEMO_MEMORY_KIND): a script, then a solved episode (each
#                   observation's gist and the action taken); k = 2, keyed by the task text they
#                   were written for; never one written from the game being played.
#   student_base    SmolLM2-135M-Instruct (from its PyPI GGUF, converted; float32 on a CPU).
#   teacher         the same model with LoRA (rank 16, last 8 blocks) trained on the oracle's games of
#                   every type; it plays the train split through `teach --teacher mlx:` (kept
#                   successes, real top-20 rows, its own memories written by rules from its successes).
#                   DEMO_TEACHER_READS=1: trained and playing with the oracle's memories in front
#                   (it won 53% of the held-out games that way, 69% without: docs/demo.md).
#   student_selfmem the student's own memories (MemP): the same rule writer and kind over the student's
#                   own successful train games.
#   adapters        LoRA (rank 16, last 8 blocks) on the teacher's cache of every type, as the paper
#                   trains on every ALFWorld task type (DEMO_ADAPTER_TASKS=coin,simonsays,twc leaves
#                   mapreader to the memories alone: run 10, docs/demo.md), without memories
#                   (student_lora) or with the student's own (lora_selfmem).
#   duomem          lora_selfmem's adapters reading the teacher's memories instead (the paper's swap: the
#                   same adapters, the memories replaced), the bank rebuilt in those adapters' space.
#                   DEMO_DUOMEM_ADAPTERS=teacher trains its own adapters with the teacher's memories in
#                   every prompt: they learn to replay a memory's moves and loop (80.0% vs 87.5% on 120
#                   dev games, 11-2, p 0.022: docs/demo.md, run 12).
#   variants        student_base, student_selfmem, student_memory, student_lora, lora_selfmem, duomem,
#                   duomem_4bit, teacher: the same held-out test games (checked: held out by content).
#
# Sizes are environment variables (defaults aim at ~45 min on 2 free CPU cores); seeds fixed.
# Independent jobs run side by side, up to four to a stage, each with one BLAS thread (their output
# then goes to OUT/logs/). DEMO_RESUME=1 keeps OUT and skips the stages an earlier run finished.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${DEMO_OUT:-demo-out}
PKG=${DEMO_PACKAGE:-converted/demo}
CLI=${DUOMEM_CLI:-.venv/bin/duomem-mlx}
PY=${DUOMEM_PYTHON:-.venv/bin/python}
SEED=${DEMO_SEED:-0}
MODEL=${DEMO_MODEL:-smollm2-135m-instruct}   # `duomem-mlx convert --list`
TASKS=${DEMO_TASKS:-coin,mapreader,simonsays,twc}
ADAPTER_TASKS=${DEMO_ADAPTER_TASKS:-$TASKS}  # any left out reach the student through memories alone
# Two rooms (coin, mapreader: the other room is one move away), one item to put away (twc).
GAME_PARAMS=${DEMO_GAME_PARAMS:-coin:numLocations=2;mapreader:numLocations=2,maxDistanceApart=1;twc:numItemsToPutAway=1}
ORACLE_GAMES=${DEMO_ORACLE_GAMES:-24}     # per type: train games whose oracle chats train the teacher
TEACHER_GAMES=${DEMO_TEACHER_GAMES:-30}   # per type: train games the teacher plays
SELF_GAMES=${DEMO_SELF_GAMES:-4}          # per type: train games the student plays for memories of its own
TEST_GAMES=${DEMO_TEST_GAMES:-15}         # per type: held-out test games every variant plays
PACKAGE_GAMES=${DEMO_PACKAGE_GAMES:-$TEST_GAMES}  # per type for the 4-bit package (4 before the CPU quantized kernel, cpu/kernel.py)
TEACHER_ITERS=${DEMO_TEACHER_ITERS:-64}
TEACHER_LR=${DEMO_TEACHER_LR:-5e-4}
DISTILL_ITERS=${DEMO_DISTILL_ITERS:-48}
RANK=${DEMO_RANK:-16}                     # the student's LoRA, as the teacher's (rank 8, 4 blocks, 20 steps: 24%)
LORA_LAYERS=${DEMO_LORA_LAYERS:-8}        # ... on the last blocks only
LR=${DEMO_LR:-5e-4}                       # 1e-3 diverges on SmolLM2 (loss 13 by step 20)
ALPHA=${DEMO_ALPHA:-0.5}                  # loss = alpha * CE on the teacher's kept actions + (1 - alpha) * KD
MEMORY_K=${DEMO_MEMORY_K:-2}
MEMORY_KIND=${DEMO_MEMORY_KIND:-both}     # script | trajectory | both (MemP)
MEMORY_KEY=${DEMO_MEMORY_KEY:-task}           # task+observation: 91.7% retrieval accuracy, no better instance match (docs/demo.md)
TEACHER_READS=${DEMO_TEACHER_READS:-0}
DUOMEM_ADAPTERS=${DEMO_DUOMEM_ADAPTERS:-selfmem}  # selfmem: lora_selfmem's | teacher: trained with the teacher's memories
MAX_STEPS=${DEMO_MAX_STEPS:-12}           # gold paths: peckingorder 9, mapreader 7, arithmetic and simonsays 5, twc 3-4, coin 2-3
BATCH=${DEMO_BATCH:-4}
case "$DUOMEM_ADAPTERS" in
  selfmem | teacher) ;;
  *) echo "DEMO_DUOMEM_ADAPTERS=$DUOMEM_ADAPTERS: use selfmem (lora_selfmem's adapters) or teacher (adapters trained with the teacher's memories)" >&2; exit 2 ;;
esac
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
  for name in "${names[@]}"; do OPENBLAS_NUM_THREADS=1 "$name" > "$OUT/logs/$name.log" 2>&1 & pids+=($!); done
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

teacher_lora=(--kd off --adapter lora --rank 16 --num-layers 8 --learning-rate "$TEACHER_LR" --batch-size "$BATCH" --val-fraction 0 --seed "$SEED")
lora=(--tasks "$ADAPTER_TASKS" --adapter lora --rank "$RANK" --num-layers "$LORA_LAYERS" --alpha "$ALPHA" --learning-rate "$LR" --batch-size "$BATCH"
      --iters "$DISTILL_ITERS" --val-fraction 0 --seed "$SEED")
games=(--env twx --tasks "$TASKS" --game-params "$GAME_PARAMS" --max-steps "$MAX_STEPS" --seed "$SEED")
reads=(--memory-k "$MEMORY_K")
bank() {  # MEMORIES_OR_CACHE OUT [--adapter-path ADAPTERS]: a bank in the student's space (as those adapters read it)
  local from=(--memories "$1")
  if [ -d "$1" ]; then from=(--cache "$1"); fi
  $CLI memory build "${from[@]}" --embedder "$OUT/student" --key "$MEMORY_KEY" --force --out "$2" "${@:3}"
}
distill_to() {  # OUT [distill options]: a run finished in an earlier try is kept, a killed one continued
  local out=$1
  shift
  if [ -e "$out/duomem.json" ]; then echo "   $out: finished in an earlier run, kept"; return 0; fi
  $CLI distill "$@" --resume --out "$out"
}
evaluate() {  # NAME [eval options]: the held-out test games; one finished in an earlier try is kept
  local name=$1
  shift
  if [ -e "$OUT/eval/$name.json" ]; then echo "   $name: evaluated in an earlier run, kept"; return 0; fi
  $CLI eval "${games[@]}" --split test --episodes "$TEST_GAMES" --out "$OUT/eval/$name.json" --log "$OUT/eval/$name.jsonl" "$@"
}

stage_models() {
  if [ ! -e "$OUT/student/config.json" ]; then $CLI convert --fetch "$MODEL" "$OUT/student"; fi
}

teacher_reads=()  # with DEMO_TEACHER_READS=1: the oracle's memories, in training and (rebuilt in its space) in play
if [ "$TEACHER_READS" = 1 ]; then teacher_reads=(--memory-bank "$OUT/oracle-bank" "${reads[@]}"); fi

stage_games() {
  $CLI teach "${games[@]}" --split train --teacher oracle --teacher-tokenizer "$OUT/student" --episodes "$ORACLE_GAMES" \
    --memory-kind "$MEMORY_KIND" --resume --out "$OUT/oracle-cache"
  evaluate oracle --policy oracle
}

train_teacher() {  # LoRA on the oracle's games, fused
  if [ "$TEACHER_READS" = 1 ]; then bank "$OUT/oracle-cache" "$OUT/oracle-bank"; fi
  distill_to "$OUT/teacher-train" --student "$OUT/student" --cache "$OUT/oracle-cache" ${teacher_reads[@]+"${teacher_reads[@]}"} \
    "${teacher_lora[@]}" --iters "$TEACHER_ITERS"
  $CLI quantize --model "$OUT/student" --adapters "$OUT/teacher-train" --bits 16 --dtype float32 --force --out "$OUT/teacher"
}
student_alone() {  # all the student does without the teacher: student_base, and its own memories (MemP)
  evaluate student_base --policy "model:$OUT/student"
  if [ ! -e "$OUT/student-train.json" ]; then
    $CLI eval "${games[@]}" --split train --episodes "$SELF_GAMES" --policy "model:$OUT/student" \
      --out "$OUT/student-train.json" --log "$OUT/student-train.jsonl"
  fi
  if $CLI memory write --episodes "$OUT/student-train.jsonl" --writer rules --kind "$MEMORY_KIND" --out "$OUT/self-memories.jsonl" --force; then
    bank "$OUT/self-memories.jsonl" "$OUT/self-bank"
    evaluate student_selfmem --policy "model:$OUT/student" --memory "$OUT/self-bank" "${reads[@]}"
  else
    echo "student_selfmem skipped: the student won no train game, so it has no memory of its own"
  fi
}
stage_teacher() {
  together train_teacher student_alone
}

teacher_plays() {  # its own memories from its successes (with DEMO_TEACHER_READS=1 reading the oracle's: its package's memory/)
  local bank=()
  if [ "$TEACHER_READS" = 1 ]; then bank=(--memory "$OUT/teacher/memory" "${reads[@]}"); fi
  $CLI teach "${games[@]}" --split train --teacher "mlx:$OUT/teacher" ${bank[@]+"${bank[@]}"} \
    --episodes "$TEACHER_GAMES" --top-k 20 --memory-kind "$MEMORY_KIND" --resume --out "$OUT/teacher-cache"
  $CLI cache info "$OUT/teacher-cache"
  bank "$OUT/teacher-cache" "$OUT/bank"
  $CLI memory search "$OUT/bank" --accuracy-on "$OUT/eval/oracle.jsonl" --json "$OUT/retrieval.json"
}
eval_teacher() { evaluate teacher --policy "model:$OUT/teacher" "${reads[@]}"; }
stage_teach() {
  together teacher_plays eval_teacher
}

distill_lora() {
  distill_to "$OUT/lora" --student "$OUT/student" --cache "$OUT/teacher-cache" "${lora[@]}"
}
distill_selfmem() {
  if [ -e "$OUT/self-bank/bank.json" ]; then
    distill_to "$OUT/lora-selfmem" --student "$OUT/student" --cache "$OUT/teacher-cache" --memory-bank "$OUT/self-bank" "${reads[@]}" "${lora[@]}"
  fi
}
swapped() {  # duomem = lora_selfmem's adapters reading the teacher's memories (else adapters of its own: DEMO_DUOMEM_ADAPTERS=teacher, or no self-bank)
  [ "$DUOMEM_ADAPTERS" = selfmem ] && [ -e "$OUT/self-bank/bank.json" ]
}
duomem_adapters() { if swapped; then echo "$OUT/lora-selfmem"; else echo "$OUT/duomem"; fi; }
duomem_bank() { if swapped; then echo "$OUT/duomem-bank"; else echo "$OUT/duomem/memory"; fi; }
distill_duomem() {
  if ! swapped; then
    distill_to "$OUT/duomem" --student "$OUT/student" --cache "$OUT/teacher-cache" --memory-bank "$OUT/bank" "${reads[@]}" "${lora[@]}"
  fi
}
eval_memory() { evaluate student_memory --policy "model:$OUT/student" --memory "$OUT/bank" "${reads[@]}"; }
stage_distill() {
  together distill_lora distill_selfmem distill_duomem eval_memory
  if swapped; then bank "$OUT/teacher-cache" "$OUT/duomem-bank" --adapter-path "$OUT/lora-selfmem"; fi
}

stage_heldout() {
  $PY scripts/check_heldout.py --train "$OUT/oracle-cache" "$OUT/teacher-cache" --test "$OUT/eval/oracle.jsonl" --json "$OUT/heldout.json"
}

eval_lora() { evaluate student_lora --policy "model:$OUT/student" --adapter-path "$OUT/lora"; }
eval_lora_selfmem() {
  if [ -e "$OUT/lora-selfmem/duomem.json" ]; then
    evaluate lora_selfmem --policy "model:$OUT/student" --adapter-path "$OUT/lora-selfmem" --memory "$OUT/lora-selfmem/memory" "${reads[@]}"
  fi
}
eval_duomem() { evaluate duomem --policy "model:$OUT/student" --adapter-path "$(duomem_adapters)" --memory "$(duomem_bank)" "${reads[@]}"; }
package() {  # duomem to 4 bit, the teacher's memories rebuilt in the quantized model's space; a subset of the games
  local duomem=(--model "$OUT/student" --adapters "$(duomem_adapters)" --memory "$(duomem_bank)")
  rm -rf "$PKG"
  $CLI quantize "${duomem[@]}" --bits 4 --out "$PKG"  # quantize picks the recipe measured best (issue 28)
  $CLI quantize "${duomem[@]}" --bits 16 --dtype float32 --out "$OUT/duomem-f32" --force
  $CLI eval "${games[@]}" --split test --episodes "$PACKAGE_GAMES" --policy "model:$PKG" --memory "$PKG/memory" "${reads[@]}" \
    --out "$OUT/eval/duomem_4bit.json" --log "$OUT/eval/duomem_4bit.jsonl"
}
stage_eval() {
  together eval_lora eval_lora_selfmem eval_duomem package
}

stage_bench() {
  $CLI bench "$OUT/teacher" "$OUT/duomem-f32" "$PKG" --steps 4 --repeats 1 --max-tokens 8 --time-limit 300 \
    --json "$OUT/bench.json" --plot "$PKG/bench.png"
}

stage models "the student: $MODEL from its PyPI GGUF, converted for mlx-lm"
stage games "games: oracle plays of the train split (the teacher's training data) and of the held-out test games"
stage teacher "the teacher (LoRA on the oracle's chats of every type, fused) beside the student alone (student_base, student_selfmem)"
stage teach "the teacher plays the train split (kept episodes, top-20 rows, its memories; retrieval accuracy) beside the teacher's eval"
stage distill "distill on the types $ADAPTER_TASKS: LoRA without memories (student_lora), with the student's own (lora_selfmem; duomem's adapters: $DUOMEM_ADAPTERS); student_memory beside"
stage heldout "held-out test games, checked by content against every training game"
stage eval "student_lora, lora_selfmem, duomem, and duomem in 4 bit ($PKG, on $PACKAGE_GAMES games a type)"
stage bench "on-device speed: teacher vs float32 student vs 4-bit student, side by side"

selfmem=()
if [ -e "$OUT/eval/student_selfmem.json" ]; then
  selfmem=(--variant "student_selfmem=$OUT/eval/student_selfmem.json,memory=$OUT/self-bank")
fi
if [ -e "$OUT/eval/lora_selfmem.json" ]; then
  selfmem+=(--variant "lora_selfmem=$OUT/eval/lora_selfmem.json,adapters=$OUT/lora-selfmem,memory=$OUT/lora-selfmem/memory")
fi
WALL=$(awk -F'\t' '{ s += $2 } END { print s + 0 }' "$STAGES")  # all stages, also across resumed runs
$PY scripts/demo_report.py --out "$PKG" --seeds "$SEED" --wall-clock "$WALL" --student "$OUT/student" \
  --retrieval "$OUT/retrieval.json" --title "DuoMem in miniature: $MODEL on TextWorldExpress (held-out games)" \
  --stages "$STAGES" --heldout "$OUT/heldout.json" --bench "$OUT/bench.json" --adapter-tasks "$ADAPTER_TASKS" \
  --variant "student_base=$OUT/eval/student_base.json" \
  ${selfmem[@]+"${selfmem[@]}"} \
  --variant "student_memory=$OUT/eval/student_memory.json,memory=$OUT/bank" \
  --variant "student_lora=$OUT/eval/student_lora.json,adapters=$OUT/lora" \
  --variant "duomem=$OUT/eval/duomem.json,adapters=$(duomem_adapters),memory=$(duomem_bank)" \
  --variant "duomem_4bit=$OUT/eval/duomem_4bit.json,adapters=$(duomem_adapters),memory=$PKG/memory" \
  --teacher "$OUT/eval/teacher.json,adapters=$OUT/teacher-train,memory=$OUT/teacher/memory"
$CLI upload "$PKG" --repo you/duomem-demo --dry-run

printf '\nstage seconds:\n'
awk -F'\t' '{ printf "  %-10s %6d s wall %6d s CPU\n", $1, $2, $3 }' "$STAGES"
printf '\nDone in %ds. Table: %s/results.md (json, png beside it); package: %s (try `%s chat --model %s --env twx`);\n' \
  "$((SECONDS - START))" "$PKG" "$PKG" "$CLI" "$PKG"
printf 'working files (caches, banks, adapters, eval logs): %s/\n' "$OUT"
