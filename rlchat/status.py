"""`rlchat status`: one row per stage of a run's manifest (status, key metric, wall time)."""
from __future__ import annotations

import math
from datetime import datetime, timezone

from rlchat.rundir import STAGES, parse_time

# Metric shown by `rlchat status`, per stage, first key present wins; else the first numeric metric.
KEY_METRICS = {
    "sft": ("eval_loss", "eval/loss", "train_loss", "loss"),
    "reward": ("eval_accuracy", "eval/accuracy", "accuracy", "eval_loss"),
    "ppo": ("score/mean", "scores/mean", "reward/mean", "mean_score", "mean_reward", "score", "reward"),
    "dpo": ("eval_accuracy", "eval_rewards/accuracies", "eval_loss", "train_loss"),
    "eval": ("win_rate", "eval/win_rate", "ppo/win_rate", "win_rate/ppo"),
}



def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fmt_number(v) -> str:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return f"{v:.4g}"


def format_seconds(s: float | None) -> str:
    """12.3s, 3m05s, 1h02m; "-" for None."""
    if s is None:
        return "-"
    if s < 60:
        return f"{s:.1f}s"
    m, sec = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m}m{sec:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


def key_metric(stage: str, metrics: dict | None) -> str:
    """The one metric `rlchat status` shows for a stage, as "name=value"; "-" if there is none."""
    metrics = metrics or {}
    for key in KEY_METRICS.get(stage, ()):
        if _is_number(metrics.get(key)):
            return f"{key}={_fmt_number(metrics[key])}"
    for key, v in metrics.items():
        if _is_number(v):
            return f"{key}={_fmt_number(v)}"
    return "-"


def summary_rows(manifest: dict) -> list[tuple[str, str, str, str]]:
    """(stage, status, key metric, wall time) per stage, in pipeline order, for `rlchat status RUN`.

    A running stage shows its time so far ("3m05s so far"); a failed one without metrics shows its error.
    """
    stages = manifest.get("stages", {})
    order = [s for s in STAGES if s in stages] + [s for s in stages if s not in STAGES]
    rows = []
    for stage in order:
        rec = stages[stage] or {}
        status = str(rec.get("status", "?"))
        metric = key_metric(stage, rec.get("metrics"))
        if metric == "-" and status in ("failed", "interrupted") and rec.get("error"):
            err = " ".join(str(rec["error"]).split())
            prefix = "" if status == "interrupted" else "error: "
            metric = prefix + (err if len(err) <= 60 else err[:57] + "...")
        wall = format_seconds(rec.get("wall_s"))
        if status == "running" and rec.get("wall_s") is None:
            t0 = parse_time(rec.get("started"))
            if t0 is not None:
                wall = format_seconds((datetime.now(timezone.utc) - t0).total_seconds()) + " so far"
        rows.append((stage, status, metric, wall))
    return rows
