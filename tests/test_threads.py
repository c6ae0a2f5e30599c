"""--threads: the choice of torch's CPU thread count (rlchat/threads.py) and the CLI flag."""
from __future__ import annotations

import pytest

from rlchat import threads


@pytest.mark.parametrize("requested,world,cpus,load,env,want", [
    (3, 1, 2, 9.0, {}, (3, False)),                 # an explicit --threads wins, even on a busy machine
    (None, 1, 2, 9.0, {"OMP_NUM_THREADS": "4"}, (None, False)),  # the environment's choice is left to torch
    (None, 1, 2, 0.3, {}, (2, False)),              # quiet: one thread per CPU
    (None, 1, 2, 2.0, {}, (1, True)),               # load >= CPUs: busy, 1 thread and a note
    (None, 1, 16, 9.0, {}, (16, False)),            # a big machine with spare cores is not busy
    (None, 2, 16, 1.0, {}, (8, False)),             # two processes share the CPUs
    (None, 2, 2, 5.0, {}, (1, False)),              # one CPU each: nothing to lower, no note
    (None, 1, 1, 5.0, {}, (1, False)),
])
def test_choose(requested, world, cpus, load, env, want):
    n, note = threads.choose(requested, world_size=world, cpus=cpus, load=load, env=env)
    assert (n, note is not None) == want
    if note:
        assert f"load average {load:.1f} on {cpus} CPUs" in note and "--threads" in note
        assert "\n" not in note


def test_a_stale_load_average_does_not_lower_the_threads():
    """The load average trails by a minute: after a 2-thread stage it reads ~2.0 on an idle 2-CPU machine. Only
    when other processes keep a CPU busy now is the machine busy."""
    assert threads.choose(None, cpus=2, load=2.0, env={}, busy=0.1) == (2, None)
    n, note = threads.choose(None, cpus=2, load=2.0, env={}, busy=1.4)
    assert n == 1 and "load average 2.0" in note
    busy = threads.busy_cpus(0.2)
    assert busy is None or 0.0 <= busy <= 1.05 * threads.os.cpu_count() + 0.5


def test_cli_threads_flag_sets_torch_threads(tiny_model, demo_data, tmp_path, monkeypatch):
    import torch
    from typer.testing import CliRunner

    from rlchat.cli import app

    seen = {}
    monkeypatch.setattr("rlchat.stages.sft.run", lambda cfg: seen.setdefault("threads", torch.get_num_threads())
                        and {"summary": "ok"})
    before = torch.get_num_threads()
    try:
        res = CliRunner().invoke(app, ["sft", "--run-dir", str(tmp_path / "run"), "--model", str(tiny_model),
                                       "--dataset", str(demo_data["sft"]), "--threads", "1"])
        assert res.exit_code == 0, res.output
        assert seen["threads"] == 1
        res = CliRunner().invoke(app, ["sft", "--run-dir", str(tmp_path / "run"), "--threads", "0"])
        assert res.exit_code == 2 and "error:" in res.output
    finally:
        torch.set_num_threads(before)
