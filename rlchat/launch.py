"""`rlchat <stage> --num-processes N [--accelerate-config FILE]`: re-launch the same command through accelerate.

The parent process runs

    python -m accelerate.commands.launch [--config_file FILE] [--multi_gpu] --num_processes N \
        --main_process_port PORT -m rlchat <stage> <the same arguments>

and waits. It is exactly what a user would type (`accelerate launch --num_processes N -m rlchat <stage> ...`),
with three conveniences:
  - `--multi_gpu` (data parallel) unless an accelerate config file says otherwise; on a machine without GPUs
    accelerate runs the processes on CPU with the gloo backend, which is how the tests run 2 processes;
  - a free port, so two runs on one machine do not collide;
  - errors stay one line: the children write a user error to RLCHAT_ERROR_FILE and exit 2; the parent prints it
    once and exits 2, instead of torchrun's multi-line failure report. Progress bars still draw (the children
    are told stderr is a terminal when the parent's is).

Multi-node runs are launched with `accelerate launch` directly (see the README): the parent here starts one node.
"""
from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from rlchat.errors import ConfigError

LAUNCHED_ENV = "RLCHAT_LAUNCHED"       # set in the children: do not re-launch again
ERROR_FILE_ENV = "RLCHAT_ERROR_FILE"   # where a child writes its one-line user error


def should_relaunch(num_processes: int | None, accelerate_config: str | None) -> bool:
    """True when the flags ask for accelerate and this process was not started by a launcher already."""
    if os.environ.get(LAUNCHED_ENV) or "WORLD_SIZE" in os.environ:
        return False
    return bool((num_processes and num_processes > 1) or accelerate_config)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(stage_argv: list[str], num_processes: int | None, accelerate_config: str | None,
                   port: int | None = None) -> list[str]:
    """The accelerate command line that runs `rlchat <stage_argv...>` in `num_processes` processes."""
    if num_processes is not None and num_processes < 1:
        raise ConfigError(f"--num-processes must be at least 1, got {num_processes}",
                          "pass the number of processes to start (usually the number of GPUs)")
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if accelerate_config:
        path = Path(accelerate_config)
        if not path.is_file():
            raise ConfigError(f"accelerate config file {accelerate_config} not found",
                              "pass one of recipes/accelerate/*.yaml or a file written by `accelerate config`")
        check_accelerate_config(path)
        cmd += ["--config_file", str(path)]
    else:
        cmd += ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if num_processes:
        cmd += ["--num_processes", str(num_processes)]
    cmd += ["--main_process_port", str(port or free_port()), "-m", "rlchat", *stage_argv]
    return cmd


def check_accelerate_config(path: Path) -> dict:
    """Load an accelerate config file the way `accelerate launch` does; ConfigError with the reason if it fails."""
    try:
        from accelerate.commands.config.config_args import load_config_from_file

        cfg = load_config_from_file(str(path))
    except Exception as err:  # accelerate raises ValueError/TypeError/yaml errors for bad files
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ConfigError(f"accelerate config {path} does not load: {detail}",
                          "fix it or write a new one with `accelerate config --config_file FILE`") from None
    return cfg.to_dict()


def relaunch(stage_argv: list[str], num_processes: int | None, accelerate_config: str | None) -> int:
    """Run the stage under accelerate; returns the exit code (2 with the error printed once for user errors)."""
    from rich.markup import escape

    from rlchat.progress import console

    cmd = launch_command(stage_argv, num_processes, accelerate_config)
    tmp = Path(tempfile.mkdtemp(prefix="rlchat-launch-"))
    err_file = tmp / "error.txt"
    env = dict(os.environ, **{LAUNCHED_ENV: "1", ERROR_FILE_ENV: str(err_file)})
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, num_processes or 1))))
    if sys.stderr.isatty():
        env["RLCHAT_FORCE_TERMINAL"] = "1"
        env.setdefault("COLUMNS", str(shutil.get_terminal_size().columns))
    # shell-quoted, with this Python: the line can be pasted to run the same launch by hand
    console.print(f"[dim]launching: {escape(shlex.join(cmd))}[/]", soft_wrap=True, highlight=False)
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, start_new_session=False)
    try:
        # forward the children's stderr as it comes (progress bars included) until one reports a user error;
        # after that, torchrun's multi-line failure report is dropped
        while True:
            chunk = os.read(proc.stderr.fileno(), 65536)
            if not chunk:
                break
            if err_file.exists():
                continue
            sys.stderr.buffer.write(chunk)
            sys.stderr.buffer.flush()
        rc = proc.wait()
    except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM: the children are stopped the same way and mark the stage
        from rlchat.errors import INTERRUPTED, interrupt_exit_code

        proc.terminate()
        proc.wait()
        print(INTERRUPTED, file=sys.stderr)
        rc = interrupt_exit_code(err)
    try:
        message = err_file.read_text(encoding="utf-8").strip() if err_file.exists() else ""
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if message:
        lines = message.splitlines()  # one line, or a config error's head + one line per problem
        console.print(f"[bold red]error:[/] {escape(lines[0])}", soft_wrap=True, highlight=False)
        for line in lines[1:]:
            console.print(escape(line), soft_wrap=True, highlight=False)
        return 2
    return rc


def report_child_error(message: str) -> bool:
    """In a re-launched child: record a user error for the parent to print (first writer wins). Returns True if
    this process runs under `relaunch` (then it should exit 2 without printing)."""
    path = os.environ.get(ERROR_FILE_ENV)
    if not path:
        return False
    try:
        fd = os.open(path + ".tmp" + str(os.getpid()), os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(message + "\n")
        try:
            os.link(path + ".tmp" + str(os.getpid()), path)  # atomic, fails if another rank was first
        except FileExistsError:
            pass
        finally:
            os.unlink(path + ".tmp" + str(os.getpid()))
    except OSError:
        return False
    return True
