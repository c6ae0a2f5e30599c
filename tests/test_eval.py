"""`rlchat eval`, the report and plots, `export` and `chat`, on a tiny run built once for the module.

The run: a tiny random-init Llama, a short SFT (LoRA) and reward-model stage through the CLI, and a stand-in PPO
stage: a LoRA adapter with random non-zero B weights on the SFT-merged model, saved where the PPO stage saves its
policy (RUN/ppo/policy) with a manifest entry and a synthetic metrics.jsonl. The checks recompute what the report
claims (a win rate and its Wilson interval from responses.jsonl; a KL from our own unbatched forward passes with
separately loaded models) instead of trusting the code under test.
"""
from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rlchat.cli import app
from tests.conftest import snapshot

runner = CliRunner()
N_PROMPTS = 10
MAX_NEW = 20
JUDGE = "rlchat.demo.task:judge"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------- pure functions


def test_wilson_interval_matches_known_values():
    from rlchat.stats import wilson_interval

    lo, hi = wilson_interval(0.8, 10)          # 8 of 10: the textbook Wilson interval is [0.490, 0.943]
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    lo, hi = wilson_interval(0.5, 16)          # symmetric around 0.5; half width z*sqrt(.25/16+z²/4n²)/(1+z²/n)
    assert lo == pytest.approx(0.2800, abs=1e-4) and hi == pytest.approx(0.7200, abs=1e-4)
    lo, hi = wilson_interval(1.0, 5)           # all wins: upper bound 1, lower bound n/(n+z²) = 0.5655
    assert hi == 1.0 and lo == pytest.approx(5 / (5 + 1.959964 ** 2), abs=1e-4)


def test_win_rate_counts_ties_as_half():
    from rlchat.stats import win_rate

    w = win_rate([1.0, 0.5, 0.2, 0.7], [0.0, 0.5, 0.9, 0.1])   # win, tie, loss, win -> (2 + 0.5) / 4
    assert w["win_rate"] == 0.625 and (w["wins"], w["ties"], w["losses"], w["n"]) == (2, 1, 1, 4)
    assert w["ci"][0] < 0.625 < w["ci"][1]


def test_distinct_n_by_hand():
    from rlchat.stats import distinct_n

    texts = ["the cat sat", "the cat ran"]   # unigrams: 6 total, {the, cat, sat, ran} = 4; bigrams: 4 total, 3 unique
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert distinct_n(["", "one"], 2) == 0.0


# Words are whitespace-separated tokens, case and punctuation kept; n-grams never span two texts.
DISTINCT_TEXTS = ["The cat sat.", "the  cat\nsat", "cat", "the cat sat"]


def test_distinct_n_counts_whitespace_words_within_each_text():
    from rlchat.stats import distinct_n

    # unigrams: The cat sat. | the cat sat | cat | the cat sat -> 10 in all; unique: The, cat, sat., the, sat = 5
    # (lower-casing or stripping punctuation would give 4; splitting on " " only would see "cat\nsat" as one word)
    assert distinct_n(DISTINCT_TEXTS, 1) == pytest.approx(5 / 10, abs=1e-12)
    # bigrams: (The cat) (cat sat.) | (the cat) (cat sat) | - | (the cat) (cat sat) -> 6, 4 unique
    # (bigrams across texts, e.g. (sat. the), would add 3 more; a mean of per-text ratios would give 1)
    assert distinct_n(DISTINCT_TEXTS, 2) == pytest.approx(4 / 6, abs=1e-12)
    # trigrams: (The cat sat.) | (the cat sat) | - | (the cat sat) -> 3, 2 unique; no text has 4 words
    assert distinct_n(DISTINCT_TEXTS, 3) == pytest.approx(2 / 3, abs=1e-12)
    assert distinct_n(DISTINCT_TEXTS, 4) == 0.0


def test_policy_metrics_by_hand():
    from rlchat.eval_report import PolicyResult, policy_metrics

    r = PolicyResult(responses=list(DISTINCT_TEXTS), response_ids=[[5, 6, 2], [5, 6], [7], [5, 6, 7, 2]],
                     eos=[True, False, False, True], log_ratio=[0.5, 0.0, 1.0, -2.5], reward=[1.0, 2.0, 3.0, 4.0],
                     judge=[None] * 4, kl_k1=[[0.5, 1.5], [0.0, 0.0], [1.0, 3.0], [2.5, 0.5]],
                     kl_k3=[[0.1], [0.2], [0.3], [0.4]])
    m = policy_metrics(r)
    assert m["n"] == 4
    assert m["distinct_1"] == pytest.approx(5 / 10, abs=1e-12)  # the texts above
    assert m["distinct_2"] == pytest.approx(4 / 6, abs=1e-12)
    assert m["mean_length"] == pytest.approx((3 + 2 + 1 + 4) / 4)  # tokens, the stop token included
    assert m["eos_rate"] == pytest.approx(2 / 4)
    # KL: prompt means 1.0, 0.0, 2.0, 1.5 -> mean 1.125; SE = sample std of the prompt means / sqrt(4)
    assert m["kl_to_ref"] == pytest.approx(1.125)
    sd = math.sqrt(sum((x - 1.125) ** 2 for x in (1.0, 0.0, 2.0, 1.5)) / 3)
    assert m["kl_to_ref_se"] == pytest.approx(sd / 2)
    assert m["kl_to_ref_k3"] == pytest.approx(0.25) and m["kl_samples"] == 8
    assert m["mean_log_ratio"] == pytest.approx(-1.0 / 4)   # the evaluated responses' log-ratio is not the KL
    # rewards 1..4: mean 2.5, sample std sqrt((2.25 + 0.25 + 0.25 + 2.25) / 3) = sqrt(5 / 3)
    assert m["mean_reward"] == pytest.approx(2.5) and m["std_reward"] == pytest.approx(math.sqrt(5 / 3))
    assert m["mean_judge"] is None and m["std_judge"] is None  # no judge


def test_kl_text_never_shows_a_negative_kl():
    from rlchat.eval_report import kl_text

    assert kl_text({"kl_to_ref": 0.213, "kl_to_ref_se": 0.04}) == "KL 0.21 ± 0.04 nats"
    noise = kl_text({"kl_to_ref": -0.05, "kl_to_ref_se": 0.04})
    assert noise.startswith("KL ~0 nats") and "within noise" in noise and "-0.05 ± 0.04" in noise
    assert "beyond 2 standard errors" in kl_text({"kl_to_ref": -0.5, "kl_to_ref_se": 0.04})


def test_token_logprobs_at_a_temperature_match_one_forward_pass():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from rlchat.generation import token_logprobs

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2, n_positions=64)).eval()
    prompts, responses = [[1, 2, 3], [4]], [[11, 12], [13, 14, 15]]
    got = token_logprobs(model, prompts, responses, pad_id=0, temperature=0.5)
    for p, r, g in zip(prompts, responses, got):
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([p + r])).logits[0] / 0.5, dim=-1)
        assert g == pytest.approx([logp[len(p) - 1 + t, tok].item() for t, tok in enumerate(r)], abs=1e-4)


def test_batched_logprobs_and_generation_match_unpadded_with_absolute_positions():
    """GPT-2 has absolute position embeddings, so left padding shifts positions unless position_ids count real
    tokens only (RoPE models hide such a bug: a constant shift leaves q.k unchanged)."""
    from types import SimpleNamespace

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GenerationConfig

    from rlchat.generation import generate, sequence_logprobs

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2, n_positions=64)).eval()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    responses = [[11, 12], [13], [14, 15, 16, 17]]
    batched = sequence_logprobs(model, prompts, responses, pad_id=0)
    for p, r, got in zip(prompts, responses, batched):
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([p + r])).logits[0], dim=-1)
        want = sum(logp[len(p) - 1 + t, tok].item() for t, tok in enumerate(r))
        assert got == pytest.approx(want, abs=1e-4)
    gen = GenerationConfig(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=[49])
    got, _ = generate(model, SimpleNamespace(pad_token_id=0), prompts, gen, [49])
    for p, resp in zip(prompts, got):
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([p]), generation_config=gen)
        assert resp == out[0, len(p):].tolist()[:len(resp)]


def test_judge_loader_errors_are_one_line_config_errors(tmp_path):
    from rlchat.errors import ConfigError
    from rlchat.rewards import call_judge, load_judge

    with pytest.raises(ConfigError, match="judge module 'no_such_module_xyz'"):
        load_judge("no_such_module_xyz:judge")
    with pytest.raises(ConfigError, match="has no function 'nope'"):
        load_judge("rlchat.demo.task:nope")
    with pytest.raises(ConfigError, match="must look like"):
        load_judge("rlchat.demo.task")
    bad = tmp_path / "bad_judge.py"
    bad.write_text("def judge(prompts, completions):\n    return [0.0]\n")
    fn = load_judge(f"{bad}:judge")
    with pytest.raises(ConfigError, match="returned 1 values for 2 completions") as err:
        call_judge(fn, f"{bad}:judge", ["a", "b"], ["x", "y"])
    assert "--reward-fn" not in str(err.value) and "\n" not in str(err.value)
    nan = tmp_path / "nan_judge.py"
    nan.write_text("def judge(prompts, completions):\n    return [float('nan')] * len(completions)\n")
    with pytest.raises(ConfigError, match="non-finite"):
        call_judge(load_judge(f"{nan}:judge"), "nan", ["a"], ["x"])


# --------------------------------------------------------------------- report.render on a synthetic run


def _fake_stage(run, stage, rows, parent=None, outputs=None):
    from rlchat.fileio import append_jsonl

    d = run.begin_stage(stage, config={}, inputs={}, parent=parent, overwrite=True)
    for row in rows:
        append_jsonl(d / "metrics.jsonl", row)
    run.finish_stage(stage, metrics={}, outputs=outputs or {"metrics": f"{stage}/metrics.jsonl"})
    return d


def test_render_on_its_own_skips_missing_stages(tmp_path):
    """No model needed: the plots and report.md come from metrics.jsonl files alone; missing stages are skipped."""
    from rlchat import report
    from rlchat.rundir import RunDir

    run = RunDir(tmp_path / "run")
    rng = random.Random(0)
    sft_rows = [{"step": s, "loss": 7 * math.exp(-s / 30) + rng.random() * 0.1} for s in range(1, 101, 5)]
    sft_rows += [{"step": s, "eval_loss": 7 * math.exp(-s / 30) + 0.2} for s in (0, 50, 100)]
    _fake_stage(run, "sft", sft_rows)
    out = report.render(run.path)
    assert set(out["plots"]) == {"sft_loss"}
    assert set(out["skipped"]) == {"reward_training", "ppo_training", "ppo_overoptimisation", "score_distribution",
                                   "win_rates"}
    png = Path(out["plots"]["sft_loss"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = Path(out["report_md"]).read_text()
    assert "![SFT loss](sft_loss.png)" in md and "| sft | done |" in md
    assert not list(png.parent.glob(".*tmp*"))  # atomic writes leave no tmp files behind

    ppo_rows = [{"step": s, "objective/scores": s / 10, "objective/kl": s / 20} for s in range(1, 11)]
    _fake_stage(run, "ppo", ppo_rows, parent="sft")
    out = report.render(run.path)
    assert "ppo_training" in out["plots"]   # a partial set of PPO keys still plots (the rest say "no ... logged")
    assert "--eval-every" in out["skipped"]["ppo_overoptimisation"]  # no held-out rows
    # with held-out rows (ppo --eval-every): the over-optimisation plot, proxy and judge against sqrt(KL)
    for r in ppo_rows[1::2]:
        r.update({"heldout/kl": r["step"] / 4, "heldout/score": r["step"] / 10,
                  "heldout/judge": 0.5 - (r["step"] - 4) ** 2 / 100})
    _fake_stage(run, "ppo", ppo_rows, parent="sft")
    out = report.render(run.path)
    assert Path(out["plots"]["ppo_overoptimisation"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ppo_overoptimisation.png" in Path(out["report_md"]).read_text()


# ------------------------------------------------------------------------------------------- the tiny run


def make_fake_ppo(run_path: Path, b_std: float = 0.3, overwrite: bool = False, temperature: float | None = None,
                  best: bool = False) -> None:
    """A stand-in for the PPO stage: a LoRA policy adapter with random B (std b_std; 0 = the SFT policy itself)
    on the SFT-merged model; `temperature` goes into the manifest's ppo config like the real stage's."""
    import torch
    from peft import LoraConfig, get_peft_model

    from rlchat import run_models
    from rlchat.rundir import RunDir
    from rlchat.fileio import append_jsonl, atomic_dir

    run = RunDir(run_path)
    model, _ = run_models.load_sft_policy(run.path)
    torch.manual_seed(1)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  lora_dropout=0.0))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, b_std) if b_std > 0 else p.zero_()
    config = {"fake": True} if temperature is None else {"fake": True, "temperature": temperature}
    d = run.begin_stage("ppo", config=config, inputs={}, parent="sft", overwrite=overwrite)
    with atomic_dir(d / "policy") as tmp:
        peft_model.save_pretrained(tmp)
    outputs = {}
    if best:  # RUN/ppo/best as ppo --eval-every keeps it: another adapter (other B weights)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
        with atomic_dir(d / "best") as tmp:
            peft_model.save_pretrained(tmp)
        outputs["best"] = "ppo/best"
    rng = random.Random(0)
    for s in range(1, 41):
        append_jsonl(d / "metrics.jsonl", {
            "step": s, "objective/scores": 0.3 + 0.5 * (1 - math.exp(-s / 15)) + rng.gauss(0, 0.05),
            "objective/rewards": 0.25 + 0.45 * (1 - math.exp(-s / 15)) + rng.gauss(0, 0.05),
            "objective/kl": 2 * (1 - math.exp(-s / 20)) + rng.gauss(0, 0.1),
            "response/length": 20 - 5 * (1 - math.exp(-s / 20)) + rng.gauss(0, 1),
            "loss/value": 0.5 * math.exp(-s / 10) + abs(rng.gauss(0, 0.02))})
    from rlchat.run_models import resolve_base

    run.finish_stage("ppo", metrics={"objective/scores": 0.8},   # the outputs the real PPO stage records
                     outputs={"kind": "lora", "policy": "ppo/policy", "metrics": "ppo/metrics.jsonl",
                              "base": "sft", "base_hash": resolve_base(run, None).hash, **outputs})


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model, demo_data):
    """RUN with sft (LoRA) + reward + stand-in ppo, before eval; and a copy with only sft."""
    base = tmp_path_factory.mktemp("eval")
    run = base / "run"
    res = invoke("sft", "--run-dir", run, "--model", tiny_model, "--dataset", demo_data["sft"], "--max-steps", 20,
                 "--batch-size", 16, "--lr", "3e-3", "--eval-fraction", "0.02", "--logging-steps", 5)
    assert res.exit_code == 0, res.output
    sft_only = base / "sft-only"
    shutil.copytree(run, sft_only)
    res = invoke("train-reward", "--run-dir", run, "--dataset", demo_data["pairs"], "--max-steps", 6,
                 "--batch-size", 8, "--eval-fraction", "0.02", "--logging-steps", 2)
    assert res.exit_code == 0, res.output
    make_fake_ppo(run)
    return {"run": run, "sft_only": sft_only, "prompts": demo_data["eval_prompts"]}


@pytest.fixture(scope="module")
def evaluated(trained_run):
    run = trained_run["run"]
    res = invoke("eval", "--run-dir", run, "--dataset", trained_run["prompts"], "--judge", JUDGE,
                 "--max-prompts", N_PROMPTS, "--max-new-tokens", MAX_NEW, "--batch-size", 4, "--include-base",
                 "--json")
    assert res.exit_code == 0, res.output
    printed = json.loads(res.stdout[res.stdout.index("{"):])
    return {**trained_run, "printed": printed, "report": json.loads((run / "eval" / "report.json").read_text()),
            "rows": read_jsonl(run / "eval" / "responses.jsonl")}


def own_distinct(texts: list[str], n: int) -> float:
    """Distinct-n recomputed here: unique / all whitespace-word n-grams, within each text."""
    grams = [tuple(words[i:i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


@pytest.mark.slow
def test_report_json_schema_and_values_from_responses(evaluated):
    rep, rows = evaluated["report"], evaluated["rows"]
    assert set(rep) >= {"policies", "comparisons", "settings", "summary"}
    assert list(rep["policies"]) == ["base", "sft", "ppo"]
    assert len(rows) == N_PROMPTS and rep["settings"]["n_prompts"] == N_PROMPTS
    assert rep["settings"]["decoding"] == "greedy" and rep["settings"]["max_new_tokens"] == MAX_NEW
    keys = {"mean_reward", "std_reward", "mean_judge", "std_judge", "kl_to_ref", "mean_length", "eos_rate",
            "distinct_1", "distinct_2", "n"}
    for name, m in rep["policies"].items():
        assert set(m) >= keys, name
        per = [r["policies"][name] for r in rows]
        assert m["n"] == N_PROMPTS
        assert m["mean_reward"] == pytest.approx(sum(p["reward"] for p in per) / N_PROMPTS)
        assert m["mean_judge"] == pytest.approx(sum(p["judge"] for p in per) / N_PROMPTS)
        assert m["std_judge"] == pytest.approx(
            math.sqrt(sum((p["judge"] - m["mean_judge"]) ** 2 for p in per) / (N_PROMPTS - 1)))
        kl = sum(sum(p["kl_k1"]) / len(p["kl_k1"]) for p in per) / N_PROMPTS   # prompt means, then their mean
        assert m["kl_to_ref"] == pytest.approx(kl)
        assert m["mean_log_ratio"] == pytest.approx(sum(p["log_ratio"] for p in per) / N_PROMPTS)
        if name != "sft":
            assert all(len(p["kl_k1"]) == 4 for p in per) and m["kl_samples"] == 4 * N_PROMPTS
            assert m["kl_to_ref_se"] > 0 and m["kl_to_ref_k3"] >= 0
        assert m["mean_length"] == pytest.approx(sum(p["length"] for p in per) / N_PROMPTS)
        assert m["eos_rate"] == pytest.approx(sum(p["eos"] for p in per) / N_PROMPTS)
        assert all(1 <= p["length"] <= MAX_NEW for p in per)
        assert all(p["length"] == MAX_NEW for p in per if not p["eos"])  # no EOS -> it ran to the limit
        texts = [p["response"] for p in per]
        assert m["distinct_1"] == pytest.approx(own_distinct(texts, 1), abs=1e-12), name
        assert m["distinct_2"] == pytest.approx(own_distinct(texts, 2), abs=1e-12), name
    assert rep["policies"]["sft"]["kl_to_ref"] == 0.0
    assert rep["policies"]["ppo"]["kl_to_ref"] != 0.0  # the adapter's B weights are non-zero
    assert rep["settings"]["kl_temperature"] == 1.0 and rep["settings"]["kl_samples_per_prompt"] == 4
    pairs = [(c["a"], c["b"]) for c in rep["comparisons"]]
    assert pairs == [("ppo", "sft"), ("ppo", "base"), ("sft", "base")]
    for c in rep["comparisons"]:
        assert set(c) >= {"a", "b", "win_rate_reward", "win_rate_judge", "ci_reward", "ci_judge", "n"}
    # --json printed the same report plus a summary line
    printed = evaluated["printed"]
    assert printed["policies"] == rep["policies"] and "ppo" in printed["summary"] and "KL" in printed["summary"]


@pytest.mark.slow
def test_win_rate_recomputed_from_responses(evaluated):
    rep, rows = evaluated["report"], evaluated["rows"]
    z = 1.959963984540054
    for key in ("judge", "reward"):
        a = [r["policies"]["ppo"][key] for r in rows]
        b = [r["policies"]["sft"][key] for r in rows]
        score = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b))
        n = len(rows)
        p = score / n
        center = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        c = rep["comparisons"][0]
        assert (c["a"], c["b"]) == ("ppo", "sft")
        assert c[f"win_rate_{key}"] == pytest.approx(p)
        assert c[f"ci_{key}"] == pytest.approx([max(0, center - half), min(1, center + half)])
    # the judge scores really are the demo judge's scores of the stored responses
    from rlchat.demo.task import judge

    texts = [r["policies"]["ppo"]["response"] for r in rows]
    assert judge([r["prompt"] for r in rows], texts) == pytest.approx([r["policies"]["ppo"]["judge"] for r in rows])


def _own_logprob_sum(model, prompt_ids: list[int], response_ids: list[int]) -> float:
    """Sum of log p(response | prompt) from one unpadded forward pass."""
    import torch

    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    P = len(prompt_ids)
    return sum(logp[P - 1 + t, tok].item() for t, tok in enumerate(response_ids))


def greedy_response(model, tok, messages: list[dict], max_new: int) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy response ids up to and including EOS) of one prompt, unbatched and unpadded: the
    reference the batched eval generation is checked against."""
    import torch

    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt_ids]), max_new_tokens=max_new, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    response = out[0, len(prompt_ids):].tolist()
    if tok.eos_token_id in response:
        response = response[:response.index(tok.eos_token_id) + 1]
    return prompt_ids, response


@pytest.mark.slow
def test_kl_and_greedy_responses_recomputed_with_own_forward_passes(evaluated):
    """Separately loaded models (PPO merged into the weights, SFT on its own), one prompt at a time, no padding:
    the greedy response must equal the batched one in responses.jsonl and the log-ratio sum its `log_ratio`."""
    from rlchat import run_models
    from rlchat.export import load_policy

    run, rows = evaluated["run"], evaluated["rows"]
    ppo, tok = load_policy(run, "ppo", merge=True)
    sft, _ = run_models.load_sft_policy(run)
    for row in rows[:3]:
        prompt_ids, response = greedy_response(ppo, tok, row["messages"], MAX_NEW)
        stored = row["policies"]["ppo"]
        assert tok.decode(response, skip_special_tokens=True).strip() == stored["response"]
        assert len(response) == stored["length"]
        kl = _own_logprob_sum(ppo, prompt_ids, response) - _own_logprob_sum(sft, prompt_ids, response)
        assert kl == pytest.approx(stored["log_ratio"], abs=2e-3, rel=1e-3)


@pytest.mark.slow
def test_eval_of_a_ppo_policy_equal_to_sft_reports_no_negative_kl_and_says_answers_are_identical(trained_run,
                                                                                                   tmp_path):
    """The issue-14 case: PPO's greedy answers equal SFT's. A zero-weight adapter makes PPO the SFT policy itself,
    so the KL is 0 (never negative), every greedy answer is identical, and the report says so and adds a sampled
    comparison at the PPO stage's temperature (0.8 in its manifest config)."""
    run = tmp_path / "run"
    shutil.copytree(trained_run["run"], run)
    make_fake_ppo(run, b_std=0.0, overwrite=True, temperature=0.8)
    res = invoke("eval", "--run-dir", run, "--dataset", trained_run["prompts"], "--judge", JUDGE,
                 "--max-prompts", 8, "--max-new-tokens", 12, "--batch-size", 4, "--kl-samples", 2, "--overwrite")
    assert res.exit_code == 0, res.output
    rep = json.loads((run / "eval" / "report.json").read_text())
    ppo = rep["policies"]["ppo"]
    assert ppo["kl_to_ref"] >= 0 and ppo["kl_to_ref"] == pytest.approx(0.0, abs=1e-6)
    assert ppo["kl_to_ref_k3"] >= 0 and ppo["kl_samples"] == 16
    assert rep["settings"]["kl_temperature"] == 0.8 and rep["settings"]["decoding"] == "greedy"
    c = rep["comparisons"][0]
    assert (c["a"], c["b"]) == ("ppo", "sft") and c["identical"] == 1.0 and c["win_rate_judge"] == 0.5
    sampled = c["sampled"]
    assert sampled is not None and sampled["temperature"] == 0.8 and sampled["n"] == 8
    assert sampled["win_rate_judge"] is not None and sampled["win_rate_reward"] is not None
    assert "100% of the answers are identical" in rep["summary"] and "sampled at T=0.8" in rep["summary"]
    assert "KL 0.00" in rep["summary"] and "-0." not in rep["summary"]
    md = (run / "eval" / "report.md").read_text()
    assert "are identical" in md and "Sampled comparison" in md and "PPO sampling temperature 0.8" in md
    rows = read_jsonl(run / "eval" / "responses.jsonl")
    assert all(r["policies"]["sft"]["sample"] is not None for r in rows)  # sft sampled for the comparison


@pytest.mark.slow
def test_eval_and_export_use_the_best_ppo_policy(trained_run, tmp_path):
    """ppo --eval-every keeps RUN/ppo/best: eval evaluates it as policy 'ppo-best' by default, and export/chat take
    --stage ppo-best; its greedy answers are those of the best adapter merged on its own (not the final one)."""
    import torch

    from rlchat.export import load_policy

    run = tmp_path / "run"
    shutil.copytree(trained_run["run"], run)
    make_fake_ppo(run, overwrite=True, best=True)
    res = invoke("eval", "--run-dir", run, "--dataset", trained_run["prompts"], "--max-prompts", 4,
                 "--max-new-tokens", 8, "--batch-size", 4, "--kl-samples", 1, "--overwrite")
    assert res.exit_code == 0, res.output
    rep = json.loads((run / "eval" / "report.json").read_text())
    assert list(rep["policies"]) == ["sft", "ppo", "ppo-best"]
    assert ("ppo-best", "sft") in [(c["a"], c["b"]) for c in rep["comparisons"]]
    rows = read_jsonl(run / "eval" / "responses.jsonl")
    best, tok = load_policy(run, "ppo-best", merge=True)
    final, _ = load_policy(run, "ppo", merge=True)
    row = rows[0]
    text = tok.apply_chat_template(row["messages"], add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    outs = {}
    for name, model in (("ppo-best", best), ("ppo", final)):
        with torch.no_grad():
            out = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
        outs[name] = tok.decode(out, skip_special_tokens=True).strip()
        assert outs[name] == row["policies"][name]["response"], name
    # a run without best/: a one-line error naming --eval-every
    res = invoke("export", trained_run["run"], tmp_path / "out", "--stage", "ppo-best")
    assert res.exit_code == 2 and "--eval-every" in res.output and "Traceback" not in res.output


@pytest.mark.slow
def test_plots_report_md_and_manifest(evaluated):
    run = evaluated["run"]
    d = run / "eval"
    for name in ("sft_loss", "reward_training", "ppo_training", "score_distribution"):
        data = (d / f"{name}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
    md = (d / "report.md").read_text()
    for needle in ("## Policies", "## Win rates", "ppo over sft", "![PPO training](ppo_training.png)",
                   "![Eval score distribution](score_distribution.png)", "## Sample responses"):
        assert needle in md, needle
    entry = json.loads((run / "run.json").read_text())["stages"]["eval"]
    assert entry["status"] == "done" and entry["parent"] == "ppo"
    c = evaluated["report"]["comparisons"][0]
    assert entry["metrics"]["win_rate"] == c["win_rate_judge"]
    assert entry["metrics"]["win_rate_reward"] == c["win_rate_reward"]
    assert entry["outputs"]["report"] == "eval/report.json"
    res = invoke("status", run)
    assert "eval" in res.output and "win_rate" in res.output


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.slow
def test_eval_refuses_rerun_without_overwrite(evaluated):
    run = evaluated["run"]
    before = snapshot(run)
    res = invoke("eval", "--run-dir", run, "--dataset", evaluated["prompts"], "--max-prompts", 2)
    assert res.exit_code == 2 and "overwrite" in res.output
    assert snapshot(run) == before


@pytest.mark.slow
@pytest.mark.parametrize("case", ["judge_import", "judge_length", "judge_missing_fn", "empty_prompts",
                                  "no_prompt_column", "ppo_not_in_run", "ppo_stale_base"])
def test_eval_bad_input_exits_2_and_writes_nothing(evaluated, tmp_path, case):
    run = evaluated["run"] if case != "ppo_not_in_run" else evaluated["sft_only"]
    if case == "ppo_stale_base":  # the SFT weights changed after PPO trained its adapter on them
        run = tmp_path / "stale"
        shutil.copytree(evaluated["run"], run)
        manifest = json.loads((run / "run.json").read_text())
        manifest["stages"]["ppo"]["outputs"]["base_hash"] = "sha256:" + "0" * 64
        (run / "run.json").write_text(json.dumps(manifest))
    args = ["eval", "--run-dir", run, "--dataset", evaluated["prompts"], "--max-prompts", 2, "--overwrite"]
    if case == "judge_import":
        args += ["--judge", "no_such_module_xyz:judge"]
    elif case == "judge_missing_fn":
        args += ["--judge", "rlchat.demo.task:no_such_fn"]
    elif case == "judge_length":
        bad = tmp_path / "short_judge.py"
        bad.write_text("def judge(prompts, completions):\n    return [1.0]\n")
        args += ["--judge", f"{bad}:judge"]
    elif case == "empty_prompts":
        empty = tmp_path / "empty.jsonl"
        empty.write_text("")
        args[4] = empty
    elif case == "no_prompt_column":
        other = tmp_path / "other.jsonl"
        other.write_text('{"question": "hi"}\n')
        args[4] = other
    elif case == "ppo_not_in_run":
        args += ["--policies", "sft,ppo"]
    before = snapshot(run)
    res = invoke(*args)
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and res.output.rstrip().endswith(errors[0]), res.output   # one line, last
    assert "Traceback" not in res.output
    assert snapshot(run) == before


def test_eval_on_a_run_without_a_trained_policy(tmp_path, demo_data):
    empty = tmp_path / "nothing"
    res = invoke("eval", "--run-dir", empty, "--dataset", demo_data["eval_prompts"])
    assert res.exit_code == 2 and "no trained policy" in res.output
    assert not empty.exists()
    # a run whose sft stage failed
    from rlchat.rundir import RunDir

    run = RunDir(tmp_path / "failed")
    run.begin_stage("sft", config={}, inputs={}, parent=None, overwrite=False)
    run.fail_stage("sft", "killed")
    before = snapshot(run.path)
    res = invoke("eval", "--run-dir", run.path, "--dataset", demo_data["eval_prompts"])
    assert res.exit_code == 2 and "no trained policy" in res.output and "failed" in res.output
    assert snapshot(run.path) == before


# ------------------------------------------------------------------------------------ other decoding, render


@pytest.mark.slow
def test_sampling_eval_on_an_sft_only_run(trained_run):
    """Without ppo and reward: sft alone, sampled; no comparisons, no reward scores; the report still renders."""
    run = trained_run["sft_only"]
    res = invoke("eval", "--run-dir", run, "--dataset", trained_run["prompts"], "--max-prompts", 3,
                 "--max-new-tokens", 8, "--temperature", "1.0", "--top-p", "0.9", "--json")
    assert res.exit_code == 0, res.output
    rep = json.loads((run / "eval" / "report.json").read_text())
    assert rep["settings"]["decoding"] == "sampling" and rep["settings"]["top_p"] == 0.9
    assert list(rep["policies"]) == ["sft"] and rep["comparisons"] == []
    assert rep["policies"]["sft"]["mean_reward"] is None and rep["policies"]["sft"]["mean_judge"] is None
    assert (run / "eval" / "sft_loss.png").exists() and not (run / "eval" / "ppo_training.png").exists()
    assert json.loads((run / "run.json").read_text())["stages"]["eval"]["parent"] == "sft"


@pytest.mark.slow
def test_eval_of_a_run_without_sft_compares_ppo_with_the_starting_model(tiny_model, demo_data, tmp_path):
    """train-reward and ppo started from --model (no sft stage): eval calls that model `base`, measures KL to it
    (base's own is 0), compares ppo with it, and records it as an input. base's answers are the plain model's
    (the PPO adapter it shares memory with is off), recomputed here from a separately loaded copy."""
    from rlchat.generation import (decode_responses, encode_prompt, generate, generation_config, prompt_limit,
                                   stop_token_ids)
    from rlchat.models import load_causal_lm, load_tokenizer

    run = tmp_path / "run"
    res = invoke("train-reward", "--run-dir", run, "--model", tiny_model, "--dataset", demo_data["pairs"],
                 "--max-steps", 4, "--batch-size", 8, "--eval-fraction", "0.02")
    assert res.exit_code == 0, res.output
    res = invoke("ppo", "--run-dir", run, "--model", tiny_model, "--dataset", demo_data["prompts"], "--episodes", 8,
                 "--batch-size", 4, "--response-length", 8)
    assert res.exit_code == 0, res.output
    before = snapshot(run)
    res = invoke("eval", "--run-dir", run, "--dataset", demo_data["eval_prompts"], "--max-prompts", 4,
                 "--policies", "sft,ppo")
    assert res.exit_code == 2 and "no sft stage" in res.output and snapshot(run) == before, res.output
    res = invoke("eval", "--run-dir", run, "--dataset", demo_data["eval_prompts"], "--judge", JUDGE,
                 "--max-prompts", 4, "--max-new-tokens", 8, "--batch-size", 2, "--kl-samples", 2)
    assert res.exit_code == 0, res.output
    rep = json.loads((run / "eval" / "report.json").read_text())
    assert rep["settings"]["reference"] == "base" and list(rep["policies"]) == ["base", "ppo"]
    assert [(c["a"], c["b"]) for c in rep["comparisons"]] == [("ppo", "base")]
    assert rep["policies"]["base"]["kl_to_ref"] == 0.0 and rep["policies"]["ppo"]["kl_to_ref"] is not None
    assert "pi_base" in rep["settings"]["kl"] and rep["summary"].startswith("ppo ")
    entry = json.loads((run / "run.json").read_text())["stages"]["eval"]
    assert entry["parent"] == "ppo" and entry["inputs"]["base"]["spec"] == str(tiny_model)
    assert "KL to base" in (run / "eval" / "report.md").read_text()

    tok = load_tokenizer(str(tiny_model))
    model = load_causal_lm(str(tiny_model)).eval()
    stop_ids = stop_token_ids(model, tok)
    gen = generation_config(8, 0.0, 1.0, stop_ids, tok.pad_token_id, bos_id=tok.bos_token_id)
    rows = read_jsonl(run / "eval" / "responses.jsonl")
    for row in rows:
        resp, _ = generate(model, tok, [encode_prompt(tok, row["messages"], prompt_limit(model, 8))], gen, stop_ids)
        assert row["policies"]["base"]["response"] == decode_responses(tok, resp, stop_ids)[0].strip()
    check_export_and_chat_without_sft(run, tiny_model, tmp_path)


def check_export_and_chat_without_sft(run, tiny_model, tmp_path):
    """export/chat of a run without an SFT stage: PPO's adapter merged into the --model it started from (they
    used to ask for an SFT stage); the export equals base + adapter loaded with stock peft."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rlchat.models import load_causal_lm, load_tokenizer

    res = invoke("export", run, tmp_path / "exported", "--stage", "ppo")
    assert res.exit_code == 0, res.output
    info = json.loads((tmp_path / "exported" / "rlchat_export.json").read_text())
    assert info["base_model"] == str(tiny_model) and info["adapters_merged"] == ["ppo/policy"]
    assert info["sft_base_model"] is None
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    adapter = PeftModel.from_pretrained(load_causal_lm(str(tiny_model)), run / "ppo" / "policy").eval()
    ids = load_tokenizer(str(tiny_model))("the red apple", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, adapter(ids).logits, atol=1e-4)
    res = invoke("chat", run, "--stage", "ppo", "--prompt", "Tell me about the red apple.", "--max-new-tokens", 4)
    assert res.exit_code == 0, res.output
    res = invoke("export", run, tmp_path / "x", "--stage", "sft")
    assert res.exit_code == 2 and "sft" in res.output and not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------- export, chat


@pytest.mark.slow
def test_export_reloads_with_plain_transformers_and_matches_adapter_version(evaluated, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlchat import export, run_models

    run = evaluated["run"]
    out = export.export(run, "ppo", tmp_path / "exported")
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    gen = json.loads((out / "generation_config.json").read_text())
    tok = AutoTokenizer.from_pretrained(out)
    assert gen["eos_token_id"] == tok.eos_token_id and gen["pad_token_id"] == tok.pad_token_id
    assert tok.chat_template and json.loads((out / "rlchat_export.json").read_text())["stage"] == "ppo"

    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    sft, _ = run_models.load_sft_policy(run)
    adapter = PeftModel.from_pretrained(sft, run / "ppo" / "policy").eval()
    for row in evaluated["rows"][:2]:
        ids = tok.apply_chat_template(row["messages"], add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)
        with torch.no_grad():
            a = plain.generate(**ids, max_new_tokens=MAX_NEW, do_sample=False)  # its own generation_config
            b = adapter.generate(**ids, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)
        assert a.tolist() == b.tolist()
        reply = tok.decode(a[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        assert reply == row["policies"]["ppo"]["response"]


@pytest.mark.slow
def test_export_refuses_bad_targets(evaluated, tmp_path):
    from rlchat import export
    from rlchat.errors import RlchatError

    run = evaluated["run"]
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(RlchatError, match="not empty.*--overwrite"):
        export.export(run, "ppo", full)
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    with pytest.raises(RlchatError, match="stage 'ppo' .* is not run"):
        export.export(evaluated["sft_only"], "ppo", tmp_path / "x")
    with pytest.raises(RlchatError, match="has no policy"):
        export.export(run, "reward", tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    # --overwrite replaces the directory, sft works too
    out = export.export(run, "sft", full, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


@pytest.mark.slow
def test_chat_prompt_answers_like_eval(evaluated, capsys):
    from rlchat import export

    row = evaluated["rows"][0]
    reply = export.chat(evaluated["run"], "ppo", prompt=row["prompt"], max_new_tokens=MAX_NEW, temperature=0)
    assert reply == row["policies"]["ppo"]["response"]   # greedy: the same answer eval recorded
    assert capsys.readouterr().out.strip() == reply.strip()


@pytest.mark.slow
def test_chat_interactive_streams_and_keeps_history(evaluated, monkeypatch, capsys):
    from rlchat import export

    lines = iter(["Tell me about the red apple.", "And the blue fox?", "/reset", "Hi", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    seen = []
    real = export._generate_reply

    def spy(model, tokenizer, messages, *args, **kwargs):
        seen.append([m["content"] for m in messages])
        return real(model, tokenizer, messages, *args, **kwargs)

    monkeypatch.setattr(export, "_generate_reply", spy)
    assert export.chat(evaluated["run"], "sft", max_new_tokens=8, temperature=0.7, seed=0) is None
    assert capsys.readouterr().out.count("bot> ") == 3
    assert seen[0] == ["Tell me about the red apple."]
    assert seen[1][0] == "Tell me about the red apple." and seen[1][-1] == "And the blue fox?" and len(seen[1]) == 3
    assert seen[2] == ["Hi"]   # /reset forgot the first conversation


def test_chat_on_a_missing_stage_says_which_to_use(tmp_path):
    from rlchat import export
    from rlchat.errors import RunDirError
    from rlchat.rundir import RunDir

    run = RunDir(tmp_path / "r")
    _fake_stage(run, "sft", [])
    with pytest.raises(RunDirError, match="--stage sft"):
        export.chat(run.path, "ppo", prompt="hi")
