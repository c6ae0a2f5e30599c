"""`rlchat eval`: generate with every policy of a run on held-out prompts, score, compare, write the report.

What it does, in order:
  1. validate: the run has a trained policy (a finished `sft` stage; every finished policy stage, ppo, grpo, rloo,
     dpo, is compared with it: rlchat/eval_policies.py finds them) or, in a run
     with no `sft` stage, a starting model (the --model that the finished ppo, else train-reward, stage started
     from, recorded in its outputs): it is evaluated as `base`, the reference for KL, and ppo is compared against
     it. The eval stage may start (a finished one needs --overwrite), the prompts load and are not empty, the judge imports and
     returns one finite number per response (called once on two prompts), the models and the reward model load.
     Nothing is written to the run directory before all of this passed.
  2. generate: every policy answers every prompt with the same decoding settings (greedy by default; sampling when
     --temperature > 0, with --top-p), batched with left padding. The SFT policy and every LoRA policy trained on it
     share one model in memory: the SFT-merged base with each stage's adapter loaded by name (one switched on at
     a time), all switched off for SFT. `--include-base` loads
     the base checkpoint a second time (the first copy has the SFT adapter merged into its weights).
  3. KL to the reference policy (PPO's reference: the SFT policy, or `base` in a run without SFT), always on SAMPLES, whatever decoding the win
     rates use: every other policy draws --kl-samples responses per prompt at the PPO stage's sampling temperature
     T (its manifest config; 1.0 without a PPO stage; top_p 1), and for each sample y
     k1 = sum_t [log pi_T(y_t | x, y_<t) - log pi_ref,T(y_t | x, y_<t)] (EOS included). Its mean estimates
     KL(pi_T || pi_ref,T) >= 0; the report gives it with a standard error over prompts (the prompt is the unit:
     samples of one prompt are averaged first). A negative mean is noise and is reported as such, never clipped;
     the k3 estimate (sum_t exp(-r_t) - 1 + r_t, r_t the token log-ratio; non-negative, also unbiased) is given
     next to it. The log-ratio of the evaluated (e.g. greedy) responses is kept as `log_ratio`: it is not a KL (on
     greedy answers it can be negative). KL is 0 for the reference by definition.
     When more than half of two policies' greedy answers are identical, the report says so, and each policy's
     first KL sample (one per prompt; sft samples one at T too) is scored and compared: the sampled comparison.
  4. score: every response with the run's reward model (if the run has one; raw scores, not normalised) and with
     the --judge function (if given), both batched.
  5. metrics per policy (mean/std of scores, KL, length, EOS rate, distinct-1/2) and win rates with a 95% Wilson
     score interval, of every policy against the reference (and base), and with --pairwise of the trained
     policies against each other (rlchat/eval_report.py); write RUN/eval/responses.jsonl and report.json, then `rlchat.report.render`
     writes report.md and the PNG plots. All files are written atomically.

What it leaves out: multi-turn rollouts (a prompt with several turns is answered once), pairwise LLM judges (a
judge scores one response at a time), and win rates over
several responses per prompt (only the KL estimate samples several).

    rlchat eval --run-dir runs/demo --dataset .demo/data/eval_prompts.jsonl --judge rlchat.demo.task:judge
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from rlchat.errors import ConfigError, RunDirError
from rlchat.eval_policies import (POLICY_STAGES, SAMPLING_STAGES, Policies, choose_policies, kl_temperature,
                                  load_policies)
from rlchat.eval_report import (REFERENCE_POLICY, PolicyResult, build_report, gather_results, headline_metrics,
                                needs_sampled_comparison, write_outputs)
from rlchat.models import with_load_settings
from rlchat.generation import (encode_prompt, generate, generation_config, prompt_limit, sequence_logprobs,
                               stop_token_ids, token_logprobs)
from rlchat.prompts import Prompt

# -------------------------------------------------------------------------------------------------- validate


def prompts_spec(cfg, run) -> str:
    """The eval prompts' dataset: --dataset, else the one the run's PPO (else GRPO, RLOO) stage trained on."""
    trained_on = [((run.record(stage) or {}).get("config") or {}).get("dataset") for stage in SAMPLING_STAGES]
    spec = cfg.dataset or next((s for s in trained_on if s), None)
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
    run, policies, prompts, dataset_spec, judge, start_spec = _validate(cfg)
    pol, rm = _load_models(run, cfg, policies, start_spec)
    parent = next((p for p in POLICY_STAGES if p in policies), None) or (None if start_spec else "sft")
    inputs = {"dataset": input_record(dataset_spec)}
    if start_spec:  # lineage of a run without SFT: the starting model `base` (hashed by the stage that used it)
        inputs["base"] = input_record(start_spec, hash=False)
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
        report = build_report(run, cfg, policies, prompts, results, dataset_spec, has_rm=rm is not None, kl_t=kl_t,
                              reference=pol.reference)
        write_outputs(stage_dir, prompts, policies, results, report)
        _write_report_files(run, stage_dir, report)
        metrics = headline_metrics(report)
        metrics["wall_s"] = round(time.time() - t_start, 1)
        outputs = {"report": "eval/report.json", "responses": "eval/responses.jsonl", "report_md": "eval/report.md",
                   "plots": report["files"]["plots"]}
        run.finish_stage("eval", metrics=metrics, outputs=outputs)
    return {**report, "summary": f"{report['summary']}; report at {stage_dir / 'report.md'}"}


def _validate(cfg) -> tuple:
    """Step 1: (run, policies, prompts, dataset spec, judge or None, the starting model's spec in a run without
    SFT or None), reading only."""
    from rlchat.one_turn import mismatch_warning
    from rlchat.progress import console
    from rlchat.prompts import load_prompts
    from rlchat.rewards import DUMMY_COMPLETIONS, DUMMY_PROMPTS, call_judge, load_judge
    from rlchat.rundir import RunDir
    from rlchat.run_models import starting_model

    run = RunDir(cfg.run_dir)
    if not run.exists():
        raise RunDirError(f"no run at {run.path} (no run.json), so there is no trained policy to evaluate",
                          "pass the --run-dir you trained in (rlchat sft --run-dir ...)")
    run.check_can_start("eval", cfg.overwrite)
    sft_rec = run.record("sft")
    # a run with no sft stage at all: the --model that ppo / train-reward started from is the policy `base`
    start_spec = None if sft_rec else starting_model(run)
    if start_spec is None:
        if not sft_rec or sft_rec.get("status") != "done":
            status = sft_rec.get("status") if sft_rec else "not run"
            raise RunDirError(f"{run.path} has no trained policy: stage 'sft' is {status} and no ppo or "
                              "train-reward stage finished from a --model",
                              f"train one first: rlchat sft --run-dir {run.path} --model ... --dataset ..., or "
                              f"rlchat ppo --run-dir {run.path} --model ... --dataset ...")
        run.require_done("sft", f"rerun `rlchat sft --run-dir {run.path} --overwrite`")
    reference = "base" if start_spec else REFERENCE_POLICY
    policies = choose_policies(run, cfg, reference)
    for stage in POLICY_STAGES:  # a policy stage that has not finished has no policy to compare
        rec = run.record(stage)
        if rec and stage not in policies and not cfg.policies:
            console.print(f"[yellow]eval: the {stage} stage is {rec.get('status')}, so its policy is left out[/]",
                          highlight=False)
    mismatch = mismatch_warning(run, "eval")
    if mismatch:  # a policy or reward model trained on raw text (rlchat/one_turn.py)
        console.print(f"[yellow]{mismatch}[/]", highlight=False)
    dataset_spec = prompts_spec(cfg, run)
    prompts, _, _ = load_prompts(dataset_spec, cfg.split, cfg.dataset_config, limit=cfg.max_prompts)
    _check_templates(run, cfg, sft_rec, prompts, dataset_spec, start_spec)
    judge = None
    if cfg.judge:
        judge = load_judge(cfg.judge)
        call_judge(judge, cfg.judge, DUMMY_PROMPTS, DUMMY_COMPLETIONS, during="the check on two dummy prompts")
    console.print(f"[bold]eval[/] {len(prompts)} prompts from {dataset_spec}; policies: {', '.join(policies)}"
                  + (f"; judge {cfg.judge}" if cfg.judge else ""), highlight=False)
    return run, policies, prompts, dataset_spec, judge, start_spec


def _check_templates(run, cfg, sft_rec: dict | None, prompts: list, spec: str, start_spec: str | None) -> None:
    """Every prompt through the run's chat template now (a role it refuses is a DataError before the first write,
    not a failure halfway through generation)."""
    from rlchat import checks, models

    if start_spec:
        tok_spec = start_spec
    else:
        tok_dir = (sft_rec.get("outputs") or {}).get("tokenizer")
        if not tok_dir:
            return
        tok_spec = str(run.resolve_inside(tok_dir))
    tokenizer = models.load_tokenizer(tok_spec, trust_remote_code=cfg.trust_remote_code)
    for i, p in enumerate(prompts):
        with checks.template_errors(f"prompt {i} of {spec}"):
            tokenizer.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=False)


def _load_models(run, cfg, policies: list[str], start_spec: str | None = None):
    """(Policies, the run's reward scorer or None), on the device (rlchat/eval_policies.py)."""
    from rlchat import models
    from rlchat.progress import quiet_libraries
    from rlchat.run_models import load_run_reward_scorer

    quiet_libraries()
    pol = load_policies(run, cfg, policies, start_spec)
    rm = load_run_reward_scorer(run, cfg.batch_size, models.pick_device(), cfg.trust_remote_code)
    return pol, rm


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
    limit = prompt_limit(pol.ref_model, cfg.max_new_tokens)
    bs = cfg.batch_size
    batches = [list(range(i, min(i + bs, len(prompts)))) for i in range(0, len(prompts), bs)]
    batches = batches[dist.rank()::dist.world_size()]  # this process's share
    mine = [i for rows in batches for i in rows]
    work = _Batches([encode_prompt(tok, p.messages, limit) for p in prompts], batches, mine,
                    {i: j for j, i in enumerate(mine)})
    results = {name: PolicyResult() for name in policies}
    n_kl = sum(1 for p in policies if p != pol.reference)
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
        if needs_sampled_comparison(policies, results, cfg, pol.reference):
            _sampled_comparison(pol, policies, prompts, work, cfg, kl_t, rm, judge, results, progress, task)
        progress.update(task, info="done")
    if dist.is_distributed():
        results = gather_results(results, mine, len(prompts))
    return results


def _generate_all(pol: Policies, policies: list[str], work: _Batches, cfg, results: dict, progress, task) -> None:
    """2. generate, one policy at a time, same seed for each so sampling is comparable."""
    import torch

    from rlchat import dist
    from rlchat.generation import decode_responses

    tok = pol.tokenizer
    stop_ids = stop_token_ids(pol.ref_model, tok)
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
    """3a. log pi(y|x) - log pi_ref(y|x) of each evaluated response (temperature 1; ref: sft, or base in a run
    without SFT); not a KL estimate."""
    pad_id = pol.tokenizer.pad_token_id
    for name in policies:
        if name == pol.reference:
            results[name].log_ratio = [0.0] * len(work.mine)
            continue
        progress.update(task, info=f"log-ratio to {pol.reference}: {name}")
        r = results[name]
        for rows in work.batches:
            p_ids = [work.prompt_ids[i] for i in rows]
            y_ids = [r.response_ids[work.local[i]] for i in rows]
            with pol.use(name) as model:
                own = sequence_logprobs(model, p_ids, y_ids, pad_id)
            with pol.use(pol.reference) as model:
                ref = sequence_logprobs(model, p_ids, y_ids, pad_id)
            r.log_ratio += [a - b for a, b in zip(own, ref)]
            progress.advance(task)


def _sample_config(pol: Policies, cfg, temperature: float):
    tok = pol.tokenizer
    stop_ids = stop_token_ids(pol.ref_model, tok)
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
        if name == pol.reference:
            r.kl_k1, r.kl_k3 = [[0.0] for _ in range(n)], [[0.0] for _ in range(n)]
            continue
        r.kl_k1, r.kl_k3 = [[] for _ in range(n)], [[] for _ in range(n)]
        progress.update(task, info=f"KL to {pol.reference} on samples (T={T:g}): {name}")
        torch.manual_seed(cfg.seed + 7 + 1_000_003 * dist.rank())  # the same draws for every policy
        for rows in work.batches:
            p_ids = [work.prompt_ids[i] for i in rows]
            for k in range(cfg.kl_samples):
                with pol.use(name) as model:
                    resp, _ = generate(model, tok, p_ids, gen, stop_ids)
                    own = token_logprobs(model, p_ids, resp, tok.pad_token_id, T)
                with pol.use(pol.reference) as model:
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
    ref = results[pol.reference]
    progress.update(task, info=f"sampled comparison: {pol.reference}")
    torch.manual_seed(cfg.seed + 7 + 1_000_003 * dist.rank())
    with pol.use(pol.reference) as model:
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
