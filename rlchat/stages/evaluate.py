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
import time
from dataclasses import dataclass, field
from pathlib import Path

from rlchat.errors import ConfigError, RunDirError
from rlchat.generation import (encode_prompt, generate, generation_config, prompt_limit, sequence_logprobs,
                               stop_token_ids)
from rlchat.prompts import Prompt
from rlchat.stats import distinct_n, mean_std, win_rate

POLICY_ORDER = ("base", "sft", "ppo")
REFERENCE_POLICY = "sft"  # the policy KL is measured against (PPO's reference)
# (a, b) pairs compared, in this order, when both policies were evaluated: "a over b"
COMPARISONS = (("ppo", "sft"), ("ppo", "base"), ("sft", "base"))


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


# -------------------------------------------------------------------------------------------------- validate


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


def prompts_spec(cfg, run) -> str:
    """The eval prompts' dataset: --dataset, else the one the run's PPO stage trained on."""
    spec = cfg.dataset or ((run.record("ppo") or {}).get("config") or {}).get("dataset")
    if not spec:
        raise ConfigError("eval needs prompts", "pass --dataset (a file with a 'prompt', 'messages' or 'text' "
                          "column), or set `eval: {dataset: ...}` in the recipe")
    return spec


# ------------------------------------------------------------------------------------------------------ run


def run(cfg) -> dict:
    """Evaluate the run's policies (steps 1-5 of the module docstring); returns report.json's content + summary.
    Running out of memory is a one-line error naming --batch-size and --max-new-tokens."""
    from rlchat.stages.common import oom_guard

    with oom_guard("eval"):
        return _run(cfg)


def _run(cfg) -> dict:
    from rlchat import dist
    from rlchat.config import to_dict
    from rlchat.fileio import input_record
    from rlchat.stages.common import stage_lifecycle

    t_start = time.time()
    # 1. validate everything before the first write, then load the models
    run, policies, prompts, dataset_spec, judge = _validate(cfg)
    pol, rm = _load_models(run, cfg, policies)
    parent = "ppo" if "ppo" in policies else "sft"
    inputs = {"dataset": input_record(dataset_spec)}
    if cfg.judge:
        inputs["judge"] = {"spec": cfg.judge}
    stage_dir = run.begin_stage("eval", config=to_dict(cfg), inputs=inputs, parent=parent, overwrite=cfg.overwrite)
    with stage_lifecycle(run, "eval"):
        # 2-4. generate, KL to the reference, scores (each process its share of the prompts)
        results = evaluate_policies(pol, policies, prompts, cfg, rm, judge)
        if not dist.is_main():  # the main process has everything gathered; it writes the report
            return {"rank": dist.rank()}
        # 5. per-policy metrics and win rates; responses.jsonl, report.json, report.md and the plots
        report = build_report(run, cfg, policies, prompts, results, dataset_spec, has_rm=rm is not None)
        write_outputs(stage_dir, prompts, policies, results, report)
        _write_report_files(run, stage_dir, report)
        metrics = headline_metrics(report)
        metrics["wall_s"] = round(time.time() - t_start, 1)
        outputs = {"report": "eval/report.json", "responses": "eval/responses.jsonl", "report_md": "eval/report.md",
                   "plots": report["files"]["plots"]}
        run.finish_stage("eval", metrics=metrics, outputs=outputs)
    return {**report, "summary": f"{report['summary']}; report at {stage_dir / 'report.md'}"}


def _validate(cfg) -> tuple:
    """Step 1: (run, policies, prompts, dataset spec, judge or None), reading only."""
    from rlchat.progress import console
    from rlchat.prompts import load_prompts
    from rlchat.rewards import DUMMY_COMPLETIONS, DUMMY_PROMPTS, call_judge, load_judge
    from rlchat.rundir import RunDir

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
    dataset_spec = prompts_spec(cfg, run)
    prompts, _, _ = load_prompts(dataset_spec, cfg.split, cfg.dataset_config, limit=cfg.max_prompts)
    judge = None
    if cfg.judge:
        judge = load_judge(cfg.judge)
        call_judge(judge, cfg.judge, DUMMY_PROMPTS, DUMMY_COMPLETIONS, during="the check on two dummy prompts")
    console.print(f"[bold]eval[/] {len(prompts)} prompts from {dataset_spec}; policies: {', '.join(policies)}"
                  + (f"; judge {cfg.judge}" if cfg.judge else ""), highlight=False)
    return run, policies, prompts, dataset_spec, judge


def _load_models(run, cfg, policies: list[str]):
    """(Policies, the run's reward scorer or None), on the device."""
    from rlchat import models
    from rlchat.run_models import base_model_spec, load_ppo_policy, load_run_reward_scorer, load_sft_policy
    from rlchat.progress import quiet_libraries

    quiet_libraries()
    device = models.pick_device()
    sft_model, tokenizer = load_sft_policy(run.path, trust_remote_code=cfg.trust_remote_code, device=device)
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
    rm = load_run_reward_scorer(run, cfg.batch_size, device, cfg.trust_remote_code)
    return Policies(sft_model, tokenizer, ppo_model, shared, base_model), rm


def _write_report_files(run, stage_dir: Path, report: dict) -> None:
    """report.md and the plots (render reads report.json and responses.jsonl back), then report.json again with
    the paths of everything written."""
    from rlchat import report as report_mod
    from rlchat.fileio import atomic_write_json

    rendered = report_mod.render(run.path)
    report["files"] = {"report_json": "eval/report.json", "responses": "eval/responses.jsonl",
                       "report_md": "eval/report.md",
                       "plots": {k: f"eval/{Path(p).name}" for k, p in rendered["plots"].items()}}
    atomic_write_json(stage_dir / "report.json", report)


@dataclass
class _Batches:
    """This process's share of the prompts: batches of prompt indices, and where each prompt's results sit."""

    prompt_ids: list[list[int]]   # every prompt's token ids
    batches: list[list[int]]      # this process's batches of prompt indices
    mine: list[int]               # its prompt indices, in order
    local: dict                   # prompt index -> position in this process's result lists


def evaluate_policies(pol: Policies, policies: list[str], prompts: list[Prompt], cfg, rm, judge) -> dict:
    """Steps 2-4 for every policy: generate, KL to the reference, reward-model and judge scores.

    In a multi-process run each process takes every world-th batch of prompts (its own sampling seed), and the
    results are gathered back into prompt order on every process."""
    from rlchat import dist
    from rlchat.progress import stage_progress

    tok = pol.tokenizer
    limit = prompt_limit(pol.sft_model, cfg.max_new_tokens)
    bs = cfg.batch_size
    batches = [list(range(i, min(i + bs, len(prompts)))) for i in range(0, len(prompts), bs)]
    batches = batches[dist.rank()::dist.world_size()]  # this process's share
    mine = [i for rows in batches for i in rows]
    work = _Batches([encode_prompt(tok, p.messages, limit) for p in prompts], batches, mine,
                    {i: j for j, i in enumerate(mine)})
    results = {name: PolicyResult() for name in policies}
    n_kl = sum(1 for p in policies if p != REFERENCE_POLICY)
    total = len(batches) * (len(policies) + n_kl + (1 if rm is not None else 0) * len(policies))

    progress = stage_progress()
    progress.disable = not dist.is_main()  # the other processes of a multi-process run draw nothing
    with progress:
        task = progress.add_task("eval", total=total, info="")
        _generate_all(pol, policies, work, cfg, results, progress, task)
        _kl_all(pol, policies, work, results, progress, task)
        _score_all(policies, prompts, work, cfg, rm, judge, results, progress, task)
        progress.update(task, info="done")
    if dist.is_distributed():
        results = _gather_results(results, mine, len(prompts))
    return results


def _generate_all(pol: Policies, policies: list[str], work: _Batches, cfg, results: dict, progress, task) -> None:
    """2. generate, one policy at a time, same seed for each so sampling is comparable."""
    import torch

    from rlchat import dist
    from rlchat.generation import decode_responses

    tok = pol.tokenizer
    stop_ids = stop_token_ids(pol.sft_model, tok)
    gen = generation_config(cfg.max_new_tokens, cfg.temperature, cfg.top_p, stop_ids, tok.pad_token_id,
                            bos_id=tok.bos_token_id)
    for name in policies:
        progress.update(task, info=f"generating: {name}")
        torch.manual_seed(cfg.seed + 1_000_003 * dist.rank())
        with pol.use(name) as model:
            for rows in work.batches:
                resp, stops = generate(model, tok, [work.prompt_ids[i] for i in rows], gen, stop_ids)
                r = results[name]
                r.response_ids += resp
                r.eos += stops
                r.responses += [text.strip() for text in decode_responses(tok, resp, stop_ids)]
                progress.advance(task)


def _kl_all(pol: Policies, policies: list[str], work: _Batches, results: dict, progress, task) -> None:
    """3. KL to the reference (SFT) policy on each policy's own responses."""
    pad_id = pol.tokenizer.pad_token_id
    for name in policies:
        if name == REFERENCE_POLICY:
            results[name].kl = [0.0] * len(work.mine)
            continue
        progress.update(task, info=f"KL to {REFERENCE_POLICY}: {name}")
        r = results[name]
        for rows in work.batches:
            p_ids = [work.prompt_ids[i] for i in rows]
            y_ids = [r.response_ids[work.local[i]] for i in rows]
            with pol.use(name) as model:
                own = sequence_logprobs(model, p_ids, y_ids, pad_id)
            with pol.use(REFERENCE_POLICY) as model:
                ref = sequence_logprobs(model, p_ids, y_ids, pad_id)
            r.kl += [a - b for a, b in zip(own, ref)]
            progress.advance(task)


def _score_all(policies: list[str], prompts: list[Prompt], work: _Batches, cfg, rm, judge, results: dict,
               progress, task) -> None:
    """4. scores: the run's reward model (raw), the judge."""
    from rlchat.rewards import call_judge

    n = len(work.mine)
    for name in policies:
        r = results[name]
        if rm is not None:
            progress.update(task, info=f"reward model: {name}")
            for rows in work.batches:
                r.reward += rm([prompts[i].messages for i in rows], [r.responses[work.local[i]] for i in rows]).tolist()
                progress.advance(task)
        else:
            r.reward = [None] * n
        if judge is not None:
            progress.update(task, info=f"judge: {name}")
            r.judge = call_judge(judge, cfg.judge, [prompts[i].text for i in work.mine], r.responses)
        else:
            r.judge = [None] * n


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
    if kl is not None and c["a"] != REFERENCE_POLICY:
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
        "reference": REFERENCE_POLICY,
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
            if p[key] is not None and not (key == "kl_to_ref" and name == REFERENCE_POLICY):
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
                                     "kl": r.kl[i], "length": len(r.response_ids[i]), "eos": r.eos[i]}
        lines.append(json.dumps(row, ensure_ascii=False))
    atomic_write_text(stage_dir / "responses.jsonl", "\n".join(lines) + "\n")
    atomic_write_json(stage_dir / "report.json", report)
