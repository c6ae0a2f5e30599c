"""Stage configs: one dataclass per stage, resolved as defaults < recipe YAML < command-line overrides.

Every field carries its help text in `metadata["help"]` (the CLI shows it, so it is written once here) and its
range rules (`gt`, `ge`, `lt`, `le`, `choices`, `required`) that `validate()` checks (the checks and the "did you
mean" hints live in rlchat/config_checks.py). `resolve()` gathers every problem (unknown keys with a "did you
mean", values of the wrong type (rlchat/coerce.py converts them), out-of-range values, cross-field rules such as PPO
batch divisibility) and raises them together in one ConfigError, before anything is loaded or written; the stages
do not validate it again.

A recipe is YAML: top-level keys apply to every stage that has them (except `model`, the pipeline's base, which
applies to sft only: later stages start from the run's SFT model); `sft:`, `reward:`, `ppo:` and `eval:`
sections apply to one stage and win over the top level:

    model: ./tiny-model
    seed: 0
    sft: {dataset: data/sft.jsonl, epochs: 3}
    ppo: {dataset: data/prompts.jsonl, episodes: 512}

Importing this module is cheap (no torch, no transformers; yaml is imported when a recipe is read).
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from rlchat.coerce import BadValue, coerce
from rlchat.config_checks import Validated, fmt_num, unknown_key
from rlchat.errors import ConfigError

REPORT_TO = ("none", "tensorboard", "wandb")
SEED_MAX = 2**32 - 1  # numpy's seed range
EVAL_POLICIES = ("base", "sft", "ppo", "ppo-best", "grpo", "rloo", "dpo")  # ppo-best: RUN/ppo/best (--eval-every)
DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")
# transformers' SchedulerType values that need no extra arguments (get_scheduler builds each from the warmup and
# the total number of optimizer steps)
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt")
# the command that runs each stage (for "see `rlchat train-reward --help`")
STAGE_COMMAND = {"sft": "sft", "reward": "train-reward", "ppo": "ppo", "eval": "eval", "grpo": "grpo",
                 "rloo": "rloo", "dpo": "dpo"}
DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust")  # TRL DPOTrainer loss_type values offered


def _f(default, help: str, **rules):
    """A dataclass field with its help text and the rules validate() checks (gt, ge, lt, le, choices, required,
    allow: extra values accepted besides the range, e.g. -1 for "no limit"; max: the largest sane magnitude, in place
    of config_checks.INT_LIMIT / FLOAT_LIMIT, which every number without an upper bound gets). Numbers must be
    finite."""
    return field(default=default, metadata={"help": help, **rules})


def _like(cls, name: str, default=dataclasses.MISSING, help: str | None = None):
    """Reuse another config's field (help text and rules), optionally with a new default or help text."""
    base = cls.__dataclass_fields__[name]
    meta = dict(base.metadata)
    if help is not None:
        meta["help"] = help
    return field(default=base.default if default is dataclasses.MISSING else default, metadata=meta)


# ---- the stage configs ----------------------------------------------------------------------------------------


@dataclass
class RunConfig(Validated):
    """Fields every stage has."""

    run_dir: str | None = _f(None, "run directory shared by all stages (created if missing); this stage writes "
                                   "RUN/<stage>/ and records itself in RUN/run.json", required=True)
    dataset: str | None = _f(None, "dataset: a .jsonl/.json/.parquet/.csv file, a save_to_disk directory or a "
                                   "Hugging Face Hub id")
    split: str = _f("train", "dataset split to read")
    dataset_config: str | None = _f(None, "dataset configuration (subset) name, for Hub datasets that have several")
    seed: int = _f(42, "random seed (data split, initialization, sampling)", ge=0, le=SEED_MAX)
    trust_remote_code: bool = _f(False, "allow custom code from the model repository to run; only for models you "
                                        "trust")
    dtype: str = _f("auto", "dtype the model weights are loaded in: auto = bfloat16 on a GPU that supports it, "
                            "else float32", choices=DTYPES)
    attn_implementation: str | None = _f(None, "attention kernel passed to from_pretrained (flash_attention_2 "
                                               "needs the flash-attn package and a GPU); None = transformers' "
                                               "choice", choices=ATTN_IMPLEMENTATIONS)
    overwrite: bool = _f(False, "redo this stage although it already finished; deletes its previous outputs "
                                "(RUN/<stage>/) first")

    def _cross_checks(self, bad: set[str]) -> list[str]:
        from rlchat.mixtures import parse_mixture

        if "dataset" in bad or not self.dataset:
            return []
        try:
            parse_mixture(self.dataset)
        except ValueError as err:
            return [f"dataset {self.dataset!r}: {err}"]
        return []


@dataclass
class TrainConfig(RunConfig):
    """Fields shared by the SFT and reward-model stages (Trainer-based)."""

    model: str | None = _f(None, "base model: a Hugging Face Hub id or a local directory")
    eval_fraction: float = _f(0.1, "fraction of the dataset held out for evaluation; 0 = no evaluation",
                              ge=0, lt=1)
    eval_split: str | None = _f(None, "evaluate on this split of the dataset (e.g. test) instead of holding out "
                                      "eval_fraction of the training split")
    epochs: float = _f(1.0, "passes over the training data (fractions allowed)", gt=0)
    max_steps: int = _f(-1, "stop after this many optimizer steps, overriding epochs; -1 = no limit",
                        gt=0, allow=(-1,), allow_help=" (no limit)")
    lr: float = _f(1e-4, "peak learning rate (AdamW; its schedule is lr_scheduler)", gt=0, max=1.0)
    lr_scheduler: str = _f("linear", "learning-rate schedule after the warmup (transformers' names); linear decays "
                                     "to 0", choices=LR_SCHEDULERS)
    warmup_ratio: float = _f(0.0, "fraction of the optimizer steps over which the learning rate rises linearly "
                                  "from 0 to lr", ge=0, lt=1)
    warmup_steps: int = _f(0, "optimizer steps of linear warmup, instead of warmup_ratio", ge=0)
    weight_decay: float = _f(0.0, "AdamW weight decay (not applied to biases and norm weights)", ge=0)
    batch_size: int = _f(8, "examples per device per forward pass", gt=0)
    grad_accum: int = _f(1, "gradient accumulation steps; the effective batch is batch_size x grad_accum x devices",
                         gt=0)
    max_length: int = _f(512, "truncate each tokenized example to this many tokens", gt=0)
    lora_r: int = _f(16, "LoRA rank", gt=0)
    lora_alpha: int = _f(32, "LoRA alpha; the adapter's scale is lora_alpha / lora_r", gt=0)
    lora_dropout: float = _f(0.05, "dropout on the LoRA adapter's input", ge=0, lt=1)
    lora_target_modules: str | list[str] = _f("all-linear", "modules LoRA adapts: 'all-linear', a comma-separated "
                                                             "list of module names such as q_proj,v_proj, or "
                                                             "'re:<regex>' matched against whole module names (e.g. "
                                                             "the top layers only: faster, less memory)")
    full: bool = _f(False, "train all weights (full fine-tuning) instead of a LoRA adapter")
    report_to: str = _f("none", "also send metrics to this tracker (metrics.jsonl is always written)",
                        choices=REPORT_TO)
    logging_steps: int = _f(10, "log metrics every N optimizer steps", gt=0)
    eval_steps: int | None = _f(None, "evaluate every N optimizer steps; None = at the end of each epoch", gt=0)
    save_steps: int = _f(100, "save a resumable checkpoint every N optimizer steps", gt=0)
    gradient_checkpointing: bool = _f(False, "recompute activations during the backward pass: less memory, slower")

    def _cross_checks(self, bad: set[str]) -> list[str]:
        out = super()._cross_checks(bad) + _training_problems(self, bad)
        if self.eval_split is not None and self.eval_split == self.split:
            out.append(f"eval_split '{self.eval_split}' is also the training split (split): evaluating on the "
                       f"training rows measures nothing; name another split, or drop eval_split to hold out "
                       f"eval_fraction of it")
        return out


def _training_problems(cfg, bad: set[str]) -> list[str]:
    """Rules of the optimizer settings every training stage has (sft, reward, ppo)."""
    out = []
    warmup = not bad & {"warmup_ratio", "warmup_steps"} and (cfg.warmup_ratio > 0 or cfg.warmup_steps > 0)
    if warmup and cfg.warmup_ratio > 0 and cfg.warmup_steps > 0:
        out.append(f"warmup_ratio ({fmt_num(cfg.warmup_ratio)}) and warmup_steps ({cfg.warmup_steps}) are both set; "
                   f"give one of them")
    if warmup and "lr_scheduler" not in bad and cfg.lr_scheduler == "constant":
        out.append("lr_scheduler 'constant' has no warmup: use 'constant_with_warmup', or drop the warmup")
    targets = cfg.lora_target_modules
    if "lora_target_modules" not in bad and isinstance(targets, str) and targets.startswith("re:"):
        import re

        try:
            re.compile(targets[3:])
        except re.error as err:
            out.append(f"lora_target_modules {targets!r} is not a valid regex ({err})")
    if "dtype" not in bad and cfg.dtype == "float16" and cfg.full:
        out.append("full fine-tuning in dtype float16 updates float16 weights with no float32 copy (small updates "
                   "round to nothing): use bfloat16 or float32, or LoRA (drop full)")
    return out


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning on chat, prompt/completion or plain-text data."""

    lr: float = _like(TrainConfig, "lr", 2e-4)
    packing: bool = _f(False, "pack several short examples into each max_length sequence")
    assistant_only_loss: bool = _f(True, "compute the loss on assistant replies only, not on system/user turns "
                                         "(conversational data)")


@dataclass
class RewardConfig(TrainConfig):
    """Reward model: a sequence classifier with one score, trained on chosen/rejected pairs."""

    model: str | None = _like(TrainConfig, "model", help="base model for the reward model: a Hub id or a local "
                                                          "directory; None = the run's SFT model")
    dataset: str | None = _like(RunConfig, "dataset", help="preference pairs (chosen/rejected, optional prompt): "
                                                            "a file, a save_to_disk directory or a Hub id")
    lr: float = _like(TrainConfig, "lr", 1e-4)
    center_rewards_coef: float | None = _f(None, "weight of an auxiliary loss that keeps rewards centred on zero "
                                                 "(e.g. 0.01); None = off", ge=0)


@dataclass
class DPOConfig(TrainConfig):
    """DPO: the policy trained directly on chosen/rejected pairs (TRL's DPOTrainer); the reference is the starting
    policy (with LoRA: the same model with the adapter off)."""

    model: str | None = _like(TrainConfig, "model", help="starting policy (and reference): None = the run's SFT "
                                                          "model; or a Hub id / local directory")
    dataset: str | None = _like(RewardConfig, "dataset")
    lr: float = _like(TrainConfig, "lr", 5e-5)
    beta: float = _f(0.1, "DPO beta: weight of the implicit KL to the reference; higher keeps the policy closer to "
                          "it (for ipo: the regularisation tau)", gt=0)
    loss_type: str = _f("sigmoid", "DPO loss: sigmoid (the DPO paper), ipo, hinge (SLiC) or robust (with "
                                   "label_smoothing as the flip rate)", choices=DPO_LOSSES)
    label_smoothing: float = _f(0.0, "assumed fraction of pairs whose label is flipped (conservative / robust DPO); "
                                     "0 = plain DPO", ge=0, lt=0.5)


@dataclass
class PPOConfig(RunConfig):
    """PPO on prompts, scored by the run's reward model and/or a reward function.

    Step arithmetic: each PPO step generates `batch_size` rollouts, then runs `ppo_epochs` passes over them in
    `mini_batches` optimizer steps, each accumulated over `grad_accum` micro-batches. There is no `epochs` field:
    the amount of training is `episodes` (total rollouts), i.e. episodes / batch_size PPO steps.
    """

    dataset: str | None = _like(RunConfig, "dataset", help="prompts: a file, a save_to_disk directory or a Hub id "
                                                            "with a 'prompt', 'messages' or 'text' column")
    model: str | None = _f(None, "starting policy: None = the run's SFT model; or a Hub id / local directory")
    report_to: str = _like(TrainConfig, "report_to")
    lr: float = _like(TrainConfig, "lr", 5e-5)
    lr_scheduler: str = _like(TrainConfig, "lr_scheduler", help="learning-rate schedule over the optimizer steps "
                              "(ppo_epochs x mini_batches per PPO step) after the warmup; linear decays to 0")
    warmup_ratio: float = _like(TrainConfig, "warmup_ratio")
    warmup_steps: int = _like(TrainConfig, "warmup_steps")
    weight_decay: float = _like(TrainConfig, "weight_decay", 0.01, help="AdamW weight decay on the trained weights "
                                "(adapters, value head)")
    episodes: int = _f(1024, "total rollouts (prompt + generated response) to train on", gt=0)
    batch_size: int = _f(16, "rollouts generated per PPO step", gt=0)
    mini_batches: int = _f(1, "optimizer steps per PPO epoch: each batch of rollouts is split into this many "
                              "minibatches", gt=0)
    grad_accum: int = _f(1, "micro-batches per minibatch (gradient accumulation: same result, less memory)", gt=0)
    ppo_epochs: int = _f(4, "optimization passes over each batch of rollouts", gt=0)
    max_steps: int = _like(TrainConfig, "max_steps",
                           help="stop after this many PPO steps; -1 = episodes / batch_size steps")
    response_length: int = _f(64, "maximum new tokens generated per response", gt=0)
    max_prompt_length: int = _f(256, "maximum prompt length in tokens; longer prompts are truncated from the left",
                                gt=0)
    temperature: float = _f(0.7, "sampling temperature for rollouts", gt=0)
    top_p: float = _f(1.0, "nucleus sampling for rollouts; 1 = off", gt=0, le=1)
    kl_coef: float = _f(0.05, "weight of the per-token KL penalty against the reference (SFT) policy; the starting "
                              "value when target_kl is set", ge=0)
    target_kl: float | None = _f(None, "target KL per response for the adaptive KL controller (Ziegler et al. "
                                       "2019); None = keep kl_coef fixed", gt=0)
    kl_horizon: int = _f(10000, "horizon of the adaptive KL controller, in rollouts", gt=0)
    gamma: float = _f(1.0, "discount factor for GAE", ge=0, le=1)
    lam: float = _f(0.95, "GAE lambda (bias/variance trade-off of the advantages)", ge=0, le=1)
    cliprange: float = _f(0.2, "PPO clip range for the policy probability ratio", gt=0)
    cliprange_value: float = _f(0.2, "clip range for value updates around the rollout's values", gt=0)
    vf_coef: float = _f(0.1, "weight of the value loss in the total loss", gt=0)
    max_grad_norm: float = _f(1.0, "clip the gradient norm to this value", gt=0)
    whiten_rewards: bool = _f(False, "whiten per-token rewards within each batch before GAE")
    normalize_reward: bool = _f(True, "normalize reward-model scores with its held-out mean and std "
                                      "(RUN/reward/reward_stats.json)")
    missing_eos_penalty: float | None = _f(None, "subtract this from the score of responses that do not finish "
                                                 "(no EOS within response_length); None = off", ge=0)
    lora_r: int = _like(TrainConfig, "lora_r")
    lora_alpha: int = _like(TrainConfig, "lora_alpha")
    lora_dropout: float = _like(TrainConfig, "lora_dropout", 0.0)
    lora_target_modules: str | list[str] = _like(TrainConfig, "lora_target_modules")
    full: bool = _f(False, "train all policy and value weights instead of LoRA adapters")
    reward_model: str | None = _f(None, "score with this reward model directory instead of the run's reward stage")
    reward_fn: str | None = _f(None, "Python reward function 'module:function' or 'path/file.py:function' "
                                     "(see README for its signature); added to the reward model's score")
    reward_model_weight: float = _f(1.0, "weight of the reward model's score in the total score", ge=0)
    reward_fn_weight: float = _f(1.0, "weight of reward_fn's score in the total score", ge=0)
    separate_models: bool = _f(False, "load separate policy, value and reference models instead of one shared base "
                                      "with adapters (more memory)")
    value_model: str = _f("adapter", "the critic: 'adapter' = its own LoRA adapter + head initialised from the reward "
                                     "model; 'policy' = a value head on the policy adapter's hidden states (a shared "
                                     "critic: ~2x faster updates, the value loss also moves the policy)",
                          choices=("adapter", "policy"))
    save_every: int = _f(20, "save a resumable checkpoint every N PPO steps", gt=0)
    sample_every: int = _f(10, "write sample responses to samples.jsonl every N PPO steps", gt=0)
    eval_every: int = _f(0, "every N PPO steps (and at the last), score the policy on held-out prompts (sampled at "
                            "the PPO temperature) with the reward model and --judge, log heldout/* metrics and keep "
                            "the best policy as RUN/ppo/best/; 0 = off", ge=0)
    eval_dataset: str | None = _f(None, "held-out prompts for --eval-every; None = hold out eval_fraction of "
                                        "--dataset (not trained on)")
    eval_fraction: float = _f(0.1, "with --eval-every and no --eval-dataset: fraction of the prompts held out",
                              gt=0, lt=1)
    eval_prompts: int = _f(64, "with --eval-every: at most this many held-out prompts per evaluation", gt=0)
    judge: str | None = _f(None, "with --eval-every: a Python judge 'module:function' or 'path/file.py:function' "
                                 "(as `rlchat eval --judge`); the best checkpoint is chosen by it, else by the "
                                 "held-out reward")
    logging_steps: int = _like(TrainConfig, "logging_steps", 1, help="log metrics every N PPO steps")
    gradient_checkpointing: bool = _like(TrainConfig, "gradient_checkpointing")

    def _cross_checks(self, bad: set[str]) -> list[str]:
        out = super()._cross_checks(bad) + _training_problems(self, bad)
        if bad & {"batch_size", "mini_batches", "grad_accum", "episodes"}:
            pass
        elif self.batch_size % self.mini_batches:
            ok = [d for d in range(1, self.batch_size + 1) if self.batch_size % d == 0]
            out.append(f"batch_size ({self.batch_size}) must be divisible by mini_batches ({self.mini_batches}); "
                       f"mini_batches could be {_choices_text(ok)}")
        else:
            per_mini = self.batch_size // self.mini_batches
            if per_mini % self.grad_accum:
                ok = [d for d in range(1, per_mini + 1) if per_mini % d == 0]
                out.append(f"each minibatch has batch_size / mini_batches = {self.batch_size} / {self.mini_batches} "
                           f"= {per_mini} rollouts, which is not divisible by grad_accum ({self.grad_accum}); "
                           f"grad_accum could be {_choices_text(ok)}")
        if not bad & {"batch_size", "episodes"} and self.episodes < self.batch_size:
            out.append(f"episodes ({self.episodes}) must be >= batch_size ({self.batch_size}): one PPO step uses "
                       f"batch_size rollouts")
        if self.reward_fn is not None and ":" not in self.reward_fn:
            out.append(f"reward_fn must look like 'module:function' or 'path/file.py:function', got "
                       f"{self.reward_fn!r}")
        if (not bad & {"reward_model_weight", "reward_fn_weight"} and self.reward_model_weight == 0
                and (self.reward_fn is None or self.reward_fn_weight == 0)):
            out.append("reward_model_weight is 0 and there is no weighted reward_fn: nothing would score responses")
        if "value_model" not in bad and self.value_model == "policy" and (self.separate_models or self.full):
            out.append("value_model 'policy' (a shared critic) needs the shared base: drop separate_models / full, "
                       "or use value_model 'adapter'")
        if "eval_every" not in bad and not self.eval_every and (self.eval_dataset or self.judge):
            given = " and ".join(k for k in ("eval_dataset", "judge") if getattr(self, k))
            out.append(f"{given} is only used with held-out evaluation: set eval_every (e.g. 10), or drop {given}")
        if self.judge is not None and ":" not in self.judge:
            out.append(f"judge must look like 'module:function' or 'path/file.py:function', got {self.judge!r}")
        return out


@dataclass
class GroupConfig(PPOConfig):
    """Critic-free RL (grpo, rloo) on the PPO loop: num_generations responses per prompt, group advantages, no value
    model. PPO_ONLY fields (value model, GAE) are no flags of these commands; a recipe section setting one is refused.
    """

    PPO_ONLY: typing.ClassVar[tuple] = ("gamma", "lam", "cliprange_value", "vf_coef", "whiten_rewards", "value_model",
                                        "separate_models", "full")
    stage: typing.ClassVar[str] = "grpo"
    batch_size: int = _like(PPOConfig, "batch_size", help="responses generated per step: batch_size / "
                            "num_generations prompts, num_generations responses each (per process)")
    num_generations: int = _f(4, "responses sampled per prompt (the group whose rewards make the baseline)", gt=0)
    kl_in: str = _f("loss", "where the KL to the reference (the base, adapter off) goes: 'loss' = kl_coef x k3 per "
                            "token in the loss (GRPO); 'reward' = kl_coef x sum of k1 subtracted from each "
                            "response's reward before the group baseline (RLOO)", choices=("loss", "reward"))

    def _cross_checks(self, bad: set[str]) -> list[str]:
        out = super()._cross_checks(bad)
        defaults = PPOConfig()
        out += [f"{k} is a PPO setting ({self.stage} has no value model and no GAE): drop it" for k in self.PPO_ONLY
                if getattr(self, k) != getattr(defaults, k)]
        G = self.num_generations
        if bad & {"num_generations", "batch_size"}:
            pass
        elif G < 2:
            out.append(f"num_generations is {G}: {self.stage} compares each response with the others to the same "
                       f"prompt, so it needs at least 2 (e.g. --num-generations 4)")
        elif self.batch_size % G:
            out.append(f"batch_size ({self.batch_size}) is not divisible by num_generations ({G}): a step samples "
                       f"{G} responses for each of batch_size / {G} prompts; batch_size could be "
                       f"{_choices_text([G * k for k in range(1, 5)])}")
        return out


@dataclass
class GRPOConfig(GroupConfig):
    """GRPO (Shao et al. 2024): advantage = (reward - group mean) / group std; KL as a k3 loss term by default."""

    kl_coef: float = _like(PPOConfig, "kl_coef", 0.04, help="KL coefficient (GRPO's beta; 0.04 as in "
                           "DeepSeekMath); the starting value when target_kl is set")
    scale_rewards: bool = _f(True, "divide each reward's distance to its group mean by the group's std (GRPO); "
                                   "--no-scale-rewards keeps the plain difference (Dr. GRPO, TRL's "
                                   "scale_rewards=False)")


@dataclass
class RLOOConfig(GroupConfig):
    """RLOO (Ahmadian et al. 2024): advantage = reward - mean of the other responses' rewards; KL in the reward."""

    stage: typing.ClassVar[str] = "rloo"
    kl_in: str = _like(GroupConfig, "kl_in", "reward")


@dataclass
class EvalConfig(RunConfig):
    """Compare the run's policies on held-out prompts: win rates, scores, KL, response lengths."""

    dataset: str | None = _like(RunConfig, "dataset", help="prompts to evaluate on (a file, a save_to_disk "
                                                            "directory or a Hub id); None = the run's PPO prompts")
    max_prompts: int | None = _f(None, "evaluate on at most this many prompts; None = all", gt=0)
    include_base: bool = _f(False, "also evaluate the base model the run started from")
    judge: str | None = _f(None, "optional Python judge 'module:function' or 'path/file.py:function' "
                                 "(f(prompts, completions) -> list[float]), scored alongside the run's reward model")
    max_new_tokens: int = _f(64, "maximum new tokens generated per response", gt=0)
    temperature: float = _f(0.0, "sampling temperature; 0 = greedy decoding", ge=0)
    top_p: float = _f(1.0, "nucleus sampling; 1 = off", gt=0, le=1)
    batch_size: int = _f(16, "prompts generated per batch", gt=0)
    kl_samples: int = _f(4, "responses sampled per prompt from each policy (at the PPO sampling temperature) to "
                            "estimate its KL to the SFT policy, with a standard error", gt=0)
    policies: list[str] | None = _f(None, f"policies to compare, comma-separated from {', '.join(EVAL_POLICIES)}; "
                                          f"None = every one the run has", choices=EVAL_POLICIES)
    pairwise: bool = _f(False, "also compare the trained policies (ppo, grpo, rloo, dpo, ...) with each other, every "
                               "pair, besides each one with the reference")


def _choices_text(values: list[int]) -> str:
    if len(values) > 8:
        values = values[:4] + ["..."] + values[-2:]
    return ", ".join(map(str, values[:-1])) + (" or " if len(values) > 1 else "") + str(values[-1])


STAGE_CONFIGS: dict[str, type] = {"sft": SFTConfig, "reward": RewardConfig, "ppo": PPOConfig, "eval": EvalConfig,
                                   "grpo": GRPOConfig, "rloo": RLOOConfig, "dpo": DPOConfig}


# ---- resolve --------------------------------------------------------------------------------------------------


def field_help(cls) -> dict[str, str]:
    """{field name: help text} for a stage config class, in field order (the CLI's --help uses it)."""
    return {f.name: f.metadata["help"] for f in fields(cls)}


def stage_keys(stage: str) -> list[str]:
    """The field names of a stage's config."""
    return [f.name for f in fields(STAGE_CONFIGS[stage])]


def load_recipe(path: str | Path) -> dict:
    """The recipe YAML as a dict; ConfigError if the file is missing, not YAML or not a mapping."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} not found", "check the path; recipes/ has examples")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1}: {getattr(err, 'problem', '')})" if mark else ""
        raise ConfigError(f"recipe {path} is not valid YAML{where}", "fix the YAML syntax") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read recipe {path}: {err}", "check the file") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of keys to values, got a {type(data).__name__}",
                          "write it as `key: value` lines, with optional sft:/reward:/ppo:/eval: sections")
    return {str(k): v for k, v in data.items()}


# Top-level recipe keys that apply to some stages only. `model` is the pipeline's base model: sft starts from it;
# train-reward and ppo start from the run's SFT model unless their own section (or --model) names another one.
TOP_LEVEL_ONLY_FOR = {"model": ("sft",)}


def resolve(stage_cls: type | None, stage: str, recipe: str | Path | None = None,
            overrides: dict[str, Any] | None = None):
    """The config for `stage`: defaults < recipe top level < recipe[stage] section < overrides (None = not given).

    Raises one ConfigError with every problem: unknown keys anywhere in the recipe (a typo in another stage's
    section is reported too), values of the wrong type, and cfg.validate() problems.
    """
    stage_cls = stage_cls or STAGE_CONFIGS[stage]
    hints = typing.get_type_hints(stage_cls)
    names = [f.name for f in fields(stage_cls)]
    problems: list[str] = []
    command = f"rlchat {STAGE_COMMAND.get(stage, stage)}"
    given: dict[str, tuple[Any, str]] = {}  # key -> (raw value, where it came from)

    if recipe is not None:
        data = load_recipe(recipe)
        all_keys = sorted({n for cls in STAGE_CONFIGS.values() for f in fields(cls) for n in [f.name]})
        top = f"{recipe} (top level)"
        for key, val in data.items():
            if key in STAGE_CONFIGS:
                continue
            if key in getattr(stage_cls, "PPO_ONLY", ()):  # grpo/rloo have no value model: PPO's keys are not theirs
                continue
            if key in names and stage in TOP_LEVEL_ONLY_FOR.get(key, (stage,)):
                given[key] = (val, top)
            elif key not in all_keys:
                problems.append(unknown_key(key, top, all_keys + list(STAGE_CONFIGS), command))
        for section, cls in STAGE_CONFIGS.items():
            body = data.get(section)
            if body is None:
                continue
            where = f"{recipe} ({section} section)"
            if not isinstance(body, dict):
                problems.append(f"section '{section}' in {recipe} must be a mapping of keys to values, "
                                f"got {body!r}")
                continue
            valid = [f.name for f in fields(cls)]
            for key, val in body.items():
                key = str(key)
                if key not in valid:
                    problems.append(unknown_key(key, where, valid, f"rlchat {STAGE_COMMAND[section]}"))
                elif section == stage:
                    given[key] = (val, where)

    for key, val in (overrides or {}).items():
        if val is None:
            continue
        if key not in names:
            problems.append(unknown_key(key, "the command line", names, command))
        else:
            given[key] = (val, "the command line")

    values = {}
    for key, (val, where) in given.items():
        try:
            values[key] = coerce(val, hints[key])
        except BadValue as bad:
            problems.append(f"{key} must be {bad.expected}, got {val!r} (in {where})")

    cfg = stage_cls(**values)
    for key, problem in cfg._problems():
        if key in given and key in values:
            problem += f" (in {given[key][1]})"
        problems.append(problem)
    if problems:
        raise ConfigError(problems, f"correct the keys and values listed; `{command} --help` describes every option",
                          subject=f"the {stage} config")
    return cfg


def to_dict(cfg) -> dict:
    """The config as a plain dict (for the manifest and RUN/<stage>/config.yaml)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg, with_help: bool = False) -> str:
    """The config as YAML; with_help puts each field's help as a comment above it. Reusable as a recipe."""
    import yaml

    if not with_help:
        return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)
    lines = []
    for f in fields(cfg):
        lines.append(f"# {f.metadata['help']}")
        lines.append(yaml.safe_dump({f.name: getattr(cfg, f.name)}, sort_keys=False,
                                    default_flow_style=False).rstrip("\n"))
    return "\n".join(lines) + "\n"
