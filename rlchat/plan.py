"""Dry runs: resolve a recipe, validate every setting, check local datasets, and print the plan without loading
any weights.

`rlchat plan recipe.yaml` plans every stage the recipe has a section for; `rlchat <stage> --dry-run` plans one.
For each stage the plan says which model and dataset it will use, the dataset's detected format and size (local
files are read and checked; Hub datasets cannot be checked offline and are marked so), and the model's total and
trainable parameters. Parameters are counted on a model built on torch's `meta` device from its config (no weights
are allocated or read): the config comes from a local directory, the Hugging Face cache, or - offline, for a few
common Hub models - the built-in `KNOWN_CONFIGS` table below.
"""
from __future__ import annotations

import re
from pathlib import Path

from rlchat.errors import ConfigError, RlchatError

# Architecture facts of common Hub models (from their public config.json), so a dry run can count parameters
# without network access. Only what AutoConfig needs to build the model skeleton.
KNOWN_CONFIGS = {
    "Qwen/Qwen2.5-0.5B-Instruct": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864,
                                       num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                       vocab_size=151936, tie_word_embeddings=True),
    "Qwen/Qwen2.5-0.5B": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                              num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                              tie_word_embeddings=True),
    "meta-llama/Llama-3.2-1B-Instruct": dict(model_type="llama", hidden_size=2048, intermediate_size=8192,
                                             num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                                             vocab_size=128256, tie_word_embeddings=True, head_dim=64),
    "meta-llama/Llama-3.2-1B": dict(model_type="llama", hidden_size=2048, intermediate_size=8192,
                                    num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                                    vocab_size=128256, tie_word_embeddings=True, head_dim=64),
}

STAGE_SECTIONS = ("sft", "reward", "ppo", "grpo", "rloo", "dpo", "eval")


def _model_config(spec: str, trust_remote_code: bool = False):
    """(config, where it came from) without downloading anything; (None, reason) if unknown offline."""
    from transformers import AutoConfig

    from rlchat import gguf, models

    if gguf.is_gguf_spec(spec):  # the file's metadata: nothing converted, no tensor read
        return gguf.read_config(spec), "GGUF metadata"
    if models.is_local(spec):
        if not Path(spec).is_dir():
            raise RlchatError(f"model directory not found: {spec}", "fix the path in the recipe or build it "
                              "first (e.g. `rlchat new-model`)")
        return AutoConfig.from_pretrained(spec, trust_remote_code=trust_remote_code), "local config.json"
    try:
        return AutoConfig.from_pretrained(spec, local_files_only=True), "Hugging Face cache"
    except Exception:  # noqa: BLE001 - not cached: fall back to the table
        pass
    if spec in KNOWN_CONFIGS:
        known = dict(KNOWN_CONFIGS[spec])
        return AutoConfig.for_model(known.pop("model_type"), **known), "built-in table (offline)"
    return None, "Hub model not in the local cache; parameters not counted offline"


def count_params(config, cfg) -> dict:
    """Total and trainable parameters of the model `config` describes, under the stage's LoRA settings."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    if getattr(cfg, "full", False):
        return {"total": total, "trainable": total, "mode": "full"}
    targets = getattr(cfg, "lora_target_modules", "all-linear")
    regex = targets[3:] if isinstance(targets, str) and targets.startswith("re:") else None
    if isinstance(targets, str) and targets != "all-linear" and regex is None:
        targets = [t.strip() for t in targets.split(",")]
    out_emb = model.get_output_embeddings()
    r = getattr(cfg, "lora_r", 16)
    lora = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is out_emb:
            continue
        if (re.fullmatch(regex, name) if regex is not None else
                targets == "all-linear" or any(name == t or name.endswith("." + t) for t in targets)):
            lora += r * (module.in_features + module.out_features)
    return {"total": total, "trainable": lora, "mode": f"lora r={r}"}


def _dataset_check(stage: str, spec: str | None, cfg) -> dict:
    from rlchat import data
    from rlchat.mixtures import parse_mixture

    if not spec:
        return {"spec": None, "note": "from the run (see the stage's defaults)"}
    if not all(data.looks_like_path(name) for name, _ in parse_mixture(spec)):  # (a mixture: every input)
        return {"spec": spec, "note": "Hub dataset: not checked offline"}
    ds = data.load_any(spec, split=cfg.split, config=getattr(cfg, "dataset_config", None))
    if stage == "sft":
        fmt = data.detect_sft_format(ds)
    elif stage in ("reward", "dpo"):
        fmt = data.detect_preference_format(ds)
    else:
        fmt = data.detect_prompt_column(ds)
    return {"spec": spec, "rows": len(ds), "format": fmt}


def plan_stage(stage: str, cfg, base_model: str | None = None) -> dict:
    """The plan of one resolved stage config; raises RlchatError on a problem a real run would hit first.
    base_model: the pipeline's base (the sft stage's model), used to count parameters of later stages."""
    own_model = getattr(cfg, "model", None)
    model_spec = own_model or base_model
    described = own_model or ("the run's policies" if stage == "eval" else "the run's SFT model")
    entry = {"stage": stage, "run_dir": cfg.run_dir, "model": described,
             "dataset": _dataset_check(stage, getattr(cfg, "dataset", None), cfg)}
    if stage == "eval" and getattr(cfg, "judge", None):
        entry["judge"] = cfg.judge
    if model_spec and stage != "eval":
        config, source = _model_config(model_spec, getattr(cfg, "trust_remote_code", False))
        entry["model_config"] = source
        if config is not None:
            entry["params"] = count_params(config, cfg)
            if stage == "ppo" and not cfg.full:  # two trainable adapters: policy and value
                entry["params"]["trainable"] *= 2
                entry["params"]["mode"] += " x2 (policy, value)"
    for key in ("epochs", "max_steps", "lr", "batch_size", "episodes", "response_length", "kl_coef", "beta"):
        if hasattr(cfg, key):
            entry.setdefault("settings", {})[key] = getattr(cfg, key)
    return entry


def plan_recipe(recipe: str, overrides: dict | None = None) -> list[dict]:
    """Plan every stage the recipe has a section for, in pipeline order; all config problems at once."""
    from rlchat.config import STAGE_CONFIGS, load_recipe, resolve

    raw = load_recipe(recipe)
    stages = [s for s in STAGE_SECTIONS if s in raw]
    if not stages:
        raise ConfigError(f"{recipe} has no stage section", "add at least one of: " + ", ".join(STAGE_SECTIONS))
    problems, cfgs = [], {}
    for stage in stages:
        try:
            cfgs[stage] = resolve(STAGE_CONFIGS[stage], stage, recipe, dict(overrides or {}))
        except ConfigError as err:
            for p in err.problems:  # an unknown recipe key is the same problem for every stage: said once
                line = p if p.startswith("unknown key ") else f"{stage}: {p}"
                if line not in problems:
                    problems.append(line)
    if problems:
        raise ConfigError(sorted(set(problems), key=problems.index),
                          "fix the keys and values listed; each stage command's --help describes every option",
                          subject=f"recipe {recipe}")
    base = getattr(cfgs.get("sft"), "model", None)
    return [plan_stage(stage, cfgs[stage], base_model=base) for stage in stages]


def print_plan(entries: list[dict]) -> None:
    from rich.table import Table

    from rlchat.progress import console

    table = Table(title="rlchat plan (dry run: no weights loaded, nothing written)")
    for col in ("stage", "model", "dataset", "parameters", "settings"):
        table.add_column(col, overflow="fold")
    for e in entries:
        ds = e["dataset"]
        ds_text = ds.get("spec") or ""
        if "rows" in ds:
            ds_text += f"\n{ds['rows']} rows, {ds['format']}"
        elif ds.get("note"):
            ds_text += f"\n({ds['note']})"
        params = e.get("params")
        p_text = (f"{params['trainable'] / 1e6:.2f}M trainable of {params['total'] / 1e6:.1f}M ({params['mode']})"
                  if params else e.get("model_config", "-"))
        settings = ", ".join(f"{k}={v}" for k, v in e.get("settings", {}).items())
        table.add_row(e["stage"], str(e["model"]), ds_text, p_text, settings)
    console.print(table)
