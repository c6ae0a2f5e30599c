"""CLI: --help of every command, fast startup, and the SFT bad inputs (exit code 2, one line, run dir untouched)."""
from __future__ import annotations

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
COMMANDS = ["sft", "train-reward", "ppo", "eval", "status", "new-model", "demo-data", "plan", "export", "chat",
            "report", "score"]


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


@pytest.mark.parametrize("cmd", ["sft", "train-reward", "ppo"])
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
    assert res.exit_code == 2
    for word in ("learning_rat", "epochz", "batch_size"):
        assert word in res.output
    # the list of valid keys, as keys: `lr` one of them, the unknown ones not
    valid = re.search(r"valid keys there: ([a-z_, ]+);", res.output)
    assert valid, res.output
    keys = valid.group(1).split(", ")
    assert "lr" in keys and "epochs" in keys and "learning_rat" not in keys and "epochz" not in keys, keys


def test_status_of_missing_run_is_a_clean_error(tmp_path):
    res = runner.invoke(app, ["status", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and "error:" in res.output and "Traceback" not in res.output
