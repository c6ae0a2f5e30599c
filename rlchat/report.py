"""The run's report: training curves as PNG plots and RUN/eval/report.md, from what the stages wrote.

`render(run_dir)` reads the run directory and (re)writes, all atomically, in RUN/eval/:

    sft_loss.png            SFT train and held-out loss vs optimizer step      (RUN/sft/metrics.jsonl)
    reward_training.png     reward model loss and pairwise accuracy vs step    (RUN/reward/metrics.jsonl)
    ppo_training.png        PPO score/reward, KL, response length, value loss  (RUN/ppo/metrics.jsonl)
    ppo_overoptimisation.png  held-out proxy (reward-model) score and judge score against sqrt(KL), the
                            over-optimisation curve of Gao et al. 2022 (heldout/* rows of ppo --eval-every)
    score_distribution.png  histograms of each policy's eval scores            (RUN/eval/responses.jsonl)
    win_rates.png           each comparison's win rate and 95% interval        (RUN/eval/report.json)
    report.md               stage table, eval tables (when RUN/eval/report.json exists), the plots, samples

A plot whose input is missing is skipped (listed under "skipped" in the returned dict). It works on its own, on a
run that has only trained (no eval yet): then report.md holds the stage table and the training curves.
`rlchat eval` calls it after writing report.json and responses.jsonl.

Plots use matplotlib's Figure API with the Agg canvas (no pyplot, no display, no global state).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from rlchat.errors import RunDirError

PLOTS = ("sft_loss", "reward_training", "ppo_training", "ppo_overoptimisation", "score_distribution", "win_rates")
POLICY_COLORS = {"base": "#7f7f7f", "sft": "#1f77b4", "ppo": "#d62728", "ppo-best": "#ff7f0e", "grpo": "#2ca02c",
                 "rloo": "#9467bd", "dpo": "#8c564b"}
SAMPLES_IN_REPORT = 4


# ------------------------------------------------------------------------------------------------ reading


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a .jsonl file; [] if it is missing. A torn last line (a crash mid-write) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows that have `key` (and a step) as a finite number."""
    pts = [(r.get("step"), r[key]) for r in rows if _num(r.get(key)) and _num(r.get("step"))]
    return [p[0] for p in pts], [p[1] for p in pts]


def stage_metrics(run, stage: str) -> list[dict]:
    """The metrics.jsonl rows of a stage (path from the manifest's outputs.metrics, else RUN/<stage>/metrics.jsonl)."""
    rec = run.record(stage) or {}
    rel = (rec.get("outputs") or {}).get("metrics") or f"{stage}/metrics.jsonl"
    path = run.path / rel
    if not path.is_file():
        path = run.stage_dir(stage) / "metrics.jsonl"
    return read_jsonl(path)


# ------------------------------------------------------------------------------------------------- plots


def _figure(ncols: int = 1, nrows: int = 1, width: float = 6.4, height: float = 4.2):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def _save(fig, path: Path) -> Path:
    """Save a figure as PNG atomically (tmp file in the same directory + os.replace)."""
    from rlchat.fileio import follow_umask

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        follow_umask(tmp)  # mkstemp made it 0600: a plot is as readable as any file the user writes
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (the first points average over what exists so far)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _line(ax, steps, values, label, color=None, smooth=False, marker=None):
    """A metric curve; with smooth and many points, the raw values faint and a moving average on top."""
    if smooth and len(values) >= 20:
        ax.plot(steps, values, color=color, alpha=0.25, linewidth=1)
        ax.plot(steps, _smooth(values, max(5, len(values) // 20)), color=color, linewidth=2,
                label=f"{label} (moving average)")
    else:
        ax.plot(steps, values, color=color, linewidth=1.8, marker=marker, markersize=4, label=label)


def _integer_steps(*axes):
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _no_data(ax, what: str):
    ax.text(0.5, 0.5, f"no {what} logged", ha="center", va="center", transform=ax.transAxes, color="gray")


def _panel(ax, curves: list[tuple], title: str, ylabel: str, missing: str, title_size: float | None = None) -> None:
    """One axis of a training plot. curves: (series(rows, key), label, color, smooth): a training curve is
    smoothed, a held-out one (smooth=False) drawn with markers; "no <missing> logged" when none has data."""
    drawn = False
    for (steps, values), label, color, smooth in curves:
        if steps:
            _line(ax, steps, values, label, color=color, smooth=smooth, marker=None if smooth else "o")
            drawn = True
    if not drawn:
        _no_data(ax, missing)
    ax.set_title(title, **({"fontsize": title_size} if title_size else {}))
    ax.set_ylabel(ylabel)


def _finish(fig, axes: list, xlabel: str, path: Path, legend_size: float | None = None) -> Path:
    """Integer steps on the x axes, grid and legend on each axis, then save the figure."""
    _integer_steps(*axes)
    for ax in axes:
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(**({"fontsize": legend_size} if legend_size else {}))
    return _save(fig, path)


def plot_sft(rows: list[dict], path: Path) -> Path | None:
    train, evl = series(rows, "loss"), series(rows, "eval_loss")
    if not train[0] and not evl[0]:
        return None
    fig, (ax,) = _figure()
    _panel(ax, [(train, "train loss", "#1f77b4", True), (evl, "held-out loss", "#ff7f0e", False)],
           "SFT: cross-entropy loss on the assistant tokens", "loss (nats per token, log scale)", "loss")
    if all(v > 0 for v in train[1] + evl[1]):
        from matplotlib.ticker import LogFormatter

        class PlainLog(LogFormatter):
            """Tick labels as plain numbers (3, 0.5), not 3x10^0 or 1e-01."""

            def _num_to_string(self, x, vmin, vmax):
                return f"{x:g}"

        ax.set_yscale("log")  # the loss falls by orders of magnitude: a linear axis flattens the tail
        ax.yaxis.set_major_formatter(PlainLog(labelOnlyBase=False))
        # minor ticks (2, 3, ... 9 per decade) labelled only when the axis spans few decades
        ax.yaxis.set_minor_formatter(PlainLog(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    return _finish(fig, [ax], "optimizer step", path)


def plot_reward(rows: list[dict], path: Path) -> Path | None:
    loss, eval_loss = series(rows, "loss"), series(rows, "eval_loss")
    acc, eval_acc = series(rows, "accuracy"), series(rows, "eval_accuracy")
    if not any(s[0] for s in (loss, eval_loss, acc, eval_acc)):
        return None
    fig, (ax1, ax2) = _figure(ncols=2, width=11, height=4.2)
    _panel(ax1, [(loss, "train loss", "#1f77b4", True), (eval_loss, "held-out loss", "#ff7f0e", False)],
           "Reward model: pairwise loss -log sigmoid(r_chosen - r_rejected)", "loss (nats per pair)", "loss",
           title_size=10)
    _panel(ax2, [(acc, "train accuracy", "#1f77b4", True), (eval_acc, "eval_accuracy (held-out pairs)", "#ff7f0e", False)],
           "Reward model: accuracy (chosen scored above rejected)", "fraction of pairs", "accuracy", title_size=10)
    ax2.axhline(0.5, color="gray", linestyle=":", linewidth=1, label="chance (0.5)")
    ax2.set_ylim(0, 1.02)
    return _finish(fig, [ax1, ax2], "optimizer step", path)


def plot_ppo(rows: list[dict], path: Path) -> Path | None:
    score, reward = series(rows, "objective/scores"), series(rows, "objective/rewards")
    kl, length, vloss = series(rows, "objective/kl"), series(rows, "response/length"), series(rows, "loss/value")
    if not any(s[0] for s in (score, reward, kl, length, vloss)):
        return None
    fig, axes = _figure(ncols=2, nrows=2, width=11, height=7.5)
    ax_s, ax_k, ax_l, ax_v = axes
    _panel(ax_s, [(score, "score (reward model / reward fn)", "#2ca02c", True),
                  (reward, "reward (score - KL penalty)", "#9467bd", True)],
           "PPO: score and reward per response", "score (PPO score units)", "score")
    _panel(ax_k, [(kl, "KL(policy || reference)", "#d62728", True)],
           "PPO: KL to the reference policy (SFT, or the starting model)", "KL per response (nats)", "KL")
    _panel(ax_l, [(length, "mean response length", "#8c564b", True)],
           "PPO: response length", "length (tokens)", "response length")
    _panel(ax_v, [(vloss, "value loss", "#17becf", True)],
           "PPO: value-function loss", "loss (squared error, score units²)", "value loss")
    return _finish(fig, axes, "PPO step (one batch of rollouts)", path, legend_size=8)


def plot_overoptimisation(rows: list[dict], path: Path) -> Path | None:
    """Held-out proxy score (left axis) and judge score (right axis) against sqrt(KL to the reference), one point
    per held-out evaluation of ppo --eval-every, labelled with its step (Gao et al. 2022, "Scaling laws for reward
    model overoptimization", plot gold and proxy reward against d = sqrt(KL)). The proxy rising while the judge
    falls is over-optimisation; the best point by the judge is ringed."""
    pts = [r for r in rows if _num(r.get("heldout/kl")) and _num(r.get("heldout/score"))]
    if not pts:
        return None
    d = [math.sqrt(max(r["heldout/kl"], 0.0)) for r in pts]  # a k1 mean a hair below 0 is noise around KL 0
    fig, (ax,) = _figure(width=7.4, height=4.6)
    ax.plot(d, [r["heldout/score"] for r in pts], color="#2ca02c", marker="o", linewidth=1.8,
            label="proxy: training score (reward model / reward fn)")
    ax.set_ylabel("proxy score (PPO score units)", color="#2ca02c")
    for x, r in zip(d, pts):
        ax.annotate(str(r.get("step", "")), (x, r["heldout/score"]), fontsize=7, color="gray",
                    xytext=(3, 3), textcoords="offset points")
    handles, labels = ax.get_legend_handles_labels()
    judged = [(x, r) for x, r in zip(d, pts) if _num(r.get("heldout/judge"))]
    if judged:
        ax2 = ax.twinx()
        ax2.plot([x for x, _ in judged], [r["heldout/judge"] for _, r in judged], color="#d62728", marker="s",
                 linewidth=1.8, label="judge (gold) score")
        bx, br = max(judged, key=lambda t: t[1]["heldout/judge"])
        ax2.plot([bx], [br["heldout/judge"]], marker="o", markersize=14, markerfacecolor="none",
                 markeredgecolor="black", linestyle="none", label=f"best by judge (step {br.get('step')})")
        ax2.set_ylabel("judge score", color="#d62728")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    else:
        ax.text(0.5, 0.02, "no --judge given: proxy only", ha="center", va="bottom", transform=ax.transAxes,
                color="gray", fontsize=8)
    ax.set_title("PPO over-optimisation: held-out proxy vs judge against KL (Gao et al. 2022)", fontsize=10)
    ax.set_xlabel("sqrt(KL to the reference), sqrt(nats per response); points labelled with the PPO step")
    ax.legend(handles, labels, fontsize=8, loc="best")
    return _save(fig, path)


def plot_scores(responses: list[dict], path: Path) -> Path | None:
    """Histograms of each policy's reward-model and judge scores on the eval prompts."""
    if not responses:
        return None
    names = [n for n in ("base", "sft", "ppo") if n in responses[0].get("policies", {})]
    names += [n for n in responses[0].get("policies", {}) if n not in names]
    panels = []
    for key, title, unit in (("reward", "reward-model score", "score (reward-model units)"),
                             ("judge", "judge score", "score (judge units)")):
        data = {n: [r["policies"][n][key] for r in responses if _num(r["policies"].get(n, {}).get(key))]
                for n in names}
        if any(data.values()):
            panels.append((title, unit, data))
    if not panels:
        return None
    fig, axes = _figure(ncols=len(panels), width=5.8 * len(panels), height=4.2)
    n = len(responses)
    for ax, (title, unit, data) in zip(axes, panels):
        values = [v for vs in data.values() for v in vs]
        lo, hi = min(values), max(values)
        if hi - lo < 1e-9:
            lo, hi = lo - 0.5, hi + 0.5
        bins = [lo + (hi - lo) * i / 20 for i in range(21)]
        tallest = 0
        for name, vs in data.items():
            if not vs:
                continue
            mean = sum(vs) / len(vs)
            color = POLICY_COLORS.get(name)
            counts, _, _ = ax.hist(vs, bins=bins, alpha=0.45, color=color, edgecolor=color,
                                   label=f"{name}: mean {mean:.3g} (dashed line)")
            tallest = max(tallest, max(counts))
            ax.axvline(mean, color=color, linestyle="--", linewidth=1.5)
        ax.set_title(f"Eval: {title} per response ({n} prompts)")
        ax.set_xlabel(unit)
        ax.set_ylabel("responses (count)")
        ax.set_ylim(0, max(1.0, tallest) * 1.05)  # the axis ends just above the tallest bar
        ax.grid(alpha=0.3)
        # below the plot, so it covers no bar and needs no empty headroom above them
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=min(3, len(data)),
                  framealpha=0.9)
    return _save(fig, path)


# --------------------------------------------------------------------------------------------- markdown


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.{digits}f}" if math.isfinite(v) else str(v)
    return str(v)


def _cell(text: str, limit: int = 300) -> str:
    """Text for a markdown table cell: one line, pipes escaped, shortened."""
    text = " ".join(str(text).split())
    if len(text) > limit:
        text = text[:limit - 1] + "…"
    return text.replace("|", "\\|") or "*(empty)*"


def _pm(value, se) -> str:
    if value is None:
        return "–"
    return f"{value:.3f} ± {se:.3f}" if se is not None else f"{value:.3f}"


def _ci(ci) -> str:
    return f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "–"


def _win_rate_lines(comps: list[dict]) -> list[str]:
    """The report's "Win rates" section (with a note where most answers are identical); [] without comparisons."""
    if not comps:
        return []
    out = ["## Win rates", "",
           "Per prompt: a win counts 1, a tie 0.5. 95% Wilson score intervals.", "",
           "| comparison | by reward model | 95% CI | by judge | 95% CI | n |",
           "|---|---|---|---|---|---|"]
    for c in comps:
        out.append(f"| {c['a']} over {c['b']} | {_fmt(c.get('win_rate_reward'))} | {_ci(c.get('ci_reward'))} | "
                   f"{_fmt(c.get('win_rate_judge'))} | {_ci(c.get('ci_judge'))} | {c.get('n')} |")
    out.append("")
    for c in comps:
        if c.get("identical") is not None and c["identical"] > 0.5:
            out.append(f"**Note:** {c['identical']:.0%} of the answers of {c['a']} and {c['b']} are "
                       f"identical, so the win rates above mostly count ties.")
            sm = c.get("sampled")
            if sm:
                out.append(f"Sampled comparison (one sample per prompt at temperature "
                           f"{sm['temperature']:g}, top-p 1, n {sm['n']}): {c['a']} over {c['b']} "
                           f"{_fmt(sm.get('win_rate_reward'))} {_ci(sm.get('ci_reward'))} by reward model, "
                           f"{_fmt(sm.get('win_rate_judge'))} {_ci(sm.get('ci_judge'))} by judge.")
            out.append("")
    return out


def markdown(run, manifest: dict, report: dict | None, responses: list[dict], plots: dict[str, Path]) -> str:
    from rlchat.status import summary_rows

    out = [f"# rlchat report: {run.path}", ""]
    if report:
        s = report.get("settings", {})
        decoding = ("greedy decoding" if s.get("decoding") == "greedy" else
                    f"sampling at temperature {s.get('temperature')}, top-p {s.get('top_p')}")
        out += [f"**{report.get('summary', '')}**", "",
                f"{s.get('n_prompts')} prompts from `{s.get('dataset')}`, {decoding}, at most "
                f"{s.get('max_new_tokens')} new tokens. Reference policy for KL: `{s.get('reference', 'sft')}`. "
                f"Reward model: {'the run' + chr(39) + 's' if s.get('reward_model') else 'none'}; judge: "
                f"{'`' + s['judge'] + '`' if s.get('judge') else 'none'}.", ""]
        if s.get("kl_temperature") is not None:
            out += [f"KL to `{s.get('reference', 'sft')}`: sampled, whatever the decoding above: "
                    f"{s.get('kl_samples_per_prompt')} samples per prompt from each policy at the PPO sampling "
                    f"temperature {s.get('kl_temperature'):g} (top-p 1); k1 estimator (sum of token log-ratios), "
                    f"averaged per prompt then over prompts, ± one standard error over prompts; k3 (non-negative) "
                    f"alongside. A negative k1 mean is sampling noise (the KL itself is >= 0).", ""]
    out += ["## Stages", "", "| stage | status | key metric | time |", "|---|---|---|---|"]
    for row in summary_rows(manifest):
        if row[0] == "eval" and row[1] == "running":
            continue  # the eval stage that is writing this report
        out.append("| " + " | ".join(_cell(x, 80) for x in row) + " |")
    out.append("")

    if report:
        out += ["## Policies", "",
                f"| policy | reward model (mean ± std) | judge (mean ± std) | KL to {s.get('reference', 'sft')}, "
                "k1 ± SE (nats) | k3 ± SE | length (tokens) | EOS rate | distinct-1 | distinct-2 | n |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, m in report.get("policies", {}).items():
            rm = "–" if m.get("mean_reward") is None else f"{m['mean_reward']:.3f} ± {m['std_reward']:.3f}"
            jd = "–" if m.get("mean_judge") is None else f"{m['mean_judge']:.3f} ± {m['std_judge']:.3f}"
            out.append(f"| {name} | {rm} | {jd} | {_pm(m.get('kl_to_ref'), m.get('kl_to_ref_se'))} | "
                       f"{_pm(m.get('kl_to_ref_k3'), m.get('kl_to_ref_k3_se'))} | {_fmt(m.get('mean_length'), 1)} | "
                       f"{_fmt(m.get('eos_rate'), 2)} | {_fmt(m.get('distinct_1'))} | {_fmt(m.get('distinct_2'))} | "
                       f"{m.get('n')} |")
        out.append("")
        out += _win_rate_lines(report.get("comparisons") or [])

    titles = {"sft_loss": "SFT loss", "reward_training": "Reward model training", "ppo_training": "PPO training",
              "ppo_overoptimisation": "PPO over-optimisation (held-out proxy vs judge against KL)",
              "score_distribution": "Eval score distribution", "win_rates": "Eval win rates"}
    if plots:
        out += ["## Plots", ""]
        for key in PLOTS:
            if key in plots:
                out += [f"### {titles[key]}", "", f"![{titles[key]}]({Path(plots[key]).name})", ""]

    if responses:
        names = list(responses[0].get("policies", {}))
        out += ["## Sample responses", "",
                f"The first {min(SAMPLES_IN_REPORT, len(responses))} of {len(responses)} prompts "
                f"(all in `responses.jsonl`).", ""]
        for row in responses[:SAMPLES_IN_REPORT]:
            out += [f"**Prompt {row.get('index', 0) + 1}:** {_cell(row.get('prompt', ''), 500)}", "",
                    "| policy | response | reward | judge | tokens |", "|---|---|---|---|---|"]
            for name in names:
                p = row["policies"].get(name, {})
                out.append(f"| {name} | {_cell(p.get('response', ''))} | {_fmt(p.get('reward'))} | "
                           f"{_fmt(p.get('judge'))} | {_fmt(p.get('length'))} |")
            out.append("")
    return "\n".join(out).rstrip() + "\n"


# ------------------------------------------------------------------------------------------------- render


def render(run_dir) -> dict:
    """Write the plots and report.md into RUN/eval/; returns {"report_md", "plots": {name: path}, "skipped":
    {name: reason}}. RunDirError if RUN has no manifest."""
    from rlchat.rundir import RunDir
    from rlchat.fileio import atomic_write_text

    run = RunDir(run_dir)
    if not run.exists():
        raise RunDirError(f"no run at {run.path} (no run.json)", "pass a run directory that a stage has written")
    manifest = run.manifest()
    # the files go into RUN/eval/: take the run's lock like a stage (refused while another process holds it), unless
    # this process holds it already (the eval stage renders its own report)
    held = run.holds_lock()
    if not held:
        run.lock("report")
    try:
        return _render(run, manifest)
    finally:
        if not held:
            run.unlock()


def _render(run, manifest: dict) -> dict:
    from rlchat.fileio import atomic_write_text

    out_dir = run.stage_dir("eval")
    report = None
    if (out_dir / "report.json").is_file():
        try:
            report = json.loads((out_dir / "report.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise RunDirError(f"{out_dir / 'report.json'} is not valid JSON: {err}",
                              f"rerun `rlchat eval --run-dir {run.path} --overwrite`") from None
    responses = read_jsonl(out_dir / "responses.jsonl")
    from rlchat.eval_plots import plot_win_rates

    plots: dict[str, str] = {}
    skipped: dict[str, str] = {}
    jobs = (
        ("sft_loss", "sft", lambda p: plot_sft(stage_metrics(run, "sft"), p)),
        ("reward_training", "reward", lambda p: plot_reward(stage_metrics(run, "reward"), p)),
        ("ppo_training", "ppo", lambda p: plot_ppo(stage_metrics(run, "ppo"), p)),
        ("ppo_overoptimisation", "ppo", lambda p: plot_overoptimisation(stage_metrics(run, "ppo"), p)),
        ("score_distribution", "eval", lambda p: plot_scores(responses, p)),
        ("win_rates", "eval", lambda p: plot_win_rates(report, p)),
    )
    stages = manifest.get("stages", {})
    for name, stage, job in jobs:
        if stage != "eval" and stage not in stages:
            skipped[name] = f"the run has no {stage} stage"
            continue
        path = job(out_dir / f"{name}.png")
        if path is None:
            skipped[name] = ("no scored comparison in report.json" if name == "win_rates"
                             else "no scores in responses.jsonl" if stage == "eval"
                             else "no heldout/* rows in RUN/ppo/metrics.jsonl (ppo ran without --eval-every)"
                             if name == "ppo_overoptimisation" else f"no metrics in RUN/{stage}/metrics.jsonl")
        else:
            plots[name] = str(path)
    md_path = out_dir / "report.md"
    atomic_write_text(md_path, markdown(run, manifest, report, responses, {k: Path(v) for k, v in plots.items()}))
    return {"report_md": str(md_path), "plots": plots, "skipped": skipped}
