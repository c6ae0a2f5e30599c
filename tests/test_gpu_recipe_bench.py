"""benchmarks/gpu_recipe_bench.py runs its whole plumbing with --cpu (the GPU run uses the same code)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_recipe_bench_plumbing_on_cpu(tiny_model, tmp_path):
    out = tmp_path / "bench"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_recipe_bench.py"), "--tokenizer",
                          str(tiny_model), "--out", str(out), "--cpu", "--shapes", "qwen2.5-0.5b"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (result,) = json.loads((out / "gpu_recipe_bench.json").read_text())
    # every stage ran to the end, through the recipe's own config, and the per-step times were read back
    assert {k: v.get("exit") for k, v in result["stages"].items()} == {s: "0" for s in ("sft", "reward", "ppo", "eval")}
    assert result["sft_step_s"] > 0 and result["reward_step_s"] > 0
    assert set(result["ppo_step"]) == {"generation_s", "scoring_s", "training_s"}
    assert result["microbench"]["tokens_per_s"] > 0
    table = (out / "gpu_recipe_bench.md").read_text()
    assert "| qwen2.5-0.5b |" in table and "ppo step split" in table
