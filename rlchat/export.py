"""Use a run's policy outside rlchat: `export` writes a standalone model, `chat` talks to it.

* `export(run_dir, stage, out)`: merges the stage's LoRA adapters into the base weights (sft: base + SFT adapter;
  ppo: that, then the PPO policy adapter) and writes one plain transformers model directory:
      config.json, generation_config.json (eos and pad set), model.safetensors (sharded when large),
      tokenizer files with the chat template, rlchat_export.json (where it came from).
  `AutoModelForCausalLM.from_pretrained(OUT)` loads it with no peft and no rlchat; vLLM and TGI serve it as is.
  The weights are saved in the base checkpoint's dtype (e.g. bfloat16) after merging in the loaded precision.
  Written atomically: a tmp directory next to OUT, renamed into place at the end.
* `chat(run_dir, stage)`: an interactive multi-turn chat in the terminal with tokens streamed as they are
  generated; `chat(..., prompt="...")` answers once, prints the answer on stdout and returns it.

    rlchat export runs/demo --stage ppo exported/demo-ppo
    rlchat chat runs/demo --stage ppo --prompt "Tell me about the red apple."
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

from rlchat.errors import RlchatError, RunDirError

EXPORT_STAGES = ("sft", "ppo", "ppo-best", "grpo", "rloo", "dpo")  # ppo-best: RUN/ppo/best (ppo --eval-every)
CHAT_COMMANDS = "/help lists the commands, /reset starts a new conversation, /exit (or Ctrl-D) quits"


# ------------------------------------------------------------------------------------------------- loading


def _record_stage(stage: str) -> str:
    """The manifest stage that holds `stage`'s policy (ppo-best lives in the ppo stage)."""
    return "ppo" if stage == "ppo-best" else stage


def stage_base(run, stage: str) -> str:
    """"sft" when the stage's policy sits on the run's SFT model, else the --model it started from (a run without
    an SFT stage: an instruct model, `rlchat ppo --model M`), as the stage's outputs record it."""
    if stage == "sft":
        return "sft"
    return ((run.record(_record_stage(stage)) or {}).get("outputs") or {}).get("base") or "sft"


def check_stage(run_dir, stage: str):
    """The RunDir, after checking that `stage` is a policy stage that finished in it; RlchatError otherwise."""
    from rlchat.rundir import RunDir

    if stage not in EXPORT_STAGES:
        raise RlchatError(f"stage '{stage}' has no policy", f"use one of: {', '.join(EXPORT_STAGES)}")
    run = RunDir(run_dir)
    if not run.exists():
        raise RunDirError(f"no run at {run.path} (no run.json)", "pass the --run-dir you trained in")
    rec = run.record(_record_stage(stage))
    if not rec or rec.get("status") != "done":
        status = rec.get("status") if rec else "not run"
        other = [s for s in EXPORT_STAGES if s != stage and (run.record(s) or {}).get("status") == "done"]
        fix = (f"run `rlchat {stage} --run-dir {run.path}` first" +
               (f", or use --stage {other[0]}" if other else ""))
        raise RunDirError(f"stage '{stage}' in {run.path} is {status}, so it has no policy to use", fix)
    if stage_base(run, stage) == "sft":  # else the stage started from a --model, no SFT stage needed
        run.require_done("sft", f"rerun `rlchat sft --run-dir {run.path} --overwrite`")
    if stage == "ppo-best" and not (rec.get("outputs") or {}).get("best"):
        raise RunDirError(f"the ppo stage in {run.path} kept no best policy (it ran without --eval-every)",
                          f"use --stage ppo, or rerun `rlchat ppo --run-dir {run.path} --eval-every 10 --overwrite`")
    return run


def load_policy(run_dir, stage: str = "ppo", merge: bool = True, trust_remote_code: bool = False,
                device: str | None = None):
    """(model, tokenizer) of a finished stage's policy. sft: base with the SFT adapter merged (or the full SFT
    model); ppo: that plus the PPO policy adapter, merged when `merge` (else a PeftModel)."""
    from rlchat.run_models import load_base_causal, load_ppo_policy, load_sft_policy, resolve_base

    run = check_stage(run_dir, stage)
    base = stage_base(run, stage)
    if base == "sft":
        model, tokenizer = load_sft_policy(run.path, trust_remote_code=trust_remote_code)
    else:  # no SFT stage: the policy's adapter sits on the model the stage started from
        model, tokenizer = load_base_causal(run, resolve_base(run, base), trust_remote_code)
    if stage != "sft":  # a policy stage: its adapter (or full model) as the run's manifest records it
        model, shared = load_ppo_policy(run, model, trust_remote_code, "best" if stage == "ppo-best" else "policy",
                                        loaded_base=None if base == "sft" else base, stage=_record_stage(stage))
        if shared and merge:
            model = model.merge_and_unload()
    model.eval()
    if device is not None:
        model.to(device)
    return model, tokenizer


# -------------------------------------------------------------------------------------------------- export


def checkpoint_dtype(spec: str, trust_remote_code: bool = False):
    """The torch dtype the checkpoint `spec` was saved in (config.dtype / torch_dtype), or None if unknown."""
    import torch

    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(spec, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - only a preference; keep the loaded dtype
        return None
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def remove_killed_exports(out: Path) -> list[str]:
    """Delete the model-sized tmp directories (`.OUT.tmp-export-pid<PID>-*`) that exports to `out` killed before
    their final rename left next to it; those of a live process (another export running now) are kept."""
    from rlchat.progress import console
    from rlchat.pids import pid_alive

    removed = []
    for p in Path(out).parent.glob(f".{Path(out).name}.tmp-export-pid*"):
        m = re.search(r"\.tmp-export-pid(\d+)-", p.name)
        if m and p.is_dir() and not pid_alive(int(m.group(1))):
            import shutil

            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    if removed:
        console.print(f"[yellow]export: removed {len(removed)} unfinished export(s) a killed process left: "
                      f"{', '.join(removed)}[/]", highlight=False)
    return removed


def export(run_dir, stage: str, out, overwrite: bool = False, trust_remote_code: bool = False) -> Path:
    """Write the stage's policy as a standalone model + tokenizer to `out`; returns `out` as a Path.

    RlchatError (nothing written) for a stage that has not finished, or an `out` that exists and is not an empty
    directory unless `overwrite` (then the old directory is replaced only once the new one is complete).
    """
    from rlchat.progress import console
    from rlchat.run_models import sft_base_spec
    from rlchat.fileio import atomic_dir

    from rlchat.rundir import check_output_path

    out = Path(out).expanduser()
    # 1. validate before loading anything
    run = check_stage(run_dir, stage)
    check_output_path(out, "OUT")
    if out.exists():
        if not out.is_dir():
            raise RlchatError(f"{out} exists and is a file", "choose a new directory for the exported model")
        if any(out.iterdir()) and not overwrite:
            raise RlchatError(f"{out} exists and is not empty", "choose a new directory or pass --overwrite")
    if out.resolve() == run.path.resolve() or run.path.resolve().is_relative_to(out.resolve()):
        raise RlchatError(f"{out} would replace the run directory {run.path}", "export to a directory outside it")

    # 2. merge
    t0 = time.time()
    from rlchat.progress import quiet_libraries

    quiet_libraries()
    from rlchat.run_models import base_model_spec

    model, tokenizer = load_policy(run.path, stage, merge=True, trust_remote_code=trust_remote_code)
    base = stage_base(run, stage)
    model = ready_to_serve(model, tokenizer, checkpoint_dtype(base_model_spec(run) if base == "sft" else base,
                                                              trust_remote_code))

    # 3. write atomically
    remove_killed_exports(out)
    with atomic_dir(out, tag=f"export-pid{os.getpid()}-") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        rec = run.record(stage) or {}
        info = {"run_dir": str(run.path.resolve()), "stage": stage,
                "base_model": _merged_base(run, stage),
                "sft_base_model": sft_base_spec(run.record("sft") or {}),
                "stage_ended": rec.get("ended"), "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "dtype": str(model.dtype).removeprefix("torch."),
                "adapters_merged": _merged_adapters(run, stage)}
        (tmp / "rlchat_export.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    console.print(f"[bold green]export:[/] {stage} policy of {run.path} merged and written to {out} "
                  f"({time.time() - t0:.0f}s); load it with AutoModelForCausalLM.from_pretrained('{out}')",
                  highlight=False, soft_wrap=True)
    return out


def _merged_base(run, stage: str) -> str | None:
    """The model the exported stage's adapter was merged into: for ppo the SFT model (RUN/sft/merged or
    RUN/sft/model; "RUN/sft" for older runs), or the --model PPO was given; for sft the model SFT started from."""
    from rlchat.run_models import adapter_base_name, sft_base_spec

    if stage == "sft":
        return sft_base_spec(run.record("sft") or {})
    outputs = (run.record(_record_stage(stage)) or {}).get("outputs") or {}
    name = outputs.get("base") or "sft"
    base = adapter_base_name(run, None if name == "sft" else name)
    return str(run.path.resolve() / "sft") if base == "sft" else base


def ready_to_serve(model, tokenizer, dtype=None):
    """`model` in `dtype` (the checkpoint's: merging runs in the loaded precision), with the generation config
    servers read: eos ends a reply, pad for batching (the chat template travels in the tokenizer)."""
    if dtype is not None and dtype != model.dtype:
        model = model.to(dtype)
    gen = model.generation_config
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    old = gen.eos_token_id
    for x in ([old] if isinstance(old, int) else list(old or [])):
        if x not in eos:
            eos.append(x)
    gen.eos_token_id = eos[0] if len(eos) == 1 else (eos or None)
    gen.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        gen.bos_token_id = tokenizer.bos_token_id
    text_config = model.config.get_text_config()
    text_config.pad_token_id = tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        text_config.eos_token_id = tokenizer.eos_token_id
    return model


def _merged_adapters(run, stage: str) -> list[str]:
    merged = []
    if stage_base(run, stage) == "sft" and ((run.record("sft") or {}).get("outputs") or {}).get("kind") == "lora":
        merged.append("sft/adapter")
    if stage != "sft":
        key = "best" if stage == "ppo-best" else "policy"
        rel = ((run.record(_record_stage(stage)) or {}).get("outputs") or {}).get(key) or \
            f"{_record_stage(stage)}/{key}"
        if (run.path / rel / "adapter_config.json").is_file():
            merged.append(rel)
    return merged


# ---------------------------------------------------------------------------------------------------- chat


def _generate_reply(model, tokenizer, messages: list[dict], max_new_tokens: int, temperature: float,
                    top_p: float, streamer=None) -> str:
    import torch

    from rlchat.generation import (cut_at_stop, decode_responses, encode_prompt, generation_config, prompt_limit,
                                   response_lists, stop_token_ids)

    ids = encode_prompt(tokenizer, messages, prompt_limit(model, max_new_tokens))
    stop_ids = stop_token_ids(model, tokenizer)
    gen = generation_config(max_new_tokens, temperature, top_p, stop_ids, tokenizer.pad_token_id,
                            bos_id=tokenizer.bos_token_id)
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=gen,
                             streamer=streamer)
    reply_ids, reply_mask, _ = cut_at_stop(out[:, input_ids.shape[1]:], stop_ids, tokenizer.pad_token_id)
    return decode_responses(tokenizer, response_lists(reply_ids, reply_mask), stop_ids)[0].strip()


def _fit_history(tokenizer, messages: list[dict], limit: int | None, reserve: int) -> list[dict]:
    """Drop the oldest turns (keeping a system message) until the prompt fits the model's context."""
    if limit is None:
        return messages
    from rlchat.generation import encode_prompt

    msgs = list(messages)
    while len(msgs) > 1 and len(encode_prompt(tokenizer, msgs)) > limit - reserve:
        drop = 1 if msgs[0]["role"] == "system" else 0
        if len(msgs) - drop <= 1:
            break
        del msgs[drop]
    return msgs


def _check_chat_settings(max_new_tokens: int, temperature: float, top_p: float, seed: int | None) -> None:
    """RlchatError for a chat setting out of range (checked before any model loads)."""
    import math

    if not 0 < max_new_tokens <= 2**31 - 1:
        raise RlchatError(f"max_new_tokens must be > 0, got {max_new_tokens}", "pass --max-new-tokens 256")
    if not math.isfinite(temperature) or temperature > 1e6:
        raise RlchatError(f"temperature must be a finite number, got {temperature}", "pass 0 for greedy decoding "
                          "or e.g. 0.7")
    if seed is not None and not 0 <= seed <= 2**32 - 1:
        raise RlchatError(f"seed must be in [0, 4294967295], got {seed}", "pass e.g. --seed 0")
    if temperature < 0:
        raise RlchatError(f"temperature must be >= 0, got {temperature}", "pass 0 for greedy decoding or e.g. 0.7")
    if not 0 < top_p <= 1:
        raise RlchatError(f"top_p must be in (0, 1], got {top_p}", "pass e.g. --top-p 0.9, or 1 for off")


def chat(run_dir, stage: str = "ppo", prompt: str | None = None, max_new_tokens: int = 256,
         temperature: float = 0.7, top_p: float = 1.0, system: str | None = None, seed: int | None = None,
         trust_remote_code: bool = False) -> str | None:
    """Chat with a stage's policy. With `prompt`: answer once, print it on stdout, return it. Without: a multi-turn
    loop on the terminal, tokens streamed as they are generated; returns None at the end.

    temperature 0 = greedy decoding. The conversation is kept (oldest turns dropped when it outgrows the model's
    context); type /reset for a new one, /exit or Ctrl-D to quit.
    """
    import torch

    from rlchat import models
    from rlchat.progress import console
    from rlchat.progress import quiet_libraries
    from rlchat.generation import max_positions

    _check_chat_settings(max_new_tokens, temperature, top_p, seed)
    check_stage(run_dir, stage)
    quiet_libraries()
    model, tokenizer = load_policy(run_dir, stage, merge=False, trust_remote_code=trust_remote_code,
                                   device=models.pick_device())
    if seed is not None:
        torch.manual_seed(seed)
    base = [{"role": "system", "content": system}] if system else []
    limit = max_positions(model)

    if prompt is not None:
        messages = _fit_history(tokenizer, base + [{"role": "user", "content": prompt}], limit, max_new_tokens)
        reply = _generate_reply(model, tokenizer, messages, max_new_tokens, temperature, top_p)
        print(reply)
        return reply

    from transformers import TextStreamer

    class _Streamer(TextStreamer):
        """Prints decoded text as it arrives (stdout), without the prompt and special tokens."""

        def on_finalized_text(self, text: str, stream_end: bool = False):
            print(text, end="" if not stream_end else "\n", flush=True)

    console.print(f"[bold]chat[/] with the {stage} policy of {run_dir} ({CHAT_COMMANDS})", highlight=False)
    messages = list(base)
    while True:
        try:
            user = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return None
        text = user.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return None
        if text == "/reset":
            messages = list(base)
            console.print("[dim]new conversation[/]")
            continue
        if text.startswith("/") and not text.startswith("//"):  # a command, never sent to the model
            known = text.split()[0] in ("/help", "/?")
            console.print(("" if known else f"unknown command {text.split()[0]}; ") + CHAT_COMMANDS
                          + "; start a line with // to send one that begins with /", highlight=False, markup=False)
            continue
        if text.startswith("//"):
            user = user.replace("//", "/", 1)
        messages.append({"role": "user", "content": user})
        messages = _fit_history(tokenizer, messages, limit, max_new_tokens)
        print("bot> ", end="", flush=True)
        streamer = _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        try:
            reply = _generate_reply(model, tokenizer, messages, max_new_tokens, temperature, top_p, streamer)
        except KeyboardInterrupt:  # stop this answer, keep the session
            print()
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": reply})
        sys.stdout.flush()
