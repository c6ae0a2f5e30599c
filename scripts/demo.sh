#!/usr/bin/env bash
# The whole rlchat pipeline, offline, on the built-in demo task. `make demo` runs this.
# Every setting lives in recipes/demo.yaml; these are the same commands a user types.
set -euo pipefail
RUN="${1:-runs/demo}"
RECIPE="${RECIPE:-recipes/demo.yaml}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

declare -A SECONDS_PER_STAGE
step() {  # name, command...
  local name="$1"; shift
  echo "==> $*"
  local t0=$SECONDS
  "$@"
  SECONDS_PER_STAGE[$name]=$((SECONDS - t0))
}

# 0. a tiny model built offline (random init; the demo SFT trains it from scratch) and the demo data
[ -f .demo/model/config.json ] || step model rlchat new-model .demo/model --arch llama --size demo --corpus demo --overwrite
step data rlchat demo-data .demo/data
# 1-4. the pipeline. Rerunning after an interruption keeps what finished: a finished stage is skipped, an
# interrupted one resumes from its last checkpoint (the same command, without --overwrite), and the stages after
# a stage that ran again are redone (--overwrite: they were built on the old one). `make demo-clean` starts afresh.
stage_done() {  # true when RUN/run.json says the stage finished
  python3 -c 'import json, sys
try:
    stages = json.load(open(sys.argv[1] + "/run.json"))["stages"]
except (OSError, ValueError, KeyError):
    sys.exit(1)
sys.exit(0 if (stages.get(sys.argv[2]) or {}).get("status") == "done" else 1)' "$RUN" "$1"
}
redo=""
stage() {  # manifest stage name, command...
  local name="$1"; shift
  if [ -z "$redo" ] && stage_done "$name"; then
    echo "==> $name: already done in $RUN, skipped (make demo-clean to start afresh)"
  elif [ -n "$redo" ]; then
    step "$name" "$@" --overwrite
  else
    redo=1
    step "$name" "$@"
  fi
}
stage sft rlchat sft --config "$RECIPE" --run-dir "$RUN"
stage reward rlchat train-reward --config "$RECIPE" --run-dir "$RUN"
stage ppo rlchat ppo --config "$RECIPE" --run-dir "$RUN"
# GRPO, RLOO and DPO (each when the recipe has its section): eval compares every policy of the run
if grep -q '^grpo:' "$RECIPE"; then stage grpo rlchat grpo --config "$RECIPE" --run-dir "$RUN"; fi
if grep -q '^rloo:' "$RECIPE"; then stage rloo rlchat rloo --config "$RECIPE" --run-dir "$RUN"; fi
if grep -q '^dpo:' "$RECIPE"; then stage dpo rlchat dpo --config "$RECIPE" --run-dir "$RUN"; fi
stage eval rlchat eval --config "$RECIPE" --run-dir "$RUN"
rlchat status "$RUN"
[ -f "$RUN/eval/report.md" ] && cat "$RUN/eval/report.md"
echo -n "stage times (s):"
for k in model data sft reward ppo grpo rloo dpo eval; do [ -n "${SECONDS_PER_STAGE[$k]:-}" ] && echo -n " $k=${SECONDS_PER_STAGE[$k]}"; done
echo
