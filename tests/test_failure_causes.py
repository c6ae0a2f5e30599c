"""The causes of issue 15, one test (or a few) per cause, each sweeping many inputs through it.

1. the last line of defence: any unexpected exception is one line + a traceback log, exit 1; known library errors
   (full disk, refused pickle, chat template, absurd lock pid, hand-edited run.json) are real one-line messages;
2. inputs checked before the first write: every row, chat roles, an assistant turn, LoRA targets, lengths;
3. every numeric field of every stage config refuses inf / nan / huge values (and negatives where out of range);
4. a PPO resume refuses every changed setting that matters (and sft/train-reward a changed lr);
5. no command that is not a stage writes into a run directory; report takes the lock; killed exports are cleaned;
6. no silent wrong result: a reward model without a score head, a NaN reward function, prints on stdout, huge prompts;
7. SIGTERM and Ctrl-C: "interrupted: rerun the same command to resume", status "interrupted", exit 143 / 130;
8. messages that said the wrong thing; 9. no unrestricted pickle left in Trainer checkpoints.

Bad input: exit code 2, one `error:` line with a Fix, no traceback, the run directory byte-for-byte unchanged (as in
tests/test_bad_inputs.py, whose module fixtures this file reuses: a finished tiny sft + reward run).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest

from tests.conftest import snapshot
from tests.test_bad_inputs import finished_run, invoke, one_thread  # noqa: F401 - fixtures

REPO = Path(__file__).resolve().parent.parent
SMALL = ["--max-steps", "2", "--batch-size", "4", "--eval-fraction", "0", "--lora-r", "4", "--lora-alpha", "8"]
PPO_SMALL = ["--episodes", "8", "--batch-size", "4", "--response-length", "8", "--lora-r", "4", "--lora-alpha", "8"]


def one_error_line(res, code: int = 2) -> str:
    """The single `error:` line of a refused command (exit `code`, no traceback)."""
    out = res.output
    assert res.exit_code == code, f"exit {res.exit_code}, exception {res.exception!r}\n{out}"
    assert "Traceback" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    assert "Fix:" in errors[0], errors[0]
    return errors[0]


def refused(args, phrase: str, watched: Path, code: int = 2) -> str:
    """Run a command that must be refused with `phrase` in its one line, leaving `watched` unchanged."""
    before = snapshot(watched)
    line = one_error_line(invoke(args), code)
    assert phrase.lower() in line.lower(), line
    assert snapshot(watched) == before, "the refused command changed files"
    return line


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def run_copy(finished_run, tmp_path) -> Path:  # noqa: F811
    dst = tmp_path / "run"
    shutil.copytree(finished_run, dst)
    return dst


# ---- 1. the last line of defence ---------------------------------------------------------------------------------


def test_unexpected_error_inside_a_stage_is_one_line_with_its_log(tmp_path, tiny_model, demo_data, monkeypatch):
    """An exception rlchat does not know, raised after the stage began: exit 1, one line naming the stage, the error
    and RUN/sft/error.log (which holds the traceback); run.json says failed with the same line."""
    import rlchat.stages.common as common

    def boom(*a, **k):
        raise RuntimeError("something nobody checked")

    monkeypatch.setattr(common, "train_or_restore", boom)
    run = tmp_path / "run"
    res = invoke(["sft", "--run-dir", run, "--model", tiny_model, "--dataset", demo_data["sft"], *SMALL])
    line = one_error_line(res, code=1)
    assert "stage 'sft' failed unexpectedly: RuntimeError: something nobody checked" in line
    log = run / "sft" / "error.log"
    assert str(log) in line
    assert "Traceback" in log.read_text() and "boom" in log.read_text()
    entry = json.loads((run / "run.json").read_text())["stages"]["sft"]
    assert entry["status"] == "failed" and "RuntimeError: something nobody checked" in entry["error"]
    assert not (run / ".lock").exists()


@pytest.mark.parametrize("exc", [ValueError("v"), AttributeError("a"), TypeError("t"), KeyError("k"),
                                 IndexError("i"), OverflowError("o"), ZeroDivisionError("z")])
def test_unexpected_error_outside_a_stage_is_one_line_with_a_temp_log(exc, run_copy, monkeypatch):
    import rlchat.status

    def boom(manifest):
        raise exc

    monkeypatch.setattr(rlchat.status, "summary_rows", boom)
    line = one_error_line(invoke(["status", run_copy]), code=1)
    assert f"rlchat status failed unexpectedly: {type(exc).__name__}" in line
    log = Path(line.split("the full traceback is in ")[1].split(";")[0])
    assert log.name.startswith("rlchat-error-") and "Traceback" in log.read_text()
    log.unlink()


TORCH_ADVICE = "Re-running `torch.load` with `weights_only` set to `False`"


def test_refused_checkpoint_pickle_is_one_line_without_the_advice_to_turn_the_protection_off(tmp_path):
    import argparse
    import pickle

    import torch

    from rlchat.stages.common import known_error

    path = tmp_path / "rng.pt"
    torch.save({"rng": argparse.Namespace(a=1)}, path)  # a class the safe loader refuses
    with pytest.raises(pickle.UnpicklingError) as info:
        torch.load(path, weights_only=True)
    err = known_error("ppo", info.value)
    assert err is not None and err.exit_code == 2
    line = err.one_line()
    assert "safe loader" in line and "Namespace" in line
    assert "weights_only set to" not in line and "Re-running" not in line and "False" not in line, line


@pytest.mark.parametrize("message", [
    "Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })",
    "No space left on device (os error 28)"])
def test_a_full_disk_reported_by_safetensors_is_a_disk_error(message):
    from rlchat.stages.common import known_error

    class SafetensorError(Exception):  # safetensors' Rust error type is not an OSError
        pass

    for stage in ("ppo", "export"):
        err = known_error(stage, SafetensorError(message))
        assert err is not None and err.exit_code == 2
        assert "no space left on device" in err.one_line() and "free some disk space" in err.one_line()


def test_full_disk_while_export_writes_is_one_line(finished_run, tmp_path, monkeypatch):  # noqa: F811
    import transformers

    class SafetensorError(Exception):
        pass

    def full(self, *a, **k):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                              "\"No space left on device\" })")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", full)
    out = tmp_path / "exported"
    refused(["export", finished_run, out, "--stage", "sft"], "no space left on device", finished_run)
    assert not out.exists() and not list(tmp_path.glob(".exported.tmp-*"))


@pytest.mark.parametrize("pid", [10**30, -(10**30), 2**63, 2**31])
def test_a_lock_with_an_absurd_pid_is_stale_not_an_overflow(run_copy, pid):
    (run_copy / ".lock").write_text(json.dumps({"pid": pid, "host": os.uname().nodename, "stage": "ppo",
                                                "started": "2026-01-01T00:00:00Z"}))
    from rlchat.rundir import RunDir

    assert RunDir(run_copy).check_can_start("ppo", overwrite=False) == "new"
    res = invoke(["status", run_copy])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("pid", [1.5, True, "12", None, [1]])
def test_a_lock_whose_pid_is_not_an_integer_is_refused_in_one_line(run_copy, pid):
    (run_copy / ".lock").write_text(json.dumps({"pid": pid, "host": os.uname().nodename}))
    refused(["ppo", "--run-dir", run_copy, "--dataset", "x.jsonl"], "lock", run_copy)


MANIFEST_EDITS = {
    "entry is a list": lambda m: m["stages"].__setitem__("sft", [1, 2]),
    "entry is a string": lambda m: m["stages"].__setitem__("reward", "done"),
    "entry is null": lambda m: m["stages"].__setitem__("sft", None),
    "wall_s is a string": lambda m: m["stages"]["sft"].__setitem__("wall_s", "12s"),
    "outputs is a string": lambda m: m["stages"]["sft"].__setitem__("outputs", "sft/adapter"),
    "an output is a list": lambda m: m["stages"]["sft"]["outputs"].__setitem__("adapter", ["a"]),
    "metrics is a list": lambda m: m["stages"]["reward"].__setitem__("metrics", [0.5]),
    "config is a string": lambda m: m["stages"]["sft"].__setitem__("config", "lr=1"),
    "status is a number": lambda m: m["stages"]["sft"].__setitem__("status", 3),
    "inputs is a number": lambda m: m["stages"]["reward"].__setitem__("inputs", 7),
}


@pytest.mark.parametrize("edit", list(MANIFEST_EDITS))
def test_hand_edited_run_json_is_named_by_every_command(edit, run_copy, tmp_path, demo_data):
    manifest = json.loads((run_copy / "run.json").read_text())
    MANIFEST_EDITS[edit](manifest)
    (run_copy / "run.json").write_text(json.dumps(manifest))
    commands = [["status", run_copy], ["status", run_copy, "--json"], ["export", run_copy, tmp_path / "out",
                "--stage", "sft"], ["chat", run_copy, "--stage", "sft", "--prompt", "hi"], ["report", run_copy],
                ["score", run_copy, "--dataset", demo_data["pairs"], "--out", tmp_path / "s.jsonl"],
                ["ppo", "--run-dir", run_copy, "--dataset", demo_data["prompts"], *PPO_SMALL],
                ["eval", "--run-dir", run_copy, "--dataset", demo_data["prompts"]]]
    for args in commands:
        line = refused(args, "is damaged", run_copy)
        assert "run.json" in line, (args, line)


# ---- 2. inputs checked before the first write --------------------------------------------------------------------


def _chat(user="hi", assistant="hello", role="user"):
    return {"messages": [{"role": role, "content": user}, {"role": "assistant", "content": assistant}]}


def pre_begin_cases(tmp: Path, data: dict) -> dict:
    """name -> (command after `rlchat`, phrase): inputs TRL/peft would refuse only after the stage began."""
    good = [json.loads(line) for line in Path(data["sft"]).read_text().splitlines()[:40]]
    pairs = [json.loads(line) for line in Path(data["pairs"]).read_text().splitlines()[:40]]

    def sft_data(name, rows):
        return ["--dataset", write_jsonl(tmp / name, rows)]

    wizard = good[:30] + [_chat(role="wizard")] + good[30:]
    no_assistant = good[:25] + [{"messages": [{"role": "user", "content": "only a question"}]}] + good[25:]
    bad_type = good[:20] + [{"messages": []}] + good[20:]  # an empty chat: the first 8 rows alone pass
    wizard_pair = pairs[:20] + [{"prompt": [{"role": "wizard", "content": "q"}],
                                 "chosen": [{"role": "assistant", "content": "a"}],
                                 "rejected": [{"role": "assistant", "content": "b"}]}] + pairs[20:]
    prompts = [json.loads(line) for line in Path(data["prompts"]).read_text().splitlines()[:20]]
    wizard_prompt = prompts[:12] + [{"prompt": [{"role": "wizard", "content": "q"}]}] + prompts[12:]
    return {
        "sft: LoRA target module the model lacks": (["sft", "--lora-target-modules", "no_such_proj"],
                                                    "no_such_proj"),
        "sft: one of two LoRA targets is missing": (["sft", "--lora-target-modules", "q_proj,nope_proj"],
                                                   "nope_proj"),
        "sft: role 'wizard' in row 30": (["sft", *sft_data("wizard.jsonl", wizard)], "row 30"),
        "sft: a chat without an assistant turn (row 25)": (["sft", *sft_data("noa.jsonl", no_assistant)],
                                                           "no assistant turn"),
        "sft: a row of the wrong type after the first 8 (row 20)": (["sft", *sft_data("type.jsonl", bad_type)],
                                                                    "row 20"),
        "sft: max_length 1": (["sft", "--max-length", "1"], "max_length 1"),
        "sft: max_length shorter than every prompt": (["sft", "--max-length", "4"], "max_length 4"),
        "train-reward: LoRA target module the model lacks": (["train-reward", "--lora-target-modules", "xyz"],
                                                             "xyz"),
        "train-reward: role 'wizard' in pair 20": (["train-reward", "--dataset",
                                                    write_jsonl(tmp / "wp.jsonl", wizard_pair)], "wizard"),
        "ppo: response_length beyond the model's positions": (["ppo", "--response-length", "600"], "positions"),
        "ppo: max_prompt_length + response_length beyond positions": (["ppo", "--response-length", "500",
                                                                      "--max-prompt-length", "256"], "positions"),
        "ppo: LoRA target module the model lacks": (["ppo", "--lora-target-modules", "no_such_proj"],
                                                    "no_such_proj"),
        "ppo: role 'wizard' in prompt 12": (["ppo", "--dataset", write_jsonl(tmp / "wpr.jsonl", wizard_prompt)],
                                            "prompt 12"),
        "eval: role 'wizard' in prompt 12": (["eval", "--dataset", tmp / "wpr.jsonl"], "prompt 12"),
    }


def test_inputs_are_checked_before_the_first_write(finished_run, tmp_path, tiny_model, demo_data):  # noqa: F811
    """Every case: exit 2, one line, and the run directory unchanged (the sft cases use a new run directory,
    which must not even be created; the later stages a copy of the finished run, with the stage removed)."""
    cases = pre_begin_cases(tmp_path, demo_data)
    assert len(cases) >= 12
    for name, (args, phrase) in cases.items():
        command = args[0]
        if command == "sft":
            run = tmp_path / "new-run"
            full = [*args, "--run-dir", run, "--model", tiny_model, *SMALL]
            if "--dataset" not in args:
                full += ["--dataset", demo_data["sft"]]
        else:
            run = tmp_path / "run-copy"
            shutil.rmtree(run, ignore_errors=True)
            shutil.copytree(finished_run, run)
            if command == "train-reward":  # a new reward stage
                shutil.rmtree(run / "reward")
                m = json.loads((run / "run.json").read_text())
                m["stages"].pop("reward")
                (run / "run.json").write_text(json.dumps(m))
            extra = {"train-reward": SMALL, "ppo": PPO_SMALL, "eval": []}[command]
            full = [*args, "--run-dir", run, *extra]
            if "--dataset" not in args:
                full += ["--dataset", demo_data["pairs" if command == "train-reward" else "prompts"]]
        # later flags win in click: put the case's own flags last
        full = [args[0], *full[len(args):], *args[1:]]
        before = snapshot(run)
        line = one_error_line(invoke(full))
        assert phrase.lower() in line.lower(), (name, line)
        assert snapshot(run) == before, f"{name}: the run directory changed"


# ---- 3. numbers are finite and sane ------------------------------------------------------------------------------


def _numeric_fields(cls):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        if args[0] in (int, float) and args[0] is not bool:
            yield f, args[0]


def test_every_numeric_field_of_every_stage_refuses_inf_nan_and_huge_values():
    from rlchat.config import STAGE_CONFIGS, resolve
    from rlchat.errors import ConfigError

    checked = 0
    for stage, cls in STAGE_CONFIGS.items():
        for f, tp in _numeric_fields(cls):
            bad = ["inf", "-inf", "nan", float("inf"), float("nan"), "1e400", 10**30, -(10**30)]
            bad += [2**63, "99999999999999999999"] if tp is int else [1e300, -1e300]
            for value in bad:
                with pytest.raises(ConfigError) as info:
                    resolve(cls, stage, None, {"run_dir": "r", f.name: value})
                assert f.name in str(info.value), (stage, f.name, value, str(info.value))
                checked += 1
            # a negative value is either in the field's range or refused as a ConfigError, never anything else
            for value in (-1, -1.0 if tp is float else -2):
                try:
                    cfg = resolve(cls, stage, None, {"run_dir": "r", f.name: value})
                except ConfigError as err:
                    assert f.name in str(err)
                else:
                    meta = f.metadata
                    assert value in meta.get("allow", ()) or ("ge" not in meta and "gt" not in meta) or \
                        value >= meta.get("ge", -math.inf), (stage, f.name, value)
                    assert getattr(cfg, f.name) == value
    assert checked > 300


@pytest.mark.parametrize("args,phrase", [
    (["--epochs", "inf"], "epochs must be a finite number"),
    (["--lr", "inf"], "lr must be a finite number"),
    (["--lr", "nan"], "lr must be a finite number"),
    (["--lr", "5"], "lr must be at most 1"),
    (["--seed", "-1"], "seed must be in [0, 4294967295]"),
    (["--seed", "4294967296"], "seed must be in"),
    (["--max-steps", "99999999999999999999"], "max_steps must be at most"),
    (["--num-processes", "0"], "--num-processes must be between 1 and 1024"),
    (["--num-processes", "-3"], "--num-processes must be between 1 and 1024"),
])
def test_numbers_from_the_command_line(args, phrase, tmp_path, tiny_model, demo_data):
    run = tmp_path / "run"
    refused(["sft", "--run-dir", run, "--model", tiny_model, "--dataset", demo_data["sft"], *args], phrase, tmp_path)


@pytest.mark.parametrize("args,phrase", [(["--kl-coef", "inf"], "kl_coef"), (["--temperature", "nan"], "temperature"),
                                         (["--episodes", "1e30"], "episodes"), (["--gamma", "nan"], "gamma"),
                                         (["--num-processes", "0"], "--num-processes")])
def test_ppo_numbers_from_the_command_line(args, phrase, run_copy, demo_data):
    refused(["ppo", "--run-dir", run_copy, "--dataset", demo_data["prompts"], *args], phrase, run_copy)


@pytest.mark.parametrize("args,phrase", [(["--temperature", "inf"], "temperature"), (["--top-p", "nan"], "top_p"),
                                         (["--seed", "-1"], "seed"), (["--max-new-tokens", "0"], "max_new_tokens")])
def test_chat_numbers(args, phrase, run_copy):
    refused(["chat", run_copy, "--stage", "sft", "--prompt", "hi", *args], phrase, run_copy)


# ---- 4. a PPO resume compares every setting that matters -----------------------------------------------------------


@pytest.fixture(scope="module")
def interrupted_ppo(finished_run, tmp_path_factory, demo_data):  # noqa: F811
    """A copy of the finished run with a 2-step PPO stage (a checkpoint every step), marked interrupted."""
    run = tmp_path_factory.mktemp("ppo-resume") / "run"
    shutil.copytree(finished_run, run)
    res = invoke(["ppo", "--run-dir", run, "--dataset", demo_data["prompts"], *PPO_SMALL, "--save-every", "1"])
    assert res.exit_code == 0, res.output
    m = json.loads((run / "run.json").read_text())
    m["stages"]["ppo"]["status"] = "interrupted"
    (run / "run.json").write_text(json.dumps(m))
    return run


RESUME_CHANGES = {
    "lr": (["--lr", "1e-3"], "lr 5e-05 -> 0.001"),
    "lora_alpha": (["--lora-alpha", "64"], "lora_alpha 8 -> 64"),
    "lora_r": (["--lora-r", "8"], "lora_r"),
    "lora_target_modules": (["--lora-target-modules", "q_proj,v_proj"], "lora_target_modules"),
    "batch_size": (["--batch-size", "8"], "batch_size 4 -> 8"),
    "episodes": (["--episodes", "16"], "episodes 8 -> 16"),
    "kl_coef": (["--kl-coef", "0.5"], "kl_coef"),
    "ppo_epochs": (["--ppo-epochs", "2"], "ppo_epochs"),
    "response_length": (["--response-length", "16"], "response_length"),
    "seed": (["--seed", "7"], "seed"),
    "temperature": (["--temperature", "1.0"], "temperature"),
    "reward_fn_weight": (["--reward-fn-weight", "0.5"], "reward_fn_weight"),
}


def test_ppo_resume_refuses_every_changed_setting(interrupted_ppo, demo_data, tmp_path):
    base = ["ppo", "--run-dir", interrupted_ppo, "--dataset", demo_data["prompts"], *PPO_SMALL, "--save-every", "1"]
    for name, (flags, phrase) in RESUME_CHANGES.items():
        line = refused(base + flags, phrase, interrupted_ppo)
        assert "cannot resume the ppo stage" in line and "--overwrite" in line, (name, line)
        assert "interrupted run" in line, line
    # the prompts: same file name elsewhere with one row changed
    rows = Path(demo_data["prompts"]).read_text().splitlines()
    other = tmp_path / "prompts.jsonl"
    other.write_text("\n".join(rows[:-1] + [json.dumps({"prompt": "a different last prompt"})]) + "\n")
    line = refused(base[:3] + ["--dataset", other] + base[5:], "other content", interrupted_ppo)
    assert "cannot resume" in line
    # several at once: every one named
    line = refused(base + ["--lr", "1e-3", "--batch-size", "8"], "lr", interrupted_ppo)
    assert "batch_size" in line and "--lr 5e-05" in line and "--batch-size 4" in line


def test_sft_resume_refuses_a_new_lr(tmp_path, tiny_model, demo_data):
    run = tmp_path / "run"
    base = ["sft", "--run-dir", run, "--model", tiny_model, "--dataset", demo_data["sft"], *SMALL,
            "--save-steps", "1"]
    assert invoke(base).exit_code == 0
    m = json.loads((run / "run.json").read_text())
    m["stages"]["sft"]["status"] = "interrupted"
    (run / "run.json").write_text(json.dumps(m))
    for flags, phrase in ((["--lr", "1e-3"], "lr 0.0002 -> 0.001"), (["--lora-dropout", "0.3"], "lora_dropout"),
                          (["--weight-decay", "0.1"], "weight_decay")):
        refused(base + flags, phrase, run)
    # 9. the Trainer's pickled TrainingArguments are not kept in the checkpoints
    ckpts = list((run / "sft" / "checkpoints").glob("checkpoint-*"))
    assert ckpts and not [p for c in ckpts for p in c.glob("training_args.bin")]
    assert not list(run.rglob("*.bin"))


# ---- 5. nothing but a stage writes into a run ---------------------------------------------------------------------


def test_no_output_path_may_point_into_a_run(run_copy, tmp_path, tiny_model, demo_data):
    run = run_copy
    cases = [
        (["export", run, run / "sft", "--stage", "sft", "--overwrite"], "inside"),
        (["export", run, run, "--stage", "sft", "--overwrite"], "inside"),
        (["export", run, run / "exported", "--stage", "sft"], "inside"),
        (["export", run, run / "sft" / "adapter" / "x", "--stage", "sft"], "inside"),
        (["export", run, tmp_path, "--stage", "sft", "--overwrite"], "would replace"),  # holds the run
        (["score", run, "--dataset", demo_data["pairs"], "--out", run / "run.json"], "inside"),
        (["score", run, "--dataset", demo_data["pairs"], "--out", run / "reward" / "scores.jsonl"], "inside"),
        (["new-model", run / "m"], "inside"),
        (["new-model", run / "sft", "--overwrite"], "inside"),
        (["demo-data", run / "sft"], "inside"),
        (["demo-data", run], "inside"),
        (["sft", "--run-dir", run / "sft", "--model", tiny_model, "--dataset", demo_data["sft"]],
         "inside another run"),
        (["ppo", "--run-dir", run / "reward" / "nested", "--dataset", demo_data["prompts"]], "inside another run"),
    ]
    for args, phrase in cases:
        refused(args, phrase, tmp_path)


def test_report_refuses_while_another_process_holds_the_lock(run_copy):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run_copy / ".lock").write_text(json.dumps({"pid": sleeper.pid, "host": os.uname().nodename,
                                                    "stage": "ppo", "started": "2026-01-01T00:00:00Z"}))
        refused(["report", run_copy], "is in use", run_copy)
    finally:
        sleeper.kill()
        sleeper.wait()
    # the holder is gone: report takes the lock, writes, and releases it
    res = invoke(["report", run_copy])
    assert res.exit_code == 0, res.output
    assert not (run_copy / ".lock").exists()


def test_a_killed_exports_tmp_dir_is_removed_by_the_next_export(finished_run, tmp_path):  # noqa: F811
    out = tmp_path / "exported"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = tmp_path / f".exported.tmp-export-pid{dead.pid}-abc123"
    (leftover / "sub").mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"x" * 1000)
    live = tmp_path / f".exported.tmp-export-pid{os.getpid()}-def456"  # a running export: kept
    live.mkdir()
    res = invoke(["export", finished_run, out, "--stage", "sft"])
    assert res.exit_code == 0, res.output
    assert not leftover.exists() and live.exists()
    assert (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["exported", live.name])


# ---- 6. no silent wrong results -----------------------------------------------------------------------------------


def test_a_reward_model_without_a_trained_score_head_is_refused(run_copy, tiny_model, demo_data):
    refused(["ppo", "--run-dir", run_copy, "--dataset", demo_data["prompts"], *PPO_SMALL, "--reward-model",
             tiny_model], "no trained score head", run_copy)


@pytest.mark.parametrize("value", ["float('nan')", "float('inf')", "-float('inf')"])
def test_a_reward_fn_returning_non_finite_scores_at_the_check_is_refused(value, run_copy, demo_data, tmp_path):
    fn = tmp_path / "fn.py"
    fn.write_text(f"def f(prompts, completions):\n    return [{value}] * len(completions)\n")
    refused(["ppo", "--run-dir", run_copy, "--dataset", demo_data["prompts"], *PPO_SMALL, "--reward-fn",
             f"{fn}:f"], "non-finite", run_copy)


def test_a_printing_reward_fn_does_not_break_json_on_stdout(run_copy, demo_data, tmp_path):
    fn = tmp_path / "loud.py"
    fn.write_text("print('imported!')\n\ndef f(prompts, completions):\n    print('scoring', len(completions))\n"
                  "    return [1.0] * len(completions)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "rlchat", "ppo", "--run-dir", str(run_copy), "--dataset",
                           str(demo_data["prompts"]), *PPO_SMALL, "--max-steps", "1", "--reward-fn", f"{fn}:f",
                           "--json"], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    json.loads(proc.stdout)  # nothing but the JSON
    assert "imported!" in proc.stderr and "scoring" in proc.stderr


def test_a_huge_prompt_is_cut_before_it_is_tokenized(tiny_model):
    from rlchat.generation import MAX_CHARS_PER_TOKEN, encode_prompt_cut
    from rlchat.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    seen = []
    real_call = type(tok).__call__

    class Counting(type(tok)):
        def __call__(self, text, *a, **k):
            seen.append(len(text))
            return real_call(self, text, *a, **k)

    tok.__class__ = Counting
    messages = [{"role": "user", "content": "the red apple " * 2_000_000}]  # 28 MB
    ids, truncated = encode_prompt_cut(tok, messages, 256)
    assert truncated and 0 < len(ids) <= 256
    assert max(seen) <= 256 * MAX_CHARS_PER_TOKEN
    short, cut = encode_prompt_cut(tok, [{"role": "user", "content": "the red apple"}], 256)
    assert not cut and short == tok(tok.apply_chat_template([{"role": "user", "content": "the red apple"}],
                                                            add_generation_prompt=True, tokenize=False),
                                    add_special_tokens=False)["input_ids"]


# ---- 7. signals ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_ctrl_c_leave_the_stage_interrupted_and_say_so(sig, code, tmp_path, tiny_model, demo_data):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "rlchat", "sft", "--run-dir", str(run), "--model", str(tiny_model),
                             "--dataset", str(demo_data["sft"]), "--max-steps", "2000", "--save-steps", "1000",
                             "--batch-size", "2", "--eval-fraction", "0", "--lora-r", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
                            # Ctrl-C as in a terminal: a test run started in the background (`cmd &` in a script)
                            # inherits SIGINT ignored, and Python then never raises KeyboardInterrupt
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "sft" / "metrics.jsonl").exists():
        time.sleep(0.2)
    assert (run / "sft" / "metrics.jsonl").exists(), "training never started"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert err.strip().splitlines()[-1] == "interrupted: rerun the same command to resume", err
    assert "Traceback" not in err
    entry = json.loads((run / "run.json").read_text())["stages"]["sft"]
    assert entry["status"] == "interrupted" and entry["error"].startswith("interrupted")
    assert not (run / ".lock").exists()
    res = invoke(["status", run])
    assert "interrupted" in res.output


# ---- 8. messages that said the wrong thing -----------------------------------------------------------------------


def test_misleading_messages(run_copy, tmp_path, tiny_model, demo_data):
    (tmp_path / "fns").mkdir()
    refused(["ppo", "--run-dir", run_copy, "--dataset", demo_data["prompts"], "--reward-fn", f"{tmp_path}/fns:f"],
            "is a directory", run_copy)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    refused(["sft", "--run-dir", dangling, "--model", tiny_model, "--dataset", demo_data["sft"]],
            "symbolic link", tmp_path)
    shutil.rmtree(run_copy / "sft" / "tokenizer")
    line = refused(["chat", run_copy, "--stage", "sft", "--prompt", "hi"], "tokenizer directory", run_copy)
    assert "Hub id" not in line and "missing from the run directory" in line
