"""Held-out tracking during PPO (`--eval-every N`): every N steps (and at the last one) the current policy answers
held-out prompts, sampled as in training (the PPO temperature and top_p), and is scored; the best policy so far is
kept as RUN/ppo/best/.

    heldout = resolve_heldout(cfg, prompts, tokenizer)   # step 1 (validate): (train prompts, HeldOut | None)
    row.update(evaluate_heldout(cfg, setup, heldout))    # heldout/* metrics of the current policy
    if heldout.improved(row): save_best(...)             # RUN/ppo/best/ (a policy adapter like RUN/ppo/policy)

Metrics (means over the held-out prompts, one sample each):
    heldout/score    the training score (reward sources combined, normalised, missing-EOS penalty): the proxy
    heldout/judge    the --judge score (the gold measure when the judge is independent of the reward model);
                     heldout/judge_se its standard error over the prompts
    heldout/kl       KL to the reference on these samples: sum_t log pi_T - log pi_ref,T (k1), nats per response
    heldout/length   response tokens, EOS included;  heldout/eos_rate  fraction ending with EOS
The held-out prompts are a seeded split of --dataset (eval_fraction, at most eval_prompts; never trained on) or
--eval-dataset. Sampling runs under torch.random.fork_rng with its own seed, so training draws the same random
numbers with or without held-out evaluation, and a resumed run the same as an uninterrupted one.
The best policy is chosen by heldout/judge when --judge is given, else by heldout/score; best/state.json says which
step and metric. The over-optimisation check (rlchat/ppo_health.py) reads these rows.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rlchat.errors import DataError


@dataclass
class HeldOut:
    prompts: list               # prompts.Prompt (encoded)
    source: str                 # where they came from (for the console and the manifest)
    judge: object = None        # the judge callable, or None
    best: float | None = None   # the best selection metric so far
    best_step: int | None = None

    @property
    def metric(self) -> str:
        return "heldout/judge" if self.judge is not None else "heldout/score"

    def improved(self, row: dict) -> bool:
        value = row.get(self.metric)
        if value is None or value != value:
            return False
        if self.best is None or value > self.best:
            self.best, self.best_step = value, row.get("step")
            return True
        return False

    def restore(self, rows: list[dict]) -> None:
        """The best so far from a resumed run's metrics rows (best/ on disk holds that policy)."""
        for r in rows:
            self.improved(r)


def resolve_heldout(cfg, prompts: list, tokenizer) -> tuple[list, HeldOut | None]:
    """(the prompts to train on, HeldOut or None). Reads only; DataError when too few prompts to hold out."""
    if not cfg.eval_every:
        return prompts, None
    judge = None
    if cfg.judge:
        from rlchat.rewards import DUMMY_COMPLETIONS, DUMMY_PROMPTS, call_judge, load_judge

        judge = load_judge(cfg.judge)
        call_judge(judge, cfg.judge, DUMMY_PROMPTS, DUMMY_COMPLETIONS, during="the check on two dummy prompts")
    if cfg.eval_dataset:
        from rlchat.prompts import load_prompts

        held, _, _ = load_prompts(cfg.eval_dataset, cfg.split, cfg.dataset_config, limit=cfg.eval_prompts,
                                  tokenizer=tokenizer, max_tokens=cfg.max_prompt_length)
        return prompts, HeldOut(held, cfg.eval_dataset, judge)
    import random

    n_held = min(cfg.eval_prompts, max(1, round(len(prompts) * cfg.eval_fraction)))
    if n_held >= len(prompts):
        raise DataError(f"the prompt dataset has {len(prompts)} prompts, too few to hold out eval_fraction "
                        f"{cfg.eval_fraction} for --eval-every", "add prompts, or pass --eval-dataset")
    order = list(range(len(prompts)))
    random.Random(cfg.seed).shuffle(order)
    held_ids = set(order[:n_held])
    train = [p for i, p in enumerate(prompts) if i not in held_ids]
    held = [prompts[i] for i in sorted(held_ids)]
    return train, HeldOut(held, f"{n_held} of {len(prompts)} prompts of {cfg.dataset} (eval_fraction "
                                f"{cfg.eval_fraction:g})", judge)


def evaluate_heldout(cfg, s, heldout: HeldOut, step: int) -> dict:
    """The heldout/* metrics of the current policy (each process scores its share; the means are global)."""
    import torch

    from rlchat import dist, rewards
    from rlchat import ppo_math as pm
    from rlchat.generation import decode_responses, left_pad, response_lists
    from rlchat.rollout import score_rollout

    rank, world = s.accelerator.process_index, s.world
    mine = heldout.prompts[rank::world]
    pad_id = s.tokenizer.pad_token_id
    device = s.accelerator.device
    sums = torch.zeros(7, dtype=torch.float64)  # score, judge, kl, length, eos, n, judge^2
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.seed * 7919 + step * 104729 + rank)
        for i in range(0, len(mine), cfg.batch_size):
            batch = mine[i:i + cfg.batch_size]
            prompt_ids, prompt_mask = left_pad([p.ids for p in batch], pad_id, device)  # (B, P)
            response_ids = s.core.generate(prompt_ids, prompt_mask, s.gen_cfg)           # (B, R)
            ro = score_rollout(s.core, prompt_ids, prompt_mask, response_ids, s.stop_ids, pad_id,
                               end_id=s.tokenizer.eos_token_id)  # as in training (ppo_step.py, step 3)
            texts = decode_responses(s.tokenizer, response_lists(ro.response_ids, ro.response_mask), s.stop_ids)
            plan = s.rewards
            model_scores = ro.model_scores
            if plan.text_model is not None:
                model_scores = plan.text_model([p.messages for p in batch], texts).to(device)
            fn_scores = None
            if plan.fn is not None:
                fn_scores = torch.tensor(rewards.call_reward_fn(plan.fn, plan.fn_spec, [p.text for p in batch],
                                                                texts), dtype=torch.float32, device=device)
            scores, _ = rewards.combine_scores(model_scores, fn_scores, ro.has_eos, cfg.reward_model_weight,
                                               cfg.reward_fn_weight, plan.stats, cfg.missing_eos_penalty)  # (B,)
            kl = pm.masked_sum(ro.logprobs - ro.ref_logprobs, ro.response_mask, dim=1)  # (B,) k1 per response
            if heldout.judge is not None:
                from rlchat.rewards import call_judge

                judged = call_judge(heldout.judge, cfg.judge, [p.text for p in batch], texts)
                sums[1] += sum(judged)
                sums[6] += sum(j * j for j in judged)
            sums[0] += scores.double().sum().cpu()
            sums[2] += kl.double().sum().cpu()
            sums[3] += ro.lengths.double().sum().cpu()
            sums[4] += ro.has_eos.double().sum().cpu()
            sums[5] += len(batch)
    if world > 1:
        sums = dist.all_sum(sums.to(device)).cpu()
    n = max(sums[5].item(), 1.0)
    out = {"heldout/score": sums[0].item() / n, "heldout/kl": sums[2].item() / n,
           "heldout/length": sums[3].item() / n, "heldout/eos_rate": sums[4].item() / n}
    if heldout.judge is not None:
        mean = sums[1].item() / n
        out["heldout/judge"] = mean
        # standard error of the mean judge score (the over-optimisation check compares drops with it)
        var = max(sums[6].item() / n - mean * mean, 0.0) * n / max(n - 1, 1)
        out["heldout/judge_se"] = (var / n) ** 0.5
    return out


def save_best(stage_dir: Path, core, base_name: str | None, row: dict, metric: str) -> None:
    """RUN/ppo/best/: the policy (as RUN/ppo/policy is written) and state.json (step, episodes, heldout/*)."""
    from rlchat.fileio import atomic_dir
    from rlchat.ppo_checkpoint import save_policy

    with atomic_dir(stage_dir / "best") as tmp:
        save_policy(core, tmp, base_name)
        state = {"step": row.get("step"), "episodes": row.get("episodes"), "chosen_by": metric,
                 **{k: v for k, v in row.items() if k.startswith("heldout/")}}
        (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
