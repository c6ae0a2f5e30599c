"""What a user gets out of a run, checked the way a user meets it (issue 16): the CLI in a subprocess whose
stderr is a pipe (as in CI), under umask 022.

Two small pipelines on the tiny model, each built once per module:
  * `lora_run`: sft (LoRA, the default) -> train-reward (LoRA) -> ppo -> eval -> export, all with
    `--report-to tensorboard`;
  * `full_run`: sft --full -> train-reward --full -> ppo (LoRA on the full SFT model).
Checked on them:
  * every README snippet of "Loading each artifact with transformers and peft" runs as written (paths replaced) and
    loads the same weights rlchat uses (logits / scores compared with rlchat's own loaders);
  * tensorboard event files of sft, train-reward and ppo, read back with tensorboard's EventAccumulator;
  * file and directory permissions (0644 / 0755 under umask 022);
  * `rlchat status RUN > file`, plain progress lines in a pipe, `export`'s one summary line and its
    rlchat_export.json, the reward stage's eval_accuracy equal in metrics.jsonl, summary and manifest,
    `chat`'s slash commands.
Slow (about a minute and a half on 2 cores): marked `slow`.
"""
from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def cli(*args, cwd: Path | None = None, input: str | None = None, check: bool = True):
    """`rlchat ARGS` as a user runs it, stdout and stderr pipes (no terminal), umask 022."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(ROOT))
    env.pop("COLUMNS", None)
    res = subprocess.run([sys.executable, "-m", "rlchat", *map(str, args)], cwd=cwd or ROOT, env=env, text=True,
                         capture_output=True, input=input, timeout=600, preexec_fn=lambda: os.umask(0o022))
    if check and res.returncode != 0:
        raise AssertionError(f"rlchat {' '.join(map(str, args))} exited {res.returncode}:\n{res.stderr[-3000:]}")
    return res


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model, demo_data) -> dict:
    run = tmp_path_factory.mktemp("lora") / "run"
    out = {"run": run, "model": tiny_model}
    out["sft"] = cli("sft", "--run-dir", run, "--model", tiny_model, "--dataset", demo_data["sft"],
                     "--max-steps", 30, "--logging-steps", 5, "--report-to", "tensorboard")
    out["reward"] = cli("train-reward", "--run-dir", run, "--dataset", demo_data["pairs"], "--max-steps", 20,
                        "--batch-size", 16, "--logging-steps", 5, "--report-to", "tensorboard")
    out["ppo"] = cli("ppo", "--run-dir", run, "--dataset", demo_data["prompts"], "--episodes", 32,
                     "--batch-size", 8, "--response-length", 8, "--report-to", "tensorboard")
    out["eval"] = cli("eval", "--run-dir", run, "--dataset", demo_data["eval_prompts"], "--max-prompts", 16,
                      "--max-new-tokens", 8, "--judge", "rlchat.demo.task:judge", "--kl-samples", 1)
    out["export_dir"] = run.parent / "exported"
    out["export"] = cli("export", run, out["export_dir"], "--stage", "ppo")
    return out


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_model, demo_data) -> dict:
    run = tmp_path_factory.mktemp("full") / "run"
    cli("sft", "--run-dir", run, "--model", tiny_model, "--dataset", demo_data["sft"], "--max-steps", 6, "--full")
    cli("train-reward", "--run-dir", run, "--dataset", demo_data["pairs"], "--max-steps", 6, "--full",
        "--batch-size", 16)
    cli("ppo", "--run-dir", run, "--dataset", demo_data["prompts"], "--episodes", 16, "--batch-size", 8,
        "--response-length", 8)
    return {"run": run}


# ------------------------------------------------------------------------------------- README snippets


def readme_snippets() -> dict[str, str]:
    """{name: code} of the README's `<!-- snippet: NAME -->` python blocks."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    found = dict(re.findall(r"<!-- snippet: ([\w-]+) -->\n```python\n(.*?)```", text, flags=re.S))
    assert set(found) >= {"sft-lora", "sft-full", "reward-lora", "reward-full", "ppo-policy", "export"}, found.keys()
    return found


def run_snippet(name: str, run: Path, export_dir: Path | None = None) -> dict:
    """Run the README snippet `name` in a fresh Python process offline, with runs/demo -> run; returns the
    logits / score it computed, for comparison with rlchat's loaders."""
    code = readme_snippets()[name].replace("runs/demo", str(run))
    if export_dir is not None:
        code = code.replace("exported/demo-ppo", str(export_dir))
    probe = '''
import json, torch
ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
out = {}
for var in ("sft", "sft_merged", "policy", "policy_merged", "model"):
    if var in globals():
        with torch.no_grad():
            out[var] = globals()[var](input_ids=ids).logits[0, -1, :8].tolist()
for var in ("score", "reply"):
    if var in globals():
        out[var] = globals()[var]
print("RESULT" + json.dumps(out))
'''
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", code + probe], capture_output=True, text=True, env=env,
                         cwd=run.parent, timeout=300)
    assert res.returncode == 0, f"README snippet {name} failed:\n{res.stderr[-3000:]}"
    return json.loads(res.stdout.split("RESULT", 1)[1])


def rlchat_logits(model) -> list[float]:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([[1, 5, 9, 13, 17, 21]])).logits[0, -1, :8].tolist()


def rlchat_score(run: Path) -> float:
    from rlchat.run_models import RewardScorer, load_reward_model

    scorer = RewardScorer(*load_reward_model(run))
    return scorer([[{"role": "user", "content": "Tell me about the red apple."}]],
                  [[{"role": "assistant", "content": "The red apple is sweet. Hope this helps!"}]])[0].item()


def test_readme_snippets_load_the_lora_runs_artifacts(lora_run):
    from rlchat.export import load_policy
    from rlchat.run_models import load_sft_policy

    run = lora_run["run"]
    config = json.loads((run / "ppo" / "policy" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((run / "sft" / "merged").resolve())
    sft_cfg = json.loads((run / "sft" / "adapter" / "adapter_config.json").read_text())
    assert sft_cfg["base_model_name_or_path"] == str(Path(lora_run["model"]).resolve())

    sft = run_snippet("sft-lora", run)
    ours = rlchat_logits(load_sft_policy(run)[0])
    assert sft["sft"] == pytest.approx(ours, abs=1e-4)
    assert sft["sft_merged"] == pytest.approx(ours, abs=1e-4)

    ppo = run_snippet("ppo-policy", run)
    ours = rlchat_logits(load_policy(run, "ppo")[0])
    assert ppo["policy"] == pytest.approx(ours, abs=1e-4)
    assert ppo["policy_merged"] == pytest.approx(ours, abs=1e-4)
    assert ppo["policy"] != pytest.approx(sft["sft"], abs=1e-6), "the PPO adapter changed nothing?"

    reward = run_snippet("reward-lora", run)
    assert reward["score"] == pytest.approx(rlchat_score(run), abs=1e-4)

    exported = run_snippet("export", run, lora_run["export_dir"])
    assert exported["model"] == pytest.approx(ours, abs=1e-4)
    assert isinstance(exported["reply"], str)


def test_readme_snippets_load_the_full_runs_artifacts(full_run):
    from rlchat.export import load_policy
    from rlchat.run_models import load_sft_policy

    run = full_run["run"]
    config = json.loads((run / "ppo" / "policy" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((run / "sft" / "model").resolve())
    assert not (run / "sft" / "merged").exists()  # --full: the SFT model is already a plain directory

    sft = run_snippet("sft-full", run)
    assert sft["sft"] == pytest.approx(rlchat_logits(load_sft_policy(run)[0]), abs=1e-4)
    ppo = run_snippet("ppo-policy", run)
    ours = rlchat_logits(load_policy(run, "ppo")[0])
    assert ppo["policy"] == pytest.approx(ours, abs=1e-4)
    assert ppo["policy_merged"] == pytest.approx(ours, abs=1e-4)
    reward = run_snippet("reward-full", run)
    assert reward["score"] == pytest.approx(rlchat_score(run), abs=1e-4)


# ------------------------------------------------------------------------------------------ tensorboard


def scalars(logdir: Path) -> dict[str, list[float]]:
    """{tag: values} of every scalar in the event files under logdir (tensorboard's own reader)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(logdir.glob("events.out.tfevents.*"))
    assert files, f"no tensorboard event files in {logdir}"
    out: dict[str, list[float]] = {}
    for f in files:
        acc = EventAccumulator(str(f))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
    return out


def test_report_to_tensorboard_writes_readable_events_for_every_training_stage(lora_run):
    run = lora_run["run"]
    sft = scalars(run / "sft" / "tensorboard")
    assert len(sft["train/loss"]) >= 5 and all(v > 0 for v in sft["train/loss"])
    assert "eval/loss" in sft
    reward = scalars(run / "reward" / "tensorboard")
    assert reward["train/loss"] and reward["eval/accuracy"]
    ppo = scalars(run / "ppo" / "tensorboard")
    assert len(ppo["objective/scores"]) == 4  # 32 episodes / batch 8
    # the loss tensorboard shows is the one metrics.jsonl has
    rows = [json.loads(line) for line in (run / "sft" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert sft["train/loss"] == pytest.approx(losses, rel=1e-5)


def test_report_to_wandb_without_wandb_is_one_line_and_writes_nothing(tmp_path, tiny_model, demo_data):
    if __import__("importlib").util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed")
    run = tmp_path / "run"
    for args in (["sft", "--model", tiny_model, "--dataset", demo_data["sft"]],
                 ["train-reward", "--model", tiny_model, "--dataset", demo_data["pairs"]]):
        res = cli(*args, "--run-dir", run, "--max-steps", 1, "--report-to", "wandb", check=False)
        assert res.returncode == 2, res.stderr
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        assert lines[-1].startswith("error: --report-to wandb needs the 'wandb' package"), res.stderr
        assert "Traceback" not in res.stderr
        assert not run.exists()


# ------------------------------------------------------------------------------------------ permissions


def test_outputs_follow_the_umask(lora_run):
    """Under umask 022 every file rlchat wrote is 0644 and every directory 0755, like files the user writes."""
    run, export_dir = lora_run["run"], lora_run["export_dir"]
    must_exist = [export_dir / "model.safetensors", export_dir / "rlchat_export.json", run / "eval" / "report.md",
                  run / "eval" / "responses.jsonl", run / "run.json", run / "sft" / "merged" / "model.safetensors",
                  run / "ppo" / "policy" / "adapter_model.safetensors"]
    for p in must_exist:
        assert p.is_file(), p
    pngs = list((run / "eval").glob("*.png"))
    assert pngs
    bad = []
    for root in (run, export_dir):
        for p in [root, *root.rglob("*")]:
            if p.name in (".lock",) or p.is_symlink():
                continue
            mode = stat.S_IMODE(p.stat().st_mode)
            want = 0o755 if p.is_dir() else 0o644
            if mode & want != want:
                bad.append(f"{oct(mode)} {p.relative_to(root.parent)}")
    assert not bad, "files less readable than the umask allows:\n" + "\n".join(bad[:20])


# ------------------------------------------------------------------------------------- what the CLI prints


def test_status_table_goes_to_stdout(lora_run, tmp_path):
    out = tmp_path / "s.txt"
    res = cli("status", lora_run["run"])
    out.write_text(res.stdout)
    text = out.read_text()
    for stage in ("sft", "reward", "ppo", "eval"):
        assert re.search(rf"\b{stage}\b.*\bdone\b", text), text
    assert "done" not in res.stderr


def test_progress_prints_plain_lines_into_a_pipe(lora_run):
    """stderr is a pipe: progress lines with step, metrics, elapsed and ETA while training, not one bar at the end;
    no line wrapped at 80 columns."""
    lines = [line for line in lora_run["sft"].stderr.splitlines() if re.match(r"sft \d+/30 ", line)]
    steps = [int(re.match(r"sft (\d+)/", line).group(1)) for line in lines]
    assert len(lines) >= 10, lora_run["sft"].stderr  # at least every 5% (30 steps: every 2 steps)
    assert steps == sorted(steps) and steps[-1] == 30
    assert all(re.search(r"elapsed \d+:\d\d:\d\d  eta \d+:\d\d:\d\d$", line) for line in lines), lines
    assert any("loss " in line for line in lines)
    summary = [line for line in lora_run["sft"].stderr.splitlines() if line.startswith("sft: ")]
    assert len(summary) == 1 and len(summary[0]) > 80  # one line, not cut at 80 columns
    ppo_lines = [line for line in lora_run["ppo"].stderr.splitlines() if re.match(r"ppo \d+/4 ", line)]
    assert len(ppo_lines) == 4 and "score " in ppo_lines[-1]
    # a real ETA from the first completed step on (rich's own showed -:--:-- for slow steps)
    assert "eta -:--:--" not in "\n".join(ppo_lines)


def test_reward_eval_accuracy_is_one_number_everywhere(lora_run):
    run = lora_run["run"]
    rows = [json.loads(line) for line in (run / "reward" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_accuracy" in r]
    assert len(evals) >= 5  # about ten evaluations over the run, not one per epoch
    manifest = json.loads((run / "run.json").read_text())["stages"]["reward"]["metrics"]
    assert evals[-1]["eval_accuracy"] == pytest.approx(manifest["eval_accuracy"], abs=1e-6)
    assert evals[-1]["eval_margin"] == pytest.approx(manifest["eval_margin"], abs=1e-4)
    summary = [line for line in lora_run["reward"].stderr.splitlines() if line.startswith("reward: ")][0]
    assert f"eval_accuracy {manifest['eval_accuracy']:.3f}" in summary
    assert f"eval_accuracy={manifest['eval_accuracy']:.4g}" in cli("status", run).stdout


def test_export_prints_one_summary_and_names_the_sft_model_as_base(lora_run):
    lines = [line for line in lora_run["export"].stderr.splitlines() if line.startswith("export:")]
    assert len(lines) == 1, lora_run["export"].stderr
    info = json.loads((lora_run["export_dir"] / "rlchat_export.json").read_text())
    run = lora_run["run"]
    assert info["base_model"] == str((run / "sft" / "merged").resolve())
    assert info["sft_base_model"] == str(Path(lora_run["model"]).resolve())
    assert info["adapters_merged"] == ["sft/adapter", "ppo/policy"]


def test_chat_handles_slash_commands_without_sending_them(lora_run):
    res = cli("chat", lora_run["run"], "--stage", "sft", "--max-new-tokens", 4, "--seed", 0,
              input="/help\n/nonsense\nhello\n/reset\n/exit\n")
    assert res.stdout.count("bot> ") == 1, res.stdout  # only "hello" reached the model
    assert "/help lists the commands" in res.stderr and "unknown command /nonsense" in res.stderr
    assert "new conversation" in res.stderr
