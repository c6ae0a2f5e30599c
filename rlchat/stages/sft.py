"""`rlchat sft`: supervised fine-tuning with TRL's SFTTrainer.

What it does, in order:
  1. validate: config (done by the CLI), the run directory (a finished stage needs --overwrite), the dataset
     (loads, detects the TRL format: messages / prompt+completion / text; plain prompt+completion strings are read
     as one-turn chats, as PPO renders them: rlchat/one_turn.py), the model and tokenizer.
     Nothing is written to the run directory before all of this passed.
  2. begin the stage in the manifest (RUN/run.json) and train: LoRA by default, --full for all weights; loss on
     assistant tokens only for conversations (completion tokens only for prompt+completion): TRL masks them through
     the chat template's {% generation %} markers, or rlchat/assistant_mask.py when TRL cannot patch the template;
     eval loss on the held-out fraction before and after.
  3. write RUN/sft/: adapter/ (PEFT) or model/ (full, safetensors), tokenizer/, metrics.jsonl, config.yaml,
     and the final metrics into the manifest. Every output directory is written atomically (tmp dir + rename).

Resume: checkpoints go to RUN/sft/checkpoints/ every --save-steps; the same command after a kill resumes from the
newest complete checkpoint. Outputs (manifest `outputs`): kind ("lora" | "full"), adapter, model, tokenizer,
base_model. `rlchat.run_models.load_sft_policy` reads exactly these.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from rlchat.errors import ConfigError, DataError, RunDirError
from rlchat.models import with_load_settings


def check_resume_matches(run, cfg, inputs: dict) -> None:
    """RunDirError when a resume would continue checkpoints trained on another model, dataset or weight layout."""
    from rlchat.stages.resume import check_resume_settings

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
        from rlchat.fileio import atomic_write_json

        if self.eval_loss is None and metrics and "eval_loss" in metrics:
            self.eval_loss = metrics["eval_loss"]
            if self.path is not None:
                atomic_write_json(self.path, {"eval_loss": self.eval_loss})


@with_load_settings  # every model it loads: cfg.dtype, cfg.attn_implementation
def run(cfg) -> dict:
    """Fine-tune cfg.model on cfg.dataset into RUN/sft/; returns the final metrics (and a one-line "summary")."""
    from rlchat import dist, models
    from rlchat.progress import quiet_libraries
    from rlchat.stages.common import oom_guard, train, trainer_stage

    t_start = time.time()
    # 1. validate everything before the first write
    run, mode, inputs = _check_run(cfg)
    fmt, train_ds, eval_ds, rendering = _load_dataset(cfg)
    quiet_libraries()
    with oom_guard("sft"):
        model = models.load_causal_lm(cfg.model, trust_remote_code=cfg.trust_remote_code)  # checks it is a causal LM
    tokenizer = models.load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    _check_inputs(cfg, model, tokenizer, fmt, train_ds, eval_ds)
    train_ds, eval_ds, masks = _assistant_masks(cfg, tokenizer, fmt, train_ds, eval_ds)

    # 2. train
    with trainer_stage(run, "sft", cfg, mode, inputs, parent=None) as begun:
        before_path = begun.stage_dir / "eval_before.json"
        known_before = begun.resume_from is not None and before_path.exists()
        before = _EvalBefore(before_path if begun.is_main else None)
        trainer = _trainer(cfg, begun, model, tokenizer, (train_ds, eval_ds), fmt, masks, before,
                           known_before)
        result, trainable, total = train(trainer, begun, "sft", cfg)
        eval_before = None
        if eval_ds is not None:
            eval_before = (json.loads(before_path.read_text()).get("eval_loss") if known_before
                           else before.eval_loss)
        final_eval = trainer.evaluate() if eval_ds is not None else {}

        # 3. write outputs atomically (main process; the others wait, then leave)
        outputs = _save_outputs(cfg, trainer, begun, tokenizer)
        wall = time.time() - t_start
        metrics = {
            "eval_loss": final_eval.get("eval_loss"),
            "eval_loss_before": eval_before,
            "eval_token_accuracy": final_eval.get("eval_mean_token_accuracy"),
            "train_loss": result.training_loss,
            "steps": trainer.state.global_step,
            "n_train": len(train_ds),
            "n_eval": len(eval_ds) if eval_ds is not None else 0,
            "processes": dist.world_size(),
            "format": fmt,
            "rendering": rendering,
            "assistant_masks": masks,
            "trainable_params": trainable,
            "total_params": total,
            "resumed_from": begun.resume_from.name if begun.resume_from else None,
            "wall_s": round(wall, 1),
        }
        run.finish_stage("sft", metrics=metrics, outputs=outputs)

    where = outputs["model"] or outputs["adapter"]
    eval_after = metrics["eval_loss"]
    loss_text = (f"eval loss {eval_before:.3f} -> {eval_after:.3f}" if eval_after is not None and eval_before
                 is not None else f"train loss {result.training_loss:.3f}")
    metrics["summary"] = (f"{loss_text} in {wall:.0f}s ({metrics['steps']} steps, {len(train_ds)} rows, {fmt}); "
                          f"{outputs['kind']} weights at {run.path / where}")
    return metrics


def _check_run(cfg):
    """(run, mode, inputs): the settings sft needs, the run directory, and that a resume continues the same run."""
    from rlchat.fileio import input_record
    from rlchat.progress import check_report_to
    from rlchat.rundir import RunDir

    if not cfg.model:
        raise ConfigError("sft needs a base model", "pass --model (a Hub id or a local directory) or set `model:` "
                          "in the recipe")
    if not cfg.dataset:
        raise ConfigError("sft needs a dataset", "pass --dataset (a .jsonl/.json/.parquet/.csv file, a "
                          "save_to_disk directory or a Hub id)")
    check_report_to(cfg.report_to)  # a missing tracker package: one line now, not a traceback mid-training
    run = RunDir(cfg.run_dir)
    mode = run.check_can_start("sft", cfg.overwrite)
    inputs = {"model": input_record(cfg.model), "dataset": input_record(cfg.dataset)}
    if mode == "resume":
        check_resume_matches(run, cfg, inputs)
    return run, mode, inputs


def _check_inputs(cfg, model, tokenizer, fmt: str, train_ds, eval_ds) -> None:
    """What TRL and peft would otherwise find after the stage began: LoRA target modules the model lacks, rows the
    chat template refuses, chats without an assistant reply, lengths (rlchat/checks.py)."""
    from rlchat import checks
    from rlchat.progress import console

    if not cfg.full:
        checks.check_lora_targets(model, cfg.lora_target_modules)
    positions = checks.max_positions(model)
    assistant_only = bool(cfg.assistant_only_loss and fmt == "messages") or fmt == "prompt_completion"
    cut = 0
    for part in (train_ds, eval_ds):
        if part is not None:
            cut += checks.check_sft_rows(tokenizer, part, fmt, cfg.max_length, assistant_only, cfg.dataset,
                                         positions)
    if cut:
        console.print(f"[yellow]sft: {cut} rows have a prompt of max_length ({cfg.max_length}) tokens or more; "
                      "TRL drops them, since no trained token is left (raise --max-length)[/]", highlight=False)


def _load_dataset(cfg):
    """(format, train split, eval split or None, rendering) of cfg.dataset; DataError when it is not SFT data.
    Plain prompt-completion strings come back as one-turn chats (rendering "one-turn chat": rlchat/one_turn.py)."""
    from rlchat import data
    from rlchat.one_turn import ONE_TURN, SFT_NOTE, sft_as_chats
    from rlchat.progress import console

    ds = data.load_any(cfg.dataset, split=cfg.split, config=cfg.dataset_config)
    fmt = data.detect_sft_format(ds, cfg.dataset)
    console.print(f"[bold]sft[/] dataset {cfg.dataset}: {data.describe(ds, fmt)}", highlight=False)
    ds, rendering = sft_as_chats(ds, fmt)
    if rendering == ONE_TURN:
        console.print(f"[bold]sft[/] {SFT_NOTE}", highlight=False)
    if cfg.eval_split is None:
        train_ds, eval_ds = data.split_eval(ds, cfg.eval_fraction, cfg.seed)
    else:  # an explicit held-out split: all of `split` trains
        train_ds, eval_ds = ds, data.load_eval_split(cfg.dataset, cfg.eval_split, cfg.dataset_config)
        eval_fmt = data.detect_sft_format(eval_ds, f"{cfg.dataset} (split {cfg.eval_split})")
        if eval_fmt != fmt:
            raise DataError(f"eval_split '{cfg.eval_split}' of {cfg.dataset} is {eval_fmt} data, the training split "
                            f"is {fmt}", "evaluate on a split of the same format")
        console.print(f"[bold]sft[/] eval split {cfg.eval_split}: {data.describe(eval_ds, eval_fmt)}",
                      highlight=False)
        eval_ds = sft_as_chats(eval_ds, eval_fmt)[0]
    return fmt, train_ds, eval_ds, rendering


def _assistant_masks(cfg, tokenizer, fmt: str, train_ds, eval_ds):
    """(train_ds, eval_ds, masks) from assistant_mask.prepare, and the one log line saying who masks the assistant
    tokens; a chat template neither TRL nor rlchat can mask is a ModelError here, before the first write."""
    from rlchat.assistant_mask import prepare
    from rlchat.progress import console

    train_ds, eval_ds, masks = prepare(cfg, tokenizer, fmt, train_ds, eval_ds)
    if masks == "trl":
        console.print("[bold]sft[/] assistant-only loss: TRL masks the assistant tokens (chat template)",
                      highlight=False)
    elif masks == "rlchat":
        console.print("[bold]sft[/] assistant-only loss: rlchat masks the assistant tokens (TRL cannot patch this "
                      "chat template)", highlight=False)
    return train_ds, eval_ds, masks


def _trainer(cfg, begun, model, tokenizer, datasets: tuple, fmt: str, masks: str | None, before,
             known_before: bool):
    """TRL's SFTTrainer with our settings, progress callback and eval-before callback. `masks` (_assistant_masks):
    "trl" lets TRL mask the assistant tokens from the chat template; with "rlchat" the datasets are pre-tokenized
    with `assistant_masks` (rlchat/assistant_mask.py), which TRL turns into labels without assistant_only_loss."""
    from trl import SFTConfig as TrlSFTConfig
    from trl import SFTTrainer

    from rlchat import models
    from rlchat.progress import TrainerProgress
    from rlchat.stages.common import trainer_args

    train_ds, eval_ds = datasets
    args = TrlSFTConfig(
        **trainer_args(cfg, begun.ckpt_dir, has_eval=eval_ds is not None),
        # the eval loss before training comes from the trainer's own first evaluation, not from a
        # trainer.evaluate() call before train(): in transformers 5.24 that call leaves the model unwrapped
        # by DDP in train(), so the processes' gradients are never averaged (measured: they drift apart)
        eval_on_start=eval_ds is not None and not known_before,
        max_length=cfg.max_length,
        packing=cfg.packing,
        assistant_only_loss=masks == "trl",
        completion_only_loss=True if fmt == "prompt_completion" else None,
        dataset_num_proc=None,
    )
    peft_config = None if cfg.full else models.lora_config(
        cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules, task_type="CAUSAL_LM")
    progress = TrainerProgress(begun.stage_dir / "metrics.jsonl", "sft")
    return SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                      processing_class=tokenizer, peft_config=peft_config, callbacks=[progress, before])


def _save_outputs(cfg, trainer, begun, tokenizer) -> dict:
    """RUN/sft/adapter (or model) and tokenizer, atomically; the manifest's `outputs`."""
    from rlchat import models
    from rlchat.fileio import atomic_dir
    from rlchat.stages.common import save_trained, trained_outputs

    base_model = str(Path(cfg.model).resolve()) if models.is_local(cfg.model) else cfg.model
    if cfg.full:  # a standalone model dir: weights + tokenizer
        save_trained(trainer, begun.stage_dir / "model", full=True, tokenizer=tokenizer)
    else:
        save_trained(trainer, begun.stage_dir / "adapter", full=False)
    if begun.is_main:
        with atomic_dir(begun.stage_dir / "tokenizer") as tmp:
            tokenizer.save_pretrained(tmp)
        if not cfg.full:
            _write_merged(cfg, begun.stage_dir, base_model, tokenizer)
    return {
        **trained_outputs("sft", cfg.full),
        "merged": None if cfg.full else "sft/merged",
        # absolute for local bases, so later stages find it from any working directory
        "base_model": base_model,
        "metrics": "sft/metrics.jsonl",
    }


def _write_merged(cfg, stage_dir: Path, base_model: str, tokenizer) -> None:
    """After LoRA SFT: the adapter names its base by absolute path (stock peft then loads it offline from any
    directory), and RUN/sft/merged/ holds the base with the adapter merged, a plain model + tokenizer. The reward
    and PPO adapters are trained on exactly that model and name it as their base, so
    AutoPeftModelForCausalLM.from_pretrained("RUN/ppo/policy") works without rlchat (README: loading the
    artifacts). It costs one copy of the weights on disk."""
    from rlchat import models
    from rlchat.export import checkpoint_dtype, ready_to_serve
    from rlchat.fileio import atomic_dir, atomic_write_json
    from rlchat.run_models import merge_sft_adapter

    adapter_dir = stage_dir / "adapter"
    adapter_cfg = models.read_json_object(adapter_dir / "adapter_config.json")
    adapter_cfg["base_model_name_or_path"] = base_model
    atomic_write_json(adapter_dir / "adapter_config.json", adapter_cfg)
    merged = merge_sft_adapter(base_model, adapter_dir, tokenizer, cfg.trust_remote_code)
    merged = ready_to_serve(merged, tokenizer, checkpoint_dtype(base_model, cfg.trust_remote_code))
    with atomic_dir(stage_dir / "merged") as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
