"""One PPO step, steps 1-8 of the loop in rlchat/stages/ppo.py's docstring (the stage writes what it returns).

    setup = PPOSetup(...)                       # the models, optimizer, prompts, reward sources (stage step 2)
    loop = LoopState(stage_dir)                 # step, episodes, score/KL history: what checkpoints save
    out = ppo_step(cfg, setup)                  # 1-7: prompts, sample, score, rewards, GAE, the update
    row = step_metrics(setup, loop, out)        # 8: KL controller, counts, the metrics.jsonl row

A NaN or infinite score raises `NonFiniteScore`, a NaN loss `ppo_update.NonFiniteLoss`; the stage turns both into a
one-line error that names the last good checkpoint. All the math is rlchat/ppo_math.py's; the update is
rlchat/ppo_update.py.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path


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


@dataclass
class PPOSetup:
    """What every PPO step runs with (built once, before the loop)."""

    accelerator: object
    model: object               # the prepared (DDP-wrapped when multi-process) actor_critic.ActorCritic
    core: object                # the same model unwrapped
    optimizer: object
    scheduler: object           # stepped by hand, once per optimizer step
    trainable: list             # the parameters the optimizer steps
    world: int                  # processes
    reduce: object              # dist.all_sum with several processes, else None (batch statistics)
    total_steps: int
    kl_ctl: object              # ppo_math.AdaptiveKLController | FixedKLController
    sampler: PromptSampler
    gen_cfg: object             # transformers.GenerationConfig of the rollouts
    prompts: list               # generation.Prompt: ids, text, messages
    tokenizer: object
    stop_ids: list[int]         # token ids that end a response
    rewards: object             # reward_sources.RewardPlan

    @property
    def is_main(self) -> bool:  # the only process that writes
        return self.accelerator.is_main_process


@dataclass
class LoopState:
    """Where the loop is: saved in every checkpoint, restored on resume."""

    stage_dir: Path
    step: int = 0
    episodes: int = 0
    history: dict = field(default_factory=lambda: {"scores": [], "kl": []})  # per-step mean score and KL

    @property
    def ckpt_dir(self) -> Path:
        return self.stage_dir / "checkpoints"


@dataclass
class StepOutput:
    """What steps 1-7 of one PPO step produced, for step 8 (metrics, samples, checkpoint)."""

    ro: object                  # rollout.Rollout, `scores` filled in
    parts: dict                 # the score of each source {"model": (B,), "fn": (B,)}
    rewards: object             # (B, R) per-token rewards; grpo/rloo: (B, 1) the reward of each response
    kl: object                  # (B, R) per-token KL to the reference
    returns: object             # (B, R) GAE returns; None for grpo/rloo (no value model)
    stats: dict                 # ppo_update's averaged losses and fractions
    kl_coef: float              # the KL coefficient of this step's rewards
    times: tuple                # perf_counter at the start, after sampling, after scoring, after training
    seq_kl: object = None       # (B,) KL per response (step 8)


class NonFiniteScore(ArithmeticError):
    """A response's score (from the named sources) is NaN or infinite."""

    def __init__(self, sources: list[str]):
        super().__init__(f"the {'/'.join(sources)} score of a response is NaN or infinite")
        self.sources = sources


def ppo_step(cfg, s: PPOSetup) -> StepOutput:
    """Steps 1-7: a batch of prompts, sampled responses, their scores, per-token rewards, GAE, the PPO update."""
    from rlchat import ppo_math as pm
    from rlchat.ppo_update import ppo_update

    t0 = time.perf_counter()
    ro, parts, t1 = rollout_and_score(cfg, s)  # steps 1-4
    t2 = time.perf_counter()

    kl_coef = s.kl_ctl.value
    rewards_t, kl, advantages, returns = advantages_and_returns(cfg, ro, kl_coef, s.reduce)  # steps 5-6

    # 7. PPO epochs: shuffled minibatches, each an optimizer step over grad_accum micro-batches
    stats = ppo_update(cfg, s.model, s.optimizer, s.scheduler, s.accelerator, s.trainable, ro, advantages, returns,
                       s.reduce)
    return StepOutput(ro, parts, rewards_t, kl, returns, stats, kl_coef, (t0, t1, t2, time.perf_counter()))


def advantages_and_returns(cfg, ro, kl_coef: float, reduce=None):
    """Steps 5-6 of a PPO step on a scored rollout: per-token rewards (B, R), per-token KL (B, R), whitened GAE
    advantages (B, R) and returns (B, R). `reduce` all-reduces the whitening statistics over processes."""
    from rlchat import ppo_math as pm

    # 5. per-token rewards: KL penalty on every token, score on the last one
    rewards_t, kl = pm.per_token_rewards(ro.scores, ro.logprobs, ro.ref_logprobs, ro.response_mask,
                                         kl_coef)  # (B, R), (B, R)
    if cfg.whiten_rewards:
        rewards_t = pm.masked_whiten(rewards_t, ro.response_mask, shift_mean=False, reduce=reduce)

    # 6. advantages and returns (GAE), advantages whitened over the global batch (all processes)
    advantages, returns = pm.gae(rewards_t, ro.values, ro.response_mask, cfg.gamma, cfg.lam)  # (B, R)
    advantages = pm.masked_whiten(advantages, ro.response_mask, reduce=reduce)
    return rewards_t, kl, advantages, returns


def rollout_and_score(cfg, s: PPOSetup, repeat: int = 1):
    """Steps 1-4: (the rollout with its final scores, the score of each source, perf_counter after sampling).

    repeat > 1 (grpo/rloo): batch_size / repeat prompts, each taken `repeat` times in consecutive rows (a group)."""
    import torch

    from rlchat import rewards
    from rlchat.generation import decode_responses, left_pad, response_lists
    from rlchat.rollout import score_rollout

    # 1. take a batch of prompts (each process its own share of the global batch)
    rows = s.sampler.next(cfg.batch_size // repeat * s.world)[s.accelerator.process_index::s.world]
    batch = [s.prompts[i] for i in rows for _ in range(repeat)]
    pad_id = s.tokenizer.pad_token_id
    prompt_ids, prompt_mask = left_pad([p.ids for p in batch], pad_id, s.accelerator.device)  # (B, P)

    # 2. sample responses from the policy
    response_ids = s.core.generate(prompt_ids, prompt_mask, s.gen_cfg)  # (B, R)
    t1 = time.perf_counter()

    # 3. one forward pass: logprobs, ref_logprobs, values (B, R), reward-adapter score (B,); a response cut at the
    # length limit is scored at an EOS appended after it, as the reward model was trained
    ro = score_rollout(s.core, prompt_ids, prompt_mask, response_ids, s.stop_ids, pad_id,
                       end_id=s.tokenizer.eos_token_id)
    ro.prompts = [p.text for p in batch]
    ro.completions = decode_responses(s.tokenizer, response_lists(ro.response_ids, ro.response_mask), s.stop_ids)

    # 4. score the responses: reward sources combined, normalised, missing-EOS penalty
    plan = s.rewards
    model_scores = ro.model_scores
    if plan.text_model is not None:
        model_scores = plan.text_model([p.messages for p in batch], ro.completions).to(prompt_ids.device)
    fn_scores = None
    if plan.fn is not None:
        fn_scores = torch.tensor(rewards.call_reward_fn(plan.fn, plan.fn_spec, ro.prompts, ro.completions),
                                 dtype=torch.float32, device=prompt_ids.device)
    ro.scores, parts = rewards.combine_scores(model_scores, fn_scores, ro.has_eos, cfg.reward_model_weight,
                                              cfg.reward_fn_weight, plan.stats, cfg.missing_eos_penalty)  # (B,)
    if not _finite(ro.scores):
        raise NonFiniteScore([n for n, v in parts.items() if not _finite(v)] or ["score"])
    return ro, parts, t1


def step_metrics(s: PPOSetup, loop: LoopState, out: StepOutput) -> dict:
    """Step 8: update the KL controller and the loop's counts; the metrics row (over all processes).

    Sets out.seq_kl, the (B,) KL of each response."""
    import torch

    from rlchat import ppo_math as pm

    ro, acc = out.ro, s.accelerator
    B = len(ro)
    out.seq_kl = pm.masked_sum(out.kl, ro.response_mask, dim=1)  # (B,) KL per response
    mean_kl = acc.reduce(out.seq_kl.mean(), "mean").item()
    s.kl_ctl.update(mean_kl, B * s.world)
    loop.episodes += B * s.world
    mean_score = acc.reduce(ro.scores.mean(), "mean").item()
    loop.history["scores"].append(mean_score)
    loop.history["kl"].append(mean_kl)
    t0, t1, t2, t3 = out.times
    return {
        "step": loop.step, "episodes": loop.episodes,
        "objective/scores": mean_score,
        **{f"objective/scores_{k}": acc.reduce(v.float().mean(), "mean").item() for k, v in out.parts.items()},
        "objective/rewards": acc.reduce(out.rewards.sum(1).mean(), "mean").item(),
        "objective/kl": mean_kl,
        "objective/entropy": acc.reduce(pm.masked_mean(ro.entropy, ro.response_mask), "mean").item(),
        **{k: acc.reduce(torch.tensor(v, device=ro.prompt_ids.device), "mean").item() for k, v in out.stats.items()},
        **({} if out.returns is None else {  # grpo/rloo have no value model
            "value/explained_variance": pm.explained_variance(ro.values, out.returns, ro.response_mask,
                                                              reduce=s.reduce).item()}),
        "response/length": acc.reduce(ro.lengths.float().mean(), "mean").item(),
        "response/eos_rate": acc.reduce(ro.has_eos.float().mean(), "mean").item(),
        "lr": s.scheduler.get_last_lr()[0],
        "kl_coef": out.kl_coef,
        "shape/prompt_width": ro.prompt_ids.shape[1],
        "shape/response_width": ro.response_ids.shape[1],
        "time/generation_s": round(t1 - t0, 4),
        "time/scoring_s": round(t2 - t1, 4),
        "time/training_s": round(t3 - t2, 4),
        "episodes_per_s": round(B * s.world / (time.perf_counter() - t0), 4),
    }


def _finite(x) -> bool:
    import torch

    return bool(torch.isfinite(x).all())
