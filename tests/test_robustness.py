"""Nothing lost, nothing silently wrong: non-finite values, one run per directory, honest resumes, failed saves."""
from __future__ import annotations

import errno
import json
import math
import sys
import time

import pytest
import torch
from torchrl.checkpoint import Checkpoint
from torchrl.data import Composite, OneHot, Unbounded

from torchrl_dreamer.config import DreamerV2Config
from torchrl_dreamer.modules import DEBUG_SIZES, make_dreamerv2_models
from torchrl_dreamer.objectives import make_dreamerv2_loss
from torchrl_dreamer.record import make_logger
from torchrl_dreamer.trainers import (
    CHECKPOINT_FILE,
    DreamerV2OptimizationStepper,
    DreamerV2Optimizer,
    make_dreamerv2_optimizers,
    make_dreamerv2_trainer,
)
from torchrl_dreamer.trainers.hooks import CheckpointWriteError, NonFiniteInputHook
from torchrl_dreamer.trainers.stepper import NonFiniteUpdateError
from torchrl_dreamer.trainers.trainer import RunLockedError

from conftest import make_batch

QUIET = dict(eval_every=10**9, video_every=10**9)


def _debug(**overrides):
    return DreamerV2Config.preset("debug", **{**QUIET, **overrides})


def test_optimizer_skips_a_non_finite_step():
    w = torch.nn.Parameter(torch.ones(3))
    opt = DreamerV2Optimizer([w], lr=0.1)
    (w * torch.tensor([1.0, float("nan"), 1.0])).sum().backward()
    opt.step()
    assert opt.skipped and torch.equal(w.detach(), torch.ones(3)) and not opt.state  # no Adam moment either
    opt.zero_grad()
    w.sum().backward()
    opt.step()
    assert not opt.skipped and not torch.equal(w.detach(), torch.ones(3))


def test_non_finite_batches_never_reach_the_weights_and_stop_the_run():
    models = make_dreamerv2_models(Composite(pixels=Unbounded((1, 16, 16), dtype=torch.uint8)), OneHot(3),
                                   **DEBUG_SIZES)
    loss = make_dreamerv2_loss(models, imagination_horizon=3)
    stepper = DreamerV2OptimizationStepper(loss, make_dreamerv2_optimizers(loss), max_nonfinite_updates=3)
    before = [p.detach().clone() for p in models.world_model.parameters()]
    bad = make_batch(2, 4)
    bad["next", "reward"][0, 1] = float("nan")
    metrics = stepper.step(None, bad)
    assert float(metrics["nonfinite_updates"]) == 1
    # the world model's step is skipped; the actor and critic (which never see the true reward) still learn
    assert all(torch.equal(a, b) for a, b in zip(before, models.world_model.parameters()))
    assert all(torch.isfinite(p).all() for p in loss.parameters())
    good = stepper.step(None, make_batch(2, 4))
    assert float(good["nonfinite_updates"]) == 1 and stepper.consecutive_nonfinite == 0
    assert all(torch.isfinite(p).all() for p in loss.parameters())
    stepper.step(None, bad)
    stepper.step(None, bad)
    with pytest.raises(NonFiniteUpdateError, match="3 updates in a row"):
        stepper.step(None, bad)
    assert stepper.state_dict()["nonfinite_updates"] == 4


def test_a_non_finite_observation_moves_no_weight():
    models = make_dreamerv2_models(Composite(observation=Unbounded((3,))), OneHot(3), **DEBUG_SIZES)
    loss = make_dreamerv2_loss(models, imagination_horizon=3)
    stepper = DreamerV2OptimizationStepper(loss, make_dreamerv2_optimizers(loss))
    before = [p.detach().clone() for p in loss.parameters()]
    bad = make_batch(2, 4, image=(3,), obs_key="observation")
    bad["observation"][1, 2, 0] = float("nan")
    stepper.step(None, bad)
    assert all(torch.equal(a, b) for a, b in zip(before, loss.parameters()))


def test_non_finite_env_values_are_reported_by_key():
    hook = NonFiniteInputHook(["observation", ("next", "reward")])
    batch = make_batch(1, 5, image=(3,), obs_key="observation")
    hook(batch)
    assert hook.total == 0
    batch["observation"][0, 2, 1] = float("inf")
    with pytest.warns(UserWarning, match="'observation' at 1 of 5 steps"):
        hook(batch)
    assert hook.total == 1


def test_one_run_per_log_directory(tmp_path):
    cfg = _debug(total_steps=120, prefill=100)
    first = make_dreamerv2_trainer(cfg, tmp_path / "run", device="cpu", progress=False)
    with pytest.raises(RunLockedError, match="in use by a running training"):
        make_dreamerv2_trainer(cfg, tmp_path / "run", device="cpu", progress=False)
    first.train()  # releases the directory when done
    second = make_dreamerv2_trainer(cfg.replace(total_steps=160), tmp_path / "run", device="cpu", progress=False)
    assert second.checkpointer.every.next > second.steps  # a resume does not rewrite the checkpoint at once
    assert second.resumed and second.train()["steps"] == 160


def test_resume_refuses_other_settings_and_keeps_the_logs_clean(tmp_path, capsys):
    cfg = _debug(total_steps=220, prefill=100, log_every=20, checkpoint_every=10**9)
    logdir = tmp_path / "run"
    make_dreamerv2_trainer(cfg, logdir, device="cpu", progress=False).train()
    frames = Checkpoint.manifest(logdir / CHECKPOINT_FILE)["metadata"]["steps"] * cfg.action_repeat
    # a killed run logged past its checkpoint: those rows are repeated after the resume
    with open(logdir / "scalars" / "fps.csv", "a") as f:
        f.write(f"{frames + 40},1.0\n{frames + 80},2.0\n")
    config_before = (logdir / "config.json").read_text()
    other = DreamerV2Config.preset("atari", **QUIET)
    with pytest.raises(ValueError, match="other settings"):
        make_dreamerv2_trainer(other.replace(env=cfg.env), logdir, device="cpu", progress=False)
    assert (logdir / "config.json").read_text() == config_before  # a refused start writes nothing
    trainer = make_dreamerv2_trainer(cfg.replace(total_steps=300, kl_balance=0.5), logdir, device="cpu",
                                     progress=False, keep_saved_config=True)
    assert "saved values of ['kl_balance']" in capsys.readouterr().out and trainer.config.kl_balance == cfg.kl_balance
    trainer.train()
    for csv in (logdir / "scalars").glob("*.csv"):
        steps = [float(line.split(",")[0]) for line in csv.read_text().splitlines() if line]
        assert steps == sorted(set(steps)), csv.name  # no duplicate step, no backward jump


def test_auto_resumes_a_run_saved_with_a_concrete_value(tmp_path, capsys):
    """A run saved before a setting defaulted to "auto" (reward_transform "tanh" in its config.json) resumes under
    "auto" with its saved value, without a refusal; another concrete value is still refused."""
    cfg = _debug(total_steps=120, prefill=100, reward_transform="tanh")
    logdir = tmp_path / "run"
    make_dreamerv2_trainer(cfg, logdir, device="cpu", progress=False).train()
    resumed = make_dreamerv2_trainer(cfg.replace(total_steps=160, reward_transform="auto"), logdir, device="cpu",
                                     progress=False)
    assert resumed.config.reward_transform == "tanh" and "saved values" not in capsys.readouterr().out
    assert resumed.train()["steps"] == 160
    with pytest.raises(ValueError, match="reward_transform: 'tanh'"):
        make_dreamerv2_trainer(cfg.replace(total_steps=200, reward_transform="identity"), logdir, device="cpu",
                               progress=False)


def test_a_failed_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    cfg = _debug(total_steps=120, prefill=100)
    trainer = make_dreamerv2_trainer(cfg, tmp_path / "run", device="cpu", progress=False)
    trainer.train()
    path = tmp_path / "run" / CHECKPOINT_FILE
    good = path.read_bytes()

    def full_disk(target, **kwargs):
        target.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    def torch_full_disk(target, **kwargs):  # how torch reports it
        target.write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unable to write to file: No space left on device")

    monkeypatch.setattr(trainer.checkpointer.checkpoint, "save", full_disk)
    with pytest.raises(CheckpointWriteError, match="No space left on device; the previous checkpoint is kept"):
        trainer.save_checkpoint()
    assert path.read_bytes() == good
    assert not list(path.parent.glob(f"{CHECKPOINT_FILE}.tmp*"))
    monkeypatch.setattr(trainer.checkpointer.checkpoint, "save", torch_full_disk)
    with pytest.raises(CheckpointWriteError, match="No space left on device; the previous checkpoint is kept"):
        trainer.save_checkpoint()
    assert path.read_bytes() == good and not list(path.parent.glob(f"{CHECKPOINT_FILE}.tmp*"))


def test_unwritable_log_directory_is_one_line(tmp_path, monkeypatch):
    from torchrl_dreamer.trainers import trainer as trainer_module

    def denied(self, logdir):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(trainer_module.RunLock, "__init__", denied)
    with pytest.raises(OSError, match="Cannot write in the log directory .*Permission denied"):
        make_dreamerv2_trainer(_debug(), tmp_path / "run", device="cpu", progress=False)
    assert not (tmp_path / "run").exists()  # a start that failed leaves nothing behind


def test_the_pace_is_measured_and_reported(tmp_path, capsys):
    """Updates and collection are timed apart, evaluations and the prefill left out: a slow evaluation does not
    change the measured pace."""
    cfg = _debug(total_steps=300, prefill=100, train_every=10, eval_every=20)
    trainer = make_dreamerv2_trainer(cfg, tmp_path / "run", device="cpu", progress=False)
    evaluate = trainer.evaluation.evaluate
    trainer.evaluation.evaluate = lambda *a, **k: (time.sleep(0.5), evaluate(*a, **k))[1]  # 0.5 s per evaluation
    trainer.train()
    speed = trainer.speed_report
    report = speed.report
    assert report and "s per update" in report and "ms per agent step collected" in report
    assert report not in capsys.readouterr().out  # a run about to end is not told its pace
    # ten evaluations of 0.5 s ran between the timed stretches: none of it is in the pace
    assert speed.timed_updates >= 5 and speed.timed_steps >= 50
    # the first update and batch after the prefill compile (minutes for a compiled preset): not timed
    assert speed.timed_updates == speed.schedule.updates - speed.schedule.pretrain - 1
    per_step = speed.collect_seconds / speed.timed_steps
    assert per_step < 0.5 / cfg.eval_every, per_step
    speed.report, speed.total_steps = None, 10**8  # a long run on a CPU
    speed._report()
    out = capsys.readouterr().out
    assert "the remaining" in out and "need a GPU" in out and "--preset small" in out
    assert ("--precision bf16" in out) == bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def test_missing_tensorboard_is_said_once(tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else find_spec(name, *a))
    with pytest.warns(UserWarning, match="tensorboard is not installed"):
        logger = make_logger(tmp_path)
    assert len(logger.loggers) == 1


def test_damaged_replay_is_never_trained_on_and_fresh_replay_keeps_the_models(tmp_path):
    from torchrl_dreamer.trainers import CheckpointError

    cfg = _debug(total_steps=150, prefill=100)
    logdir = tmp_path / "run"
    make_dreamerv2_trainer(cfg, logdir, device="cpu", progress=False).train()
    saved = Checkpoint.manifest(logdir / CHECKPOINT_FILE)["metadata"]
    [pixels] = [p for p in (logdir / "replay").rglob("*.memmap") if "pixels" in str(p)]
    pixels.unlink()
    files = {p: p.stat().st_mtime_ns for p in logdir.rglob("*") if p.is_file() and p.name != ".lock"}
    with pytest.raises(CheckpointError, match=r"pixels.*missing.*--fresh-replay") as info:
        make_dreamerv2_trainer(cfg.replace(total_steps=200), logdir, device="cpu", progress=False)
    assert "\n" not in str(info.value) and "delete" not in str(info.value).lower()
    assert {p: p.stat().st_mtime_ns for p in files} == files  # nothing touched
    trainer = make_dreamerv2_trainer(cfg.replace(total_steps=200), logdir, device="cpu", progress=False,
                                     fresh_replay=True)
    assert (trainer.steps, trainer.updates) == (saved["steps"], saved["updates"]) and len(trainer.replay_buffer) == 0
    result = trainer.train()
    assert result["steps"] == 200 and len(trainer.replay_buffer) > 0


def test_the_checkpoint_carries_its_config_and_a_finished_run_says_so(tmp_path):
    cfg = _debug(total_steps=120, prefill=100)
    logdir = tmp_path / "run"
    make_dreamerv2_trainer(cfg, logdir, device="cpu", progress=False).train()
    (logdir / "config.json").unlink()  # lost: the checkpoint's copy still guards the run
    with pytest.raises(ValueError, match="other settings"):
        make_dreamerv2_trainer(cfg.replace(gamma=0.5), logdir, device="cpu", progress=False)
    trainer = make_dreamerv2_trainer(cfg, logdir, device="cpu", progress=False)
    with pytest.warns(UserWarning, match="Nothing to do: the run is at 120 agent steps"):
        assert trainer.train()["steps"] == 120


def test_an_empty_logdir_flag_is_refused():
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "dreamerv2_atari.py"
    spec = importlib.util.spec_from_file_location("dreamerv2_atari", script)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["--preset", "debug", "--logdir", ""]) == 2


_FAULTS_SCRIPT = """
import resource, sys
import torch
{setup}
def cycle():
    # allocate, touch and free 64 MiB, as an update does with its activations
    torch.empty(64 << 20, dtype=torch.uint8).fill_(1)
for _ in range(3):  # kept, the heap settles within two cycles
    cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_memory_is_kept_for_the_next_update(tmp_path):
    import subprocess

    def faults(setup: str) -> int:
        out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT.format(setup=setup)], capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return int(out.stdout.split()[-1])

    # glibc's default maps a 64 MiB block fresh each time and faults its 16,384 pages in again
    assert faults("") > 4 * 10_000
    # kept: the second and later blocks reuse the first one's pages
    assert faults("from torchrl_dreamer.trainers import keep_freed_memory; assert keep_freed_memory()") < 1_000
    # building the trainer keeps them
    trainer = (
        "from torchrl_dreamer.config import DreamerV2Config\n"
        "from torchrl_dreamer.trainers import make_dreamerv2_trainer\n"
        f"make_dreamerv2_trainer(DreamerV2Config.preset('debug', env='catch'), {str(tmp_path / 'run')!r}, "
        "device='cpu', progress=False).shutdown()"
    )
    assert faults(trainer) < 1_000


def test_thread_policy(tmp_path, monkeypatch, capsys):
    import importlib.util
    import os
    from pathlib import Path

    import subprocess
    import sys

    # the training command's opt-in (torchrl_dreamer.process) sets the passive policy before torch loads OpenMP,
    # unless the environment says otherwise; after torch it cannot, and leaves the variable alone
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = ("import os; from torchrl_dreamer.process import configure_process; {}; "
            "applied = configure_process(); print(os.environ.get('OMP_WAIT_POLICY'), applied['passive_openmp'])")
    for before, expected in (("pass", "PASSIVE True"), ("import torch", "None False")):
        out = subprocess.run([sys.executable, "-c", code.format(before)], env=env, capture_output=True, text=True)
        assert out.stdout.split() == expected.split(), out.stderr[-2000:]
    out = subprocess.run([sys.executable, "-c", code.format("pass")], env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                         capture_output=True, text=True)
    assert out.stdout.split() == ["ACTIVE", "False"]
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    script = Path(__file__).resolve().parents[1] / "examples" / "dreamerv2_atari.py"
    spec = importlib.util.spec_from_file_location("dreamerv2_atari", script)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    threads = torch.get_num_threads()
    try:
        for bad in ("0", "two", "auto"):
            with pytest.raises(SystemExit):
                cli.main(["--preset", "debug", "--threads", bad, "--logdir", str(tmp_path / "a")])
            assert "expected an integer >= 1" in capsys.readouterr().err
        rc = cli.main(["--preset", "debug", "--env", "catch", "--total-steps", "110", "--prefill", "100",
                       "--threads", "1", "--no-progress", "--eval-every", "1e9", "--video-every", "1e9",
                       "--logdir", str(tmp_path / "b")])
        assert rc == 0 and torch.get_num_threads() == 1
        # a trainer built in a process where the threads spin says so
        from torchrl_dreamer.config import DreamerV2Config
        from torchrl_dreamer.trainers import make_dreamerv2_trainer

        # more threads than cores is said before anything is built
        with pytest.warns(UserWarning, match="is more than the"):
            make_dreamerv2_trainer(DreamerV2Config.preset("debug", env="catch"), tmp_path / "d", device="cpu",
                                   progress=False, threads=len(os.sched_getaffinity(0)) + 1).shutdown()
        for bad in (0, "two", 1.5, "auto"):
            with pytest.raises(ValueError, match="threads must be None or an int >= 1"):
                make_dreamerv2_trainer(DreamerV2Config.preset("debug", env="catch"), tmp_path / "e", threads=bad)
        assert not (tmp_path / "e").exists()
        # threads=N sets torch's count and the update's shards; a build that fails puts the count back
        torch.set_num_threads(1)
        trainer = make_dreamerv2_trainer(DreamerV2Config.preset("debug", env="catch"), tmp_path / "f", device="cpu",
                                         progress=False, threads=2)
        assert torch.get_num_threads() == 2 and trainer.optimization_stepper.shard_pool.shards == 2
        trainer.shutdown()
        torch.set_num_threads(1)

        def broken_env(*args, **kwargs):
            raise RuntimeError("no such env")

        with pytest.raises(RuntimeError, match="no such env"):
            make_dreamerv2_trainer(DreamerV2Config.preset("debug"), tmp_path / "g", env=broken_env, device="cpu",
                                   progress=False, threads=2)
        assert torch.get_num_threads() == 1
        monkeypatch.delenv("OMP_WAIT_POLICY")
        torch.set_num_threads(2)
        with pytest.warns(UserWarning, match="OpenMP threads spin while they wait"):
            trainer = make_dreamerv2_trainer(DreamerV2Config.preset("debug", env="catch"), tmp_path / "c",
                                             device="cpu", progress=False)
        trainer.shutdown()
    finally:
        torch.set_num_threads(threads)


IMPORT_SPY = """
import ctypes, json, os, sys
calls = []
class Spy:  # records every mallopt call made through ctypes, by anyone
    def __init__(self, *args, **kwargs):
        self._lib = REAL(*args, **kwargs)
    def __getattr__(self, name):
        fn = getattr(self._lib, name)
        if name == "mallopt":
            return lambda *a: calls.append(a) or fn(*a)
        return fn
REAL, ctypes.CDLL = ctypes.CDLL, Spy
before = dict(os.environ)
import torch
threads = torch.get_num_threads()
import torchrl_dreamer
from torchrl_dreamer import config, data, envs, modules, objectives, record, trainers
from torchrl_dreamer.trainers import make_dreamerv2_trainer
print(json.dumps({"env_changed": sorted(set(os.environ.items()) ^ set(before.items())), "mallopt": calls,
                  "threads_changed": torch.get_num_threads() != threads}))
"""


def test_import_changes_nothing_in_the_process():
    """A plain import (of the package and every subpackage) sets no environment variable, no allocator option
    (no mallopt call) and no thread count: the CLI and the trainer opt in (torchrl_dreamer.process)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", IMPORT_SPY], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report == {"env_changed": [], "mallopt": [], "threads_changed": False}
    # the spy sees the opt-in: the same script, then a trainer's allocator settings
    out = subprocess.run([sys.executable, "-c", IMPORT_SPY + "trainers.keep_freed_memory(); print(len(calls))"],
                         capture_output=True, text=True)
    assert int(out.stdout.strip().splitlines()[-1]) == 3, out.stderr[-3000:]
