"""Multi-process runs: which process this is, and the few collectives the stages need.

Every stage runs the same under `accelerate launch --num_processes N -m rlchat <stage> ...` (or `rlchat <stage>
--num-processes N`, which re-launches itself that way): accelerate (torchrun underneath) starts N copies and sets
RANK / WORLD_SIZE / LOCAL_RANK; `accelerate.PartialState` joins them into one process group (NCCL on GPUs, gloo on
CPU). This module reads those variables without importing torch, so single-process runs pay nothing.

The contract the stages keep:
  - every process validates its inputs (reads only), then `barrier()`; only then does the main process write;
  - only the main process writes to the run directory (`rlchat.rundir` refuses writes from other ranks), draws
    progress bars and prints summaries; the others compute and wait;
  - metrics are reduced over all processes' samples before they are logged (`all_mean`, `all_sum`).

What it leaves out: its own process launching or communication layer; that is accelerate's and torch's job.

    from rlchat import dist
    dist.init()                # joins the process group when WORLD_SIZE > 1
    if dist.is_main(): ...     # rank 0 only
    dist.barrier()
"""
from __future__ import annotations

import os
import sys


def rank() -> int:
    """This process's global rank (0 when not launched by accelerate/torchrun)."""
    return int(os.environ.get("RANK", "0") or 0)


def world_size() -> int:
    """The number of processes in the run (1 when not launched by accelerate/torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_main() -> bool:
    return rank() == 0


def is_distributed() -> bool:
    return world_size() > 1


def init() -> None:
    """Join the process group (no-op for one process). Safe to call more than once."""
    if not is_distributed():
        return
    import torch
    from accelerate import PartialState

    # cpu=True without a GPU: accelerate otherwise sees N single processes, not one gloo group (MULTI_CPU)
    PartialState(cpu=not torch.cuda.is_available())


def die_with_launcher() -> None:
    """In a process started by torchrun (accelerate launch): exit when the launcher dies, even by SIGKILL.

    torch starts each worker in its own session, so killing the launcher's process group leaves the workers
    running (training on, holding the run's lock). Linux only (prctl PR_SET_PDEATHSIG); elsewhere a no-op."""
    if "LOCAL_RANK" not in os.environ or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return


def finish() -> None:
    """End a multi-process run cleanly: wait for every process, then leave the process group (a gloo group left
    undestroyed can abort at interpreter exit with "terminate called without an active exception")."""
    if not _group_ready():
        return
    import torch.distributed as td

    try:
        td.barrier()
        td.destroy_process_group()
    except Exception:  # a peer already gone: nothing left to synchronise with
        pass


def _group_ready() -> bool:
    if not is_distributed():
        return False
    import torch.distributed as td

    return td.is_available() and td.is_initialized()


def barrier() -> None:
    """Wait until every process gets here (no-op for one process)."""
    if is_distributed():
        init()
        import torch.distributed as td

        td.barrier()


def all_sum(t):
    """Sum of a tensor over all processes (the tensor itself for one process). Returns a new tensor."""
    if not _group_ready():
        return t.clone()
    import torch.distributed as td

    out = t.detach().clone()
    td.all_reduce(out, op=td.ReduceOp.SUM)
    return out


def all_mean(t):
    """Mean of a tensor over all processes (each process weighs the same)."""
    return all_sum(t) / world_size() if _group_ready() else t.clone()


def gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every process; [obj] for one process."""
    if not _group_ready():
        return [obj]
    import torch.distributed as td

    out = [None] * world_size()
    td.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's `obj` on every process."""
    if not _group_ready():
        return obj
    import torch.distributed as td

    box = [obj]
    td.broadcast_object_list(box, src=0)
    return box[0]
