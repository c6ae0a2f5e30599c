#!/usr/bin/env bash
# GPU readiness smoke test: the real-model pipeline on one CUDA device, with wall time and peak memory per stage.
#
#   import-gguf   the GGUF model -> a safetensors directory (skipped when --model is a directory)
#   train-reward  a few steps of a LoRA reward model, started from the model itself (no SFT stage)
#   ppo           a few PPO steps (LoRA policy + value on the shared base)
#   eval          the PPO policy against the starting model on a few held-out prompts
#
# Data: the built-in demo task (`rlchat demo-data`): preference pairs, prompts, held-out prompts. The point is
# that every stage runs and what it costs, not what it learns.
# Precision: nothing to pass. On a CUDA device with bfloat16 support rlchat loads the models in bf16 and trains
# with bf16 autocast by itself (rlchat.models.resolve_dtype / use_bf16); there is no --dtype flag.
#
#   bash benchmarks/gpu_smoke.sh                  # GPU; model .models/SmolLM2-135M-Instruct.Q4_1.gguf (make real-model)
#   bash benchmarks/gpu_smoke.sh --cpu --model M  # the same on CPU with tiny budgets (what the test runs)
#
# Options: --cpu (hide the GPUs, tiny budgets), --model PATH (.gguf file or model directory), --out DIR (default:
# a new tmp directory; must not exist yet). PY=python picks the interpreter (default: python on PATH).
# Output: each stage's own output, one `LABEL wall_s=... peak_gpu_alloc_mib=... peak_rss_mib=...` line per stage
# (benchmarks/stage_peak.py), then a table, also written to OUT/gpu_smoke.md.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY=${PY:-python}
CPU=0
MODEL=.models/SmolLM2-135M-Instruct.Q4_1.gguf
OUT=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cpu) CPU=1 ;;
    --model) MODEL=${2:?--model needs a path}; shift ;;
    --out) OUT=${2:?--out needs a directory}; shift ;;
    -h|--help) sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument $1. Fix: see bash benchmarks/gpu_smoke.sh --help." >&2; exit 2 ;;
  esac
  shift
done

if [[ ! -e "$MODEL" ]]; then
  echo "error: model $MODEL not found. Fix: run \`make real-model\`, or pass --model (a .gguf file or a model directory)." >&2
  exit 2
fi
if [[ -z "$OUT" ]]; then
  OUT=$(mktemp -d "${TMPDIR:-/tmp}/rlchat-gpu-smoke-XXXXXX")
elif [[ -e "$OUT" ]]; then
  echo "error: $OUT already exists. Fix: pass a new --out directory." >&2
  exit 2
else
  mkdir -p "$OUT"
fi

if [[ $CPU == 1 ]]; then
  export CUDA_VISIBLE_DEVICES=""
  DEVICE=cpu
  REWARD_STEPS=2; REWARD_BATCH=2; EPISODES=4; PPO_BATCH=2; RESPONSE=8; EVAL_PROMPTS=2; NEW_TOKENS=8
else
  if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "error: no CUDA device visible to torch. Fix: run on a GPU machine (with a CUDA build of torch), or pass --cpu." >&2
    exit 2
  fi
  DEVICE=$("$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"{p.name}, {p.total_memory / 2**30:.0f} GiB, bf16 {torch.cuda.is_bf16_supported()}")')
  REWARD_STEPS=20; REWARD_BATCH=16; EPISODES=128; PPO_BATCH=32; RESPONSE=64; EVAL_PROMPTS=32; NEW_TOKENS=64
fi
export HF_HUB_OFFLINE=1
echo "gpu_smoke: device $DEVICE; model $MODEL; output $OUT"

LINES="$OUT/stages.txt"
: > "$LINES"
stage() {  # stage LABEL rlchat-args...: run it, keep its measurement line, stop on failure
  local label=$1; shift
  echo "== $label: rlchat $*"
  set +o pipefail
  "$PY" "$HERE/stage_peak.py" "$label" "$@" | tee "$OUT/$label.out"
  local code=${PIPESTATUS[0]}
  set -o pipefail
  grep "^$label wall_s=" "$OUT/$label.out" >> "$LINES"
  if [[ $code != 0 ]]; then echo "gpu_smoke: stage $label failed (exit $code)" >&2; exit "$code"; fi
}

START=$(date +%s)
if [[ "$MODEL" == *.gguf ]]; then
  stage import import-gguf "$MODEL" "$OUT/model"
  MODEL_DIR="$OUT/model"
else
  MODEL_DIR="$MODEL"
fi
"$PY" -m rlchat demo-data "$OUT/data"
RUN="$OUT/run"
stage train-reward train-reward --run-dir "$RUN" --model "$MODEL_DIR" --dataset "$OUT/data/pairs.jsonl" \
  --max-steps "$REWARD_STEPS" --batch-size "$REWARD_BATCH" --eval-fraction 0.02 --max-length 256
stage ppo ppo --run-dir "$RUN" --model "$MODEL_DIR" --dataset "$OUT/data/prompts.jsonl" --episodes "$EPISODES" \
  --batch-size "$PPO_BATCH" --response-length "$RESPONSE"
stage eval eval --run-dir "$RUN" --dataset "$OUT/data/eval_prompts.jsonl" --max-prompts "$EVAL_PROMPTS" \
  --max-new-tokens "$NEW_TOKENS"
TOTAL=$(( $(date +%s) - START ))

{
  echo "# gpu_smoke: $DEVICE"
  echo
  echo "model: $MODEL; budgets: reward $REWARD_STEPS steps x batch $REWARD_BATCH; ppo $EPISODES episodes, batch $PPO_BATCH," \
       "$RESPONSE-token responses; eval $EVAL_PROMPTS prompts x $NEW_TOKENS tokens; total ${TOTAL}s"
  echo
  echo "| stage | wall s | peak GPU allocated MiB | peak GPU reserved MiB | peak RSS MiB |"
  echo "|---|---|---|---|---|"
  while read -r label rest; do
    declare -A kv=()
    for pair in $rest; do kv[${pair%%=*}]=${pair#*=}; done
    echo "| $label | ${kv[wall_s]} | ${kv[peak_gpu_alloc_mib]} | ${kv[peak_gpu_reserved_mib]} | ${kv[peak_rss_mib]} |"
  done < "$LINES"
} > "$OUT/gpu_smoke.md"
echo
cat "$OUT/gpu_smoke.md"
