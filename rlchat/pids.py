"""Is a process alive: the checks behind the run directory's lock (a lock held by a dead process is stale) and
export's leftover temporary directories. Linux /proc gives a process's start time, so a reused pid is told apart.
No imports from rlchat.
"""
from __future__ import annotations

import os
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists on this host (signal 0 checks without sending anything)."""
    if pid <= 0 or pid > 2**31 - 1:  # no such process can exist (os.kill would raise OverflowError)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    except OSError:
        return False
    return True


def pid_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, /proc/PID/stat field 22); None where /proc is absent.

    Stored in the lock with the pid, so a lock whose pid now belongs to another process (pids are reused, quickly
    in containers) is recognised as stale."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()  # the command name may hold spaces and parentheses
    return fields[19] if len(fields) > 19 else None


def holder_alive(info: dict) -> bool:
    """True if the process that wrote a lock (on this host) is still running."""
    pid = int(info["pid"])
    if not pid_alive(pid):
        return False
    recorded = info.get("pid_start")
    now = pid_start(pid) if recorded is not None else None
    return recorded is None or now is None or now == recorded
