"""Reward sources for PPO: a Python reward function (`--reward-fn`) and reward models read from text; eval judges.

A response's score is a weighted sum of the sources the run has (`combine_scores`):

    score = reward_model_weight * model_score + reward_fn_weight * fn_score,   minus missing_eos_penalty
                                                                               if the response has no EOS
where model_score is the reward model's output, normalised with its held-out statistics when asked:
    model_score = (raw - mean) / std        (RUN/reward/reward_stats.json, `--normalize-reward`)

Sources:
* the run's reward model as a LoRA adapter on the policy's own base: scored inside the shared model
  (rlchat/rollout.py, the "reward" adapter); only its statistics are read here;
* `load_text_reward_model`: any other reward model (a full sequence-classification model, or a SEQ_CLS PEFT adapter
  on another base or tokenizer, `--reward-model PATH`), as a `rlchat.run_models.RewardScorer`. Responses are
  decoded, put back into the reward model's own chat template and re-tokenised with its own tokenizer;
* `load_reward_fn("module:function" | "path/to/file.py:function")`: called once per PPO step on the whole batch,
  `f(prompts: list[str], completions: list[str]) -> list[float]` (one number per completion; higher is better).
  prompts are the user's text (the last user turn), completions the decoded responses without special tokens.
  Only the named module is imported (the current directory is on the import path). Failures are one-line
  ConfigErrors: the stage calls the function once on two dummy prompts before it writes anything.
* eval's `--judge` (`load_judge`, `call_judge`): a function of the same form, loaded by the same rules; its scores
  must be finite.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import math
import os
import sys
from pathlib import Path
from typing import Callable

from rlchat.errors import ConfigError, ModelError, RlchatError, first_line

DUMMY_PROMPTS = ["Tell me about the red apple.", "Hello!"]
DUMMY_COMPLETIONS = ["The red apple is sweet.", ""]


# ---------------------------------------------------------------------------------------------- reward functions


def load_reward_fn(spec: str) -> Callable:
    """Import the function named by `spec`: "package.module:function" or "path/to/file.py:function".

    A dotted module is imported with the current directory first on sys.path (for that import only); a .py path is loaded as a file
    (relative to the current directory). ConfigError (one line) if it cannot be imported or is not callable.
    """
    fix_form = "pass --reward-fn module:function or --reward-fn path/to/file.py:function"
    if not isinstance(spec, str) or ":" not in spec:
        raise ConfigError(f"reward_fn {spec!r} must look like 'module:function' or 'path/file.py:function'",
                          fix_form)
    module_part, _, fn_name = spec.rpartition(":")
    if not module_part or not fn_name:
        raise ConfigError(f"reward_fn {spec!r} must look like 'module:function' or 'path/file.py:function'",
                          fix_form)
    try:
        if module_part.endswith(".py") or os.sep in module_part or "/" in module_part:
            path = Path(module_part).expanduser()
            if path.is_dir():
                raise ConfigError(f"reward_fn path {module_part} is a directory, not a .py file",
                                  f"name the file inside it: --reward-fn {module_part.rstrip('/')}/FILE.py:{fn_name}")
            if not path.is_file():
                raise ConfigError(f"reward_fn file {module_part} does not exist (looked in {os.getcwd()})",
                                  "check the path; relative paths start at the current directory")
            name = f"rlchat_reward_fn_{path.stem}"
            loader_spec = importlib.util.spec_from_file_location(name, path)
            if loader_spec is None or loader_spec.loader is None:
                raise ConfigError(f"reward_fn file {module_part} cannot be imported as Python", "pass a .py file")
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[name] = module
            with contextlib.redirect_stdout(sys.stderr):  # prints at import time must not reach --json's stdout
                loader_spec.loader.exec_module(module)
        else:
            cwd = os.getcwd()
            added = cwd not in sys.path and "" not in sys.path
            if added:  # only for this import: a stray file there must not shadow a module imported later
                sys.path.insert(0, cwd)
            try:
                with contextlib.redirect_stdout(sys.stderr):
                    module = importlib.import_module(module_part)
            finally:
                if added and cwd in sys.path:
                    sys.path.remove(cwd)
    except RlchatError:
        raise
    except ModuleNotFoundError as err:
        parts = module_part.split(".")
        missing_itself = err.name in {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
        if not missing_itself:  # the module exists but imports something that is not installed
            raise ConfigError(f"importing reward_fn module '{module_part}' failed: {err}",
                              "install what it imports, or fix the import") from None
        raise ConfigError(f"reward_fn module '{module_part}' could not be imported: {err}",
                          f"run from the directory that holds it, or use the file form path/to/file.py:{fn_name}"
                          ) from None
    except BaseException as err:  # noqa: BLE001 - any error while importing user code is a config problem
        if isinstance(err, KeyboardInterrupt):
            raise
        raise ConfigError(f"importing reward_fn module '{module_part}' failed: {type(err).__name__}: "
                          f"{first_line(err)}", "fix the error in that module") from None
    if getattr(module, "__file__", None) is None and Path(module_part.replace(".", os.sep)).is_dir():
        # a directory imports as an empty namespace package: say so, not "has no function"
        raise ConfigError(f"reward_fn module '{module_part}' is a directory, not a Python file",
                          f"name the file inside it: --reward-fn {module_part}/FILE.py:{fn_name}")
    fn = getattr(module, fn_name, None)
    if fn is None:
        public = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
        listed = f" (it has: {', '.join(public[:8])})" if public else ""
        raise ConfigError(f"reward_fn module '{module_part}' has no function '{fn_name}'{listed}",
                          "check the name after the colon")
    if not callable(fn):
        raise ConfigError(f"reward_fn '{spec}' is a {type(fn).__name__}, not a function",
                          "point --reward-fn at a function f(prompts, completions) -> list[float]")
    return fn


def call_reward_fn(fn: Callable, spec: str, prompts: list[str], completions: list[str],
                   during: str = "training") -> list[float]:
    """fn(prompts, completions) checked: a list/tuple/array of len(completions) real numbers.

    Exceptions, wrong length and non-numbers raise ConfigError (one line, naming the function). NaN/inf are left
    for the caller's NaN guard (they are numbers, but the stage stops on them).
    """
    try:
        # what user code prints goes to stderr: stdout carries --json output (and `rlchat chat --prompt` answers)
        with contextlib.redirect_stdout(sys.stderr):
            out = fn(list(prompts), list(completions))
    except KeyboardInterrupt:
        raise
    except BaseException as err:  # noqa: BLE001 - user code
        raise ConfigError(f"reward_fn '{spec}' raised {type(err).__name__} during {during}: {first_line(err)}",
                          "fix the function; it is called as f(prompts: list[str], completions: list[str])"
                          ) from None
    if hasattr(out, "tolist") and not isinstance(out, (list, tuple)):
        out = out.tolist()  # numpy arrays and tensors
    if not isinstance(out, (list, tuple)):
        raise ConfigError(f"reward_fn '{spec}' returned {type(out).__name__}, not a list of numbers",
                          f"return one float per completion (a list of {len(completions)} numbers)")
    if len(out) != len(completions):
        raise ConfigError(f"reward_fn '{spec}' returned {len(out)} values for {len(completions)} completions",
                          "return exactly one float per completion, in the same order")
    values = []
    for i, v in enumerate(out):
        if hasattr(v, "item") and not isinstance(v, (bool, int, float)):
            try:
                v = v.item()
            except (ValueError, RuntimeError):
                pass
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"reward_fn '{spec}' returned a {type(v).__name__} at index {i} ({v!r:.40}), "
                              "not a number", "return one float per completion")
        values.append(float(v))
    return values


def check_reward_fn(fn: Callable, spec: str) -> None:
    """Call the function once on two dummy prompts (during validation, before anything is written)."""
    out = call_reward_fn(fn, spec, DUMMY_PROMPTS, DUMMY_COMPLETIONS, during="the check on two dummy prompts")
    bad = [x for x in out if not math.isfinite(x)]
    if bad:  # a function that returns NaN on the check would stop PPO at its first step, after the stage began
        raise ConfigError(f"reward_fn '{spec}' returned a non-finite score ({bad[0]}) during the check on two "
                          "dummy prompts", "return a finite float per completion")


# -------------------------------------------------------------------------------------------------- judges


def _as_judge_error(err: ConfigError) -> ConfigError:
    """The reward-function loader words its errors for PPO's --reward-fn; say --judge instead."""
    def fix(text):
        return text and text.replace("--reward-fn", "--judge").replace("reward_fn", "judge")
    return ConfigError(fix(err.problem), fix(err.fix))


def load_judge(spec: str) -> Callable:
    """An eval judge `module:function` or `path/to/file.py:function` as a callable f(prompts, completions) ->
    scores, imported by `load_reward_fn` (same rules as --reward-fn; errors name --judge)."""
    try:
        return load_reward_fn(spec)
    except ConfigError as err:
        raise _as_judge_error(err) from None


def call_judge(judge: Callable, spec: str, prompts: list[str], completions: list[str],
               during: str = "evaluation") -> list[float]:
    """judge(prompts, completions), checked: one finite number per completion; ConfigError otherwise."""
    try:
        out = call_reward_fn(judge, spec, prompts, completions, during=during)
    except ConfigError as err:
        raise _as_judge_error(err) from None
    bad = [x for x in out if not math.isfinite(x)]
    if bad:
        raise ConfigError(f"judge '{spec}' returned a non-finite score ({bad[0]}) during {during}",
                          "return a finite float per completion")
    return out


# ----------------------------------------------------------------------------------------- text reward models


def read_reward_stats(path: Path) -> dict | None:
    """{"mean", "std", ...} from reward_stats.json, or None if the file is missing. RlchatError if unusable."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        stats = json.loads(path.read_text(encoding="utf-8"))
        mean, std = float(stats["mean"]), float(stats["std"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelError(f"{path} is not a valid reward_stats.json ({first_line(err)})",
                         "rerun the reward stage, or pass --normalize-reward false") from None
    if not (math.isfinite(mean) and math.isfinite(std)) or std <= 0:
        raise ModelError(f"{path} has mean {mean} and std {std}; std must be a positive number",
                         "rerun the reward stage, or pass --normalize-reward false")
    return {**stats, "mean": mean, "std": std}


def load_text_reward_model(path, tokenizer_path=None, base=None, trust_remote_code: bool = False, dtype=None,
                           device: str | None = None):
    """A sequence-classification reward model that reads text (its own tokenizer and chat template), as a
    `rlchat.run_models.RewardScorer`.

    path: a full model directory (config.json + safetensors, an ...ForSequenceClassification with one label), or a
    SEQ_CLS PEFT adapter directory (adapter_config.json; its base is `base` (a model or a spec) or adapter_config's
    base_model_name_or_path). `tokenizer_path` defaults to `path`. Inputs longer than the tokenizer's
    model_max_length are cut at its truncation side (the end, unless the tokenizer says otherwise).
    """
    from rlchat import models
    from rlchat.run_models import RewardScorer

    path = Path(path).expanduser()
    if not path.is_dir():
        raise ModelError(f"reward model directory not found: {path}",
                         "pass a directory with a sequence-classification model (config.json + "
                         "model.safetensors) or a SEQ_CLS PEFT adapter")
    tokenizer = models.load_tokenizer(str(tokenizer_path or path), trust_remote_code=trust_remote_code)
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        model = _load_reward_adapter(path, base, tokenizer, trust_remote_code, dtype)
    else:
        from transformers import AutoModelForSequenceClassification

        if not (path / "config.json").is_file():
            raise ModelError(f"{path} has no config.json or adapter_config.json",
                             "pass a reward model directory written by save_pretrained")
        try:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                str(path), use_safetensors=True, trust_remote_code=trust_remote_code,
                dtype=models.resolve_dtype(dtype), output_loading_info=True, **models.load_kwargs())
        except Exception as err:  # noqa: BLE001
            raise ModelError(f"could not load reward model {path}: {first_line(err)}",
                             "pass a directory with an ...ForSequenceClassification model") from None
        # a causal LM (or any checkpoint without the head) loads "fine" with a RANDOM score head: transformers only
        # warns (and rlchat silences library warnings), and PPO would then optimise noise
        missing = sorted(info.get("missing_keys") or [])
        if missing:
            arch = ", ".join(getattr(model.config, "architectures", None) or ["unknown"])
            raise ModelError(f"reward model {path} has no trained score head: {', '.join(missing[:3])} "
                             f"{'is' if len(missing) == 1 else 'are'} missing from its weights (the checkpoint is a "
                             f"{arch}), so its scores would be random",
                             "pass a trained reward model (an ...ForSequenceClassification checkpoint, or the reward "
                             "adapter of `rlchat train-reward`)")
    if getattr(model.config, "num_labels", 1) != 1:
        raise ModelError(f"reward model {path} has {model.config.num_labels} labels, expected 1 (a score)",
                         "train the reward model with num_labels=1")
    model.config.pad_token_id = tokenizer.pad_token_id
    model.requires_grad_(False)
    model.eval()
    if device is not None:
        model.to(device)
    tokenizer.padding_side = "right"  # as in reward training (the scorer pads on the right itself)
    max_length = getattr(tokenizer, "model_max_length", None)
    max_length = max_length if max_length and max_length < 1_000_000 else None  # "no limit" is a huge number
    keep = "last" if getattr(tokenizer, "truncation_side", "right") == "left" else "first"
    return RewardScorer(model, tokenizer, max_length=max_length, keep=keep)


def _load_reward_adapter(path: Path, base, tokenizer, trust_remote_code: bool, dtype):
    """A SEQ_CLS PEFT adapter merged into a sequence classifier built from its base causal LM."""
    from rlchat import models

    adapter_cfg = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    if adapter_cfg.get("task_type") != "SEQ_CLS":
        raise ModelError(f"{path} is a {adapter_cfg.get('task_type')} adapter, not a reward model (SEQ_CLS)",
                         "pass a reward model adapter saved by `rlchat train-reward`")
    base_model = base if base is not None else adapter_cfg.get("base_model_name_or_path")
    if base_model is None:
        raise ModelError(f"{path}/adapter_config.json names no base model",
                         "pass a full reward model directory instead")
    causal = base_model if not isinstance(base_model, str) else models.load_causal_lm(
        base_model, trust_remote_code=trust_remote_code, dtype=dtype)
    seq = models.seq_cls_from_causal(causal, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    del causal
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(seq, str(path)).merge_and_unload()
    except Exception as err:  # noqa: BLE001
        raise ModelError(f"could not apply reward adapter {path}: {first_line(err)}",
                         "check that it was trained on this base model") from None


# -------------------------------------------------------------------------------------------------- combining


def combine_scores(model_scores, fn_scores, has_eos, model_weight: float, fn_weight: float,
                   stats: dict | None, missing_eos_penalty: float | None):
    """The final (B,) score from the per-source scores (see the module docstring).

    model_scores, fn_scores: (B,) tensors or None (source absent); has_eos: (B,) bool.
    Returns (scores (B,), parts: {"model": normalised model score, "fn": fn score} for the sources present).
    """
    import torch

    parts = {}
    total = torch.zeros(has_eos.shape[0], dtype=torch.float32, device=has_eos.device)
    if model_scores is not None:
        m = model_scores.float()
        if stats is not None:
            m = (m - stats["mean"]) / stats["std"]
        parts["model"] = m
        total = total + model_weight * m
    if fn_scores is not None:
        f = fn_scores.float().to(total.device)
        parts["fn"] = f
        total = total + fn_weight * f
    if missing_eos_penalty is not None:
        total = torch.where(has_eos, total, total - missing_eos_penalty)
    return total, parts
