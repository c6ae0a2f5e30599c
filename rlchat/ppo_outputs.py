"""PPO's work beside the loop (rlchat/stages/ppo.py): the held-out score of the policy and RUN/ppo/best/ at
--eval-every steps (heldout_row, heldout_start; the scoring itself is rlchat/ppo_heldout.py), the health checks'
reporting (health_monitor, check_health, health_summary; the checks are rlchat/ppo_health.py) and step 4, the
final outputs: policy/, value/, tokenizer/ written atomically and the manifest's metrics (finish).

The functions take the stage's objects: `inp` (stages.ppo.Inputs), `s` (ppo_step.PPOSetup), `loop`
(ppo_step.LoopState). Imports: ppo_heldout, ppo_health, ppo_checkpoint, run_models, fileio, progress (inside the
functions).
"""
from __future__ import annotations

import json
import time
from pathlib import Path


def adapter_base(cfg, inp) -> str:
    """base_model_name_or_path of the saved adapters: the plain SFT model directory (RUN/sft/merged or
    RUN/sft/model, absolute) or --model, so stock peft loads RUN/ppo/policy offline (see run_models)."""
    from rlchat.run_models import adapter_base_name

    return adapter_base_name(inp.run, cfg.model)


def heldout_row(cfg, inp, s, loop, row: dict) -> None:
    """--eval-every: score the policy on the held-out prompts (every eval_every steps and at the last), add the
    heldout/* metrics to the row; a new best is saved as RUN/ppo/best/ (before this step's checkpoint, so a
    resumed run has it)."""
    from rlchat.ppo_heldout import evaluate_heldout, save_best
    from rlchat.progress import console

    held = inp.heldout
    if held is None or not (loop.step % cfg.eval_every == 0 or loop.step == s.total_steps):
        return
    row.update(evaluate_heldout(cfg, s, held, loop.step))
    better = held.improved(row)
    if s.is_main:
        if better:
            save_best(loop.stage_dir, s.core, adapter_base(cfg, inp), row, held.metric)
        judge = f"  judge {row['heldout/judge']:.3f}" if "heldout/judge" in row else ""
        console.print(f"ppo held-out @ step {loop.step}: score {row['heldout/score']:.3f}{judge}  KL "
                      f"{row['heldout/kl']:.2f}  length {row['heldout/length']:.1f}"
                      + ("  (best so far: saved to best/)" if better else ""), highlight=False)
    s.accelerator.wait_for_everyone()


def heldout_start(cfg, inp, s, loop, health) -> None:
    """The held-out scores of the starting policy (== the reference) as a metrics row of step 0; it is the first
    candidate for RUN/ppo/best/ (PPO must beat it to replace it)."""
    from rlchat.fileio import append_jsonl

    row = {"step": 0, "episodes": 0}
    heldout_row(cfg, inp, s, loop, row)
    if s.is_main:
        append_jsonl(loop.stage_dir / "metrics.jsonl", row)
    health.rows.append(row)


def health_monitor(cfg, stage_dir: Path):
    from rlchat.ppo_health import HealthMonitor

    path = stage_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] \
        if path.is_file() else []
    return HealthMonitor(cfg, rows)


def check_health(health, row: dict, is_main: bool) -> None:
    from rlchat.progress import console

    for finding in health.add(row):
        if is_main:
            console.print(f"[yellow]ppo health: {finding.text}[/]", highlight=False)


def health_summary(health) -> tuple[list[dict], str]:
    """(the manifest's `health` list, the summary's text): checks that hold at the end, and those that held at
    some step and no longer do."""
    if health is None:
        return [], ""
    now, earlier = health.final()
    listed = ([{"check": f.check, "step": f.step, "message": f.message, "fix": f.fix, "at_end": True} for f in now]
              + [{"check": f.check, "step": f.step, "message": f.message, "fix": f.fix, "at_end": False}
                 for f in earlier])
    text = "".join(f"\n  warning: {f.text}" for f in now)
    text += "".join(f"\n  warning (at step {f.step}, no longer at the end): {f.message}. Fix: {f.fix}."
                    for f in earlier)
    return listed, text


def finish(cfg, inp, s, loop, t_start: float, health=None) -> dict:
    """Step 4: policy/, value/ and tokenizer/ written atomically, the final metrics in the manifest (with the
    health checks' findings)."""
    from rlchat.ppo_checkpoint import save_policy, save_value
    from rlchat.fileio import atomic_dir

    stage_dir, base, history, stage = loop.stage_dir, inp.base, loop.history, inp.stage
    critic = s.core.has_critic  # grpo/rloo have no value model: no value/
    outputs = {"kind": "full" if cfg.full else "lora", "policy": f"{stage}/policy", "value": f"{stage}/value",
               "tokenizer": f"{stage}/tokenizer", "base": base.name, "base_hash": base.hash,
               "metrics": f"{stage}/metrics.jsonl", "samples": f"{stage}/samples.jsonl"}
    if not critic:
        del outputs["value"]
    if inp.heldout is not None and (stage_dir / "best").is_dir():
        outputs["best"] = f"{stage}/best"
    if s.is_main:
        with atomic_dir(stage_dir / "policy") as tmp:
            save_policy(s.core, tmp, adapter_base(cfg, inp))
        if critic:
            with atomic_dir(stage_dir / "value") as tmp:
                save_value(s.core, tmp, adapter_base(cfg, inp))
        with atomic_dir(stage_dir / "tokenizer") as tmp:
            inp.tokenizer.save_pretrained(str(tmp))
    k = max(1, min(5, len(history["scores"]) // 5))
    wall = time.time() - t_start
    n_trainable, n_total = param_counts(s)
    metrics = {
        "score": _mean(history["scores"][-k:]),  # the mean score of the last k steps
        "score_start": _mean(history["scores"][:k]),
        "kl": _mean(history["kl"][-k:]),
        "steps": loop.step,
        "episodes": loop.episodes,
        "score_window_steps": k,
        "trainable_params": n_trainable,
        "total_params": n_total,
        "shared_base": not (cfg.separate_models or cfg.full),
        "value_model": cfg.value_model if critic else None,
        "processes": s.world,
        "resumed_from": inp.resume_from.name if inp.resume_from else None,
        "wall_s": round(wall, 1),
    }
    metrics["health"], health_text = health_summary(health)
    if inp.heldout is not None and inp.heldout.best is not None:
        metrics["best_step"], metrics["best_by"] = inp.heldout.best_step, inp.heldout.metric
        metrics["best_value"] = inp.heldout.best
        for key in ("heldout/score", "heldout/judge", "heldout/kl"):
            values = [r[key] for r in health.rows if key in r] if health is not None else []
            if values:
                metrics[f"{key}_last"] = values[-1]
    if not critic:
        metrics["num_generations"] = cfg.num_generations
    inp.run.finish_stage(stage, metrics=metrics, outputs=outputs)
    what = "policy model" if cfg.full else "policy adapter"
    metrics["summary"] = (
        f"score {metrics['score_start']:.3f} -> {metrics['score']:.3f} (mean of the first/last {k} steps), "
        f"KL {metrics['kl']:.3f}, {loop.episodes} episodes in {wall:.0f}s; {what} at {stage_dir / 'policy'}"
        + (f"; best held-out {metrics['best_by'].split('/')[1]} {metrics['best_value']:.3f} at step "
           f"{metrics['best_step']}: {stage_dir / 'best'}" if "best_step" in metrics else "")
        + health_text)
    return metrics


def param_counts(s) -> tuple[int, int]:
    """(trainable, total) parameters of the models."""
    return sum(p.numel() for p in s.trainable), sum(p.numel() for p in s.core.parameters())


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
