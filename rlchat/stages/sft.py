"""`rlchat sft`: supervised fine-tuning with TRL's SFTTrainer.

What it does, in order:
  1. validate: config (done by the CLI), the run directory (a finished stage needs --overwrite), the dataset
     (loads, detects the TRL format: messages / prompt+completion / text), the model and tokenizer.
     Nothing is written to the run directory before all of this passed.
  2. begin the stage in the manifest (RUN/run.json) and train: LoRA by default, --full for all weights; loss on
     assistant tokens only for conversations (completion tokens only for prompt+completion);
     eval loss on the held-out fraction before and after.
  3. write RUN/sft/: adapter/ (PEFT) or model/ (full, safetensors), tokenizer/, metrics.jsonl, config.yaml,
     and the final metrics into the manifest. Every output directory is written atomically (tmp dir + rename).

Resume: checkpoints go to RUN/sft/checkpoints/ every --save-steps; the same command after a kill resumes from the
newest complete checkpoint. Outputs (manifest `outputs`): kind ("lora" | "full"), adapter, model, tokenizer,
base_model. `rlchat.models.load_sft_policy` reads exactly these.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from rlchat.errors import ConfigError, RunDirError


def check_resume_matches(run, cfg, inputs: dict) -> None:
    """RunDirError when a resume would continue checkpoints trained on another model, dataset or weight layout."""
    from rlchat.stages.common import check_resume_settings

    old_inputs = (run.record("sft") or {}).get("inputs") or {}
    for name in ("model", "dataset"):
        was, now = old_inputs.get(name) or {}, inputs[name]
        if was and (was.get("spec") != now.get("spec") or was.get("hash") != now.get("hash")):
            raise RunDirError(f"cannot resume the sft stage in {run.path}: its checkpoints were trained on {name} "
                              f"{was.get('spec')}, which differs from {now.get('spec')} (or changed since)",
                              "rerun with the same --model and --dataset to resume, or add --overwrite to start "
                              "afresh")
    check_resume_settings(run, "sft", cfg)


try:
    from transformers import TrainerCallback as _Callback
except ImportError:  # pragma: no cover
    _Callback = object


class _EvalBefore(_Callback):
    """Trainer callback: keeps the eval loss of the first evaluation (eval_on_start, before any step) and, on the
    main process, writes it to eval_before.json so a resumed run still knows it."""

    def __init__(self, path: Path | None):
        self.path = path
        self.eval_loss = None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        from rlchat.rundir import atomic_write_json

        if self.eval_loss is None and metrics and "eval_loss" in metrics:
            self.eval_loss = metrics["eval_loss"]
            if self.path is not None:
                atomic_write_json(self.path, {"eval_loss": self.eval_loss})


def run(cfg) -> dict:
    from rlchat import data, dist, models
    from rlchat.config import to_dict, to_yaml
    from rlchat.progress import TrainerProgress, console
    from rlchat.rundir import RunDir, atomic_dir, atomic_write_json, atomic_write_text, input_record
    from rlchat.stages.common import (drop_printer, final_step, last_complete_checkpoint, oom_guard, prepare_resume,
                                      quiet_libraries, save_trained, stage_lifecycle, train_or_restore,
                                      trainer_args)

    t_start = time.time()
    # 1. validate everything before the first write
    if not cfg.model:
        raise ConfigError("sft needs a base model", "pass --model (a Hub id or a local directory) or set `model:` "
                          "in the recipe")
    if not cfg.dataset:
        raise ConfigError("sft needs a dataset", "pass --dataset (a .jsonl/.json/.parquet/.csv file, a "
                          "save_to_disk directory or a Hub id)")
    run = RunDir(cfg.run_dir)
    mode = run.check_can_start("sft", cfg.overwrite)
    inputs = {"model": input_record(cfg.model), "dataset": input_record(cfg.dataset)}
    if mode == "resume":
        check_resume_matches(run, cfg, inputs)
    ds = data.load_any(cfg.dataset, split=cfg.split, config=cfg.dataset_config)
    fmt = data.detect_sft_format(ds, cfg.dataset)
    console.print(f"[bold]sft[/] dataset {cfg.dataset}: {data.describe(ds, fmt)}", highlight=False)
    train_ds, eval_ds = data.split_eval(ds, cfg.eval_fraction, cfg.seed)
    quiet_libraries()
    with oom_guard("sft"):
        model = models.load_causal_lm(cfg.model, trust_remote_code=cfg.trust_remote_code)  # checks it is a causal LM
    tokenizer = models.load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)

    # 2. train
    old_config = (run.record("sft") or {}).get("config") if mode == "resume" else None
    stage_dir = run.begin_stage("sft", config=to_dict(cfg), inputs=inputs, parent=None, overwrite=cfg.overwrite)
    main = dist.is_main()  # under accelerate launch only the main process writes
    with stage_lifecycle(run, "sft"), oom_guard("sft"):
        if main:
            atomic_write_text(stage_dir / "config.yaml", to_yaml(cfg))
        from trl import SFTConfig as TrlSFTConfig
        from trl import SFTTrainer

        ckpt_dir = stage_dir / "checkpoints"
        resume_from = last_complete_checkpoint(ckpt_dir) if mode == "resume" else None
        if mode == "resume" and main:
            prepare_resume(stage_dir, resume_from)  # drop what the killed run left half-done
        dist.barrier()
        before_path = stage_dir / "eval_before.json"
        known_before = resume_from is not None and before_path.exists()
        args = TrlSFTConfig(
            **trainer_args(cfg, ckpt_dir, has_eval=eval_ds is not None),
            # the eval loss before training comes from the trainer's own first evaluation, not from a
            # trainer.evaluate() call before train(): in transformers 5.24 that call leaves the model unwrapped
            # by DDP in train(), so the processes' gradients are never averaged (measured: they drift apart)
            eval_on_start=eval_ds is not None and not known_before,
            max_length=cfg.max_length,
            packing=cfg.packing,
            assistant_only_loss=bool(cfg.assistant_only_loss and fmt == "messages"),
            completion_only_loss=True if fmt == "prompt_completion" else None,
            dataset_num_proc=None,
        )
        peft_config = None if cfg.full else models.lora_config(
            cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules, task_type="CAUSAL_LM")
        progress = TrainerProgress(stage_dir / "metrics.jsonl", "sft")
        before = _EvalBefore(before_path if main else None)
        trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                             processing_class=tokenizer, peft_config=peft_config, callbacks=[progress, before])
        drop_printer(trainer)
        trainable, total = models.count_parameters(trainer.model)

        if resume_from is not None:
            console.print(f"[yellow]sft: resuming from {resume_from.name}[/]")
        result = train_or_restore(trainer, resume_from, final_step(cfg, old_config, resume_from))
        eval_before = None
        if eval_ds is not None:
            eval_before = (json.loads(before_path.read_text()).get("eval_loss") if known_before
                           else before.eval_loss)
        final_eval = trainer.evaluate() if eval_ds is not None else {}
        eval_after = final_eval.get("eval_loss")

        # 3. write outputs atomically (main process; the others wait, then leave)
        if cfg.full:  # a standalone model dir: weights + tokenizer
            save_trained(trainer, stage_dir / "model", full=True, tokenizer=tokenizer)
        else:
            save_trained(trainer, stage_dir / "adapter", full=False)
        if main:
            with atomic_dir(stage_dir / "tokenizer") as tmp:
                tokenizer.save_pretrained(tmp)

        wall = time.time() - t_start
        metrics = {
            "eval_loss": eval_after,
            "eval_loss_before": eval_before,
            "eval_token_accuracy": final_eval.get("eval_mean_token_accuracy"),
            "train_loss": result.training_loss,
            "steps": trainer.state.global_step,
            "n_train": len(train_ds),
            "n_eval": len(eval_ds) if eval_ds is not None else 0,
            "processes": dist.world_size(),
            "format": fmt,
            "trainable_params": trainable,
            "total_params": total,
            "resumed_from": resume_from.name if resume_from else None,
            "wall_s": round(wall, 1),
        }
        outputs = {
            "kind": "full" if cfg.full else "lora",
            "adapter": None if cfg.full else "sft/adapter",
            "model": "sft/model" if cfg.full else None,
            "tokenizer": "sft/tokenizer",
            # absolute for local bases, so later stages find it from any working directory
            "base_model": str(Path(cfg.model).resolve()) if models.is_local(cfg.model) else cfg.model,
            "metrics": "sft/metrics.jsonl",
        }
        run.finish_stage("sft", metrics=metrics, outputs=outputs)

    where = outputs["model"] or outputs["adapter"]
    loss_text = (f"eval loss {eval_before:.3f} -> {eval_after:.3f}" if eval_after is not None and eval_before
                 is not None else f"train loss {result.training_loss:.3f}")
    metrics["summary"] = (f"{loss_text} in {wall:.0f}s ({metrics['steps']} steps, {len(train_ds)} rows, {fmt}); "
                          f"{outputs['kind']} weights at {run.path / where}")
    return metrics
