"""`rlchat ppo`: PPO with LoRA on one shared base model (InstructGPT-style RLHF, the N+ implementation details).

What `run(cfg)` does, in order:
  1. validate, before anything is written to the run directory: the config; the run directory (a finished stage
     needs --overwrite; a crashed one resumes); the starting policy (the run's SFT model with its adapter merged,
     or --model); the reward sources (the run's reward model, --reward-model, --reward-fn: the function is imported
     and called once on two dummy prompts); the prompts (a 'prompt', 'messages' or 'text' column).
  2. build the models (rlchat/rollout.py): ONE base model in memory; the policy is a LoRA adapter on it (peft starts
     LoRA with B = 0, so policy == reference at step 0), the reference is the base with no adapter, the value
     model is a second adapter plus a scalar head initialised from the reward model's adapter and head, and the
     reward model is a third, frozen adapter with its score head. `--separate-models` loads four models instead.
     `value_model: policy` (a shared critic) drops the value adapter: the value head reads the policy's hidden
     states and one pass per micro-batch trains both (about half the training compute; the value loss then also
     moves the policy's LoRA, so it is not the default).
  3. the PPO loop; every step:
       1. take batch_size prompts (shuffled each pass over the dataset, seeded)
       2. sample responses (temperature, top_p, at most response_length new tokens); cut each after its first EOS
       3. one forward pass scores the rollout: policy and reference logprobs at the sampling temperature,
          values, the reward adapter's score at the last response token
       4. score: reward sources combined (rlchat/rewards.py), normalised with reward_stats.json, minus
          missing_eos_penalty for responses with no EOS
       5. per-token rewards: -kl_coef * (logprob - ref_logprob) on every token, plus the score on the last token
       6. GAE advantages and returns (gamma, lam); advantages whitened over the batch
       7. ppo_epochs passes over the batch in mini_batches shuffled minibatches, each accumulated over grad_accum
          micro-batches: clipped policy loss + vf_coef * clipped value loss, gradient clipping, AdamW step
       8. update the adaptive KL coefficient (when target_kl is set); log; write samples; checkpoint
     The model stays in eval mode throughout (no dropout in rollouts or updates), and logprobs are always
     computed from logits / temperature, so the ratio is exactly 1 on the first minibatch.
  4. write RUN/ppo/policy/ (a PEFT adapter for the SFT-merged base: PeftModel.from_pretrained(sft_model, dir);
     with --full a whole model), RUN/ppo/value/ (adapter + value_head.safetensors), and the final metrics.

All the math lives in rlchat/ppo_math.py; this file is plumbing and the loop.

metrics.jsonl: one JSON row every `logging_steps` PPO steps, keys:
    step                        PPO steps done (one step = one batch of rollouts and its ppo_epochs of updates)
    episodes                    rollouts trained on so far (step * batch_size * processes)
    objective/scores            mean final score of the batch's responses (all sources, normalised, EOS penalty)
    objective/scores_model      mean (normalised) reward-model score, when a reward model is used
    objective/scores_fn         mean reward-function score, when --reward-fn is used
    objective/rewards           mean total reward per response: score - kl_coef * sum_t KL_t
    objective/kl                mean per-response KL to the reference: sum_t (logprob_t - ref_logprob_t) (k1)
    objective/entropy           mean per-token entropy of the sampling policy (nats, at the temperature)
    loss/policy                 clipped PPO policy loss, averaged over all micro-batches of the step
    loss/value                  clipped value loss (0.5 * squared error), averaged likewise
    policy/clipfrac             fraction of response tokens whose probability ratio was clipped
    policy/approx_kl            0.5 * mean (new_logprob - old_logprob)^2: how far the updates moved the policy
    value/clipfrac              fraction of tokens whose value update was clipped
    value/explained_variance    1 - Var(returns - values) / Var(returns) of the rollout values (1 = perfect)
    response/length             mean response length in tokens (up to and including the EOS)
    response/eos_rate           fraction of responses that ended with an EOS within response_length
    lr                          learning rate after this step (linear decay to 0 over the run)
    kl_coef                     KL coefficient used for this step's rewards
    shape/prompt_width          P: prompt tokens per row after left padding (the longest prompt of the batch)
    shape/response_width        R: generated tokens per row (the longest response; generation stops when all end)
    time/generation_s           seconds spent sampling responses this step
    time/scoring_s              seconds in the rollout forward pass and the reward sources
    time/training_s             seconds in the PPO epochs (forward, backward, optimizer)
    episodes_per_s              rollouts per second over the whole step
samples.jsonl: every `sample_every` steps (and the first and last step), a few rows
    {"step", "prompt", "completion", "score", "kl", "length", "has_eos"}.

Checkpoints: RUN/ppo/checkpoints/step-N/ every `save_every` steps, written atomically (the last two are kept):
policy/ and value/ adapters, value_head.safetensors, optimizer.pt and scheduler.pt (loaded with
weights_only=True), rng.pt (torch RNG states), state.json (step, episodes, KL controller, prompt-sampler position,
python and numpy RNG states, per-step score history). Running the same command again after a crash or kill
resumes from the newest checkpoint and continues exactly as the uninterrupted run would have (same prompts, same
samples, on the same hardware).

Left out on purpose: sequence packing, vLLM-style fast generation, several responses per prompt (RLOO/GRPO),
reward-model ensembles, an entropy bonus.

    rlchat ppo --run-dir runs/demo --dataset .demo/data/prompts.jsonl --episodes 512
"""
from __future__ import annotations

import json
import logging
import math
import os
import pickle
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from rlchat.errors import ConfigError, DataError, ModelError, RlchatError, RunDirError

log = logging.getLogger("rlchat")

STAGE = "ppo"
KEEP_CHECKPOINTS = 2
N_SAMPLES = 4  # responses written to samples.jsonl per sampled step


# --------------------------------------------------------------------------------------------------- prompts


@dataclass
class Prompt:
    ids: list[int]              # chat-template token ids, ending with the generation prompt
    text: str                   # the user's text (what reward functions see)
    messages: list[dict]        # chat messages (what a text reward model re-renders)


class PromptSampler:
    """Batches of prompt indices: a fresh seeded permutation on each pass over the dataset.

    The state (`epoch`, `offset`) goes into checkpoints, so a resumed run sees the same prompts.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self.epoch, self.offset = 0, 0

    def _order(self) -> list[int]:
        import torch

        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def next(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            order = self._order()
            take = order[self.offset:self.offset + k - len(out)]
            out += take
            self.offset += len(take)
            if self.offset >= self.n:
                self.epoch, self.offset = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "n": self.n, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])


def load_prompts(cfg, tokenizer) -> tuple[list[Prompt], str, int]:
    """(prompts, column, n_truncated) from cfg.dataset; DataError when there is no usable prompt."""
    from rlchat import data
    from rlchat.stages.evaluate import encode_prompt

    ds = data.load_any(cfg.dataset, split=cfg.split, config=cfg.dataset_config)
    column = data.detect_prompt_column(ds, cfg.dataset)
    prompts, n_truncated = [], 0
    for row in ds:
        messages = data.to_prompt_messages(row, column)
        text = data.prompt_text(row, column)
        full = encode_prompt(tokenizer, messages)
        ids = full[-cfg.max_prompt_length:]
        n_truncated += len(ids) < len(full)
        if ids:
            prompts.append(Prompt(ids, text, messages))
    if not prompts:
        raise DataError(f"dataset {cfg.dataset} has no prompts in column '{column}'",
                        "give it at least one non-empty prompt")
    return prompts, column, n_truncated


# --------------------------------------------------------------------------------------------- reward sources


@dataclass
class RewardPlan:
    """Which reward sources score responses (resolved during validation)."""

    shared_lora: dict | None = None         # {"lora_kwargs", "lora", "head"}: the run's reward adapter, same base
    text_model: object | None = None        # rewards.TextRewardModel: any other reward model
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
    from rlchat import rewards
    from rlchat.rollout import reward_lora_parts
    from rlchat.rundir import input_record

    plan = RewardPlan()
    use_model = cfg.reward_model_weight > 0
    rec = run.record("reward") if run.exists() else None
    if use_model and cfg.reward_model:
        path = Path(cfg.reward_model).expanduser()
        plan.text_model = rewards.TextRewardModel.load(path, trust_remote_code=cfg.trust_remote_code)
        if cfg.normalize_reward:
            plan.stats = rewards.read_reward_stats(path / "reward_stats.json") or rewards.read_reward_stats(
                path.parent / "reward_stats.json")
        plan.describe.append(f"reward model {cfg.reward_model} (on text)")
        plan.inputs["reward_model"] = input_record(cfg.reward_model)
    elif use_model and rec is not None and (rec.get("status") == "done" or not cfg.reward_fn):
        from rlchat.stages import reward as reward_stage

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
            rbase = reward_stage.check_reward_base(run.path)
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
            model, tokenizer = reward_stage.load_reward_model(run.path, cfg.trust_remote_code)
            plan.text_model = rewards.TextRewardModel(model, tokenizer)
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


# ----------------------------------------------------------------------------------------------- checkpoints


def _step_of(path: Path) -> int | None:
    m = re.fullmatch(r"step-(\d+)", path.name)
    return int(m.group(1)) if m and path.is_dir() else None


def last_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete `step-N` (its state.json parses and its policy/value safetensors are whole);
    atomic_dir makes half-written ones invisible, this skips ones damaged afterwards (logged)."""
    from rlchat.models import safetensors_problem

    if not ckpt_dir.is_dir():
        return None
    found = sorted(((s, p) for p in ckpt_dir.iterdir() if (s := _step_of(p)) is not None), reverse=True)
    for _, path in found:
        try:
            json.loads((path / "state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            log.warning("skipping checkpoint %s: state.json is missing or cut short", path)
            continue
        weights = sorted((path / "policy").glob("*.safetensors")) + sorted((path / "value").glob("*.safetensors"))
        problems = [f"{f.relative_to(path)}: {problem}" for f in weights if (problem := safetensors_problem(f))]
        if problems:
            log.warning("skipping damaged checkpoint %s (%s)", path, problems[0])
            continue
        return path
    return None


def save_adapter(peft_model, name: str, out: Path, base_name: str | None) -> None:
    """Adapter `name` as a standalone PEFT adapter dir (loads with PeftModel.from_pretrained as "default")."""
    import copy

    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = get_peft_model_state_dict(peft_model, adapter_name=name)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(out / "adapter_model.safetensors"))
    config = copy.deepcopy(peft_model.peft_config[name])
    config.inference_mode = True
    config.base_model_name_or_path = base_name
    config.save_pretrained(str(out))


def load_adapter(peft_model, name: str, src: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(peft_model, load_file(str(src / "adapter_model.safetensors")), adapter_name=name)


def save_policy(model, out: Path, base_name: str | None) -> None:
    """The policy into `out`: a PEFT adapter, or (--full) a whole model written by save_pretrained."""
    from rlchat.rollout import POLICY, _plain

    if model.full:
        _plain(model.policy_lm).save_pretrained(str(out), safe_serialization=True)
    else:
        save_adapter(model.peft_for(POLICY), POLICY, out, base_name)


def save_value(model, out: Path, base_name: str | None) -> None:
    """The value model into `out`: its adapter (or, --full, its backbone weights) + value_head.safetensors."""
    from safetensors.torch import save_file

    from rlchat.rollout import VALUE, _plain

    if model.full:
        save_file({k: v.detach().cpu().contiguous() for k, v in _plain(model.value_lm).state_dict().items()
                   if not k.startswith("lm_head")}, str(out / "model.safetensors"))
    elif model.shared_critic:  # the head reads the policy adapter's hidden states: nothing else to save
        (out / "value_model.json").write_text(json.dumps({"value_model": "policy"}) + "\n", encoding="utf-8")
    else:
        save_adapter(model.peft_for(VALUE), VALUE, out, base_name)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.value_head.state_dict().items()},
              str(out / "value_head.safetensors"))


def load_weights(model, src: Path) -> None:
    """Policy and value weights back from a checkpoint written by save_policy / save_value."""
    from safetensors.torch import load_file

    from rlchat.rollout import POLICY, VALUE, _plain

    if model.full:
        _plain(model.policy_lm).load_state_dict(load_file(str(src / "policy" / "model.safetensors")), strict=False)
        _plain(model.value_lm).load_state_dict(load_file(str(src / "value" / "model.safetensors")), strict=False)
    else:
        load_adapter(model.peft_for(POLICY), POLICY, src / "policy")
        if not model.shared_critic:
            load_adapter(model.peft_for(VALUE), VALUE, src / "value")
    model.value_head.load_state_dict(load_file(str(src / "value" / "value_head.safetensors")))


def rng_state() -> tuple[dict, dict]:
    """(JSON-able python + numpy RNG states, tensor RNG states for torch.save)."""
    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    plain = {"python": [version, list(internal), gauss],
             "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state_all()
    return plain, tensors


def set_rng_state(plain: dict, tensors: dict) -> None:
    import numpy as np
    import torch

    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(tensors["cuda"])


def save_checkpoint(ckpt_dir: Path, step: int, model, optimizer, scheduler, state: dict, base_name,
                    rngs: list | None = None) -> Path:
    """RUN/ppo/checkpoints/step-N, atomically; then drop all but the newest KEEP_CHECKPOINTS.

    rngs: [(plain, tensors) of rank 0, of rank 1, ...] in a multi-process run (rng_state() of each process,
    gathered by the caller); rank r > 0 gets rng-r.pt and state["rng_ranks"][r]."""
    import torch

    from rlchat.rundir import atomic_dir

    final = ckpt_dir / f"step-{step}"
    rngs = rngs or [rng_state()]
    plain, tensors = rngs[0]
    if len(rngs) > 1:
        state = {**state, "rng_ranks": [p for p, _ in rngs]}
    with atomic_dir(final) as tmp:
        (tmp / "policy").mkdir()
        (tmp / "value").mkdir()
        save_policy(model, tmp / "policy", base_name)
        save_value(model, tmp / "value", base_name)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(tensors, tmp / "rng.pt")
        for r, (_, t) in enumerate(rngs[1:], start=1):
            torch.save(t, tmp / f"rng-{r}.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "rng": plain}) + "\n", encoding="utf-8")
    steps = sorted((s, p) for p in ckpt_dir.iterdir() if (s := _step_of(p)) is not None)
    for _, old in steps[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_partial_checkpoints(ckpt_dir: Path) -> None:
    """Delete what a kill left behind while a checkpoint was being written (atomic_dir's hidden tmp/old dirs)."""
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            if p.name.startswith(".step-") and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: Path, model, optimizer, scheduler, rank: int = 0) -> dict:
    """Restore weights, optimizer, scheduler and this process's RNG from `path`; returns state.json (step,
    episodes, ...)."""
    import torch

    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    load_weights(model, path)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    if rank == 0:
        set_rng_state(state["rng"], torch.load(path / "rng.pt", weights_only=True))
    else:
        set_rng_state(state["rng_ranks"][rank], torch.load(path / f"rng-{rank}.pt", weights_only=True))
    return state


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Drop rows logged after `max_step` (written by the run that crashed after its last checkpoint)."""
    from rlchat.rundir import atomic_write_text

    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= max_step:
                keep.append(line)
        except ValueError:
            continue  # a line cut by the crash
    atomic_write_text(path, "".join(line + "\n" for line in keep))


# ------------------------------------------------------------------------------------------------- trackers


class Trackers:
    """Optional tensorboard / wandb mirrors of metrics.jsonl (metrics.jsonl is always written)."""

    def __init__(self, kind: str, stage_dir: Path, config: dict):
        self.tb = self.wandb = None
        if kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(stage_dir / "tensorboard"))
        elif kind == "wandb":
            import wandb

            self.wandb = wandb
            wandb.init(project=os.environ.get("WANDB_PROJECT", "rlchat"), name=stage_dir.parent.name,
                       config=config, resume="allow", dir=str(stage_dir))

    def log(self, row: dict, step: int) -> None:
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def check_report_to(kind: str) -> None:
    import importlib.util

    need = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(kind)
    if need and importlib.util.find_spec(need) is None:
        raise ConfigError(f"--report-to {kind} needs the '{need}' package, which is not installed",
                          f"pip install {need}, or pass --report-to none")


# ------------------------------------------------------------------------------------------------------- run


def _finite(x) -> bool:
    import torch

    return bool(torch.isfinite(x).all())


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def run(cfg) -> dict:
    """Train the PPO policy of `cfg.run_dir`; returns the final metrics (and a one-line "summary").

    Out-of-memory errors anywhere (building the models too, before the stage begins) are one line."""
    from rlchat.stages.common import oom_guard

    with oom_guard(STAGE):
        return _run(cfg)


def _run(cfg) -> dict:
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from rlchat import models
    from rlchat.config import to_dict, to_yaml
    from rlchat.progress import console
    from rlchat.rundir import RunDir, atomic_dir, atomic_write_text, input_record
    from rlchat.stages.common import is_oom, quiet_libraries, remove_leftovers, stage_lifecycle
    from rlchat.stages.reward import load_base_causal, resolve_base

    t_start = time.time()
    # ---- 1. validate everything before the first write
    if not cfg.dataset:
        raise ConfigError("ppo needs prompts", "pass --dataset (a .jsonl/.json/.parquet/.csv file, a save_to_disk "
                          "directory or a Hub id with a 'prompt', 'messages' or 'text' column)")
    problems = cfg.validate() if hasattr(cfg, "validate") else []
    if problems:
        raise ConfigError(problems)
    if cfg.full and not cfg.separate_models:
        console.print("[yellow]ppo --full trains whole models: using separate policy, reference, value and reward "
                      "models[/]", highlight=False)
    check_report_to(cfg.report_to)
    # "adapter" (default): the value model is its own LoRA adapter + head, initialised from the reward model;
    # "policy": a shared critic, the head on the policy's hidden states (one training pass instead of two)
    value_model = getattr(cfg, "value_model", "adapter") or "adapter"
    if value_model not in ("adapter", "policy"):
        raise ConfigError(f"value_model must be 'adapter' or 'policy', got {value_model!r}",
                          "pass --value-model adapter (default) or policy")
    if value_model == "policy" and (cfg.separate_models or cfg.full):
        raise ConfigError("value_model 'policy' (a shared critic) needs the shared base",
                          "drop --separate-models / --full, or use --value-model adapter")
    run = RunDir(cfg.run_dir)
    mode = run.check_can_start(STAGE, cfg.overwrite)
    if not cfg.model:
        run.require_done("sft", "train the SFT model first (`rlchat sft --run-dir RUN ...`), or pass --model to "
                                "start PPO from any causal LM")
    base = resolve_base(run, cfg.model)
    layout = {"separate_models": bool(cfg.separate_models), "full": bool(cfg.full), "value_model": value_model,
              "lora_r": cfg.lora_r, "lora_target_modules": cfg.lora_target_modules}
    from rlchat import dist

    layout["processes"] = dist.world_size()  # a resume must use as many processes (batches are per process)
    resume_from = last_checkpoint(run.checkpoints_dir(STAGE)) if mode == "resume" else None
    if resume_from is not None:
        old = ((run.record(STAGE) or {}).get("inputs") or {}).get("base") or {}
        if old and (old.get("name") != base.name or old.get("hash") != base.hash):
            raise RunDirError(f"cannot resume the ppo stage in {run.path}: its checkpoints were trained on base "
                              f"{old.get('name')}, which has changed since",
                              "rerun with --overwrite to start PPO afresh")
        saved = json.loads((resume_from / "state.json").read_text(encoding="utf-8")).get("layout", layout)
        saved.setdefault("processes", 1)  # checkpoints from before multi-process runs
        changed = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in layout.items() if saved.get(k) != v]
        if changed:
            what = "model settings" if any(k != "processes" for k in layout if saved.get(k) != layout[k]) else \
                "number of processes"
            raise RunDirError(f"cannot resume the ppo stage from {resume_from.name}: it was saved with another "
                              f"{what} ({'; '.join(changed)})",
                              "rerun with the settings (and --num-processes) of the interrupted run, or pass "
                              "--overwrite to start afresh")
    quiet_libraries()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars; our own bar shows progress
    plan = resolve_rewards(cfg, run, base)
    base_lm, tokenizer = load_base_causal(run, base, cfg.trust_remote_code)
    prompts, column, n_truncated = load_prompts(cfg, tokenizer)
    from rlchat.stages.evaluate import stop_token_ids

    stop_ids = stop_token_ids(base_lm, tokenizer)
    policy_lora = models.lora_config(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
    _check_lora_targets(base_lm, policy_lora)

    # ---- 2. build the models (one shared base, or four separate models)
    import torch
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from transformers import set_seed

    from rlchat import ppo_math as pm
    from rlchat import rewards
    from rlchat.rollout import build_separate, build_shared, generation_config, score_rollout

    # policy and value train in separate passes, so under DDP each backward leaves the other role's weights unused
    # cpu=True without a GPU: otherwise accelerate treats a multi-process CPU launch as N single processes
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    set_seed(cfg.seed)  # LoRA A matrices and a fresh value head are random (the same on every process)
    try:
        if cfg.separate_models or cfg.full:
            model = build_separate(base_lm, policy_lora, plan.shared_lora, cfg.temperature, full=cfg.full)
        else:
            model = build_shared(base_lm, policy_lora, plan.shared_lora, cfg.temperature,
                                 shared_critic=value_model == "policy")
    except ValueError as err:
        raise ModelError(f"the reward adapter does not fit the policy's base model: {err}",
                         "retrain the reward model on this base (`rlchat train-reward --overwrite`), or pass "
                         "--reward-model") from None
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing(model.causal_lms())
    model.to(accelerator.device)
    if plan.text_model is not None:
        plan.text_model.model.to(accelerator.device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable, n_total = sum(p.numel() for p in trainable), sum(p.numel() for p in model.parameters())

    world = accelerator.num_processes
    if accelerator.distributed_type.name in ("DEEPSPEED", "FSDP"):
        raise ConfigError(f"ppo runs data parallel (DDP) only, not under {accelerator.distributed_type.name}",
                          "launch ppo with --num-processes N (or an accelerate config with distributed_type "
                          "MULTI_GPU); LoRA keeps each process's copy of the model small")
    if accelerator.process_index > 0:  # each process samples its own responses
        torch.manual_seed(cfg.seed + 1_000_003 * accelerator.process_index)
    reduce = dist.all_sum if world > 1 else None  # batch statistics over every process's rollouts
    B = cfg.batch_size  # rollouts per process per step
    total_steps = cfg.max_steps if cfg.max_steps and cfg.max_steps > 0 else cfg.episodes // (B * world)
    total_steps = max(1, total_steps)
    updates_per_step = cfg.ppo_epochs * cfg.mini_batches
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, eps=1e-5)  # eps 1e-5: N+ details #5 (Adam epsilon)
    total_updates = total_steps * updates_per_step
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: max(0.0, 1.0 - u / total_updates))
    # the scheduler is stepped by hand (not prepared): accelerate would step it once per process
    model, optimizer = accelerator.prepare(model, optimizer)
    core = accelerator.unwrap_model(model)
    kl_ctl = (pm.AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon) if cfg.target_kl
              else pm.FixedKLController(cfg.kl_coef))
    sampler = PromptSampler(len(prompts), cfg.seed)
    gen_cfg = generation_config(cfg.response_length, cfg.temperature, cfg.top_p, stop_ids, tokenizer.pad_token_id)
    base_name = cfg.model or "sft"

    # ---- 3. begin the stage (the first write)
    inputs = {"dataset": input_record(cfg.dataset), "base": {"name": base.name, "hash": base.hash}, **plan.inputs}
    if cfg.model:
        inputs["model"] = input_record(cfg.model, hash=False)  # the base's content hash is in inputs.base
    parent = plan.parent or (None if cfg.model else "sft")
    stage_dir = run.begin_stage(STAGE, config=to_dict(cfg), inputs=inputs, parent=parent, overwrite=cfg.overwrite)
    main = accelerator.is_main_process  # the only process that writes
    with stage_lifecycle(run, STAGE):
        if main:
            atomic_write_text(stage_dir / "config.yaml", to_yaml(cfg))
            remove_leftovers(stage_dir)  # tmp files and dirs (checkpoints/.step-N.tmp-*) of a killed run
        metrics_path, samples_path = stage_dir / "metrics.jsonl", stage_dir / "samples.jsonl"
        ckpt_dir = run.checkpoints_dir(STAGE)
        step, episodes, history = 0, 0, {"scores": [], "kl": []}
        if mode == "resume" and resume_from is None and main:  # restarting from step 0: redo the killed run's rows
            truncate_jsonl(metrics_path, 0)
            truncate_jsonl(samples_path, 0)
        if resume_from is not None:
            if main:
                remove_partial_checkpoints(ckpt_dir)
            try:
                state = load_checkpoint(resume_from, core, optimizer, scheduler, accelerator.process_index)
                step, episodes, history = state["step"], state["episodes"], state["history"]
                kl_ctl.load_state_dict(state["kl_controller"])
                sampler.load_state_dict(state["sampler"])
            except (OSError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError) as err:
                if is_oom(err):
                    raise
                detail = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
                raise RunDirError(f"cannot resume from {resume_from}: {type(err).__name__}: {detail}",
                                  f"delete {resume_from} to resume from the checkpoint before it, or rerun with "
                                  "--overwrite") from None
            if main:
                truncate_jsonl(metrics_path, step)
                truncate_jsonl(samples_path, step)
            console.print(f"[yellow]ppo: resuming from {resume_from.name} ({episodes} episodes done)[/]",
                          highlight=False)
        held = "separate models" if cfg.separate_models or cfg.full else (
            "shared base, value head on the policy" if value_model == "policy" else "shared base")
        truncated = f", {n_truncated} truncated to {cfg.max_prompt_length} tokens" if n_truncated else ""
        console.print(f"[bold]ppo[/] {len(prompts)} prompts ('{column}' column{truncated}); scored by "
                      f"{', '.join(plan.describe)}; {held}, {n_trainable / 1e6:.2f}M of {n_total / 1e6:.1f}M "
                      "parameters trainable", highlight=False)
        trackers = Trackers(cfg.report_to, stage_dir, to_dict(cfg)) if accelerator.is_main_process else None

        from rlchat.progress import stage_progress

        progress = stage_progress() if accelerator.is_main_process else None
        task = None
        if progress is not None:
            progress.start()
            task = progress.add_task("ppo", total=total_steps, completed=step, info="")
        try:
            while step < total_steps:
                step += 1
                t0 = time.perf_counter()
                # 1. take a batch of prompts (each process its own share of the global batch)
                rows = sampler.next(B * world)[accelerator.process_index::world]
                batch = [prompts[i] for i in rows]
                prompt_ids, prompt_mask = _left_pad([p.ids for p in batch], tokenizer.pad_token_id,
                                                    accelerator.device)  # (B, P)

                # 2. sample responses from the policy
                response_ids = core.generate(prompt_ids, prompt_mask, gen_cfg)  # (B, R)
                t1 = time.perf_counter()

                # 3. one forward pass: logprobs, ref_logprobs, values (B, R), reward-adapter score (B,)
                ro = score_rollout(core, prompt_ids, prompt_mask, response_ids, stop_ids, tokenizer.pad_token_id)
                ro.prompts = [p.text for p in batch]
                ro.completions = _decode(tokenizer, ro.response_ids, ro.response_mask, stop_ids)

                # 4. score the responses: reward sources combined, normalised, missing-EOS penalty
                model_scores = ro.model_scores
                if plan.text_model is not None:
                    model_scores = plan.text_model([p.messages for p in batch], ro.completions).to(prompt_ids.device)
                fn_scores = None
                if plan.fn is not None:
                    fn_scores = torch.tensor(rewards.call_reward_fn(plan.fn, plan.fn_spec, ro.prompts, ro.completions),
                                             dtype=torch.float32, device=prompt_ids.device)
                ro.scores, parts = rewards.combine_scores(model_scores, fn_scores, ro.has_eos,
                                                          cfg.reward_model_weight, cfg.reward_fn_weight,
                                                          plan.stats, cfg.missing_eos_penalty)  # (B,)
                if not _finite(ro.scores):
                    bad = [n for n, v in parts.items() if not _finite(v)] or ["score"]
                    raise RlchatError(f"PPO step {step}: the {'/'.join(bad)} score of a response is NaN or "
                                      f"infinite", _nan_fix(ckpt_dir, "check the reward function / reward model"))
                t2 = time.perf_counter()

                # 5. per-token rewards: KL penalty on every token, score on the last one
                kl_coef = kl_ctl.value
                rewards_t, kl = pm.per_token_rewards(ro.scores, ro.logprobs, ro.ref_logprobs, ro.response_mask,
                                                     kl_coef)  # (B, R), (B, R)
                if cfg.whiten_rewards:
                    rewards_t = pm.masked_whiten(rewards_t, ro.response_mask, shift_mean=False, reduce=reduce)

                # 6. advantages and returns (GAE), advantages whitened over the global batch (all processes)
                advantages, returns = pm.gae(rewards_t, ro.values, ro.response_mask, cfg.gamma, cfg.lam)  # (B, R)
                advantages = pm.masked_whiten(advantages, ro.response_mask, reduce=reduce)

                # 7. PPO epochs: shuffled minibatches, each an optimizer step over grad_accum micro-batches
                stats = _ppo_update(cfg, model, optimizer, scheduler, accelerator, trainable, ro, advantages,
                                    returns, step, ckpt_dir, reduce)
                t3 = time.perf_counter()

                # 8. KL controller, logging, samples, checkpoint
                seq_kl = pm.masked_sum(kl, ro.response_mask, dim=1)  # (B,) KL per response
                mean_kl = accelerator.reduce(seq_kl.mean(), "mean").item()
                kl_ctl.update(mean_kl, B * world)
                episodes += B * world
                mean_score = accelerator.reduce(ro.scores.mean(), "mean").item()
                history["scores"].append(mean_score)
                history["kl"].append(mean_kl)
                row = {
                    "step": step, "episodes": episodes,
                    "objective/scores": mean_score,
                    **{f"objective/scores_{k}": accelerator.reduce(v.float().mean(), "mean").item()
                       for k, v in parts.items()},
                    "objective/rewards": accelerator.reduce(rewards_t.sum(1).mean(), "mean").item(),
                    "objective/kl": mean_kl,
                    "objective/entropy": accelerator.reduce(pm.masked_mean(ro.entropy, ro.response_mask),
                                                            "mean").item(),
                    **{k: accelerator.reduce(torch.tensor(v, device=prompt_ids.device), "mean").item()
                       for k, v in stats.items()},
                    "value/explained_variance": pm.explained_variance(ro.values, returns, ro.response_mask,
                                                                      reduce=reduce).item(),
                    "response/length": accelerator.reduce(ro.lengths.float().mean(), "mean").item(),
                    "response/eos_rate": accelerator.reduce(ro.has_eos.float().mean(), "mean").item(),
                    "lr": scheduler.get_last_lr()[0],
                    "kl_coef": kl_coef,
                    "shape/prompt_width": prompt_ids.shape[1],
                    "shape/response_width": ro.response_ids.shape[1],
                    "time/generation_s": round(t1 - t0, 4),
                    "time/scoring_s": round(t2 - t1, 4),
                    "time/training_s": round(t3 - t2, 4),
                    "episodes_per_s": round(B * world / (time.perf_counter() - t0), 4),
                }
                checkpoint_now = step % cfg.save_every == 0 and step < total_steps
                rngs = dist.gather_objects(rng_state()) if checkpoint_now else None  # every process's RNG
                if main:
                    from rlchat.rundir import append_jsonl

                    if step % cfg.logging_steps == 0 or step == total_steps:
                        append_jsonl(metrics_path, row)
                        trackers.log(row, step)
                    if step % cfg.sample_every == 0 or step in (1, total_steps):
                        for i in range(min(N_SAMPLES, len(batch))):
                            append_jsonl(samples_path, {
                                "step": step, "prompt": ro.prompts[i], "completion": ro.completions[i],
                                "score": round(ro.scores[i].item(), 4), "kl": round(seq_kl[i].item(), 4),
                                "length": int(ro.lengths[i]), "has_eos": bool(ro.has_eos[i])})
                    if checkpoint_now:
                        save_checkpoint(ckpt_dir, step, core, optimizer, scheduler, {
                            "step": step, "episodes": episodes, "history": history,
                            "kl_controller": kl_ctl.state_dict(), "sampler": sampler.state_dict(),
                            "layout": layout}, base_name, rngs)
                    if progress is not None:
                        progress.update(task, completed=step,
                                        info=f"score {mean_score:.3f}  kl {mean_kl:.3f}  "
                                             f"{row['episodes_per_s']:.1f} ep/s")
                accelerator.wait_for_everyone()
        finally:
            if progress is not None:
                progress.stop()
            if trackers is not None:
                trackers.close()

        # ---- 4. final outputs, atomically
        outputs = {"kind": "full" if cfg.full else "lora", "policy": "ppo/policy", "value": "ppo/value",
                   "tokenizer": "ppo/tokenizer", "base": base.name, "base_hash": base.hash,
                   "metrics": "ppo/metrics.jsonl", "samples": "ppo/samples.jsonl"}
        if main:
            with atomic_dir(stage_dir / "policy") as tmp:
                save_policy(core, tmp, base_name)
            with atomic_dir(stage_dir / "value") as tmp:
                save_value(core, tmp, base_name)
            with atomic_dir(stage_dir / "tokenizer") as tmp:
                tokenizer.save_pretrained(str(tmp))
        k = max(1, min(5, len(history["scores"]) // 5))
        wall = time.time() - t_start
        metrics = {
            "score": _mean(history["scores"][-k:]),
            "score_start": _mean(history["scores"][:k]),
            "score_end": _mean(history["scores"][-k:]),
            "kl": _mean(history["kl"][-k:]),
            "steps": step,
            "episodes": episodes,
            "score_window_steps": k,
            "trainable_params": n_trainable,
            "total_params": n_total,
            "shared_base": not (cfg.separate_models or cfg.full),
            "value_model": value_model,
            "processes": world,
            "resumed_from": resume_from.name if resume_from else None,
            "wall_s": round(wall, 1),
        }
        run.finish_stage(STAGE, metrics=metrics, outputs=outputs)

    what = "policy model" if cfg.full else "policy adapter"
    metrics["summary"] = (
        f"score {metrics['score_start']:.3f} -> {metrics['score_end']:.3f} (mean of the first/last {k} steps), "
        f"KL {metrics['kl']:.3f}, {episodes} episodes in {wall:.0f}s; {what} at {stage_dir / 'policy'}")
    return metrics


def _ppo_update(cfg, model, optimizer, scheduler, accelerator, trainable, ro, advantages, returns, step,
                ckpt_dir, reduce=None) -> dict:
    """ppo_epochs passes over the rollout in mini_batches minibatches of grad_accum micro-batches.

    Each loss is a token-level mean over the whole minibatch: every micro-batch's masked sum is divided by the
    minibatch's token count, over all processes when `reduce` sums across them (DDP then averages the processes'
    gradients, so the count is divided by the number of processes). Two processes holding halves of a batch take
    the same optimizer step as one process holding all of it.

    Returns the step's averaged statistics (loss/policy, loss/value, policy/clipfrac, policy/approx_kl,
    value/clipfrac)."""
    import torch

    from rlchat import ppo_math as pm
    from rlchat.rollout import POLICY, POLICY_AND_VALUE, VALUE

    core_of = accelerator.unwrap_model
    B = len(ro)
    mini = B // cfg.mini_batches
    micro = mini // cfg.grad_accum
    sums = {"loss/policy": 0.0, "loss/value": 0.0, "policy/clipfrac": 0.0, "policy/approx_kl": 0.0,
            "value/clipfrac": 0.0}
    n, n_updates = 0, 0  # micro-batches (for the per-micro-batch fractions), optimizer steps (for the losses)
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(B)
        for m in range(cfg.mini_batches):
            mb = order[m * mini:(m + 1) * mini]
            n_tokens = ro.response_mask[mb.to(ro.response_mask.device)].sum().float()
            world = 1
            if reduce is not None:
                n_tokens, world = reduce(n_tokens), accelerator.num_processes
            denom = (n_tokens / world).clamp(min=1.0 / world)
            for a in range(cfg.grad_accum):
                idx = mb[a * micro:(a + 1) * micro].to(ro.prompt_ids.device)
                cols = _trim(ro, idx)
                p_ids, p_mask, r_ids, r_mask = cols
                input_ids = torch.cat([p_ids, r_ids], dim=1)  # (b, T')
                attention_mask = torch.cat([p_mask, r_mask], dim=1)  # (b, T')
                R = r_ids.shape[1]
                if core_of(model).shared_critic:
                    # one pass: the value head reads the policy's hidden states
                    new_logprobs, new_values = model(input_ids, attention_mask, r_ids, POLICY_AND_VALUE)
                    pl, clipfrac, approx_kl = pm.policy_loss(new_logprobs, ro.logprobs[idx, :R],
                                                             advantages[idx, :R], r_mask, cfg.cliprange, denom)
                    vl, vclipfrac = pm.value_loss(new_values, ro.values[idx, :R], returns[idx, :R], r_mask,
                                                  cfg.cliprange_value, denom)
                    _check_loss(pl, "policy", step, ckpt_dir)
                    _check_loss(vl, "value", step, ckpt_dir)
                    accelerator.backward(pl + cfg.vf_coef * vl)
                else:
                    # policy, then value: one role's activations at a time (their parameters are disjoint, so
                    # two backward passes give the gradient of policy_loss + vf_coef * value_loss)
                    new_logprobs = model(input_ids, attention_mask, r_ids, POLICY)  # (b, R')
                    pl, clipfrac, approx_kl = pm.policy_loss(new_logprobs, ro.logprobs[idx, :R],
                                                             advantages[idx, :R], r_mask, cfg.cliprange, denom)
                    _check_loss(pl, "policy", step, ckpt_dir)
                    accelerator.backward(pl)
                    del new_logprobs
                    new_values = model(input_ids, attention_mask, r_ids, VALUE)  # (b, R')
                    vl, vclipfrac = pm.value_loss(new_values, ro.values[idx, :R], returns[idx, :R], r_mask,
                                                  cfg.cliprange_value, denom)
                    _check_loss(vl, "value", step, ckpt_dir)
                    accelerator.backward(cfg.vf_coef * vl)
                    del new_values
                sums["loss/policy"] += pl.item()  # micro-batch parts of the minibatch's token mean: they add up
                sums["loss/value"] += vl.item()
                sums["policy/clipfrac"] += clipfrac.item()
                sums["policy/approx_kl"] += approx_kl.item()
                sums["value/clipfrac"] += vclipfrac.item()
                n += 1
            accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            n_updates += 1
    return {k: v / max(n_updates if k.startswith("loss/") else n, 1) for k, v in sums.items()}


def _check_loss(loss, which: str, step: int, ckpt_dir: Path) -> None:
    import torch

    if not torch.isfinite(loss):
        raise RlchatError(f"PPO step {step}: the {which} loss is NaN or infinite ({loss.item()})",
                          _nan_fix(ckpt_dir, "lower --lr, or check the rewards for extreme values"))


def _trim(ro, idx):
    """The rows `idx` of prompt/response ids and masks, without columns that are padding in every one of them
    (left padding of the prompts, tail of the responses): less compute, same result (positions count real
    tokens only, and the tail comes after every real token)."""
    p_mask = ro.prompt_mask[idx]  # (b, P)
    r_mask = ro.response_mask[idx]  # (b, R)
    first = int(p_mask.any(dim=0).long().argmax())  # first prompt column with a real token in some row
    R = max(1, int(r_mask.sum(dim=1).max()))
    return ro.prompt_ids[idx, first:], p_mask[:, first:], ro.response_ids[idx, :R], r_mask[:, :R]


def _left_pad(seqs: list[list[int]], pad_id: int, device):
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = True
    return ids.to(device), mask.to(device)  # (B, P), (B, P)


def _decode(tokenizer, response_ids, response_mask, stop_ids) -> list[str]:
    """Decoded responses: real tokens, the final stop token and other special tokens dropped."""
    out = []
    for ids, mask in zip(response_ids.tolist(), response_mask.tolist()):
        toks = [t for t, m in zip(ids, mask) if m]
        if toks and toks[-1] in stop_ids:
            toks = toks[:-1]
        out.append(tokenizer.decode(toks, skip_special_tokens=True))
    return out


def _nan_fix(ckpt_dir: Path, hint: str) -> str:
    last = last_checkpoint(ckpt_dir)
    where = (f"the last good checkpoint {last.name} is intact: rerun the same command to resume from it"
             if last is not None else "no checkpoint was saved yet (lower --save-every to keep one)")
    return f"{hint}; {where}"


def _check_lora_targets(base_lm, lora) -> None:
    """The LM head must not carry a LoRA: the shared model applies it to one role's rows at a time."""
    targets = lora.target_modules
    names = [targets] if isinstance(targets, str) else list(targets or [])
    head = base_lm.get_output_embeddings()
    head_name = next((n for n, m in base_lm.named_modules() if m is head), "lm_head")
    if head_name in names or head_name.split(".")[-1] in names:
        raise ConfigError(f"lora_target_modules includes the LM head '{head_name}', which PPO keeps frozen",
                          "leave it out (all-linear already does)")

