"""Eval plots beside rlchat/report.py's score histograms: win_rates.png, every comparison of the report (each
policy over the reference, over base, and with --pairwise over each other) as its win rate with the 95% Wilson
interval, labelled with the policy's KL to the reference, so every policy of the run is on one chart.

    plot_win_rates(json.load(open("RUN/eval/report.json")), Path("RUN/eval/win_rates.png"))

Imports: report (its figure helpers and colours, inside the function).
"""
from __future__ import annotations

from pathlib import Path


def plot_win_rates(report: dict | None, path: Path) -> Path | None:
    """One row per comparison: the judge's win rate (the reward model's without a judge) and its interval; None
    when the report has no scored comparison."""
    from rlchat.report import POLICY_COLORS, _figure, _save

    comps = (report or {}).get("comparisons") or []
    key = "judge" if any(c.get("win_rate_judge") is not None for c in comps) else "reward"
    rows = [c for c in comps if c.get(f"win_rate_{key}") is not None and c.get(f"ci_{key}")]
    if not rows:
        return None
    reference = report["settings"].get("reference", "sft")
    fig, axes = _figure(width=7.0, height=1.4 + 0.42 * len(rows))
    ax = axes[0]
    labels = []
    for y, c in enumerate(reversed(rows)):  # the headline comparison on top
        rate, (lo, hi) = c[f"win_rate_{key}"], c[f"ci_{key}"]
        ax.errorbar([rate], [y], xerr=[[rate - lo], [hi - rate]], fmt="o", capsize=4,
                    color=POLICY_COLORS.get(c["a"], "#333333"))
        kl = (report.get("policies", {}).get(c["a"]) or {}).get("kl_to_ref")
        labels.append(f"{c['a']} over {c['b']}" + (f"\n(KL {kl:.2f} nats)" if kl is not None and
                                                   c["b"] == reference else ""))
    ax.axvline(0.5, color="#7f7f7f", linestyle="--", linewidth=1)
    ax.set_yticks(list(range(len(rows))), labels, fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.set_xlabel(f"win rate by {'judge' if key == 'judge' else 'reward model'} (a tie counts half), "
                  "95% Wilson interval")
    ax.set_title(f"Eval: win rates ({rows[0].get('n')} prompts; KL to {reference} on samples)")
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, path)
