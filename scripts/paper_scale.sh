#!/usr/bin/env bash
# DuoMem at paper scale on a Mac (Apple Silicon, >= 64 GB unified memory for the 32B teacher):
# ALFWorld, teacher Qwen2.5-32B-Instruct (4-bit, on the Mac) or any larger model behind an
# OpenAI-compatible server (vLLM on a GPU box), student Qwen3-4B (4-bit, QLoRA).
# Paper (arXiv 2606.29961), ALFWorld seen split: 4B student 4.3% -> 77.9% with DuoMem (6 -> 109 of
# 140 games), 72B teacher 87.1% (122 of 140); < 10M trainable parameters; > 3x faster than the teacher.
#
# Not run here (no network, no ALFWorld data, no Mac); the times and memory below are estimates
# from the model sizes (bytes read per decoded token over ~400 GB/s on an M2/M3 Max), not
# measurements: replace them with yours. Every stage can be killed and rerun with --resume.
#
#   stage                     memory (peak)        time (M3 Max, estimate)
#   1 teach, 32B 4-bit        ~20 GB weights+KV     ~2,000 train games x ~25 steps: 10-15 h (a vLLM server: ~1 h)
#   2 memory build            ~3 GB (4B embedder)   minutes
#   3 distill, QLoRA 4B       ~8-12 GB (batch 4, grad checkpoint)   1,000 steps: 2-4 h
#   4 quantize 4-bit          ~3 GB                 minutes (+ --calibrate: ~20 min)
#   5 eval, 5 variants x 274  ~3-20 GB              4B: ~5 s/game; 32B: ~20 s/game -> ~4 h in all
#   6 bench                   ~20 GB                minutes
#
# Usage: bash scripts/paper_scale.sh            (TEACHER=openai:http://gpu-box:8000/v1#Qwen/Qwen2.5-72B-Instruct to use vLLM)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${PAPER_OUT:-runs/paper}
TEACHER=${TEACHER:-mlx:mlx-community/Qwen2.5-32B-Instruct-4bit}
STUDENT=${STUDENT:-mlx-community/Qwen3-4B-4bit}
TRAIN_GAMES=${TRAIN_GAMES:-2000}   # of ALFWorld's 3,553 train games
ITERS=${ITERS:-1000}
CLI=${DUOMEM_CLI:-duomem-mlx}
mkdir -p "$OUT/eval"

# 0. ALFWorld's games are a separate download (~1 GB): pip install 'duomem-mlx[alfworld]' && alfworld-download
python -c "import alfworld" 2>/dev/null || { echo "pip install 'duomem-mlx[alfworld]' && alfworld-download first"; exit 1; }

# 1. The teacher plays the train split: kept successes, top-20 distributions (the student shares
#    Qwen's tokenizer only if you pick a Qwen teacher: KD needs one vocabulary; else use --kd off
#    in step 3), and procedural memories written by the teacher itself.
$CLI teach --teacher "$TEACHER" --teacher-tokenizer "$STUDENT" --env alfworld --split train --episodes "$TRAIN_GAMES" \
  --top-k 20 --memory-writer teacher --out "$OUT/teacher-cache" --resume

# 2. The teacher's memories keyed in the student's hidden space.
$CLI memory build --cache "$OUT/teacher-cache" --embedder "$STUDENT" --out "$OUT/bank"

# 3. Parameter space: QLoRA on the 4-bit student (rank 16 on all layers of Qwen3-4B: ~8M
#    parameters), CE + KD on the cached top-k, the memories it retrieves in front of each prompt.
$CLI distill --student "$STUDENT" --cache "$OUT/teacher-cache" --memory-bank "$OUT/bank" --rank 16 --num-layers -1 \
  --iters "$ITERS" --batch-size 4 --grad-checkpoint --out "$OUT/duomem" --resume
$CLI distill --student "$STUDENT" --cache "$OUT/teacher-cache" --rank 16 --num-layers -1 \
  --iters "$ITERS" --batch-size 4 --grad-checkpoint --out "$OUT/lora" --resume

# 4. One package: adapters fused (dequantize, fuse, requantize), calibrated on the agent's data.
$CLI quantize --model "$STUDENT" --adapters "$OUT/duomem" --bits 4 --calibrate "$OUT/teacher-cache" --out converted/duomem-qwen3-4b-alfworld

# 5. The paper's table: seen (dev, 140 games: the split of 4.3 / 77.9 / 87.1) and unseen (test, 134).
for split in dev test; do
  n=$([ $split = dev ] && echo 140 || echo 134)
  ev() { local name=$1; shift; $CLI eval --env alfworld --split $split --episodes $n --out "$OUT/eval/$name-$split.json" --log "$OUT/eval/$name-$split.jsonl" "$@"; }
  ev student_base   --policy "model:$STUDENT"
  ev student_memory --policy "model:$STUDENT" --memory "$OUT/bank"
  ev student_lora   --policy "model:$STUDENT" --adapter-path "$OUT/lora"
  ev duomem         --policy "model:converted/duomem-qwen3-4b-alfworld"
  ev teacher        --policy "model:${TEACHER#mlx:}"   # an openai: teacher: evaluate it on the server side
done

# 6. What the user feels: teacher vs student, side by side.
$CLI bench "${TEACHER#mlx:}" converted/duomem-qwen3-4b-alfworld --json "$OUT/bench.json" --plot "$OUT/bench.png"
echo "tables: $OUT/eval/*.json, $OUT/bench.json; package: converted/duomem-qwen3-4b-alfworld (duomem-mlx chat --model ...)"
