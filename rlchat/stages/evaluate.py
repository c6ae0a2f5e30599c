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
  3. KL to the reference policy (the SFT policy, PPO's reference), always on SAMPLES, whatever decoding the win
     rates use: every other policy draws --kl-samples responses per prompt at the PPO stage's sampling temperature
     T (its manifest config; 1.0 without a PPO stage; top_p 1), and for each sample y
     k1 = sum_t [log pi_T(y_t | x, y_<t) - log pi_ref,T(y_t | x, y_<t)] (EOS included). Its mean estimates
     KL(pi_T || pi_ref,T) >= 0; the report gives it with a standard error over prompts (the prompt is the unit:
     samples of one prompt are averaged first). A negative mean is noise and is reported as such, never clipped;
     the k3 estimate (sum_t exp(-r_t) - 1 + r_t, r_t the token log-ratio; non-negative, also unbiased) is given
     next to it. The log-ratio of the evaluated (e.g. greedy) responses is kept as `log_ratio`: it is not a KL (on
     greedy answers it can be negative). KL is 0 for sft by definition.
     When more than half of two policies' greedy answers are identical, the report says so, and each policy's
     first KL sample (one per prompt; sft samples one at T too) is scored and compared: the sampled comparison.
  4. score: every response with the run's reward model (if the run has one; raw scores, not normalised) and with
     the --judge function (if given), both batched.
  5. metrics per policy (mean/std of scores, KL, length, EOS rate, distinct-1/2) and pairwise win rates with a
     95% Wilson score interval; write RUN/eval/responses.jsonl and report.json, then `rlchat.report.render`
     writes report.md and the PNG plots. All files are written atomically.

What it leaves out: multi-turn rollouts (a prompt with several turns is answered once), pairwise LLM judges (a
judge scores one response at a time), and win rates over
several responses per prompt (only the KL estimate samples several).

    rlchat eval --run-dir runs/demo --dataset .demo/data/eval_prompts.jsonl --judge rlchat.demo.task:judge
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

from rlchat.errors import ConfigError, RunDirError
from rlchat.models import with_load_settings
from rlchat.generation import (encode_prompt, generate, generation_config, prompt_limit, sequence_logprobs,
                               stop_token_ids, token_logprobs)
from rlchat.prompts import Prompt
from rlchat.stats import distinct_n, mean_std, win_rate

POLICY_ORDER = ("base", "sft", "ppo", "ppo-best")  # ppo-best: RUN/ppo/best, kept by ppo --eval-every
REFERENCE_POLICY = "sft"  # the policy KL is measured against (PPO's reference)
# (a, b) pairs compared, in this order, when both policies were evaluated: "a over b"
COMPARISONS = (("ppo", "sft"), ("ppo-best", "sft"), ("ppo", "base"), ("sft", "base"))


# -------------------------------------------------------------------------------------------------- policies


class Policies:
    """The models of a run's policies. `sft` and `ppo` share one model when the PPO policy is a LoRA adapter:
    the SFT-merged base with the adapter, which `use("sft")` switches off. `base` is its own model."""

    def __init__(self, sft_model, tokenizer, ppo_model=None, ppo_shared: bool = False, base_model=None,
                 best_model=None):
        self.sft_model = sft_model
        self.tokenizer = tokenizer
        self.ppo_model = ppo_model
        self.ppo_shared = ppo_shared
        self.base_model = base_model
        self.best_model = best_model  # None when ppo-best is a second adapter ("best") on the shared ppo_model

    @contextlib.contextmanager
    def use(self, name: str):
        if name == "base":
            yield self.base_model
        elif name == "ppo":
            yield self.ppo_model
        elif name == "ppo-best" and self.best_model is not None:
            yield self.best_model
        elif name == "ppo-best":
            self.ppo_model.set_adapter("best")
            try:
                yield self.ppo_model
            finally:
                self.ppo_model.set_adapter("default")
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
    log_ratio: list[float] = field(default_factory=list)  # log pi(y|x) - log pi_sft(y|x) of the response above
    reward: list[float | None] = field(default_factory=list)
    judge: list[float | None] = field(default_factory=list)
    kl_k1: list[list[float]] = field(default_factory=list)  # per prompt: k1 of each KL sample
    kl_k3: list[list[float]] = field(default_factory=list)  # per prompt: k3 of each KL sample
    # the first KL sample of each prompt and its scores (scored only for the sampled comparison)
    sample_response: list[str | None] = field(default_factory=list)
    sample_ids: list[list[int] | None] = field(default_factory=list)
    sample_reward: list[float | None] = field(default_factory=list)
    sample_judge: list[float | None] = field(default_factory=list)


def choose_policies(run, cfg) -> list[str]:
    """The policies to evaluate, in POLICY_ORDER; RunDirError when one asked for is not in the run."""
    ppo_rec = run.record("ppo")
    has_ppo = bool(ppo_rec and ppo_rec.get("status") == "done")
    has_best = has_ppo and bool((ppo_rec.get("outputs") or {}).get("best"))
    if cfg.policies:
        wanted = set(cfg.policies)
        if "ppo-best" in wanted and not has_best:
            raise RunDirError(f"policy 'ppo-best' was asked for but the ppo stage in {run.path} kept no best policy "
                              "(it ran without --eval-every, or has not finished)",
                              f"rerun `rlchat ppo --run-dir {run.path} --eval-every 10 --overwrite`, or leave "
                              "ppo-best out of --policies")
        if "ppo" in wanted and not has_ppo:
            status = ppo_rec.get("status") if ppo_rec else "not run"
            raise RunDirError(f"policy 'ppo' was asked for but the ppo stage in {run.path} is {status}",
                              f"run `rlchat ppo --run-dir {run.path}` first, or leave ppo out of --policies")
        if cfg.include_base:
            wanted.add("base")
    else:
        wanted = ({"sft"} | ({"ppo"} if has_ppo else set()) | ({"ppo-best"} if has_best else set())
                  | ({"base"} if cfg.include_base else set()))
    return [p for p in POLICY_ORDER if p in wanted]


def kl_temperature(run) -> float:
    """The temperature PPO sampled at (its manifest config), at which the KL to the reference is estimated."""
    rec = run.record("ppo") or {}
    return float((rec.get("config") or {}).get("temperature") or 1.0)


def prompts_spec(cfg, run) -> str:
    """The eval prompts' dataset: --dataset, else the one the run's PPO stage trained on."""
    spec = cfg.dataset or ((run.record("ppo") or {}).get("config") or {}).get("dataset")
    if not spec:
        raise ConfigError("eval needs prompts", "pass --dataset (a file with a 'prompt', 'messages' or 'text' "
                          "column), or set `eval: {dataset: ...}` in the recipe")
    return spec


# ------------------------------------------------------------------------------------------------------ run


@with_load_settings  # every model it loads: cfg.dtype, cfg.attn_implementation
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
        kl_t = kl_temperature(run)
        results = evaluate_policies(pol, policies, prompts, cfg, rm, judge, kl_t)
        if not dist.is_main():  # the main process has everything gathered; it writes the report
            return {"rank": dist.rank()}
        # 5. per-policy metrics and win rates; responses.jsonl, report.json, report.md and the plots
        report = build_report(run, cfg, policies, prompts, results, dataset_spec, has_rm=rm is not None, kl_t=kl_t)
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
    _check_templates(run, cfg, sft_rec, prompts, dataset_spec)
    judge = None
    if cfg.judge:
        judge = load_judge(cfg.judge)
        call_judge(judge, cfg.judge, DUMMY_PROMPTS, DUMMY_COMPLETIONS, during="the check on two dummy prompts")
    console.print(f"[bold]eval[/] {len(prompts)} prompts from {dataset_spec}; policies: {', '.join(policies)}"
                  + (f"; judge {cfg.judge}" if cfg.judge else ""), highlight=False)
    return run, policies, prompts, dataset_spec, judge


def _check_templates(run, cfg, sft_rec: dict, prompts: list, spec: str) -> None:
    """Every prompt through the run's chat template now (a role it refuses is a DataError before the first write,
    not a failure halfway through generation)."""
    from rlchat import checks, models

    tok_dir = (sft_rec.get("outputs") or {}).get("tokenizer")
    if not tok_dir:
        return
    tokenizer = models.load_tokenizer(str(run.resolve_inside(tok_dir)), trust_remote_code=cfg.trust_remote_code)
    for i, p in enumerate(prompts):
        with checks.template_errors(f"prompt {i} of {spec}"):
            tokenizer.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=False)


def _load_models(run, cfg, policies: list[str]):
    """(Policies, the run's reward scorer or None), on the device."""
    from rlchat import models
    from rlchat.run_models import base_model_spec, load_ppo_policy, load_run_reward_scorer, load_sft_policy
    from rlchat.progress import quiet_libraries

    quiet_libraries()
    device = models.pick_device()
    sft_model, tokenizer = load_sft_policy(run.path, trust_remote_code=cfg.trust_remote_code, device=device)
    ppo_model, shared, best_model = None, False, None
    if "ppo" in policies or "ppo-best" in policies:
        ppo_model, shared = load_ppo_policy(run, sft_model, cfg.trust_remote_code)
        ppo_model.to(device)
    if "ppo-best" in policies:
        from rlchat.run_models import ppo_policy_dir

        if shared:  # a second adapter on the same model, switched on for ppo-best only
            ppo_model.load_adapter(str(ppo_policy_dir(run, run.record("ppo"), "best")), adapter_name="best")
            ppo_model.to(device)
        else:
            best_model, _ = load_ppo_policy(run, sft_model, cfg.trust_remote_code, "best")
            best_model.to(device)
    base_model = None
    if "base" in policies:
        base_model = models.load_causal_lm(base_model_spec(run), trust_remote_code=cfg.trust_remote_code,
                                           device=device)
        models.align_model_with_tokenizer(base_model, tokenizer)
        base_model.eval()
    rm = load_run_reward_scorer(run, cfg.batch_size, device, cfg.trust_remote_code)
    return Policies(sft_model, tokenizer, ppo_model, shared, base_model, best_model), rm


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


def evaluate_policies(pol: Policies, policies: list[str], prompts: list[Prompt], cfg, rm, judge,
                      kl_t: float = 1.0) -> dict:
    """Steps 2-4 for every policy: generate, KL to the reference (on samples at temperature kl_t), reward-model
    and judge scores; the sampled comparison when most greedy answers are identical.

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
    total = len(batches) * (len(policies) + n_kl * (1 + cfg.kl_samples) + (1 if rm is not None else 0)
                            * len(policies))

    progress = stage_progress()
    progress.disable = not dist.is_main()  # the other processes of a multi-process run draw nothing
    with progress:
        task = progress.add_task("eval", total=total, info="")
        _generate_all(pol, policies, work, cfg, results, progress, task)
        _log_ratio_all(pol, policies, work, results, progress, task)
        _kl_all(pol, policies, work, cfg, kl_t, results, progress, task)
        _score_all(policies, prompts, work, cfg, rm, judge, results, progress, task)
        if needs_sampled_comparison(policies, results, cfg):
            _sampled_comparison(pol, policies, prompts, work, cfg, kl_t, rm, judge, results, progress, task)
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


def _log_ratio_all(pol: Policies, policies: list[str], work: _Batches, results: dict, progress, task) -> None:
    """3a. log pi(y|x) - log pi_sft(y|x) of each evaluated response (temperature 1); not a KL estimate."""
    pad_id = pol.tokenizer.pad_token_id
    for name in policies:
        if name == REFERENCE_POLICY:
            results[name].log_ratio = [0.0] * len(work.mine)
            continue
        progress.update(task, info=f"log-ratio to {REFERENCE_POLICY}: {name}")
        r = results[name]
        for rows in work.batches:
            p_ids = [work.prompt_ids[i] for i in rows]
            y_ids = [r.response_ids[work.local[i]] for i in rows]
            with pol.use(name) as model:
                own = sequence_logprobs(model, p_ids, y_ids, pad_id)
            with pol.use(REFERENCE_POLICY) as model:
                ref = sequence_logprobs(model, p_ids, y_ids, pad_id)
            r.log_ratio += [a - b for a, b in zip(own, ref)]
            progress.advance(task)


def _sample_config(pol: Policies, cfg, temperature: float):
    tok = pol.tokenizer
    stop_ids = stop_token_ids(pol.sft_model, tok)
    return generation_config(cfg.max_new_tokens, temperature, 1.0, stop_ids, tok.pad_token_id,
                             bos_id=tok.bos_token_id), stop_ids


def _kl_all(pol: Policies, policies: list[str], work: _Batches, cfg, T: float, results: dict, progress,
            task) -> None:
    """3b. KL to the reference on --kl-samples samples per prompt from each policy, at the PPO temperature.
    Keeps each prompt's first sample (text and ids) for the sampled comparison."""
    import math

    import torch

    from rlchat import dist
    from rlchat.generation import decode_responses

    tok = pol.tokenizer
    gen, stop_ids = _sample_config(pol, cfg, T)
    n = len(work.mine)
    for name in policies:
        r = results[name]
        r.sample_response, r.sample_ids = [None] * n, [None] * n
        r.sample_reward, r.sample_judge = [None] * n, [None] * n
        if name == REFERENCE_POLICY:
            r.kl_k1, r.kl_k3 = [[0.0] for _ in range(n)], [[0.0] for _ in range(n)]
            continue
        r.kl_k1, r.kl_k3 = [[] for _ in range(n)], [[] for _ in range(n)]
        progress.update(task, info=f"KL to {REFERENCE_POLICY} on samples (T={T:g}): {name}")
        torch.manual_seed(cfg.seed + 7 + 1_000_003 * dist.rank())  # the same draws for every policy
        for rows in work.batches:
            p_ids = [work.prompt_ids[i] for i in rows]
            for k in range(cfg.kl_samples):
                with pol.use(name) as model:
                    resp, _ = generate(model, tok, p_ids, gen, stop_ids)
                    own = token_logprobs(model, p_ids, resp, tok.pad_token_id, T)
                with pol.use(REFERENCE_POLICY) as model:
                    ref = token_logprobs(model, p_ids, resp, tok.pad_token_id, T)
                texts = decode_responses(tok, resp, stop_ids)
                for i, ids, text, a, b in zip(rows, resp, texts, own, ref):
                    j = work.local[i]
                    log_r = [x - y for x, y in zip(a, b)]  # log pi_T - log pi_ref,T per token
                    r.kl_k1[j].append(sum(log_r))
                    r.kl_k3[j].append(sum(math.expm1(-x) + x for x in log_r))
                    if k == 0:
                        r.sample_response[j], r.sample_ids[j] = text.strip(), ids
                progress.advance(task)


def identical_fraction(a: list[str], b: list[str]) -> float | None:
    """Fraction of prompts where two policies gave exactly the same response text."""
    return sum(x == y for x, y in zip(a, b)) / len(a) if a else None


SAME_ANSWERS = 0.5  # above this fraction of identical greedy answers, a sampled comparison is added


def needs_sampled_comparison(policies: list[str], results: dict, cfg) -> bool:
    """True under greedy decoding when, for some compared pair, more than SAME_ANSWERS of the answers are
    identical (counted over all processes, so that every process decides the same)."""
    if cfg.temperature > 0:
        return False
    import torch

    from rlchat import dist

    counts = []
    for a, b in COMPARISONS:
        if a in policies and b in policies:
            ra, rb = results[a].responses, results[b].responses
            counts += [sum(x == y for x, y in zip(ra, rb)), len(ra)]
    if not counts:
        return False
    counts = dist.all_sum(torch.tensor(counts, dtype=torch.float64)).tolist()
    return any(same > SAME_ANSWERS * n for same, n in zip(counts[::2], counts[1::2]) if n)


def _sampled_comparison(pol: Policies, policies: list[str], prompts: list[Prompt], work: _Batches, cfg,
                        T: float, rm, judge, results: dict, progress, task) -> None:
    """One sample per prompt and policy at temperature T (the first KL sample; sft draws its own), scored by the
    reward model and the judge."""
    import torch

    from rlchat import dist
    from rlchat.generation import decode_responses
    from rlchat.rewards import call_judge

    tok = pol.tokenizer
    gen, stop_ids = _sample_config(pol, cfg, T)
    ref = results[REFERENCE_POLICY]
    progress.update(task, info=f"sampled comparison: {REFERENCE_POLICY}")
    torch.manual_seed(cfg.seed + 7 + 1_000_003 * dist.rank())
    with pol.use(REFERENCE_POLICY) as model:
        for rows in work.batches:
            resp, _ = generate(model, tok, [work.prompt_ids[i] for i in rows], gen, stop_ids)
            for i, ids, text in zip(rows, resp, decode_responses(tok, resp, stop_ids)):
                ref.sample_response[work.local[i]], ref.sample_ids[work.local[i]] = text.strip(), ids
    for name in policies:
        r = results[name]
        progress.update(task, info=f"sampled comparison: scoring {name}")
        if rm is not None:
            r.sample_reward = []
            for rows in work.batches:
                r.sample_reward += rm([prompts[i].messages for i in rows],
                                      [r.sample_response[work.local[i]] for i in rows]).tolist()
        if judge is not None:
            r.sample_judge = call_judge(judge, cfg.judge, [prompts[i].text for i in work.mine], r.sample_response)


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


def comparisons(policies: list[str], results: dict, kl_t: float = 1.0) -> list[dict]:
    """Win rates of each compared pair on the evaluated responses; `identical` = the fraction of prompts where
    both answered the same text; `sampled` = win rates on one sample per prompt at temperature kl_t, when the
    sampled comparison ran (most greedy answers identical), else None."""
    out = []
    for a, b in COMPARISONS:
        if a not in policies or b not in policies:
            continue
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
    if c["a"] != REFERENCE_POLICY and policies[c["a"]]["kl_to_ref"] is not None:
        text += "; " + kl_text(policies[c["a"]])
    text += f" ({c['n']} prompts)"
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
                 has_rm: bool, kl_t: float = 1.0) -> dict:
    per_policy = {name: policy_metrics(results[name]) for name in policies}
    comps = comparisons(policies, results, kl_t)
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
        "kl": f"k1: sum_t log pi_T(y_t|x,y<t) - log pi_sft,T(y_t|x,y<t) on {cfg.kl_samples} samples per prompt "
              f"drawn from the policy at the PPO sampling temperature T={kl_t:g} (top_p 1), averaged per prompt, "
              f"then over prompts; ± is the standard error over prompts; k3 (sum_t exp(-r_t) - 1 + r_t, "
              f"non-negative) alongside; independent of the decoding above",
        "kl_temperature": kl_t,
        "kl_samples_per_prompt": cfg.kl_samples,
        "kl_estimator": "k1 (k3 alongside)",
        "log_ratio": "mean over prompts of log pi(y|x) - log pi_sft(y|x) on the evaluated responses at temperature "
                     "1; not a KL (negative when the answers are likelier under sft)",
        "identical": f"fraction of prompts with the same answer text; above {SAME_ANSWERS:g} under greedy decoding "
                     f"a sampled comparison (one sample per prompt at T={kl_t:g}, top_p 1) is added",
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
        m["identical"] = c["identical"]
        if c["sampled"]:
            m["sampled_win_rate_judge"] = c["sampled"]["win_rate_judge"]
            m["sampled_win_rate_reward"] = c["sampled"]["win_rate_reward"]
    for name, p in report["policies"].items():
        for key in ("mean_reward", "mean_judge", "kl_to_ref", "kl_to_ref_se", "mean_length"):
            if p[key] is not None and not (key.startswith("kl_to_ref") and name == REFERENCE_POLICY):
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
