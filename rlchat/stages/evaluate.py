"""`rlchat eval`: generate with every policy of a run on held-out prompts, score, compare, write the report.

What it does, in order:
  1. validate: the run has a trained policy (a finished `sft` stage; `ppo` is used when it finished), the eval stage
     may start (a finished one needs --overwrite), the prompts load and are not empty, the judge imports and
     returns one finite number per response (called once on two prompts), the models and the reward model load.
     Nothing is written to the run directory before all of this passed.
  2. generate: every policy answers every prompt with the same decoding settings (greedy by default; sampling when
     --temperature > 0, with --top-p), batched with left padding. The SFT and PPO policies share one model in
     memory: the SFT-merged base with the PPO LoRA adapter on top, switched off for SFT. `--include-base` loads
     the base checkpoint a second time (the first copy has the SFT adapter merged into its weights).
  3. KL to the reference policy (the SFT policy, PPO's reference): for each response y of a policy pi,
     sum_t [log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)] over the response tokens (EOS included), at
     temperature 1 (the models' own distributions), averaged over prompts. This is the k1 estimate on the policy's
     own response; under greedy decoding it measures how far the policy's answer is from what SFT would say,
     not an exact KL. It is 0 for sft by definition.
  4. score: every response with the run's reward model (if the run has one; raw scores, not normalised) and with
     the --judge function (if given), both batched.
  5. metrics per policy (mean/std of scores, KL, length, EOS rate, distinct-1/2) and pairwise win rates with a
     95% Wilson score interval; write RUN/eval/responses.jsonl and report.json, then `rlchat.report.render`
     writes report.md and the PNG plots. All files are written atomically.

What it leaves out: multi-turn rollouts (a prompt with several turns is answered once), pairwise LLM judges (a
judge scores one response at a time), and sampling several responses per prompt.

    rlchat eval --run-dir runs/demo --dataset .demo/data/eval_prompts.jsonl --judge rlchat.demo.task:judge
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from rlchat.errors import ConfigError, DataError, RunDirError

POLICY_ORDER = ("base", "sft", "ppo")
REFERENCE = "sft"
# (a, b) pairs compared, in this order, when both policies were evaluated: "a over b"
COMPARISONS = (("ppo", "sft"), ("ppo", "base"), ("sft", "base"))
Z95 = 1.959963984540054  # two-sided 95% normal quantile


# ------------------------------------------------------------------------------------------------ statistics


def mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1; 0.0 for a single value) of the non-None values."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    if len(xs) == 1:
        return m, 0.0
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


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


# ---------------------------------------------------------------------------------------------------- judge


def _as_judge_error(err: ConfigError) -> ConfigError:
    """rlchat.rewards words its errors for PPO's --reward-fn; say --judge instead."""
    def fix(text):
        return text and text.replace("--reward-fn", "--judge").replace("reward_fn", "judge")
    return ConfigError(fix(err.problem), fix(err.fix))


def load_judge(spec: str) -> Callable:
    """A judge `module:function` or `path/to/file.py:function` as a callable f(prompts, completions) -> scores,
    imported by PPO's reward-function loader (`rlchat.rewards.load_reward_fn`, same rules as --reward-fn)."""
    from rlchat.rewards import load_reward_fn

    try:
        return load_reward_fn(spec)
    except ConfigError as err:
        raise _as_judge_error(err) from None


def call_judge(judge: Callable, spec: str, prompts: list[str], completions: list[str],
               during: str = "evaluation") -> list[float]:
    """judge(prompts, completions), checked: one finite number per completion; ConfigError otherwise."""
    from rlchat.rewards import call_reward_fn

    try:
        out = call_reward_fn(judge, spec, prompts, completions, during=during)
    except ConfigError as err:
        raise _as_judge_error(err) from None
    bad = [x for x in out if not math.isfinite(x)]
    if bad:
        raise ConfigError(f"judge '{spec}' returned a non-finite score ({bad[0]}) during {during}",
                          "return a finite float per completion")
    return out


# ----------------------------------------------------------------------------------------------- generation


def encode_prompt(tokenizer, messages: list[dict], max_tokens: int | None = None) -> list[int]:
    """Token ids of a chat prompt with the generation prompt appended; the oldest tokens are dropped beyond
    max_tokens (the chat template adds its own special tokens, so the tokenizer adds none)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if max_tokens is not None and len(ids) > max_tokens:
        ids = ids[-max_tokens:]
    return ids


def stop_token_ids(model, tokenizer) -> list[int]:
    """The ids that end a response: the tokenizer's eos plus the model's generation_config eos id(s)."""
    ids = []
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    for x in ([eos] if isinstance(eos, int) else list(eos or [])) + [tokenizer.eos_token_id]:
        if x is not None and x not in ids:
            ids.append(int(x))
    return ids


def max_positions(model) -> int | None:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def generation_config(tokenizer, stop_ids: list[int], max_new_tokens: int, temperature: float, top_p: float):
    """One explicit GenerationConfig for every policy, so a model's own saved defaults cannot change decoding."""
    from transformers import GenerationConfig

    sample = temperature > 0
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=sample, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=stop_ids or None, bos_token_id=tokenizer.bos_token_id)
    if sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return GenerationConfig(**kwargs)


def left_pad(seqs: list[list[int]], pad_id: int, device=None):
    """(ids (B, P), mask (B, P)) with every sequence right-aligned (left padding)."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def right_pad(seqs: list[list[int]], pad_id: int, device=None):
    """(ids (B, R), mask (B, R)) with every sequence left-aligned (right padding); R >= 1."""
    import torch

    width = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, :len(s)] = 1
    return ids.to(device), mask.to(device)


def cut_at_stop(row: list[int], stop_ids: list[int]) -> tuple[list[int], bool]:
    """The response up to and including its first stop token, and whether there was one."""
    for i, t in enumerate(row):
        if t in stop_ids:
            return row[:i + 1], True
    return row, False


def generate(model, tokenizer, prompt_ids: list[list[int]], gen_config, stop_ids: list[int]):
    """Generate for one batch of prompts. Returns (response token lists incl. the stop token, has_stop flags)."""
    import torch

    device = next(model.parameters()).device
    ids, mask = left_pad(prompt_ids, tokenizer.pad_token_id, device)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_config)
    responses, stops = [], []
    for row in out[:, ids.shape[1]:].tolist():  # (B, R)
        resp, stopped = cut_at_stop(row, stop_ids)
        responses.append(resp)
        stops.append(stopped)
    return responses, stops


def sequence_logprobs(model, prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int) -> list[float]:
    """Summed log pi(y | x) over the response tokens of each (prompt, response), at temperature 1.

    Prompts are left padded and responses right padded, positions count real tokens only (as `generate` does), so
    the log-probs are those of the tokens as they were generated. An empty response sums to 0.
    """
    import torch

    device = next(model.parameters()).device
    p_ids, p_mask = left_pad(prompt_ids, pad_id, device)       # (B, P)
    r_ids, r_mask = right_pad(response_ids, pad_id, device)    # (B, R)
    input_ids = torch.cat([p_ids, r_ids], dim=1)               # (B, T)
    attention_mask = torch.cat([p_mask, r_mask], dim=1)        # (B, T)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    P = p_ids.shape[1]
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        logits = logits[:, P - 1:-1].float()                   # (B, R, V): the state before each response token
        logp = torch.log_softmax(logits, dim=-1).gather(-1, r_ids.unsqueeze(-1)).squeeze(-1)  # (B, R)
        logp = (logp * r_mask).sum(dim=1)                      # (B,)
    return logp.tolist()


# -------------------------------------------------------------------------------------------------- policies


class Policies:
    """The models of a run's policies. `sft` and `ppo` share one model when the PPO policy is a LoRA adapter:
    the SFT-merged base with the adapter, which `use("sft")` switches off. `base` is its own model."""

    def __init__(self, sft_model, tokenizer, ppo_model=None, ppo_shared: bool = False, base_model=None):
        self.sft_model = sft_model
        self.tokenizer = tokenizer
        self.ppo_model = ppo_model
        self.ppo_shared = ppo_shared
        self.base_model = base_model

    @contextlib.contextmanager
    def use(self, name: str):
        if name == "base":
            yield self.base_model
        elif name == "ppo":
            yield self.ppo_model
        elif name == "sft" and self.ppo_shared:
            with self.ppo_model.disable_adapter():
                yield self.ppo_model
        else:
            yield self.sft_model


def ppo_policy_dir(run, rec: dict) -> Path:
    """RUN/ppo/policy (or what the manifest's outputs.policy says), checked to hold an adapter or a model."""
    rel = (rec.get("outputs") or {}).get("policy") or "ppo/policy"
    path = run.resolve_inside(rel)
    if not (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        raise RunDirError(f"the PPO policy {path} has no adapter_config.json or config.json",
                          f"rerun `rlchat ppo --run-dir {run.path} --overwrite`")
    return path


def attach_ppo(sft_model, policy_dir: Path, trust_remote_code: bool = False):
    """(model, shared): the PPO policy. A LoRA adapter goes on top of the SFT-merged model (shared=True);
    a full model directory is loaded on its own (shared=False)."""
    from rlchat import models

    if (policy_dir / "adapter_config.json").is_file():
        from peft import PeftModel

        models.check_weights(policy_dir, "rerun ppo for this run directory with --overwrite; a finished stage keeps "
                                         "no resumable state")
        try:
            model = PeftModel.from_pretrained(sft_model, str(policy_dir))
        except Exception as err:  # noqa: BLE001
            raise RunDirError(f"could not apply the PPO adapter {policy_dir} to the SFT model: {_first_line(err)}",
                              "rerun ppo for this run directory with --overwrite") from None
        model.eval()
        return model, True
    model = models.load_causal_lm(str(policy_dir), trust_remote_code=trust_remote_code)
    model.eval()
    return model, False


def load_ppo_policy(run, sft_model, trust_remote_code: bool = False):
    """(model, shared) of the run's finished PPO policy (see `attach_ppo`).

    PPO records the base its adapter sits on (outputs.base: "sft" or a --model spec, and base_hash). On "sft" the
    adapter goes on `sft_model`, after checking that the SFT weights are the ones PPO trained on; on another base,
    that model is loaded and the adapter goes on it (a second model in memory).
    """
    from rlchat.errors import ModelError
    from rlchat.stages.reward import load_base_causal, resolve_base

    rec = run.record("ppo") or {}
    outputs = rec.get("outputs") or {}
    policy_dir = ppo_policy_dir(run, rec)
    if not (policy_dir / "adapter_config.json").is_file():  # a full model (--full): no base needed
        return attach_ppo(sft_model, policy_dir, trust_remote_code)
    name = outputs.get("base") or "sft"
    base = resolve_base(run, None if name == "sft" else name)
    recorded = outputs.get("base_hash")
    if recorded and base.hash and base.hash != recorded:
        what = "the run's SFT model" if name == "sft" else f"the model at {name}"
        raise ModelError(f"the PPO adapter in {policy_dir} was trained on a different version of {what} "
                         f"(hash {recorded[:19]}..., now {base.hash[:19]}...)",
                         f"rerun ppo: rlchat ppo --run-dir {run.path} --overwrite")
    if name == "sft":
        return attach_ppo(sft_model, policy_dir, trust_remote_code)
    other, _ = load_base_causal(run, base, trust_remote_code)
    model, _ = attach_ppo(other, policy_dir, trust_remote_code)
    return model, False


def base_model_spec(run) -> str:
    """The base model the SFT stage started from (manifest sft outputs.base_model or config.model)."""
    from rlchat import models

    rec = run.record("sft") or {}
    spec = (rec.get("outputs") or {}).get("base_model") or (rec.get("config") or {}).get("model")
    return models._resolve_base(run.path, spec)


# ------------------------------------------------------------------------------------------------ reward model


class RunRewardModel:
    """The run's reward model, scoring (prompt messages, completion) exactly as the reward stage does
    (`rlchat.stages.reward.encode`: chat template, left-truncated to its max_length; `score_token_ids`).
    Raw scores: PPO's normalisation with reward_stats.json is not applied (win rates do not depend on it)."""

    def __init__(self, run, batch_size: int, device: str | None = None, trust_remote_code: bool = False):
        from rlchat.stages.reward import load_reward_model

        self.model, self.tokenizer = load_reward_model(run.path, trust_remote_code=trust_remote_code,
                                                       device=device)
        self.model.requires_grad_(False)
        self.max_length = ((run.record("reward") or {}).get("config") or {}).get("max_length")
        self.batch_size = batch_size

    def __call__(self, prompts: list[list[dict]], completions: list[str]) -> list[float]:
        from rlchat.stages.reward import encode, score_token_ids

        ids = [encode(self.tokenizer, messages, [{"role": "assistant", "content": completion}], self.max_length)[0]
               for messages, completion in zip(prompts, completions)]
        return score_token_ids(self.model, ids, self.tokenizer.pad_token_id, self.batch_size).tolist()


def load_run_reward_model(run, batch_size: int, device: str | None = None, trust_remote_code: bool = False):
    """A RunRewardModel when the run has a finished reward stage, else None."""
    rec = run.record("reward")
    if not rec or rec.get("status") != "done":
        return None
    return RunRewardModel(run, batch_size, device, trust_remote_code)


# -------------------------------------------------------------------------------------------------- validate


@dataclass
class Prompt:
    messages: list[dict]           # the prompt as chat messages (user turn(s))
    text: str                      # the last user turn, for judges and the report


@dataclass
class PolicyResult:
    responses: list[str] = field(default_factory=list)
    response_ids: list[list[int]] = field(default_factory=list)  # incl. the stop token
    eos: list[bool] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    reward: list[float | None] = field(default_factory=list)
    judge: list[float | None] = field(default_factory=list)


def choose_policies(run, cfg) -> list[str]:
    """The policies to evaluate, in POLICY_ORDER; RunDirError when one asked for is not in the run."""
    ppo_rec = run.record("ppo")
    has_ppo = bool(ppo_rec and ppo_rec.get("status") == "done")
    if cfg.policies:
        wanted = set(cfg.policies)
        if "ppo" in wanted and not has_ppo:
            status = ppo_rec.get("status") if ppo_rec else "not run"
            raise RunDirError(f"policy 'ppo' was asked for but the ppo stage in {run.path} is {status}",
                              f"run `rlchat ppo --run-dir {run.path}` first, or leave ppo out of --policies")
        if cfg.include_base:
            wanted.add("base")
    else:
        wanted = {"sft"} | ({"ppo"} if has_ppo else set()) | ({"base"} if cfg.include_base else set())
    return [p for p in POLICY_ORDER if p in wanted]


def load_prompts(cfg, run) -> tuple[list[Prompt], str]:
    """The eval prompts (at most max_prompts) and the dataset spec they came from."""
    from rlchat import data

    spec = cfg.dataset
    if not spec:
        ppo_cfg = (run.record("ppo") or {}).get("config") or {}
        spec = ppo_cfg.get("dataset")
        if not spec:
            raise ConfigError("eval needs prompts", "pass --dataset (a file with a 'prompt', 'messages' or 'text' "
                              "column), or set `eval: {dataset: ...}` in the recipe")
    ds = data.load_any(spec, split=cfg.split, config=cfg.dataset_config)
    if len(ds) == 0:
        raise DataError(f"dataset {spec} has no prompts", "pass a dataset with at least one row")
    column = data.detect_prompt_column(ds, spec)
    n = len(ds) if cfg.max_prompts is None else min(cfg.max_prompts, len(ds))
    prompts = []
    for i in range(n):
        row = ds[i]
        prompts.append(Prompt(messages=data.to_prompt_messages(row, column), text=data.prompt_text(row, column)))
    return prompts, spec


# ------------------------------------------------------------------------------------------------------ run


def run(cfg) -> dict:
    """Evaluate the run's policies (steps 1-5 of the module docstring); returns report.json's content + summary.
    Running out of memory is a one-line error naming --batch-size and --max-new-tokens."""
    from rlchat.stages.common import oom_guard

    with oom_guard("eval"):
        return _run(cfg)


def _run(cfg) -> dict:
    from rlchat import models
    from rlchat.config import to_dict
    from rlchat.progress import console
    from rlchat.rundir import RunDir, input_record
    from rlchat.stages.common import quiet_libraries, stage_lifecycle

    t_start = time.time()
    # 1. validate everything before the first write
    run = RunDir(cfg.run_dir)
    if not run.exists():
        raise RunDirError(f"no run at {run.path} (no run.json), so there is no trained policy to evaluate",
                          "pass the --run-dir you trained in (rlchat sft --run-dir ...)")
    run.check_can_start("eval", cfg.overwrite)
    sft_rec = run.record("sft")
    if not sft_rec or sft_rec.get("status") != "done":
        status = sft_rec.get("status") if sft_rec else "not run"
        raise RunDirError(f"{run.path} has no trained policy: stage 'sft' is {status}",
                          f"train one first: rlchat sft --run-dir {run.path} --model ... --dataset ...")
    run.require_done("sft", f"rerun `rlchat sft --run-dir {run.path} --overwrite`")
    policies = choose_policies(run, cfg)
    ppo_rec = run.record("ppo")
    if ppo_rec and "ppo" not in policies and not cfg.policies:
        console.print(f"[yellow]eval: the ppo stage is {ppo_rec.get('status')}, so only its SFT policy is "
                      f"evaluated[/]", highlight=False)
    prompts, dataset_spec = load_prompts(cfg, run)
    judge = None
    if cfg.judge:
        judge = load_judge(cfg.judge)
        from rlchat.rewards import DUMMY_COMPLETIONS, DUMMY_PROMPTS

        call_judge(judge, cfg.judge, DUMMY_PROMPTS, DUMMY_COMPLETIONS, during="the check on two dummy prompts")
    console.print(f"[bold]eval[/] {len(prompts)} prompts from {dataset_spec}; policies: {', '.join(policies)}"
                  + (f"; judge {cfg.judge}" if cfg.judge else ""), highlight=False)

    quiet_libraries()
    device = models.pick_device()
    sft_model, tokenizer = models.load_sft_policy(run.path, trust_remote_code=cfg.trust_remote_code, device=device)
    ppo_model, shared = None, False
    if "ppo" in policies:
        ppo_model, shared = load_ppo_policy(run, sft_model, cfg.trust_remote_code)
        ppo_model.to(device)
    base_model = None
    if "base" in policies:
        base_model = models.load_causal_lm(base_model_spec(run), trust_remote_code=cfg.trust_remote_code,
                                           device=device)
        models.align_model_with_tokenizer(base_model, tokenizer)
        base_model.eval()
    rm = load_run_reward_model(run, cfg.batch_size, device, cfg.trust_remote_code)
    pol = Policies(sft_model, tokenizer, ppo_model, shared, base_model)

    parent = "ppo" if "ppo" in policies else "sft"
    inputs = {"dataset": input_record(dataset_spec)}
    if cfg.judge:
        inputs["judge"] = {"spec": cfg.judge}
    stage_dir = run.begin_stage("eval", config=to_dict(cfg), inputs=inputs, parent=parent, overwrite=cfg.overwrite)
    from rlchat import dist

    with stage_lifecycle(run, "eval"):
        # 2-4. generate, KL to the reference, scores (each process its share of the prompts)
        results = evaluate_policies(pol, policies, prompts, cfg, rm, judge, console)
        if not dist.is_main():  # the main process has everything gathered; it writes the report
            return {"rank": dist.rank()}
        # 5. per-policy metrics and win rates; responses.jsonl and report.json
        report = build_report(run, cfg, policies, prompts, results, dataset_spec, has_rm=rm is not None)
        write_outputs(stage_dir, prompts, policies, results, report)
        # 6. report.md and the plots (render reads report.json and responses.jsonl back), then report.json again
        # with the paths of everything written
        from rlchat import report as report_mod
        from rlchat.rundir import atomic_write_json

        rendered = report_mod.render(run.path)
        report["files"] = {"report_json": "eval/report.json", "responses": "eval/responses.jsonl",
                           "report_md": "eval/report.md",
                           "plots": {k: f"eval/{Path(p).name}" for k, p in rendered["plots"].items()}}
        atomic_write_json(stage_dir / "report.json", report)
        metrics = headline_metrics(report)
        metrics["wall_s"] = round(time.time() - t_start, 1)
        outputs = {"report": "eval/report.json", "responses": "eval/responses.jsonl", "report_md": "eval/report.md",
                   "plots": report["files"]["plots"]}
        run.finish_stage("eval", metrics=metrics, outputs=outputs)
    return {**report, "summary": f"{report['summary']}; report at {stage_dir / 'report.md'}"}


def evaluate_policies(pol: Policies, policies: list[str], prompts: list[Prompt], cfg, rm, judge, console) -> dict:
    """Steps 2-4 for every policy: generate, KL to the reference, reward-model and judge scores.

    In a multi-process run each process takes every world-th batch of prompts (its own sampling seed), and the
    results are gathered back into prompt order on every process."""
    import torch

    from rlchat import dist
    from rlchat.progress import stage_progress

    tok = pol.tokenizer
    model0 = pol.sft_model
    limit = max_positions(model0)
    prompt_limit = None if limit is None else max(1, limit - cfg.max_new_tokens)
    prompt_ids = [encode_prompt(tok, p.messages, prompt_limit) for p in prompts]
    stop_ids = stop_token_ids(model0, tok)
    gen = generation_config(tok, stop_ids, cfg.max_new_tokens, cfg.temperature, cfg.top_p)
    bs = cfg.batch_size
    batches = [list(range(i, min(i + bs, len(prompts)))) for i in range(0, len(prompts), bs)]
    batches = batches[dist.rank()::dist.world_size()]  # this process's share
    mine = [i for rows in batches for i in rows]
    local = {i: j for j, i in enumerate(mine)}  # prompt index -> position in this process's result lists
    results = {name: PolicyResult() for name in policies}
    n_kl = sum(1 for p in policies if p != REFERENCE)
    total = len(batches) * (len(policies) + n_kl + (1 if rm is not None else 0) * len(policies))

    with (stage_progress() if dist.is_main() else _NoProgress()) as progress:
        task = progress.add_task("eval", total=total, info="")
        # 2. generate, one policy at a time, same seed for each so sampling is comparable
        for name in policies:
            progress.update(task, info=f"generating: {name}")
            torch.manual_seed(cfg.seed + 1_000_003 * dist.rank())
            with pol.use(name) as model:
                for rows in batches:
                    resp, stops = generate(model, tok, [prompt_ids[i] for i in rows], gen, stop_ids)
                    r = results[name]
                    r.response_ids += resp
                    r.eos += stops
                    r.responses += [tok.decode([t for t in ids if t not in stop_ids], skip_special_tokens=True)
                                    .strip() for ids in resp]
                    progress.advance(task)
        # 3. KL to the reference (SFT) policy on each policy's own responses
        for name in policies:
            if name == REFERENCE:
                results[name].kl = [0.0] * len(mine)
                continue
            progress.update(task, info=f"KL to {REFERENCE}: {name}")
            r = results[name]
            for rows in batches:
                p_ids = [prompt_ids[i] for i in rows]
                y_ids = [r.response_ids[local[i]] for i in rows]
                with pol.use(name) as model:
                    own = sequence_logprobs(model, p_ids, y_ids, tok.pad_token_id)
                with pol.use(REFERENCE) as model:
                    ref = sequence_logprobs(model, p_ids, y_ids, tok.pad_token_id)
                r.kl += [a - b for a, b in zip(own, ref)]
                progress.advance(task)
        # 4. scores
        for name in policies:
            r = results[name]
            if rm is not None:
                progress.update(task, info=f"reward model: {name}")
                for rows in batches:
                    r.reward += rm([prompts[i].messages for i in rows], [r.responses[local[i]] for i in rows])
                    progress.advance(task)
            else:
                r.reward = [None] * len(mine)
            if judge is not None:
                progress.update(task, info=f"judge: {name}")
                r.judge = call_judge(judge, cfg.judge, [prompts[i].text for i in mine], r.responses)
            else:
                r.judge = [None] * len(mine)
        progress.update(task, info="done")
    if dist.is_distributed():
        results = _gather_results(results, mine, len(prompts))
    return results


def _gather_results(results: dict, mine: list[int], n: int) -> dict:
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


class _NoProgress:
    """The progress bar's interface, drawing nothing (the non-main processes of a multi-process run)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, *args, **kwargs):
        return 0

    def update(self, *args, **kwargs):
        pass

    def advance(self, *args, **kwargs):
        pass


# ---------------------------------------------------------------------------------------------------- report


def policy_metrics(r: PolicyResult) -> dict:
    mean_reward, std_reward = mean_std(r.reward)
    mean_judge, std_judge = mean_std(r.judge)
    kl, _ = mean_std(r.kl)
    lengths = [len(ids) for ids in r.response_ids]
    return {
        "n": len(r.responses),
        "mean_reward": mean_reward,
        "std_reward": std_reward,
        "mean_judge": mean_judge,
        "std_judge": std_judge,
        "kl_to_ref": kl,
        "mean_length": sum(lengths) / len(lengths) if lengths else None,
        "eos_rate": sum(r.eos) / len(r.eos) if r.eos else None,
        "distinct_1": distinct_n(r.responses, 1),
        "distinct_2": distinct_n(r.responses, 2),
    }


def comparisons(policies: list[str], results: dict) -> list[dict]:
    out = []
    for a, b in COMPARISONS:
        if a not in policies or b not in policies:
            continue
        ra, rb = results[a], results[b]
        row = {"a": a, "b": b, "n": len(ra.responses)}
        for key, scores in (("reward", "reward"), ("judge", "judge")):
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
        out.append(row)
    return out


def summary_line(policies: dict, comps: list[dict]) -> str:
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
    kl = policies[c["a"]]["kl_to_ref"]
    if kl is not None and c["a"] != REFERENCE:
        text += f"; KL {kl:.2f} nats"
    return text + f" ({c['n']} prompts)"


def build_report(run, cfg, policies: list[str], prompts: list[Prompt], results: dict, dataset_spec: str,
                 has_rm: bool) -> dict:
    per_policy = {name: policy_metrics(results[name]) for name in policies}
    comps = comparisons(policies, results)
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
        "reference": REFERENCE,
        "reward_model": "reward" if has_rm else None,
        "judge": cfg.judge,
        "ci": "wilson95",
        "kl": "mean over prompts of sum_t log pi(y_t|x,y<t) - log pi_sft(y_t|x,y<t) on the policy's own response, "
              "temperature 1",
        "length": "response tokens, EOS included",
        "distinct": "unique / total whitespace-word n-grams over all responses",
    }
    return {"run_dir": str(run.path), "settings": settings, "policies": per_policy, "comparisons": comps,
            "summary": summary_line(per_policy, comps)}


def headline_metrics(report: dict) -> dict:
    """The manifest's eval metrics: the first comparison's win rates, the KL and mean scores per policy."""
    m: dict = {"n": report["settings"]["n_prompts"]}
    comps = report["comparisons"]
    if comps:
        c = comps[0]
        m["comparison"] = f"{c['a']}_vs_{c['b']}"
        m["win_rate_judge"] = c["win_rate_judge"]
        m["win_rate_reward"] = c["win_rate_reward"]
        m["win_rate"] = c["win_rate_judge"] if c["win_rate_judge"] is not None else c["win_rate_reward"]
    for name, p in report["policies"].items():
        for key in ("mean_reward", "mean_judge", "kl_to_ref", "mean_length"):
            if p[key] is not None and not (key == "kl_to_ref" and name == REFERENCE):
                m[f"{name}/{key}"] = p[key]
    return m


def write_outputs(stage_dir: Path, prompts: list[Prompt], policies: list[str], results: dict, report: dict) -> None:
    """RUN/eval/responses.jsonl (one row per prompt) and RUN/eval/report.json, each written atomically."""
    import json

    from rlchat.rundir import atomic_write_json, atomic_write_text

    lines = []
    for i, p in enumerate(prompts):
        row = {"index": i, "prompt": p.text, "messages": p.messages, "policies": {}}
        for name in policies:
            r = results[name]
            row["policies"][name] = {"response": r.responses[i], "reward": r.reward[i], "judge": r.judge[i],
                                     "kl": r.kl[i], "length": len(r.response_ids[i]), "eos": r.eos[i]}
        lines.append(json.dumps(row, ensure_ascii=False))
    atomic_write_text(stage_dir / "responses.jsonl", "\n".join(lines) + "\n")
    atomic_write_json(stage_dir / "report.json", report)


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0].rstrip(".")
