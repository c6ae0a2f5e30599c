"""PPO health checks: pure functions over the metrics history (the rows of RUN/ppo/metrics.jsonl), each finding
a known failure and saying how to fix it.

    from rlchat.ppo_health import check_health
    for f in check_health(rows, response_length=64, target_kl=None, missing_eos_penalty=None):
        print(f.text)

The checks (each looks at the last WINDOW logged rows, so one noisy step cannot fire it):
  not_moving       policy/approx_kl and policy/clipfrac near zero on MOVING_STEPS logged steps in a row while the
                   learning rate is still at least half its peak (it decays linearly to 0, so the end of every run
                   moves little), and the KL to the reference (objective/kl) still below KL_MOVED on those steps:
                   the updates do not change the policy (the learning rate is too low for this model/adapter)
                   -> raise --lr. Small steps that add up do not count: the demo at lr 5e-5 logged approx_kl
                   ~4e-6 per update for 100 steps while its KL to the reference grew to 1 nat and it won.
  kl_runaway       objective/kl above KL_HIGH nats and rising over the window, or above 3 x --target-kl:
                   the policy drifts from the reference without bound -> raise --kl-coef or set --target-kl.
  entropy_collapse objective/entropy fell below ENTROPY_DROP of its start: the policy became (near)
                   deterministic -> raise --kl-coef or set --target-kl.
  length_hacking   responses run into --response-length (mean length >= 95% of it) while the EOS rate is below
                   half, or the EOS rate fell by EOS_DROP from its start -> --missing-eos-penalty.
  cut_at_limit     responses at the limit with EOS rate below half from the first steps on (the starting model
                   answers longer than --response-length; SmolLM2 at 64 tokens does): not learnt, so not hacking
                   -> raise --response-length, or --missing-eos-penalty to reward finishing.
  value_not_learning  value/explained_variance below 0 on every row of the window (after the first window): the
                   critic predicts the returns worse than their mean -> check the reward scale (keep
                   --normalize-reward), raise --vf-coef, or use --value-model adapter.
  over_optimisation  the held-out judge (heldout/judge) fell by more than JUDGE_DROP from its best, and by more than
                   2 standard errors of the difference when heldout/judge_se is logged (a drop within sampling noise
                   is not one), while the held-out proxy reward (heldout/score) rose past its value at that best: the
                   policy exploits the
                   reward model -> stop, or use the best checkpoint RUN/ppo/best/ (`--policy best`).
The thresholds are module constants; the tests in tests/test_ppo_health.py provoke each check with a history that
has the failure and keep it quiet on a healthy one (and on a tiny model run for not_moving).
"""
from __future__ import annotations

from dataclasses import dataclass

WINDOW = 5               # rows a condition must hold for (the latest ones)
MOVING_STEPS = 4         # not_moving: this many logged steps in a row at half the peak lr or more
# policy/approx_kl below this: the update did not change the token log-probs. Measured on the tiny test model
# (8 steps of 8 rollouts, 2 PPO epochs): lr 1e-9 ~1e-14, lr 5e-5 4e-6 .. 5e-8, lr 1e-3 1.5e-3 .. 3e-5 in the
# first half of the run; healthy runs of real models sit at 1e-3 .. 1e-2 (clipfrac 0.05 .. 0.2)
APPROX_KL_FLOOR = 1e-5
CLIPFRAC_FLOOR = 1e-3    # policy/clipfrac below this: no token reached the clip range
# objective/kl (nats per response, mean of the same steps) at or above this: the small updates have added up. A
# policy equal to its reference estimates exactly 0; measured: tiny model at lr 5e-5 |KL| <= 0.015 after 8 steps
# (not moving), the demo at lr 5e-5 0.05-0.08 from step 8 and 1.0 by step 48 (moving, judge win 0.71)
KL_MOVED = 0.05
KL_HIGH = 20.0           # nats per response: far beyond what a KL-regularised run settles at
ENTROPY_DROP = 0.25      # entropy below this fraction of its starting value counts as collapsed
EOS_DROP = 0.3           # the EOS rate fell by this much (absolute) from its start
LENGTH_AT_LIMIT = 0.95   # mean length at or above this fraction of --response-length
JUDGE_DROP = 0.05        # the held-out judge fell this far below its best (judge units)


@dataclass(frozen=True)
class Finding:
    """One failed check: what was seen (message), how to fix it (fix), the step it was seen at."""

    check: str
    message: str
    fix: str
    step: int | None = None

    @property
    def text(self) -> str:
        at = f"step {self.step}: " if self.step is not None else ""
        return f"{at}{self.message}. Fix: {self.fix}."


def _series(rows: list[dict], key: str) -> list[float]:
    return [float(r[key]) for r in rows if isinstance(r.get(key), (int, float)) and r[key] == r[key]]


def _last_step(rows: list[dict]) -> int | None:
    return rows[-1].get("step") if rows else None


def not_moving(rows: list[dict], lr: float | None = None) -> Finding | None:
    lrs = _series(rows, "lr")
    if lrs:  # only the steps before the linear decay took the learning rate below half its peak
        peak = max(lrs)
        rows = [r for r in rows if not isinstance(r.get("lr"), (int, float)) or r["lr"] >= 0.5 * peak]
    kl, clip = _series(rows, "policy/approx_kl"), _series(rows, "policy/clipfrac")
    n = MOVING_STEPS
    if len(kl) < n or len(clip) < n:
        return None
    drift = _series(rows, "objective/kl")[-n:]
    drift_mean = sum(drift) / len(drift) if drift else 0.0
    if max(kl[-n:]) < APPROX_KL_FLOOR and max(clip[-n:]) < CLIPFRAC_FLOOR and drift_mean < KL_MOVED:
        now = f" (now {lr:g})" if lr else ""
        to_ref = f", KL to the reference {drift_mean:.3f} nats" if drift else ""
        return Finding("not_moving", f"the policy barely moves per update: policy/approx_kl {max(kl[-n:]):.1e} and "
                       f"policy/clipfrac {max(clip[-n:]):.3f} or less on {n} logged steps in a row{to_ref}",
                       f"raise --lr{now}, e.g. x5-x10 (LoRA adapters usually need 1e-4 to 1e-3)", _last_step(rows))
    return None


def kl_runaway(rows: list[dict], target_kl: float | None = None) -> Finding | None:
    kl = _series(rows, "objective/kl")
    if len(kl) < WINDOW:
        return None
    last = kl[-WINDOW:]
    rising = last[-1] > last[0] and sum(last[WINDOW // 2:]) / (WINDOW - WINDOW // 2) > sum(last[:WINDOW // 2]) / (
        WINDOW // 2)
    over_target = target_kl is not None and min(last) > 3 * target_kl
    if (min(last) > KL_HIGH and rising) or over_target:
        why = (f"above 3 x --target-kl {target_kl:g}" if over_target else f"above {KL_HIGH:g} nats and rising")
        fix = ("raise --kl-coef (the adaptive controller starts from it) or lower --lr" if target_kl is not None
               else "raise --kl-coef, or set --target-kl (e.g. 6) for the adaptive KL controller")
        return Finding("kl_runaway", f"the KL to the reference keeps growing: objective/kl {last[-1]:.1f} nats "
                       f"per response, {why} over the last {WINDOW} logged steps", fix, _last_step(rows))
    return None


def entropy_collapse(rows: list[dict]) -> Finding | None:
    ent = _series(rows, "objective/entropy")
    if len(ent) < 2 * WINDOW:
        return None
    start = sum(ent[:WINDOW]) / WINDOW
    if start > 0 and max(ent[-WINDOW:]) < ENTROPY_DROP * start:
        return Finding("entropy_collapse", f"the policy's entropy collapsed: objective/entropy "
                       f"{ent[-1]:.3f} nats per token, from {start:.3f} at the start",
                       "raise --kl-coef, or set --target-kl, so the policy stays near the reference",
                       _last_step(rows))
    return None


def length_hacking(rows: list[dict], response_length: int | None = None,
                   missing_eos_penalty: float | None = None) -> Finding | None:
    eos, length = _series(rows, "response/eos_rate"), _series(rows, "response/length")
    if len(eos) < 2 * WINDOW:
        return None
    start, now = sum(eos[:WINDOW]) / WINDOW, sum(eos[-WINDOW:]) / WINDOW

    def cut(window: list[float], eos_rate: float) -> bool:
        return min(window) >= LENGTH_AT_LIMIT * response_length and eos_rate < 0.5

    at_limit = response_length is not None and len(length) >= 2 * WINDOW and cut(length[-WINDOW:], now)
    falling = start - now >= EOS_DROP
    if at_limit and not falling and cut(length[:WINDOW], start):
        # at the limit from the first steps: the starting model answers at length, PPO did not learn it
        return Finding("cut_at_limit", f"most responses are cut at --response-length {response_length} since the "
                       f"start (mean length {length[-1]:.1f}, EOS rate {start:.2f} at the start, {now:.2f} now): the "
                       "reward model scores unfinished answers", "raise --response-length if answers should finish "
                       "within it, or set --missing-eos-penalty to reward finishing; nothing to fix if the answers "
                       "are meant to run that long", _last_step(rows))
    if not (at_limit or falling):
        return None
    what = (f"responses run into --response-length {response_length} (mean length {length[-1]:.1f})" if at_limit
            else f"the EOS rate fell from {start:.2f} to {now:.2f}")
    fix = ("set --missing-eos-penalty (e.g. 1.0) so that unfinished answers score lower" if not missing_eos_penalty
           else f"raise --missing-eos-penalty (now {missing_eos_penalty:g})")
    return Finding("length_hacking", f"length hacking: {what}, EOS rate {now:.2f}", fix, _last_step(rows))


def value_not_learning(rows: list[dict]) -> Finding | None:
    ev = _series(rows, "value/explained_variance")
    if len(ev) < 2 * WINDOW:  # the critic gets a window to start learning
        return None
    if max(ev[-WINDOW:]) < 0:
        return Finding("value_not_learning", f"the value model is not learning: value/explained_variance "
                       f"{ev[-1]:.2f} (below 0 on the last {WINDOW} logged steps: worse than predicting the mean "
                       "return)", "keep --normalize-reward on (reward scale), raise --vf-coef, or use "
                       "--value-model adapter (a critic initialised from the reward model)", _last_step(rows))
    return None


def over_optimisation(rows: list[dict]) -> Finding | None:
    pts = [(r.get("step"), float(r["heldout/judge"]), float(r["heldout/score"]), float(r.get("heldout/judge_se") or 0))
           for r in rows
           if isinstance(r.get("heldout/judge"), (int, float)) and isinstance(r.get("heldout/score"), (int, float))]
    if len(pts) < 3:
        return None
    best = max(range(len(pts)), key=lambda i: pts[i][1])
    step, judge, score, se = pts[-1]
    noise = 2 * (se ** 2 + pts[best][3] ** 2) ** 0.5
    if best < len(pts) - 1 and judge < pts[best][1] - max(JUDGE_DROP, noise) and score > pts[best][2]:
        return Finding("over_optimisation", f"over-optimisation: the held-out judge fell from {pts[best][1]:.3f} "
                       f"(step {pts[best][0]}) to {judge:.3f} while the held-out reward-model score rose from "
                       f"{pts[best][2]:.3f} to {score:.3f}",
                       "stop here, or use the best checkpoint RUN/ppo/best/ (`rlchat eval --policy best`, "
                       "`rlchat export --policy best`); a larger --kl-coef delays it", step)
    return None


def check_health(rows: list[dict], lr: float | None = None, response_length: int | None = None,
                 target_kl: float | None = None, missing_eos_penalty: float | None = None) -> list[Finding]:
    """Every check on the history `rows` (metrics rows in step order); the findings that hold now."""
    found = [not_moving(rows, lr), kl_runaway(rows, target_kl), entropy_collapse(rows),
             length_hacking(rows, response_length, missing_eos_penalty), value_not_learning(rows),
             over_optimisation(rows)]
    return [f for f in found if f is not None]


def check_health_cfg(rows: list[dict], cfg) -> list[Finding]:
    """check_health with the settings of a PPOConfig (or grpo/rloo's GroupConfig)."""
    found = check_health(rows, lr=cfg.lr, response_length=cfg.response_length, target_kl=cfg.target_kl,
                         missing_eos_penalty=cfg.missing_eos_penalty)
    if getattr(cfg, "ppo_epochs", 0) * getattr(cfg, "mini_batches", 0) == 1:  # one optimizer step per batch, after
        found = [f for f in found if f.check != "not_moving"]  # approx_kl and clipfrac are measured: always 0
    return found


class HealthMonitor:
    """The checks while PPO runs: `add(row)` returns the findings that newly hold (each check is reported once,
    when it starts to hold); `seen` keeps every first finding for the final summary."""

    def __init__(self, cfg, rows: list[dict] | None = None):
        self.cfg = cfg
        self.rows: list[dict] = list(rows or [])
        self.seen: dict[str, Finding] = {}

    def add(self, row: dict) -> list[Finding]:
        self.rows.append(row)
        new = [f for f in check_health_cfg(self.rows, self.cfg) if f.check not in self.seen]
        for f in new:
            self.seen[f.check] = f
        return new

    def final(self) -> tuple[list[Finding], list[Finding]]:
        """(findings that hold at the end, findings that held at some step but no longer do)."""
        now = check_health_cfg(self.rows, self.cfg)
        names = {f.check for f in now}
        return now, [f for name, f in self.seen.items() if name not in names]
