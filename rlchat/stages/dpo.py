"""`rlchat dpo`: Direct Preference Optimization (Rafailov et al. 2023) with TRL's DPOTrainer, on the pairs that
`rlchat train-reward` reads, from the run's SFT policy; no reward model, no sampling.

What `run(cfg)` does, in order:
  1. validate, before anything is written to the run directory: the run directory (a finished stage needs
     --overwrite; an interrupted one resumes), the starting policy (the run's SFT model, or --model for a run
     without sft), the pairs (TRL preference formats, read and checked by rlchat/pairs.py exactly as train-reward
     reads them: explicit or implicit prompt, text or messages), every pair through the chat template, the
     lengths against --max-length and the model's positions, and the LoRA target modules.
  2. begin the stage and train: the policy is the starting model with a fresh LoRA adapter; the reference is the
     SAME model with the adapter switched off (TRL 1.16 does this for a PEFT model with ref_model=None: one model
     in memory, the frozen reference forward runs under `disable_adapter()`). Since LoRA starts at B = 0, the
     policy starts equal to the reference. --full trains all weights against a second, frozen copy of the start.
     Loss (sigmoid, the DPO paper's Eq. 7): -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) -
     (log pi(y_l|x) - log ref(y_l|x))]), summed log-probabilities of the response tokens; ipo and hinge as in TRL.
  3. write RUN/dpo/: adapter/ (PEFT, naming the starting model as its base, so peft loads it offline) or model/,
     tokenizer/, metrics.jsonl (TRL's rows: loss, rewards/chosen, rewards/rejected, rewards/margins = beta x the
     log-ratio difference, rewards/accuracies, and their eval_ twins on the held-out pairs), config.yaml, and the
     final metrics into the manifest.

Data rules: pairs are rendered as chat turns, the way `rlchat eval`, `rlchat chat` and PPO prompt the policy
(plain-text pairs become a user turn and an assistant turn; the run's tokenizer has a chat template, rlchat's
default when the model had none). A pair whose prompt alone reaches --max-length teaches nothing (TRL would drop
it silently): it is dropped with a warning, an error when none remains; longer pairs keep their first max_length
tokens (counted in n_truncated). The optional `margin` column is not used (DPO has no margin term).
The held-out split is train-reward's (same --eval-fraction and --seed give the same held-out pairs).

Resume: checkpoints go to RUN/dpo/checkpoints every --save-steps; the same command after a kill resumes from the
newest complete one, provided the starting policy, the pairs and the weight settings are unchanged.

Not done here: online/iterative DPO (sampling new pairs), precomputed reference log-probs, reference sync.

    rlchat dpo --run-dir runs/demo --dataset .demo/data/pairs.jsonl --beta 0.1
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

from rlchat.errors import ConfigError, DataError, RunDirError
from rlchat.models import with_load_settings
from rlchat.pairs import prompt_groups, read_pairs, rows_text
from rlchat.run_models import adapter_base_name, load_base_causal, resolve_base

STAGE = "dpo"


@with_load_settings  # every model it loads: cfg.dtype, cfg.attn_implementation
def run(cfg) -> dict:
    """Train the DPO policy of `cfg.run_dir`; returns the final metrics (and a one-line "summary")."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from rlchat import dist
    from rlchat.stages.common import save_trained, train, trainer_stage

    t_start = time.time()
    # 1. validate everything before the first write
    run, mode, base, inputs = _check_run(cfg)
    sets = _load_pairs(cfg)
    model, ref_model, tokenizer = _load_models(cfg, run, base, sets)

    # 2. train
    with trainer_stage(run, STAGE, cfg, mode, inputs, parent=None if cfg.model else "sft") as begun:
        trainer = _trainer(cfg, begun, model, ref_model, tokenizer, sets)
        result, trainable, total = train(trainer, begun, STAGE, cfg)
        held_out = trainer.evaluate() if sets.eval_set is not None else {}
        save_trained(trainer, begun.stage_dir / ("model" if cfg.full else "adapter"), full=cfg.full,
                     tokenizer=tokenizer if cfg.full else None)  # a full model is a standalone directory
        if not begun.is_main:
            return {"rank": dist.rank(), "steps": trainer.state.global_step}

        # 3. the outputs and the manifest
        outputs = _write_outputs(cfg, run, begun, base, tokenizer)
        wall = time.time() - t_start
        train_rows = [h for h in trainer.state.log_history if "rewards/margins" in h]
        metrics = {
            "eval_loss": held_out.get("eval_loss"),
            "eval_accuracy": held_out.get("eval_rewards/accuracies"),
            "eval_margin": held_out.get("eval_rewards/margins"),
            "train_loss": result.training_loss,
            "train_margin": train_rows[-1]["rewards/margins"] if train_rows else None,
            "train_accuracy": train_rows[-1]["rewards/accuracies"] if train_rows else None,
            "steps": trainer.state.global_step,
            "n_train": len(sets.train_set),
            "n_eval": len(sets.eval_set) if sets.eval_set is not None else 0,
            "processes": dist.world_size(),
            "n_truncated": sets.n_truncated,
            "n_prompt_too_long": sets.n_dropped,
            "n_identical_skipped": sets.n_identical,
            "format": sets.fmt,
            "beta": cfg.beta,
            "loss_type": cfg.loss_type,
            "trainable_params": trainable,
            "total_params": total,
            "resumed_from": begun.resume_from.name if begun.resume_from else None,
            "wall_s": round(wall, 1),
        }
        run.finish_stage(STAGE, metrics=metrics, outputs=outputs)

    where = run.path / (outputs["model"] or outputs["adapter"])
    if metrics["eval_margin"] is not None:
        head = (f"eval_accuracy {metrics['eval_accuracy']:.3f}, eval_margin {metrics['eval_margin']:.3f}, "
                f"eval_loss {metrics['eval_loss']:.3f} ({metrics['n_eval']} held-out pairs)")
    else:
        head = f"train loss {result.training_loss:.3f} (no held-out split)"
    metrics["summary"] = (f"{head} in {wall:.0f}s ({metrics['steps']} steps, {metrics['n_train']} pairs, "
                          f"beta {cfg.beta}); {outputs['kind']} policy at {where}")
    return metrics


def _check_run(cfg):
    """(run, mode, base, inputs): pairs are given, the run directory can take the stage, and a resume continues
    training from the same starting policy on the same pairs."""
    from rlchat.fileio import input_record
    from rlchat.progress import check_report_to
    from rlchat.rundir import RunDir
    from rlchat.stages.resume import check_resume_inputs

    if not cfg.dataset:
        raise ConfigError("dpo needs preference pairs", "pass --dataset (a .jsonl/.json/.parquet/.csv file, a "
                          "save_to_disk directory or a Hub id with chosen/rejected columns), e.g. the one "
                          "train-reward read")
    check_report_to(cfg.report_to)
    run = RunDir(cfg.run_dir)
    mode = run.check_can_start(STAGE, cfg.overwrite)
    if not cfg.model and run.record("sft") is None:
        raise RunDirError(f"{run.path} has no sft stage to start DPO from",
                          f"train one first (`rlchat sft --run-dir {run.path} ...`), or pass --model to start "
                          "from any causal LM")
    base = resolve_base(run, cfg.model)
    dataset_record = input_record(cfg.dataset)
    if mode == "resume":  # the checkpoints must continue the same training
        check_resume_inputs(run, STAGE, cfg, base, dataset_record)
    inputs = {"dataset": dataset_record, "base": {"name": base.name, "hash": base.hash},
              "model": input_record(cfg.model, hash=False) if cfg.model else None}
    return run, mode, base, inputs


@dataclass
class DPOPairs:
    """The pairs DPO trains and is evaluated on, as chat turns (TRL's explicit conversational format)."""

    fmt: str                 # "explicit" | "implicit": the dataset's format (data.detect_preference_format)
    train: list              # [{"prompt": [...], "chosen": [...], "rejected": [...]}]
    held_out: list
    n_identical: int         # pairs skipped: chosen == rejected
    n_truncated: int = 0     # pairs longer than max_length (their end is cut)
    n_dropped: int = 0       # pairs whose prompt alone reaches max_length (dropped)
    train_set: object = None  # datasets.Dataset of `train`, for DPOTrainer
    eval_set: object = None


def as_chat(pair) -> dict:
    """A pairs.Pair as chat turns: a text prompt becomes the user's turn, a text response the assistant's."""
    prompt = pair.prompt if isinstance(pair.prompt, list) else [{"role": "user", "content": pair.prompt or ""}]

    def turn(response):
        return response if isinstance(response, list) else [{"role": "assistant", "content": response}]

    return {"prompt": prompt, "chosen": turn(pair.chosen), "rejected": turn(pair.rejected)}


def _load_pairs(cfg) -> DPOPairs:
    """The training and held-out pairs of cfg.dataset (train-reward's split), read and checked by rlchat/pairs.py;
    DataError for data without chosen/rejected pairs."""
    from datasets import Dataset

    from rlchat import data
    from rlchat.progress import console

    ds = data.load_any(cfg.dataset, split=cfg.split, config=cfg.dataset_config)
    fmt = data.detect_preference_format(ds, cfg.dataset)
    pairs, identical = read_pairs(ds, fmt, cfg.dataset)
    console.print(f"[bold]dpo[/] dataset {cfg.dataset}: {data.describe(ds, fmt)}", highlight=False)
    if identical:
        console.print(f"[yellow]warning:[/] skipped {len(identical)} of {len(ds)} pairs whose chosen and rejected "
                      f"responses are identical (rows {rows_text(identical)})", highlight=False)
    if cfg.eval_split is not None:  # an explicit held-out split: all of `split` trains
        name = f"{cfg.dataset} (split {cfg.eval_split})"
        eval_ds = data.load_eval_split(cfg.dataset, cfg.eval_split, cfg.dataset_config)
        held_out = read_pairs(eval_ds, data.detect_preference_format(eval_ds, name), name)[0]
        train = pairs
    else:  # the rows train_test_split picks depend only on the count and the seed: train-reward's split
        train_ids, eval_ids = data.split_eval(Dataset.from_dict({"i": list(range(len(pairs)))}),
                                              cfg.eval_fraction, cfg.seed, groups=prompt_groups(pairs))
        train = [pairs[i] for i in train_ids["i"]]
        held_out = [pairs[i] for i in eval_ids["i"]] if eval_ids is not None else []
    return DPOPairs(fmt, [as_chat(p) for p in train], [as_chat(p) for p in held_out], len(identical))


def _chat_lengths(tokenizer, row: dict) -> tuple[int, int]:
    """(prompt tokens with the generation prompt, tokens of the longer of prompt + chosen / prompt + rejected)."""
    def n_tokens(messages, generation_prompt=False):
        return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                 add_generation_prompt=generation_prompt)["input_ids"])

    return (n_tokens(row["prompt"], True),
            max(n_tokens(row["prompt"] + row["chosen"]), n_tokens(row["prompt"] + row["rejected"])))


def _fit_lengths(cfg, sets: DPOPairs, tokenizer) -> int:
    """Every pair through the chat template (DataError naming the pair it refuses); pairs whose prompt alone
    reaches max_length dropped (warned); sets.n_truncated counted. Returns the longest sequence DPO will see."""
    from rlchat import checks
    from rlchat.progress import console

    longest = 0
    for part in ("train", "held_out"):
        kept = []
        for i, row in enumerate(getattr(sets, part)):
            with checks.template_errors(f"pair {i} of {cfg.dataset}"):
                prompt_len, total = _chat_lengths(tokenizer, row)
            if prompt_len >= cfg.max_length:
                sets.n_dropped += 1
                continue
            sets.n_truncated += total > cfg.max_length
            longest = max(longest, min(total, cfg.max_length))
            kept.append(row)
        setattr(sets, part, kept)
    if sets.n_dropped:
        console.print(f"[yellow]warning:[/] dropped {sets.n_dropped} pairs whose prompt alone is max_length="
                      f"{cfg.max_length} tokens or more (no response token would be left); raise --max-length",
                      highlight=False)
    if not sets.train:
        raise DataError(f"no training pair of {cfg.dataset} is left: every prompt is max_length={cfg.max_length} "
                        "tokens or longer", "raise --max-length")
    if sets.n_truncated:
        console.print(f"[yellow]warning:[/] {sets.n_truncated} pairs are longer than max_length={cfg.max_length} "
                      "tokens; their first max_length tokens are kept (the end of the response is cut)",
                      highlight=False)
    return longest


def _load_models(cfg, run, base, sets: DPOPairs):
    """(policy start, frozen reference for --full or None, tokenizer), every input check done."""
    from datasets import Dataset

    from rlchat import checks
    from rlchat.progress import quiet_libraries
    from rlchat.stages.common import oom_guard

    quiet_libraries()
    with oom_guard(STAGE):
        model, tokenizer = load_base_causal(run, base, cfg.trust_remote_code)
    longest = _fit_lengths(cfg, sets, tokenizer)
    checks.check_fits(model, longest, f"the longest pair of {cfg.dataset} (cut to max_length {cfg.max_length})",
                      f"pass --max-length {checks.max_positions(model)} or less")
    if not cfg.full:
        checks.check_lora_targets(model, cfg.lora_target_modules)
    sets.train_set = Dataset.from_list(sets.train)
    sets.eval_set = Dataset.from_list(sets.held_out) if sets.held_out else None
    ref_model = None
    if cfg.full:  # all weights train: the reference must be its own frozen copy of the start
        with oom_guard(STAGE):
            ref_model = load_base_causal(run, base, cfg.trust_remote_code)[0]
    return model, ref_model, tokenizer


def _trainer(cfg, begun, model, ref_model, tokenizer, sets: DPOPairs):
    """TRL's DPOTrainer with our settings and progress callback."""
    from trl import DPOConfig as TrlDPOConfig
    from trl import DPOTrainer

    from rlchat import models
    from rlchat.progress import TrainerProgress
    from rlchat.stages.common import trainer_args

    targs = trainer_args(cfg, begun.ckpt_dir, has_eval=sets.eval_set is not None)
    if sets.eval_set is not None and not cfg.eval_steps:
        targs.update(eval_strategy="steps", eval_steps=0.1)  # ten held-out points over the run, as train-reward
    args = TrlDPOConfig(
        **targs,
        beta=cfg.beta,
        loss_type=[cfg.loss_type],
        label_smoothing=cfg.label_smoothing,
        max_length=cfg.max_length,
        truncation_mode="keep_start",  # TRL 1.16 deprecates keep_end; over-long pairs were counted above
        trust_remote_code=cfg.trust_remote_code,
        disable_dropout=True,
        dataset_num_proc=None,
    )
    peft_config = None if cfg.full else models.lora_config(
        cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules, task_type="CAUSAL_LM")
    progress = TrainerProgress(begun.stage_dir / "metrics.jsonl", STAGE,
                               show_keys=("loss", "rewards/margins", "eval_rewards/accuracies"))
    # ref_model None with a PEFT policy: TRL computes the reference with the adapter disabled (no second model)
    return DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=sets.train_set,
                      eval_dataset=sets.eval_set, processing_class=tokenizer, peft_config=peft_config,
                      callbacks=[progress])


def _write_outputs(cfg, run, begun, base, tokenizer) -> dict:
    """tokenizer/ and the adapter's base name (main process); the manifest's `outputs`."""
    from rlchat.fileio import atomic_dir, atomic_write_json
    from rlchat.models import read_json_object
    from rlchat.stages.common import trained_outputs

    with atomic_dir(begun.stage_dir / "tokenizer") as tmp:
        tokenizer.save_pretrained(tmp)
    if not cfg.full:
        # the model it was trained on as a plain directory (RUN/sft/merged or model, or --model): peft's
        # AutoPeftModelForCausalLM.from_pretrained(RUN/dpo/adapter) then loads it offline, without rlchat
        adapter_cfg = begun.stage_dir / "adapter" / "adapter_config.json"
        config = read_json_object(adapter_cfg)
        config["base_model_name_or_path"] = adapter_base_name(run, cfg.model)
        atomic_write_json(adapter_cfg, config)
    outputs = trained_outputs(STAGE, cfg.full)
    return {**outputs, "policy": outputs["model"] or outputs["adapter"], "base": base.name,
            "base_hash": base.hash, "metrics": f"{STAGE}/metrics.jsonl"}
