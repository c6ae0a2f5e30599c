"""`rlchat train-reward`: a reward model trained on preference pairs with TRL's RewardTrainer; `rlchat score`.

What `run(cfg)` does, in order:
  1. validate, before anything is written to the run directory: the run directory (a finished stage needs
     --overwrite), the base model (the run's SFT model, or --model), the pairs (TRL preference formats: explicit
     prompt + chosen + rejected, or implicit prompt shared inside chosen and rejected; plain text or lists of
     messages; an optional numeric `margin` column), and the tokenized lengths.
  2. begin the stage and train: the base is the SFT policy with its adapter merged in memory (as in InstructGPT and
     "The N+ implementation details of RLHF with PPO"), turned into a sequence classifier whose scalar `score` head
     reads the last non-pad token. LoRA by default (task type SEQ_CLS, so PEFT trains and saves the head through
     `modules_to_save`), --full for all weights. Loss: -log sigmoid(r_chosen - r_rejected [- margin]) plus the
     optional centring term center_rewards_coef * mean((r_chosen + r_rejected)^2) (Eisenstein et al. 2023, Eq. 2).
  3. score the held-out pairs with the trained model ourselves (pairwise accuracy, margin, reward mean/std) and
     write RUN/reward/: adapter/ or model/, tokenizer/, metrics.jsonl, reward_stats.json, config.yaml.

Data rules (all checked in step 1; errors are one line, exit code 2):
  * pairs whose chosen and rejected are identical carry no signal: counted, skipped, reported as a warning (an
    error only if no pair remains);
  * implicit-prompt pairs must share a prefix (the prompt); a pair that shares none is an error naming the rows;
  * longer than --max-length: TRL 1.16 silently DROPS such pairs (RewardTrainer filters chosen or rejected longer
    than max_length). We tokenize ourselves and instead LEFT-truncate (keep the last max_length tokens): the score
    head reads the final token, and the end of the response is what tells chosen from rejected, so the start of
    the prompt is the cheapest part to lose. `score()` truncates the same way. The count is reported
    (n_truncated).

Outputs (manifest `outputs`): kind "lora" | "full", adapter "reward/adapter" | None, model "reward/model" | None,
tokenizer, base ("sft" or the --model spec), base_hash (content hash of the SFT adapter/model, or of a local
--model directory; None for a Hub id). `load_reward_model` refuses an adapter whose base has changed since.

Resume: checkpoints go to RUN/reward/checkpoints every --save-steps (2 kept); rerunning the same command after a
crash resumes from the newest complete one, provided the base is unchanged.

Not done here: ensembles, per-token rewards, reward models for multi-turn credit assignment.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlchat.errors import ConfigError, DataError, ModelError, RunDirError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

STAGE = "reward"
MAX_ROWS_NAMED = 5   # rows listed in an error message
MAX_STATS_PAIRS = 2000  # pairs scored for reward_stats.json when there is no held-out split


# ---------------------------------------------------------------------------------------------------- pairs


@dataclass
class Pair:
    """One preference pair, split into prompt and the two responses (as in the dataset: text or messages)."""

    row: int                      # index in the dataset file/split, for messages
    prompt: Any                   # str | list[dict] | None (implicit prompt without a shared prefix)
    chosen: Any                   # the chosen response (after the prompt)
    rejected: Any
    margin: float | None = None


def _clean_messages(value: list[dict]) -> list[dict]:
    # Arrow gives every message the union of keys, None where absent; chat templates may trip on those
    return [{k: v for k, v in m.items() if v is not None or k in ("role", "content")} for m in value]


def _kind(value: Any) -> str | None:
    from rlchat.data import is_message_list

    if isinstance(value, str):
        return "text"
    if is_message_list(value):
        return "messages"
    return None


def _common_prefix(a: Any, b: Any) -> int:
    """Length of the shared prefix (characters of two strings, or whole messages of two message lists)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _rows_text(rows: list[int]) -> str:
    shown = ", ".join(str(r) for r in rows[:MAX_ROWS_NAMED])
    return shown + (f" and {len(rows) - MAX_ROWS_NAMED} more" if len(rows) > MAX_ROWS_NAMED else "")


def read_pairs(ds, fmt: str, name: str | None = None, keep_identical: bool = False
               ) -> tuple[list[Pair], list[int]]:
    """Check every row of a preference dataset and split it into Pairs.

    Returns (pairs, identical_rows): rows whose chosen and rejected are identical are listed and, unless
    keep_identical (scoring), left out. Raises DataError for a value of the wrong type, a bad margin,
    implicit-prompt rows sharing no prefix, or no pair left.
    """
    where = f"dataset {name}" if name else "the dataset"
    has_margin = "margin" in ds.column_names
    columns = ["prompt", "chosen", "rejected"] if fmt == "explicit" else ["chosen", "rejected"]
    pairs: list[Pair] = []
    identical, no_prefix, bad_margin = [], [], []
    for i, row in enumerate(ds):
        kinds = {c: _kind(row[c]) for c in columns}
        for c, k in kinds.items():
            if k is None:
                raise DataError(f"row {i} of {where} has {row[c]!r:.60} in column '{c}', expected a string or a "
                                "list of {role, content} messages",
                                "fix or remove that row; every row needs the same format")
        if len(set(kinds.values())) > 1:
            raise DataError(f"row {i} of {where} mixes plain text and messages in columns {', '.join(columns)}",
                            "make these columns all strings or all lists of {role, content}")
        conv = kinds["chosen"] == "messages"
        prompt = row.get("prompt") if fmt == "explicit" else None
        chosen, rejected = row["chosen"], row["rejected"]
        if conv:
            chosen, rejected = _clean_messages(chosen), _clean_messages(rejected)
            prompt = _clean_messages(prompt) if prompt is not None else None
        margin = None
        if has_margin:
            margin = row["margin"]
            if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
                bad_margin.append(i)
                continue
            margin = float(margin)
        if chosen == rejected:
            identical.append(i)
            if not keep_identical:
                continue
        if fmt == "implicit":
            n = _common_prefix(chosen, rejected)
            shared = chosen[:n]
            if chosen != rejected and ((conv and n == 0) or (not conv and not shared.strip())):
                no_prefix.append(i)
                continue
            if not conv:
                # cut at the last word boundary (TRL's extract_prompt also backs off a space) so that the
                # responses start with whole words; training sees prompt + response joined again either way
                cut = max(shared.rfind(" "), shared.rfind("\n"))
                if cut > 0:
                    n = cut
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        pairs.append(Pair(i, prompt, chosen, rejected, margin))
    if bad_margin:
        raise DataError(f"{len(bad_margin)} row(s) of {where} have a 'margin' that is not a finite number (rows "
                        f"{_rows_text(bad_margin)})", "give every row a numeric margin, or drop the column")
    if no_prefix:
        raise DataError(f"{len(no_prefix)} of {len(ds)} implicit-prompt pairs in {where} share no prefix, so they "
                        f"have no prompt (rows {_rows_text(no_prefix)})",
                        "start chosen and rejected with the same prompt text (or the same user message), or add "
                        "an explicit 'prompt' column")
    if not pairs:
        raise DataError(f"all {len(ds)} pairs in {where} have identical chosen and rejected responses, so there "
                        "is nothing to learn", "give each pair two different responses")
    return pairs, identical


# ------------------------------------------------------------------------------------------------ tokenizing


def encode(tokenizer, prompt: Any, completion: Any, max_length: int | None) -> tuple[list[int], bool]:
    """Token ids of prompt + completion as the reward model sees them, and whether they were truncated.

    Same rendering as TRL's RewardTrainer: messages through the chat template; plain text concatenated with the
    eos token appended. Longer than max_length: the first tokens are dropped (see the module docstring).
    """
    if isinstance(completion, list):
        messages = list(prompt or []) + list(completion)
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    else:
        text = (prompt or "") + completion
        eos = tokenizer.eos_token
        if eos and not text.endswith(eos):
            text += eos
        ids = tokenizer(text)["input_ids"]
    ids = list(ids)
    if max_length is not None and len(ids) > max_length:
        return ids[-max_length:], True
    return ids, False


def tokenize_pairs(pairs: list[Pair], tokenizer, max_length: int | None) -> tuple[dict, int, list[int]]:
    """({"chosen_ids", "rejected_ids"[, "margin"]}, n_truncated, rows that became identical when truncated).

    `rows` (the dataset row of each kept pair) is returned in the dict too; pop it before training."""
    chosen_ids, rejected_ids, margins, rows = [], [], [], []
    n_truncated, collapsed = 0, []
    for p in pairs:
        c, c_cut = encode(tokenizer, p.prompt, p.chosen, max_length)
        r, r_cut = encode(tokenizer, p.prompt, p.rejected, max_length)
        n_truncated += int(c_cut or r_cut)
        if c == r:
            collapsed.append(p.row)
            continue
        chosen_ids.append(c)
        rejected_ids.append(r)
        margins.append(p.margin)
        rows.append(p.row)
    columns = {"chosen_ids": chosen_ids, "rejected_ids": rejected_ids, "rows": rows}
    if pairs and pairs[0].margin is not None:
        columns["margin"] = margins
    return columns, n_truncated, collapsed


# --------------------------------------------------------------------------------------------------- scoring


def score_token_ids(model, ids: list[list[int]], pad_token_id: int, batch_size: int = 16) -> "torch.Tensor":
    """Reward of each sequence (B,), float32 on CPU, in the order given. Right-padded like TRL's collator; the
    classifier reads the last non-pad token. Sequences are batched by length to waste less padding."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    scores = torch.empty(len(ids), dtype=torch.float32)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = max(len(ids[i]) for i in idx)
            input_ids = torch.full((len(idx), width), pad_token_id, dtype=torch.long)  # (B, T)
            attention_mask = torch.zeros((len(idx), width), dtype=torch.long)         # (B, T) 1 = real token
            for row, i in enumerate(idx):
                input_ids[row, :len(ids[i])] = torch.tensor(ids[i])
                attention_mask[row, :len(ids[i])] = 1
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                           use_cache=False).logits  # (B, 1)
            scores[idx] = logits[:, 0].float().cpu()
    return scores


def _mean_std(x: "torch.Tensor") -> tuple[float, float]:
    # population std (ddof=0): PPO normalises scores as (r - mean) / std with these numbers
    return float(x.mean()), float(x.std(unbiased=False)) if len(x) > 1 else 0.0


def pair_stats(chosen: "torch.Tensor", rejected: "torch.Tensor") -> dict:
    """Pairwise accuracy (chosen strictly above rejected; ties count as wrong), mean margin and reward stats."""
    import torch

    both = torch.cat([chosen, rejected])
    mean, std = _mean_std(both)
    c_mean, c_std = _mean_std(chosen)
    r_mean, r_std = _mean_std(rejected)
    return {
        "accuracy": float((chosen > rejected).float().mean()),
        "margin": float((chosen - rejected).mean()),
        "mean": mean, "std": std,
        "chosen_mean": c_mean, "chosen_std": c_std,
        "rejected_mean": r_mean, "rejected_std": r_std,
    }


# ------------------------------------------------------------------------------------------------------ base


@dataclass
class Base:
    """Where the reward model's backbone comes from."""

    name: str                # "sft" or the --model spec
    hash: str | None         # content hash of the SFT adapter/model dir, or of a local --model dir
    path: Path | None        # the hashed directory


def _sft_weights_dir(run, rec: dict) -> Path:
    from rlchat import models

    outputs = rec.get("outputs") or {}
    rel = outputs.get("adapter") if outputs.get("kind") == "lora" else outputs.get("model")
    if not rel:
        raise RunDirError(f"the sft entry in {run.manifest_path} names no adapter or model directory",
                          "rerun `rlchat sft` for this run directory with --overwrite")
    path = models.manifest_path(run.path, rel)
    if not path.is_dir():
        raise RunDirError(f"SFT weights not found at {path}", "rerun `rlchat sft` for this run directory with "
                          "--overwrite, or pass --model to train the reward model from another model")
    return path


def resolve_base(run, model_spec: str | None) -> Base:
    """The base the reward model starts from: --model if given, else the run's finished SFT stage."""
    from rlchat.rundir import content_hash

    if model_spec:
        local = Path(model_spec).expanduser()
        if local.exists():
            return Base(model_spec, content_hash(local), local)
        return Base(model_spec, None, None)
    rec = run.require_done("sft", "train the SFT model first (`rlchat sft --run-dir RUN ...`), or pass --model to "
                                  "start the reward model from any causal LM")
    path = _sft_weights_dir(run, rec)
    return Base("sft", content_hash(path), path)


def load_base_causal(run, base: Base, trust_remote_code: bool = False):
    """(causal LM, tokenizer) of the base: the SFT policy (adapter merged) or the --model."""
    from rlchat import models

    if base.name == "sft":
        return models.load_sft_policy(run.path, trust_remote_code=trust_remote_code)
    tokenizer = models.load_tokenizer(base.name, trust_remote_code=trust_remote_code)
    model = models.load_causal_lm(base.name, trust_remote_code=trust_remote_code)
    models.align_model_with_tokenizer(model, tokenizer)
    return model, tokenizer


# ------------------------------------------------------------------------------------------------------- run


def run(cfg) -> dict:
    """Train the reward model of `cfg.run_dir`; returns the final metrics (and a one-line "summary")."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from rlchat import data, models
    from rlchat.config import to_dict, to_yaml
    from rlchat.progress import TrainerProgress, console
    from rlchat.rundir import RunDir, atomic_dir, atomic_write_json, atomic_write_text, input_record
    from rlchat.stages.common import (check_resume_settings, final_step, last_complete_checkpoint, oom_guard,
                                      is_sharded, prepare_resume, quiet_libraries, save_trained,
                                      stage_lifecycle, train_or_restore, trainer_args)

    t_start = time.time()
    # 1. validate everything before the first write
    if not cfg.dataset:
        raise ConfigError("train-reward needs preference pairs", "pass --dataset (a .jsonl/.json/.parquet/.csv "
                          "file, a save_to_disk directory or a Hub id with chosen/rejected columns)")
    run = RunDir(cfg.run_dir)
    mode = run.check_can_start(STAGE, cfg.overwrite)
    base = resolve_base(run, cfg.model)
    dataset_record = input_record(cfg.dataset)
    if mode == "resume":  # the checkpoints must continue the same training
        check_resume_settings(run, STAGE, cfg)
        old = (run.record(STAGE) or {}).get("inputs") or {}
        old_base, old_data = old.get("base") or {}, old.get("dataset") or {}
        if old_base.get("name") != base.name or old_base.get("hash") != base.hash:
            raise RunDirError(f"cannot resume the reward stage in {run.path}: its checkpoints were trained on base "
                              f"{old_base.get('name')} ({old_base.get('hash')}), the base is now {base.name} "
                              f"({base.hash})", "rerun with --overwrite to start the reward model afresh")
        if old_data.get("spec") != dataset_record["spec"] or old_data.get("hash") != dataset_record.get("hash"):
            raise RunDirError(f"cannot resume the reward stage in {run.path}: its checkpoints were trained on "
                              f"dataset {old_data.get('spec')}, which differs from {cfg.dataset} (or changed since)",
                              "rerun with the same --dataset, or with --overwrite to start afresh")

    ds = data.load_any(cfg.dataset, split=cfg.split, config=cfg.dataset_config)
    fmt = data.detect_preference_format(ds, cfg.dataset)
    pairs, identical = read_pairs(ds, fmt, cfg.dataset)
    console.print(f"[bold]reward[/] dataset {cfg.dataset}: {data.describe(ds, fmt)}"
                  + (", with margins" if pairs[0].margin is not None else ""), highlight=False)
    kept = ds.select([p.row for p in pairs])   # so the split works on valid pairs only
    by_row = {p.row: p for p in pairs}
    kept = kept.add_column("_row", [p.row for p in pairs])
    train_ds, eval_ds = data.split_eval(kept, cfg.eval_fraction, cfg.seed)

    quiet_libraries()
    with oom_guard(STAGE):
        causal, tokenizer = load_base_causal(run, base, cfg.trust_remote_code)
    tokenizer.padding_side = "right"  # training batches are right-padded (TRL's collator); recorded when saved
    train_cols, n_trunc_train, collapsed_train = tokenize_pairs([by_row[r] for r in train_ds["_row"]], tokenizer,
                                                                cfg.max_length)
    eval_cols, n_trunc_eval, collapsed_eval = (
        tokenize_pairs([by_row[r] for r in eval_ds["_row"]], tokenizer, cfg.max_length) if eval_ds is not None
        else (None, 0, []))
    collapsed = collapsed_train + collapsed_eval
    n_identical = len(identical) + len(collapsed)
    n_truncated = n_trunc_train + n_trunc_eval
    if not train_cols["chosen_ids"]:
        raise DataError(f"no training pair is left in {cfg.dataset} after skipping identical ones",
                        "give each pair two different responses, or raise --max-length")
    if identical:
        console.print(f"[yellow]warning:[/] skipped {len(identical)} of {len(ds)} pairs whose chosen and rejected "
                      f"responses are identical (rows {_rows_text(identical)})", highlight=False)
    if collapsed:
        console.print(f"[yellow]warning:[/] skipped {len(collapsed)} pairs that became identical when truncated "
                      f"to max_length={cfg.max_length} tokens (rows {_rows_text(collapsed)}); raise --max-length",
                      highlight=False)
    if n_truncated:
        console.print(f"[yellow]warning:[/] {n_truncated} of {len(pairs)} pairs are longer than max_length="
                      f"{cfg.max_length} tokens; kept their last {cfg.max_length} tokens (the start of the prompt "
                      "is cut; TRL alone would drop these pairs)", highlight=False)

    from datasets import Dataset
    from transformers import set_seed

    set_seed(cfg.seed)  # the score head is freshly initialised
    model = models.seq_cls_from_causal(causal, pad_token_id=tokenizer.pad_token_id)
    del causal
    train_set = Dataset.from_dict({k: v for k, v in train_cols.items() if k != "rows"})
    eval_set = (Dataset.from_dict({k: v for k, v in eval_cols.items() if k != "rows"})
                if eval_cols and eval_cols["chosen_ids"] else None)

    # 2. train
    inputs = {"dataset": dataset_record,
              "base": {"name": base.name, "hash": base.hash},
              "model": input_record(cfg.model, hash=False) if cfg.model else None}
    old_config = (run.record(STAGE) or {}).get("config") if mode == "resume" else None
    stage_dir = run.begin_stage(STAGE, config=to_dict(cfg), inputs=inputs, parent=None if cfg.model else "sft",
                                overwrite=cfg.overwrite)
    from rlchat import dist

    main = dist.is_main()  # under accelerate launch only the main process writes
    with stage_lifecycle(run, STAGE), oom_guard(STAGE):
        if main:
            atomic_write_text(stage_dir / "config.yaml", to_yaml(cfg))
        from trl import RewardConfig as TrlRewardConfig
        from trl import RewardTrainer

        ckpt_dir = stage_dir / "checkpoints"
        resume_from = last_complete_checkpoint(ckpt_dir) if mode == "resume" else None
        if mode == "resume" and main:
            prepare_resume(stage_dir, resume_from)  # drop what the killed run left half-done
        dist.barrier()
        args = TrlRewardConfig(
            **trainer_args(cfg, ckpt_dir, has_eval=eval_set is not None),
            max_length=None,   # TRL would drop longer pairs; every pair was already truncated to fit above
            center_rewards_coefficient=cfg.center_rewards_coef or None,
            trust_remote_code=cfg.trust_remote_code,
            disable_dropout=True,
        )
        peft_config = None if cfg.full else models.lora_config(
            cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules, task_type="SEQ_CLS")
        progress = TrainerProgress(stage_dir / "metrics.jsonl", "reward",
                                   show_keys=("loss", "accuracy", "eval_accuracy"))
        trainer = RewardTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                                processing_class=tokenizer, peft_config=peft_config, callbacks=[progress])
        # disable_tqdm=True makes the Trainer print every log dict; our progress bar shows them instead
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
        trainable, total = models.count_parameters(trainer.model)
        if resume_from is not None:
            console.print(f"[yellow]reward: resuming from {resume_from.name}[/]")
        result = train_or_restore(trainer, resume_from, final_step(cfg, old_config, resume_from))
        trl_eval = next((h for h in reversed(trainer.state.log_history) if "eval_accuracy" in h), {})
        sharded = is_sharded(trainer)  # ZeRO-3 / FSDP: forward passes and saving need every process
        if not main and not sharded:  # training (the collective part) is over; the main process scores, writes
            return {"rank": dist.rank(), "steps": trainer.state.global_step}

        # 3. our own held-out scoring (the numbers PPO normalises with), then the outputs
        stats_cols, source = (eval_cols, "eval") if eval_set is not None else (
            {k: v[:MAX_STATS_PAIRS] for k, v in train_cols.items()}, "train")
        ids = stats_cols["chosen_ids"] + stats_cols["rejected_ids"]
        scores = score_token_ids(trainer.model, ids, tokenizer.pad_token_id, batch_size=cfg.batch_size)
        n = len(stats_cols["chosen_ids"])
        stats = pair_stats(scores[:n], scores[n:])
        reward_stats = {k: stats[k] for k in ("mean", "std", "chosen_mean", "chosen_std", "rejected_mean",
                                              "rejected_std")}
        reward_stats.update(n_pairs=n, source=source, accuracy=stats["accuracy"], margin=stats["margin"])
        save_trained(trainer, stage_dir / ("model" if cfg.full else "adapter"), full=cfg.full)
        if not main:
            return {"rank": dist.rank(), "steps": trainer.state.global_step}
        atomic_write_json(stage_dir / "reward_stats.json", reward_stats)
        # per-pair scores of that set: for plots, and to check that a reloaded model scores the same
        atomic_write_text(stage_dir / f"{source}_scores.jsonl", "".join(
            json.dumps({"row": row, "chosen": c, "rejected": r}) + "\n"
            for row, c, r in zip(stats_cols["rows"], scores[:n].tolist(), scores[n:].tolist())))

        with atomic_dir(stage_dir / "tokenizer") as tmp:
            tokenizer.save_pretrained(tmp)

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
            "n_train": len(train_set),
            "n_eval": len(eval_set) if eval_set is not None else 0,
            "processes": dist.world_size(),
            "n_truncated": n_truncated,
            "n_identical_skipped": n_identical,
            "format": fmt,
            "has_margin": "margin" in train_cols,
            "trainable_params": trainable,
            "total_params": total,
            "resumed_from": resume_from.name if resume_from else None,
            "wall_s": round(wall, 1),
        }
        outputs = {
            "kind": "full" if cfg.full else "lora",
            "adapter": None if cfg.full else "reward/adapter",
            "model": "reward/model" if cfg.full else None,
            "tokenizer": "reward/tokenizer",
            "base": base.name,
            "base_hash": base.hash,
            "base_path": str(base.path.resolve()) if base.name != "sft" and base.path else None,
            "reward_stats": "reward/reward_stats.json",
            "scores": f"reward/{source}_scores.jsonl",
            "metrics": "reward/metrics.jsonl",
        }
        run.finish_stage(STAGE, metrics=metrics, outputs=outputs)

    where = run.path / (outputs["model"] or outputs["adapter"])
    if source == "eval":
        head = f"held-out accuracy {stats['accuracy']:.3f}, margin {stats['margin']:.3f} ({metrics['n_eval']} pairs)"
    else:
        head = f"train accuracy {stats['accuracy']:.3f}, margin {stats['margin']:.3f} (no held-out split)"
    metrics["summary"] = (f"{head} in {wall:.0f}s ({metrics['steps']} steps, {metrics['n_train']} pairs); "
                          f"{outputs['kind']} reward model at {where}")
    return metrics


# ------------------------------------------------------------------------------------------------ load, score


def _reward_record(run) -> dict:
    rec = run.require_done(STAGE, "train the reward model first: `rlchat train-reward --run-dir RUN --dataset PAIRS`")
    outputs = rec.get("outputs") or {}
    if outputs.get("kind") not in ("lora", "full"):
        raise RunDirError(f"the reward entry in {run.manifest_path} has outputs.kind {outputs.get('kind')!r}, "
                          "expected 'lora' or 'full'", "rerun `rlchat train-reward` with --overwrite")
    return rec


def check_reward_base(run_path: str | Path) -> Base:
    """The base a LoRA reward adapter was trained on, checked against the run as it is now.

    Raises ModelError when the SFT model (or the local --model directory) changed since the reward model was
    trained: the adapter would then sit on weights it was not trained with; or when the reward adapter or the SFT
    weights are damaged (a .safetensors file cut short). Returns the Base.
    """
    from rlchat import models
    from rlchat.models import check_weights
    from rlchat.rundir import RunDir

    run = RunDir(run_path)
    outputs = _reward_record(run)["outputs"]
    # damaged files first: a cut-short adapter must not load, and a damaged SFT file would read as "changed"
    check_weights(models.manifest_path(run.path, outputs.get("adapter") or "reward/adapter"),
                  f"rerun `rlchat train-reward --run-dir {run.path} --dataset PAIRS --overwrite`; a finished stage "
                  "keeps no resumable state")
    name, recorded = outputs.get("base"), outputs.get("base_hash")
    base = resolve_base(run, None if name == "sft" else (outputs.get("base_path") or name))
    if name == "sft" and base.path is not None:
        check_weights(base.path, f"rerun `rlchat sft --run-dir {run.path} --overwrite`, then train-reward with "
                                 "--overwrite; a finished stage keeps no resumable state")
    if recorded is not None and base.hash != recorded:
        what = "the run's SFT model" if name == "sft" else f"the model at {name}"
        raise ModelError(f"the reward adapter in {run.stage_dir(STAGE)} was trained on a different version of "
                         f"{what} (hash {recorded[:19]}..., now {str(base.hash)[:19]}...)",
                         f"retrain it: rlchat train-reward --run-dir {run.path} --dataset PAIRS --overwrite")
    return base


def load_reward_model(run_path: str | Path, trust_remote_code: bool = False, device: str | None = None
                      ) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """(sequence-classification reward model in eval mode, tokenizer) of a run's finished reward stage.

    LoRA: base (SFT merged, or the recorded --model) -> seq_cls_from_causal -> PeftModel.from_pretrained(
    RUN/reward/adapter), after checking the base's content hash (ModelError on a mismatch). Full: the saved model.
    The tokenizer is RUN/reward/tokenizer, right-padded.
    """
    from rlchat import models
    from rlchat.rundir import RunDir

    run = RunDir(run_path)
    outputs = _reward_record(run)["outputs"]
    base = check_reward_base(run.path) if outputs["kind"] == "lora" else None  # before loading anything
    fix = (f"rerun `rlchat train-reward --run-dir {run.path} --dataset PAIRS --overwrite`; a finished stage keeps "
           "no resumable state")
    if outputs["kind"] == "full":
        weights = models.manifest_path(run.path, outputs.get("model") or "reward/model")
    else:
        weights = models.manifest_path(run.path, outputs.get("adapter") or "reward/adapter")
    models.check_weights(weights, fix)
    tok_dir = models.manifest_path(run.path, outputs.get("tokenizer") or "reward/tokenizer")
    tokenizer = models.load_tokenizer(str(tok_dir), trust_remote_code=trust_remote_code)
    tokenizer.padding_side = "right"
    if outputs["kind"] == "full":
        from transformers import AutoModelForSequenceClassification

        path = weights
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                str(path), use_safetensors=True, trust_remote_code=trust_remote_code,
                dtype=models.resolve_dtype(None))
        except Exception as err:  # noqa: BLE001 - transformers raises many types; one line for the user
            raise ModelError(f"could not load the reward model from {path}: {str(err).splitlines()[0]}",
                             "rerun `rlchat train-reward` with --overwrite") from None
    else:
        from peft import PeftModel

        adapter = weights
        if not (adapter / "adapter_config.json").is_file():
            raise RunDirError(f"reward adapter not found: {adapter} has no adapter_config.json",
                              "rerun `rlchat train-reward` with --overwrite")
        causal, _ = load_base_causal(run, base, trust_remote_code)
        model = models.seq_cls_from_causal(causal, pad_token_id=tokenizer.pad_token_id)
        del causal
        try:
            model = PeftModel.from_pretrained(model, str(adapter))
        except Exception as err:  # noqa: BLE001
            raise ModelError(f"could not apply the reward adapter {adapter}: {str(err).splitlines()[0]}",
                             "rerun `rlchat train-reward` with --overwrite") from None
    model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    if device is not None:
        model.to(device)
    return model, tokenizer


def score_items(ds, name: str | None = None) -> list[dict]:
    """The (prompt, completion) items to score in a dataset, each {"prompt", "completion"[, "label", "row"]}.

    Columns: prompt + completion; prompt + chosen + rejected or chosen + rejected (two items per pair, labelled
    "chosen"/"rejected"); messages (the last turn is the completion and must be the assistant's).
    """
    from rlchat.data import is_message_list

    columns = ds.column_names
    where = f"dataset {name}" if name else "the dataset"
    items: list[dict] = []
    if "chosen" in columns and "rejected" in columns:
        fmt = "explicit" if "prompt" in columns else "implicit"
        pairs, _ = read_pairs(ds, fmt, name, keep_identical=True)
        for p in pairs:
            items.append({"prompt": p.prompt, "completion": p.chosen, "label": "chosen", "row": p.row})
            items.append({"prompt": p.prompt, "completion": p.rejected, "label": "rejected", "row": p.row})
        return items
    if "prompt" in columns and "completion" in columns:
        for i, row in enumerate(ds):
            prompt, completion = row["prompt"], row["completion"]
            kinds = {_kind(prompt), _kind(completion)}
            if None in kinds or len(kinds) > 1:
                raise DataError(f"row {i} of {where} needs 'prompt' and 'completion' both strings or both lists "
                                "of {role, content} messages", "fix or remove that row")
            if isinstance(completion, list):
                prompt, completion = _clean_messages(prompt), _clean_messages(completion)
            items.append({"prompt": prompt, "completion": completion, "row": i})
        return items
    if "messages" in columns:
        for i, row in enumerate(ds):
            messages = row["messages"]
            if not is_message_list(messages) or len(messages) < 2 or messages[-1]["role"] != "assistant":
                raise DataError(f"row {i} of {where} is not a conversation ending in an assistant turn after at "
                                "least one other turn", "fix or remove that row")
            messages = _clean_messages(messages)
            items.append({"prompt": messages[:-1], "completion": messages[-1:], "row": i})
        return items
    raise DataError(f"{where} has columns [{', '.join(columns)}], none of which the reward model can score",
                    "give it 'prompt' + 'completion', 'prompt' + 'chosen' + 'rejected', 'chosen' + 'rejected', or "
                    "'messages'")


def score(run_dir: str | Path, dataset: str, out_path: str | Path, split: str = "train", batch_size: int = 16,
          dataset_config: str | None = None, trust_remote_code: bool = False) -> dict:
    """Score every response in `dataset` with the run's reward model; write JSONL rows {prompt, completion, score}
    (plus "label": "chosen"/"rejected" for pairs) to out_path. Returns {"n", "mean", "std", "out_path", "summary"}
    and, for pairs, "accuracy" and "margin". Sequences are truncated to the reward stage's max_length as in
    training. Raw scores: PPO's normalisation (reward_stats.json) is not applied."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from rlchat import data
    from rlchat.models import pick_device
    from rlchat.rundir import RunDir, atomic_write_text
    from rlchat.stages.common import quiet_libraries

    if batch_size < 1:
        raise ConfigError(f"batch_size must be > 0, got {batch_size}", "pass --batch-size 16")
    t_start = time.time()
    run = RunDir(run_dir)
    rec = _reward_record(run)
    max_length = (rec.get("config") or {}).get("max_length")
    ds = data.load_any(dataset, split=split, config=dataset_config)
    items = score_items(ds, dataset)
    quiet_libraries()
    model, tokenizer = load_reward_model(run.path, trust_remote_code=trust_remote_code, device=pick_device())
    ids = [encode(tokenizer, it["prompt"], it["completion"], max_length)[0] for it in items]
    scores = score_token_ids(model, ids, tokenizer.pad_token_id, batch_size=batch_size)

    lines = []
    for it, s in zip(items, scores.tolist()):
        row = {"prompt": it["prompt"], "completion": it["completion"], "score": s}
        if "label" in it:
            row["label"] = it["label"]
        lines.append(json.dumps(row, ensure_ascii=False))
    out_path = Path(out_path)
    atomic_write_text(out_path, "\n".join(lines) + "\n")
    mean, std = _mean_std(scores)
    result = {"n": len(items), "mean": mean, "std": std, "out_path": str(out_path)}
    text = f"scored {len(items)} responses: mean {mean:.3f}, std {std:.3f}"
    if items and "label" in items[0]:
        stats = pair_stats(scores[0::2], scores[1::2])
        result.update(accuracy=stats["accuracy"], margin=stats["margin"])
        text += f"; pairwise accuracy {stats['accuracy']:.3f}, margin {stats['margin']:.3f}"
    result["wall_s"] = round(time.time() - t_start, 1)
    result["summary"] = f"{text} in {result['wall_s']:.0f}s -> {out_path}"
    return result
