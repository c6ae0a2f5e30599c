"""The `rlchat` commands that are not pipeline stages: status, plan, score, export, chat, report, new-model,
import-gguf, demo-data and sample-pairs. Registered on rlchat.cli's app (cli.py imports this module right after the stage commands, so --help
lists them in this order); each imports its module inside the command, so `rlchat --help` stays fast.
Imports: cli (app, fail), errors; each command's own module inside it.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from rlchat.cli import app, fail
from rlchat.errors import RlchatError


@app.command("status", epilog="Example: rlchat status runs/demo --json")
def status(
    run_dir: Annotated[Path, typer.Argument(help="The run directory.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
):
    """Show the stages of a run directory: status, key metric, wall time."""
    from rich.table import Table

    from rlchat.rundir import RunDir
    from rlchat.status import summary_rows

    try:
        run = RunDir(run_dir)
        if not run.exists():
            raise RlchatError(f"no run directory at {run_dir} (no run.json)",
                              "pass the --run-dir you gave to `rlchat sft` (or another stage)")
        manifest = run.manifest()
    except RlchatError as err:
        fail(err)
    if json_out:
        print(json.dumps(manifest, indent=1, default=str))
        return
    table = Table(title=f"rlchat run {run_dir}")
    for col in ("stage", "status", "key metric", "time"):
        table.add_column(col)
    for row in summary_rows(manifest):
        table.add_row(*[str(x) for x in row])
    # the table is the command's output: stdout (so `rlchat status RUN > s.txt` keeps it); messages stay on
    # stderr. Redirected, it is not cut to 80 columns (rich's default width without a terminal).
    from rich.console import Console

    Console(highlight=False, width=None if sys.stdout.isatty() else 200).print(table)


@app.command("plan", epilog="Example: rlchat plan recipes/qwen2.5-0.5b-instruct-rlhf.yaml")
def plan(
    recipe: Annotated[Path, typer.Argument(help="The recipe YAML to check.")],
    run_dir: Annotated[Optional[str], typer.Option(help="Override the recipe's run_dir.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the plan as JSON on stdout.")] = False,
):
    """Dry-run a whole recipe: validate every setting and local dataset, count parameters, load no weights."""
    from rlchat.plan import plan_recipe, print_plan

    try:
        entries = plan_recipe(str(recipe), {"run_dir": run_dir} if run_dir else None)
    except RlchatError as err:
        fail(err)
    print_plan(entries)
    if json_out:
        print(json.dumps(entries, indent=1, default=str))


@app.command("score", epilog="Example: rlchat score runs/demo --dataset .demo/data/pairs.jsonl --out scores.jsonl")
def score_cmd(
    run_dir: Annotated[Path, typer.Argument(help="The run directory (its reward stage must be done).")],
    dataset: Annotated[str, typer.Option(help="Rows to score: prompt+completion, prompt+chosen/rejected, "
                                         "or messages (file, save_to_disk dir or Hub id).")],
    out: Annotated[Path, typer.Option(help="JSONL file to write {prompt, completion, score} rows to.")],
    split: Annotated[str, typer.Option(help="Dataset split.")] = "train",
    dataset_config: Annotated[Optional[str], typer.Option(help="Dataset configuration (subset) name.")] = None,
    batch_size: Annotated[int, typer.Option(help="Rows scored per forward pass.")] = 16,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow the model's own code to run.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
):
    """Score prompt/response rows with the run's trained reward model, to inspect what it likes."""
    from rich.markup import escape

    from rlchat.progress import console

    try:
        from rlchat.score import score

        result = score(run_dir, dataset, out, split=split, batch_size=batch_size, dataset_config=dataset_config,
                       trust_remote_code=trust_remote_code)
    except RlchatError as err:
        fail(err)
    console.print(f"[bold green]score:[/] {escape(str(result.get('summary', '')))}", soft_wrap=True)
    if json_out:
        print(json.dumps(result, indent=1, default=str))


@app.command("export", epilog="Example: rlchat export runs/demo exported/demo-ppo --stage ppo")
def export_cmd(
    run_dir: Annotated[Path, typer.Argument(help="The run directory.")],
    out: Annotated[Path, typer.Argument(help="Directory for the standalone model (new or empty).")],
    stage: Annotated[str, typer.Option(help="Which policy: ppo (SFT and PPO adapters merged; without an SFT stage, "
                                            "PPO's adapter merged into the --model it started from), ppo-best (the "
                                            "best held-out checkpoint of ppo --eval-every), grpo, rloo, dpo or sft."
                                       )] = "ppo",
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty OUT (swapped in only once complete).")] = False,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow the model's own code to run.")] = False,
):
    """Merge a stage's LoRA adapters into the base and write a standalone model + tokenizer (safetensors) that
    AutoModelForCausalLM.from_pretrained, vLLM and TGI load."""
    try:
        from rlchat.export import export

        export(run_dir, stage, out, overwrite=overwrite, trust_remote_code=trust_remote_code)  # prints its summary
    except RlchatError as err:
        fail(err)


@app.command("chat", epilog='Example: rlchat chat runs/demo --stage ppo --prompt "Tell me about the red apple."')
def chat_cmd(
    run_dir: Annotated[Path, typer.Argument(help="The run directory.")],
    stage: Annotated[str, typer.Option(help="Which policy: ppo, ppo-best (ppo --eval-every's best), grpo, rloo, "
                                            "dpo or sft.")] = "ppo",
    prompt: Annotated[Optional[str], typer.Option(help="Answer this one prompt and exit (else interactive).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Maximum tokens per reply.")] = 256,
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 = greedy.")] = 0.7,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling; 1 = off.")] = 1.0,
    system: Annotated[Optional[str], typer.Option(help="System message at the start of the chat.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed for sampling.")] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow the model's own code to run.")] = False,
):
    """Talk to a run's policy: interactive multi-turn chat with streamed tokens (/reset, /exit), or one answer
    with --prompt (printed on stdout)."""
    try:
        from rlchat.export import chat

        chat(run_dir, stage, prompt=prompt, max_new_tokens=max_new_tokens, temperature=temperature,
             top_p=top_p, system=system, seed=seed, trust_remote_code=trust_remote_code)
    except RlchatError as err:
        fail(err)


@app.command("report", epilog="Example: rlchat report runs/demo")
def report_cmd(run_dir: Annotated[Path, typer.Argument(help="The run directory.")]):
    """(Re)draw the training plots and report.md from a run directory's metrics (eval writes them too)."""
    from rlchat.progress import console

    try:
        from rlchat.report import render

        out = render(run_dir)
    except RlchatError as err:
        fail(err)
    for name, path in out.get("plots", {}).items():
        console.print(f"  {name}: {path}")
    console.print(f"[bold green]report:[/] {out.get('report_md')}")


@app.command("new-model", epilog="Example: rlchat new-model .demo/model --arch llama --size demo --corpus demo")
def new_model(
    out: Annotated[Path, typer.Argument(help="Directory to write the model and tokenizer to.")],
    arch: Annotated[str, typer.Option(help="Architecture: llama, qwen2 or gpt2.")] = "llama",
    size: Annotated[str, typer.Option(help="Size preset (see rlchat.tiny.SIZES): tiny, small, demo.")] = "tiny",
    corpus: Annotated[str, typer.Option(help="Text to train the BPE tokenizer on: a .txt/.jsonl file, "
                                        "or 'demo' for the built-in demo task's text.")] = "demo",
    seed: Annotated[int, typer.Option(help="Random seed (same seed -> identical model).")] = 0,
    vocab_size: Annotated[int, typer.Option(help="Tokenizer vocabulary size.")] = 2000,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing non-empty OUT.")] = False,
):
    """Build a tiny random-init causal LM and a BPE tokenizer offline (for tests, the demo and smoke tests)."""
    from rlchat.progress import console

    try:
        from rlchat.rundir import check_output_path

        check_output_path(out, "OUT")
        if out.exists() and not out.is_dir():
            raise RlchatError(f"{out} exists and is a file", "choose a directory path for the model")
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise RlchatError(f"{out} exists and is not empty", "choose another directory or pass --overwrite")
        from rlchat import tiny
        from rlchat.progress import quiet_libraries

        quiet_libraries()
        if size not in tiny.SIZES:
            raise RlchatError(f"unknown size '{size}'", f"use one of: {', '.join(tiny.SIZES)}")
        if corpus != "demo" and not Path(corpus).is_file():
            raise RlchatError(f"corpus file not found: {corpus}", "pass a .txt or .jsonl file, or 'demo'")
        path = tiny.build_tiny_model(out, arch=arch, size=size, corpus=None if corpus == "demo" else corpus,
                                     seed=seed, vocab_size=vocab_size, overwrite=overwrite)
    except RlchatError as err:
        fail(err)
    except ValueError as err:  # bad arch etc. from the builder
        fail(RlchatError(str(err), "see `rlchat new-model --help`"))
    console.print(f"[bold green]new-model:[/] {arch}/{size} model and tokenizer written to {path}")


@app.command("import-gguf", epilog="Example: rlchat import-gguf SmolLM2-135M-Instruct.Q4_1.gguf "
             ".models/smollm2-135m-instruct")
def import_gguf(
    file: Annotated[Path, typer.Argument(help="The llama.cpp .gguf model file.")],
    out: Annotated[Path, typer.Argument(help="Directory to write the model and tokenizer to (new or empty).")],
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty OUT (swapped in only once complete).")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print what was converted as JSON on stdout.")] = False,
):
    """Convert a GGUF model file into a safetensors model directory + tokenizer (float32, dequantised) that
    every --model and AutoModelForCausalLM.from_pretrained load. (Stages also take the .gguf directly.)"""
    from rlchat.progress import console

    try:
        from rlchat import gguf
        from rlchat.progress import quiet_libraries

        quiet_libraries()
        result = gguf.convert(file, out, overwrite=overwrite)
    except RlchatError as err:
        fail(err)
    quants = ", ".join(f"{k} x{v}" for k, v in result["quantizations"].items())
    console.print(f"[bold green]import-gguf:[/] {result['architecture']} model, {result['parameters'] / 1e6:.0f}M "
                  f"parameters ({quants}), pad {result['pad_token']!r}, eos {result['eos_token']!r}, written to "
                  f"{result['path']} in {result['seconds']:.0f}s", soft_wrap=True, highlight=False)
    if json_out:
        print(json.dumps(result, indent=1, default=str))


@app.command("demo-data", epilog="Example: rlchat demo-data .demo/data   |   rlchat demo-data .sums/data --task sums")
def demo_data(
    out: Annotated[Path, typer.Argument(help="Directory to write sft.jsonl, pairs.jsonl and prompts.jsonl to.")],
    seed: Annotated[int, typer.Option(help="Random seed of the generator.")] = 0,
    task: Annotated[str, typer.Option(help="demo: 'tell me about the <color> <thing>', chat messages "
                                           "(rlchat/demo/task.py); sums: 'What is 23 plus 45?', plain-text "
                                           "prompt/completion rows and pairs, plus corpus.txt for new-model "
                                           "(rlchat/demo/sums.py); readable: prompts.jsonl and eval_prompts.jsonl "
                                           "(held-out topics) of rlchat.tasks.readable, for real models (pairs: "
                                           "`rlchat sample-pairs`).")] = "demo",
):
    """Write a built-in task's data (SFT rows, preference pairs, PPO prompts, held-out prompts)."""
    from rlchat.progress import console

    try:
        from rlchat.rundir import check_output_path

        if task not in ("demo", "sums", "readable"):
            raise RlchatError(f"unknown task '{task}'", "pass --task demo, --task sums or --task readable")
        if task == "readable":
            from rlchat.tasks.readable import write_data as write_demo_data
        elif task == "sums":
            from rlchat.demo.sums import write_sums_data as write_demo_data
        else:
            from rlchat.demo.task import write_demo_data
        check_output_path(out, "OUT")
        if out.exists() and not out.is_dir():
            raise RlchatError(f"{out} exists and is a file", "choose a directory path for the demo data")
        try:
            paths = write_demo_data(out, seed=seed)
        except OSError as err:
            raise RlchatError(f"could not write the demo data to {out}: {(err.strerror or str(err)).lower()}",
                              "choose a directory you can write to") from None
    except RlchatError as err:
        fail(err)
    console.print("[bold green]demo-data:[/] " + ", ".join(f"{k}={v}" for k, v in paths.items()))


@app.command("sample-pairs", epilog="Example: rlchat sample-pairs --model .models/smollm2-135m-instruct --dataset "
             "data/prompts.jsonl --judge rlchat.tasks.readable:judge --out data/pairs.jsonl --samples 4")
def sample_pairs_cmd(
    model: Annotated[str, typer.Option(help="The model that answers: a local directory, a .gguf file or a Hub id.")],
    dataset: Annotated[str, typer.Option(help="Prompts: a file, save_to_disk dir or Hub id with a 'prompt', "
                                         "'messages' or 'text' column.")],
    judge: Annotated[str, typer.Option(help="Judge 'module:function' or 'path/file.py:function', called as "
                                       "f(prompts, completions) -> list[float] (higher is better).")],
    out: Annotated[Path, typer.Option(help="JSONL file to write the pairs to (TRL preference format).")],
    samples: Annotated[int, typer.Option(help="Answers per prompt; the pair is the judge's best against its "
                                         "worst (more: clearer margins, k times the generation).")] = 2,
    pairs: Annotated[str, typer.Option(help="best-worst: one pair per prompt, its best answer against its worst; "
                                       "all: every two answers (k(k-1)/2 per prompt), more pairs from the same "
                                       "samples.")] = "best-worst",
    label_noise: Annotated[float, typer.Option(help="Probability of swapping chosen and rejected (simulated "
                                               "labeller disagreement), in [0, 0.5).")] = 0.0,
    min_margin: Annotated[float, typer.Option(help="Skip pairs whose judge scores differ by this much or less.")] = 0.0,
    max_prompts: Annotated[Optional[int], typer.Option(help="Use at most this many prompts (the first ones).",
                                                       show_default=False)] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Maximum new tokens per answer.")] = 64,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (> 0: the answers must differ).")] = 1.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling; 1 = off.")] = 1.0,
    batch_size: Annotated[int, typer.Option(help="Answers generated per batch (--samples per prompt).")] = 16,
    split: Annotated[str, typer.Option(help="Dataset split.")] = "train",
    dataset_config: Annotated[Optional[str], typer.Option(help="Dataset configuration (subset) name.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed (sampling and label noise).")] = 0,
    threads: Annotated[Optional[int], typer.Option(min=1, help="CPU threads for torch (default: as the stage "
                                                   "commands choose).", show_default=False)] = None,
    dtype: Annotated[str, typer.Option(help="dtype the model weights are loaded in: auto = bfloat16 on a GPU that "
                                       "supports it, else float32; bfloat16 also on CPUs with bf16 matmuls "
                                       "(AVX512-BF16, AMX): about 1.3x faster generation.")] = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out file.")] = False,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow the model's own code to run.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
):
    """Sample answers from a model, label best against worst with a judge, write preference pairs (RLAIF)."""
    from rich.markup import escape

    from rlchat.cli import set_threads
    from rlchat.progress import console

    try:
        from rlchat.sample_pairs import sample_pairs

        set_threads(threads)
        result = sample_pairs(model, dataset, judge, out, split=split, dataset_config=dataset_config,
                              max_prompts=max_prompts, samples=samples, label_noise=label_noise,
                              min_margin=min_margin, max_new_tokens=max_new_tokens, temperature=temperature,
                              top_p=top_p, batch_size=batch_size, seed=seed, overwrite=overwrite,
                              trust_remote_code=trust_remote_code, dtype=dtype, pairing=pairs)
    except RlchatError as err:
        fail(err)
    console.print(f"[bold green]sample-pairs:[/] {escape(result['summary'])}", soft_wrap=True, highlight=False)
    if json_out:
        print(json.dumps(result, indent=1, default=str))
