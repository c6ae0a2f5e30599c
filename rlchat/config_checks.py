"""The checks behind rlchat.config: each field's rules (ranges, choices, finite numbers of a sane size) and the
Validated base of the stage dataclasses; TRL's names for rlchat settings (TRL_NAMES) and the "did you mean" hints
for unknown recipe keys and flags (name_hint, unknown_key).

Imports nothing from rlchat; rlchat.config builds the stage dataclasses on it.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import fields

# Bounds every numeric field has unless its own rules set an upper bound: beyond them a value is a typo (or an
# attack) that would overflow inside torch/numpy (int32/int64 indices, float overflow to inf) instead of being refused.
INT_LIMIT = 2**31 - 1
FLOAT_LIMIT = 1e6
# TRL / transformers argument names -> (rlchat's name, or None when there is no single counterpart; a note).
# rlchat refuses these names rather than accepting them as aliases: one name per setting keeps the recipe, the
# resolved config.yaml, --help and the resume checks unambiguous (no rule needed for `lr` and `learning_rate`
# both given), and several TRL names do not mean quite the same thing here (use_peft's default is the opposite;
# bf16 is mixed precision in TRL, a loading dtype here; output_dir is one stage's folder, run_dir the whole run).
# The error names the rlchat spelling exactly, for every such key of a recipe at once.
TRL_NAMES: dict[str, tuple[str | None, str]] = {
    "learning_rate": ("lr", ""),
    "per_device_train_batch_size": ("batch_size", ""),
    "per_device_eval_batch_size": ("batch_size", "one batch size serves training and evaluation"),
    "train_batch_size": ("batch_size", ""),
    "gradient_accumulation_steps": ("grad_accum", ""),
    "num_train_epochs": ("epochs", ""),
    "model_name_or_path": ("model", ""),
    "sft_model_path": ("model", "None = the run's SFT model"),
    "reward_model_path": ("reward_model", ""),
    "output_dir": ("run_dir", "the run directory holds every stage; each writes RUN/<stage>/"),
    "overwrite_output_dir": ("overwrite", ""),
    "dataset_name": ("dataset", ""),
    "dataset_config_name": ("dataset_config", ""),
    "dataset_train_split": ("split", ""),
    "dataset_test_split": ("eval_split", ""),
    "max_seq_length": ("max_length", ""),
    "torch_dtype": ("dtype", ""),
    "model_dtype": ("dtype", ""),
    "bf16": ("dtype", "as dtype bfloat16; auto already picks it on a GPU that supports it"),
    "fp16": ("dtype", "as dtype float16"),
    "lr_scheduler_type": ("lr_scheduler", ""),
    "eval_strategy": ("eval_steps", "evaluation runs every eval_steps steps, else after each epoch"),
    "evaluation_strategy": ("eval_steps", "evaluation runs every eval_steps steps, else after each epoch"),
    "save_strategy": ("save_steps", ""),
    "test_split_size": ("eval_fraction", ""),
    "num_ppo_epochs": ("ppo_epochs", ""),
    "num_mini_batches": ("mini_batches", ""),
    "total_episodes": ("episodes", ""),
    "center_rewards_coefficient": ("center_rewards_coef", ""),
    "use_peft": (None, "LoRA is rlchat's default; full trains all weights instead"),
    "resume_from_checkpoint": (None, "rerun the same command: a stage resumes from its newest complete checkpoint"),
    "push_to_hub": (None, "`rlchat export RUN OUT` writes a standalone model; upload OUT with `hf upload`"),
}


def fmt_num(x) -> str:
    if isinstance(x, int) and abs(x) > 10**12:
        return f"{x:.3g}"  # a 300-digit integer is not worth printing in full
    return f"{x:g}" if isinstance(x, float) else str(x)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _range_text(meta) -> str | None:
    """'> 0', '>= 0', 'in [0, 1)', ... from a field's rules; None if the field has no range."""
    lo = (">", meta["gt"]) if "gt" in meta else (">=", meta["ge"]) if "ge" in meta else None
    hi = ("<", meta["lt"]) if "lt" in meta else ("<=", meta["le"]) if "le" in meta else None
    if lo and hi:
        return f"in {'(' if lo[0] == '>' else '['}{fmt_num(lo[1])}, {fmt_num(hi[1])}{')' if hi[0] == '<' else ']'}"
    if lo or hi:
        op, x = lo or hi
        return f"{op} {fmt_num(x)}"
    return None


def _in_range(v, meta) -> bool:
    return (("gt" not in meta or v > meta["gt"]) and ("ge" not in meta or v >= meta["ge"])
            and ("lt" not in meta or v < meta["lt"]) and ("le" not in meta or v <= meta["le"]))


def check_field(f: dataclasses.Field, v) -> str | None:
    """The problem with one field's value, from its rules in metadata; None if fine."""
    meta, name = f.metadata, f.name
    if v is None:
        return f"{name} is required" if meta.get("required") else None
    if "choices" in meta:
        choices = meta["choices"]
        values = v if isinstance(v, list) else [v]
        bad = [x for x in values if x not in choices]
        if bad:
            close = difflib.get_close_matches(str(bad[0]), choices, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            return f"{name} must be one of {', '.join(choices)}, got {bad[0]!r}{hint}"
    if _is_number(v):
        # every number must be finite and of a sane size, whatever the field's own range says (nan passes no
        # comparison, so a range alone would let it through on fields with only an upper or no bound)
        if isinstance(v, float) and not math.isfinite(v):
            return f"{name} must be a finite number, got {v}"
        if "le" not in meta and "lt" not in meta:
            limit = meta.get("max", FLOAT_LIMIT if isinstance(v, float) else INT_LIMIT)
            if abs(v) > limit:
                bound = f"at most {fmt_num(limit)}" if v > 0 else f"at least {fmt_num(-limit)}"
                return f"{name} must be {bound}, got {fmt_num(v)}"
    rng = _range_text(meta)
    if rng:
        allow = meta.get("allow", ())
        if not _is_number(v):
            return f"{name} must be a number, got {v!r}"
        if v not in allow and not _in_range(v, meta):
            want = " or ".join([f"{fmt_num(a)}{meta.get('allow_help', '')}" for a in allow] + [rng])
            return f"{name} must be {want}, got {fmt_num(v)}"
    return None


class Validated:
    """validate() for the stage dataclasses: per-field rules from metadata, then the class's cross-field rules."""

    def _problems(self) -> list[tuple[str | None, str]]:
        """(field name or None for cross-field rules, problem) pairs."""
        out = []
        for f in fields(self):
            p = check_field(f, getattr(self, f.name))
            if p:
                out.append((f.name, p))
        bad = {name for name, _ in out}
        out += [(None, p) for p in self._cross_checks(bad)]
        return out

    def _cross_checks(self, bad: set[str]) -> list[str]:
        """Rules between fields; `bad` names fields that already failed on their own (rules using them skip)."""
        return []

    def validate(self) -> list[str]:
        """Every problem with this config, as messages like "lr must be > 0, got 0"; [] if it is valid."""
        return [p for _, p in self._problems()]

def name_hint(given: str, valid: list[str], spell=lambda name: f"'{name}'") -> str | None:
    """What to tell a user who wrote the unknown key or flag `given` (a recipe key, or a flag: dashes and
    underscores are the same here) when the valid names are `valid`: TRL's name for an rlchat setting (TRL_NAMES),
    the valid name spelled with '_' for '-' (or back), or a close match. None when nothing is close: a far-fetched
    "did you mean" (--dtype -> --dataset) misleads more than none. `spell` writes a valid name as the user would
    type it ("'lr'" in a recipe, "--lr" on the command line)."""
    key = given.lstrip("-").replace("-", "_")
    if key in TRL_NAMES:
        target, note = TRL_NAMES[key]
        if target is None:
            return f"TRL's {key} has no counterpart in rlchat: {note}"
        if target in valid:
            return f"did you mean {spell(target)}? rlchat's name for TRL's {key}" + (f"; {note}" if note else "")
        return f"TRL's {key} is {target} in rlchat, which this command does not have"
    if key in valid:
        return f"did you mean {spell(key)}?"
    candidates = {name: name for name in valid}
    candidates.update({alias: target for alias, (target, _) in TRL_NAMES.items() if target in valid})
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.75)
    return f"did you mean {spell(candidates[close[0]])}?" if close else None


def unknown_key(key: str, where: str, valid: list[str], command: str) -> str:
    """The problem of an unknown recipe key: with a hint (name_hint), else the few nearest valid keys (the full
    list is `--help`'s job: 60 names in an error message hide the problem)."""
    msg = f"unknown key '{key}' in {where}"
    hint = name_hint(key, valid)
    if hint:
        return f"{msg} ({hint})"
    near = difflib.get_close_matches(key, valid, n=3, cutoff=0)
    return f"{msg}; the nearest keys there: {', '.join(near)} (every key: `{command} --help`)"
