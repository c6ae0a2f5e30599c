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
# 1-4. the pipeline
step sft rlchat sft --config "$RECIPE" --run-dir "$RUN" --overwrite
step reward rlchat train-reward --config "$RECIPE" --run-dir "$RUN" --overwrite
step ppo rlchat ppo --config "$RECIPE" --run-dir "$RUN" --overwrite
step eval rlchat eval --config "$RECIPE" --run-dir "$RUN" --overwrite
rlchat status "$RUN"
[ -f "$RUN/eval/report.md" ] && cat "$RUN/eval/report.md"
echo -n "stage times (s):"
for k in model data sft reward ppo eval; do [ -n "${SECONDS_PER_STAGE[$k]:-}" ] && echo -n " $k=${SECONDS_PER_STAGE[$k]}"; done
echo
