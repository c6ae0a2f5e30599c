"""Checkpoints and resume, shared by the stages (stages-internal: only rlchat/stages/ imports it).

- `last_complete_checkpoint(dir)`: the newest `checkpoint-N` that is complete (`checkpoint_problem`): its
  trainer_state.json parses (the Trainer writes it last), its safetensors files are whole and its torch-saved
  files are readable archives. A checkpoint killed mid-write is skipped and the previous one is used.
- `prepare_resume(stage_dir, resume_from)`: before a resumed (or restarted) run trains, removes what the killed
  process left half-done (`remove_leftovers`: tmp files and directories; incomplete checkpoints) and the metrics
  rows it logged after the checkpoint, so metrics.jsonl reads as one uninterrupted run.
- `check_resume_settings(run, stage, cfg)` (sft, reward, dpo), `check_resume_inputs` (reward, dpo: the same base
  and pairs) and `check_ppo_resumable` / `check_ppo_resume_settings`
  (ppo): a resume with settings its checkpoints cannot continue is refused, naming the old values as flags.
- `final_step`: the step a training ends at, when known before it starts; `drop_pickled_args`: the Trainer's
  pickled TrainingArguments deleted from checkpoints.

Imports: errors, models, config, fileio (inside the functions that need them).
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

from rlchat.errors import RunDirError

log = logging.getLogger("rlchat")


def _checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every `checkpoint-N` directory, newest first."""
    found = []
    for p in ckpt_dir.iterdir():
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint directory `path` cannot be resumed from, or None if it is complete.

    The Trainer writes trainer_state.json last, so a process killed mid-checkpoint leaves it missing or cut short.
    The weights (safetensors headers and sizes) and the torch-saved optimizer/scheduler/RNG files (zip archives:
    their central directory is at the end) are checked as well, cheaply, without loading them.
    """
    import zipfile

    from rlchat.models import safetensors_problem

    try:
        json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "no trainer_state.json"
    except (OSError, ValueError):
        return "trainer_state.json is cut short"
    for f in sorted(path.glob("*.safetensors")):
        problem = safetensors_problem(f)
        if problem:
            return f"{f.name}: {problem}"
    for f in sorted(list(path.glob("*.pt")) + list(path.glob("*.pth"))):
        try:
            with zipfile.ZipFile(f) as z:
                z.namelist()
        except (OSError, zipfile.BadZipFile) as err:
            return f"{f.name} is cut short ({err})"
    return None


def last_complete_checkpoint(ckpt_dir: Path) -> Path | None:
    """Newest `checkpoint-N` in ckpt_dir that is complete (see `checkpoint_problem`), or None.

    Checkpoints killed while being written are skipped (logged), so the previous one is used."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None
    for _, path in _checkpoints(ckpt_dir):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        log.warning("skipping incomplete checkpoint %s (%s)", path, problem)
    return None


# settings that shape the saved weights: a resume must keep them (batch size, lengths, ... may change, e.g.
# to get past an out-of-memory error). lr and weight_decay too: the Trainer restores the scheduler (its base lr)
# from the checkpoint, so a new value would be recorded in run.json but never used.
RESUME_KEYS = ("full", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lr", "weight_decay",
               # the precision the weights were trained in, and the shape of the learning-rate schedule (the
               # restored scheduler would continue a curve the new settings do not describe)
               "dtype", "lr_scheduler", "warmup_ratio", "warmup_steps",
               # dpo: the loss the checkpoints were trained with
               "beta", "loss_type", "label_smoothing")


def as_flag(key: str, value) -> str:
    """A config value as the command-line flag that sets it: --lr 0.0001, --full / --no-full, --x a,b."""
    name = key.replace("_", "-")
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no-{name}"
    if isinstance(value, list):
        value = ",".join(map(str, value))
    return f"--{name} {value}"


def check_resume_settings(run, stage: str, cfg) -> None:
    """RunDirError when resuming `stage` with settings its checkpoints cannot be loaded with."""
    old_cfg = (run.record(stage) or {}).get("config") or {}
    changed = [k for k in RESUME_KEYS if k in old_cfg and hasattr(cfg, k) and old_cfg[k] != getattr(cfg, k)]
    if changed:
        detail = ", ".join(f"{k} {old_cfg[k]!r} -> {getattr(cfg, k)!r}" for k in changed)
        olds = " ".join(as_flag(k, old_cfg[k]) for k in changed)
        raise RunDirError(f"cannot resume the {stage} stage in {run.path}: its checkpoints were trained with "
                          f"{detail}", f"rerun with the same settings to resume ({olds}), or add --overwrite to "
                          "start afresh")


def check_resume_inputs(run, stage: str, cfg, base, dataset_record: dict) -> None:
    """RunDirError when resuming a stage trained from a base model on pairs (train-reward, dpo) would continue its
    checkpoints from another base or on other data (run.json's inputs), or with other weight settings."""
    check_resume_settings(run, stage, cfg)
    old = (run.record(stage) or {}).get("inputs") or {}
    old_base, old_data = old.get("base") or {}, old.get("dataset") or {}
    if (old_base.get("name"), old_base.get("hash")) != (base.name, base.hash):
        raise RunDirError(f"cannot resume the {stage} stage in {run.path}: its checkpoints were trained on base "
                          f"{old_base.get('name')} ({old_base.get('hash')}), the base is now {base.name} "
                          f"({base.hash})", f"rerun with --overwrite to start the {stage} stage afresh")
    if (old_data.get("spec"), old_data.get("hash")) != (dataset_record["spec"], dataset_record.get("hash")):
        raise RunDirError(f"cannot resume the {stage} stage in {run.path}: its checkpoints were trained on "
                          f"dataset {old_data.get('spec')}, which differs from {cfg.dataset} (or changed since)",
                          "rerun with the same --dataset, or with --overwrite to start afresh")


def _step(row: dict) -> float:
    step = row.get("step", 0)
    return step if isinstance(step, (int, float)) else 0


def remove_leftovers(stage_dir: Path) -> list[str]:
    """Delete what interrupted atomic writes left in RUN/<stage>/ and RUN/<stage>/checkpoints/: tmp files
    (`.NAME.*.tmp`), tmp directories (`.NAME.tmp-*`) and replaced directories not yet deleted (`.NAME.old-*`).
    Only while holding the run's lock (no other process writes there). Returns the names removed."""
    removed = []
    for folder in (Path(stage_dir), Path(stage_dir) / "checkpoints"):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if p.name.startswith(".") and re.search(r"\.(tmp-|old-)|\.tmp$", p.name):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p.name)
    return removed


def prepare_resume(stage_dir: Path, resume_from: Path | None) -> None:
    """Clean up after a killed run, before the same stage trains again in `stage_dir` (we hold the run's lock).

    - tmp files and directories of interrupted atomic writes (`.NAME.tmp-*`, `.NAME.*.tmp`, `.NAME.old-*`);
    - checkpoint directories that are not complete (the Trainer would later write into them, or rotate a good one
      away in their favour);
    - metrics.jsonl rows logged after `resume_from`'s step (they are logged again), or all of them when training
      starts over (`resume_from` None).
    """
    from rlchat.fileio import atomic_write_text

    stage_dir = Path(stage_dir)
    ckpt_dir = stage_dir / "checkpoints"
    remove_leftovers(stage_dir)
    drop_pickled_args(ckpt_dir)  # a kill between the Trainer's save and our callback leaves one behind
    if ckpt_dir.is_dir():
        for _, path in _checkpoints(ckpt_dir):
            if path != resume_from and checkpoint_problem(path) is not None:
                shutil.rmtree(path, ignore_errors=True)
    metrics = stage_dir / "metrics.jsonl"
    if not metrics.is_file():
        return
    if resume_from is None:
        metrics.unlink()
        return
    state = json.loads((resume_from / "trainer_state.json").read_text(encoding="utf-8"))
    last = state.get("global_step", 0)
    keep = []
    for line in metrics.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut by the kill
        if isinstance(row, dict) and _step(row) <= last:
            keep.append(line)
    atomic_write_text(metrics, "".join(line + "\n" for line in keep))


def final_step(cfg, old_config: dict | None, resume_from: Path | None) -> int | None:
    """The global step at which this training ends, when it is known before training: --max-steps, or (epochs)
    the max_steps the checkpoint recorded if the settings that decide it are unchanged. None if unknown."""
    if cfg.max_steps and cfg.max_steps > 0:
        return cfg.max_steps
    if resume_from is None or not old_config:
        return None
    keys = ("epochs", "batch_size", "grad_accum", "eval_fraction", "eval_split", "packing", "max_length")
    if any(old_config.get(k) != getattr(cfg, k, None) for k in keys if k in old_config):
        return None
    state = json.loads((Path(resume_from) / "trainer_state.json").read_text(encoding="utf-8"))
    return state.get("max_steps")


# transformers' Trainer pickles its TrainingArguments into every checkpoint (an unrestricted pickle: loading it can
# run code). Nothing loads it: resuming reads the weights (safetensors), optimizer.pt / scheduler.pt / rng_state.pth
# (torch.load with weights_only=True) and trainer_state.json. So rlchat deletes it as soon as a checkpoint is saved.
PICKLED_ARGS = "training_args.bin"


def drop_pickled_args(ckpt_dir: Path) -> None:
    """Delete training_args.bin from every checkpoint-N under ckpt_dir (the main process only)."""
    if Path(ckpt_dir).is_dir():
        for _, path in _checkpoints(Path(ckpt_dir)):
            (path / PICKLED_ARGS).unlink(missing_ok=True)


# ---------------------------------------- ppo


def check_ppo_resumable(run, base, resume_from: Path, layout: dict, stage: str = "ppo") -> None:
    """RunDirError when the checkpoint was trained on another base, model layout or number of processes.
    stage: "ppo", or "grpo" / "rloo" (the same loop and checkpoints)."""
    old = ((run.record(stage) or {}).get("inputs") or {}).get("base") or {}
    if old and (old.get("name") != base.name or old.get("hash") != base.hash):
        raise RunDirError(f"cannot resume the {stage} stage in {run.path}: its checkpoints were trained on base "
                          f"{old.get('name')}, which has changed since",
                          f"rerun with --overwrite to start {stage} afresh")
    saved = json.loads((resume_from / "state.json").read_text(encoding="utf-8")).get("layout", layout)
    saved.setdefault("processes", 1)  # checkpoints from before multi-process runs
    changed = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in layout.items() if saved.get(k) != v]
    if changed:
        what = "model settings" if any(k != "processes" for k in layout if saved.get(k) != layout[k]) else \
            "number of processes"
        raise RunDirError(f"cannot resume the {stage} stage from {resume_from.name}: it was saved with another "
                          f"{what} ({'; '.join(changed)})",
                          "rerun with the settings (and --num-processes) of the interrupted run, or pass "
                          "--overwrite to start afresh")


# Settings a resumed PPO run may change: they do not change what is trained (grad_accum splits the same minibatch;
# the others are memory, logging, checkpoint cadence and held-out monitoring). They are used as given and recorded
# in run.json. Every other setting must equal the interrupted run's (`check_ppo_resume_settings`), and the prompts'
# content hash too: the checkpoint's optimizer, scheduler, adapters and prompt-sampler position belong to them.
# reward_fn may change too: fixing a function that returned NaN and resuming from the last checkpoint is the way out
# of a NaN stop (and a function's code can change under the same name anyway).
RESUME_MAY_CHANGE = ("run_dir", "overwrite", "trust_remote_code", "report_to", "save_every", "sample_every",
                     "logging_steps", "gradient_checkpointing", "grad_accum", "attn_implementation", "eval_every",
                     "eval_prompts", "judge", "reward_fn", "dataset", "split", "dataset_config")


def check_ppo_resume_settings(run, cfg, resume_from: Path, stage: str = "ppo") -> None:
    """RunDirError naming every setting that differs from the interrupted run's (run.json's config), with the old
    values as flags; the dataset is compared by content (a moved file with the same rows resumes)."""
    from rlchat.config import to_dict
    from rlchat.fileio import input_record

    rec = run.record(stage) or {}
    old, now = rec.get("config") or {}, to_dict(cfg)
    changed = [k for k in now if k in old and k not in RESUME_MAY_CHANGE and old[k] != now[k]]
    old_data = (rec.get("inputs") or {}).get("dataset") or {}
    new_data = input_record(cfg.dataset)
    data_changed = bool(old_data) and (
        old_data.get("hash") != new_data.get("hash") if old_data.get("hash") or new_data.get("hash")
        else (old_data.get("spec"), old.get("split"), old.get("dataset_config")) !=
        (new_data.get("spec"), cfg.split, cfg.dataset_config))
    if not changed and not data_changed:
        return

    diffs = [f"{k} {old[k]!r} -> {now[k]!r}" for k in changed]
    if data_changed:
        diffs.append(f"the prompts ({old_data.get('spec')}) have other content")
    olds = " ".join(as_flag(k, old[k]) for k in changed) + (f" --dataset {old_data.get('spec')}" if data_changed
                                                         else "")
    raise RunDirError(f"cannot resume the {stage} stage from {resume_from.name}: settings differ from the "
                      f"interrupted run's ({'; '.join(diffs)})",
                      f"rerun with the interrupted run's values ({olds.strip()}), or pass --overwrite to start "
                      f"{stage} afresh")
