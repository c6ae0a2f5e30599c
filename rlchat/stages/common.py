"""Plumbing shared by the trainer-based stages (sft, reward): TRL config arguments, checkpoints, lifecycle.

- `trainer_args(cfg, out_dir, has_eval)`: the TrainingArguments keywords every stage sets the same way
  (explicit bf16/fp32 choice: TRL's default bf16=True fails on CPU; gradient checkpointing only when asked;
  safetensors checkpoints; our own progress bar instead of tqdm).
- `last_complete_checkpoint(dir)`: the newest `checkpoint-N` whose `trainer_state.json` parses. The Trainer writes
  that file last, so a checkpoint killed mid-write is skipped and the previous one is used.
- `stage_lifecycle(run, stage, ...)`: marks the stage failed in the manifest if anything raises.
"""
from __future__ import annotations

import json
import re
from contextlib import contextmanager
from pathlib import Path


def trainer_args(cfg, out_dir: Path, has_eval: bool) -> dict:
    from rlchat.models import use_bf16

    import torch

    eval_steps = getattr(cfg, "eval_steps", None)
    args = dict(
        output_dir=str(out_dir),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps if cfg.max_steps and cfg.max_steps > 0 else -1,
        learning_rate=cfg.lr,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        eval_strategy=("steps" if eval_steps else "epoch") if has_eval else "no",
        eval_steps=eval_steps if has_eval and eval_steps else None,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to=[] if cfg.report_to == "none" else [cfg.report_to],
        bf16=use_bf16(),
        fp16=False,
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=bool(cfg.gradient_checkpointing),
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=True,
    )
    if cfg.report_to == "tensorboard":
        args["logging_dir"] = str(out_dir.parent / "tensorboard")
    return args


def last_complete_checkpoint(ckpt_dir: Path) -> Path | None:
    """Newest `checkpoint-N` in ckpt_dir whose trainer_state.json is complete JSON, or None."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None
    found = []
    for p in ckpt_dir.iterdir():
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    for _, path in sorted(found, reverse=True):
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue  # killed while this checkpoint was being written: fall back to an older one
        return path
    return None


@contextmanager
def stage_lifecycle(run, stage: str):
    """Mark the stage failed (with the error) if the body raises, then re-raise."""
    try:
        yield
    except BaseException as err:  # KeyboardInterrupt too: the manifest must not say "running" forever
        try:
            run.fail_stage(stage, f"{type(err).__name__}: {err}"[:500])
        except Exception:  # noqa: BLE001 - never mask the original error
            pass
        raise


def drop_printer(trainer) -> None:
    """With disable_tqdm the Trainer prints every log dict to stdout; our progress bar and metrics.jsonl replace it
    (and stdout must stay clean for --json)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)


def quiet_libraries() -> None:
    """Silence library chatter that is noise for a CLI user (warnings stay for real problems)."""
    import logging
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # "Writing model shards" bars on every save
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass
    logging.getLogger("datasets").setLevel(logging.ERROR)
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", message=".*TRLExperimentalWarning.*")
