"""Held-out tracking during PPO (`--eval-every`, rlchat/ppo_heldout.py) on the tiny model: heldout/* rows at the
right steps, RUN/ppo/best/ is the best step by the judge, the held-out prompts are not trained on, and evaluating
does not change the training run (its sampling has its own RNG)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlchat.errors import ConfigError

JUDGE = "rlchat.demo.task:judge"


# one torch thread for the whole module (reproducible, fast on 2 shared cores)
pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def _cfg(run: Path, tiny_model, demo_data, **kw):
    from rlchat.config import PPOConfig, resolve

    base = dict(run_dir=str(run), model=str(tiny_model), dataset=str(demo_data["prompts"]), episodes=32,
                batch_size=8, response_length=8, ppo_epochs=2, save_every=100, sample_every=100, seed=0, lr=2e-3)
    base.update(kw)
    return resolve(PPOConfig, "ppo", None, base)


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "ppo" / "metrics.jsonl").read_text().splitlines()]


def test_heldout_rows_best_checkpoint_and_training_unchanged(tmp_path, tiny_model, demo_data):
    from rlchat.stages import ppo
    from tests.test_ppo_stage import make_reward_stage

    held = tmp_path / "held.jsonl"  # an --eval-dataset, so both runs train on the same prompts
    held.write_text("".join(json.dumps({"prompt": f"Tell me about the {c} cup."}) + "\n"
                            for c in ("red", "blue", "green", "yellow", "white", "black")))
    runs = {}
    for name, kw in (("plain", {}), ("tracked", dict(eval_every=2, eval_dataset=str(held), judge=JUDGE))):
        run = tmp_path / name
        make_reward_stage(run, tiny_model)
        runs[name] = (run, ppo.run(_cfg(run, tiny_model, demo_data, **kw)))
    (plain, _), (tracked, metrics) = runs["plain"], runs["tracked"]
    a, b = _rows(plain), _rows(tracked)
    # the starting policy (step 0, KL 0 to the reference), every 2 steps, and the last step (4)
    assert [r["step"] for r in b if "heldout/score" in r] == [0, 2, 4]
    assert b[0]["heldout/kl"] == pytest.approx(0.0, abs=1e-5) and b[0]["episodes"] == 0
    b = b[1:]
    for r in b:
        if "heldout/score" in r:
            assert set(r) >= {"heldout/score", "heldout/judge", "heldout/kl", "heldout/length", "heldout/eos_rate"}
            assert 1 <= r["heldout/length"] <= 8
    # the training steps are the same numbers with and without held-out evaluation
    for x, y in zip(a, b):
        assert x["objective/scores"] == y["objective/scores"] and x["objective/kl"] == y["objective/kl"]
    # best/ is the step with the highest judge score; the manifest points at it
    judged = [r for r in _rows(tracked) if "heldout/judge" in r]
    best = max(judged, key=lambda r: r["heldout/judge"])  # the first of equal scores wins (strictly better only)
    best = next(r for r in judged if r["heldout/judge"] == best["heldout/judge"])
    state = json.loads((tracked / "ppo" / "best" / "state.json").read_text())
    assert state["step"] == best["step"] == metrics["best_step"] and state["chosen_by"] == "heldout/judge"
    assert (tracked / "ppo" / "best" / "adapter_model.safetensors").is_file()
    entry = json.loads((tracked / "run.json").read_text())["stages"]["ppo"]
    assert entry["outputs"]["best"] == "ppo/best" and entry["metrics"]["best_step"] == best["step"]
    assert "best held-out judge" in metrics["summary"]
    assert "best" not in json.loads((plain / "run.json").read_text())["stages"]["ppo"]["outputs"]


def test_heldout_split_is_not_trained_on(tiny_model, demo_data):
    from types import SimpleNamespace

    from rlchat import models
    from rlchat.ppo_heldout import resolve_heldout
    from rlchat.prompts import load_prompts

    tok = models.load_tokenizer(str(tiny_model))
    prompts, _, _ = load_prompts(str(demo_data["prompts"]), tokenizer=tok)
    cfg = SimpleNamespace(eval_every=5, judge=None, eval_dataset=None, eval_prompts=10, eval_fraction=0.1, seed=0,
                          dataset="prompts.jsonl")
    train, held = resolve_heldout(cfg, prompts, tok)
    assert len(held.prompts) == min(10, round(len(prompts) * 0.1)) and len(train) + len(held.prompts) == len(prompts)
    assert {id(p) for p in held.prompts}.isdisjoint({id(p) for p in train})
    assert held.metric == "heldout/score"  # no judge: the best is chosen by the held-out proxy


def test_heldout_options_need_eval_every():
    from rlchat.config import PPOConfig, resolve

    with pytest.raises(ConfigError, match="eval_every"):
        resolve(PPOConfig, "ppo", None, {"run_dir": "r", "dataset": "d.jsonl", "judge": JUDGE})
    with pytest.raises(ConfigError, match="judge must look like"):
        resolve(PPOConfig, "ppo", None, {"run_dir": "r", "dataset": "d.jsonl", "eval_every": 2, "judge": "nocolon"})
