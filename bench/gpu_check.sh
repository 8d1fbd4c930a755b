#!/usr/bin/env bash
# One command on one GPU machine (~8 min): the GPU path of every benchmark, summed up in one Markdown table.
#
#   bash bench/gpu_check.sh [--out FILE]     # CUDA present: the GPU checks below; the table also goes to FILE
#   bash bench/gpu_check.sh --cpu [--out F]  # the CPU fallback: the same scripts at toy sizes (~1 min); the test
#                                            # suite runs it (tests/test_gpu_check.py) so this script cannot rot
#
# Rows (GPU): model forward v2-L at 640, fp16 and bf16, batch 1 and 32 (bench/model_forward.py --gpu); TAL /
# SimOTA assignment on the GPU (bench/assign.py --device cuda); a v2-L training step at 640, bf16, DDP and
# DeepSpeed ZeRO-2 through Ray Train (bench/train_step.py --gpu); evaluation inference end to end: `yworld eval`
# (Ray Data actor pool, one GPU) of a v2-L on synthetic LVIS-format images. Each row: the command, its result
# lines (each benchmark prints its ratio against its baseline last), seconds, and ok / FAIL (exit code).
# Paste the table into docs/benchmarks.md with the date and the machine. Exit code: 0 when every row is ok.
set -uo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
YWORLD=${YWORLD:-$(dirname "$PY")/yworld}
MODE=auto
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) MODE=cpu ;;
    --gpu) MODE=gpu ;;
    --out) OUT=$2; shift ;;
    *) echo "usage: bash bench/gpu_check.sh [--cpu|--gpu] [--out FILE]" >&2; exit 2 ;;
  esac
  shift
done
if [ "$MODE" = auto ]; then
  if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then MODE=gpu; else MODE=cpu; fi
fi

WORK=$(mktemp -d -t yworld-gpu-check-XXXXXX)
trap 'rm -rf "$WORK"' EXIT
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled} RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
ROWS=()
FAILED=0

# run NAME LIMIT_S CMD...: one table row from one command (its last 2 non-empty output lines are the result)
run() {
  local name=$1 limit=$2; shift 2
  local start rc seconds status=ok log="$WORK/row${#ROWS[@]}.log"
  start=$(date +%s%N)
  timeout "$limit" "$@" >"$log" 2>&1
  rc=$?
  seconds=$(( ($(date +%s%N) - start) / 1000000000 ))
  local result
  result=$(sed 's/\x1b\[[0-9;]*m//g; s/\r/\n/g' "$log" | grep -v '^[[:space:]]*$' | tail -n 2 \
           | sed 's/|/\\|/g' | paste -sd '~' - | sed 's/~/<br>/g')
  if [ -n "${RATE_IMAGES:-}" ]; then  # an end-to-end rate: images / wall seconds of the whole command
    result="$(awk -v n="$RATE_IMAGES" -v s="$seconds" 'BEGIN {printf "%.1f images/s end to end", n / (s > 0 ? s : 1)}')<br>$result"
  fi
  if [ $rc -ne 0 ]; then status="FAIL ($rc)"; FAILED=1; echo "--- $name failed ($rc):" >&2; tail -n 20 "$log" >&2; fi
  local shown="$*"
  ROWS+=("| $name | \`${shown#"$PY "}\` | $result | $seconds | $status |")
}

# evaluation inputs: synthetic LVIS-format images and a randomly initialised model (this row measures speed)
eval_row() {  # NAME MODEL SYNTH_IMAGES IMGSZ BATCH USE_GPU LIMIT_S
  "$YWORLD" synth --out "$WORK/world" --images "$3" --size "$4" >"$WORK/synth.log" 2>&1 || {
    ROWS+=("| $1 | \`yworld synth\` | $(tail -n 1 "$WORK/synth.log") | - | FAIL |"); FAILED=1; return; }
  "$PY" - "$2" "$WORK/model.safetensors" <<'PYEOF'
import sys
from yworld.model import build_model
from yworld.model.weights import save_weights
save_weights(build_model(sys.argv[1], text_dim=384), sys.argv[2])  # 384: the packaged MiniLM text encoder
PYEOF
  local images
  images=$("$PY" -c 'import json, sys; print(len(json.load(open(sys.argv[1]))["images"]))' "$WORK/world/lvis/annotations.json")
  RATE_IMAGES=$images run "$1, $images images" "$7" "$YWORLD" eval jobs/eval_lvis_minival.yaml --set "model=$WORK/model.safetensors" \
    --set "output=$WORK/eval" --set text.encoder=minilm --set "dataset.annotations=$WORK/world/lvis/annotations.json" \
    --set "dataset.images=$WORK/world/lvis/images" --set "inference.img_size=$4" --set "inference.batch_size=$5" \
    --set inference.num_actors=1 --set "inference.use_gpu=$6" --set inference.cpus_per_actor=1 \
    --set inference.accelerator_type= --set 'protocols=[standard]'
}

if [ "$MODE" = gpu ]; then  # time limits sum to 460 s: the whole check fits in 8 minutes
  DEVICE=$("$PY" -c 'import torch; print(torch.cuda.get_device_name())')
  L640=(--model yolo_world_v2_l --img-size 640 --batch 16 --precision bf16 --gpu --steps 10 --warmup 3 --rounds 2)
  run "model forward v2-L 640, fp16/bf16, batch 1/32" 100 \
    "$PY" bench/model_forward.py --sizes l --iters 5 --gpu --gpu-batches 1 32
  run "assignment TAL/SimOTA, 16 x 640" 40 "$PY" bench/assign.py --device cuda --batch 16 --reps 7
  run "train step v2-L 640 bf16, DDP" 100 "$PY" bench/train_step.py "${L640[@]}"
  run "train step v2-L 640 bf16, DeepSpeed ZeRO-2" 100 "$PY" bench/train_step.py "${L640[@]}" --strategy deepspeed
  eval_row "eval inference v2-L 640 (yworld eval, 1 GPU actor)" yolo_world_v2_l 512 640 32 true 120
else
  DEVICE="CPU fallback ($(nproc) cores): toy sizes, proves the commands still run"
  run "model forward v2-S 320 (CPU)" 120 \
    "$PY" bench/model_forward.py --sizes s --iters 1 --warmup 0 --imgsz 320 --threads 2
  run "assignment TAL/SimOTA, 2 x 320 (CPU)" 60 \
    "$PY" bench/assign.py --device cpu --batch 2 --gts 5 --size 320 --reps 1 --threads 2
  run "train step v2-tiny 128, DDP (CPU)" 150 \
    "$PY" bench/train_step.py --model yolo_world_v2_tiny --img-size 128 --batch 2 --steps 2 --warmup 1 --rounds 1 --threads 1
  eval_row "eval inference v2-tiny 128 (yworld eval, CPU actor)" yolo_world_v2_tiny 32 128 8 false 150
fi

{
  TORCH=$("$PY" -c 'import torch; print(torch.__version__)')
  echo "GPU check $(date -u +%Y-%m-%d) on $(hostname): $DEVICE; torch $TORCH"
  echo
  echo "| check | command | result | s | status |"
  echo "|---|---|---|---|---|"
  printf '%s\n' "${ROWS[@]}"
} | tee ${OUT:+"$OUT"}
exit $FAILED
