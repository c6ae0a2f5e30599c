"""Bad input to every command: exit code 2, one `error: ...` line that names the problem, no traceback, and the
run directory (or output directory) byte-for-byte unchanged.

Each case is a small builder in CASES: it makes its bad files under a fresh tmp directory and returns the CLI
arguments, a phrase the error line must contain, and the directory that must be left untouched. The shared
fixtures are built once per module through the CLI itself: a finished tiny SFT run with a reward stage on top.
`tests/test_cli.py` keeps its SFT cases (missing/empty/malformed dataset, unknown recipe key, zero lr, ...);
none is repeated here. README.md (Troubleshooting) lists every case with its fix.
"""
from __future__ import annotations

import builtins
import errno
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from typer.testing import CliRunner

from rlchat.cli import app
from tests.conftest import snapshot

runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # two cores shared with other jobs: one intra-op thread is several times faster than two fighting ones
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def invoke(args) -> "object":
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model, demo_data) -> Path:
    """A run directory with finished sft (LoRA, 2 steps) and reward (LoRA, 2 steps) stages."""
    run = tmp_path_factory.mktemp("bad-inputs") / "run"
    common = ["--run-dir", run, "--max-steps", "2", "--batch-size", "4", "--eval-fraction", "0", "--save-steps",
              "100", "--lora-r", "4", "--lora-alpha", "8"]
    res = invoke(["sft", "--model", tiny_model, "--dataset", demo_data["sft"], *common])
    assert res.exit_code == 0, res.output
    res = invoke(["train-reward", "--dataset", demo_data["pairs"], *common])
    assert res.exit_code == 0, res.output
    return run


@dataclass
class Ctx:
    """What a case builder gets: a fresh tmp dir, the tiny model, the demo data and the shared finished run."""

    tmp: Path
    model: Path
    data: dict
    run: Path
    monkeypatch: pytest.MonkeyPatch
    just_before: list = None  # callables run after the snapshots, right before the command

    def file(self, name: str, text: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
        return path

    def jsonl(self, name: str, rows: list[dict]) -> Path:
        return self.file(name, "".join(json.dumps(r) + "\n" for r in rows))

    def copy_run(self, name: str = "run-copy") -> Path:
        dst = self.tmp / name
        shutil.copytree(self.run, dst)
        return dst

    def edit_manifest(self, run: Path, fn: Callable[[dict], None]) -> None:
        manifest = json.loads((run / "run.json").read_text())
        fn(manifest)
        (run / "run.json").write_text(json.dumps(manifest, indent=2))

    def truncate(self, path: Path, keep: int | None = None) -> None:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2 if keep is None else keep])

    def sft_only_run(self) -> Path:
        run = self.copy_run("sft-only")
        shutil.rmtree(run / "reward")
        self.edit_manifest(run, lambda m: m["stages"].pop("reward"))
        return run

    def model_copy(self, name: str) -> Path:
        dst = self.tmp / name
        shutil.copytree(self.model, dst)
        return dst


# name -> builder(ctx) -> (args, phrase the error line must contain, directory that must stay unchanged)
Case = Callable[[Ctx], tuple[list, str, Path]]
CASES: dict[str, Case] = {}
# cases that still fail (xfail until fixed); empty when every bad input is handled
KNOWN_BUGS: dict[str, str] = {}


def case(name: str):
    def register(fn: Case) -> Case:
        CASES[name] = fn
        return fn
    return register


def sft_args(c: Ctx, run: Path | None = None, **over) -> list:
    args = {"--run-dir": run or c.tmp / "new-run", "--model": c.model, "--dataset": c.data["sft"]}
    args.update(over)
    return ["sft", *[x for k, v in args.items() if v is not None for x in (k, v)]]


# ---- sft ----------------------------------------------------------------------------------------------------


@case("sft: recipe is not valid YAML")
def _(c):
    recipe = c.file("bad.yaml", "sft: [unclosed\n")
    return sft_args(c) + ["--config", recipe], "not valid YAML", c.tmp


@case("sft: wrong type in the recipe")
def _(c):
    recipe = c.file("typed.yaml", "sft:\n  batch_size: lots\n")
    return sft_args(c) + ["--config", recipe], "batch_size must be an integer", c.tmp


@case("sft: eval_fraction out of range")
def _(c):
    return sft_args(c) + ["--eval-fraction", "1"], "eval_fraction", c.tmp


@case("sft: lora_dropout out of range")
def _(c):
    return sft_args(c) + ["--lora-dropout", "1.5"], "lora_dropout", c.tmp


@case("sft: .bin-only model")
def _(c):
    model = c.model_copy("bin-only")
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_bytes(b"not really a pickle")
    return sft_args(c, **{"--model": model}), "safetensors only", c.tmp


@case("sft: custom model code without --trust-remote-code")
def _(c):
    model = c.model_copy("custom-code")
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="rlchat_custom", auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                                                        "AutoModelForCausalLM": "modeling_custom.CustomLM"})
    (model / "config.json").write_text(json.dumps(config))
    marker = c.tmp / "code-ran"
    for mod in ("configuration_custom", "modeling_custom"):
        (model / f"{mod}.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    return sft_args(c, **{"--model": model}), "--trust-remote-code", c.tmp


@case("sft: PEFT adapter given as the model")
def _(c):
    return sft_args(c, **{"--model": c.run / "sft" / "adapter"}), "PEFT adapter", c.run


@case("sft: damaged model weights")
def _(c):
    model = c.model_copy("damaged-model")
    c.truncate(model / "model.safetensors")
    return sft_args(c, **{"--model": model}), "model.safetensors is damaged", c.tmp


@case("sft: unsupported dataset file type")
def _(c):
    return sft_args(c, **{"--dataset": c.file("chats.txt", "hello\n")}), "unsupported dataset file type", c.tmp


@case("sft: dataset is not UTF-8")
def _(c):
    return sft_args(c, **{"--dataset": c.file("latin1.jsonl", b'{"text": "caf\xe9"}\n')}), "UTF-8", c.tmp


@case("sft: damaged save_to_disk directory")
def _(c):
    saved = c.tmp / "saved"
    saved.mkdir()
    (saved / "state.json").write_text("{not json")
    return sft_args(c, **{"--dataset": saved}), "save_to_disk", c.tmp


@case("sft: unreadable dataset")
def _(c):
    path = c.jsonl("secret.jsonl", [{"text": "hello"}])
    real_open, real_io_open = builtins.open, io.open

    def deny(opener):
        def patched(file, *args, **kwargs):
            if str(file) == str(path):
                raise PermissionError(errno.EACCES, "Permission denied", str(file))
            return opener(file, *args, **kwargs)
        return patched

    def refuse():  # root reads every file whatever its mode, so refuse it the way a permission error would
        c.monkeypatch.setattr(builtins, "open", deny(real_open))
        c.monkeypatch.setattr(io, "open", deny(real_io_open))

    c.just_before.append(refuse)
    return sft_args(c, **{"--dataset": path}), "permission denied", c.tmp


@case("sft: run directory is a file")
def _(c):
    return sft_args(c, run=c.file("run-file", "x")), "is a file", c.tmp


@case("sft: run directory in use by another process")
def _(c):
    run = c.copy_run()
    holder = {"pid": os.getppid(), "host": os.uname().nodename, "stage": "reward", "started": "2026-01-01T00:00:00Z"}
    (run / ".lock").write_text(json.dumps(holder))
    return sft_args(c, run=run), f"running as pid {os.getppid()}", run


@case("sft: corrupt manifest")
def _(c):
    run = c.copy_run()
    (run / "run.json").write_text('{"stages": {"sft": ')
    return sft_args(c, run=run), "run.json is not valid JSON", run


@case("sft: resume with another dataset")
def _(c):
    run = c.copy_run()
    c.edit_manifest(run, lambda m: m["stages"]["sft"].update(status="failed"))
    (run / "sft" / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    other = c.jsonl("other.jsonl", [{"text": "a different dataset"}] * 4)
    return sft_args(c, run=run, **{"--dataset": other}), "cannot resume the sft stage", run


# ---- train-reward -------------------------------------------------------------------------------------------


def reward_args(c: Ctx, run: Path, dataset, *extra) -> list:
    return ["train-reward", "--run-dir", run, "--dataset", dataset, *extra]


@case("train-reward: no SFT stage and no --model")
def _(c):
    return reward_args(c, c.tmp / "empty-run", c.data["pairs"]), "stage 'sft' has not run", c.tmp


@case("train-reward: chats instead of preference pairs")
def _(c):
    return reward_args(c, c.run, c.data["sft"], "--overwrite"), "no preference format", c.run


@case("train-reward: every pair identical")
def _(c):
    pairs = c.jsonl("same.jsonl", [{"prompt": "Hi.", "chosen": " Hello.", "rejected": " Hello."}] * 4)
    return reward_args(c, c.run, pairs, "--overwrite"), "identical", c.run


@case("train-reward: margin is not a number")
def _(c):
    pairs = c.jsonl("margin.jsonl", [{"prompt": "Hi.", "chosen": " Hello.", "rejected": " Go.", "margin": "big"}] * 4)
    return reward_args(c, c.run, pairs, "--overwrite"), "margin", c.run


@case("train-reward: damaged SFT adapter")
def _(c):
    run = c.copy_run()
    c.truncate(run / "sft" / "adapter" / "adapter_model.safetensors")
    return reward_args(c, run, c.data["pairs"], "--overwrite"), "adapter_model.safetensors is damaged", run


@case("train-reward: finished stage without --overwrite")
def _(c):
    return reward_args(c, c.run, c.data["pairs"]), "already finished", c.run


# ---- ppo ----------------------------------------------------------------------------------------------------


def ppo_args(c: Ctx, run: Path, *extra, dataset=None) -> list:
    return ["ppo", "--run-dir", run, "--dataset", dataset or c.data["prompts"], "--episodes", "8", "--batch-size",
            "4", *extra]


@case("ppo: nothing to score responses with")
def _(c):
    run = c.sft_only_run()
    return ppo_args(c, run), "nothing can score", run


@case("ppo: reward function module not importable")
def _(c):
    return ppo_args(c, c.run, "--reward-fn", "no_such_module_xyz:score"), "could not be imported", c.run


@case("ppo: reward function without ':function'")
def _(c):
    return ppo_args(c, c.run, "--reward-fn", "rlchat.demo.task"), "module:function", c.run


@case("ppo: reward function raises")
def _(c):
    fn = c.file("broken_reward.py", "def score(prompts, completions):\n    raise KeyError('oops')\n")
    return ppo_args(c, c.run, "--reward-fn", f"{fn}:score"), "raised KeyError", c.run


@case("ppo: batch size not divisible by mini-batches")
def _(c):
    return ppo_args(c, c.run, "--mini-batches", "3"), "divisible", c.run


@case("ppo: fewer episodes than one batch")
def _(c):
    return ppo_args(c, c.run, "--episodes", "2"), "episodes (2) must be >= batch_size", c.run


@case("ppo: prompts without a prompt column")
def _(c):
    prompts = c.jsonl("no-prompt.jsonl", [{"question": "Hi?"}] * 4)
    return ppo_args(c, c.run, dataset=prompts), "question", c.run


@case("ppo: reward adapter trained on another base")
def _(c):
    run = c.copy_run()
    c.edit_manifest(run, lambda m: m["stages"]["reward"]["outputs"].update(base_hash="sha256:" + "0" * 64))
    return ppo_args(c, run), "different version", run


@case("ppo: damaged reward adapter")
def _(c):
    run = c.copy_run()
    c.truncate(run / "reward" / "adapter" / "adapter_model.safetensors", keep=100)
    return ppo_args(c, run), "adapter_model.safetensors is damaged", run


@case("ppo: no SFT stage and no --model")
def _(c):
    return ppo_args(c, c.tmp / "empty-run"), "stage 'sft' has not run", c.tmp


# ---- eval ---------------------------------------------------------------------------------------------------


def eval_args(c: Ctx, run: Path, *extra) -> list:
    return ["eval", "--run-dir", run, "--dataset", c.data["eval_prompts"], "--max-prompts", "2",
            "--max-new-tokens", "4", *extra]


@case("eval: no run directory")
def _(c):
    return eval_args(c, c.tmp / "nowhere"), "no run at", c.tmp


@case("eval: --policies ppo without a ppo stage")
def _(c):
    return eval_args(c, c.run, "--policies", "ppo"), "policy 'ppo' was asked for", c.run


@case("eval: judge file missing")
def _(c):
    return eval_args(c, c.run, "--judge", f"{c.tmp / 'nojudge.py'}:judge"), "does not exist", c.run


@case("eval: judge returns the wrong number of scores")
def _(c):
    judge = c.file("short_judge.py", "def judge(prompts, completions):\n    return [1.0]\n")
    return eval_args(c, c.run, "--judge", f"{judge}:judge"), "returned 1 values", c.run


@case("eval: max_prompts 0")
def _(c):
    return eval_args(c, c.run, "--max-prompts", "0"), "max_prompts", c.run


@case("eval: damaged reward adapter")
def _(c):
    run = c.copy_run()
    c.truncate(run / "reward" / "adapter" / "adapter_model.safetensors")
    return eval_args(c, run), "adapter_model.safetensors is damaged", run


@case("eval: manifest points outside the run directory")
def _(c):
    run = c.copy_run()
    c.edit_manifest(run, lambda m: m["stages"]["sft"]["outputs"].update(adapter="../../elsewhere"))
    return eval_args(c, run), "outside the run directory", run


# ---- status -------------------------------------------------------------------------------------------------


@case("status: corrupt manifest")
def _(c):
    run = c.copy_run()
    (run / "run.json").write_text("{oops")
    return ["status", run], "not valid JSON", run


@case("status: manifest that is not an rlchat manifest")
def _(c):
    run = c.copy_run()
    (run / "run.json").write_text("[1, 2, 3]")
    return ["status", run], "not an rlchat manifest", run


# ---- export -------------------------------------------------------------------------------------------------


@case("export: stage without a policy")
def _(c):
    return ["export", c.run, c.tmp / "out", "--stage", "reward"], "has no policy", c.run


@case("export: ppo stage not run")
def _(c):
    return ["export", c.run, c.tmp / "out", "--stage", "ppo"], "stage 'ppo'", c.run


@case("export: OUT is a file")
def _(c):
    return ["export", c.run, c.file("out-file", "x"), "--stage", "sft"], "is a file", c.run


@case("export: OUT is not empty")
def _(c):
    c.file("out/keep.txt", "keep")
    return ["export", c.run, c.tmp / "out", "--stage", "sft"], "not empty", c.tmp


@case("export: damaged SFT adapter")
def _(c):
    run = c.copy_run()
    c.truncate(run / "sft" / "adapter" / "adapter_model.safetensors")
    return ["export", run, c.tmp / "out", "--stage", "sft"], "adapter_model.safetensors is damaged", c.tmp


# ---- chat ---------------------------------------------------------------------------------------------------


@case("chat: negative temperature")
def _(c):
    return ["chat", c.run, "--stage", "sft", "--prompt", "Hi", "--temperature", "-1"], "temperature", c.run


@case("chat: top_p 0")
def _(c):
    return ["chat", c.run, "--stage", "sft", "--prompt", "Hi", "--top-p", "0"], "top_p", c.run


@case("chat: max_new_tokens 0")
def _(c):
    return ["chat", c.run, "--stage", "sft", "--prompt", "Hi", "--max-new-tokens", "0"], "max_new_tokens", c.run


@case("chat: SFT adapter_config.json is not JSON")
def _(c):
    run = c.copy_run()
    (run / "sft" / "adapter" / "adapter_config.json").write_text("{")
    return ["chat", run, "--stage", "sft", "--prompt", "Hi"], "adapter_config.json is not valid JSON", run


# ---- score --------------------------------------------------------------------------------------------------


@case("score: batch size 0")
def _(c):
    return ["score", c.run, "--dataset", c.data["pairs"], "--out", c.tmp / "s.jsonl", "--batch-size", "0"], \
        "batch_size", c.tmp


@case("score: columns it cannot score")
def _(c):
    return ["score", c.run, "--dataset", c.data["prompts"], "--out", c.tmp / "s.jsonl"], "none of which", c.tmp


@case("score: run without a reward stage")
def _(c):
    run = c.sft_only_run()
    return ["score", run, "--dataset", c.data["pairs"], "--out", c.tmp / "s.jsonl"], "stage 'reward'", c.tmp


@case("score: --out is a directory")
def _(c):
    (c.tmp / "out-dir").mkdir()
    return ["score", c.run, "--dataset", c.data["pairs"], "--out", c.tmp / "out-dir"], "is a directory", c.tmp


# ---- plan ---------------------------------------------------------------------------------------------------


@case("plan: recipe missing")
def _(c):
    return ["plan", c.tmp / "none.yaml"], "not found", c.tmp


@case("plan: recipe is a list")
def _(c):
    return ["plan", c.file("list.yaml", "- sft\n- ppo\n")], "must be a mapping", c.tmp


@case("plan: unknown key in a stage section")
def _(c):
    recipe = c.file("typo.yaml", f"run_dir: {c.tmp / 'r'}\nmodel: {c.model}\nppo:\n  episode: 64\n")
    return ["plan", recipe], "did you mean 'episodes'", c.tmp


# ---- new-model, demo-data -----------------------------------------------------------------------------------


@case("new-model: unknown arch")
def _(c):
    return ["new-model", c.tmp / "m", "--arch", "bert"], "arch", c.tmp


@case("new-model: unknown size")
def _(c):
    return ["new-model", c.tmp / "m", "--size", "huge"], "unknown size", c.tmp


@case("new-model: corpus file missing")
def _(c):
    return ["new-model", c.tmp / "m", "--corpus", c.tmp / "corpus.txt"], "corpus file not found", c.tmp


@case("new-model: OUT is not empty")
def _(c):
    c.file("m/keep.txt", "keep")
    return ["new-model", c.tmp / "m"], "not empty", c.tmp


@case("new-model: vocabulary too small")
def _(c):
    return ["new-model", c.tmp / "m", "--vocab-size", "10"], "vocab_size", c.tmp


@case("new-model: OUT is a file")
def _(c):
    return ["new-model", c.file("m", "x")], "is a file", c.tmp


@case("demo-data: OUT is a file")
def _(c):
    return ["demo-data", c.file("d", "x")], "is a file", c.tmp


# ---- the test -----------------------------------------------------------------------------------------------


def _params():
    for name in CASES:
        marks = [pytest.mark.xfail(reason=KNOWN_BUGS[name], strict=False)] if name in KNOWN_BUGS else []
        yield pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("name", list(_params()))
def test_bad_input(name, tmp_path, tiny_model, demo_data, finished_run, monkeypatch):
    ctx = Ctx(tmp_path, tiny_model, demo_data, finished_run, monkeypatch, [])
    args, phrase, watched = CASES[name](ctx)
    shared_before = snapshot(finished_run)
    before = snapshot(watched)
    for fn in ctx.just_before:
        fn()
    res = invoke(args)
    monkeypatch.undo()
    out = res.output
    assert res.exit_code == 2, f"exit {res.exit_code}, exception {res.exception!r}\n{out}"
    assert "Traceback" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    assert phrase.lower() in errors[0].lower(), errors[0]
    assert "Fix:" in errors[0], errors[0]
    assert snapshot(watched) == before, "the bad input changed files"
    assert snapshot(finished_run) == shared_before, "the shared run directory changed"


def test_there_are_at_least_25_distinct_cases():
    commands = {name.split(":")[0] for name in CASES}
    assert len(CASES) >= 25
    assert commands >= {"sft", "train-reward", "ppo", "eval", "status", "export", "chat", "score", "plan",
                        "new-model", "demo-data"}


def test_custom_code_never_runs_without_the_flag(tmp_path, tiny_model, demo_data, finished_run, monkeypatch):
    """The custom-code case again, checking that the model's own Python files were never executed."""
    ctx = Ctx(tmp_path, tiny_model, demo_data, finished_run, monkeypatch, [])
    args, _, _ = CASES["sft: custom model code without --trust-remote-code"](ctx)
    assert invoke(args).exit_code == 2
    assert not (tmp_path / "code-ran").exists()


# ---- usage errors (click parses these before rlchat sees them) --------------------------------------------------

USAGE = {
    "flag of the wrong type": (["sft", "--batch-size", "lots"], "--batch-size"),
    "unknown flag": (["sft", "--learning-rate", "1"], "--learning-rate"),
    "unknown command": (["finetune"], "finetune"),
    "flag without its value": (["export", "RUN", "OUT", "--stage"], "--stage"),
}


@pytest.mark.parametrize("name", list(USAGE))
def test_usage_error_exits_2_and_names_the_flag(name, tmp_path):
    args, phrase = USAGE[name]
    res = invoke(args)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    assert phrase in res.output


@pytest.mark.parametrize("name", list(USAGE))
def test_usage_error_is_one_error_line(name):
    args, phrase = USAGE[name]
    res = invoke(args)
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and phrase in errors[0], res.output
