"""The `rlchat` command line: one subcommand per pipeline stage plus run-directory tools (rlchat/cli_tools.py).

The stage commands are generated from the config dataclasses in `rlchat.config`, so every flag's help text is
written once (in the dataclass field) and `--config recipe.yaml` and the flags can never drift apart.
Heavy libraries (torch, transformers, trl) are imported inside the commands: `rlchat --help` stays fast.

Errors a user can fix (`rlchat.errors.RlchatError`) are printed as one line, exit code 2, no traceback. Any other
exception is the last line of defence's: one line naming the command, the error and a log file with the traceback,
exit code 1. Ctrl-C and SIGTERM print "interrupted: rerun the same command to resume" and exit 130 / 143.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Annotated, Optional

import typer

from rlchat import __version__
from rlchat.errors import RlchatError

try:  # typer >= 0.2x carries its own copy of click
    from typer._click.exceptions import ClickException, NoSuchOption, UsageError
except ImportError:  # pragma: no cover
    from click.exceptions import ClickException, NoSuchOption, UsageError


class _OneLineErrors(typer.core.TyperGroup):
    """Usage errors (unknown flag, bad value, missing argument) as one `error:` line, exit code 2, like every other
    rlchat error, instead of click's multi-line box."""

    def invoke(self, ctx):
        # typer turns KeyboardInterrupt into a silent exit 130 before main() could see it: catch it here, where the
        # command ran (a stage has marked itself "interrupted" by now), and say how to go on
        from rlchat.errors import INTERRUPTED, interrupt_exit_code

        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as err:
            print(INTERRUPTED, file=sys.stderr)
            raise typer.Exit(interrupt_exit_code(err)) from None

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        from rlchat.errors import INTERRUPTED, interrupt_exit_code, unexpected

        on_sigterm()
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except (KeyboardInterrupt, typer.Abort) as err:
            # click turns Ctrl-C into Abort ("Aborted!", exit 1); a stage has marked itself "interrupted" by now
            if isinstance(err, typer.Abort) and not isinstance(err.__context__ or err.__cause__, KeyboardInterrupt):
                print("Aborted!", file=sys.stderr)
                sys.exit(1)
            print(INTERRUPTED, file=sys.stderr)
            sys.exit(interrupt_exit_code(err))
        except UsageError as err:
            from rich.markup import escape

            from rlchat.progress import console

            if not err.format_message().strip():  # `rlchat` alone: the help was printed already
                sys.exit(err.exit_code)
            cmd = err.ctx.command_path if err.ctx is not None else "rlchat"
            console.print(f"[bold red]error:[/] {escape(_usage_problem(err))}. Fix: see "
                          f"`{escape(cmd)} --help`.", soft_wrap=True, highlight=False)
            sys.exit(err.exit_code)
        except ClickException as err:
            err.show()
            sys.exit(err.exit_code)
        except Exception as err:  # noqa: BLE001 - the last line of defence: one line + a log, never a traceback
            from rich.markup import escape

            from rlchat.progress import console

            from rlchat.stages.common import known_error

            words = [a for a in (sys.argv[1:] if args is None else list(args)) if not str(a).startswith("-")]
            known = known_error(str(words[0]) if words else "rlchat", err)  # a full disk while export writes, ...
            line = (known or unexpected(f"rlchat {words[0]}" if words else "rlchat", err)).one_line()
            console.print(f"[bold red]error:[/] {escape(line)}", soft_wrap=True, highlight=False)
            sys.exit(known.exit_code if known is not None else 1)
        sys.exit(rv if isinstance(rv, int) else 0)


def _usage_problem(err: UsageError) -> str:
    """The problem a usage error reports. An unknown option gets rlchat's own hint instead of click's "did you
    mean" (which offers --logging-steps for --learning-rate): the rlchat name of a TRL/transformers argument
    (config_checks.TRL_NAMES), the flag spelled with '-' for '_', or a close flag name."""
    from rlchat.config_checks import name_hint

    if not isinstance(err, NoSuchOption) or err.ctx is None:
        return err.format_message().rstrip(".")
    flags = {}  # "max_steps" -> "--max-steps", for every long option of the command
    for param in err.ctx.command.params:
        for opt in list(getattr(param, "opts", [])) + list(getattr(param, "secondary_opts", [])):
            if opt.startswith("--"):
                flags[opt[2:].replace("-", "_")] = opt
    hint = name_hint(err.option_name, list(flags), spell=lambda name: flags[name])
    return f"no such option {err.option_name}" + (f" ({hint})" if hint else "")


def _raise_terminated(signum, frame):
    from rlchat.errors import Terminated

    raise Terminated()


def on_sigterm() -> None:
    """SIGTERM (a scheduler's stop, `kill PID`) raises errors.Terminated in the main thread, so a stage ends the way
    Ctrl-C ends it: marked "interrupted", the `interrupted:` line printed, exit 143. Left alone when another handler
    is installed already (a test harness, an embedding program)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    try:
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, _raise_terminated)
    except (ValueError, OSError):
        pass


app = typer.Typer(
    cls=_OneLineErrors,
    name="rlchat",
    help="RLHF pipelines from the shell: supervised fine-tuning, reward model, PPO with LoRA, evaluation. "
    "Every stage reads and writes one shared run directory (--run-dir).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

# stage name -> (command name, module with run(cfg), one-line help, example)
STAGE_COMMANDS = {
    "sft": (
        "sft",
        "rlchat.stages.sft",
        "Supervised fine-tuning with TRL's SFTTrainer (LoRA by default, --full for all weights).",
        "rlchat sft --run-dir runs/demo --model .demo/model --dataset .demo/data/sft.jsonl --full --epochs 3",
    ),
    "reward": (
        "train-reward",
        "rlchat.stages.reward",
        "Train a reward model on preference pairs with TRL's RewardTrainer, starting from the run's SFT model.",
        "rlchat train-reward --run-dir runs/demo --dataset .demo/data/pairs.jsonl",
    ),
    "ppo": (
        "ppo",
        "rlchat.stages.ppo",
        "PPO on one shared base model with LoRA adapters for policy, value and reward.",
        "rlchat ppo --run-dir runs/demo --dataset .demo/data/prompts.jsonl --episodes 512",
    ),
    # grpo and rloo run the PPO stage's loop (one module: checkpoints, resume, rewards, multi-process) with the
    # group advantages of rlchat/group_step.py; each writes its own stage directory RUN/grpo/, RUN/rloo/
    "grpo": (
        "grpo",
        "rlchat.stages.ppo",
        "GRPO: several responses per prompt, advantage = (reward - group mean) / group std; no value model.",
        "rlchat grpo --run-dir runs/demo --dataset .demo/data/prompts.jsonl --episodes 512 --num-generations 4",
    ),
    "rloo": (
        "rloo",
        "rlchat.stages.ppo",
        "RLOO: several responses per prompt, each baselined by the mean reward of the others; no value model.",
        "rlchat rloo --run-dir runs/demo --dataset .demo/data/prompts.jsonl --episodes 512 --num-generations 4",
    ),
    "dpo": (
        "dpo",
        "rlchat.stages.dpo",
        "DPO on preference pairs with TRL's DPOTrainer: a LoRA policy from the run's SFT model, no reward model "
        "(the reference is the SFT model: the adapter switched off).",
        "rlchat dpo --run-dir runs/demo --dataset .demo/data/pairs.jsonl --beta 0.1",
    ),
    "eval": (
        "eval",
        "rlchat.stages.evaluate",
        "Generate with every policy in the run, score, compare (win rates, KL), write report and plots.",
        "rlchat eval --run-dir runs/demo --dataset .demo/data/eval_prompts.jsonl --judge rlchat.demo.task:judge",
    ),
}


def fail(err: RlchatError) -> typing.NoReturn:
    """Print a user error as one line on stderr and exit with its code (2)."""
    from rich.markup import escape

    from rlchat.progress import console

    lines = err.lines()  # one line; a ConfigError with several problems: a head and one line per problem
    console.print(f"[bold red]error:[/] {escape(lines[0])}", soft_wrap=True, highlight=False)
    for line in lines[1:]:
        console.print(escape(line), soft_wrap=True, highlight=False)
    raise typer.Exit(err.exit_code)


def _option_type(hint) -> type:
    """The click-friendly type of a dataclass field's option: lists are given as one comma-separated string
    (config.resolve splits it, as it splits the same string in a recipe)."""
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin in (typing.Union, types.UnionType):
        if any(typing.get_origin(a) is list or a is list for a in args):
            return str
        return _option_type(args[0]) if args else str
    if hint in (bool, int, float, str):
        return hint
    return str


def _option(name: str, default, annotation, *decls: str, help: str, **extra) -> inspect.Parameter:
    """A keyword-only parameter of a generated command, shown under "Run" in --help."""
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[
        annotation, typer.Option(*decls, help=help, rich_help_panel="Run", **extra)])


def _run_options() -> list[inspect.Parameter]:
    """The options every stage command has besides its config fields."""
    return [
        _option("config", None, Optional[Path], "--config", "-c", help="Recipe YAML: shared keys plus a section per "
                "stage. Explicit flags override it."),
        _option("json_out", False, bool, "--json", help="Print the final metrics as JSON on stdout."),
        _option("num_processes", None, Optional[int], "--num-processes", show_default=False, help="Run data "
                "parallel in N processes (one per GPU; gloo on CPU): re-launches this command through `accelerate "
                "launch`. --batch-size is per process."),
        _option("accelerate_config", None, Optional[Path], "--accelerate-config", show_default=False,
                help="accelerate config file (DeepSpeed ZeRO / FSDP / multi-GPU; see recipes/accelerate/) to "
                "re-launch this command with."),
        _option("threads", None, Optional[int], "--threads", min=1, show_default=False, help="CPU threads for "
                "torch. Default: one per core (per process), but 1 when the machine is already busy (load average "
                ">= cores), which is several times faster there; OMP_NUM_THREADS, if set, is left alone."),
        _option("dry_run", False, bool, "--dry-run", help="Validate the settings and the dataset, print the plan; "
                "load no weights, write nothing."),
    ]


def _default_text(f: dataclasses.Field) -> str | None:
    """A config field's default as --help shows it ("0.0002", "all-linear", "no-full"); None (nothing shown) for
    None defaults, whose meaning the help text says ("None = the run's SFT model")."""
    default = f.default
    if default is None or default is dataclasses.MISSING:
        return None
    if isinstance(default, bool):
        flag = f.name.replace("_", "-")
        return flag if default else f"no-{flag}"
    if isinstance(default, float):
        return f"{default:g}"
    if isinstance(default, (list, tuple)):
        return ",".join(map(str, default))
    return str(default)


def _field_options(cls) -> list[inspect.Parameter]:
    """One option per field of the stage's config dataclass (help text and default from the field)."""
    from rich.markup import escape

    from rlchat.config import TrainConfig

    hints = typing.get_type_hints(cls)
    common = {f.name for f in dataclasses.fields(TrainConfig)}
    params = []
    hidden = getattr(cls, "PPO_ONLY", ())  # grpo/rloo: PPO's value-model and GAE fields are not theirs
    for f in (f for f in dataclasses.fields(cls) if f.name not in hidden):
        typ = _option_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        decls = [f"{flag}/--no-{f.name.replace('_', '-')}"] if typ is bool else [flag]
        panel = "Run" if f.name in ("run_dir", "overwrite") else (
            "Common training options" if f.name in common else "Stage options")
        # the option's own default stays None ("not given"), so that only explicit flags override a recipe; --help
        # shows the dataclass default instead, styled as typer shows the other commands' defaults
        help_text = escape(f.metadata.get("help", ""))
        choices = f.metadata.get("choices")
        if choices and not all(re.search(rf"(?<![\w-]){re.escape(c)}(?![\w-])", help_text) for c in choices):
            help_text += f" (one of: {', '.join(choices)})"
        shown = _default_text(f)
        if shown is not None:
            help_text += f" [dim]\\[default: {escape(shown)}][/dim]"
        params.append(inspect.Parameter(
            f.name, inspect.Parameter.KEYWORD_ONLY, default=None,
            annotation=Annotated[Optional[typ], typer.Option(*decls, help=help_text, rich_help_panel=panel,
                                                             show_default=False)],
        ))
    return params


def _stage_command(stage: str):
    """Register the command of `stage` (STAGE_COMMANDS): its flags are the config's fields plus _run_options."""
    from rlchat.config import STAGE_CONFIGS

    name, module, short_help, example = STAGE_COMMANDS[stage]

    def command(**kwargs):
        recipe = kwargs.pop("config")
        json_out = kwargs.pop("json_out")
        dry_run = kwargs.pop("dry_run")
        num_processes = kwargs.pop("num_processes")
        accelerate_config = kwargs.pop("accelerate_config")
        threads = kwargs.pop("threads")
        overrides = {key: value for key, value in kwargs.items() if value is not None}
        from rlchat import launch

        if num_processes is not None and not 1 <= num_processes <= 1024:
            from rlchat.errors import ConfigError

            fail(ConfigError(f"--num-processes must be between 1 and 1024, got {num_processes}",
                             "pass the number of processes to start (usually the number of GPUs)"))
        if not dry_run and launch.should_relaunch(num_processes, accelerate_config):
            argv = stage_argv(name, recipe, overrides, json_out) + (["--threads", str(threads)] if threads else [])
            try:
                code = launch.relaunch(argv, num_processes, str(accelerate_config) if accelerate_config else None)
            except RlchatError as err:
                fail(err)
            raise typer.Exit(code)
        if not dry_run:
            set_threads(threads)
        run_stage(stage, module, str(recipe) if recipe else None, overrides, json_out, dry_run)

    command.__signature__ = inspect.Signature(_run_options() + _field_options(STAGE_CONFIGS[stage]))
    command.__name__ = name.replace("-", "_")
    command.__doc__ = f"{short_help}\n\nExample:\n\n    {example}"
    app.command(name, help=command.__doc__, short_help=short_help,
                epilog=f"Example: {example}")(command)


def stage_argv(command: str, recipe, overrides: dict, json_out: bool) -> list[str]:
    """The command line (after `rlchat`) that runs the stage with these settings, for a re-launch."""
    argv = [command]
    if recipe:
        argv += ["--config", str(recipe)]
    for key, value in overrides.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, (list, tuple)):
            argv += [flag, ",".join(str(v) for v in value)]
        else:
            argv += [flag, str(value)]
    if json_out:
        argv.append("--json")
    return argv


def set_threads(threads: int | None) -> None:
    """torch's CPU threads for this stage process (rlchat/threads.py), with a one-line note on a busy machine."""
    from rich.markup import escape

    from rlchat import dist
    from rlchat import threads as cpu_threads
    from rlchat.progress import console

    n_threads, note = cpu_threads.choose(threads, dist.world_size())
    cpu_threads.apply(n_threads)
    if note:
        console.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True, highlight=False)


def run_stage(stage: str, module: str, recipe: str | None, overrides: dict, json_out: bool,
              dry_run: bool = False) -> dict:
    """Resolve the config, run the stage (or only plan it), print its summary (and JSON with --json)."""
    from rich.markup import escape

    from rlchat.config import STAGE_CONFIGS, resolve
    from rlchat.progress import console

    try:
        cfg = resolve(STAGE_CONFIGS[stage], stage, recipe, overrides)
        if dry_run:
            from rlchat.plan import plan_stage, print_plan

            entry = plan_stage(stage, cfg)
            print_plan([entry])
            if json_out:
                print(json.dumps(entry, indent=1, default=str))
            return entry
        from rlchat import dist

        dist.die_with_launcher()
        result = importlib.import_module(module).run(cfg)
        dist.finish()
    except RlchatError as err:
        from rlchat import dist, launch

        # multi-process: every process hits the same validation errors; the main one reports them (or hands
        # them to the re-launching parent), the others exit quietly unless their error is their own (memory)
        if launch.report_child_error("\n".join(err.lines())):
            raise typer.Exit(err.exit_code)
        if not dist.is_main():
            if "OutOfMemory" in type(err).__name__:  # this process's own problem: say which process it was
                print(f"error (process {dist.rank()}): {err.one_line()}", file=sys.stderr)
            raise typer.Exit(err.exit_code)
        fail(err)
    from rlchat import dist

    if not dist.is_main():
        return result
    summary = result.get("summary") if isinstance(result, dict) else None
    if summary:
        console.print(f"[bold green]{stage}:[/] {escape(summary)}", soft_wrap=True, highlight=False)
    if json_out:
        print(json.dumps(result, indent=1, default=str))
    return result


for _stage in STAGE_COMMANDS:
    _stage_command(_stage)

from rlchat import cli_tools  # noqa: E402,F401  (registers status, plan, score, export, chat, report, ...)


def _version(value: bool):
    if value:
        print(f"rlchat {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
):
    """RLHF pipelines from the shell."""


def main():
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app()
    except KeyboardInterrupt as err:  # between click's handlers (at start-up or exit)
        from rlchat.errors import INTERRUPTED, interrupt_exit_code

        print(INTERRUPTED, file=sys.stderr)
        sys.exit(interrupt_exit_code(err))


if __name__ == "__main__":
    main()
