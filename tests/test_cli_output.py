"""What rlchat prints and writes outside a terminal, and the small things a new user hits (issue 16):
plain progress lines and a real ETA (rlchat/progress.py), file permissions under umask 022 (rlchat/fileio.py,
report PNGs), `rlchat status` on stdout, a pasteable `--num-processes` launch line, `make demo` resuming instead
of redoing, the plots, and a setuptools build without deprecation warnings. Fast, except the two marked slow.
The end-to-end checks on real runs are in tests/test_artifacts.py.
"""
from __future__ import annotations

import io
import json
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- progress


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def plain_progress(clock, monkeypatch):
    """A StageProgress printing into a StringIO that is not a terminal, on a fake clock (also for the 10 s rule)."""
    from rich.console import Console

    from rlchat import progress as prog

    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=80, soft_wrap=True)
    monkeypatch.setattr(prog, "console", console)
    monkeypatch.setattr(prog.time, "monotonic", clock)
    bar = prog.stage_progress()
    bar.get_time = clock
    return bar, out


def test_plain_progress_prints_lines_with_step_metrics_and_eta(monkeypatch):
    clock = Clock()
    bar, out = plain_progress(clock, monkeypatch)
    assert bar.plain
    bar.start()
    task = bar.add_task("ppo", total=10, completed=0, info="")
    for step in range(1, 11):
        clock.t += 60.0  # one step a minute: rich's own ETA (a 30 s window) never had a speed
        bar.update(task, completed=step, info=f"score {step / 10:.3f}")
    bar.stop()
    lines = out.getvalue().splitlines()
    assert len(lines) == 10  # every step: each is >= 10 s and 10% apart
    assert lines[0] == "ppo 1/10 (10%)  score 0.100  elapsed 0:01:00  eta 0:09:00"
    assert lines[4] == "ppo 5/10 (50%)  score 0.500  elapsed 0:05:00  eta 0:05:00"
    assert lines[-1] == "ppo 10/10 (100%)  score 1.000  elapsed 0:10:00  eta 0:00:00"


def test_plain_progress_is_rate_limited_to_every_5_percent_or_10_seconds(monkeypatch):
    clock = Clock()
    bar, out = plain_progress(clock, monkeypatch)
    with bar:
        task = bar.add_task("sft", total=200, info="")
        for step in range(1, 201):
            clock.t += 0.01
            bar.advance(task)
    lines = out.getvalue().splitlines()
    assert 20 <= len(lines) <= 22, lines  # the first step, then every 10 steps (5%), the last
    assert lines[-1].startswith("sft 200/200 (100%)")
    # slow steps, small fractions: the 10 s rule prints anyway
    clock2 = Clock()
    bar, out = plain_progress(clock2, monkeypatch)
    with bar:
        task = bar.add_task("sft", total=10_000, info="")
        for step in range(1, 31):
            clock2.t += 4.0
            bar.advance(task)
    lines = out.getvalue().splitlines()
    assert 10 <= len(lines) <= 12, lines  # 120 s, 0.3% of the work: about one line per 10 s


def test_eta_counts_only_steps_done_since_a_resume(monkeypatch):
    from rlchat.progress import eta_seconds

    clock = Clock()
    bar, _ = plain_progress(clock, monkeypatch)
    task = bar.add_task("ppo", total=100, completed=40, info="")  # resumed at step 40
    assert eta_seconds(bar.tasks[0]) is None
    clock.t += 30.0
    bar.update(task, completed=43)  # 3 steps in 30 s -> 57 left at 10 s each
    assert eta_seconds(bar.tasks[0]) == pytest.approx(570.0)


def test_terminal_bar_shows_a_real_eta_for_slow_steps(monkeypatch):
    from rich.console import Console

    from rlchat import progress as prog

    clock = Clock()
    out = io.StringIO()
    monkeypatch.setattr(prog, "console", Console(file=out, force_terminal=True, width=120))
    bar = prog.stage_progress()
    bar.get_time = clock
    assert not bar.plain
    task = bar.add_task("ppo", total=10, info="")
    clock.t += 120.0
    bar.update(task, completed=1)
    text = bar.get_renderable()
    rendered = io.StringIO()
    Console(file=rendered, width=120, force_terminal=False).print(text)
    assert "eta 0:18:00" in rendered.getvalue(), rendered.getvalue()


# ------------------------------------------------------------------------------------------ permissions


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_writes_follow_the_umask(tmp_path, umask_022):
    from rlchat.fileio import atomic_dir, atomic_write_json, atomic_write_text

    atomic_write_text(tmp_path / "a.txt", "x")
    atomic_write_json(tmp_path / "b.json", {"a": 1})
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "sub").mkdir()
        fd = os.open(tmp / "weights.safetensors", os.O_CREAT | os.O_WRONLY, 0o600)  # as some libraries do
        os.close(fd)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.rglob("*")}
    assert modes == {"a.txt": 0o644, "b.json": 0o644, "model": 0o755, "sub": 0o755,
                     "weights.safetensors": 0o644}


def test_atomic_writes_keep_a_stricter_umask(tmp_path):
    from rlchat.fileio import atomic_dir, atomic_write_text

    old = os.umask(0o077)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "f").write_text("y")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o700


def test_plots_follow_the_umask(tmp_path, umask_022):
    from rlchat.report import plot_sft

    rows = [{"step": i, "loss": 5.0 / i} for i in range(1, 20)]
    path = plot_sft(rows, tmp_path / "sft_loss.png")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


# ------------------------------------------------------------------------------------------------ status


def test_status_table_goes_to_stdout_when_redirected(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({
        "rlchat_version": "0", "created": "2026-01-01T00:00:00+00:00",
        "stages": {"sft": {"status": "done", "metrics": {"eval_loss": 1.2345}, "wall_s": 12.0},
                   "reward": {"status": "done", "metrics": {"eval_accuracy": 0.755,
                                                            "summary_note": "x" * 150}, "wall_s": 3.0}}}))
    out = tmp_path / "s.txt"
    with open(out, "w") as f:
        res = subprocess.run([sys.executable, "-m", "rlchat", "status", str(run)], stdout=f, stderr=subprocess.PIPE,
                             text=True, cwd=ROOT, timeout=60)
    assert res.returncode == 0, res.stderr
    text = out.read_text()
    assert re.search(r"sft\s*│\s*done\s*│\s*eval_loss=1\.234", text), text
    assert "eval_accuracy=0.755" in text
    assert res.stderr == ""


# ------------------------------------------------------------------------------------------------ launch


def test_launch_line_can_be_pasted(monkeypatch, capsys, tmp_path):
    from rlchat import launch

    seen = {}

    class FakeProc:
        def __init__(self, cmd, **kw):
            seen["cmd"] = cmd
            r, w = os.pipe()
            os.close(w)
            self.stderr = os.fdopen(r, "rb")

        def wait(self):
            return 0

    monkeypatch.setattr(launch.subprocess, "Popen", FakeProc)
    argv = ["sft", "--run-dir", str(tmp_path / "my runs" / "a"), "--dataset", "it's.jsonl"]
    assert launch.relaunch(argv, 2, None) == 0
    line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("launching: ")][0]
    assert shlex.split(line.removeprefix("launching: ")) == seen["cmd"]
    assert seen["cmd"][0] == sys.executable


def test_trainer_stages_tell_ddp_every_parameter_is_used(tmp_path):
    """transformers' default (find_unused_parameters=True for a PeftModel) made DDP warn once per process."""
    from rlchat.config import SFTConfig, resolve
    from rlchat.stages.common import trainer_args

    cfg = resolve(SFTConfig, "sft", None, {"run_dir": str(tmp_path), "model": "m", "dataset": "d"})
    assert trainer_args(cfg, tmp_path / "checkpoints", has_eval=True)["ddp_find_unused_parameters"] is False


@pytest.mark.slow
def test_two_process_sft_prints_a_pasteable_launch_line_and_no_ddp_warning(tmp_path, tiny_model, demo_data):
    run = tmp_path / "my run"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, "-m", "rlchat", "sft", "--run-dir", str(run), "--model", str(tiny_model),
                          "--dataset", str(demo_data["sft"]), "--max-steps", "2", "--num-processes", "2"],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    line = [x for x in res.stderr.splitlines() if x.startswith("launching: ")][0]
    cmd = shlex.split(line.removeprefix("launching: "))
    assert cmd[0] == sys.executable and cmd[cmd.index("--run-dir") + 1] == str(run)
    assert "find_unused_parameters" not in res.stderr


# ------------------------------------------------------------------------------------------------ plots


def test_sft_plot_uses_a_log_axis_and_the_histogram_fits_the_tallest_bar(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from rlchat import report

    saved = []
    monkeypatch.setattr(report, "_save", lambda fig, path: saved.append(fig) or path)
    report.plot_sft([{"step": i, "loss": 8.0 / i} for i in range(1, 50)] + [{"step": 49, "eval_loss": 0.3}],
                    tmp_path / "a.png")
    assert saved[-1].axes[0].get_yscale() == "log"

    responses = [{"policies": {"sft": {"judge": 0.5}, "ppo": {"judge": 1.0}}} for _ in range(52)]
    responses += [{"policies": {"sft": {"judge": 0.0}, "ppo": {"judge": 0.25}}} for _ in range(10)]
    report.plot_scores(responses, tmp_path / "b.png")
    ax = saved[-1].axes[0]
    assert isinstance(saved[-1], Figure)
    top = ax.get_ylim()[1]
    assert 52 <= top <= 52 * 1.1, top  # the y axis ends just above the tallest bar (52), not at 70


def test_reward_plot_draws_every_held_out_point(tmp_path, monkeypatch):
    from rlchat import report

    saved = []
    monkeypatch.setattr(report, "_save", lambda fig, path: saved.append(fig) or path)
    rows = [{"step": s, "loss": 0.7 - s / 200, "accuracy": 0.5 + s / 400} for s in range(1, 101)]
    rows += [{"step": s, "eval_loss": 0.6, "eval_accuracy": 0.6 + s / 1000} for s in range(10, 101, 10)]
    report.plot_reward(rows, tmp_path / "r.png")
    acc_ax = saved[-1].axes[1]
    held = [line for line in acc_ax.get_lines() if line.get_label().startswith("eval_accuracy")]
    assert len(held) == 1 and len(held[0].get_xdata()) == 10


# ------------------------------------------------------------------------------------------------- demo


@pytest.mark.slow
def test_make_demo_rerun_skips_finished_stages_and_resumes(tmp_path, tiny_model):
    """scripts/demo.sh with a small recipe: a failure in eval, then a rerun redoes only eval; a third run only
    reports; `make demo-clean`'s paths are what the Makefile removes."""
    import shutil

    shutil.copytree(tiny_model, tmp_path / ".demo" / "model")  # the script builds it only when missing
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("""run_dir: runs/demo
model: .demo/model
seed: 0
sft: {dataset: .demo/data/sft.jsonl, max_steps: 2, save_steps: 1}
reward: {dataset: .demo/data/pairs.jsonl, max_steps: 2, batch_size: 8}
ppo: {dataset: .demo/data/prompts.jsonl, episodes: 8, batch_size: 8, response_length: 4}
grpo: {dataset: .demo/data/prompts.jsonl, episodes: 8, batch_size: 8, num_generations: 4, response_length: 4}
rloo: {dataset: .demo/data/prompts.jsonl, episodes: 8, batch_size: 8, num_generations: 2, response_length: 4}
dpo: {dataset: .demo/data/pairs.jsonl, max_steps: 2, batch_size: 8, max_length: 96}
eval: {dataset: .demo/data/missing.jsonl, max_prompts: 4, max_new_tokens: 4, kl_samples: 1}
""")
    env = dict(os.environ, OMP_NUM_THREADS="1", RECIPE=str(recipe),
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")

    def demo():
        return subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh"), "runs/demo"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=900)

    first = demo()
    assert first.returncode != 0 and "missing.jsonl" in first.stderr  # "interrupted" in eval
    manifest = json.loads((tmp_path / "runs/demo/run.json").read_text())["stages"]
    started = {s: manifest[s]["started"] for s in ("sft", "reward", "ppo", "grpo", "rloo", "dpo")}
    assert all(manifest[s]["status"] == "done" for s in started)

    recipe.write_text(recipe.read_text().replace("missing.jsonl", "eval_prompts.jsonl"))
    second = demo()
    assert second.returncode == 0, second.stderr[-3000:]
    manifest = json.loads((tmp_path / "runs/demo/run.json").read_text())["stages"]
    assert {s: manifest[s]["started"] for s in started} == started  # not redone
    assert manifest["eval"]["status"] == "done"
    for s in ("sft", "reward", "ppo", "grpo", "rloo", "dpo"):
        assert f"==> {s}: already done" in second.stdout
    assert "==> rlchat eval" in second.stdout

    third = demo()
    assert third.returncode == 0
    assert "==> eval: already done" in third.stdout and "rlchat eval --config" not in third.stdout
    assert "demo-clean:\n\trm -rf $(DEMO_RUN) .demo" in (ROOT / "Makefile").read_text()


# ------------------------------------------------------------------------------------------------ install


def test_building_the_package_gives_no_setuptools_deprecation_warning(tmp_path):
    """pyproject.toml's `license` is an SPDX string (setuptools >= 77), not the deprecated table."""
    import shutil

    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    (tmp_path / "rlchat").mkdir()
    shutil.copy(ROOT / "rlchat" / "__init__.py", tmp_path / "rlchat" / "__init__.py")
    res = subprocess.run([sys.executable, "-W", "always", "-c",
                          "import setuptools.build_meta as b; print(b.prepare_metadata_for_build_wheel('.'))"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "SetuptoolsDeprecationWarning" not in res.stderr, res.stderr
    meta = (tmp_path / res.stdout.strip().splitlines()[-1] / "METADATA").read_text()
    assert "License-Expression: Apache-2.0" in meta
