"""Shared fixtures: tiny models built offline from a config, the demo data, helpers to snapshot a run dir."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="module")
def one_thread_per_module():
    """One torch thread while a module's tests run (reproducible numbers, no oversubscription on shared cores)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer, hidden-64 Llama with a BPE tokenizer trained on the demo task's text (random init)."""
    from rlchat.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", arch="llama", size="tiny", seed=0)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> dict:
    """The built-in demo task's files: sft.jsonl, pairs.jsonl, prompts.jsonl (and whatever else it writes)."""
    from rlchat.demo.task import write_demo_data

    return write_demo_data(tmp_path_factory.mktemp("demo-data"), seed=0)


def snapshot(path: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under path (empty if path does not exist)."""
    path = Path(path)
    if not path.exists():
        return {}
    out = {}
    for p in sorted(path.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(path))] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_dir():
            out[str(p.relative_to(path)) + "/"] = "dir"
    return out


def interrupt_trainer_at(monkeypatch, step: int) -> None:
    """Ctrl-C in the middle of a Trainer stage: rlchat's progress callback raises KeyboardInterrupt once optimizer
    step `step` is done (after the checkpoints due by then). `monkeypatch.undo()` lets the rerun finish."""
    from rlchat.progress import TrainerProgress

    original = TrainerProgress.on_step_end

    def interrupted(self, args, state, control, **kwargs):
        original(self, args, state, control, **kwargs)
        if state.global_step == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(TrainerProgress, "on_step_end", interrupted)
