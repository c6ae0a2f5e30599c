"""`rlchat eval` comparing several policies of one run (rlchat/eval_policies.py, eval_report.comparison_pairs).

The run: a tiny random-init Llama with a short LoRA SFT and a real `rlchat dpo` stage (through the CLI), plus the
stand-in PPO stage of test_eval.py (a LoRA adapter with random B weights on the SFT model). The checks recompute
what the report claims: each policy's win rate and Wilson interval against the reference from responses.jsonl,
and DPO's greedy answers from a separately loaded model (SFT + the DPO adapter merged), so a mixed-up adapter
(ppo answering for dpo) cannot pass. The pure functions (discovery, the compared pairs) are checked on fake runs.
"""
from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest

from rlchat.eval_policies import POLICY_ORDER, choose_policies, finished_policies, kl_temperature
from rlchat.eval_report import comparison_pairs
from rlchat.errors import RunDirError
from tests.test_eval import JUDGE, greedy_response, invoke, make_fake_ppo, read_jsonl

pytestmark = pytest.mark.usefixtures("one_thread_per_module")
N_PROMPTS, MAX_NEW = 12, 16


# ------------------------------------------------------------------------------------------- pure functions


class FakeRun:
    """Just what discovery reads: the manifest's stage records."""

    def __init__(self, stages: dict):
        self.stages, self.path = stages, "RUN"

    def record(self, stage):
        return self.stages.get(stage)


def done(**outputs):
    return {"status": "done", "outputs": outputs, "config": {}}


def test_discovery_finds_every_finished_policy_stage():
    run = FakeRun({"sft": done(), "reward": done(), "ppo": done(best="ppo/best"), "grpo": done(),
                   "rloo": {"status": "interrupted"}, "dpo": done(), "eval": done()})
    assert finished_policies(run) == ["ppo", "ppo-best", "grpo", "dpo"]
    cfg = SimpleNamespace(policies=None, include_base=True)
    assert choose_policies(run, cfg) == ["base", "sft", "ppo", "ppo-best", "grpo", "dpo"]
    assert choose_policies(run, SimpleNamespace(policies=["sft", "dpo"], include_base=False)) == ["sft", "dpo"]
    with pytest.raises(RunDirError, match="policy 'rloo' was asked for but the rloo stage in RUN is interrupted"):
        choose_policies(run, SimpleNamespace(policies=["rloo"], include_base=False))
    # a run without SFT: the starting model is the reference `base`, always evaluated
    no_sft = FakeRun({"dpo": done(base="/models/x")})
    assert choose_policies(no_sft, SimpleNamespace(policies=None, include_base=False), "base") == ["base", "dpo"]


def test_kl_temperature_comes_from_the_sampling_stage():
    assert kl_temperature(FakeRun({"dpo": done()})) == 1.0  # dpo does not sample
    grpo = {"status": "done", "config": {"temperature": 0.7}}
    assert kl_temperature(FakeRun({"dpo": done(), "grpo": grpo})) == 0.7


def test_compared_pairs():
    pols = ["base", "sft", "ppo", "ppo-best", "dpo"]
    assert comparison_pairs(pols) == [("ppo", "sft"), ("ppo-best", "sft"), ("dpo", "sft"), ("ppo", "base"),
                                      ("sft", "base"), ("ppo-best", "base"), ("dpo", "base")]
    assert comparison_pairs(["sft", "ppo", "grpo", "dpo"], pairwise=True) == [
        ("ppo", "sft"), ("grpo", "sft"), ("dpo", "sft"), ("ppo", "grpo"), ("ppo", "dpo"), ("grpo", "dpo")]
    assert comparison_pairs(["base", "ppo", "dpo"], reference="base") == [("ppo", "base"), ("dpo", "base")]
    assert comparison_pairs(["sft"]) == []
    assert POLICY_ORDER.index("dpo") > POLICY_ORDER.index("ppo")


# ------------------------------------------------------------------------------------------- the tiny run


@pytest.fixture(scope="module")
def compared(tmp_path_factory, tiny_model, demo_data):
    """RUN with sft (LoRA), dpo (real, 30 steps) and a stand-in ppo, evaluated with --pairwise and the judge."""
    from rlchat import eval_policies

    run = tmp_path_factory.mktemp("eval-policies") / "run"
    res = invoke("sft", "--run-dir", run, "--model", tiny_model, "--dataset", demo_data["sft"], "--max-steps", 20,
                 "--batch-size", 16, "--lr", "3e-3", "--eval-fraction", "0", "--logging-steps", 5)
    assert res.exit_code == 0, res.output
    res = invoke("dpo", "--run-dir", run, "--dataset", demo_data["pairs"], "--max-steps", 30, "--batch-size", 8,
                 "--lr", "5e-3", "--beta", "0.5", "--eval-fraction", "0", "--max-length", 96)
    assert res.exit_code == 0, res.output
    make_fake_ppo(run)
    loaded = {}
    original = eval_policies.load_policies

    def spy(*args, **kwargs):
        pol = original(*args, **kwargs)
        loaded.update(adapters=dict(pol.adapters), own=dict(pol.own))
        return pol

    eval_policies_load = pytest.MonkeyPatch()
    eval_policies_load.setattr("rlchat.stages.evaluate.load_policies", spy)
    try:
        res = invoke("eval", "--run-dir", run, "--dataset", demo_data["eval_prompts"], "--judge", JUDGE,
                     "--max-prompts", N_PROMPTS, "--max-new-tokens", MAX_NEW, "--batch-size", 4, "--kl-samples", 2,
                     "--pairwise", "--json")
    finally:
        eval_policies_load.undo()
    assert res.exit_code == 0, res.output
    return {"run": run, "loaded": loaded, "report": json.loads((run / "eval" / "report.json").read_text()),
            "rows": read_jsonl(run / "eval" / "responses.jsonl"), "output": res.output}


@pytest.mark.slow
def test_each_policy_has_its_win_rate_against_the_reference(compared):
    from rlchat.stats import win_rate

    rep, rows = compared["report"], compared["rows"]
    assert list(rep["policies"]) == ["sft", "ppo", "dpo"] and rep["settings"]["reference"] == "sft"
    pairs = [(c["a"], c["b"]) for c in rep["comparisons"]]
    assert pairs == [("ppo", "sft"), ("dpo", "sft"), ("ppo", "dpo")]  # --pairwise adds ppo over dpo
    for c in rep["comparisons"]:
        a = [r["policies"][c["a"]]["judge"] for r in rows]
        b = [r["policies"][c["b"]]["judge"] for r in rows]
        w = win_rate(a, b)  # the same statistics as a two-policy eval: ties count half, Wilson 95% interval
        assert c["win_rate_judge"] == pytest.approx(w["win_rate"]) and c["ci_judge"] == pytest.approx(w["ci"])
        assert c["n"] == N_PROMPTS and c["win_rate_reward"] is None  # the run has no reward model
    for name in ("ppo", "dpo"):
        assert rep["policies"][name]["kl_to_ref"] is not None and rep["policies"][name]["kl_samples"] == 2 * N_PROMPTS
    manifest = json.loads((compared["run"] / "run.json").read_text())["stages"]["eval"]
    assert manifest["parent"] == "ppo"
    for c in rep["comparisons"][:2]:
        assert manifest["metrics"][f"{c['a']}/win_rate"] == c["win_rate_judge"]
    assert re.search(r"^ppo (beats|loses to|ties with) sft .*; dpo over sft \d\.\d\d \[", rep["summary"]), rep["summary"]


@pytest.mark.slow
def test_one_model_in_memory_and_dpo_answers_are_its_own(compared):
    """Both adapters sit on the one SFT model; DPO's greedy answers equal those of SFT + the DPO adapter merged,
    loaded here on its own (no batching, no adapter switching)."""
    from peft import PeftModel

    from rlchat import run_models

    assert compared["loaded"] == {"adapters": {"ppo": "ppo", "dpo": "dpo"}, "own": {}}
    run, rows = compared["run"], compared["rows"]
    sft, tok = run_models.load_sft_policy(run)
    dpo = PeftModel.from_pretrained(sft, str(run / "dpo" / "adapter")).merge_and_unload().eval()
    differs = 0
    for row in rows[:4]:
        _, response = greedy_response(dpo, tok, row["messages"], MAX_NEW)
        assert tok.decode(response, skip_special_tokens=True).strip() == row["policies"]["dpo"]["response"]
        differs += row["policies"]["dpo"]["response"] != row["policies"]["ppo"]["response"]
    assert differs  # ppo's adapter answers otherwise: the comparison above could tell them apart


@pytest.mark.slow
def test_report_and_plot_list_every_policy(compared):
    run = compared["run"]
    md = (run / "eval" / "report.md").read_text()
    for needle in ("ppo over sft", "dpo over sft", "ppo over dpo"):
        assert needle in md, md
    assert (run / "eval" / "score_distribution.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "eval" / "win_rates.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
