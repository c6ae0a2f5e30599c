"""Progress display and metrics logging shared by the stages.

`TrainerProgress` is a transformers `TrainerCallback`: it draws one rich progress bar (pass `disable_tqdm=True`
to the trainer so tqdm does not draw a second one) and appends every log dict the trainer emits as one JSON row
to `metrics.jsonl` (train loss, eval loss, learning rate, ... with `step` and `epoch`).
`stage_progress()` gives the same bar for hand-written loops (PPO, eval); `Trackers` mirrors such a loop's
metrics rows to tensorboard or wandb (`--report-to`; `check_report_to` says early when the package is missing).
`quiet_libraries()` silences the libraries' own bars and chatter. Progress goes to stderr, so `--json` output on
stdout stays machine-readable.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from rlchat.errors import ConfigError

# RLCHAT_FORCE_TERMINAL: set by `--num-processes` re-launch (rlchat/launch.py), whose children write to a pipe
# In a multi-process run only the main process (RANK 0) prints; the others' console is quiet.
console = Console(stderr=True, highlight=False,
                  force_terminal=True if os.environ.get("RLCHAT_FORCE_TERMINAL") == "1" else None,
                  quiet=os.environ.get("RANK", "0") not in ("", "0"))


def stage_progress() -> Progress:
    """A rich progress bar with a free-form `info` field (e.g. "loss 1.23")."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


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


class Trackers:
    """Optional tensorboard / wandb mirrors of metrics.jsonl (metrics.jsonl is always written)."""

    def __init__(self, kind: str, stage_dir: Path, config: dict):
        self.tb = self.wandb = None
        if kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(stage_dir / "tensorboard"))
        elif kind == "wandb":
            import wandb

            self.wandb = wandb
            wandb.init(project=os.environ.get("WANDB_PROJECT", "rlchat"), name=stage_dir.parent.name,
                       config=config, resume="allow", dir=str(stage_dir))

    def log(self, row: dict, step: int) -> None:
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def check_report_to(kind: str) -> None:
    import importlib.util

    need = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(kind)
    if need and importlib.util.find_spec(need) is None:
        raise ConfigError(f"--report-to {kind} needs the '{need}' package, which is not installed",
                          f"pip install {need}, or pass --report-to none")


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


try:  # transformers is a hard dependency of the stages, but keep this module importable without it
    from transformers import TrainerCallback as _Base
except ImportError:  # pragma: no cover
    _Base = object


class TrainerProgress(_Base):
    """Rich progress bar + metrics.jsonl writer for transformers/TRL trainers."""

    def __init__(self, metrics_path: str | Path, description: str, show_keys=("loss", "eval_loss")):
        self.metrics_path = Path(metrics_path)
        self.description = description
        self.show_keys = show_keys
        self.progress: Progress | None = None
        self.task = None
        self.info: dict[str, float] = {}
        self.t0 = time.time()

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.progress = stage_progress()
        self.progress.start()
        self.task = self.progress.add_task(self.description, total=state.max_steps, info="")
        self.progress.update(self.task, completed=state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        from rlchat.fileio import append_jsonl

        row = {"step": state.global_step, "epoch": _clean(state.epoch), "time_s": round(time.time() - self.t0, 3)}
        row.update({k: _clean(v) for k, v in logs.items()})
        append_jsonl(self.metrics_path, row)
        for key in self.show_keys:
            if isinstance(logs.get(key), (int, float)):
                self.info[key] = logs[key]
        if self.progress is not None:
            text = "  ".join(f"{k} {v:.4g}" for k, v in self.info.items())
            self.progress.update(self.task, info=text)

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)
            self.progress.stop()
            self.progress = None
