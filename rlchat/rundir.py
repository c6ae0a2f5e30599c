"""The shared run directory: RUN/run.json manifest, RUN/<stage>/ outputs, atomic writes, a lock, content hashes.

Layout (see docs/architecture.md):

    RUN/run.json     manifest: {"rlchat_version", "created", "stages": {stage: entry}}
    RUN/.lock        {"pid", "host", "stage", "started"} while a stage runs
    RUN/<stage>/     everything a stage writes (adapters, tokenizer, metrics.jsonl, checkpoints/)

A stage uses it like this (validation and data/model checks come first: begin_stage is the first write):

    run = RunDir(cfg.run_dir)
    mode = run.check_can_start("sft", cfg.overwrite)      # read-only; "new" or "resume"
    ...                                                    # load data, resolve models
    out = run.begin_stage("sft", to_dict(cfg), inputs, parent=None, overwrite=cfg.overwrite)
    try:
        ...                                                # train, write under `out`
        run.finish_stage("sft", metrics, outputs)
    except BaseException as err:
        run.fail_stage("sft", str(err))
        raise

Every file the manifest points at is written atomically (tmp file + fsync + os.replace, or `atomic_dir` for a
directory), so a crash or a full disk leaves the previous version intact, never a half-written one.
Not handled here: locking across hosts (a lock held from another host is reported, never taken over). A lock whose
pid was reused by another process is told apart by the process's start time (rlchat/pids.py); stage entries
of a hand-edited run.json are type-checked by rlchat/manifest_checks.py.
The library never prints; messages a user should see go to `RunDir.messages` and the "rlchat" logger.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

from rlchat import __version__
from rlchat.errors import RunDirError
from rlchat.fileio import _dumps, _write_error, atomic_write_json
from rlchat.manifest_checks import entry_problem
from rlchat.pids import holder_alive, pid_start

log = logging.getLogger("rlchat")

STAGES = ("sft", "reward", "ppo", "grpo", "rloo", "dpo", "eval")
STATUSES = ("running", "done", "failed", "interrupted")  # interrupted: Ctrl-C or SIGTERM; the same command resumes
VERSION_PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets")


def _now() -> str:
    """Current time as ISO 8601 UTC, e.g. 2026-11-29T11:46:00Z."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def library_versions() -> dict:
    """Python and library versions from installed package metadata (no imports); a missing package is None."""
    from importlib import metadata

    versions: dict = {"python": platform.python_version()}
    for name in VERSION_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def enclosing_run(path: str | Path, include_self: bool = True) -> Path | None:
    """The run directory (a directory holding run.json) that `path` is, or is inside; None if there is none."""
    p = Path(path).expanduser().resolve()
    for candidate in ([p] if include_self else []) + list(p.parents):
        if (candidate / "run.json").is_file():
            return candidate
    return None


def _holds_run(path: Path, depth: int = 3) -> Path | None:
    """A run directory at or below `path` (looked for `depth` levels down), or None."""
    if (path / "run.json").is_file():
        return path
    if depth == 0:
        return None
    try:
        children = [c for c in path.iterdir() if c.is_dir() and not c.is_symlink()]
    except OSError:
        return None
    for child in children[:1000]:
        found = _holds_run(child, depth - 1)
        if found is not None:
            return found
    return None


def check_output_path(out: str | Path, flag: str) -> None:
    """RunDirError when an output path of a command that is not a stage (export OUT, score --out, new-model,
    demo-data) lies inside a run directory, or would replace a directory holding one: only a stage writes into a
    run, under its lock and its rules (atomic writes, the manifest kept true)."""
    out = Path(out).expanduser()
    run = enclosing_run(out)
    if run is None and out.is_dir():
        run = _holds_run(out.resolve())
    if run is not None:
        raise RunDirError(f"{flag} {out} is inside (or would replace) the run directory {run}; only rlchat's stages "
                          "write into a run", f"choose a {flag} path outside {run}")


class RunDir:
    """One run directory. Creating the object touches nothing on disk; `begin_stage` is the first write."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.manifest_path = self.path / "run.json"
        self.lock_path = self.path / ".lock"
        self.messages: list[str] = []  # things the CLI should show the user (stale lock taken over, ...)
        self._t0: dict[str, float] = {}  # monotonic start per stage begun by this object, for wall_s

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def _say(self, msg: str) -> None:
        self.messages.append(msg)
        log.warning(msg)

    # ---- reading ---------------------------------------------------------------------------------------------

    def exists(self) -> bool:
        """True if the run directory has a manifest (some stage has started in it)."""
        return self.manifest_path.is_file()

    def manifest(self) -> dict:
        """The parsed run.json, or a fresh empty manifest if there is none yet (nothing is written)."""
        self._check_not_dangling()
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"run directory {self.path} is a file, not a directory",
                              "pass a directory path (new or existing) as the run directory")
        if not self.manifest_path.exists():
            return {"rlchat_version": __version__, "created": _now(), "stages": {}}
        fix = ("restore it (for example from a backup) or start a new run directory; "
               "rlchat will not overwrite a corrupt manifest")
        try:
            text = self.manifest_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise RunDirError(f"cannot read {self.manifest_path}: {err}", fix) from err
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise RunDirError(f"{self.manifest_path} is not valid JSON (line {err.lineno}, column {err.colno}: "
                              f"{err.msg})", fix) from err
        if not isinstance(data, dict) or not isinstance(data.get("stages"), dict):
            raise RunDirError(f"{self.manifest_path} is not an rlchat manifest (no \"stages\" object)", fix)
        problem = entry_problem(data["stages"])
        if problem:
            raise RunDirError(f"{self.manifest_path} is damaged: {problem}", fix)
        return data

    def _check_not_dangling(self) -> None:
        """A symbolic link whose target is missing is neither a file nor a directory: say what it is."""
        if self.path.is_symlink() and not self.path.exists():
            raise RunDirError(f"run directory {self.path} is a symbolic link to {os.readlink(self.path)}, which does "
                              "not exist", f"create {os.readlink(self.path)} first, or pass another run directory")

    def stage_dir(self, stage: str) -> Path:
        """RUN/<stage> (not created)."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
        return self.path / stage

    def record(self, stage: str) -> dict | None:
        """The manifest entry of a stage, or None if it never started."""
        return self.manifest()["stages"].get(stage)

    def require_done(self, stage: str, fix: str) -> dict:
        """The entry of a finished parent stage; RunDirError (with the caller's fix) if it is not done."""
        rec = self.record(stage)
        if rec is None:
            raise RunDirError(f"stage '{stage}' has not run in {self.path}", fix)
        status = rec.get("status")
        if status != "done":
            detail = f" ({rec['error']})" if status == "failed" and rec.get("error") else ""
            raise RunDirError(f"stage '{stage}' in {self.path} is {status}{detail}, not done", fix)
        if not self.stage_dir(stage).is_dir():
            raise RunDirError(f"{self.stage_dir(stage)} is missing although run.json says stage '{stage}' is done",
                              f"{fix}, or restore {self.stage_dir(stage)}")
        return rec

    def checkpoints_dir(self, stage: str) -> Path:
        """RUN/<stage>/checkpoints, where a stage keeps what it needs to resume."""
        return self.stage_dir(stage) / "checkpoints"

    def has_checkpoints(self, stage: str) -> bool:
        """True if RUN/<stage>/checkpoints holds anything but hidden entries (the tmp directory of a checkpoint
        whose writer was killed does not count: with nothing else there the stage starts afresh)."""
        ckpt = self.checkpoints_dir(stage)
        return ckpt.is_dir() and any(not p.name.startswith(".") for p in ckpt.iterdir())

    def check_can_start(self, stage: str, overwrite: bool) -> str:
        """Read-only check before any work: "new" or "resume"; RunDirError if the stage cannot start.

        "resume": the stage is running/failed (a crash or Ctrl-C) and RUN/<stage>/checkpoints has something.
        Refuses a finished stage unless `overwrite`, and a run directory locked by a live process.
        """
        self.stage_dir(stage)  # validates the name
        outer = enclosing_run(self.path, include_self=False)
        if outer is not None:
            raise RunDirError(f"run directory {self.path} is inside another run directory, {outer}",
                              f"choose a --run-dir outside {outer} (for example next to it)")
        rec = self.manifest()["stages"].get(stage)
        self._check_lock_free()
        if rec is None:
            return "new"
        if rec.get("status") == "done":
            if not overwrite:
                raise RunDirError(
                    f"stage '{stage}' already finished in {self.path}",
                    f"pass --overwrite to retrain it (this deletes {self.stage_dir(stage)}), or use a new run directory")
            return "new"
        if not overwrite and self.has_checkpoints(stage):
            return "resume"
        return "new"

    # ---- lock --------------------------------------------------------------------------------------------------

    def _read_lock(self) -> dict | None:
        """The lock's content, None if there is no lock; RunDirError if it is unreadable."""
        try:
            text = self.lock_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as err:
            raise RunDirError(f"cannot read {self.lock_path}: {err}", "check the run directory permissions") from err
        try:
            info = json.loads(text)
            if not isinstance(info["pid"], int) or isinstance(info["pid"], bool):
                raise TypeError("pid is not an integer")  # 1.5 or true would be read as pid 1 (init: alive)
            return info
        except (ValueError, KeyError, TypeError) as err:
            raise RunDirError(
                f"{self.lock_path} is unreadable (another process may be writing it)",
                f"retry; if no rlchat process uses {self.path}, delete {self.lock_path}") from err

    def _lock_owner_error(self, info: dict) -> RunDirError:
        stage = info.get("stage", "?")
        return RunDirError(
            f"{self.path} is in use: stage '{stage}' is running as pid {info.get('pid')} on host "
            f"{info.get('host')} since {info.get('started')}",
            f"wait for it to finish or stop it; if that process is gone, delete {self.lock_path}")

    def _check_lock_free(self) -> None:
        """Raise if a live process (other than us) holds the lock; a stale lock is fine (begin takes it over)."""
        info = self._read_lock()
        if info is None:
            return
        pid, host = int(info["pid"]), info.get("host")
        if host != socket.gethostname():
            raise self._lock_owner_error(info)
        if pid != os.getpid() and holder_alive(info):
            raise self._lock_owner_error(info)

    def lock(self, stage: str) -> str | None:
        """Take RUN/.lock for `stage` (creating RUN if needed). Returns a message if a stale lock was taken over.

        O_CREAT|O_EXCL makes taking the lock atomic. A lock left by a dead process on this host is taken over;
        one held by a live process, or by any process on another host, raises RunDirError.
        """
        self._check_not_dangling()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except FileExistsError as err:
            raise RunDirError(f"run directory {self.path} is a file, not a directory",
                              "pass a directory path as the run directory") from err
        except OSError as err:
            raise _write_error(self.path, err) from err
        info = {"pid": os.getpid(), "host": socket.gethostname(), "stage": stage, "started": _now(),
                "pid_start": pid_start(os.getpid())}
        message = None
        for _ in range(3):
            try:
                fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                old = self._read_lock()
                if old is None:
                    continue  # released in between: try again
                pid = int(old["pid"])
                if old.get("host") != info["host"] or (pid != os.getpid() and holder_alive(old)):
                    raise self._lock_owner_error(old) from None
                if pid != os.getpid():
                    message = (f"took over a stale lock in {self.path}: stage '{old.get('stage')}' (pid {pid}, "
                               f"started {old.get('started')}) is no longer running")
                try:
                    os.unlink(self.lock_path)
                except FileNotFoundError:
                    pass
                continue
            except OSError as err:
                raise _write_error(self.lock_path, err) from err
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(_dumps(info) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as err:
                try:
                    os.unlink(self.lock_path)
                except OSError:
                    pass
                raise _write_error(self.lock_path, err) from err
            if message:
                self._say(message)
            return message
        raise RunDirError(f"could not take {self.lock_path}: it keeps changing",
                          "check that no other rlchat process uses this run directory and retry")

    def unlock(self) -> None:
        """Release RUN/.lock if this process holds it; a lock held by someone else is left alone."""
        if not self.holds_lock():
            return
        try:
            os.unlink(self.lock_path)
        except FileNotFoundError:
            pass

    # ---- stage lifecycle ----------------------------------------------------------------------------------------

    def _write_manifest(self, manifest: dict) -> None:
        atomic_write_json(self.manifest_path, manifest)

    def begin_stage(self, stage: str, config: dict, inputs: dict, parent: str | None, overwrite: bool) -> Path:
        """Take the lock and mark `stage` running; returns RUN/<stage> (created).

        New start: RUN/<stage> is removed first if it belongs to an earlier attempt (or `overwrite`).
        Resume (status running/failed with checkpoints, no `overwrite`): RUN/<stage> is kept.

        In a multi-process run every process calls this after validating (reading only): they meet at a barrier,
        the main process alone takes the lock and writes, and all meet again before any goes on. The other
        processes only get the path.
        """
        from rlchat import dist

        if dist.is_distributed():
            dist.barrier()  # every process has read the run directory; from here on rank 0 writes
            if not dist.is_main():
                dist.barrier()  # rank 0 has set the stage up (or failed; then torchrun stops this process)
                return self.stage_dir(stage)
            out = self._begin(stage, config, inputs, parent, overwrite)
            dist.barrier()
            return out
        return self._begin(stage, config, inputs, parent, overwrite)

    def _begin(self, stage: str, config: dict, inputs: dict, parent: str | None, overwrite: bool) -> Path:
        mode = self.check_can_start(stage, overwrite)
        self.lock(stage)
        try:
            manifest = self.manifest()
            if not self.manifest_path.exists():
                manifest["created"] = _now()
            old = manifest["stages"].get(stage)
            out = self.stage_dir(stage)
            self._remove_stale_tmp()
            if mode == "new" and out.exists() and (old is not None or overwrite):
                try:
                    shutil.rmtree(out)
                except OSError as err:
                    raise RunDirError(f"could not delete {out}: {err.strerror or err}",
                                      f"delete {out} by hand and rerun") from err
            if mode == "new" and old is not None:
                later = [s for s, rec in manifest["stages"].items() if rec.get("parent") == stage and s != stage]
                if later:
                    self._say(f"stage '{stage}' is being retrained; {', '.join(later)} in {self.path} used the "
                              f"previous '{stage}' and should be rerun with --overwrite")
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise _write_error(out, err) from err
            manifest["stages"][stage] = {
                "status": "running",
                "config": config,
                "inputs": inputs,
                "parent": parent,
                "outputs": {},
                "metrics": {},
                "versions": library_versions(),
                "started": _now(),
                "ended": None,
                "wall_s": None,
                "error": None,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "resumed": mode == "resume",
            }
            self._write_manifest(manifest)
        except BaseException:
            self.unlock()
            raise
        self._t0[stage] = time.monotonic()
        log.info("%s stage '%s' in %s", "resuming" if mode == "resume" else "starting", stage, self.path)
        return out

    def _remove_stale_tmp(self) -> None:
        """Delete tmp files of manifest writes a killed process left behind (`.run.json.*.tmp`); we hold the lock,
        so no other process is writing one."""
        for p in self.path.glob(".run.json.*.tmp"):
            try:
                p.unlink()
            except OSError:
                pass

    def holds_lock(self) -> bool:
        """True if this process holds RUN/.lock."""
        try:
            info = self._read_lock()
        except RunDirError:
            return False
        return info is not None and int(info["pid"]) == os.getpid() and info.get("host") == socket.gethostname()

    def _end(self, stage: str, status: str, **fields) -> None:
        if not self.holds_lock():
            # never touch the entry of a stage that another process may be running
            raise RunDirError(f"this process does not hold {self.lock_path}, so it cannot end stage '{stage}'",
                              "call begin_stage first")
        manifest = self.manifest()
        entry = manifest["stages"].get(stage)
        if entry is None:
            raise RunDirError(f"stage '{stage}' was never started in {self.path}", "call begin_stage first")
        ended = _now()
        if stage in self._t0:
            wall = time.monotonic() - self._t0.pop(stage)
        else:
            t0, t1 = parse_time(entry.get("started")), parse_time(ended)
            wall = (t1 - t0).total_seconds() if t0 and t1 else None
        entry.update(status=status, ended=ended, wall_s=None if wall is None else round(wall, 2), **fields)
        self._write_manifest(manifest)

    def finish_stage(self, stage: str, metrics: dict, outputs: dict) -> None:
        """Mark `stage` done with its final metrics and outputs (paths relative to RUN, e.g. "sft/adapter"), then
        release the lock. If the manifest write fails the lock is kept, so the caller's fail_stage can record it.
        A no-op on the non-main processes of a multi-process run."""
        from rlchat import dist

        if not dist.is_main():
            return
        self._end(stage, "done", metrics=metrics, outputs=outputs, error=None)
        self.unlock()

    def fail_stage(self, stage: str, error: str, status: str = "failed") -> None:
        """Mark `stage` failed (or `status` "interrupted": Ctrl-C / SIGTERM) and release the lock. Best effort: never
        raises (the caller re-raises the error). A no-op on the non-main processes of a multi-process run."""
        from rlchat import dist

        if not dist.is_main():
            return
        try:
            self._end(stage, status, error=str(error) or "interrupted")
        except (RunDirError, OSError) as err:
            log.warning("could not record the failure of stage '%s' in %s: %s", stage, self.manifest_path, err)
        finally:
            self.unlock()

    # ---- paths --------------------------------------------------------------------------------------------------

    def resolve_inside(self, path: str | Path) -> Path:
        """`path` (relative paths are taken from RUN) resolved; RunDirError if it points outside the run directory."""
        base = self.path.resolve()
        p = Path(path).expanduser()
        full = (p if p.is_absolute() else base / p).resolve()
        if full != base and not full.is_relative_to(base):
            raise RunDirError(f"path {path} points outside the run directory {self.path}",
                              "use a path inside the run directory")
        return full
