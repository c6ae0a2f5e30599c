"""PPO's reward sources, found and checked before anything is written: which of them score the responses.

`resolve_rewards(cfg, run, base)` returns a `RewardPlan`:
  - the run's reward stage: when its LoRA adapter was trained on PPO's own base, the adapter and score head are
    loaded into the shared model (`shared_lora`, scored in the rollout's forward pass); otherwise the reward model
    is loaded on its own and scores decoded text (`text_model`);
  - `--reward-model PATH`: any sequence-classification model, scored on text;
  - `--reward-fn module:function`: imported and called once on two dummy prompts (rlchat/rewards.py).
Reward-model scores are normalised with reward_stats.json when `normalize_reward` is on. The combination
(weights, EOS penalty) happens per step in rlchat/rewards.py::combine_scores.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from rlchat.errors import ConfigError, RunDirError


@dataclass
class RewardPlan:
    """Which reward sources score responses (resolved during validation)."""

    shared_lora: dict | None = None         # {"lora_kwargs", "lora", "head"}: the run's reward adapter, same base
    text_model: object | None = None        # run_models.RewardScorer: any other reward model (on text)
    stats: dict | None = None               # reward_stats.json for normalisation (None = raw scores)
    fn: Callable | None = None
    fn_spec: str | None = None
    describe: list[str] = field(default_factory=list)
    parent: str | None = None               # "reward" when the run's reward stage is used
    inputs: dict = field(default_factory=dict)

    @property
    def uses_model(self) -> bool:
        return self.shared_lora is not None or self.text_model is not None


def resolve_rewards(cfg, run, base) -> RewardPlan:
    """Find and check every reward source; RunDirError when there is none (no reward stage and no flags)."""
    from rlchat import rewards, run_models
    from rlchat.actor_critic import reward_lora_parts
    from rlchat.fileio import input_record

    plan = RewardPlan()
    use_model = cfg.reward_model_weight > 0
    rec = run.record("reward") if run.exists() else None
    if use_model and cfg.reward_model:
        path = Path(cfg.reward_model).expanduser()
        plan.text_model = rewards.load_text_reward_model(path, trust_remote_code=cfg.trust_remote_code)
        if cfg.normalize_reward:
            plan.stats = rewards.read_reward_stats(path / "reward_stats.json") or rewards.read_reward_stats(
                path.parent / "reward_stats.json")
        plan.describe.append(f"reward model {cfg.reward_model} (on text)")
        plan.inputs["reward_model"] = input_record(cfg.reward_model)
    elif use_model and rec is not None and (rec.get("status") == "done" or not cfg.reward_fn):
        rec = run.require_done("reward", "train the reward model first (`rlchat train-reward --run-dir RUN "
                                         "--dataset PAIRS`), or pass --reward-model PATH or --reward-fn "
                                         "module:function")
        outputs = rec.get("outputs") or {}
        plan.parent = "reward"
        if cfg.normalize_reward:
            plan.stats = rewards.read_reward_stats(run.path / (outputs.get("reward_stats")
                                                               or "reward/reward_stats.json"))
        shared = False
        if outputs.get("kind") == "lora":
            rbase = run_models.check_reward_base(run.path)
            # same weights: compare content hashes (local models, the SFT output); Hub ids by name
            shared = (rbase.hash == base.hash) if rbase.hash and base.hash else rbase.name == base.name
        if shared:
            adapter = run.path / (outputs.get("adapter") or "reward/adapter")
            try:
                kwargs, lora, head = reward_lora_parts(adapter)
            except (OSError, ValueError, KeyError) as err:
                raise RunDirError(f"cannot read the reward adapter {adapter}: {err}",
                                  "rerun `rlchat train-reward` with --overwrite") from None
            if "weight" not in head:
                raise RunDirError(f"the reward adapter {adapter} has no score head (modules_to_save 'score')",
                                  "rerun `rlchat train-reward` with --overwrite")
            plan.shared_lora = {"lora_kwargs": kwargs, "lora": lora, "head": head}
            plan.describe.append("the run's reward adapter (shared base)")
        else:
            model, tokenizer = run_models.load_reward_model(run.path, cfg.trust_remote_code)
            plan.text_model = run_models.RewardScorer(model, tokenizer)
            plan.describe.append(f"the run's {outputs.get('kind')} reward model (on text)")
        plan.inputs["reward"] = {"stage": "reward", "base": outputs.get("base"), "hash": outputs.get("base_hash")}
    if cfg.reward_fn:
        plan.fn = rewards.load_reward_fn(cfg.reward_fn)
        rewards.check_reward_fn(plan.fn, cfg.reward_fn)
        plan.fn_spec = cfg.reward_fn
        plan.describe.append(f"reward function {cfg.reward_fn}")
        plan.inputs["reward_fn"] = {"spec": cfg.reward_fn}
    if not plan.uses_model and plan.fn is None:
        if use_model and not cfg.reward_model and rec is None:
            raise RunDirError(f"nothing can score PPO's responses: {run.path} has no reward stage and neither "
                              "--reward-model nor --reward-fn was given",
                              "train one with `rlchat train-reward`, or pass --reward-model PATH or --reward-fn "
                              "module:function")
        raise ConfigError("nothing can score PPO's responses (reward_model_weight is 0 and there is no reward_fn)",
                          "pass --reward-fn module:function, or a reward_model_weight above 0")
    return plan
