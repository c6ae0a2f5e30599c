"""Progress display and metrics logging shared by the stages.

`TrainerProgress` is a transformers `TrainerCallback`: it draws one rich progress bar (pass `disable_tqdm=True`
to the trainer so tqdm does not draw a second one) and appends every log dict the trainer emits as one JSON row
to `metrics.jsonl` (train loss, eval loss, learning rate, ... with `step` and `epoch`).
`stage_progress()` gives the same bar for hand-written loops (PPO, eval); `Trackers` mirrors such a loop's
metrics rows to tensorboard or wandb (`--report-to`; `check_report_to` says early when the package is missing).
`quiet_libraries()` silences the libraries' own bars and chatter. Progress goes to stderr, so `--json` output on
stdout stays machine-readable. Without a terminal (CI logs, a pipe) the bars become plain lines (`StageProgress`):
step, metrics, elapsed and ETA at least every 10 s or 5% of the work; the ETA is the average pace of the steps
done so far (rich's own looks at the last 30 s only, which a minutes-long PPO step never fills).
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from rlchat.errors import ConfigError

# RLCHAT_FORCE_TERMINAL: set by `--num-processes` re-launch (rlchat/launch.py), whose children write to a pipe
# In a multi-process run only the main process (RANK 0) prints; the others' console is quiet.
# soft_wrap: messages are never cut into 80-column pieces (rich's width when stderr is a file or pipe); a terminal
# wraps long lines itself
console = Console(stderr=True, highlight=False, soft_wrap=True,
                  force_terminal=True if os.environ.get("RLCHAT_FORCE_TERMINAL") == "1" else None,
                  quiet=os.environ.get("RANK", "0") not in ("", "0"))


PLAIN_EVERY_S = 10.0      # without a terminal: a progress line at least this often (when the loop reports) ...
PLAIN_EVERY_FRACTION = 0.05  # ... and each time another 5% of the work is done


def _hms(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-:--:--"
    seconds = int(round(max(0.0, seconds)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def eta_seconds(task) -> float | None:
    """Time left from the average pace of every step completed since the bar started (None before the first).

    rich's own estimate only looks at the last 30 s; a PPO step can take minutes, so it showed `-:--:--` for a
    whole run. Steps restored from a checkpoint (the `first` field: where the bar started) do not count.
    """
    done = task.completed - task.fields.get("first", 0)
    elapsed = task.elapsed
    if task.total is None or done <= 0 or not elapsed:
        return None
    return (task.total - task.completed) * elapsed / done


class _EtaColumn(ProgressColumn):
    def render(self, task):
        return Text(_hms(eta_seconds(task)), style="progress.remaining")


class StageProgress(Progress):
    """rich Progress with an ETA from all completed steps, and a plain mode for logs.

    On a terminal it draws the usual live bar. Without one (CI logs, `2> log.txt`, a pipe) rich would draw
    only once the stage ends, so instead every `update`/`advance` may print one plain, unwrapped line:

        sft 12/60 (20%)  loss 6.507  eval_loss 6.49  elapsed 0:00:18  eta 0:01:12

    at least every PLAIN_EVERY_S seconds or PLAIN_EVERY_FRACTION of the total (whichever comes first), plus the
    first and the last step.
    """

    def __init__(self, *columns, plain: bool | None = None, **kwargs):
        super().__init__(*columns, **kwargs)
        self.plain = (not self.console.is_terminal) if plain is None else plain
        self._printed: dict = {}  # task id -> (time, completed) of its last plain line

    def add_task(self, description, start=True, total=100.0, completed=0, visible=True, **fields):
        fields.setdefault("first", completed)
        return super().add_task(description, start=start, total=total, completed=completed, visible=visible,
                                **fields)

    def start(self) -> None:
        if not self.plain:
            super().start()

    def stop(self) -> None:
        if not self.plain:
            super().stop()
            return
        for task_id in list(self._tasks):
            self._plain_line(task_id, final=True)

    def update(self, task_id, **kwargs) -> None:
        super().update(task_id, **kwargs)
        if self.plain:
            self._plain_line(task_id)

    def advance(self, task_id, advance: float = 1) -> None:
        super().advance(task_id, advance)
        if self.plain:
            self._plain_line(task_id)

    def plain_text(self, task) -> str:
        total = task.total
        head = f"{task.description} {int(task.completed)}"
        if total:
            head += f"/{int(total)} ({100 * task.completed / total:.0f}%)"
        info = str(task.fields.get("info") or "").strip()
        return "  ".join(x for x in (head, info, f"elapsed {_hms(task.elapsed or 0)}",
                                     f"eta {_hms(eta_seconds(task))}") if x)

    def _plain_line(self, task_id, final: bool = False) -> None:
        if self.disable or self.console.quiet:
            return
        task = self._tasks.get(task_id)
        if task is None:
            return
        now = time.monotonic()
        last = self._printed.get(task_id)
        if last is not None:
            last_t, last_done = last
            if final and last_done == task.completed:
                return  # the last line already shows where it ended
            step = (task.total or 0) * PLAIN_EVERY_FRACTION
            crossed = step > 0 and int(task.completed // step) > int(last_done // step)
            at_end = task.total is not None and task.completed >= task.total and last_done < task.total
            if not (final or crossed or at_end or now - last_t >= PLAIN_EVERY_S):
                return
        elif task.completed == task.fields.get("first", 0) and not final:
            return  # nothing done yet: the first line comes with the first step
        self._printed[task_id] = (now, task.completed)
        self.console.print(self.plain_text(task), soft_wrap=True, highlight=False, markup=False)


def stage_progress() -> StageProgress:
    """A progress bar with a free-form `info` field (e.g. "loss 1.23"); plain lines when stderr is no terminal."""
    return StageProgress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        _EtaColumn(),
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
        # completed= here (not in a later update): the ETA counts only the steps this process trains
        self.task = self.progress.add_task(self.description, total=state.max_steps, completed=state.global_step,
                                           info="")

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

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        from rlchat.fileio import follow_umask

        # the Trainer's checkpoint files come out 0600 (safetensors writes them so): readable like any output
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if checkpoint.is_dir():
            follow_umask(checkpoint)

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)
            self.progress.stop()
            self.progress = None
