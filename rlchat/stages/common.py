"""Plumbing shared by the stages: TRL config arguments, lifecycle, resource errors (resume: stages/resume.py).

- `trainer_args(cfg, out_dir, has_eval)`: the TrainingArguments keywords sft and reward set the same way
  (explicit bf16/fp32 choice: TRL's default bf16=True fails on CPU; gradient checkpointing only when asked;
  safetensors checkpoints; our own progress bar instead of tqdm; tracker files inside RUN/<stage>/).
- checkpoints and resume (finding the newest complete checkpoint, cleaning up after a kill, the resume
  settings checks) live in rlchat/stages/resume.py.
- `train_or_restore(trainer, resume_from, end_step)`: trainer.train() resuming from the checkpoint, except when
  that checkpoint is already the last step (restored without training: transformers would add a step).
- `stage_lifecycle(run, stage)`: marks the stage failed (or "interrupted" on Ctrl-C / SIGTERM) in the manifest if
  anything raises; known library errors become one-line RlchatErrors (`known_error`: a full disk, a read-only run
  directory, running out of memory, a refused checkpoint pickle, a chat template error), anything else becomes one
  line naming RUN/<stage>/error.log, where the full traceback is (the last line of defence).
- `trainer_stage(run, stage, cfg, mode, inputs, parent)` and `train(trainer, begun, stage)`: the opening and the
  training call that sft and reward share (begin the stage, config.yaml, clean up after a kill, find the checkpoint
  to resume from; then drop the Trainer's printer, count parameters, train or restore).
- `oom_guard(stage)`: out-of-memory errors (torch.OutOfMemoryError, "CUDA out of memory" RuntimeErrors,
  MemoryError) as one-line errors that name the flags that lower memory use.
"""
from __future__ import annotations

import errno
import json
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rlchat.errors import RlchatError, RunDirError, first_line
from rlchat.stages.resume import drop_pickled_args, final_step, last_complete_checkpoint, prepare_resume

# Flags that lower peak memory, per stage (named in the out-of-memory error).
OOM_KNOBS = {
    "sft": "lower --batch-size (raise --grad-accum to keep the effective batch), lower --max-length, or pass "
           "--gradient-checkpointing",
    "reward": "lower --batch-size (raise --grad-accum to keep the effective batch), lower --max-length, or pass "
              "--gradient-checkpointing",
    "ppo": "lower --batch-size or split it with --mini-batches / --grad-accum, lower --response-length or "
           "--max-prompt-length, or pass --gradient-checkpointing",
    "eval": "lower --batch-size or --max-new-tokens",
    "dpo": "lower --batch-size (raise --grad-accum to keep the effective batch), lower --max-length, or pass "
           "--gradient-checkpointing",
}
RESUMABLE = ("sft", "reward", "ppo", "dpo")  # stages that keep checkpoints
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


class OutOfMemory(RlchatError):
    """The accelerator (or the host) ran out of memory; the fix names the flags that need less."""


def trainer_args(cfg, out_dir: Path, has_eval: bool) -> dict:
    from rlchat.models import use_bf16

    import torch

    eval_steps = getattr(cfg, "eval_steps", None)
    args = dict(
        output_dir=str(out_dir),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps if cfg.max_steps and cfg.max_steps > 0 else -1,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.lr_scheduler,
        # transformers 5 reads a float < 1 as a fraction of the steps (warmup_ratio is deprecated); config
        # validation allows one of the two
        warmup_steps=cfg.warmup_steps or cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
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
        # mixed precision: bfloat16 autocast on a GPU that has it, unless --dtype float32 asks for full precision
        bf16=use_bf16() and getattr(cfg, "dtype", "auto") != "float32",
        fp16=False,
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=bool(cfg.gradient_checkpointing),
        disable_tqdm=True,
        # every trainable parameter (LoRA matrices, a reward score head, or all weights) gets a gradient each
        # step; transformers' default (True for a PeftModel) makes DDP warn about it once per process
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        remove_unused_columns=True,
    )
    if cfg.report_to == "tensorboard":
        # transformers 5 dropped TrainingArguments.logging_dir: its TensorBoardCallback reads this variable (when
        # the Trainer is built), so the event files land in RUN/<stage>/tensorboard as ppo's do
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(out_dir.parent / "tensorboard")
    if cfg.report_to == "wandb":  # wandb writes its files to ./wandb unless told: keep them in RUN/<stage>/
        os.environ.setdefault("WANDB_DIR", str(out_dir.parent))
    return args


def train_or_restore(trainer, resume_from: Path | None, end_step: int | None):
    """trainer.train(), resuming from `resume_from` (or from scratch); returns its TrainOutput.

    A checkpoint that already reached `end_step` (the run was killed after its last training step, while writing
    the outputs) is restored without training: transformers 5 would run one step past max_steps when resuming
    from it (it checks max_steps only after a step)."""
    from transformers.trainer_callback import TrainerState
    from transformers.trainer_utils import TrainOutput

    if resume_from is not None and end_step is not None:
        state_path = Path(resume_from) / "trainer_state.json"
        if json.loads(state_path.read_text(encoding="utf-8")).get("global_step", 0) >= end_step:
            trainer._load_from_checkpoint(str(resume_from))
            trainer.state = TrainerState.load_from_json(str(state_path))
            losses = [h["loss"] for h in trainer.state.log_history if isinstance(h.get("loss"), (int, float))]
            loss = sum(losses) / len(losses) if losses else float("nan")
            return TrainOutput(trainer.state.global_step, loss, {})
    return trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)


def is_oom(err: BaseException) -> bool:
    """True for torch.OutOfMemoryError (CUDA, MPS), RuntimeErrors that say "out of memory", and MemoryError."""
    if isinstance(err, MemoryError):
        return True
    torch = sys.modules.get("torch")
    oom_type = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if oom_type is not None and isinstance(err, oom_type):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


def _says_disk_full(err: BaseException) -> bool:
    text = str(err)
    return "No space left on device" in text or "StorageFull" in text or "Disk quota exceeded" in text


def resource_error(stage: str, err: BaseException) -> RlchatError | None:
    """`err` as a one-line RlchatError when it is a resource problem (out of memory, full disk, read-only or
    unwritable run directory), else None."""
    if isinstance(err, RlchatError):
        return None
    if is_oom(err):
        what = first_line(err) if not isinstance(err, MemoryError) else "host memory exhausted"
        knobs = OOM_KNOBS.get(stage, "lower --batch-size")
        then = ("then rerun: it resumes from the last checkpoint" if stage in RESUMABLE else "then rerun")
        return OutOfMemory(f"{stage} ran out of memory ({what[:200]})", f"{knobs}; {then}")
    if not isinstance(err, OSError) and _says_disk_full(err):
        # safetensors' writer reports a full disk as SafetensorError("... No space left on device ..."), not OSError
        err = OSError(errno.ENOSPC, "No space left on device")
    if isinstance(err, OSError) and err.errno in DISK_ERRNOS:
        where = err.filename or "the run directory"
        kept = ("the last complete checkpoint is kept and the same command resumes from it" if stage in RESUMABLE
                else "then rerun; finished stages are unchanged")
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            reason = "no space left on device" if err.errno == errno.ENOSPC else "disk quota exceeded"
            return RunDirError(f"{stage} could not write {where}: {reason}",
                               f"free some disk space (or move the run directory to a bigger disk); {kept}")
        if err.errno == errno.EROFS:
            return RunDirError(f"{stage} could not write {where}: read-only file system",
                               f"use a run directory on a writable file system; {kept}")
        return RunDirError(f"{stage} could not access {where}: permission denied",
                           f"check the permissions of the run directory and its files; {kept}")
    return None


@contextmanager
def oom_guard(stage: str):
    """Turn out-of-memory errors raised in the block into `OutOfMemory` (one line, naming the stage's memory
    flags). Other errors pass through unchanged.

        with oom_guard("ppo"):
            ...  # generate, forward, backward
    """
    try:
        yield
    except BaseException as err:  # noqa: BLE001 - only OOM errors are converted
        if is_oom(err):
            raise resource_error(stage, err) from None
        raise


def refused_pickle_text(err: BaseException) -> str:
    """What torch's safe loader refused ("Unsupported global: GLOBAL argparse.Namespace was not an allowed global by
    default"), from its "Weights only load failed" message, WITHOUT its advice to re-run with weights_only=False or
    to allowlist the class (both would turn the protection off); one line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s*Please use|\.\s|$)", text, re.S)
    if found:
        text = found.group(1)
    else:
        for cut in ("Weights only load failed", "Re-running", "In PyTorch 2.6", "Check the documentation"):
            text = text.split(cut)[0] if cut != "Weights only load failed" else text.replace(cut, "")
    text = " ".join(text.split()).strip(" .")
    return (text or type(err).__name__)[:300]


def known_error(stage: str, err: BaseException) -> RlchatError | None:
    """`err` (raised by a library inside a stage) as a one-line RlchatError when its cause is known: resources
    (`resource_error`), a checkpoint refused by torch's safe loader, a chat template that rejects the data.
    None for anything else (the last line of defence in `stage_lifecycle` reports it with its traceback)."""
    converted = resource_error(stage, err)
    if converted is not None:
        return converted
    import pickle

    if isinstance(err, pickle.UnpicklingError):
        return RunDirError(f"{stage} refused to load a checkpoint file: it holds objects torch's safe loader "
                           f"(weights_only=True) does not accept ({refused_pickle_text(err)})",
                           "rlchat only loads what it wrote; delete that checkpoint directory to resume from the "
                           "one before it, or rerun with --overwrite")
    jinja = sys.modules.get("jinja2")
    if jinja is not None and isinstance(err, jinja.TemplateError):
        return RlchatError(f"{stage}: the chat template rejected a row of the dataset ({type(err).__name__}: "
                           f"{first_line(err)[:200]})", "check the roles and content of the dataset's chats "
                           "(system/user/assistant), or give the model a tokenizer whose template accepts them")
    return None


@contextmanager
def stage_lifecycle(run, stage: str):
    """Mark the stage failed (with the error) if the body raises, then re-raise it as one line.

    - Ctrl-C / SIGTERM (KeyboardInterrupt, errors.Terminated): the stage is marked "interrupted" (the same command
      resumes it) and the interrupt goes on to the CLI, which prints the `interrupted:` line and exits 130 / 143.
    - known library errors (out of memory, no space left, a read-only run directory, a refused checkpoint pickle,
      a chat template error) become one-line RlchatErrors (`known_error`);
    - anything else is the last line of defence: the full traceback goes to RUN/<stage>/error.log and the error
      becomes errors.UnexpectedError (one line naming the stage, the error and the log; exit code 1).
    The line the user sees is the one recorded in run.json."""
    from rlchat import dist
    from rlchat.errors import INTERRUPTED, unexpected

    try:
        yield
    except KeyboardInterrupt:
        try:
            run.fail_stage(stage, INTERRUPTED, status="interrupted")
        except Exception:  # noqa: BLE001 - never mask the interrupt
            pass
        raise
    except BaseException as err:
        if isinstance(err, RlchatError):
            converted = err
        elif not isinstance(err, Exception):  # SystemExit, GeneratorExit: not errors of the stage
            converted = None
        else:
            converted = known_error(stage, err)
            if converted is None:
                log_path = run.stage_dir(stage) / "error.log" if dist.is_main() else None
                converted = unexpected(f"stage '{stage}'", err, log_path)
        text = converted.one_line() if converted is not None else f"{type(err).__name__}: {err}"
        try:
            run.fail_stage(stage, text[:500])
        except Exception:  # noqa: BLE001 - never mask the original error
            pass
        if converted is not None and converted is not err:
            raise converted from err
        raise


@dataclass
class Begun:
    """A TRL stage once `trainer_stage` began it."""

    stage_dir: Path                 # RUN/<stage>
    ckpt_dir: Path                  # RUN/<stage>/checkpoints: the Trainer's output_dir
    resume_from: Path | None        # the newest complete checkpoint when resuming, else None
    old_config: dict | None         # the config the interrupted run recorded (resume only)
    is_main: bool                   # the only process that writes


@contextmanager
def trainer_stage(run, stage: str, cfg, mode: str, inputs: dict, parent: str | None):
    """Begin a Trainer-based stage (the first write) and hold it: yields a `Begun` inside `stage_lifecycle` and
    `oom_guard`, after config.yaml is written and, on resume, what the killed run left half-done is removed.

        with trainer_stage(run, "sft", cfg, mode, inputs, parent=None) as begun:
            trainer = SFTTrainer(..., args=TrlSFTConfig(**trainer_args(cfg, begun.ckpt_dir, has_eval)))
            result, trainable, total = train(trainer, begun, "sft", cfg)
    """
    from rlchat import dist
    from rlchat.config import to_dict, to_yaml
    from rlchat.fileio import atomic_write_text

    old_config = (run.record(stage) or {}).get("config") if mode == "resume" else None
    stage_dir = run.begin_stage(stage, config=to_dict(cfg), inputs=inputs, parent=parent, overwrite=cfg.overwrite)
    is_main = dist.is_main()  # under accelerate launch only the main process writes
    with stage_lifecycle(run, stage), oom_guard(stage):
        if is_main:
            atomic_write_text(stage_dir / "config.yaml", to_yaml(cfg))
        ckpt_dir = stage_dir / "checkpoints"
        resume_from = last_complete_checkpoint(ckpt_dir) if mode == "resume" else None
        if mode == "resume" and is_main:
            prepare_resume(stage_dir, resume_from)  # drop what the killed run left half-done
        dist.barrier()
        yield Begun(stage_dir, ckpt_dir, resume_from, old_config, is_main)


try:
    from transformers import TrainerCallback as _Callback
except ImportError:  # pragma: no cover
    _Callback = object


class _DropPickledArgs(_Callback):
    """After each checkpoint save: remove the Trainer's training_args.bin pickle (see stages/resume.py's PICKLED_ARGS)."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            drop_pickled_args(Path(args.output_dir))


def train(trainer, begun: Begun, stage: str, cfg):
    """Train (resuming from begun.resume_from) with our progress bar only; (TrainOutput, trainable, total)."""
    from rlchat.models import count_parameters
    from rlchat.progress import console

    drop_printer(trainer)
    trainer.add_callback(_DropPickledArgs())
    trainable, total = count_parameters(trainer.model)
    if begun.resume_from is not None:
        console.print(f"[yellow]{stage}: resuming from {begun.resume_from.name}[/]")
    result = train_or_restore(trainer, begun.resume_from, final_step(cfg, begun.old_config, begun.resume_from))
    return result, trainable, total


def trained_outputs(stage: str, full: bool) -> dict:
    """The manifest `outputs` every Trainer stage starts with: kind, adapter or model dir, tokenizer dir."""
    return {"kind": "full" if full else "lora", "adapter": None if full else f"{stage}/adapter",
            "model": f"{stage}/model" if full else None, "tokenizer": f"{stage}/tokenizer"}


def is_sharded(trainer) -> bool:
    """True when the trained weights are split across processes (DeepSpeed ZeRO-3 or FSDP): saving them then
    needs every process (the trainer gathers the shards), not only the main one."""
    acc = trainer.accelerator
    kind = acc.distributed_type.name
    if kind == "FSDP":
        return True
    if kind == "DEEPSPEED":
        plugin = acc.state.deepspeed_plugin
        return bool(plugin is not None and plugin.zero_stage == 3)
    return False


def save_trained(trainer, final: Path, full: bool, tokenizer=None) -> None:
    """Write the trained model (full: weights + config; else the PEFT adapter) to `final` atomically.

    One process, DDP or ZeRO-2: the main process saves the unwrapped model (save_pretrained, safetensors).
    ZeRO-3 / FSDP: every process calls trainer.save_model on the same tmp directory (the shards are gathered,
    the main process writes), then the main process drops the trainer's pickled training_args.bin and renames
    the directory into place. `tokenizer` is saved alongside when given.
    """
    from rlchat import dist
    from rlchat.fileio import atomic_dir

    is_main = dist.is_main()
    if not is_sharded(trainer):
        if is_main:
            with atomic_dir(final) as tmp:
                model = trainer.accelerator.unwrap_model(trainer.model)
                model.save_pretrained(tmp, safe_serialization=True)
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp)
        return
    if is_main:
        with atomic_dir(final) as tmp:
            dist.broadcast_object(str(tmp))
            trainer.save_model(str(tmp))  # collective: gathers the shards
            for name in ("training_args.bin",):  # a pickle: rlchat writes safetensors/JSON only
                (tmp / name).unlink(missing_ok=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            dist.barrier()
    else:
        tmp = dist.broadcast_object(None)
        trainer.save_model(tmp)
        dist.barrier()


def drop_printer(trainer) -> None:
    """With disable_tqdm the Trainer prints every log dict to stdout; our progress bar and metrics.jsonl replace it
    (and stdout must stay clean for --json)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
