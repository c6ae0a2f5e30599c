"""`rlchat ppo`: PPO with LoRA on one shared base model (InstructGPT-style RLHF, the N+ implementation details).

What `run(cfg)` does, in order:
  1. validate, before anything is written to the run directory: the config; the run directory (a finished stage
     needs --overwrite; a crashed one resumes); the starting policy (the run's SFT model with its adapter merged,
     or --model); the reward sources (the run's reward model, --reward-model, --reward-fn: the function is imported
     and called once on two dummy prompts); the prompts (a 'prompt', 'messages' or 'text' column).
  2. build the models (rlchat/actor_critic.py): ONE base model in memory; the policy is a LoRA adapter on it (peft starts
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

All the math lives in rlchat/ppo_math.py; this file is the stage's steps and the loop. Next to it:
rlchat/reward_sources.py (which sources score, step 1), rlchat/actor_critic.py (the models, step 2),
rlchat/ppo_step.py (steps 1-8 of a PPO step; the rollout forward pass is rlchat/rollout.py, the update
rlchat/ppo_update.py), rlchat/ppo_checkpoint.py (checkpoints; the resume checks are rlchat/stages/resume.py),
rlchat/ppo_outputs.py (held-out scores and best/, health reporting, step 4) and rlchat/progress.py (trackers).

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
    lr                          learning rate after this step (--lr-scheduler after --warmup-*; default linear
                                decay to 0 over the run)
    kl_coef                     KL coefficient used for this step's rewards
    shape/prompt_width          P: prompt tokens per row after left padding (the longest prompt of the batch)
    shape/response_width        R: generated tokens per row (the longest response; generation stops when all end)
    time/generation_s           seconds spent sampling responses this step
    time/scoring_s              seconds in the rollout forward pass and the reward sources
    time/training_s             seconds in the PPO epochs (forward, backward, optimizer)
    episodes_per_s              rollouts per second over the whole step
    heldout/score, heldout/judge, heldout/kl, heldout/length, heldout/eos_rate
                                with --eval-every N, on every N-th step and the last: the current policy on the
                                held-out prompts (rlchat/ppo_heldout.py); the best is kept as RUN/ppo/best/
Health checks (rlchat/ppo_health.py) read these rows as they are logged: a check that starts to hold (policy not
moving, KL runaway, entropy collapse, length hacking, value not learning, over-optimisation) is printed once with
its fix, and the final summary and the manifest's metrics.health list them.
samples.jsonl: every `sample_every` steps (and the first and last step), a few rows
    {"step", "prompt", "completion", "score", "kl", "length", "has_eos"}.

Checkpoints (rlchat/ppo_checkpoint.py): RUN/ppo/checkpoints/step-N/ every `save_every` steps, written atomically
(the last two are kept):
policy/ and value/ adapters, value_head.safetensors, optimizer.pt and scheduler.pt (loaded with
weights_only=True), rng.pt (torch RNG states), state.json (step, episodes, KL controller, prompt-sampler position,
python and numpy RNG states, per-step score history). Running the same command again after a crash or kill
resumes from the newest checkpoint and continues exactly as the uninterrupted run would have (same prompts, same
samples, on the same hardware).

`rlchat grpo` and `rlchat rloo` run this same stage (config.GroupConfig: stage_of(cfg) is "grpo" / "rloo") into
RUN/grpo/, RUN/rloo/: the models without a value role (no value adapter; rollout rows policy, reference, reward),
step 3's PPO step replaced by rlchat/group_step.py (num_generations responses per prompt, advantages from the group,
one policy pass per micro-batch), no value/ output. Everything else here (validation, reward sources, checkpoints,
exact resume, multi-process rules, metrics, held-out tracking, health checks) is the same code.

Left out on purpose: sequence packing, vLLM-style fast generation, reward-model ensembles, an entropy bonus.

    rlchat ppo --run-dir runs/demo --dataset .demo/data/prompts.jsonl --episodes 512
"""
from __future__ import annotations

import os
import pickle
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rlchat.errors import ConfigError, ModelError, RlchatError, RunDirError
from rlchat.models import with_load_settings
from rlchat.ppo_outputs import (adapter_base, check_health, finish, health_monitor, heldout_row, heldout_start,
                                param_counts)
from rlchat.ppo_step import LoopState, PPOSetup, StepOutput

STAGE = "ppo"
N_SAMPLES = 4  # responses written to samples.jsonl per sampled step


# ------------------------------------------------------------------------------------------ what step 1 found


@dataclass
class Inputs:
    """Step 1's findings: everything checked and loaded, nothing written yet."""

    run: object                 # rundir.RunDir
    mode: str                   # "new" | "resume" (RunDir.check_can_start)
    base: object                # the base the policy is a LoRA on (name, hash)
    rewards: object             # reward_sources.RewardPlan
    base_lm: object             # the base causal LM (the SFT model with its adapter merged, or --model)
    tokenizer: object
    prompts: list               # [prompts.Prompt]: messages, text, ids
    column: str                 # the dataset's prompt column
    n_truncated: int            # prompts cut to max_prompt_length
    stop_ids: list[int]         # token ids that end a response
    policy_lora: object         # peft.LoraConfig of the policy (and value) adapter
    layout: dict                # the settings a checkpoint must have been saved with to be resumed
    resume_from: Path | None    # the newest complete checkpoint, when resuming
    heldout: object = None      # ppo_heldout.HeldOut with --eval-every (its prompts are not trained on), else None
    stage: str = STAGE          # "ppo", or "grpo" / "rloo" (GroupConfig): the stage directory and manifest entry


# ------------------------------------------------------------------------------------------------------- run


@with_load_settings  # every model it loads: cfg.dtype, cfg.attn_implementation
def run(cfg) -> dict:
    """Train the PPO policy of `cfg.run_dir`; returns the final metrics (and a one-line "summary").

    Out-of-memory errors anywhere (building the models too, before the stage begins) are one line."""
    from rlchat.stages.common import oom_guard

    with oom_guard(stage_of(cfg)):
        return _run(cfg)


def stage_of(cfg) -> str:
    """The stage this config runs: "ppo", or "grpo" / "rloo" (config.GroupConfig: the same loop, critic-free)."""
    return getattr(cfg, "stage", STAGE)


def _run(cfg) -> dict:
    """The steps of the module docstring. `cfg` was checked by config.resolve (PPOConfig.validate)."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from rlchat.ppo_step import step_metrics
    from rlchat.stages.common import stage_lifecycle

    t_start = time.time()
    inp = _validate(cfg)  # 1. validate everything before the first write
    s = _build(cfg, inp)  # 2. build the models
    stage_dir = _begin(cfg, inp)  # the first write
    with stage_lifecycle(inp.run, inp.stage):
        loop = _start(cfg, inp, s, stage_dir)  # config.yaml, a killed run's leftovers, the checkpoint to resume
        health = health_monitor(cfg, stage_dir)  # rlchat/ppo_health.py, fed the rows a resumed run logged
        if inp.heldout is not None:
            inp.heldout.restore(health.rows)  # the best held-out score of a resumed run's steps
            if loop.step == 0 and not any(r.get("step") == 0 for r in health.rows):
                heldout_start(cfg, inp, s, loop, health)  # step 0: the starting policy, KL 0 (the curve's origin)
        with _reporting(cfg, s, loop) as report:
            while loop.step < s.total_steps:  # 3. the PPO loop
                loop.step += 1
                out = _ppo_step(cfg, s, loop)  # steps 1-7: prompts, sample, score, rewards, GAE (or groups), update
                row = step_metrics(s, loop, out)  # step 8: KL controller, the metrics row
                heldout_row(cfg, inp, s, loop, row)  # --eval-every: heldout/* into the row, RUN/ppo/best/
                _write_step(cfg, inp, s, loop, out, row, report)  # step 8: log, samples, checkpoint
                check_health(health, row, s.is_main)  # a check that starts to hold is printed once
        return finish(cfg, inp, s, loop, t_start, health)  # 4. final outputs, the summary


# ------------------------------------------------------------------------------------- 1. validate, 2. build


def _validate(cfg) -> Inputs:
    """Step 1: the run directory, the starting policy, the reward sources and the prompts; nothing written."""
    from rlchat import dist, models
    from rlchat.generation import stop_token_ids
    from rlchat.one_turn import mismatch_warning
    from rlchat.ppo_checkpoint import last_checkpoint
    from rlchat.progress import check_report_to, console, quiet_libraries
    from rlchat.prompts import load_prompts
    from rlchat.reward_sources import resolve_rewards
    from rlchat.run_models import load_base_causal, resolve_base
    from rlchat.rundir import RunDir
    from rlchat.stages.resume import check_ppo_resumable, check_ppo_resume_settings

    if not cfg.dataset:
        raise ConfigError("ppo needs prompts", "pass --dataset (a .jsonl/.json/.parquet/.csv file, a save_to_disk "
                          "directory or a Hub id with a 'prompt', 'messages' or 'text' column)")
    if cfg.full and not cfg.separate_models:
        console.print("[yellow]ppo --full trains whole models: using separate policy, reference, value and reward "
                      "models[/]", highlight=False)
    check_report_to(cfg.report_to)
    run, stage = RunDir(cfg.run_dir), stage_of(cfg)
    mode = run.check_can_start(stage, cfg.overwrite)
    if not cfg.model:
        run.require_done("sft", "train the SFT model first (`rlchat sft --run-dir RUN ...`), or pass --model to "
                                "start PPO from any causal LM")
    base = resolve_base(run, cfg.model)
    layout = {"separate_models": bool(cfg.separate_models), "full": bool(cfg.full), "value_model": cfg.value_model,
              "lora_r": cfg.lora_r, "lora_target_modules": cfg.lora_target_modules,
              "processes": dist.world_size()}  # a resume must use as many processes (batches are per process)
    if stage != STAGE:  # grpo/rloo: no value model; groups of num_generations responses
        layout.update(algo=stage, num_generations=cfg.num_generations)
    resume_from = last_checkpoint(run.checkpoints_dir(stage)) if mode == "resume" else None
    if resume_from is not None:
        check_ppo_resumable(run, base, resume_from, layout, stage)
        check_ppo_resume_settings(run, cfg, resume_from, stage)
    quiet_libraries()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars; our own bar shows progress
    plan = resolve_rewards(cfg, run, base)
    mismatch = mismatch_warning(run, STAGE, sft=base.name == "sft", reward=plan.parent == "reward")
    if mismatch:  # a policy or reward model trained on raw text (rlchat/one_turn.py)
        console.print(f"[yellow]{mismatch}[/]", highlight=False)
    base_lm, tokenizer = load_base_causal(run, base, cfg.trust_remote_code)
    prompts, column, n_truncated = load_prompts(cfg.dataset, cfg.split, cfg.dataset_config, tokenizer=tokenizer,
                                                max_tokens=cfg.max_prompt_length)
    from rlchat.ppo_heldout import resolve_heldout

    prompts, heldout = resolve_heldout(cfg, prompts, tokenizer)  # --eval-every: held-out prompts, the judge
    stop_ids = stop_token_ids(base_lm, tokenizer)
    policy_lora = models.lora_config(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
    _check_lora_targets(base_lm, policy_lora)
    from rlchat import checks

    if not cfg.full:
        checks.check_lora_targets(base_lm, cfg.lora_target_modules)
    longest = max(len(p.ids) for p in prompts)
    positions = checks.max_positions(base_lm)
    checks.check_fits(base_lm, longest + cfg.response_length,
                      f"the longest prompt ({longest} tokens) plus response_length ({cfg.response_length})",
                      f"lower --response-length or --max-prompt-length so that they add up to at most {positions}")
    return Inputs(run, mode, base, plan, base_lm, tokenizer, prompts, column, n_truncated, stop_ids, policy_lora,
                  layout, resume_from, heldout, stage)


def _check_lora_targets(base_lm, lora) -> None:
    """The LM head must not carry a LoRA: the shared model applies it to one role's rows at a time."""
    targets = lora.target_modules
    names = [targets] if isinstance(targets, str) else list(targets or [])
    head = base_lm.get_output_embeddings()
    head_name = next((n for n, m in base_lm.named_modules() if m is head), "lm_head")
    regex = targets if isinstance(targets, str) and targets != "all-linear" else None  # lora_config's "re:" form
    if head_name in names or head_name.split(".")[-1] in names or (regex and re.fullmatch(regex, head_name)):
        raise ConfigError(f"lora_target_modules includes the LM head '{head_name}', which PPO keeps frozen",
                          "leave it out (all-linear already does)")


def _build(cfg, inp: Inputs) -> PPOSetup:
    """Step 2: one shared base with adapters (or four separate models), optimizer, scheduler, KL controller."""
    import torch
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from transformers import set_seed

    from rlchat import dist
    from rlchat import ppo_math as pm
    from rlchat.generation import generation_config
    from rlchat.ppo_step import PromptSampler
    from rlchat.actor_critic import build_separate, build_shared

    # policy and value train in separate passes, so under DDP each backward leaves the other role's weights unused
    # cpu=True without a GPU: otherwise accelerate treats a multi-process CPU launch as N single processes
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    set_seed(cfg.seed)  # LoRA A matrices and a fresh value head are random (the same on every process)
    reward_lora = inp.rewards.shared_lora
    try:
        if cfg.separate_models or cfg.full:
            model = build_separate(inp.base_lm, inp.policy_lora, reward_lora, cfg.temperature, full=cfg.full)
        else:
            model = build_shared(inp.base_lm, inp.policy_lora, reward_lora, cfg.temperature,
                                 shared_critic=cfg.value_model == "policy", critic=inp.stage == STAGE)
    except ValueError as err:
        raise ModelError(f"the reward adapter does not fit the policy's base model: {err}",
                         "retrain the reward model on this base (`rlchat train-reward --overwrite`), or pass "
                         "--reward-model") from None
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing(model.causal_lms())
    model.to(accelerator.device)
    if inp.rewards.text_model is not None:
        inp.rewards.text_model.model.to(accelerator.device)
    trainable = [p for p in model.parameters() if p.requires_grad]

    world = accelerator.num_processes
    if accelerator.distributed_type.name in ("DEEPSPEED", "FSDP"):
        raise ConfigError(f"ppo runs data parallel (DDP) only, not under {accelerator.distributed_type.name}",
                          "launch ppo with --num-processes N (or an accelerate config with distributed_type "
                          "MULTI_GPU); LoRA keeps each process's copy of the model small")
    if accelerator.process_index > 0:  # each process samples its own responses
        torch.manual_seed(cfg.seed + 1_000_003 * accelerator.process_index)
    # batch_size rollouts per process per step
    total_steps = cfg.max_steps if cfg.max_steps and cfg.max_steps > 0 else cfg.episodes // (cfg.batch_size * world)
    total_steps = max(1, total_steps)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, eps=1e-5,  # eps 1e-5: N+ details #5 (Adam epsilon)
                                  weight_decay=cfg.weight_decay)
    scheduler = lr_schedule(optimizer, cfg, total_steps * cfg.ppo_epochs * cfg.mini_batches)
    # the scheduler is stepped by hand (not prepared): accelerate would step it once per process
    prepared, optimizer = accelerator.prepare(model, optimizer)
    kl_ctl = (pm.AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon) if cfg.target_kl
              else pm.FixedKLController(cfg.kl_coef))
    gen_cfg = generation_config(cfg.response_length, cfg.temperature, cfg.top_p, inp.stop_ids,
                                inp.tokenizer.pad_token_id)
    return PPOSetup(accelerator, prepared, accelerator.unwrap_model(prepared), optimizer, scheduler, trainable, world,
                    dist.all_sum if world > 1 else None, total_steps, kl_ctl, PromptSampler(len(inp.prompts), cfg.seed),
                    gen_cfg, inp.prompts, inp.tokenizer, inp.stop_ids, inp.rewards)


def lr_schedule(optimizer, cfg, total_updates: int):
    """transformers' scheduler `cfg.lr_scheduler` over `total_updates` optimizer steps, after a linear warmup of
    warmup_steps (or warmup_ratio of them). The default, linear with no warmup, is lr x (1 - u / total_updates)."""
    import math

    from transformers import get_scheduler

    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_updates)
    return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_updates)


# ------------------------------------------------------------------------------------ 3. the loop's frame


def _begin(cfg, inp: Inputs) -> Path:
    """The stage's first write: RUN/run.json says ppo is running (with its inputs and parent), RUN/ppo/ exists."""
    from rlchat.config import to_dict
    from rlchat.fileio import input_record

    inputs = {"dataset": input_record(cfg.dataset), "base": {"name": inp.base.name, "hash": inp.base.hash},
              **inp.rewards.inputs}
    if cfg.model:
        inputs["model"] = input_record(cfg.model, hash=False)  # the base's content hash is in inputs.base
    parent = inp.rewards.parent or (None if cfg.model else "sft")
    return inp.run.begin_stage(inp.stage, config=to_dict(cfg), inputs=inputs, parent=parent,
                               overwrite=cfg.overwrite)


def _start(cfg, inp: Inputs, s: PPOSetup, stage_dir: Path) -> LoopState:
    """config.yaml; what a killed run left removed; the newest checkpoint loaded when resuming."""
    from rlchat.config import to_yaml
    from rlchat.ppo_checkpoint import load_checkpoint, truncate_jsonl
    from rlchat.progress import console
    from rlchat.fileio import atomic_write_text
    from rlchat.stages.common import is_oom
    from rlchat.stages.resume import remove_leftovers

    loop = LoopState(stage_dir)
    metrics_path, samples_path = stage_dir / "metrics.jsonl", stage_dir / "samples.jsonl"
    if s.is_main:
        atomic_write_text(stage_dir / "config.yaml", to_yaml(cfg))
        remove_leftovers(stage_dir)  # tmp files and dirs (checkpoints/.step-N.tmp-*) of a killed run
    if inp.mode == "resume" and inp.resume_from is None and s.is_main:  # from step 0: redo the killed run's rows
        truncate_jsonl(metrics_path, 0)
        truncate_jsonl(samples_path, 0)
    resume_from = inp.resume_from
    if resume_from is not None:
        try:
            state = load_checkpoint(resume_from, s.core, s.optimizer, s.scheduler, s.accelerator.process_index)
            loop.step, loop.episodes, loop.history = state["step"], state["episodes"], state["history"]
            s.kl_ctl.load_state_dict(state["kl_controller"])
            s.sampler.load_state_dict(state["sampler"])
        except (OSError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError) as err:
            if is_oom(err):
                raise
            from rlchat.stages.common import refused_pickle_text

            detail = (refused_pickle_text(err) if isinstance(err, pickle.UnpicklingError) else
                      (str(err).strip().splitlines() or [type(err).__name__])[0][:200])
            raise RunDirError(f"cannot resume from {resume_from}: {type(err).__name__}: {detail}",
                              f"delete {resume_from} to resume from the checkpoint before it, or rerun with "
                              "--overwrite") from None
        if s.is_main:
            truncate_jsonl(metrics_path, loop.step)
            truncate_jsonl(samples_path, loop.step)
        console.print(f"[yellow]{inp.stage}: resuming from {resume_from.name} ({loop.episodes} episodes done)[/]",
                      highlight=False)
    held = "separate models" if cfg.separate_models or cfg.full else (
        "shared base, value head on the policy" if cfg.value_model == "policy" else "shared base")
    if inp.stage != STAGE:
        held = f"shared base, no value model, {cfg.num_generations} responses per prompt"
    truncated = f", {inp.n_truncated} truncated to {cfg.max_prompt_length} tokens" if inp.n_truncated else ""
    n_trainable, n_total = param_counts(s)
    console.print(f"[bold]{inp.stage}[/] {len(inp.prompts)} prompts ('{inp.column}' column{truncated}); scored by "
                  f"{', '.join(inp.rewards.describe)}; {held}, {n_trainable / 1e6:.2f}M of {n_total / 1e6:.1f}M "
                  "parameters trainable", highlight=False)
    return loop


@contextmanager
def _reporting(cfg, s: PPOSetup, loop: LoopState):
    """(trackers, progress bar, its task) of the main process (None elsewhere); closed however the loop ends."""
    from rlchat.config import to_dict
    from rlchat.progress import Trackers, stage_progress

    trackers = Trackers(cfg.report_to, loop.stage_dir, to_dict(cfg)) if s.is_main else None
    progress = stage_progress() if s.is_main else None
    task = None
    if progress is not None:
        progress.start()
        task = progress.add_task(stage_of(cfg), total=s.total_steps, completed=loop.step, info="")
    try:
        yield trackers, progress, task
    finally:
        if progress is not None:
            progress.stop()
        if trackers is not None:
            trackers.close()


# ---------------------------------------------------------------------------------------- 3. one PPO step


def _ppo_step(cfg, s: PPOSetup, loop: LoopState) -> StepOutput:
    """ppo_step, its NaN scores and losses as one-line errors that name the last good checkpoint."""
    from rlchat.group_step import group_step
    from rlchat.ppo_step import NonFiniteScore, ppo_step
    from rlchat.ppo_update import NonFiniteLoss

    name = stage_of(cfg).upper()
    try:
        return ppo_step(cfg, s) if name == "PPO" else group_step(cfg, s)
    except NonFiniteScore as err:
        raise RlchatError(f"{name} step {loop.step}: {err}",
                          _nan_fix(loop.ckpt_dir, "check the reward function / reward model")) from None
    except NonFiniteLoss as err:
        raise RlchatError(f"{name} step {loop.step}: {err}",
                          _nan_fix(loop.ckpt_dir, "lower --lr, or check the rewards for extreme values")) from None


def _write_step(cfg, inp: Inputs, s: PPOSetup, loop: LoopState, out: StepOutput, row: dict, report) -> None:
    """Step 8: the main process logs the row, writes samples and (every save_every steps) a checkpoint."""
    from rlchat import dist
    from rlchat.ppo_checkpoint import rng_state, save_checkpoint
    from rlchat.fileio import append_jsonl

    ro, step = out.ro, loop.step
    trackers, progress, task = report
    checkpoint_now = step % cfg.save_every == 0 and step < s.total_steps
    rngs = dist.gather_objects(rng_state()) if checkpoint_now else None  # every process's RNG
    if s.is_main:
        if step % cfg.logging_steps == 0 or step == s.total_steps or "heldout/score" in row:
            append_jsonl(loop.stage_dir / "metrics.jsonl", row)
            trackers.log(row, step)
        if step % cfg.sample_every == 0 or step in (1, s.total_steps):
            for i in range(min(N_SAMPLES, len(ro))):
                append_jsonl(loop.stage_dir / "samples.jsonl", {
                    "step": step, "prompt": ro.prompts[i], "completion": ro.completions[i],
                    "score": round(ro.scores[i].item(), 4), "kl": round(out.seq_kl[i].item(), 4),
                    "length": int(ro.lengths[i]), "has_eos": bool(ro.has_eos[i])})
        if checkpoint_now:
            save_checkpoint(loop.ckpt_dir, step, s.core, s.optimizer, s.scheduler, {
                "step": step, "episodes": loop.episodes, "history": loop.history,
                "kl_controller": s.kl_ctl.state_dict(), "sampler": s.sampler.state_dict(),
                "layout": inp.layout}, adapter_base(cfg, inp), rngs)
        if progress is not None:
            progress.update(task, completed=step, info=f"score {row['objective/scores']:.3f}  kl "
                                                       f"{row['objective/kl']:.3f}  {row['episodes_per_s']:.1f} ep/s")
    s.accelerator.wait_for_everyone()  # the others wait for the checkpoint


# --------------------------------------------------------------------------------------------------- helpers


def _nan_fix(ckpt_dir: Path, hint: str) -> str:
    from rlchat.ppo_checkpoint import last_checkpoint

    last = last_checkpoint(ckpt_dir)
    where = (f"the last good checkpoint {last.name} is intact: rerun the same command to resume from it"
             if last is not None else "no checkpoint was saved yet (lower --save-every to keep one)")
    return f"{hint}; {where}"
