"""Why a reward model is at chance: the data or the training? (`rlchat train-reward` prints what this finds.)

A reward model whose held-out pairwise accuracy stays near 0.5 can have three different causes, and each has a
different fix. `diagnose` separates them from numbers the reward stage has anyway:

1. The training did not fit (optimisation): accuracy on the *training* pairs is low too (under UNDERFIT_ACCURACY)
   or the loss stayed near log 2 = 0.693. Fix: a higher --lr (LoRA on a pretrained model: 3e-4 to 1e-3), more
   --epochs, or check that --max-length did not cut away the responses.
2. The pairs hold too little signal (data): the model fits its training pairs but held-out accuracy is at chance.
   When the pairs carry the judge's scores (`judge_chosen` / `judge_rejected`, as `rlchat sample-pairs` writes),
   the judge margins say how far apart the two answers were; two samples of one model are often close, and pairs
   with a margin that is small next to the spread of single answers are mostly noise. With `label_flipped` the
   label-noise ceiling is known too. Fix: more pairs, or keep only pairs with a clear margin
   (`rlchat sample-pairs --min-margin`), or the best against the worst of more answers (`--samples 4`).
3. Too few held-out pairs to tell: the 95% Wilson interval of the accuracy is wide and contains 0.5 although the
   point estimate is well above it. Fix: a larger --eval-fraction, or more pairs.

The checks are conservative: "at chance" means the Wilson interval contains 0.5. Pure Python; no torch.
Imports: stats.
"""
from __future__ import annotations

import math
import statistics

from rlchat.stats import wilson_interval as wilson

UNDERFIT_ACCURACY = 0.7   # below this on its own training pairs, a reward model has not fitted them
UNDERFIT_LOSS = 0.65      # a pairwise loss this close to log 2 = 0.693 has barely moved


def judge_margin_stats(rows: list[dict]) -> dict | None:
    """From pairs with `judge_chosen` / `judge_rejected` (and optionally `label_flipped`): the median |margin|, the
    spread (std) of single answers' scores, the fraction of pairs whose |margin| is under a tenth of that spread,
    and the flipped fraction. None when the columns are missing or not numbers."""
    try:
        chosen = [float(r["judge_chosen"]) for r in rows]
        rejected = [float(r["judge_rejected"]) for r in rows]
    except (KeyError, TypeError, ValueError):
        return None
    if not chosen or not all(math.isfinite(x) for x in chosen + rejected):
        return None
    margins = [abs(c - r) for c, r in zip(chosen, rejected)]
    singles = chosen + rejected
    spread = statistics.pstdev(singles) if len(singles) > 1 else 0.0
    small = sum(1 for m in margins if m < 0.1 * spread) / len(margins) if spread > 0 else 1.0
    flipped = [r.get("label_flipped") for r in rows]
    flip_rate = (sum(1 for f in flipped if f) / len(flipped)) if all(isinstance(f, bool) for f in flipped) else None
    return {"n": len(margins), "median_margin": statistics.median(margins), "spread": spread,
            "small_fraction": small, "flip_rate": flip_rate}


def diagnose(eval_accuracy: float | None, n_eval: int, train_accuracy: float | None, n_train_scored: int,
             final_loss: float | None, judge: dict | None = None, n_truncated: int = 0, n_pairs: int = 0) -> dict:
    """{"verdict": "ok" | "optimisation" | "data" | "too_few_eval_pairs" | "unknown", "lines": [...]}: a verdict
    and one-line explanations (with the fix) for the user. See the module docstring."""
    lines: list[str] = []
    if judge is not None:
        ceiling = f", label-noise ceiling {1 - judge['flip_rate']:.2f}" if judge.get("flip_rate") is not None else ""
        lines.append(f"judge margins of the pairs: median |margin| {judge['median_margin']:.3f} against a spread "
                     f"(std) of {judge['spread']:.3f} per answer; {judge['small_fraction']:.0%} of pairs differ by "
                     f"less than a tenth of that{ceiling}")
    if n_truncated and n_pairs and n_truncated / n_pairs > 0.25:
        lines.append(f"{n_truncated} of {n_pairs} pairs were cut to --max-length: if the difference between chosen "
                     "and rejected sits in the cut part, nothing is left to learn")
    if eval_accuracy is None or n_eval == 0:
        return {"verdict": "unknown", "lines": lines}
    lo, hi = wilson(eval_accuracy, n_eval)
    if lo > 0.5:
        return {"verdict": "ok", "lines": lines}
    train_low = train_accuracy is not None and (train_accuracy < UNDERFIT_ACCURACY or
                                                wilson(train_accuracy, n_train_scored)[0] <= 0.5)
    loss_flat = final_loss is not None and final_loss > UNDERFIT_LOSS
    head = f"held-out accuracy {eval_accuracy:.2f} [{lo:.2f}, {hi:.2f}] on {n_eval} pairs is not above chance"
    if train_low or loss_flat:
        what = (f"training-pair accuracy {train_accuracy:.2f}" if train_accuracy is not None else "") + \
               (f"{', ' if train_accuracy is not None else ''}loss {final_loss:.3f} (chance: 0.693)"
                if final_loss is not None else "")
        lines.append(f"{head}, and it did not fit its training pairs either ({what}): the training, not the "
                     "data, is the first suspect; raise --epochs or --lr (3e-4 to 1e-3 for LoRA), or use more "
                     "pairs (each optimizer step sees --batch-size pairs)")
        return {"verdict": "optimisation", "lines": lines}
    if eval_accuracy >= 0.6 and hi - lo > 0.25:
        lines.append(f"{head} only because {n_eval} held-out pairs are few: raise --eval-fraction or use more pairs")
        return {"verdict": "too_few_eval_pairs", "lines": lines}
    fit = f" (training-pair accuracy {train_accuracy:.2f})" if train_accuracy is not None else ""
    why = ("; the pairs' judge margins are small, so many labels are close to coin flips"
           if judge is not None and judge["small_fraction"] > 0.3 else "")
    lines.append(f"{head} although the model fits its training pairs{fit}: the data, not the training, is the "
                 f"first suspect{why}; use more pairs, keep clearer ones (rlchat sample-pairs --min-margin), or "
                 "check that the labels follow from the texts")
    return {"verdict": "data", "lines": lines}
