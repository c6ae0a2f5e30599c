"""One process of a multi-process equivalence check (tests/test_multiprocess.py).

Run under accelerate (CPU: gloo), one copy per process:

    python -m accelerate.commands.launch --multi_gpu --num_machines 1 --mixed_precision no --dynamo_backend no \
        --num_processes 2 --main_process_port PORT tests/dist_worker.py MODE OUTDIR [options]

or plainly (`python tests/dist_worker.py MODE OUTDIR ...`, one process holding the whole batch: the reference).
Every process writes its results to OUTDIR/rank-R.pt (torch.save of a dict of tensors and floats).

MODE whiten
    Fixed global tensors x (8, 7) and y (8, 7) with a ragged mask; process r takes rows r::world and computes
    masked_whiten (shift_mean True and False), masked_var (unbiased and not) and explained_variance with
    reduce=rlchat.dist.all_sum; also masked_whiten of its rows with reduce=None (its own statistics: what a
    forgotten `reduce` gives). The test puts the rows back in order and compares them with one process's result.
MODE ppo_update --model DIR --grad-accum G [--lr LR]
    The shared-base ActorCritic on the tiny model (all trainable weights set from a seeded generator, the same on
    every process), a fixed rollout of 8 sequences (fixed prompts and response tokens, ragged lengths, two
    without EOS, no sampling) scored with `score_rollout`; process r holds rows r::world, padded on its own as
    the PPO stage pads its share (so prompt and response widths differ from the whole batch's). Fixed scores ->
    per-token rewards -> GAE -> advantages whitened with reduce; then one `ppo_update` (ppo_epochs 1,
    mini_batches 1, grad_accum G) with an accelerate.Accelerator prepared the way the stage prepares it (but on a
    process group set up with cpu=True on machines without GPUs: see main()). Saved: the step's stats, the trainable parameters after the step, and the optimizer's
    first moment (exp_avg = (1 - beta1) * the clipped gradient after Adam's first step: the gradient itself,
    which the parameters after one Adam step hide, since that step is about lr * sign(gradient)).
    With more than one process the same update is also run with reduce=None (keys prefixed "noreduce/"): what
    `ppo_update` does when the caller forgets `reduce`.
MODE group_update --model DIR --grad-accum G [--lr LR]
    The same for grpo/rloo's `group_step.group_update`: the critic-free shared base (no value model), the fixed
    rollout in groups of GROUP consecutive rows, process r holding the groups r::world (whole groups, as the stage
    samples them), GRPO advantages of its own groups, one update with the k3 KL term in the loss.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

B = 8  # global batch (sequences)

PROMPTS = ["Tell me about the red fox.", "Hi", "Describe the blue cup, please, in a few words.", "What is green?",
           "Name a small yellow animal and say why.", "Why?", "List three things that are red and round.",
           "Say something kind about the sea."]
RESPONSES = ["The red fox is quick.", "Hello there, friend.", "A small blue cup.", "Grass is green and soft.",
             "A yellow duck, it is small.", "Because.", "An apple, a ball, a cherry.", "The sea is calm and wide."]
RESPONSE_LENGTH = 8  # max new tokens: a response without EOS has exactly this many (as generate returns it)
# (tokens before the EOS, ends with EOS): ragged, so the two halves of the batch hold different numbers of tokens
# (a per-process token mean then differs from the global one); the responses without EOS are all in rows 0::2,
# so with 2 processes rank 1's responses are narrower (7) than the whole batch's (8): other padding widths
CUTS = [(5, True), (2, True), (8, False), (6, True), (7, True), (1, True), (8, False), (6, True)]
assert all(eos or n == RESPONSE_LENGTH for n, eos in CUTS) and all(n < RESPONSE_LENGTH for n, eos in CUTS if eos)


def _torch():
    import torch

    torch.set_num_threads(1)
    return torch


def rows_of(rank: int, world: int) -> list[int]:
    return list(range(B))[rank::world]


GROUP = 2  # group_update: responses per prompt


def group_rows_of(rank: int, world: int) -> list[int]:
    """The rows of the groups rank::world: whole groups of GROUP consecutive rows (rank 0 of 2: 0, 1, 4, 5)."""
    return [g * GROUP + j for g in range(B // GROUP)[rank::world] for j in range(GROUP)]


# ---------------------------------------------------------------------------------------------------- whiten


def whiten_inputs():
    """(x, y, mask) global tensors (8, 7); a ragged bool mask with every row non-empty."""
    torch = _torch()
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(B, 7, generator=g) * 3.0 + 1.5
    y = x + torch.randn(B, 7, generator=g) * 0.7
    lengths = torch.tensor([7, 3, 5, 1, 6, 2, 7, 4])
    mask = torch.arange(7).expand(B, 7) < lengths.unsqueeze(1)
    return x, y, mask


def whiten_results(x, y, mask, reduce) -> dict:
    from rlchat import ppo_math as pm

    return {
        "whiten": pm.masked_whiten(x, mask, shift_mean=True, reduce=reduce),
        "whiten_keep_mean": pm.masked_whiten(x, mask, shift_mean=False, reduce=reduce),
        "var_unbiased": pm.masked_var(x, mask, unbiased=True, reduce=reduce),
        "var_biased": pm.masked_var(x, mask, unbiased=False, reduce=reduce),
        "explained_variance": pm.explained_variance(x, y, mask, reduce=reduce),
    }


def run_whiten(rank: int, world: int) -> dict:
    from rlchat import dist

    x, y, mask = whiten_inputs()
    rows = rows_of(rank, world)
    x, y, mask = x[rows], y[rows], mask[rows]
    out = whiten_results(x, y, mask, dist.all_sum if world > 1 else None)
    out["rows"] = rows
    out["noreduce/whiten"] = whiten_results(x, y, mask, None)["whiten"]
    return out


# ------------------------------------------------------------------------------------------------ ppo_update


def build_model(model_dir: str, critic: bool = True):
    """The shared-base ActorCritic with every trainable weight drawn from a seeded generator (the same on every
    process): policy != reference and a non-zero value head, so every parameter gets a gradient. critic=False:
    grpo/rloo's model (no value model)."""
    torch = _torch()
    from rlchat import models
    from rlchat.actor_critic import build_shared

    torch.manual_seed(0)
    tok = models.load_tokenizer(model_dir)
    lm = models.load_causal_lm(model_dir)
    model = build_shared(lm, models.lora_config(4, 8, 0.0, "all-linear"), None, temperature=0.7, critic=critic)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * (0.05 if "lora_" in name else 0.2))
    return model, tok


def fixed_rollout(model, tok, rows: list[int]):
    """Rollout of the sequences `rows` (fixed prompts and responses), padded as the stage pads a process's share."""
    torch = _torch()
    from rlchat.rollout import score_rollout
    from rlchat.generation import encode_prompt, left_pad, stop_token_ids

    stop_ids = stop_token_ids(model.policy_generator(), tok)
    prompt_ids, prompt_mask = left_pad([encode_prompt(tok, [{"role": "user", "content": PROMPTS[i]}])
                                        for i in rows], tok.pad_token_id, "cpu")
    responses = []
    for i in rows:
        n, eos = CUTS[i]
        ids = [t for t in tok(RESPONSES[i], add_special_tokens=False)["input_ids"] if t not in stop_ids]
        ids = (ids * 4)[:n]
        responses.append(ids + ([tok.eos_token_id] if eos else []))
    width = max(len(r) for r in responses)  # what generate returns: the longest response of this process
    response_ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    for j, r in enumerate(responses):
        response_ids[j, :len(r)] = torch.tensor(r)
    ro = score_rollout(model, prompt_ids, prompt_mask, response_ids, stop_ids, tok.pad_token_id)
    g = torch.Generator().manual_seed(99)
    ro.scores = (torch.randn(B, generator=g) * 2.0)[rows]
    return ro


def ppo_cfg(grad_accum: int, lr: float):
    from rlchat.config import PPOConfig

    return PPOConfig(run_dir="unused", ppo_epochs=1, mini_batches=1, grad_accum=grad_accum, batch_size=B, lr=lr)


def one_update(model_dir: str, grad_accum: int, lr: float, rank: int, world: int, use_reduce: bool) -> dict:
    """Build, roll out, take one `ppo_update` step; the stats, parameters and first moments after it."""
    torch = _torch()
    from accelerate import Accelerator, DistributedDataParallelKwargs

    from rlchat import dist
    from rlchat import ppo_math as pm
    from rlchat.ppo_update import ppo_update

    cfg = ppo_cfg(grad_accum, lr)
    accelerator = Accelerator(kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    assert accelerator.num_processes == world, (accelerator.num_processes, world)
    model, tok = build_model(model_dir)
    reduce = dist.all_sum if world > 1 else None  # statistics of the global batch (as the stage passes it)
    ro = fixed_rollout(model, tok, rows_of(rank, world))
    rewards, _ = pm.per_token_rewards(ro.scores, ro.logprobs, ro.ref_logprobs, ro.response_mask, cfg.kl_coef)
    advantages, returns = pm.gae(rewards, ro.values, ro.response_mask, cfg.gamma, cfg.lam)
    advantages = pm.masked_whiten(advantages, ro.response_mask, reduce=reduce)

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, eps=1e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: max(0.0, 1.0 - u / 10))
    model, optimizer = accelerator.prepare(model, optimizer)
    torch.manual_seed(5)  # ppo_update shuffles the rows with the global RNG
    stats = ppo_update(cfg, model, optimizer, scheduler, accelerator, trainable, ro, advantages, returns,
                       reduce if use_reduce else None)
    state = optimizer.optimizer.state if hasattr(optimizer, "optimizer") else optimizer.state
    return {
        "stats": stats,
        "distributed_type": accelerator.distributed_type.name,
        "tokens": int(ro.response_mask.sum()),
        "widths": [ro.prompt_ids.shape[1], ro.response_ids.shape[1]],  # (P, R) of this process's padded batch
        "advantages": advantages.detach().clone(),
        "params": {n: p.detach().clone() for n, p in zip(names, trainable)},
        "exp_avg": {n: state[p]["exp_avg"].detach().clone() for n, p in zip(names, trainable)},
    }


def one_group_update(model_dir: str, grad_accum: int, lr: float, rank: int, world: int, use_reduce: bool) -> dict:
    """Build, roll out whole groups, take one `group_update` step (GRPO advantages, KL in the loss)."""
    torch = _torch()
    from types import SimpleNamespace

    from accelerate import Accelerator, DistributedDataParallelKwargs

    from rlchat import dist
    from rlchat import group_math as gm
    from rlchat.config import GRPOConfig
    from rlchat.group_step import group_update

    cfg = GRPOConfig(run_dir="unused", ppo_epochs=1, mini_batches=1, grad_accum=grad_accum, batch_size=B, lr=lr,
                     num_generations=GROUP)
    accelerator = Accelerator(kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    model, tok = build_model(model_dir, critic=False)
    ro = fixed_rollout(model, tok, group_rows_of(rank, world))
    advantages = gm.token_advantages(gm.grpo_advantages(ro.scores, GROUP), ro.response_mask)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, eps=1e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: max(0.0, 1.0 - u / 10))
    prepared, optimizer = accelerator.prepare(model, optimizer)
    s = SimpleNamespace(model=prepared, accelerator=accelerator, optimizer=optimizer, scheduler=scheduler,
                        trainable=trainable, reduce=dist.all_sum if world > 1 and use_reduce else None)
    torch.manual_seed(5)  # the minibatch order comes from the global RNG
    stats = group_update(cfg, s, ro, advantages, kl_coef=0.5)
    state = optimizer.optimizer.state if hasattr(optimizer, "optimizer") else optimizer.state
    return {"stats": stats, "tokens": int(ro.response_mask.sum()), "rows": group_rows_of(rank, world),
            "params": {n: p.detach().clone() for n, p in zip(names, trainable)},
            "exp_avg": {n: state[p]["exp_avg"].detach().clone() for n, p in zip(names, trainable)}}


def run_update(one, args, rank: int, world: int) -> dict:
    """`one` (one_update / one_group_update) with reduce, and with more than one process also without it."""
    out = one(args.model, args.grad_accum, args.lr, rank, world, True)
    if world > 1:
        no = one(args.model, args.grad_accum, args.lr, rank, world, False)
        out.update({f"noreduce/{k}": v for k, v in no.items()})
    return out


# ------------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["whiten", "ppo_update", "group_update"])
    parser.add_argument("outdir")
    parser.add_argument("--model")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args(argv)

    torch = _torch()
    from rlchat import dist

    if dist.is_distributed():
        # Join the group as a CPU-or-GPU data-parallel run. A plain PartialState() / Accelerator() (what
        # rlchat.dist.init() and the PPO stage call) on a machine without GPUs gives DistributedType.NO even under
        # `accelerate launch --multi_gpu` (accelerate picks MULTI_CPU only with cpu=True), so the model would not
        # be wrapped in DDP; this harness sets the state up correctly and the Accelerator below inherits it.
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())
    rank, world = dist.rank(), dist.world_size()
    if args.mode == "whiten":
        out = run_whiten(rank, world)
    else:
        out = run_update(one_update if args.mode == "ppo_update" else one_group_update, args, rank, world)
    out["world"] = world
    Path(args.outdir).mkdir(parents=True, exist_ok=True)
    torch.save(out, Path(args.outdir) / f"rank-{rank}.pt")
    if dist.is_distributed():
        import torch.distributed as td

        dist.barrier()
        # leave the group before exiting: gloo's threads can otherwise abort the interpreter's shutdown
        # ("terminate called without an active exception", now and then)
        td.destroy_process_group()
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
