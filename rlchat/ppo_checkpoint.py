"""PPO checkpoints: RUN/ppo/checkpoints/step-N/, and the weights, optimizer and RNG state they hold.

A checkpoint is written atomically (`rlchat.fileio.atomic_dir`) every `save_every` PPO steps; the newest
`KEEP_CHECKPOINTS` are kept:

    step-N/policy/          the policy adapter (PEFT format; `--full`: model.safetensors)
    step-N/value/           the value adapter (or value_model.json for a shared critic) + value_head.safetensors;
                            absent for grpo/rloo (no value model: RUN/<stage>/checkpoints/step-N/)
    step-N/optimizer.pt     optimizer and scheduler state dicts (torch.save; loaded with weights_only=True)
    step-N/scheduler.pt
    step-N/rng.pt           torch (and CUDA) RNG states of process 0; rng-R.pt for process R > 0
    step-N/state.json       step, episodes, KL controller, prompt-sampler position, layout, score history and the
                            python/numpy RNG states (`rng`; other processes' under `rng_ranks`)

`save_policy` / `save_value` also write the stage's final RUN/ppo/policy/ and RUN/ppo/value/.
`last_checkpoint` skips checkpoints damaged after they were written; `truncate_jsonl` drops the metrics and sample
rows a killed run logged after its last checkpoint, so a resumed run continues exactly where that checkpoint was.
"""
from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path

log = logging.getLogger("rlchat")

KEEP_CHECKPOINTS = 2


def _step_of(path: Path) -> int | None:
    m = re.fullmatch(r"step-(\d+)", path.name)
    return int(m.group(1)) if m and path.is_dir() else None


def last_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete `step-N` (its state.json parses and its policy/value safetensors are whole);
    atomic_dir makes half-written ones invisible, this skips ones damaged afterwards (logged)."""
    from rlchat.models import safetensors_problem

    if not ckpt_dir.is_dir():
        return None
    found = sorted(((s, p) for p in ckpt_dir.iterdir() if (s := _step_of(p)) is not None), reverse=True)
    for _, path in found:
        try:
            json.loads((path / "state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            log.warning("skipping checkpoint %s: state.json is missing or cut short", path)
            continue
        weights = sorted((path / "policy").glob("*.safetensors")) + sorted((path / "value").glob("*.safetensors"))
        problems = [f"{f.relative_to(path)}: {problem}" for f in weights if (problem := safetensors_problem(f))]
        if problems:
            log.warning("skipping damaged checkpoint %s (%s)", path, problems[0])
            continue
        return path
    return None


def save_adapter(peft_model, name: str, out: Path, base_name: str | None) -> None:
    """Adapter `name` as a standalone PEFT adapter dir (loads with PeftModel.from_pretrained as "default")."""
    import copy

    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = get_peft_model_state_dict(peft_model, adapter_name=name)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(out / "adapter_model.safetensors"))
    config = copy.deepcopy(peft_model.peft_config[name])
    config.inference_mode = True
    config.base_model_name_or_path = base_name
    config.save_pretrained(str(out))


def load_adapter(peft_model, name: str, src: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(peft_model, load_file(str(src / "adapter_model.safetensors")), adapter_name=name)


def save_policy(model, out: Path, base_name: str | None) -> None:
    """The policy into `out`: a PEFT adapter, or (--full) a whole model written by save_pretrained."""
    from rlchat.actor_critic import POLICY, _plain

    if model.full:
        _plain(model.policy_lm).save_pretrained(str(out), safe_serialization=True)
    else:
        save_adapter(model.peft_for(POLICY), POLICY, out, base_name)


def save_value(model, out: Path, base_name: str | None) -> None:
    """The value model into `out`: its adapter (or, --full, its backbone weights) + value_head.safetensors."""
    from safetensors.torch import save_file

    from rlchat.actor_critic import VALUE, _plain

    if model.full:
        save_file({k: v.detach().cpu().contiguous() for k, v in _plain(model.value_lm).state_dict().items()
                   if not k.startswith("lm_head")}, str(out / "model.safetensors"))
    elif model.shared_critic:  # the head reads the policy adapter's hidden states: nothing else to save
        (out / "value_model.json").write_text(json.dumps({"value_model": "policy"}) + "\n", encoding="utf-8")
    else:
        save_adapter(model.peft_for(VALUE), VALUE, out, base_name)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.value_head.state_dict().items()},
              str(out / "value_head.safetensors"))


def load_weights(model, src: Path) -> None:
    """Policy and value weights back from a checkpoint written by save_policy / save_value."""
    from safetensors.torch import load_file

    from rlchat.actor_critic import POLICY, VALUE, _plain

    if model.full:
        _plain(model.policy_lm).load_state_dict(load_file(str(src / "policy" / "model.safetensors")), strict=False)
        _plain(model.value_lm).load_state_dict(load_file(str(src / "value" / "model.safetensors")), strict=False)
    else:
        load_adapter(model.peft_for(POLICY), POLICY, src / "policy")
        if not model.shared_critic:
            load_adapter(model.peft_for(VALUE), VALUE, src / "value")
    if model.has_critic:
        model.value_head.load_state_dict(load_file(str(src / "value" / "value_head.safetensors")))


def rng_state() -> tuple[dict, dict]:
    """(JSON-able python + numpy RNG states, tensor RNG states for torch.save)."""
    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    plain = {"python": [version, list(internal), gauss],
             "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state_all()
    return plain, tensors


def set_rng_state(plain: dict, tensors: dict) -> None:
    import numpy as np
    import torch

    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(tensors["cuda"])


def save_checkpoint(ckpt_dir: Path, step: int, model, optimizer, scheduler, state: dict, base_name,
                    rngs: list | None = None) -> Path:
    """RUN/ppo/checkpoints/step-N, atomically; then drop all but the newest KEEP_CHECKPOINTS.

    rngs: [(plain, tensors) of rank 0, of rank 1, ...] in a multi-process run (rng_state() of each process,
    gathered by the caller); rank r > 0 gets rng-r.pt and state["rng_ranks"][r]."""
    import torch

    from rlchat.fileio import atomic_dir

    final = ckpt_dir / f"step-{step}"
    rngs = rngs or [rng_state()]
    plain, tensors = rngs[0]
    if len(rngs) > 1:
        state = {**state, "rng_ranks": [p for p, _ in rngs]}
    with atomic_dir(final) as tmp:
        (tmp / "policy").mkdir()
        save_policy(model, tmp / "policy", base_name)
        if model.has_critic:
            (tmp / "value").mkdir()
            save_value(model, tmp / "value", base_name)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(tensors, tmp / "rng.pt")
        for r, (_, t) in enumerate(rngs[1:], start=1):
            torch.save(t, tmp / f"rng-{r}.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "rng": plain}) + "\n", encoding="utf-8")
    steps = sorted((s, p) for p in ckpt_dir.iterdir() if (s := _step_of(p)) is not None)
    for _, old in steps[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model, optimizer, scheduler, rank: int = 0) -> dict:
    """Restore weights, optimizer, scheduler and this process's RNG from `path`; returns state.json (step,
    episodes, ...)."""
    import torch

    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    load_weights(model, path)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    if rank == 0:
        set_rng_state(state["rng"], torch.load(path / "rng.pt", weights_only=True))
    else:
        set_rng_state(state["rng_ranks"][rank], torch.load(path / f"rng-{rank}.pt", weights_only=True))
    return state


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Drop rows logged after `max_step` (written by the run that crashed after its last checkpoint)."""
    from rlchat.fileio import atomic_write_text

    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= max_step:
                keep.append(line)
        except ValueError:
            continue  # a line cut by the crash
    atomic_write_text(path, "".join(line + "\n" for line in keep))
