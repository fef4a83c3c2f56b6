"""The training example end to end: debug run, records, resume after SIGKILL, Ctrl-C, errors, Trainer hooks."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from torchrl_dreamer.config import DreamerV2Config
from torchrl_dreamer.trainers import CheckpointError, DreamerV2Training, make_dreamerv2_trainer

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "dreamerv2_atari.py"
METRICS = ["train_return", "train_length", "eval_return", "eval_length", "fps", "kl_loss", "image_loss", "reward_loss",
           "discount_loss", "model_kl", "prior_ent", "post_ent", "model_loss", "model_grad_norm", "actor_loss",
           "actor_ent", "actor_grad_norm", "critic_loss", "critic_grad_norm", "critic", "critic_target",
           "critic_slow", "reward_mean", "reward_std"]


def _run(*args, timeout=240, **kwargs):
    return subprocess.run([sys.executable, str(EXAMPLE), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, **kwargs)


@pytest.mark.slow
def test_debug_run_end_to_end(tmp_path):
    logdir = tmp_path / "run"
    proc = _run("--preset", "debug", "--logdir", logdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["steps"] == 400 and result["updates"] > 0 and "last_eval" in result
    assert "frame" in proc.stderr  # the tqdm progress bar
    for name in METRICS:
        lines = (logdir / "scalars" / f"{name}.csv").read_text().strip().splitlines()
        frames, value = lines[-1].split(",")
        assert int(frames) > 0 and value not in ("nan", "inf"), name
    gifs = sorted((logdir / "videos").glob("openl_*.gif"))
    assert gifs
    with Image.open(gifs[-1]) as gif:
        assert gif.n_frames == 10  # batch_length frames: 5 observed, 5 imagined
        assert gif.size == (2 * 16 * 4, 2 * 16 * 3)  # 4 sequences side by side, truth / model / error rows
    config = json.loads((logdir / "config.json").read_text())
    assert config["env"] == "catch" and config["rnn_hidden_dim"] == 32
    state = torch.load(logdir / "checkpoint.pt", weights_only=False)
    assert state["counters"]["steps"] == 400
    # a finished run resumes and stops at once
    again = _run("--preset", "debug", "--logdir", logdir, "--no-progress")
    assert again.returncode == 0 and "Resuming" in again.stdout


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180):
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read()[-3000:])
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("no checkpoint in time")
        time.sleep(0.2)


@pytest.mark.slow
def test_resume_after_sigkill_continues_from_checkpoint(tmp_path):
    logdir = tmp_path / "run"
    args = ["--preset", "debug", "--logdir", logdir, "--total-steps", 5000, "--checkpoint-every", 200,
            "--eval-every", 1e9, "--video-every", 1e9, "--no-progress"]
    proc = subprocess.Popen([sys.executable, str(EXAMPLE), *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    checkpoint = logdir / "checkpoint.pt"
    _wait_for(checkpoint, proc)
    time.sleep(1.0)  # let it run past the checkpoint, then kill it without warning
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = torch.load(checkpoint, weights_only=False)
    steps = state["counters"]["steps"]
    assert steps >= 200 and state["counters"]["updates"] > 0

    cfg = DreamerV2Config(**json.loads((logdir / "config.json").read_text()))
    run = DreamerV2Training(cfg.replace(total_steps=steps + 60), logdir, device="cpu", progress=False)
    assert run.resumed
    assert run.counters == state["counters"]
    assert len(run.replay) == state["replay_rows"]
    for key, value in run.loss.state_dict().items():
        torch.testing.assert_close(value, state["loss"][key], msg=key)
    for name, opt in run.stepper.optimizers.items():
        saved = state["optimizers"][name]["state"]
        assert saved and all(
            torch.equal(opt.state_dict()["state"][i]["exp_avg"], saved[i]["exp_avg"]) for i in saved
        )
    result = run.train()
    assert result["steps"] == steps + 60
    assert result["updates"] > state["counters"]["updates"]
    assert len(run.replay) > state["replay_rows"]
    final = torch.load(checkpoint, weights_only=False)
    assert final["counters"]["steps"] == steps + 60
    assert int(final["loss"]["value_loss.num_updates"]) == final["counters"]["updates"]


@pytest.mark.slow
def test_ctrl_c_saves_checkpoint(tmp_path):
    logdir = tmp_path / "run"
    args = ["--preset", "debug", "--logdir", logdir, "--total-steps", 100000, "--prefill", 50, "--no-progress",
            "--eval-every", 1e9, "--video-every", 1e9, "--checkpoint-every", 1e9]
    proc = subprocess.Popen([sys.executable, str(EXAMPLE), *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(logdir / "scalars" / "train_return.csv", proc)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "checkpoint saved" in out
    state = torch.load(logdir / "checkpoint.pt", weights_only=False)
    assert 0 < state["counters"]["steps"] < 100000


def test_clear_errors(tmp_path):
    bad_preset = _run("--preset", "nope", "--logdir", tmp_path / "a")
    assert bad_preset.returncode == 2 and "invalid choice" in bad_preset.stderr
    both = _run("--game", "Pong", "--env", "catch", "--logdir", tmp_path / "b")
    assert both.returncode != 0 and "either --game or --env" in both.stderr + both.stdout
    zero = _run("--preset", "debug", "--total-steps", "0", "--logdir", tmp_path / "c")
    assert zero.returncode != 0 and "--total-steps must be >= 1" in zero.stderr + zero.stdout
    not_int = _run("--preset", "debug", "--batch-size", "2.5", "--logdir", tmp_path / "d")
    assert not_int.returncode == 2 and "integer" in not_int.stderr
    missing = _run("--preset", "debug", "--logdir", tmp_path / "no" / "such" / "run")
    assert missing.returncode == 2 and "parent of the log directory does not exist" in missing.stderr
    unknown_env = _run("--preset", "debug", "--env", "mujoco:ant", "--logdir", tmp_path / "e")
    assert unknown_env.returncode == 2 and "Supported names" in unknown_env.stderr


def test_corrupt_checkpoint_is_reported(tmp_path):
    logdir = tmp_path / "run"
    logdir.mkdir()
    cfg = DreamerV2Config.preset("debug")
    (logdir / "config.json").write_text(json.dumps(cfg.to_dict()))
    (logdir / "checkpoint.pt").write_bytes(b"\x80\x02not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        DreamerV2Training(cfg, logdir, device="cpu", progress=False)
    proc = _run("--preset", "debug", "--logdir", logdir)
    assert proc.returncode == 2 and "corrupt" in proc.stderr
    torch.save({"version": 99}, logdir / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        DreamerV2Training(cfg, logdir, device="cpu", progress=False)


@pytest.mark.slow
def test_torchrl_trainer_with_hooks(tmp_path):
    cfg = DreamerV2Config.preset("debug", total_steps=260, prefill=150, train_every=10)
    trainer = make_dreamerv2_trainer(cfg, tmp_path / "run", device="cpu", progress=False)
    calls = []
    trainer.register_op("post_optim", lambda: calls.append(1))  # a user's own hook
    critic = next(trainer.dreamer.loss.value_loss.critic.parameters())
    trainer.train()
    run = trainer.dreamer
    assert trainer.collected_frames >= 260
    assert len(calls) == int(run.loss.value_loss.num_updates) >= 10
    target = next(run.loss.value_loss.target_critic.parameters())
    assert torch.equal(target, critic) or int(run.loss.value_loss.num_updates) % cfg.target_update_interval != 1
    assert len(run.replay) > 260
    assert (tmp_path / "run" / "scalars" / "model_loss.csv").exists()
    assert (tmp_path / "run" / "scalars" / "train_return.csv").exists()


def test_several_serial_envs(tmp_path):
    cfg = DreamerV2Config.preset("debug", num_envs=2, total_steps=240, eval_every=10**9, video_every=10**9)
    run = DreamerV2Training(cfg, tmp_path / "run", device="cpu", progress=False, parallel_envs=False)
    result = run.train()
    assert result["steps"] == 240 and result["updates"] > 0
    # 2 envs x 120 steps of 15-step Catch episodes: 16 complete episodes, each with its final row
    assert run.replay.num_episodes == 16
    assert len(run.replay) == 240 + 16
    with pytest.raises(ValueError, match="multiple of num_envs"):
        DreamerV2Training(cfg.replace(num_envs=3), tmp_path / "other", device="cpu", progress=False)
