"""benchmarks/gpu_smoke.sh runs end to end with --cpu on a tiny GGUF model (the GPU run uses the same script)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_smoke_script_on_cpu(tiny_model, tmp_path):
    from tests.gguf_writer import write_llama_gguf

    model = write_llama_gguf(tiny_model, tmp_path / "tiny.gguf")
    out = tmp_path / "smoke"
    env = dict(os.environ, PY=sys.executable, RLCHAT_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_smoke.sh"), "--cpu", "--model", str(model),
                          "--out", str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    table = (out / "gpu_smoke.md").read_text()
    rows = re.findall(r"^\| (import|train-reward|ppo|eval) \| ([\d.]+) \| - \| - \| (\d+) \|$", table, re.M)
    assert [r[0] for r in rows] == ["import", "train-reward", "ppo", "eval"], table
    assert all(float(r[1]) > 0 and int(r[2]) > 0 for r in rows)
    assert (out / "run" / "eval").is_dir()

    # a second --out that exists, and a missing model: one line, exit 2
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_smoke.sh"), "--cpu", "--model", str(model),
                          "--out", str(out)], env=env, capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.startswith("error:") and len(res.stderr.splitlines()) == 1
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_smoke.sh"), "--cpu", "--model",
                          str(tmp_path / "none.gguf")], env=env, capture_output=True, text=True)
    assert res.returncode == 2 and "make real-model" in res.stderr
