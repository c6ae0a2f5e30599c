"""Atomic file writes, JSONL appends and content hashes: the write rules of the run directory.

Every file rlchat writes into a run directory goes through here: a temporary file (or directory) in the same
place, fsync, then os.replace, so a crash or a full disk leaves the previous version intact, never half of a new
one. An OSError becomes a one-line RunDirError that says what to do. Only the main process of a multi-process run
writes (rlchat/dist.py); another rank calling a write helper is a bug and raises.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from rlchat.errors import RunDirError

_OS_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EDQUOT: "disk quota exceeded",
}


def _write_error(path: Path | str, err: OSError) -> RunDirError:
    """An OSError during a write, as a one-line RunDirError that says the old file was kept."""
    reason = _OS_REASONS.get(err.errno) or (err.strerror or str(err)).lower()
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free some disk space (or use a run directory on another disk) and rerun; the previous file is unchanged"
    elif err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = "use a run directory you can write to; the previous file is unchanged"
    elif err.errno == errno.EISDIR:
        fix = "pass a file path, not a directory"
    else:
        fix = "check the disk and rerun; the previous file is unchanged"
    return RunDirError(f"could not write {path}: {reason}", fix)


def _json_default(obj):
    """Make Paths, numpy/torch scalars and arrays JSON-friendly without importing either library."""
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 0) == 0:
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    return str(obj)


def _dumps(obj, indent: int | None = None) -> str:
    return json.dumps(obj, indent=indent, default=_json_default, ensure_ascii=False)


def _fsync_dir(path: Path) -> None:
    """fsync a directory so a rename inside it survives a power loss (best effort; not every OS allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask (os.umask can only be read by setting it: set it back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str | Path) -> None:
    """Give `path` (and, for a directory, everything under it) the permissions a plain open()/mkdir() would have.

    mkstemp/mkdtemp create 0600/0700 entries, and some libraries write their files that way too; rlchat's outputs
    must be readable by whoever the umask lets read them (a serving process, an upload job), like normal files.
    Only bits are added (read, and execute on directories), never removed.
    """
    mask = _umask()
    path = Path(path)
    entries = [path] + (list(path.rglob("*")) if path.is_dir() else [])
    for p in entries:
        if p.is_symlink():
            continue
        want = (0o777 if p.is_dir() else 0o666) & ~mask
        mode = p.stat().st_mode & 0o777
        if mode | want != mode:
            os.chmod(p, mode | want)


def _check_writer(path) -> None:
    """Only the main process of a multi-process run writes (see rlchat/dist.py); another rank trying is a bug."""
    from rlchat import dist

    if not dist.is_main():
        raise RuntimeError(f"internal error: process rank {dist.rank()} tried to write {path}; only the main "
                           "process writes to the run directory")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` so readers see the old or the new content, never a mix.

    The text goes to a tmp file in the same directory (same filesystem, so os.replace is atomic), is flushed and
    fsynced, then renamed over `path`. On any failure the tmp file is removed and `path` is left as it was.
    """
    path = Path(path)
    _check_writer(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it 0600: a written file follows the umask like open()'s
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except OSError as err:
        raise _write_error(path, err) from err
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def atomic_write_json(path: str | Path, obj) -> None:
    """atomic_write_text of `obj` as indented JSON (Paths and tensor/numpy scalars are converted)."""
    atomic_write_text(path, _dumps(obj, indent=2) + "\n")


@contextmanager
def atomic_dir(final: str | Path, tag: str = "") -> Iterator[Path]:
    """Yield an empty tmp directory next to `final`; on success it replaces `final` in one rename.

    The tmp directory is named `.NAME.tmp-<tag><random>`: `tag` lets a writer outside a run (export) name its own,
    e.g. with its pid, to find and remove what a killed predecessor left.

    An existing `final` is renamed away first, the new directory renamed in, and only then the old one deleted, so
    at every moment either the old or the new directory is complete. On an exception inside the block the tmp
    directory is removed and `final` is untouched.

        with atomic_dir(out / "adapter") as tmp:
            model.save_pretrained(tmp)
    """
    final = Path(final)
    _check_writer(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-{tag}"))
    except OSError as err:
        raise _write_error(final, err) from err
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    try:
        follow_umask(tmp)  # mkdtemp made it 0700; the files inside may be 0600 (see follow_umask)
        if final.exists():
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
        try:
            os.rename(tmp, final)
        except OSError:
            if old is not None:
                os.rename(old, final)  # put the previous version back
                old = None
            raise
        _fsync_dir(final.parent)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(final, err) from err
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def append_jsonl(path: str | Path, row: dict) -> None:
    """Append one JSON row (e.g. a metrics step) to a .jsonl file and flush it, so `tail -f` and crashes see it."""
    path = Path(path)
    _check_writer(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(_dumps(row) + "\n")
            f.flush()
    except OSError as err:
        raise _write_error(path, err) from err


def _hash_file(path: Path, h) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


def content_hash(path: str | Path) -> str:
    """"sha256:<hex>" of a file's bytes, or of a directory: every file's relative path and bytes, sorted by path.

    A directory hash changes when a file is added, removed, renamed or edited, and does not depend on mtimes.
    """
    path = Path(path)
    h = hashlib.sha256()
    try:
        if path.is_file():
            _hash_file(path, h)
        elif path.is_dir():
            files = sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.relative_to(path).as_posix())
            for p in files:
                h.update(p.relative_to(path).as_posix().encode("utf-8") + b"\0")
                sub = hashlib.sha256()
                _hash_file(p, sub)
                h.update(sub.digest())
        else:
            raise RunDirError(f"cannot hash {path}: no such file or directory", "check the path")
    except OSError as err:
        raise RunDirError(f"cannot read {path}: {(err.strerror or str(err)).lower()}",
                          "check that it exists and that you may read it") from err
    return "sha256:" + h.hexdigest()


def input_record(spec: str, hash: bool = True) -> dict:
    """How an input (dataset, model) was given, for the manifest.

    A spec that exists on disk is local: {"spec", "kind": "local", "path": <absolute>, "hash": "sha256:..."}
    (hash=False leaves "hash" None: hashing reads every byte, slow for a multi-GB model directory).
    Anything else is taken as a Hub id: {"spec", "kind": "hub"}.
    A dataset mixture (`a.jsonl:0.3,b.jsonl:0.7`, see rlchat.mixtures.parse_mixture) is {"spec", "kind": "mixture",
    "parts": [each input's record with its "weight"], "hash": one hash over the parts' specs, weights and hashes}
    (so a resume check that compares spec and hash notices any input changing).
    A `.gguf` model file is always hashed (its sha256 names its converted copy) and also records "format": "gguf"
    and "converted": the cache directory it is loaded from (see rlchat.gguf).
    """
    from rlchat.mixtures import parse_mixture

    spec = str(spec)
    try:
        parts = parse_mixture(spec)
    except ValueError:
        parts = [(spec, None)]  # not a valid mixture: the dataset loader reports it
    if len(parts) > 1:
        records = [{**input_record(name, hash=hash), "weight": weight} for name, weight in parts]
        digest = hashlib.sha256(json.dumps([[r["spec"], r["weight"], r.get("hash")] for r in records]).encode())
        return {"spec": spec, "kind": "mixture", "parts": records, "hash": f"sha256:{digest.hexdigest()}"}
    local = Path(spec).expanduser()
    if local.is_file() and local.suffix.lower() == ".gguf":
        from rlchat import gguf

        return gguf.input_record(spec)
    if local.exists():
        return {"spec": spec, "kind": "local", "path": str(local.resolve()),
                "hash": content_hash(local) if hash else None}
    return {"spec": spec, "kind": "hub"}
