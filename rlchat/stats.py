"""Summary statistics on plain Python numbers (no torch): mean/std, win rates with a Wilson interval, distinct-n.

Used by eval (per-policy metrics, pairwise win rates) and the reward stage (reward_stats.json, `rlchat score`).
"""
from __future__ import annotations

import math

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def mean_std(values, ddof: int = 1) -> tuple[float | None, float | None]:
    """Mean and standard deviation of the non-None values: ddof=1 the sample std (eval's spread over prompts),
    ddof=0 the population std (reward_stats.json: PPO normalises as (r - mean) / std). 0.0 for a single value;
    (None, None) when there is none."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    if len(xs) == 1:
        return m, 0.0
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - ddof))


def wilson_interval(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion p observed over n trials (Wilson 1927).

    center = (p + z^2/2n) / (1 + z^2/n), half = z * sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n).
    With ties counted as half a win, p is the tie-adjusted win rate.
    """
    if n <= 0:
        return (0.0, 1.0)
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(p * (1 - p) / n + z * z / (4 * n * n), 0.0)) / denom
    return (max(0.0, center - half), min(1.0, center + half))


def win_rate(a_scores: list[float], b_scores: list[float]) -> dict:
    """Win rate of a over b, per prompt: 1 if a's score is higher, 0.5 on a tie, 0 if lower; with a Wilson CI."""
    assert len(a_scores) == len(b_scores)
    wins = sum(1 for a, b in zip(a_scores, b_scores) if a > b)
    ties = sum(1 for a, b in zip(a_scores, b_scores) if a == b)
    n = len(a_scores)
    rate = (wins + 0.5 * ties) / n if n else None
    lo, hi = wilson_interval(rate, n) if n else (None, None)
    return {"win_rate": rate, "ci": [lo, hi], "wins": wins, "ties": ties, "losses": n - wins - ties, "n": n}


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct-n (Li et al. 2016): unique word n-grams / all word n-grams over all texts (words split on
    whitespace); 0.0 when there is no n-gram at all."""
    total, seen = 0, set()
    for text in texts:
        words = text.split()
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0
