"""CLI: --help of every command, fast startup, and the SFT bad inputs (exit code 2, one line, run dir untouched)."""
from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rlchat.cli import app
from tests.conftest import snapshot

runner = CliRunner()
COMMANDS = ["sft", "train-reward", "ppo", "grpo", "rloo", "dpo", "eval", "status", "new-model", "import-gguf",
            "demo-data", "plan", "export", "chat", "report", "score", "sample-pairs"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_every_command_is_registered():
    import typer

    # exactly these: a new command must join COMMANDS, so the --help checks below cover it
    assert sorted(typer.main.get_command(app).commands) == sorted(COMMANDS)


def test_root_help_lists_subcommands():
    res = invoke("--help")
    assert res.exit_code == 0
    # the names in the first column of the Commands panel (a substring check would find "chat", "report" and
    # "score" in other commands' descriptions)
    panel = res.output[res.output.index("─ Commands ─"):]
    listed = re.findall(r"^│ (\S+) ", panel, flags=re.MULTILINE)
    assert sorted(listed) == sorted(COMMANDS), listed


@pytest.mark.parametrize("cmd", ["sft", "train-reward", "ppo", "grpo", "rloo", "dpo"])
def test_training_commands_take_lr_as_a_flag(cmd):
    import typer

    params = typer.main.get_command(app).commands[cmd].params
    assert any("--lr" in p.opts for p in params), [p.opts for p in params]
    res = invoke(cmd, "--help")
    assert re.search(r"^│ --lr\s", res.output, flags=re.MULTILINE), res.output


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_has_help_with_an_example(cmd):
    res = invoke(cmd, "--help")
    assert res.exit_code == 0, res.output
    assert "Example" in res.output


def test_help_is_fast_and_imports_no_torch():
    code = "import sys, rlchat.cli; print('torch' in sys.modules or 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "rlchat", "--help"], capture_output=True, check=True)
    assert time.perf_counter() - t0 < 10  # generous: a shared CI core; the point is no torch import


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def sft_rows():
    return [{"messages": [{"role": "user", "content": f"Tell me about the red fox {i}."},
                          {"role": "assistant", "content": "The red fox lives in the forest. Thank you!"}]}
            for i in range(12)]


@pytest.fixture()
def run_dir(tmp_path):
    """A run directory that already holds a file, to check that bad input leaves it byte-for-byte unchanged."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("keep me\n")
    return run


def bad_inputs(tmp_path: Path, tiny_model: Path, sft_rows) -> dict[str, tuple[list, str]]:
    """name -> (extra CLI args, a phrase the one-line error must contain)."""
    good = write_jsonl(tmp_path / "good.jsonl", sft_rows)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    nocols = write_jsonl(tmp_path / "nocols.jsonl", [{"question": "q", "answer": "a"}] * 3)
    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text(json.dumps(sft_rows[0]) + "\n" + json.dumps(sft_rows[1]) + "\n{not json\n")
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"],
                                                  "hidden_size": 32, "num_hidden_layers": 1,
                                                  "num_attention_heads": 2, "intermediate_size": 64,
                                                  "vocab_size": 100}))
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("sft:\n  learning_rat: 0.001\n")
    m = ["--model", tiny_model]
    return {
        "dataset missing": (m + ["--dataset", tmp_path / "nope.jsonl"], "not found"),
        "empty dataset": (m + ["--dataset", empty], "empty"),
        "no recognised columns": (m + ["--dataset", nocols], "question"),
        "malformed jsonl": (m + ["--dataset", malformed], "line 3"),
        "model path missing": (["--model", tmp_path / "no-model", "--dataset", good], "not found"),
        "not a causal lm": (["--model", bert, "--dataset", good], "causal"),
        "unknown config key": (m + ["--dataset", good, "--config", recipe], "learning_rat"),
        "zero lr": (m + ["--dataset", good, "--lr", "0"], "lr must be > 0, got 0"),
        "negative batch size": (m + ["--dataset", good, "--batch-size", "-1"], "batch_size"),
        "zero epochs": (m + ["--dataset", good, "--epochs", "0"], "epochs"),
        "unknown split": (m + ["--dataset", good, "--split", "validation"], "split"),
    }


BAD = ["dataset missing", "empty dataset", "no recognised columns", "malformed jsonl", "model path missing",
       "not a causal lm", "unknown config key", "zero lr", "negative batch size", "zero epochs", "unknown split"]


@pytest.mark.parametrize("name", BAD)
def test_sft_bad_input(name, tmp_path, tiny_model, sft_rows, run_dir):
    args, phrase = bad_inputs(tmp_path, tiny_model, sft_rows)[name]
    before = snapshot(run_dir)
    res = runner.invoke(app, ["sft", "--run-dir", str(run_dir)] + [str(a) for a in args])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    err_lines = [line for line in res.output.splitlines() if line.strip()]
    assert any(line.startswith("error:") for line in err_lines), res.output
    error = next(line for line in err_lines if line.startswith("error:"))
    assert phrase.lower() in error.lower(), error
    assert snapshot(run_dir) == before


def test_unknown_key_reports_all_problems_at_once(tmp_path, tiny_model, run_dir):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("sft:\n  learning_rat: 0.001\n  epochz: 2\n  batch_size: 0\n")
    res = runner.invoke(app, ["sft", "--run-dir", str(run_dir), "--config", str(recipe), "--model",
                              str(tiny_model), "--dataset", "x.jsonl"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    # a short head, one indented line per problem (each with its fix), then the fix: not one 1,000-character line
    lines = res.output.strip().splitlines()
    assert lines[0] == "error: 3 problems in the sft config:", res.output
    assert len(lines) == 5 and all(line.startswith("  - ") for line in lines[1:4]), res.output
    assert "'learning_rat'" in lines[1] and "did you mean 'lr'?" in lines[1]
    assert "'epochz'" in lines[2] and "did you mean 'epochs'?" in lines[2]
    assert "batch_size must be > 0" in lines[3]
    assert lines[4].startswith("Fix:") and "rlchat sft --help" in lines[4]
    assert max(len(line) for line in lines) < 200 + len(str(recipe)), res.output


def test_unknown_key_without_a_close_name_lists_the_nearest_few(tmp_path, run_dir):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("reward:\n  zzqx_thing: 1\n")
    res = runner.invoke(app, ["train-reward", "--run-dir", str(run_dir), "--config", str(recipe)])
    assert res.exit_code == 2 and "Traceback" not in res.output
    (line,) = [line for line in res.output.splitlines() if line.strip()]
    nearest = re.search(r"the nearest keys there: ([a-z_, ]+) \(every key: `rlchat train-reward --help`\)", line)
    assert nearest, line
    assert len(nearest.group(1).split(", ")) == 3 and "did you mean" not in line


@pytest.mark.parametrize("flag, expected", [
    ("--learning-rate", "did you mean --lr?"),
    ("--learning_rate", "did you mean --lr?"),
    ("--use_peft", "LoRA is rlchat's default; full trains all weights instead"),
    ("--model_name_or_path", "did you mean --model?"),
    ("--output_dir", "did you mean --run-dir?"),
    ("--per_device_train_batch_size", "did you mean --batch-size?"),
    ("--gradient_accumulation_steps", "did you mean --grad-accum?"),
    ("--num_train_epochs", "did you mean --epochs?"),
    ("--lr_scheduler_type", "did you mean --lr-scheduler?"),
    ("--torch_dtype", "did you mean --dtype?"),
    ("--max_seq_length", "did you mean --max-length?"),
    ("--dataset_test_split", "did you mean --eval-split?"),
    ("--max_steps", "did you mean --max-steps?"),  # rlchat's own name with underscores
])
def test_trl_spellings_get_the_rlchat_flag(flag, expected, run_dir):
    res = runner.invoke(app, ["sft", "--run-dir", str(run_dir), flag, "1"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    (line,) = [line for line in res.output.splitlines() if line.strip()]
    assert line.startswith(f"error: no such option {flag}") and expected in line, line
    # click's own guesses (--logging-steps for --learning-rate, --seed for --use_peft) are gone
    assert "--logging-steps" not in line and "--seed" not in line, line
    assert not (run_dir / "run.json").exists()


def test_unknown_flag_far_from_every_name_gets_no_guess(run_dir):
    res = runner.invoke(app, ["ppo", "--run-dir", str(run_dir), "--frobnicate", "1"])
    assert res.exit_code == 2
    assert "no such option --frobnicate. Fix: see `rlchat ppo --help`." in res.output
    assert "did you mean" not in res.output
    # a TRL name of a setting this stage lacks says so
    res = runner.invoke(app, ["ppo", "--run-dir", str(run_dir), "--dataset_test_split", "test"])
    assert "TRL's dataset_test_split is eval_split in rlchat, which this command does not have" in res.output


@pytest.mark.parametrize("command", ["sft", "train-reward", "ppo", "eval"])
def test_stage_help_shows_every_default(command):
    from rlchat.cli import STAGE_COMMANDS
    from rlchat.config import STAGE_CONFIGS

    stage = next(s for s, spec in STAGE_COMMANDS.items() if spec[0] == command)
    res = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    rows = {}  # first flag of an option -> its help text, joined over wrapped lines
    flag = None
    for line in res.output.splitlines():
        cell = line.strip().strip("│").strip()
        if line.startswith("│ --"):  # a row's first column (wrapped help text is indented)
            flag = cell.split()[0]
            rows[flag] = cell
        elif flag is not None and cell and not line.lstrip().startswith(("╰", "╭")):
            rows[flag] += " " + cell
        else:
            flag = None
    for f in dataclasses.fields(STAGE_CONFIGS[stage]):
        if f.default is None:
            continue
        shown = (f.name.replace("_", "-") if f.default else "no-" + f.name.replace("_", "-")) if isinstance(
            f.default, bool) else f"{f.default:g}" if isinstance(f.default, float) else str(f.default)
        row = " ".join(rows["--" + f.name.replace("_", "-")].split())
        assert f"[default: {shown}]" in row, (f.name, row)


def test_help_defaults_do_not_override_a_recipe(tmp_path, monkeypatch):
    # precedence stays defaults < recipe < explicit flags: an option left out passes nothing
    from rlchat import cli

    seen = {}
    monkeypatch.setattr(cli, "run_stage", lambda stage, module, recipe, overrides, *a, **k: seen.update(overrides))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("sft: {lr: 0.001, lr_scheduler: cosine}\n")
    res = runner.invoke(app, ["sft", "--config", str(recipe), "--run-dir", "r", "--epochs", "2"])
    assert res.exit_code == 0, res.output
    assert seen == {"run_dir": "r", "epochs": 2.0}


def test_status_of_missing_run_is_a_clean_error(tmp_path):
    res = runner.invoke(app, ["status", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and "error:" in res.output and "Traceback" not in res.output
