"""eval's results and report (rlchat/stages/evaluate.py generates and scores; this module turns the scores into
numbers): PolicyResult (one policy's responses, scores and KL samples), gather_results (every process's share in
prompt order), needs_sampled_comparison, per-policy metrics (mean/std of scores, KL with its standard error, length,
EOS rate, distinct-n), pairwise win rates with Wilson intervals, the summary line, report.json and
responses.jsonl (atomic writes). report.md and the plots are rlchat/report.py's.

Imports: stats, fileio, dist (inside the functions that need them).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rlchat.stats import distinct_n, mean_std, win_rate

if TYPE_CHECKING:  # pragma: no cover
    from rlchat.prompts import Prompt

# the policy KL is measured against (PPO's reference); in a run without SFT it is the starting model, "base"
REFERENCE_POLICY = "sft"


def comparison_pairs(policies: list[str], reference: str = REFERENCE_POLICY, pairwise: bool = False
                     ) -> list[tuple[str, str]]:
    """The (a, b) pairs compared, "a over b", in this order: every trained policy over the reference; every policy
    over base (when base is evaluated and is not the reference); with `pairwise`, every two trained policies (the
    earlier in `policies` order first). The first pair is the report's headline."""
    trained = [p for p in policies if p not in (reference, "base")]
    pairs = [(p, reference) for p in trained if reference in policies]
    if "base" in policies and reference != "base":
        pairs += [(p, "base") for p in trained[:1] + [reference] + trained[1:] if p in policies]
    if pairwise:
        pairs += [(a, b) for i, a in enumerate(trained) for b in trained[i + 1:]]
    return pairs


@dataclass
class PolicyResult:
    responses: list[str] = field(default_factory=list)
    response_ids: list[list[int]] = field(default_factory=list)  # incl. the stop token
    eos: list[bool] = field(default_factory=list)
    log_ratio: list[float] = field(default_factory=list)  # log pi(y|x) - log pi_ref(y|x) of the response above
    reward: list[float | None] = field(default_factory=list)
    judge: list[float | None] = field(default_factory=list)
    kl_k1: list[list[float]] = field(default_factory=list)  # per prompt: k1 of each KL sample
    kl_k3: list[list[float]] = field(default_factory=list)  # per prompt: k3 of each KL sample
    # the first KL sample of each prompt and its scores (scored only for the sampled comparison)
    sample_response: list[str | None] = field(default_factory=list)
    sample_ids: list[list[int] | None] = field(default_factory=list)
    sample_reward: list[float | None] = field(default_factory=list)
    sample_judge: list[float | None] = field(default_factory=list)


def identical_fraction(a: list[str], b: list[str]) -> float | None:
    """Fraction of prompts where two policies gave exactly the same response text."""
    return sum(x == y for x, y in zip(a, b)) / len(a) if a else None


SAME_ANSWERS = 0.5  # above this fraction of identical greedy answers, a sampled comparison is added


def needs_sampled_comparison(policies: list[str], results: dict, cfg, reference: str = REFERENCE_POLICY) -> bool:
    """True under greedy decoding when, for some compared pair, more than SAME_ANSWERS of the answers are
    identical (counted over all processes, so that every process decides the same)."""
    if cfg.temperature > 0:
        return False
    import torch

    from rlchat import dist

    counts = []
    for a, b in comparison_pairs(policies, reference, getattr(cfg, "pairwise", False)):
        ra, rb = results[a].responses, results[b].responses
        counts += [sum(x == y for x, y in zip(ra, rb)), len(ra)]
    if not counts:
        return False
    counts = dist.all_sum(torch.tensor(counts, dtype=torch.float64)).tolist()
    return any(same > SAME_ANSWERS * n for same, n in zip(counts[::2], counts[1::2]) if n)


def gather_results(results: dict, mine: list[int], n: int) -> dict:
    """Every process's PolicyResults (for its prompt rows `mine`) merged into prompt order, on every process."""
    from dataclasses import asdict

    from rlchat import dist

    parts = dist.gather_objects((mine, {name: asdict(r) for name, r in results.items()}))
    merged = {}
    for name in results:
        cols = {key: [None] * n for key in asdict(results[name])}
        for rows, res in parts:
            for key, values in res[name].items():
                for i, v in zip(rows, values):
                    cols[key][i] = v
        merged[name] = PolicyResult(**cols)
    return merged


# ---------------------------------------------------------------------------------------------------- report


def kl_estimate(per_prompt: list[list[float]]) -> tuple[float | None, float | None]:
    """(mean, standard error) of a KL estimator over prompts: each prompt's samples are averaged first (they share
    the prompt, so they are not independent draws), then SE = sample std of the prompt means / sqrt(prompts)."""
    import math

    means = [sum(v) / len(v) for v in per_prompt if v]
    mean, std = mean_std(means)
    if mean is None:
        return None, None
    return mean, (std / math.sqrt(len(means)) if len(means) > 1 else None)


def policy_metrics(r: PolicyResult) -> dict:
    mean_reward, std_reward = mean_std(r.reward)
    mean_judge, std_judge = mean_std(r.judge)
    kl, kl_se = kl_estimate(r.kl_k1)
    kl3, kl3_se = kl_estimate(r.kl_k3)
    log_ratio, _ = mean_std(r.log_ratio)
    lengths = [len(ids) for ids in r.response_ids]
    sample_lengths = [len(ids) for ids in r.sample_ids if ids is not None]
    return {
        "n": len(r.responses),
        "mean_reward": mean_reward,
        "std_reward": std_reward,
        "mean_judge": mean_judge,
        "std_judge": std_judge,
        "kl_to_ref": kl,
        "kl_to_ref_se": kl_se,
        "kl_to_ref_k3": kl3,
        "kl_to_ref_k3_se": kl3_se,
        "kl_samples": sum(len(v) for v in r.kl_k1),
        "mean_log_ratio": log_ratio,
        "mean_length": sum(lengths) / len(lengths) if lengths else None,
        "sampled_mean_reward": mean_std(r.sample_reward)[0],
        "sampled_mean_judge": mean_std(r.sample_judge)[0],
        "sampled_mean_length": sum(sample_lengths) / len(sample_lengths) if sample_lengths else None,
        "eos_rate": sum(r.eos) / len(r.eos) if r.eos else None,
        "distinct_1": distinct_n(r.responses, 1),
        "distinct_2": distinct_n(r.responses, 2),
    }


def _win_rates(ra: PolicyResult, rb: PolicyResult, fields: tuple[str, str]) -> dict:
    row = {}
    for key, scores in zip(("reward", "judge"), fields):
        xa, xb = getattr(ra, scores), getattr(rb, scores)
        if xa and all(v is not None for v in xa + xb):
            w = win_rate(xa, xb)
            row[f"win_rate_{key}"] = w["win_rate"]
            row[f"ci_{key}"] = w["ci"]
            row[f"record_{key}"] = {"wins": w["wins"], "ties": w["ties"], "losses": w["losses"]}
        else:
            row[f"win_rate_{key}"] = None
            row[f"ci_{key}"] = None
            row[f"record_{key}"] = None
    return row


def comparisons(policies: list[str], results: dict, kl_t: float = 1.0, reference: str = REFERENCE_POLICY,
                pairwise: bool = False) -> list[dict]:
    """Win rates of each compared pair on the evaluated responses; `identical` = the fraction of prompts where
    both answered the same text; `sampled` = win rates on one sample per prompt at temperature kl_t, when the
    sampled comparison ran (most greedy answers identical), else None."""
    out = []
    for a, b in comparison_pairs(policies, reference, pairwise):
        ra, rb = results[a], results[b]
        row = {"a": a, "b": b, "n": len(ra.responses), **_win_rates(ra, rb, ("reward", "judge")),
               "identical": identical_fraction(ra.responses, rb.responses), "sampled": None}
        if all(t is not None for t in ra.sample_response + rb.sample_response) and ra.sample_response:
            sampled = _win_rates(ra, rb, ("sample_reward", "sample_judge"))
            if sampled["win_rate_reward"] is not None or sampled["win_rate_judge"] is not None:
                row["sampled"] = {"temperature": kl_t, "top_p": 1.0, "n": len(ra.sample_response), **sampled}
        out.append(row)
    return out


def kl_text(m: dict) -> str:
    """E.g. "KL 0.21 ± 0.04 nats": the sampled k1 estimate with its standard error; a negative mean is said to be
    noise (the true KL is >= 0), never shown as a KL on its own."""
    kl, se = m["kl_to_ref"], m.get("kl_to_ref_se")
    if kl is None:
        return ""
    se_text = f" ± {se:.2f}" if se is not None else ""
    if kl < 0 and f"{kl:.2f}" == "-0.00":  # rounding-level: show the same 0.00 a zero KL shows
        kl = 0.0
    if kl < 0:
        within = se is not None and kl + 2 * se >= 0
        return (f"KL ~0 nats (k1 estimate {kl:.2f}{se_text}: below 0 "
                + ("within noise" if within else "beyond 2 standard errors: too few samples or a bug") + ")")
    return f"KL {kl:.2f}{se_text} nats"


def summary_line(policies: dict, comps: list[dict], reference: str = REFERENCE_POLICY) -> str:
    """E.g. "ppo beats sft 0.81 [0.72, 0.88] by judge, 0.77 [0.68, 0.84] by reward model; KL 3.2 nats"."""
    if not comps:
        name = next(iter(policies))
        m = policies[name]
        parts = [f"{name}: {m['n']} prompts"]
        if m["mean_judge"] is not None:
            parts.append(f"judge {m['mean_judge']:.3f}")
        if m["mean_reward"] is not None:
            parts.append(f"reward {m['mean_reward']:.3f}")
        parts.append(f"length {m['mean_length']:.1f} tokens")
        return ", ".join(parts)
    c = comps[0]
    primary = "judge" if c["win_rate_judge"] is not None else "reward"
    rate = c[f"win_rate_{primary}"]
    if rate is None:
        text = f"{c['a']} vs {c['b']}: no scores (the run has no reward model and no --judge was given)"
    else:
        verb = "beats" if rate > 0.5 else ("loses to" if rate < 0.5 else "ties with")
        lo, hi = c[f"ci_{primary}"]
        text = f"{c['a']} {verb} {c['b']} {rate:.2f} [{lo:.2f}, {hi:.2f}] by {'judge' if primary == 'judge' else 'reward model'}"
        if primary == "judge" and c["win_rate_reward"] is not None:
            lo, hi = c["ci_reward"]
            text += f", {c['win_rate_reward']:.2f} [{lo:.2f}, {hi:.2f}] by reward model"
    if c["a"] != reference and policies[c["a"]]["kl_to_ref"] is not None:
        text += "; " + kl_text(policies[c["a"]])
    text += f" ({c['n']} prompts)"
    for other in comps[1:]:  # every other trained policy against the reference, briefly
        if other["b"] == reference and other[f"win_rate_{primary}"] is not None:
            lo, hi = other[f"ci_{primary}"]
            text += f"; {other['a']} over {reference} {other[f'win_rate_{primary}']:.2f} [{lo:.2f}, {hi:.2f}]"
            if policies[other["a"]]["kl_to_ref"] is not None:
                text += ", " + kl_text(policies[other["a"]])
    if c.get("identical") is not None and c["identical"] > SAME_ANSWERS:
        text += f"; {c['identical']:.0%} of the answers are identical"
        sampled = c.get("sampled")
        if sampled:
            key = "judge" if sampled["win_rate_judge"] is not None else "reward"
            lo, hi = sampled[f"ci_{key}"]
            text += (f"; sampled at T={sampled['temperature']:g}: {sampled[f'win_rate_{key}']:.2f} [{lo:.2f}, "
                     f"{hi:.2f}] by {'judge' if key == 'judge' else 'reward model'}")
    return text


def build_report(run, cfg, policies: list[str], prompts: list[Prompt], results: dict, dataset_spec: str,
                 has_rm: bool, kl_t: float = 1.0, reference: str = REFERENCE_POLICY) -> dict:
    per_policy = {name: policy_metrics(results[name]) for name in policies}
    comps = comparisons(policies, results, kl_t, reference, bool(getattr(cfg, "pairwise", False)))
    settings = {
        "dataset": dataset_spec,
        "split": cfg.split,
        "n_prompts": len(prompts),
        "decoding": "sampling" if cfg.temperature > 0 else "greedy",
        "temperature": cfg.temperature,
        "top_p": cfg.top_p if cfg.temperature > 0 else None,
        "max_new_tokens": cfg.max_new_tokens,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "policies": policies,
        "reference": reference,
        "reward_model": "reward" if has_rm else None,
        "judge": cfg.judge,
        "ci": "wilson95",
        "kl": f"k1: sum_t log pi_T(y_t|x,y<t) - log pi_{reference},T(y_t|x,y<t) on {cfg.kl_samples} samples per prompt "
              f"drawn from the policy at the PPO sampling temperature T={kl_t:g} (top_p 1), averaged per prompt, "
              f"then over prompts; ± is the standard error over prompts; k3 (sum_t exp(-r_t) - 1 + r_t, "
              f"non-negative) alongside; independent of the decoding above",
        "kl_temperature": kl_t,
        "kl_samples_per_prompt": cfg.kl_samples,
        "kl_estimator": "k1 (k3 alongside)",
        "log_ratio": f"mean over prompts of log pi(y|x) - log pi_{reference}(y|x) on the evaluated responses at "
                     f"temperature 1; not a KL (negative when the answers are likelier under {reference})",
        "identical": f"fraction of prompts with the same answer text; above {SAME_ANSWERS:g} under greedy decoding "
                     f"a sampled comparison (one sample per prompt at T={kl_t:g}, top_p 1) is added",
        "length": "response tokens, EOS included",
        "distinct": "unique / total whitespace-word n-grams over all responses",
    }
    return {"run_dir": str(run.path), "settings": settings, "policies": per_policy, "comparisons": comps,
            "summary": summary_line(per_policy, comps, reference)}


def headline_metrics(report: dict) -> dict:
    """The manifest's eval metrics: the first comparison's win rates, the KL and mean scores per policy."""
    m: dict = {"n": report["settings"]["n_prompts"]}
    reference = report["settings"].get("reference", REFERENCE_POLICY)
    comps = report["comparisons"]
    if comps:
        c = comps[0]
        m["comparison"] = f"{c['a']}_vs_{c['b']}"
        m["win_rate_judge"] = c["win_rate_judge"]
        m["win_rate_reward"] = c["win_rate_reward"]
        m["win_rate"] = c["win_rate_judge"] if c["win_rate_judge"] is not None else c["win_rate_reward"]
        m["identical"] = c["identical"]
        if c["sampled"]:
            m["sampled_win_rate_judge"] = c["sampled"]["win_rate_judge"]
            m["sampled_win_rate_reward"] = c["sampled"]["win_rate_reward"]
    for c in comps:  # each policy over the reference (the primary score: judge, else reward model)
        if c["b"] == reference:
            m[f"{c['a']}/win_rate"] = c["win_rate_judge"] if c["win_rate_judge"] is not None else c["win_rate_reward"]
    for name, p in report["policies"].items():
        for key in ("mean_reward", "mean_judge", "kl_to_ref", "kl_to_ref_se", "mean_length"):
            if p[key] is not None and not (key.startswith("kl_to_ref") and name == reference):
                m[f"{name}/{key}"] = p[key]
    return m


def write_outputs(stage_dir: Path, prompts: list[Prompt], policies: list[str], results: dict, report: dict) -> None:
    """RUN/eval/responses.jsonl (one row per prompt) and RUN/eval/report.json, each written atomically."""
    import json

    from rlchat.fileio import atomic_write_json, atomic_write_text

    lines = []
    for i, p in enumerate(prompts):
        row = {"index": i, "prompt": p.text, "messages": p.messages, "policies": {}}
        for name in policies:
            r = results[name]
            row["policies"][name] = {"response": r.responses[i], "reward": r.reward[i], "judge": r.judge[i],
                                     "log_ratio": r.log_ratio[i], "length": len(r.response_ids[i]),
                                     "eos": r.eos[i], "kl_k1": r.kl_k1[i], "kl_k3": r.kl_k3[i],
                                     "sample": r.sample_response[i], "sample_reward": r.sample_reward[i],
                                     "sample_judge": r.sample_judge[i]}
        lines.append(json.dumps(row, ensure_ascii=False))
    atomic_write_text(stage_dir / "responses.jsonl", "\n".join(lines) + "\n")
    atomic_write_json(stage_dir / "report.json", report)
