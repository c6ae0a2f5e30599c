"""Reliability and safety: kill -9 and resume, one writer per run directory, damaged and foreign files, a full
disk, a read-only run directory, out of memory, untrusted code.

The kill tests run the real CLI (`python -m rlchat ...`) in a subprocess on a tiny model and SIGKILL it at the
worst moments: right after a checkpoint, in the middle of writing a checkpoint's trainer_state.json or its
weights, and in the middle of writing the final outputs. The mid-write kills are exact, not timing races: the
subprocess runs the CLI through KILL_WRAPPER, which replaces one writer (TrainerState.save_to_json, the
safetensors writer) by one that writes half of the bytes and then sends SIGKILL to its own process. Every rerun
of the same command must resume from the newest COMPLETE checkpoint, take over the dead process's lock, and
finish with a consistent run directory. KILLS (module level) counts the kills each stage survived.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rlchat.cli import app
from tests.conftest import snapshot

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()
KILLS: dict[str, int] = {}  # stage -> kills survived in this session (printed by test_report_kills)

# Runs the CLI; RLCHAT_TEST_KILL="<what>:<where>" makes the process SIGKILL itself halfway through one write:
#   state:N    trainer_state.json of checkpoint-N (the Trainer writes it last)
#   weights:S  the first .safetensors file whose path contains S (a checkpoint's or a final output's weights)
KILL_WRAPPER = r"""
import dataclasses, json, os, signal, sys

def die():
    sys.stdout.flush(); sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)

what, _, where = os.environ.get("RLCHAT_TEST_KILL", "").partition(":")
if what == "state":
    from transformers import trainer_callback

    original = trainer_callback.TrainerState.save_to_json

    def save_to_json(self, path):
        if self.global_step == int(where):
            text = json.dumps(dataclasses.asdict(self), indent=2) + "\n"
            with open(path, "w") as f:
                f.write(text[: len(text) // 2])
            die()
        return original(self, path)

    trainer_callback.TrainerState.save_to_json = save_to_json
elif what == "weights":
    import safetensors.torch

    original = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):
        if where in str(filename):
            data = safetensors.torch.save(tensors, metadata=metadata)
            with open(filename, "wb") as f:
                f.write(data[: len(data) // 2])
            die()
        return original(tensors, filename, metadata=metadata)

    safetensors.torch.save_file = save_file
    import peft.peft_model  # peft imported the writer by name
    peft.peft_model.safe_save_file = save_file

from rlchat.cli import main
sys.argv = ["rlchat"] + sys.argv[1:]
main()
"""


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, demo_data) -> dict:
    """The first 200 rows of each demo file: the subprocesses tokenize their data on every start."""
    out = tmp_path_factory.mktemp("small-data")
    small = {}
    for key, path in demo_data.items():
        small[key] = out / Path(path).name
        small[key].write_text("".join(Path(path).read_text().splitlines(keepends=True)[:200]))
    return small


def env(kill: str | None = None) -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
             HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=str(REPO))
    e.pop("RLCHAT_TEST_KILL", None)
    if kill:
        e["RLCHAT_TEST_KILL"] = kill
    return e


def start(args: list, kill: str | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", KILL_WRAPPER, *map(str, args)], cwd=REPO, env=env(kill),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out + err


def run_cli(args: list, kill: str | None = None) -> tuple[int, str]:
    return finish(start(args, kill))


def complete_checkpoints(ckpt_dir: Path, pattern: str = r"checkpoint-(\d+)", state: str = "trainer_state.json"
                         ) -> list[int]:
    """Steps of the checkpoints whose state file parses (independent of rlchat's own check)."""
    steps = []
    for p in ckpt_dir.iterdir() if ckpt_dir.is_dir() else []:
        m = re.fullmatch(pattern, p.name)
        if m:
            try:
                json.loads((p / state).read_text())
            except (OSError, ValueError):
                continue
            steps.append(int(m.group(1)))
    return sorted(steps)


def kill_when(proc: subprocess.Popen, ready, timeout: float = 240) -> str:
    """SIGKILL `proc` as soon as ready() returns a truthy reason; returns it."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        reason = ready()
        if reason:
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
            return reason
        if proc.poll() is not None:
            raise AssertionError(f"the process ended (exit {proc.returncode}) before it could be killed:\n"
                                 + "".join(proc.communicate()))
        time.sleep(0.005)
    proc.kill()
    raise AssertionError("timed out waiting for the moment to kill")


def manifest(run: Path) -> dict:
    return json.loads((run / "run.json").read_text())


def assert_killed(run: Path, stage: str) -> None:
    """What a SIGKILL leaves: the manifest still parses and says running; the dead process's lock is there."""
    rec = manifest(run)["stages"][stage]
    assert rec["status"] == "running"
    assert json.loads((run / ".lock").read_text())["stage"] == stage


def assert_resumed(output: str, stage: str, expected: int | None, kind: str = "checkpoint") -> None:
    assert "took over a stale lock" in output, output[-3000:]
    if expected is None:
        assert "resuming from" not in output, output[-3000:]
    else:
        assert f"{stage}: resuming from {kind}-{expected}" in output, output[-3000:]


def assert_done(run: Path, stage: str, steps: int, metrics_file: str = "metrics.jsonl") -> dict:
    from rlchat.stages.resume import checkpoint_problem

    rec = manifest(run)["stages"][stage]
    assert rec["status"] == "done" and rec["error"] is None, rec
    assert rec["metrics"]["steps"] == steps
    assert not (run / ".lock").exists()
    stage_dir = run / stage
    leftovers = [p.name for p in stage_dir.rglob(".*") if ".tmp" in p.name or ".old-" in p.name]
    assert not leftovers, leftovers
    # every training step logged once: the rows the killed runs logged after their checkpoint were dropped
    rows = [json.loads(line) for line in (stage_dir / metrics_file).read_text().splitlines()]
    logged = [r["step"] for r in rows if "loss" in r or "objective/scores" in r]
    assert len(logged) == len(set(logged)), logged
    for rel in (rec["outputs"].get("adapter"), rec["outputs"].get("policy")):
        if rel:
            from rlchat.models import safetensors_problem

            for f in (run / rel).glob("*.safetensors"):
                assert safetensors_problem(f) is None, f
    if stage in ("sft", "reward"):
        for ckpt in (stage_dir / "checkpoints").glob("checkpoint-*"):
            assert checkpoint_problem(ckpt) is None, ckpt
    return rec


# ---- kill and resume: sft -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sft_survives_kills_and_resumes(tmp_path, tiny_model, small_data):
    run = tmp_path / "run"
    ckpt = run / "sft" / "checkpoints"
    cmd = ["sft", "--run-dir", run, "--model", tiny_model, "--dataset", small_data["sft"], "--max-steps", "12",
           "--save-steps", "3", "--batch-size", "4", "--eval-fraction", "0.01", "--logging-steps", "1",
           "--lora-r", "4", "--lora-alpha", "8"]
    kills = 0

    # 1. an outside SIGKILL as soon as a checkpoint is complete (or caught half-written, if the poll sees that)
    proc = start(cmd)

    def checkpoint_seen():
        if not ckpt.is_dir():
            return None
        for p in ckpt.glob("checkpoint-*"):
            if not (p / "trainer_state.json").exists():
                return f"mid-write {p.name}"
            if complete_checkpoints(ckpt):
                return f"after {p.name}"
        return None

    kill_when(proc, checkpoint_seen)
    kills += 1
    assert_killed(run, "sft")
    done = complete_checkpoints(ckpt)
    e = done[-1] if done else 0  # 3 nearly always; 0 if the poll caught checkpoint-3 half-written
    assert e <= 6

    # 2. rerun, killed halfway through the trainer_state.json of the next checkpoint
    code, out = run_cli(cmd, kill=f"state:{e + 3}")
    assert code == -signal.SIGKILL, out[-3000:]
    kills += 1
    assert_resumed(out, "sft", e or None)
    with pytest.raises(ValueError):
        json.loads((ckpt / f"checkpoint-{e + 3}" / "trainer_state.json").read_text())  # cut in half

    # 3. rerun: must skip the cut checkpoint and resume from the one before; killed halfway through the weights
    #    of the checkpoint after
    code, out = run_cli(cmd, kill=f"weights:checkpoint-{e + 6}")
    assert code == -signal.SIGKILL, out[-3000:]
    kills += 1
    assert_resumed(out, "sft", e or None)
    assert json.loads((ckpt / f"checkpoint-{e + 3}" / "trainer_state.json").read_text())["global_step"] == e + 3
    assert not (ckpt / f"checkpoint-{e + 6}" / "trainer_state.json").exists()

    # 4. rerun: resumes from e + 3, trains to 12, killed halfway through writing the final adapter
    code, out = run_cli(cmd, kill="weights:.adapter.tmp-")
    assert code == -signal.SIGKILL, out[-3000:]
    kills += 1
    assert_resumed(out, "sft", e + 3)
    assert not (run / "sft" / "adapter").exists() and list((run / "sft").glob(".adapter.tmp-*"))

    # 5. rerun: resumes from the last checkpoint (12) and writes the outputs; everything consistent
    code, out = run_cli(cmd)
    assert code == 0, out[-3000:]
    assert_resumed(out, "sft", 12)
    rec = assert_done(run, "sft", 12)
    assert rec["metrics"]["resumed_from"] == "checkpoint-12" and rec["resumed"] is True
    assert rec["metrics"]["eval_loss"] is not None and rec["metrics"]["eval_loss_before"] is not None
    KILLS["sft"] = KILLS.get("sft", 0) + kills

    # the finished stage is still protected
    code, out = run_cli(cmd)
    assert code == 2 and "already finished" in out


# ---- kill and resume: train-reward ----------------------------------------------------------------------------


@pytest.mark.slow
def test_reward_survives_kills_and_resumes(tmp_path, tiny_model, small_data):
    run = tmp_path / "run"
    ckpt = run / "reward" / "checkpoints"
    cmd = ["train-reward", "--run-dir", run, "--model", tiny_model, "--dataset", small_data["pairs"], "--max-steps",
           "9", "--save-steps", "3", "--batch-size", "4", "--eval-fraction", "0.01", "--logging-steps", "1",
           "--lora-r", "4", "--lora-alpha", "8", "--max-length", "64"]
    kills = 0

    proc = start(cmd)
    kill_when(proc, lambda: bool(complete_checkpoints(ckpt)))
    kills += 1
    assert_killed(run, "reward")
    e = complete_checkpoints(ckpt)[-1]
    assert e <= 6

    code, out = run_cli(cmd, kill=f"state:{e + 3}")
    assert code == -signal.SIGKILL, out[-3000:]
    kills += 1
    assert_resumed(out, "reward", e)

    code, out = run_cli(cmd, kill="weights:.adapter.tmp-")
    assert code == -signal.SIGKILL, out[-3000:]
    kills += 1
    assert_resumed(out, "reward", e)  # checkpoint e + 3 was cut: back to e

    code, out = run_cli(cmd)
    assert code == 0, out[-3000:]
    assert_resumed(out, "reward", 9)
    rec = assert_done(run, "reward", 9)
    assert (run / "reward" / "reward_stats.json").is_file()
    assert rec["metrics"]["resumed_from"] == "checkpoint-9"
    KILLS["reward"] = KILLS.get("reward", 0) + kills


# ---- kill and resume: ppo -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ppo_survives_kills_and_resumes(tmp_path, tiny_model, small_data):
    run = tmp_path / "run"
    ckpt = run / "ppo" / "checkpoints"
    cmd = ["ppo", "--run-dir", run, "--model", tiny_model, "--dataset", small_data["prompts"], "--reward-fn",
           "rlchat.demo.task:judge", "--episodes", "32", "--batch-size", "4", "--ppo-epochs", "1", "--save-every",
           "2", "--response-length", "8", "--lora-r", "4", "--lora-alpha", "8", "--sample-every", "1"]
    kills = 0

    def step_checkpoints():
        return complete_checkpoints(ckpt, r"step-(\d+)", "state.json")

    proc = start(cmd)
    kill_when(proc, lambda: bool(step_checkpoints()))
    kills += 1
    assert_killed(run, "ppo")
    e = step_checkpoints()[-1]
    assert e <= 4

    # halfway through the policy weights of the next checkpoint (written into a tmp dir, renamed when complete)
    code, out = run_cli(cmd, kill=f"weights:.step-{e + 2}.tmp-")
    assert code == -signal.SIGKILL, out[-3000:]
    kills += 1
    assert_resumed(out, "ppo", e, kind="step")
    assert step_checkpoints()[-1] == e

    code, out = run_cli(cmd)
    assert code == 0, out[-3000:]
    assert_resumed(out, "ppo", e, kind="step")
    leftovers = [p.name for p in (run / "ppo").rglob(".*") if ".tmp" in p.name]
    for p in (run / "ppo" / "checkpoints").glob(".*"):
        shutil.rmtree(p)  # checked below, after everything else
    rec = assert_done(run, "ppo", 8)
    assert rec["metrics"]["episodes"] == 32
    samples = [json.loads(line)["step"] for line in (run / "ppo" / "samples.jsonl").read_text().splitlines()]
    assert sorted(set(samples)) == list(range(1, 9)), samples  # no step missing
    assert len(samples) == 8 * 4, samples  # none logged twice by the killed runs
    KILLS["ppo"] = KILLS.get("ppo", 0) + kills
    assert not leftovers, f"ppo left the tmp dir of a checkpoint killed mid-write: {leftovers}"


@pytest.mark.slow
def test_report_kills():
    """Prints the kills survived (run after the kill tests; -s shows it)."""
    print(f"\nkills survived: {KILLS}")


# ---- one writer per run directory ------------------------------------------------------------------------------


@pytest.mark.slow
def test_second_writer_is_refused_with_the_holder_named(tmp_path, tiny_model, small_data):
    run = tmp_path / "run"
    writer = start(["sft", "--run-dir", run, "--model", tiny_model, "--dataset", small_data["sft"], "--max-steps",
                    "100000", "--save-steps", "100000", "--batch-size", "2", "--eval-fraction", "0"])
    try:
        def training():
            try:
                return manifest(run)["stages"]["sft"]["status"] == "running"
            except (OSError, ValueError, KeyError):
                return False

        t0 = time.time()
        while not training():
            assert writer.poll() is None, finish(writer)[1][-3000:]
            assert time.time() - t0 < 120
            time.sleep(0.05)
        before = (run / ".lock").read_text()
        # a second writer: another stage, and the same stage again
        others = [start(args) for args in (  # at the same time: startup is most of their run time
            ["train-reward", "--run-dir", run, "--dataset", small_data["pairs"]],
            ["sft", "--run-dir", run, "--model", tiny_model, "--dataset", small_data["sft"], "--overwrite"])]
        for proc in others:
            code, out = finish(proc)
            assert code == 2, out[-3000:]
            assert "Traceback" not in out
            line = next(x for x in out.splitlines() if x.startswith("error:"))
            assert f"pid {writer.pid}" in line and socket.gethostname() in line and "stage 'sft'" in line, line
            assert (run / ".lock").read_text() == before
        assert writer.poll() is None  # the first writer kept going
    finally:
        writer.kill()
        writer.communicate()


def test_stale_lock_of_a_reused_pid_is_taken_over(tmp_path):
    """A lock whose pid is alive but belongs to a newer process (pid reuse) is stale."""
    from rlchat.pids import pid_start as _pid_start
    from rlchat.rundir import RunDir

    if _pid_start(os.getpid()) is None:
        pytest.skip("no /proc: process start times unknown")
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    live = os.getppid()
    (run.path / ".lock").write_text(json.dumps({"pid": live, "host": socket.gethostname(), "stage": "sft",
                                                "started": "2026-01-01T00:00:00Z", "pid_start": "1"}))
    message = run.lock("reward")
    assert message and "stale lock" in message and f"pid {live}" in message
    assert run.holds_lock()
    run.unlock()
    # the same pid with its real start time is a live holder
    (run.path / ".lock").write_text(json.dumps({"pid": live, "host": socket.gethostname(), "stage": "sft",
                                                "started": "2026-01-01T00:00:00Z", "pid_start": _pid_start(live)}))
    from rlchat.errors import RunDirError

    with pytest.raises(RunDirError, match="in use"):
        run.lock("reward")


# ---- damaged checkpoints and leftovers -------------------------------------------------------------------------


def _fake_checkpoint(path: Path, step: int, good_weights: bytes) -> None:
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(good_weights)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))


def test_last_complete_checkpoint_skips_damaged_ones(tmp_path, tiny_model):
    from rlchat.stages.resume import checkpoint_problem, last_complete_checkpoint

    weights = (tiny_model / "model.safetensors").read_bytes()
    ckpt = tmp_path / "checkpoints"
    _fake_checkpoint(ckpt / "checkpoint-2", 2, weights)
    _fake_checkpoint(ckpt / "checkpoint-4", 4, weights[: len(weights) // 3])        # weights cut short
    _fake_checkpoint(ckpt / "checkpoint-6", 6, weights)
    (ckpt / "checkpoint-6" / "optimizer.pt").write_bytes(b"PK\x03\x04 cut")          # optimizer cut short
    _fake_checkpoint(ckpt / "checkpoint-8", 8, weights)
    (ckpt / "checkpoint-8" / "trainer_state.json").write_text('{"global_step": 8, "log_hi')  # state cut short
    (ckpt / "checkpoint-10").mkdir()                                                  # nothing written yet
    assert "cut short" in checkpoint_problem(ckpt / "checkpoint-4")
    assert "optimizer.pt" in checkpoint_problem(ckpt / "checkpoint-6")
    assert last_complete_checkpoint(ckpt) == ckpt / "checkpoint-2"


def test_prepare_resume_cleans_leftovers_and_metrics(tmp_path, tiny_model):
    from rlchat.stages.resume import prepare_resume

    weights = (tiny_model / "model.safetensors").read_bytes()
    stage = tmp_path / "sft"
    ckpt = stage / "checkpoints"
    _fake_checkpoint(ckpt / "checkpoint-3", 3, weights)
    (ckpt / "checkpoint-6").mkdir()
    (stage / ".adapter.tmp-abc").mkdir()
    (stage / ".metrics.jsonl.x1.tmp").write_text("")
    rows = [{"step": 0, "eval_loss": 5}, {"step": 1, "loss": 4}, {"step": 3, "loss": 3}, {"step": 4, "loss": 2}]
    (stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "lo')
    prepare_resume(stage, ckpt / "checkpoint-3")
    assert sorted(p.name for p in stage.iterdir()) == ["checkpoints", "metrics.jsonl"]
    assert [p.name for p in ckpt.iterdir()] == ["checkpoint-3"]
    assert [json.loads(x)["step"] for x in (stage / "metrics.jsonl").read_text().splitlines()] == [0, 1, 3]
    prepare_resume(stage, None)  # starting over: the old rows go
    assert not (stage / "metrics.jsonl").exists()


def test_begin_stage_removes_manifest_tmp_files_of_a_killed_writer(tmp_path):
    from rlchat.rundir import RunDir

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    (run.path / ".run.json.k1ll3d.tmp").write_text('{"stages": {')
    run.begin_stage("sft", config={}, inputs={}, parent=None, overwrite=False)
    assert not list(run.path.glob(".run.json.*.tmp"))
    run.finish_stage("sft", metrics={}, outputs={})


def test_resume_from_the_final_checkpoint_trains_no_extra_step(tmp_path, tiny_model, small_data, one_thread):
    """transformers 5 trains one step past max_steps when resumed from a checkpoint AT max_steps (the kill came
    while the outputs were written); rlchat restores that checkpoint without training instead."""
    run = tmp_path / "run"
    args = ["sft", "--run-dir", str(run), "--model", str(tiny_model), "--dataset", str(small_data["sft"]),
            "--max-steps", "2", "--save-steps", "2", "--batch-size", "2", "--eval-fraction", "0", "--logging-steps",
            "1", "--lora-r", "4", "--lora-alpha", "8"]
    assert runner.invoke(app, args).exit_code == 0
    adapter = (run / "sft" / "adapter" / "adapter_model.safetensors").read_bytes()
    data = manifest(run)
    data["stages"]["sft"]["status"] = "running"  # as a SIGKILL during the output writes leaves it
    (run / "run.json").write_text(json.dumps(data))
    shutil.rmtree(run / "sft" / "adapter")
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "resuming from checkpoint-2" in res.output
    rec = manifest(run)["stages"]["sft"]
    assert rec["metrics"]["steps"] == 2 and rec["status"] == "done"
    assert not (run / "sft" / "checkpoints" / "checkpoint-3").exists()
    assert (run / "sft" / "adapter" / "adapter_model.safetensors").read_bytes() == adapter


def test_ppo_resume_skips_or_names_a_damaged_checkpoint(tmp_path, tiny_model, small_data, one_thread):
    """A step-N checkpoint damaged after it was written: cut-short weights are skipped (the one before is used);
    damage found only while loading (the optimizer) is a one-line RunDirError naming the checkpoint."""
    run = tmp_path / "run"
    ckpt = run / "ppo" / "checkpoints"
    args = ["ppo", "--run-dir", str(run), "--model", str(tiny_model), "--dataset", str(small_data["prompts"]),
            "--reward-fn", "rlchat.demo.task:judge", "--episodes", "12", "--batch-size", "4", "--ppo-epochs", "1",
            "--save-every", "1", "--response-length", "4", "--lora-r", "4", "--lora-alpha", "8"]

    def as_killed():
        data = manifest(run)
        data["stages"]["ppo"]["status"] = "failed"
        (run / "run.json").write_text(json.dumps(data))

    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-1", "step-2"]  # none at the last step (3)
    as_killed()
    weights = ckpt / "step-2" / "policy" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "resuming from step-1" in res.output
    assert manifest(run)["stages"]["ppo"]["metrics"]["resumed_from"] == "step-1"
    rows = [json.loads(line)["step"] for line in (run / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert rows == sorted(set(rows)), rows  # nothing logged twice

    as_killed()
    optimizer = ckpt / "step-2" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])
    res = runner.invoke(app, args)
    assert res.exit_code != 0
    out = " ".join(res.output.split())
    assert "cannot resume from" in out and "step-2" in out and "--overwrite" in out, res.output
    assert "Traceback" not in res.output


def test_only_a_killed_checkpoint_write_means_a_fresh_start(tmp_path):
    """A stage killed while writing its first checkpoint (atomic: only a hidden tmp dir exists) starts afresh, so
    nothing the killed run logged survives; a complete checkpoint means resume."""
    from rlchat.rundir import RunDir

    run = RunDir(tmp_path / "run")
    stage_dir = run.begin_stage("ppo", config={}, inputs={}, parent=None, overwrite=False)
    (stage_dir / "checkpoints" / ".step-2.tmp-k1ll3d").mkdir(parents=True)
    assert run.check_can_start("ppo", overwrite=False) == "new"
    (stage_dir / "checkpoints" / "step-2").mkdir()
    assert run.check_can_start("ppo", overwrite=False) == "resume"
    run.fail_stage("ppo", "killed")


def test_safetensors_problem(tmp_path, tiny_model):
    from rlchat.models import safetensors_problem

    good = (tiny_model / "model.safetensors").read_bytes()
    cases = {"whole": good, "cut": good[:-1], "header only": good[:100], "empty": b"", "trailing": good + b"x",
             "not safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!"}
    found = {}
    for name, data in cases.items():
        (tmp_path / f"{name}.safetensors").write_bytes(data)
        found[name] = safetensors_problem(tmp_path / f"{name}.safetensors")
    assert found["whole"] is None
    assert all(found[k] for k in cases if k != "whole"), found


def test_corrupt_manifest_is_reported_and_kept(tmp_path, tiny_model, small_data):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text('{"stages": {"sft": {"status": "runn')
    before = snapshot(run)
    res = runner.invoke(app, ["sft", "--run-dir", str(run), "--model", str(tiny_model), "--dataset",
                              str(small_data["sft"])])
    assert res.exit_code == 2 and "run.json is not valid JSON" in res.output and "Traceback" not in res.output
    assert snapshot(run) == before


# ---- resources: full disk, read-only run directory, out of memory -------------------------------------------------


def _mount(*args) -> bool:
    if not shutil.which("mount") or os.geteuid() != 0:
        return False
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture()
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_full_disk_keeps_the_last_checkpoint_and_resumes(tmp_path, tiny_model, small_data, monkeypatch, one_thread):
    """A real ENOSPC (a small tmpfs filled after the first checkpoint): one-line error, checkpoint intact,
    manifest still valid JSON; with space freed, the same command resumes and finishes."""
    from transformers import trainer_callback

    disk = tmp_path / "disk"
    disk.mkdir()
    if not _mount("-t", "tmpfs", "-o", "size=48m", "tmpfs", str(disk)):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        run = disk / "run"
        filler = disk / "filler"
        original = trainer_callback.TrainerState.save_to_json

        def save_then_fill(self, path):
            original(self, path)
            if self.global_step == 2 and not filler.exists():
                with open(filler, "wb") as f:  # use up the rest of the disk
                    try:
                        while True:
                            f.write(b"\0" * (1 << 20))
                            f.flush()
                    except OSError:
                        pass

        monkeypatch.setattr(trainer_callback.TrainerState, "save_to_json", save_then_fill)
        args = ["sft", "--run-dir", str(run), "--model", str(tiny_model), "--dataset", str(small_data["sft"]),
                "--max-steps", "6", "--save-steps", "2", "--batch-size", "4", "--eval-fraction", "0",
                "--logging-steps", "1", "--lora-r", "4", "--lora-alpha", "8"]
        res = runner.invoke(app, args)
        assert res.exit_code == 2, res.output
        assert "Traceback" not in res.output
        errors = [line for line in res.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "no space left on device" in errors[0], res.output
        assert "resumes" in errors[0]
        from rlchat.stages.resume import checkpoint_problem

        assert checkpoint_problem(run / "sft" / "checkpoints" / "checkpoint-2") is None
        assert manifest(run)["stages"]["sft"]["status"] in ("running", "failed")  # still valid JSON
        assert not (run / ".lock").exists()

        filler.unlink()
        monkeypatch.undo()
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
        assert "resuming from checkpoint-2" in res.output
        assert_done(run, "sft", 6)
    finally:
        _umount(disk)


@pytest.mark.parametrize("how", ["mount", "patched"])
def test_read_only_run_directory(how, tmp_path, tiny_model, small_data, monkeypatch, one_thread):
    """train-reward into a read-only run directory: one-line error, nothing changed. "mount" uses a read-only
    bind mount (root ignores file modes); "patched" makes every write below the run directory fail with EROFS."""
    src = tmp_path / "src"
    res = runner.invoke(app, ["sft", "--run-dir", str(src), "--model", str(tiny_model), "--dataset",
                              str(small_data["sft"]), "--max-steps", "1", "--batch-size", "2", "--eval-fraction",
                              "0", "--lora-r", "4", "--lora-alpha", "8"])
    assert res.exit_code == 0, res.output
    run = tmp_path / "run"
    shutil.copytree(src, run)
    before = snapshot(run)
    if how == "mount":
        if not (_mount("--bind", str(run), str(run)) and _mount("-o", "remount,ro,bind", str(run))):
            _umount(run)
            pytest.skip("cannot make a read-only bind mount here (needs root)")
    else:
        real_open, real_mkdir = os.open, os.mkdir
        inside = str(run.resolve())

        def deny(path):
            if str(Path(path).resolve()).startswith(inside):
                raise OSError(errno.EROFS, "Read-only file system", str(path))

        def fake_open(path, flags, *args, **kwargs):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                deny(path)
            return real_open(path, flags, *args, **kwargs)

        def fake_mkdir(path, *args, **kwargs):
            deny(path)
            return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(os, "open", fake_open)
        monkeypatch.setattr(os, "mkdir", fake_mkdir)
    try:
        res = runner.invoke(app, ["train-reward", "--run-dir", str(run), "--dataset", str(small_data["pairs"]),
                                  "--max-steps", "1", "--batch-size", "2"])
    finally:
        monkeypatch.undo()
        if how == "mount":
            _umount(run)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "read-only file system" in errors[0], res.output
    assert snapshot(run) == before


def test_oom_guard_converts_only_out_of_memory():
    import torch

    from rlchat.stages.common import OutOfMemory, is_oom, oom_guard

    for err in (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                RuntimeError("CUDA error: out of memory"), MemoryError()):
        assert is_oom(err)
        with pytest.raises(OutOfMemory) as info:
            with oom_guard("ppo"):
                raise err
        line = str(info.value)
        assert "ppo ran out of memory" in line and "--response-length" in line and "--gradient-checkpointing" in line
        assert "\n" not in line
    with pytest.raises(ValueError):
        with oom_guard("sft"):
            raise ValueError("not memory")
    assert not is_oom(RuntimeError("shape mismatch"))


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_out_of_memory_in_training_is_one_line_naming_the_knobs(stage, tmp_path, tiny_model, small_data,
                                                                monkeypatch, one_thread):
    import torch
    import trl

    trainer = trl.SFTTrainer if stage == "sft" else trl.RewardTrainer

    def train(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.1 GiB total)")

    monkeypatch.setattr(trainer, "train", train)
    run = tmp_path / "run"
    command, data = ("sft", small_data["sft"]) if stage == "sft" else ("train-reward", small_data["pairs"])
    res = runner.invoke(app, [command, "--run-dir", str(run), "--model", str(tiny_model), "--dataset", str(data),
                              "--max-steps", "1", "--batch-size", "2", "--lora-r", "4", "--lora-alpha", "8"])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    line = next(x for x in res.output.splitlines() if x.startswith("error:"))
    for word in ("ran out of memory", "--batch-size", "--grad-accum", "--max-length", "--gradient-checkpointing"):
        assert word in line, line
    rec = manifest(run)["stages"][stage]
    assert rec["status"] == "failed" and "out of memory" in rec["error"]
    assert not (run / ".lock").exists()


# ---- untrusted code and data -------------------------------------------------------------------------------------


def _code_dir(tmp_path: Path, tiny_model: Path, model_type: str, marker: Path) -> Path:
    model = tmp_path / f"model-{model_type}"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoConfig": "configuration_x.XConfig",
                                                   "AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    (model / "config.json").write_text(json.dumps(config))
    tok = json.loads((model / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": ["tokenization_x.XTokenizer", None]}
    (model / "tokenizer_config.json").write_text(json.dumps(tok))
    for name in ("configuration_x", "modeling_x", "tokenization_x"):
        (model / f"{name}.py").write_text(f"open({str(marker)!r}, 'a').write({name!r})\n")
    return model


def test_model_code_never_runs_without_trust_remote_code(tmp_path, tiny_model):
    from rlchat import models
    from rlchat.errors import ModelError

    marker = tmp_path / "code-ran"
    custom = _code_dir(tmp_path, tiny_model, "rlchat_custom", marker)
    with pytest.raises(ModelError, match="trust-remote-code"):
        models.load_causal_lm(str(custom))
    with pytest.raises(ModelError, match="trust-remote-code"):
        models.load_tokenizer(str(custom))
    # a model type transformers knows, with an auto_map on top: the built-in classes load, the code never runs
    known = _code_dir(tmp_path, tiny_model, "llama", marker)
    models.load_causal_lm(str(known))
    try:
        models.load_tokenizer(str(known))
    except ModelError:
        pass  # refusing is fine too; running the code is not
    assert not marker.exists(), marker.read_text()


def test_bin_only_weights_are_refused(tmp_path, tiny_model):
    from rlchat import models
    from rlchat.errors import ModelError

    model = tmp_path / "bin"
    shutil.copytree(tiny_model, model)
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_bytes(b"\x80\x04 a pickle would run code here")
    with pytest.raises(ModelError, match="safetensors only"):
        models.load_causal_lm(str(model))


def test_every_torch_load_uses_weights_only():
    """torch.load unpickles; with weights_only=True it only rebuilds tensors and plain containers."""
    offenders = []
    files = []
    for root, dirs, names in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("node_modules", "site-packages", "build")]
        files += [Path(root) / n for n in names if n.endswith(".py")]
    for path in files:
        if path == Path(__file__).resolve():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for m in re.finditer(r"torch\.load\(", text):
            call = text[m.start(): text.find(")", m.end()) + 1]
            if "weights_only=True" not in call:
                offenders.append(f"{path.relative_to(REPO)}: {call}")
    assert not offenders, offenders


def _user_files(tmp_path: Path) -> tuple[Path, Path]:
    folder = tmp_path / "user"
    folder.mkdir()
    marker = tmp_path / "imported"
    (folder / "myjudge.py").write_text("def judge(prompts, completions):\n    return [0.0] * len(completions)\n")
    for name in ("helper", "rlchat_shadow_probe"):
        (folder / f"{name}.py").write_text(f"open({str(marker)!r}, 'a').write({name!r})\n")
    return folder, marker


def test_judge_file_path_imports_that_file_only(tmp_path):
    from rlchat.rewards import load_judge

    folder, marker = _user_files(tmp_path)
    before = set(sys.modules)
    fn = load_judge(f"{folder / 'myjudge.py'}:judge")
    assert fn(["p"], ["c"]) == [0.0]
    user = [m for m in set(sys.modules) - before
            if str(folder) in str(getattr(sys.modules[m], "__file__", None) or "")]
    assert user and all("myjudge" in m for m in user), user
    assert str(folder) not in sys.path
    assert not marker.exists()


def test_dotted_reward_fn_imports_only_the_named_module(tmp_path, monkeypatch):
    from rlchat.rewards import load_reward_fn

    folder, marker = _user_files(tmp_path)
    monkeypatch.chdir(folder)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(folder))])
    load_reward_fn("myjudge:judge")
    assert not marker.exists()
    sys.modules.pop("myjudge", None)


def test_dotted_reward_fn_leaves_no_user_directory_on_the_import_path(tmp_path, monkeypatch):
    from rlchat.rewards import load_reward_fn

    folder, marker = _user_files(tmp_path)
    monkeypatch.chdir(folder)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(folder))])
    load_reward_fn("myjudge:judge")
    sys.modules.pop("myjudge", None)
    with pytest.raises(ModuleNotFoundError):
        __import__("rlchat_shadow_probe")  # a later import must not find a stray file in the user's directory
    assert not marker.exists()


def test_manifest_paths_cannot_leave_the_run_directory(tmp_path, tiny_model):
    """run.json records output paths relative to RUN; one that points elsewhere is refused before any read."""
    from rlchat import run_models
    from rlchat.errors import RunDirError

    run = tmp_path / "run"
    (run / "sft").mkdir(parents=True)
    entry = {"status": "done", "outputs": {"kind": "lora", "adapter": "../../../etc", "tokenizer": "sft/tokenizer",
                                           "base_model": str(tiny_model)}, "config": {}}
    (run / "run.json").write_text(json.dumps({"stages": {"sft": entry}}))
    with pytest.raises(RunDirError, match="outside the run directory"):
        run_models.load_sft_policy(run)
    entry["outputs"].update(adapter="sft/adapter", tokenizer="/etc")
    (run / "run.json").write_text(json.dumps({"stages": {"sft": entry}}))
    with pytest.raises(RunDirError, match="outside the run directory"):
        run_models.load_sft_policy(run)


def test_trainer_outputs_stay_inside_the_stage_directory(tmp_path, monkeypatch):
    from rlchat.config import SFTConfig
    from rlchat.stages.common import trainer_args

    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    out = tmp_path / "run" / "sft" / "checkpoints"
    for report_to in ("tensorboard", "wandb"):
        args = trainer_args(SFTConfig(run_dir=str(tmp_path / "run"), report_to=report_to), out, has_eval=False)
        assert Path(args["output_dir"]) == out
        assert "logging_dir" not in args  # transformers 5's TrainingArguments has none (a TypeError)
    # transformers' TensorBoardCallback reads this variable (tests/test_artifacts.py reads the event files back)
    assert Path(os.environ["TENSORBOARD_LOGGING_DIR"]).parent == out.parent
    assert Path(os.environ["WANDB_DIR"]) == out.parent
