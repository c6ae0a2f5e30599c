"""Run directory: atomic writes, manifest lifecycle, lock, hashes, status rows. Fast, no torch."""
from __future__ import annotations

import errno
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from rlchat import rundir as rd
from rlchat.errors import RunDirError
from rlchat.rundir import RunDir
from rlchat.fileio import append_jsonl, atomic_dir, atomic_write_json, atomic_write_text, content_hash, input_record
from rlchat.status import summary_rows


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# ---- atomic writes ---------------------------------------------------------------------------------------------


def test_atomic_write_replaces_and_creates_parents(tmp_path):
    target = tmp_path / "a" / "b.json"
    atomic_write_json(target, {"x": 1, "p": Path("/tmp")})
    assert json.loads(target.read_text()) == {"x": 1, "p": "/tmp"}
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert _leftovers(target.parent) == []


@pytest.mark.parametrize("broken", ["replace", "fsync"])
def test_atomic_write_failure_keeps_old_file(tmp_path, monkeypatch, broken):
    target = tmp_path / "run.json"
    target.write_text("old")
    monkeypatch.setattr(os, broken, _enospc)
    with pytest.raises(RunDirError) as err:
        atomic_write_text(target, "new")
    monkeypatch.undo()
    assert f"could not write {target}: no space left on device" in str(err.value)
    assert "Fix:" in str(err.value)
    assert target.read_text() == "old"
    assert _leftovers(tmp_path) == []  # the tmp file is gone


def test_atomic_dir_creates_replaces_and_cleans_up(tmp_path):
    final = tmp_path / "adapter"
    with atomic_dir(final) as tmp:
        assert tmp.parent == tmp_path and tmp != final
        (tmp / "weights").write_text("v1")
    assert (final / "weights").read_text() == "v1"

    with atomic_dir(final) as tmp:
        (tmp / "weights2").write_text("v2")
    assert sorted(p.name for p in final.iterdir()) == ["weights2"]  # old content fully replaced
    assert _leftovers(tmp_path) == []

    with pytest.raises(KeyError):
        with atomic_dir(final) as tmp:
            (tmp / "half").write_text("x")
            raise KeyError("boom")
    assert sorted(p.name for p in final.iterdir()) == ["weights2"]
    assert _leftovers(tmp_path) == []


def test_atomic_dir_failed_rename_restores_old(tmp_path, monkeypatch):
    final = tmp_path / "adapter"
    final.mkdir()
    (final / "w").write_text("old")
    real_rename = os.rename

    def rename(src, dst):
        if Path(src).name.startswith(".adapter.tmp-"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(RunDirError, match="no space left on device"):
        with atomic_dir(final) as tmp:
            (tmp / "w").write_text("new")
    monkeypatch.undo()
    assert (final / "w").read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_append_jsonl(tmp_path):
    path = tmp_path / "sft" / "metrics.jsonl"
    append_jsonl(path, {"step": 1, "loss": 2.5})
    append_jsonl(path, {"step": 2, "loss": 2.0})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.0}]


# ---- manifest lifecycle ----------------------------------------------------------------------------------------


def test_new_rundir_touches_nothing(tmp_path):
    run = RunDir(tmp_path / "run")
    assert not run.exists()
    assert run.manifest()["stages"] == {}
    assert run.record("sft") is None
    assert run.check_can_start("sft", overwrite=False) == "new"
    assert not run.path.exists()


def test_begin_finish_lifecycle(tmp_path):
    run = RunDir(tmp_path / "run")
    out = run.begin_stage("sft", {"lr": 0.1}, {"dataset": {"spec": "x", "kind": "hub"}}, None, overwrite=False)
    assert out == run.path / "sft" and out.is_dir()
    lock = json.loads(run.lock_path.read_text())
    assert lock["pid"] == os.getpid() and lock["stage"] == "sft" and lock["host"] == socket.gethostname()

    rec = run.record("sft")
    assert rec["status"] == "running" and rec["config"] == {"lr": 0.1} and rec["parent"] is None
    assert rec["started"].endswith("Z") and rec["ended"] is None
    assert set(rec["versions"]) == {"python", "torch", "transformers", "trl", "peft", "accelerate", "datasets"}
    manifest = run.manifest()
    assert manifest["rlchat_version"] and manifest["created"]

    run.finish_stage("sft", {"eval_loss": 1.25}, {"adapter": "."})
    rec = run.record("sft")
    assert rec["status"] == "done" and rec["metrics"] == {"eval_loss": 1.25} and rec["outputs"] == {"adapter": "."}
    assert rec["ended"] and rec["wall_s"] >= 0 and rec["error"] is None
    assert not run.lock_path.exists()
    assert run.require_done("sft", "run `rlchat sft` first") is not None
    assert _leftovers(run.path) == []  # no tmp files, no lock


def test_fail_stage_and_require_done(tmp_path):
    run = RunDir(tmp_path)
    with pytest.raises(RunDirError, match="stage 'sft' has not run.*Fix: run `rlchat sft` first"):
        run.require_done("sft", "run `rlchat sft` first")
    run.begin_stage("sft", {}, {}, None, overwrite=False)
    run.fail_stage("sft", "CUDA out of memory")
    rec = run.record("sft")
    assert rec["status"] == "failed" and rec["error"] == "CUDA out of memory" and rec["ended"]
    assert not run.lock_path.exists()
    with pytest.raises(RunDirError, match="is failed \\(CUDA out of memory\\), not done"):
        run.require_done("sft", "rerun sft")
    # no checkpoints: a failed stage starts over
    assert run.check_can_start("sft", overwrite=False) == "new"


def test_refuses_finished_stage_without_overwrite(tmp_path):
    run = RunDir(tmp_path / "run")
    run.begin_stage("sft", {}, {}, None, overwrite=False)
    run.finish_stage("sft", {}, {})
    with pytest.raises(RunDirError) as err:
        run.check_can_start("sft", overwrite=False)
    msg = str(err.value)
    assert f"stage 'sft' already finished in {run.path}" in msg and "--overwrite" in msg and "deletes" in msg
    with pytest.raises(RunDirError, match="already finished"):
        run.begin_stage("sft", {}, {}, None, overwrite=False)
    assert not run.lock_path.exists()  # refused before taking the lock


def test_overwrite_deletes_stage_dir_and_flags_children(tmp_path):
    run = RunDir(tmp_path / "run")
    out = run.begin_stage("sft", {"v": 1}, {}, None, overwrite=False)
    (out / "old.bin").write_text("x")
    run.finish_stage("sft", {"eval_loss": 1.0}, {})
    run.begin_stage("reward", {}, {}, "sft", overwrite=False)
    run.finish_stage("reward", {}, {})

    assert run.check_can_start("sft", overwrite=True) == "new"
    out = run.begin_stage("sft", {"v": 2}, {}, None, overwrite=True)
    assert out.is_dir() and list(out.iterdir()) == []
    rec = run.record("sft")
    assert rec["status"] == "running" and rec["config"] == {"v": 2} and rec["metrics"] == {}
    assert any("reward" in m and "rerun" in m for m in run.messages)
    assert run.record("reward")["status"] == "done"  # other stages are left as they are
    run.finish_stage("sft", {}, {})


def test_resume_keeps_checkpoints(tmp_path):
    run = RunDir(tmp_path / "run")
    out = run.begin_stage("ppo", {}, {}, "sft", overwrite=False)
    (out / "checkpoints" / "step-2").mkdir(parents=True)
    (out / "checkpoints" / "step-2" / "state.pt").write_text("s")
    run.fail_stage("ppo", "KeyboardInterrupt")

    assert run.check_can_start("ppo", overwrite=False) == "resume"
    out = run.begin_stage("ppo", {}, {}, "sft", overwrite=False)
    assert (out / "checkpoints" / "step-2" / "state.pt").exists()
    assert run.record("ppo")["resumed"] is True

    # --overwrite on an unfinished stage starts fresh
    run.fail_stage("ppo", "again")
    assert run.check_can_start("ppo", overwrite=True) == "new"
    out = run.begin_stage("ppo", {}, {}, "sft", overwrite=True)
    assert not (out / "checkpoints").exists()
    run.finish_stage("ppo", {}, {})


def test_corrupt_manifest_is_never_overwritten(tmp_path):
    run = RunDir(tmp_path)
    run.manifest_path.write_text('{"stages": {')
    with pytest.raises(RunDirError) as err:
        run.manifest()
    msg = str(err.value)
    assert str(run.manifest_path) in msg and "not valid JSON" in msg and "new run directory" in msg
    with pytest.raises(RunDirError, match="not valid JSON"):
        run.begin_stage("sft", {}, {}, None, overwrite=True)
    assert run.manifest_path.read_text() == '{"stages": {'
    assert not run.lock_path.exists() and not (tmp_path / "sft").exists()

    run.manifest_path.write_text("[1, 2]")
    with pytest.raises(RunDirError, match="not an rlchat manifest"):
        run.manifest()


def test_manifest_write_failure_releases_lock(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "run")
    monkeypatch.setattr(os, "replace", _enospc)
    with pytest.raises(RunDirError, match="no space left on device"):
        run.begin_stage("sft", {}, {}, None, overwrite=False)
    monkeypatch.undo()
    assert not run.lock_path.exists() and not run.manifest_path.exists()


def test_finish_write_failure_keeps_lock_for_fail_stage(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "run")
    run.begin_stage("sft", {}, {}, None, overwrite=False)
    monkeypatch.setattr(os, "replace", _enospc)
    with pytest.raises(RunDirError, match="no space left on device"):
        run.finish_stage("sft", {"eval_loss": 1.0}, {})
    monkeypatch.undo()
    assert run.holds_lock() and run.record("sft")["status"] == "running"  # previous manifest intact
    run.fail_stage("sft", "RunDirError: disk full")
    assert run.record("sft")["status"] == "failed" and not run.lock_path.exists()


def test_run_dir_that_is_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(RunDirError, match="is a file"):
        RunDir(path).check_can_start("sft", False)


# ---- lock ------------------------------------------------------------------------------------------------------


def _write_lock(run: RunDir, pid: int, host: str | None = None, stage: str = "ppo"):
    run.path.mkdir(parents=True, exist_ok=True)
    run.lock_path.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "stage": stage,
                                         "started": "2026-01-01T00:00:00Z"}))


def test_lock_held_by_live_process(tmp_path):
    run = RunDir(tmp_path / "run")
    child = subprocess.Popen(["sleep", "30"])
    try:
        _write_lock(run, child.pid)
        for call in (lambda: run.check_can_start("sft", False),
                     lambda: run.begin_stage("sft", {}, {}, None, overwrite=False),
                     lambda: run.lock("sft")):
            with pytest.raises(RunDirError) as err:
                call()
            msg = str(err.value)
            assert f"pid {child.pid}" in msg and socket.gethostname() in msg and "'ppo'" in msg
        assert json.loads(run.lock_path.read_text())["pid"] == child.pid  # untouched
        assert not run.manifest_path.exists()
        run.unlock()  # not ours: left alone
        assert run.lock_path.exists()
        run.fail_stage("ppo", "x")  # not ours: must not touch the manifest or the lock
        assert run.lock_path.exists() and not run.manifest_path.exists()
    finally:
        child.kill()
        child.wait()


def test_stale_lock_is_taken_over(tmp_path, caplog):
    run = RunDir(tmp_path / "run")
    dead = subprocess.Popen(["true"])
    dead.wait()
    _write_lock(run, dead.pid)
    assert run.check_can_start("sft", False) == "new"
    with caplog.at_level(logging.WARNING, logger="rlchat"):
        run.begin_stage("sft", {}, {}, None, overwrite=False)
    assert json.loads(run.lock_path.read_text())["pid"] == os.getpid()
    assert len(run.messages) == 1 and f"pid {dead.pid}" in run.messages[0] and "stale lock" in run.messages[0]
    assert "stale lock" in caplog.text
    run.finish_stage("sft", {}, {})
    assert not run.lock_path.exists()


def test_lock_from_other_host_is_refused(tmp_path):
    run = RunDir(tmp_path)
    _write_lock(run, 12345, host="some-other-host")
    with pytest.raises(RunDirError, match="some-other-host.*delete"):
        run.lock("sft")


def test_lock_unlock(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.lock("eval") is None
    assert run.holds_lock()
    run.unlock()
    assert not run.lock_path.exists() and not run.holds_lock()
    run.lock_path.write_text("")
    with pytest.raises(RunDirError, match="unreadable"):
        run.lock("eval")


# ---- hashes, inputs, paths -------------------------------------------------------------------------------------


def test_content_hash_file_and_dir(tmp_path):
    f = tmp_path / "d" / "data.jsonl"
    f.parent.mkdir()
    f.write_text('{"a": 1}\n')
    h1 = content_hash(f)
    assert h1.startswith("sha256:") and h1 == content_hash(f)
    f.write_text('{"a": 2}\n')
    assert content_hash(f) != h1

    d1 = content_hash(f.parent)
    assert d1 == content_hash(f.parent)
    (f.parent / "sub").mkdir()
    (f.parent / "sub" / "x").write_text("x")
    d2 = content_hash(f.parent)
    assert d2 != d1
    (f.parent / "sub" / "x").rename(f.parent / "sub" / "y")  # same bytes, new name
    assert content_hash(f.parent) != d2
    with pytest.raises(RunDirError, match="no such file"):
        content_hash(tmp_path / "missing")


def test_input_record(tmp_path, monkeypatch):
    f = tmp_path / "prompts.jsonl"
    f.write_text("{}\n")
    rec = input_record(str(f))
    assert rec == {"spec": str(f), "kind": "local", "path": str(f.resolve()), "hash": content_hash(f)}
    assert input_record(str(f), hash=False)["hash"] is None
    monkeypatch.chdir(tmp_path)
    assert input_record("prompts.jsonl")["path"] == str(f.resolve())
    assert input_record("HuggingFaceTB/SmolLM2-135M") == {"spec": "HuggingFaceTB/SmolLM2-135M", "kind": "hub"}


def test_resolve_inside(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.resolve_inside("ppo/policy") == (tmp_path / "run" / "ppo" / "policy").resolve()
    assert run.resolve_inside(tmp_path / "run" / "sft") == (tmp_path / "run" / "sft").resolve()
    for bad in ("../elsewhere", "/etc/passwd", "sft/../../x"):
        with pytest.raises(RunDirError, match="outside the run directory"):
            run.resolve_inside(bad)


# ---- status rows -----------------------------------------------------------------------------------------------


def test_summary_rows():
    manifest = {"stages": {
        "eval": {"status": "done", "metrics": {"n": 10, "win_rate": 0.625}, "wall_s": 4000},
        "sft": {"status": "done", "metrics": {"train_loss": 2.0, "eval_loss": 1.23456}, "wall_s": 12.34},
        "reward": {"status": "failed", "metrics": {}, "error": "out of memory", "wall_s": 185},
        "ppo": {"status": "running", "metrics": {"note": "x", "loss/policy": 0.5}, "wall_s": None,
                "started": "2020-01-01T00:00:00Z"},
    }}
    rows = summary_rows(manifest)
    assert [r[0] for r in rows] == ["sft", "reward", "ppo", "eval"]
    assert rows[0] == ("sft", "done", "eval_loss=1.235", "12.3s")
    assert rows[1] == ("reward", "failed", "error: out of memory", "3m05s")
    assert rows[2][2] == "loss/policy=0.5" and rows[2][3].endswith("so far")  # first numeric metric
    assert rows[3] == ("eval", "done", "win_rate=0.625", "1h06m")
    assert summary_rows({"stages": {}}) == []


def test_import_is_cheap():
    code = "import sys, rlchat.rundir, rlchat.config; print(sorted({'torch', 'transformers', 'yaml'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(rd.__file__).parents[1])
    assert out.stdout.strip() == "[]"
