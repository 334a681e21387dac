#!/usr/bin/env bash
# The miniature DuoMem pipeline on tiny local models (offline, ~3 min on 2 CPU cores):
# oracle teacher on TextWorld -> teacher cache + procedural memories -> memory bank in the
# student's space -> the student plays with its memories -> speed of the incremental agent loop.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${DEMO_OUT:-demo-out}
CLI=".venv/bin/duomem-mlx"
rm -rf "$OUT" && mkdir -p "$OUT"

step() { printf '\n== %s\n' "$*"; }

step "tiny student (4 layers, hidden 256) with a BPE tokenizer trained on environment text"
$CLI tiny-model "$OUT/student" --layers 4 --hidden 256

step "baselines on TextWorld: oracle (walkthroughs) and random"
$CLI eval --env textworld --episodes 4 --policy oracle --out "$OUT/oracle.json" --log "$OUT/oracle-episodes.jsonl"
$CLI eval --env textworld --episodes 4 --policy random --out "$OUT/random.json"

step "teacher cache from the oracle teacher, with rule-induced procedural memories"
$CLI teach --teacher oracle --teacher-tokenizer "$OUT/student" --env textworld --episodes 6 --split train --out "$OUT/cache"
$CLI cache verify "$OUT/cache"

step "memory bank: the teacher's memories keyed in the student's hidden space"
$CLI memory build --cache "$OUT/cache" --embedder "$OUT/student" --out "$OUT/bank"
$CLI memory show "$OUT/bank"

step "the (untrained) student plays, reading the retrieved memories; constrained to admissible actions"
$CLI eval --env textworld --episodes 4 --policy "model:$OUT/student" --memory "$OUT/bank" \
  --max-steps 15 --out "$OUT/student.json" --log "$OUT/student-episodes.jsonl"

step "on-device speed: incremental KV-cache session vs re-encoding the prompt every step"
.venv/bin/python benchmarks/agent_session.py --model "$OUT/student" --steps 30 --json "$OUT/agent_session.json"

step "chat with the student (piped)"
printf 'how do I open the door?\n/stats\n' | $CLI chat --model "$OUT/student" --memory "$OUT/bank" --max-tokens 16

printf '\nDone. Results in %s/ (results.json files, episode logs, cache, bank).\n' "$OUT"
