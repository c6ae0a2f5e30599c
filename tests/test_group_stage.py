"""`rlchat grpo` / `rlchat rloo` (critic-free RL on the PPO loop) on tiny random models, offline, CPU.

Fast: the first group update of 2 processes equals one process's (tests/dist_worker.py group_update); the model
has no value role; a GRPO run (reward adapter + reward function) lands in RUN/grpo/ with PPO's lineage (manifest
entry, metrics, samples, checkpoints, a policy adapter that PeftModel.from_pretrained loads) and no value model;
RLOO folds the KL into the reward; bad input (num_generations 1, a batch not divisible by the group, a PPO-only
key) is one `error:` line, exit 2, nothing written. Slow: each algorithm raises a programmatic reward and the
sign-flipped reward lowers it; a GRPO run killed with SIGKILL resumes and ends where an uninterrupted run ends.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import snapshot
from tests.test_multiprocess import launch_worker, leftovers, max_abs_diff, ok, rlchat
from tests.test_ppo_stage import (ROOT, VOWEL_REWARD, fresh_run, kill_after_checkpoint, make_reward_stage,
                                  sample_vowel_rate, write_fn)

JUDGE = "rlchat.demo.task:judge"


pytestmark = pytest.mark.usefixtures("one_thread_per_module")  # tests/conftest.py: one torch thread


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory, tiny_model) -> Path:
    run = tmp_path_factory.mktemp("group-template") / "run"
    make_reward_stage(run, tiny_model)
    return run


def group_cfg(stage: str, run: Path, model: Path, prompts: Path, **kw):
    from rlchat.config import STAGE_CONFIGS, resolve

    base = dict(run_dir=str(run), model=str(model), dataset=str(prompts), episodes=24, batch_size=8,
                num_generations=4, response_length=8, ppo_epochs=2, save_every=1, sample_every=1, seed=0)
    base.update(kw)
    return resolve(STAGE_CONFIGS[stage], stage, None, base)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------ 2 processes == 1


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_first_group_update_of_two_processes_equals_one(grad_accum, tmp_path, tiny_model):
    import torch

    from tests import dist_worker as W

    with torch.random.fork_rng():
        ref = W.one_group_update(str(tiny_model), grad_accum, 1e-3, 0, 1, True)  # one process, all 4 groups
    r0, r1 = launch_worker(2, "group_update", tmp_path / "out", "--model", tiny_model, "--grad-accum", grad_accum,
                           "--lr", 1e-3)
    assert r0["rows"] == [0, 1, 4, 5] and r1["rows"] == [2, 3, 6, 7]  # whole groups per process
    assert r0["tokens"] + r1["tokens"] == ref["tokens"] and r0["tokens"] != r1["tokens"]
    # tolerances as in test_first_ppo_update_of_two_processes_equals_one (same sums in another order)
    scale = max(v.abs().max().item() for v in ref["exp_avg"].values())
    assert max_abs_diff(r0["exp_avg"], ref["exp_avg"]) <= 1e-4 * scale
    assert max_abs_diff(r0["params"], ref["params"]) <= 1e-5
    assert max_abs_diff(r0["params"], r1["params"]) == 0.0
    for key in ("loss/policy", "loss/kl"):
        assert abs((r0["stats"][key] + r1["stats"][key]) / 2 - ref["stats"][key]) <= 1e-5, key
    assert ref["stats"]["loss/kl"] > 0  # policy != reference: the KL term is live
    # the check can fail: without reduce each process divides by its own token count
    assert max_abs_diff(r0["noreduce/exp_avg"], ref["exp_avg"]) > 1e-2 * scale


# ---------------------------------------------------------------------------------------------- the stage


def test_critic_free_model_has_no_value_role(tiny_model):
    from rlchat import models
    from rlchat.actor_critic import build_shared

    lm = models.load_causal_lm(str(tiny_model))
    model = build_shared(lm, models.lora_config(4, 8, 0.0, "all-linear"), None, critic=False)
    assert not model.has_critic and model.shared_critic
    assert list(model.peft_model.peft_config) == ["policy"]  # no value adapter
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and ".policy." in n for n in trainable)  # the frozen head too


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory, tiny_model, reward_run, demo_data):
    """3 GRPO steps scored by the run's reward adapter plus the demo judge (mixed sources)."""
    from rlchat.stages import ppo

    run = fresh_run(reward_run, tmp_path_factory.mktemp("grpo-run"))
    cfg = group_cfg("grpo", run, tiny_model, demo_data["prompts"], reward_fn=JUDGE, reward_fn_weight=0.5)
    return run, ppo.run(cfg)


def test_grpo_lands_in_its_own_stage_directory_with_ppo_lineage(grpo_run, tiny_model):
    from peft import PeftModel

    from rlchat import group_step, models

    run, metrics = grpo_run
    entry = json.loads((run / "run.json").read_text())["stages"]["grpo"]
    assert entry["status"] == "done" and entry["parent"] == "reward"
    assert entry["config"]["num_generations"] == 4 and entry["metrics"]["num_generations"] == 4
    assert entry["outputs"]["policy"] == "grpo/policy" and "value" not in entry["outputs"]
    assert metrics["steps"] == 3 and metrics["episodes"] == 24 and metrics["value_model"] is None
    assert not (run / "grpo" / "value").exists() and not (run / "ppo").exists()
    rows = read_jsonl(run / "grpo" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("loss/kl", "group/reward_std", "group/zero_std_frac", "objective/rewards"):
        assert key in rows[-1] and key in group_step.__doc__, key
    assert "objective/scores_model" in rows[-1] and "objective/scores_fn" in rows[-1]
    assert not any(k.startswith("value/") or k == "loss/value" for k in rows[-1])
    assert rows[0]["objective/kl"] == 0.0  # the policy equals the reference on the first rollout
    assert rows[-1]["loss/kl"] > 0  # the k3 term after the first updates
    for r in rows:  # kl_in 'loss': the reward is the score
        assert r["objective/rewards"] == pytest.approx(r["objective/scores"], abs=1e-6)
    assert {s["step"] for s in read_jsonl(run / "grpo" / "samples.jsonl")} == {1, 2, 3}
    ckpts = sorted(p.name for p in (run / "grpo" / "checkpoints").iterdir())
    assert ckpts == ["step-1", "step-2"] and not (run / "grpo" / "checkpoints" / "step-2" / "value").exists()
    policy = PeftModel.from_pretrained(models.load_causal_lm(str(tiny_model)), str(run / "grpo" / "policy"))
    assert any(p.abs().sum() > 0 for n, p in policy.named_parameters() if "lora_B" in n)  # it trained


def test_rloo_puts_the_kl_in_the_reward(tmp_path, tiny_model, reward_run, demo_data):
    from rlchat.stages import ppo

    run = fresh_run(reward_run, tmp_path)
    ppo.run(group_cfg("rloo", run, tiny_model, demo_data["prompts"], lr=1e-3, kl_coef=0.5))
    rows = read_jsonl(run / "rloo" / "metrics.jsonl")
    assert json.loads((run / "run.json").read_text())["stages"]["rloo"]["config"]["kl_in"] == "reward"
    assert all(r["loss/kl"] == 0.0 for r in rows)
    assert max(abs(r["objective/kl"]) for r in rows) > 1e-3  # the penalty below is not trivially 0
    for r in rows:  # mean reward = mean score - kl_coef * mean summed k1
        assert r["objective/rewards"] == pytest.approx(r["objective/scores"] - 0.5 * r["objective/kl"], abs=1e-5)


def test_one_update_per_batch_is_not_reported_as_not_moving():
    """--ppo-epochs 1 --mini-batches 1 (TRL's GRPO default): approx_kl and clipfrac are measured on the only
    minibatch before its optimizer step, so they are 0 however fast the policy moves."""
    from rlchat.config import GRPOConfig
    from rlchat.ppo_health import check_health_cfg

    rows = [{"step": i, "lr": 5e-5, "policy/approx_kl": 0.0, "policy/clipfrac": 0.0} for i in range(1, 9)]
    assert [f.check for f in check_health_cfg(rows, GRPOConfig(run_dir="r"))] == ["not_moving"]  # 4 epochs
    assert check_health_cfg(rows, GRPOConfig(run_dir="r", ppo_epochs=1)) == []


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("stage,args,phrase", [
    ("grpo", ["--num-generations", "1"], "num_generations is 1"),
    ("rloo", ["--num-generations", "1"], "needs at least 2"),
    ("grpo", ["--batch-size", "6", "--num-generations", "4"], "batch_size (6) is not divisible by num_generations"),
    ("rloo", ["--batch-size", "9", "--num-generations", "2"], "not divisible by num_generations (2)"),
])
def test_bad_group_settings_are_one_line_and_write_nothing(stage, args, phrase, tmp_path, tiny_model, demo_data,
                                                           reward_run):
    from rlchat.cli import app

    run = fresh_run(reward_run, tmp_path)
    before = snapshot(run)
    res = CliRunner().invoke(app, [stage, "--run-dir", str(run), "--model", str(tiny_model), "--dataset",
                                   str(demo_data["prompts"]), *args])
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and phrase in errors[0] and "Fix:" in errors[0], res.output
    assert "Traceback" not in res.output
    assert snapshot(run) == before


def test_ppo_only_settings_are_refused_and_not_flags(tmp_path, tiny_model, demo_data):
    from rlchat.cli import app
    from rlchat.config import GRPOConfig, resolve
    from rlchat.errors import ConfigError

    recipe = tmp_path / "r.yaml"
    recipe.write_text("gamma: 0.9\nppo: {vf_coef: 0.2}\ngrpo: {lam: 0.5}\n")
    with pytest.raises(ConfigError) as err:  # the top-level gamma is PPO's; the grpo section's lam is refused
        resolve(GRPOConfig, "grpo", recipe, {"run_dir": "r"})
    assert err.value.problems == ["lam is a PPO setting (grpo has no value model and no GAE): drop it"]
    res = CliRunner().invoke(app, ["grpo", "--help"])
    assert "--num-generations" in res.output and "--scale-rewards" in res.output and "--vf-coef" not in res.output
    res = CliRunner().invoke(app, ["rloo", "--run-dir", str(tmp_path / "run"), "--gamma", "0.9"])
    assert res.exit_code == 2 and "no such option --gamma" in res.output
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------- slow


def learned_vowel_rate(stage: str, tmp_path: Path, tiny_model, demo_data, sign: float) -> tuple[float, float, dict]:
    """(vowel rate of fresh samples before, after, final metrics) of a run rewarded sign x vowel fraction."""
    from peft import PeftModel

    from rlchat import models
    from rlchat.stages import ppo

    T = 0.1  # as the PPO learning test: a low temperature lets the LoRA steer the random, frozen LM head
    tmp_path.mkdir(parents=True, exist_ok=True)
    fn = write_fn(tmp_path, VOWEL_REWARD.format(sign=sign), f"vowels_{stage}_{'up' if sign > 0 else 'down'}.py")
    run = tmp_path / "run"
    metrics = ppo.run(group_cfg(stage, run, tiny_model, demo_data["prompts"], reward_fn=f"{fn}:reward",
                                episodes=960, batch_size=16, num_generations=4, ppo_epochs=4, lr=2e-3,
                                kl_coef=0.002, temperature=T, seed=3, save_every=1000, sample_every=1000))
    prompts = [json.loads(line)["prompt"][0]["content"] for line in
               Path(demo_data["prompts"]).read_text().splitlines()][:48]
    tok = models.load_tokenizer(str(tiny_model))
    before = sample_vowel_rate(models.load_causal_lm(str(tiny_model)), tok, prompts, T)
    policy = PeftModel.from_pretrained(models.load_causal_lm(str(tiny_model)), str(run / stage / "policy")).eval()
    return before, sample_vowel_rate(policy, tok, prompts, T), metrics


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["grpo", "rloo"])
def test_group_algorithm_raises_a_programmatic_reward_and_the_flipped_one_lowers_it(stage, tmp_path, tiny_model,
                                                                                    demo_data):
    """Vowel fraction of fresh samples (the PPO learning test's task): up with the reward, down with its negation."""
    t0 = time.time()
    before, up, m_up = learned_vowel_rate(stage, tmp_path / "up", tiny_model, demo_data, 1.0)
    _, down, m_down = learned_vowel_rate(stage, tmp_path / "down", tiny_model, demo_data, -1.0)
    print(f"{stage}: vowel rate {before:.3f} -> {up:.3f} (reward), -> {down:.3f} (flipped); logged score "
          f"{m_up['score_start']:.3f} -> {m_up['score']:.3f}, flipped {m_down['score_start']:.3f} -> "
          f"{m_down['score']:.3f}; {time.time() - t0:.0f}s")
    assert up > before + 0.15, (before, up)
    assert down < before - 0.1, (before, down)
    assert m_up["score"] > m_up["score_start"] + 0.15 and m_down["score"] > m_down["score_start"] + 0.1


RUNNER = """
import sys, json
from rlchat.config import GRPOConfig, resolve
from rlchat.stages import ppo
import torch
torch.set_num_threads(1)
cfg = resolve(GRPOConfig, "grpo", None, json.loads(sys.argv[1]))
print(json.dumps({k: v for k, v in ppo.run(cfg).items() if k != "summary"}))
"""


@pytest.mark.slow
def test_killed_grpo_run_resumes_and_matches_an_uninterrupted_run(tmp_path, tiny_model, reward_run, demo_data):
    import torch
    from safetensors.torch import load_file

    def args(run):
        return json.dumps(dict(run_dir=str(run), model=str(tiny_model), dataset=str(demo_data["prompts"]),
                               reward_fn=JUDGE, episodes=64, batch_size=8, num_generations=4, response_length=8,
                               ppo_epochs=2, save_every=2, sample_every=1, seed=0))

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    ref, run = fresh_run(reward_run, tmp_path / "ref"), fresh_run(reward_run, tmp_path / "killed")
    subprocess.run([sys.executable, "-c", RUNNER, args(ref)], env=env, check=True, capture_output=True, cwd=ROOT)
    ckpts = run / "grpo" / "checkpoints"
    kill_after_checkpoint(RUNNER, args(run), ckpts, "step-4", env)  # SIGKILL once step-4 is saved
    assert json.loads((run / "run.json").read_text())["stages"]["grpo"]["status"] == "running"
    newest = max(int(p.name.split("-")[1]) for p in ckpts.iterdir() if p.name.startswith("step-"))
    assert newest < 8, "killed too late to test resuming"

    out = subprocess.run([sys.executable, "-c", RUNNER, args(run)], env=env, capture_output=True, text=True,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["resumed_from"] == f"step-{newest}"
    entry = json.loads((run / "run.json").read_text())["stages"]["grpo"]
    assert entry["status"] == "done" and entry["resumed"] is True
    rows = read_jsonl(run / "grpo" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 9))
    ref_rows = read_jsonl(ref / "grpo" / "metrics.jsonl")
    for a, b in zip(rows, ref_rows):  # same prompts, samples and updates as without the kill
        assert (a["objective/scores"], a["loss/kl"]) == (b["objective/scores"], b["loss/kl"]), a["step"]
    got = load_file(str(run / "grpo" / "policy" / "adapter_model.safetensors"))
    want = load_file(str(ref / "grpo" / "policy" / "adapter_model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


@pytest.mark.slow
def test_grpo_with_two_processes_samples_whole_groups_on_each(tmp_path, tiny_model, demo_data):
    """`rlchat grpo --num-processes 2`: each process takes batch_size / G prompts of the global batch and samples G
    responses to each; episodes count both processes; the checkpoints keep both RNGs; the policy loads."""
    run = tmp_path / "run"
    batch, steps = 4, 3
    ok(rlchat("grpo", "--run-dir", run, "--model", tiny_model, "--dataset", demo_data["prompts"], "--reward-fn",
              JUDGE, "--batch-size", batch, "--num-generations", 2, "--episodes", steps * batch * 2,
              "--ppo-epochs", 1, "--response-length", 8, "--lora-r", 4, "--lora-alpha", 8, "--save-every", 2,
              "--num-processes", 2))
    rec = json.loads((run / "run.json").read_text())["stages"]["grpo"]
    assert rec["status"] == "done" and rec["metrics"]["processes"] == 2 and rec["metrics"]["steps"] == steps
    rows = read_jsonl(run / "grpo" / "metrics.jsonl")
    assert [r["episodes"] for r in rows] == [s * batch * 2 for s in range(1, steps + 1)]
    state = json.loads((run / "grpo" / "checkpoints" / "step-2" / "state.json").read_text())
    assert state["layout"]["processes"] == 2 and state["layout"]["num_generations"] == 2
    assert len(state["rng_ranks"]) == 2 and (run / "grpo" / "checkpoints" / "step-2" / "rng-1.pt").is_file()
    # the prompt sampler hands each process its own prompts: 2 steps x 2 processes x 2 prompts seen
    assert state["sampler"]["offset"] == 2 * 2 * (batch // 2)
    assert (run / "grpo" / "policy" / "adapter_model.safetensors").is_file() and not leftovers(run)
