"""`rlchat train-reward`: a reward model trained on preference pairs with TRL's RewardTrainer.

What `run(cfg)` does, in order:
  1. validate, before anything is written to the run directory: the run directory (a finished stage needs
     --overwrite), the base model (the run's SFT model, or --model), the pairs (TRL preference formats: explicit
     prompt + chosen + rejected, or implicit prompt shared inside chosen and rejected; plain text or lists of
     messages; an optional numeric `margin` column), and the tokenized lengths. Explicit plain-text pairs are read
     as one-turn chats (rlchat/one_turn.py), so the reward model trains on the chat template PPO scores with.
  2. begin the stage and train: the base is the SFT policy with its adapter merged in memory (as in InstructGPT and
     "The N+ implementation details of RLHF with PPO"), turned into a sequence classifier whose scalar `score` head
     reads the last non-pad token. LoRA by default (task type SEQ_CLS, so PEFT trains and saves the head through
     `modules_to_save`), --full for all weights. Loss: -log sigmoid(r_chosen - r_rejected [- margin]) plus the
     optional centring term center_rewards_coef * mean((r_chosen + r_rejected)^2) (Eisenstein et al. 2023, Eq. 2).
  3. score the held-out pairs with the trained model ourselves (pairwise accuracy, margin, reward mean/std) and
     write RUN/reward/: adapter/ or model/, tokenizer/, metrics.jsonl, reward_stats.json, config.yaml.
  4. say why a weak reward model is weak (rlchat/reward_checks.py): a held-out accuracy whose 95% interval holds
     0.5 is put down to the training (it did not fit DIAGNOSE_TRAIN_PAIRS of its own training pairs, scored here,
     or the loss stayed near log 2), the data (it fits them; the pairs' judge margins, when the pairs carry them,
     say how close the answers were), or too few held-out pairs; metrics `diagnosis`, printed with the fix.

Data rules (all checked in step 1; errors are one line, exit code 2):
  * pairs whose chosen and rejected are identical carry no signal: counted, skipped, reported as a warning (an
    error only if no pair remains);
  * implicit-prompt pairs must share a prefix (the prompt); a pair that shares none is an error naming the rows;
  * longer than --max-length: TRL 1.16 silently DROPS such pairs (RewardTrainer filters chosen or rejected longer
    than max_length). We tokenize ourselves and instead LEFT-truncate (keep the last max_length tokens): the score
    head reads the final token, and the end of the response is what tells chosen from rejected, so the start of
    the prompt is the cheapest part to lose. `rlchat score` (rlchat/score.py) truncates the same way. The count
    is reported (n_truncated).

Outputs (manifest `outputs`): kind "lora" | "full", adapter "reward/adapter" | None, model "reward/model" | None,
tokenizer, base ("sft" or the --model spec), base_hash (content hash of the SFT adapter/model, or of a local
--model directory; None for a Hub id). `rlchat.run_models.load_reward_model` refuses an adapter whose base has
changed since.

Resume: checkpoints go to RUN/reward/checkpoints every --save-steps (2 kept); rerunning the same command after a
crash resumes from the newest complete one, provided the base is unchanged.

Pairs are read and tokenized by rlchat/pairs.py; the base and the trained model are loaded by rlchat/run_models.py.

Not done here: ensembles, per-token rewards, reward models for multi-turn credit assignment.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

from rlchat.errors import ConfigError, DataError
from rlchat.models import with_load_settings
from rlchat.one_turn import PAIRS_NOTE, pairs_rendering
from rlchat.pairs import pair_stats, prompt_groups, read_pairs, reward_health, rows_text, tokenize_pairs
from rlchat.run_models import RewardScorer, load_base_causal, resolve_base

STAGE = "reward"
MAX_STATS_PAIRS = 2000  # pairs scored for reward_stats.json when there is no held-out split
DIAGNOSE_TRAIN_PAIRS = 64  # training pairs scored after training to tell "did not fit" from "does not generalise"


# ------------------------------------------------------------------------------------------------------- run


@with_load_settings  # every model it loads: cfg.dtype, cfg.attn_implementation
def run(cfg) -> dict:
    """Train the reward model of `cfg.run_dir`; returns the final metrics (and a one-line "summary")."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from rlchat import dist
    from rlchat.stages.common import is_sharded, save_trained, train, trainer_stage

    t_start = time.time()
    # 1. validate everything before the first write
    run, mode, base, inputs = _check_run(cfg)
    sets, model, tokenizer = _load_pairs(cfg, run, base)

    # 2. train
    with trainer_stage(run, STAGE, cfg, mode, inputs, parent=None if cfg.model else "sft") as begun:
        trainer = _trainer(cfg, begun, model, tokenizer, sets)
        result, trainable, total = train(trainer, begun, STAGE, cfg)
        trl_eval = next((h for h in reversed(trainer.state.log_history) if "eval_accuracy" in h), {})
        # ZeRO-3 / FSDP: forward passes and saving need every process; otherwise, once training (the collective
        # part) is over, the main process scores and writes
        if not begun.is_main and not is_sharded(trainer):
            return {"rank": dist.rank(), "steps": trainer.state.global_step}

        # 3. our own held-out scoring (the numbers PPO normalises with), then the outputs
        scored = _score_held_out(cfg, trainer, tokenizer, sets)
        stats, source = scored["stats"], scored["source"]
        diagnosis = _diagnose(cfg, trainer, tokenizer, sets, scored)  # 4. data, training or held-out size?
        save_trained(trainer, begun.stage_dir / ("model" if cfg.full else "adapter"), full=cfg.full)
        if not begun.is_main:
            return {"rank": dist.rank(), "steps": trainer.state.global_step}
        outputs = _write_outputs(cfg, begun, base, tokenizer, scored)
        wall = time.time() - t_start
        metrics = {
            "eval_accuracy": stats["accuracy"] if source == "eval" else None,
            "eval_margin": stats["margin"] if source == "eval" else None,
            "train_accuracy": stats["accuracy"] if source == "train" else None,
            "chosen_mean": stats["chosen_mean"], "chosen_std": stats["chosen_std"],
            "rejected_mean": stats["rejected_mean"], "rejected_std": stats["rejected_std"],
            "reward_mean": stats["mean"], "reward_std": stats["std"],
            "trl_eval_accuracy": trl_eval.get("eval_accuracy"),
            "eval_loss": trl_eval.get("eval_loss"),
            "train_loss": result.training_loss,
            "steps": trainer.state.global_step,
            "n_train": len(sets.train_set),
            "n_eval": len(sets.eval_set) if sets.eval_set is not None else 0,
            "processes": dist.world_size(),
            "n_truncated": sets.n_truncated,
            "n_identical_skipped": sets.n_identical,
            "diagnosis": diagnosis["verdict"],
            "format": sets.fmt,
            "rendering": sets.rendering,
            "has_margin": "margin" in sets.train_cols,
            "trainable_params": trainable,
            "total_params": total,
            "resumed_from": begun.resume_from.name if begun.resume_from else None,
            "wall_s": round(wall, 1),
        }
        health = reward_health(scored["scores"][:scored["n"]].tolist(), scored["scores"][scored["n"]:].tolist())
        metrics.update({"accuracy_ci": health["accuracy_ci"], "calibration_ece": health["ece"],
                        "mean_confidence": health["mean_confidence"], "mean_abs_error": health["mean_abs_error"],
                        "health_source": source, "warnings": health["warnings"]})
        run.finish_stage(STAGE, metrics=metrics, outputs=outputs)

    from rlchat.progress import console

    for line in diagnosis["lines"]:
        console.print(f"[yellow]reward:[/] {line}", highlight=False, soft_wrap=True)
    where = run.path / (outputs["model"] or outputs["adapter"])
    if source == "eval":  # the same names and numbers as the progress lines, metrics.jsonl and `rlchat status`
        head = (f"eval_accuracy {stats['accuracy']:.3f}, eval_margin {stats['margin']:.3f} "
                f"({metrics['n_eval']} held-out pairs)")
    else:
        head = f"train accuracy {stats['accuracy']:.3f}, margin {stats['margin']:.3f} (no held-out split)"
    lo, hi = metrics["accuracy_ci"]
    calib = (f"; accuracy 95% CI [{lo:.3f}, {hi:.3f}], calibration: ECE {metrics['calibration_ece']:.3f}, "
             f"mean confidence {metrics['mean_confidence']:.3f} (Bradley-Terry p on the "
             f"{'held-out' if source == 'eval' else 'training'} pairs)")
    metrics["summary"] = (f"{head} in {wall:.0f}s ({metrics['steps']} steps, {metrics['n_train']} pairs); "
                          f"{outputs['kind']} reward model at {where}{calib}"
                          + "".join(f"\n  warning: {w}." for w in metrics["warnings"]))
    return metrics


def _check_run(cfg):
    """(run, mode, base, inputs): the pairs are given, the run directory can take the stage, and a resume
    continues training on the same base and dataset."""
    from rlchat.fileio import input_record
    from rlchat.progress import check_report_to
    from rlchat.rundir import RunDir
    from rlchat.stages.resume import check_resume_inputs

    if not cfg.dataset:
        raise ConfigError("train-reward needs preference pairs", "pass --dataset (a .jsonl/.json/.parquet/.csv "
                          "file, a save_to_disk directory or a Hub id with chosen/rejected columns)")
    check_report_to(cfg.report_to)  # a missing tracker package: one line now, not a traceback mid-training
    run = RunDir(cfg.run_dir)
    mode = run.check_can_start(STAGE, cfg.overwrite)
    base = resolve_base(run, cfg.model)
    dataset_record = input_record(cfg.dataset)
    if mode == "resume":  # the checkpoints must continue the same training
        check_resume_inputs(run, STAGE, cfg, base, dataset_record)
    inputs = {"dataset": dataset_record,
              "base": {"name": base.name, "hash": base.hash},
              "model": input_record(cfg.model, hash=False) if cfg.model else None}
    return run, mode, base, inputs


@dataclass
class PairSets:
    """The tokenized pairs the reward model trains and is scored on."""

    fmt: str                    # "explicit" | "implicit" (data.detect_preference_format)
    train_cols: dict            # chosen_ids, rejected_ids, (margin), rows: the training pairs
    eval_cols: dict | None      # the same for the held-out pairs
    train_set: object           # datasets.Dataset of train_cols (without rows) for RewardTrainer
    eval_set: object | None
    n_truncated: int            # pairs left-truncated to max_length
    n_identical: int            # pairs skipped: chosen == rejected, before or after truncation
    rendering: str              # one_turn.CHAT | ONE_TURN (explicit plain-text pairs) | RAW (implicit plain text)
    judge: dict | None = None   # reward_checks.judge_margin_stats of pairs that carry judge scores (sample-pairs)


def _load_pairs(cfg, run, base) -> tuple[PairSets, object, object]:
    """(pairs, sequence classifier with a fresh score head on the base, tokenizer); warnings for skipped and
    truncated pairs; DataError when no training pair is left."""
    from rlchat import data, models
    from rlchat.progress import console, quiet_libraries
    from rlchat.stages.common import oom_guard

    ds = data.load_any(cfg.dataset, split=cfg.split, config=cfg.dataset_config)
    fmt = data.detect_preference_format(ds, cfg.dataset)
    pairs, identical = read_pairs(ds, fmt, cfg.dataset)
    console.print(f"[bold]reward[/] dataset {cfg.dataset}: {data.describe(ds, fmt)}"
                  + (", with margins" if pairs[0].margin is not None else ""), highlight=False)
    if pairs[0].one_turn:
        console.print(f"[bold]reward[/] {PAIRS_NOTE}", highlight=False)
    kept = ds.select([p.row for p in pairs])   # so the split works on valid pairs only
    by_row = {p.row: p for p in pairs}
    kept = kept.add_column("_row", [p.row for p in pairs])
    if cfg.eval_split is None:
        train_ds, eval_ds = data.split_eval(kept, cfg.eval_fraction, cfg.seed, groups=prompt_groups(pairs))
        eval_pairs = [by_row[r] for r in eval_ds["_row"]] if eval_ds is not None else []
    else:  # an explicit held-out split: all of `split` trains
        train_ds, eval_pairs = kept, _eval_split_pairs(cfg)

    quiet_libraries()
    with oom_guard(STAGE):
        causal, tokenizer = load_base_causal(run, base, cfg.trust_remote_code)
    tokenizer.padding_side = "right"  # training batches are right-padded (TRL's collator); recorded when saved
    from rlchat import checks

    with checks.template_errors(f"a pair of {cfg.dataset}"):
        train_cols, n_trunc_train, collapsed_train = tokenize_pairs([by_row[r] for r in train_ds["_row"]],
                                                                    tokenizer, cfg.max_length)
        eval_cols, n_trunc_eval, collapsed_eval = (
            tokenize_pairs(eval_pairs, tokenizer, cfg.max_length) if eval_pairs else (None, 0, []))
    longest = max(len(ids) for cols in (train_cols, eval_cols) if cols for key in ("chosen_ids", "rejected_ids")
                  for ids in cols[key]) if train_cols["chosen_ids"] else 0
    checks.check_fits(causal, longest, f"the longest pair of {cfg.dataset} (cut to max_length {cfg.max_length})",
                      f"pass --max-length {checks.max_positions(causal)} or less")
    collapsed = collapsed_train + collapsed_eval
    n_truncated = n_trunc_train + n_trunc_eval
    if not train_cols["chosen_ids"]:
        raise DataError(f"no training pair is left in {cfg.dataset} after skipping identical ones",
                        "give each pair two different responses, or raise --max-length")
    _warn_skipped(cfg, len(ds), len(pairs), identical, collapsed, n_truncated)

    from datasets import Dataset
    from transformers import set_seed

    set_seed(cfg.seed)  # the score head is freshly initialised
    model = models.seq_cls_from_causal(causal, pad_token_id=tokenizer.pad_token_id)
    del causal
    if not cfg.full:
        checks.check_lora_targets(model, cfg.lora_target_modules)
    train_set = Dataset.from_dict({k: v for k, v in train_cols.items() if k != "rows"})
    eval_set = (Dataset.from_dict({k: v for k, v in eval_cols.items() if k != "rows"})
                if eval_cols and eval_cols["chosen_ids"] else None)
    sets = PairSets(fmt, train_cols, eval_cols, train_set, eval_set, n_truncated, len(identical) + len(collapsed),
                    pairs_rendering(pairs[0].one_turn, data.is_conversational(ds)), _judge_margins(ds))
    return sets, model, tokenizer


def _judge_margins(ds) -> dict | None:
    """The judge margins of pairs written by `rlchat sample-pairs` (judge_chosen / judge_rejected columns)."""
    from rlchat.reward_checks import judge_margin_stats

    if not {"judge_chosen", "judge_rejected"} <= set(ds.column_names):
        return None
    cols = ["judge_chosen", "judge_rejected"] + (["label_flipped"] if "label_flipped" in ds.column_names else [])
    return judge_margin_stats(ds.select_columns(cols).to_list())


def _eval_split_pairs(cfg) -> list:
    """The preference pairs of --eval-split (the same dataset's held-out split), checked like the training pairs."""
    from rlchat import data
    from rlchat.progress import console

    name = f"{cfg.dataset} (split {cfg.eval_split})"
    ds = data.load_eval_split(cfg.dataset, cfg.eval_split, cfg.dataset_config)
    fmt = data.detect_preference_format(ds, name)
    pairs, _ = read_pairs(ds, fmt, name)
    console.print(f"[bold]reward[/] eval split {cfg.eval_split}: {data.describe(ds, fmt)}", highlight=False)
    return pairs


def _warn_skipped(cfg, n_rows: int, n_pairs: int, identical: list, collapsed: list, n_truncated: int) -> None:
    from rlchat.progress import console

    if identical:
        console.print(f"[yellow]warning:[/] skipped {len(identical)} of {n_rows} pairs whose chosen and rejected "
                      f"responses are identical (rows {rows_text(identical)})", highlight=False)
    if collapsed:
        console.print(f"[yellow]warning:[/] skipped {len(collapsed)} pairs that became identical when truncated "
                      f"to max_length={cfg.max_length} tokens (rows {rows_text(collapsed)}); raise --max-length",
                      highlight=False)
    if n_truncated:
        console.print(f"[yellow]warning:[/] {n_truncated} of {n_pairs} pairs are longer than max_length="
                      f"{cfg.max_length} tokens; kept their last {cfg.max_length} tokens (the start of the prompt "
                      "is cut; TRL alone would drop these pairs)", highlight=False)


def _trainer(cfg, begun, model, tokenizer, sets: PairSets):
    """TRL's RewardTrainer with our settings and progress callback."""
    from trl import RewardConfig as TrlRewardConfig
    from trl import RewardTrainer

    from rlchat import models
    from rlchat.progress import TrainerProgress
    from rlchat.stages.common import trainer_args

    targs = trainer_args(cfg, begun.ckpt_dir, has_eval=sets.eval_set is not None)
    if sets.eval_set is not None and not cfg.eval_steps:
        # ten held-out evaluations over the run (a float below 1 is a fraction of the total steps), not one per
        # epoch: two points made a useless accuracy curve. The Trainer also evaluates after the last step.
        targs.update(eval_strategy="steps", eval_steps=0.1)
    args = TrlRewardConfig(
        **targs,
        max_length=None,   # TRL would drop longer pairs; every pair was already truncated to fit above
        center_rewards_coefficient=cfg.center_rewards_coef or None,
        trust_remote_code=cfg.trust_remote_code,
        disable_dropout=True,
    )
    peft_config = None if cfg.full else models.lora_config(
        cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules, task_type="SEQ_CLS")
    progress = TrainerProgress(begun.stage_dir / "metrics.jsonl", "reward",
                               show_keys=("loss", "accuracy", "eval_accuracy"))
    return _exact_eval_trainer(RewardTrainer)(
        model=model, args=args, train_dataset=sets.train_set, eval_dataset=sets.eval_set,
        processing_class=tokenizer, peft_config=peft_config, callbacks=[progress])


def _exact_eval_trainer(base):
    """RewardTrainer whose logged eval_accuracy / eval_margin are over all held-out pairs.

    TRL 1.16 logs the mean of per-batch accuracies, so a short last batch weighs as much as a full one (measured:
    0.7188 in the log while the same model scored 0.760 on the same pairs). Here every evaluation batch's
    r_chosen - r_rejected is kept and the logged numbers are computed over all pairs at once (chosen strictly
    above rejected, as `pairs.pair_stats` counts), so the final eval_accuracy equals the stage's summary.
    """
    import torch

    class ExactEvalRewardTrainer(base):
        _eval_diffs: list = []

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
            if not self.model.training:
                with torch.no_grad():
                    chosen, rejected = torch.chunk(outputs.logits.squeeze(-1), chunks=2)
                    diff = self.accelerator.gather_for_metrics((chosen - rejected).float().contiguous())
                    self._eval_diffs = self._eval_diffs + [diff.cpu()]
            return (loss, outputs) if return_outputs else loss

        def log(self, logs, start_time=None):
            if self._eval_diffs and not self.model.training:
                diff = torch.cat(self._eval_diffs)
                self._eval_diffs = []
                self._metrics["eval"]["accuracy"] = [float((diff > 0).float().mean())]
                self._metrics["eval"]["margin"] = [float(diff.mean())]
            super().log(logs, start_time)

    return ExactEvalRewardTrainer


def _score_held_out(cfg, trainer, tokenizer, sets: PairSets) -> dict:
    """The trained model's scores of the held-out pairs (the training pairs when there are none, at most
    MAX_STATS_PAIRS): {"stats", "reward_stats", "source", "cols", "scores", "n"}."""
    cols, source = (sets.eval_cols, "eval") if sets.eval_set is not None else (
        {k: v[:MAX_STATS_PAIRS] for k, v in sets.train_cols.items()}, "train")
    ids = cols["chosen_ids"] + cols["rejected_ids"]
    scores = RewardScorer(trainer.model, tokenizer, cfg.batch_size).score_ids(ids)
    n = len(cols["chosen_ids"])
    stats = pair_stats(scores[:n], scores[n:])
    reward_stats = {k: stats[k] for k in ("mean", "std", "chosen_mean", "chosen_std", "rejected_mean",
                                          "rejected_std")}
    reward_stats.update(n_pairs=n, source=source, accuracy=stats["accuracy"], margin=stats["margin"])
    return {"stats": stats, "reward_stats": reward_stats, "source": source, "cols": cols, "scores": scores, "n": n}


def _diagnose(cfg, trainer, tokenizer, sets: PairSets, scored: dict) -> dict:
    """rlchat.reward_checks.diagnose on this run: is a reward model at chance held back by the data, the training
    or the number of held-out pairs? Scores up to DIAGNOSE_TRAIN_PAIRS training pairs for the training fit (when
    the held-out pairs were scored; else the scored set is the training set)."""
    from rlchat.reward_checks import diagnose

    stats, source = scored["stats"], scored["source"]
    train_acc, n_train = (stats["accuracy"], scored["n"]) if source == "train" else (None, 0)
    if source == "eval":
        k = min(DIAGNOSE_TRAIN_PAIRS, len(sets.train_cols["chosen_ids"]))
        ids = sets.train_cols["chosen_ids"][:k] + sets.train_cols["rejected_ids"][:k]
        scores = RewardScorer(trainer.model, tokenizer, cfg.batch_size).score_ids(ids)
        train_acc, n_train = float((scores[:k] > scores[k:]).float().mean()), k
    losses = [h["loss"] for h in trainer.state.log_history if isinstance(h.get("loss"), (int, float))]
    final_loss = sum(losses[-3:]) / len(losses[-3:]) if losses else None
    n_pairs = len(sets.train_cols["chosen_ids"]) + (len(sets.eval_cols["chosen_ids"]) if sets.eval_cols else 0)
    return diagnose(stats["accuracy"] if source == "eval" else None, scored["n"] if source == "eval" else 0,
                    train_acc, n_train, final_loss, sets.judge, sets.n_truncated, n_pairs)


def _name_adapter_base(cfg, adapter_dir, base) -> None:
    """The adapter's base_model_name_or_path: the model it was trained on as a plain directory (RUN/sft/merged or
    RUN/sft/model, absolute) or --model, so peft's AutoPeftModelForSequenceClassification loads it offline
    (the model config the Trainer saw names the model SFT started from, which is not this base)."""
    from rlchat.fileio import atomic_write_json
    from rlchat.models import read_json_object
    from rlchat.rundir import RunDir
    from rlchat.run_models import adapter_base_name

    config = read_json_object(adapter_dir / "adapter_config.json")
    config["base_model_name_or_path"] = adapter_base_name(RunDir(cfg.run_dir),
                                                          None if base.name == "sft" else base.name)
    atomic_write_json(adapter_dir / "adapter_config.json", config)


def _write_outputs(cfg, begun, base, tokenizer, scored: dict) -> dict:
    """reward_stats.json, <source>_scores.jsonl and tokenizer/ (main process); the manifest's `outputs`."""
    from rlchat.fileio import atomic_dir, atomic_write_json, atomic_write_text
    from rlchat.stages.common import trained_outputs

    stage_dir, source, scores, n = begun.stage_dir, scored["source"], scored["scores"], scored["n"]
    atomic_write_json(stage_dir / "reward_stats.json", scored["reward_stats"])
    # per-pair scores of that set: for plots, and to check that a reloaded model scores the same
    atomic_write_text(stage_dir / f"{source}_scores.jsonl", "".join(
        json.dumps({"row": row, "chosen": c, "rejected": r}) + "\n"
        for row, c, r in zip(scored["cols"]["rows"], scores[:n].tolist(), scores[n:].tolist())))
    with atomic_dir(stage_dir / "tokenizer") as tmp:
        tokenizer.save_pretrained(tmp)
    if not cfg.full:
        _name_adapter_base(cfg, stage_dir / "adapter", base)
    return {
        **trained_outputs(STAGE, cfg.full),
        "base": base.name,
        "base_hash": base.hash,
        "base_path": str(base.path.resolve()) if base.name != "sft" and base.path else None,
        "reward_stats": "reward/reward_stats.json",
        "scores": f"reward/{source}_scores.jsonl",
        "metrics": "reward/metrics.jsonl",
    }
