"""The one training path end to end: CLI and Python, user envs, stock TorchRL hooks, resume, SIGKILL, Ctrl-C."""
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
from torchrl.checkpoint import Checkpoint
from torchrl.trainers import LogScalar

from torchrl_dreamer.config import DreamerV2Config
from torchrl_dreamer.envs import CatchEnv
from torchrl_dreamer.trainers import CHECKPOINT_FILE, CheckpointError, DreamerV2Trainer, make_dreamerv2_trainer

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "dreamerv2_atari.py"
METRICS = ["train_return", "train_length", "eval_return", "eval_length", "fps", "kl_loss", "image_loss", "reward_loss",
           "discount_loss", "model_kl", "prior_ent", "post_ent", "model_loss", "model_grad_norm", "actor_loss",
           "actor_ent", "actor_grad_norm", "critic_loss", "critic_grad_norm", "critic", "critic_target",
           "critic_slow", "reward_mean", "reward_std"]
QUIET = dict(eval_every=10**9, video_every=10**9, checkpoint_every=10**9)


def _run(*args, timeout=300, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(EXAMPLE), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env, **kwargs)


def _result(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _last(logdir: Path, name: str) -> tuple[int, float]:
    frames, value = (logdir / "scalars" / f"{name}.csv").read_text().strip().splitlines()[-1].split(",")
    return int(frames), float(value)


@pytest.mark.slow
def test_debug_run_end_to_end(tmp_path):
    logdir = tmp_path / "run"
    proc = _run("--preset", "debug", "--logdir", logdir)
    result = _result(proc)
    assert result["steps"] == 400 and result["updates"] > 0 and "last_eval" in result
    assert "frame" in proc.stderr or "it/s" in proc.stderr  # the progress bar
    for name in METRICS:
        frames, value = _last(logdir, name)
        assert frames > 0 and value == value and abs(value) != float("inf"), name
    gifs = sorted((logdir / "videos").glob("openl_*.gif"))
    assert gifs and sorted((logdir / "videos").glob("openl_*.pt"))  # the GIF and the logger's log_video
    with Image.open(gifs[-1]) as gif:
        assert gif.n_frames == 10  # batch_length frames: 5 observed, 5 imagined
        assert gif.size == (2 * 16 * 4, 2 * 16 * 3)  # drawn at 2x: 4 sequences side by side, truth / model / error rows
    config = json.loads((logdir / "config.json").read_text())
    assert config["env"] == "catch" and config["rnn_hidden_dim"] == 32
    assert Checkpoint.manifest(logdir / CHECKPOINT_FILE)["metadata"]["steps"] == 400
    # a finished run resumes and stops at once
    again = _run("--preset", "debug", "--logdir", logdir, "--no-progress")
    assert _result(again)["steps"] == 400 and "Resuming" in again.stdout


@pytest.mark.slow
def test_cartpole_from_the_readme_trains_and_evaluates(tmp_path):
    proc = _run("--env", "gym:CartPole-v1", "--preset", "debug", "--total-steps", 600, "--prefill", 300,
                "--eval-every", 600, "--logdir", tmp_path / "cartpole", "--no-progress")
    result = _result(proc)
    assert result["updates"] > 0 and result["last_eval"]["eval_length"] >= 8
    assert _last(tmp_path / "cartpole", "image_loss")[1] > 0  # the vector observation is reconstructed
    assert not (tmp_path / "cartpole" / "videos").exists() or not list((tmp_path / "cartpole" / "videos").glob("*.gif"))


@pytest.mark.slow
def test_minatar_pixels_train_through_the_cli(tmp_path):
    # the pixel task of benchmarks/learning.py: 4 object planes, 20 x 20, an env from a package we did not write
    proc = _run("--env", "minatar:Breakout", "--preset", "debug", "--total-steps", 300, "--prefill", 150,
                "--eval-every", 300, "--logdir", tmp_path / "minatar", "--no-progress")
    result = _result(proc)
    assert result["updates"] > 0 and result["last_eval"]["eval_length"] >= 1
    assert _last(tmp_path / "minatar", "image_loss")[1] > 0
    config = json.loads((tmp_path / "minatar" / "config.json").read_text())
    assert config["env"] == "minatar:Breakout" and config["action_repeat"] == 1


@pytest.mark.slow
def test_dict_observation_env_from_a_factory_cli_and_python(tmp_path):
    proc = _run("--env", "tests.user_envs:dict_catch", "--preset", "debug", "--total-steps", 300, "--prefill", 150,
                "--logdir", tmp_path / "cli", "--no-progress", *sum(([f"--{k.replace('_', '-')}", v]
                                                                     for k, v in QUIET.items()), []))
    assert _result(proc)["updates"] > 0
    from tests.user_envs import dict_catch

    cfg = DreamerV2Config.preset("debug", total_steps=300, prefill=150, **QUIET)
    trainer = make_dreamerv2_trainer(cfg, tmp_path / "py", env=dict_catch, device="cpu", progress=False)
    world_model = trainer.models.world_model
    assert world_model.cnn_keys == ["pixels"] and world_model.mlp_keys == ["observation"]
    sample_keys = set()
    trainer.register_op("process_optim_batch", lambda batch: sample_keys.update(batch.keys()))
    assert trainer.train()["updates"] > 0
    assert {"pixels", "observation"} <= sample_keys  # both observations are stored and sampled


@pytest.mark.slow
def test_user_atari_env_built_from_torchrl_transforms(tmp_path):
    """GymEnv("ALE/Pong-v5") + ToTensorImage + GrayScale + InitTracker, 210 x 160 frames, as a factory."""
    from tests.user_envs import pong_gray

    args = dict(total_steps=120, prefill=80, train_every=20, batch_length=8, **QUIET)
    cfg = DreamerV2Config.preset("debug", **args)
    trainer = make_dreamerv2_trainer(cfg, tmp_path / "py", env=pong_gray, device="cpu", progress=False)
    assert trainer.models.world_model.cnn_keys == ["pixels"]
    assert trainer.train()["updates"] > 0
    flags = sum(([f"--{k.replace('_', '-')}", v] for k, v in args.items()), [])
    proc = _run("--env", "tests.user_envs:pong_gray", "--preset", "debug", *flags, "--logdir", tmp_path / "cli",
                "--no-progress")
    assert _result(proc)["updates"] > 0


def test_float_frames_from_to_tensor_image_defaults_are_modelled(tmp_path):
    """ToTensorImage() at its defaults gives float frames in [0, 1]: the world model encodes them (not vectors-only,
    not dropped), the replay keeps them, and the open-loop video shows them."""
    from tests.user_envs import pong_float

    cfg = DreamerV2Config.preset("debug", total_steps=120, prefill=80, train_every=20, batch_length=8,
                                 eval_every=10**9, checkpoint_every=10**9, video_every=100)
    trainer = make_dreamerv2_trainer(cfg, tmp_path / "run", env=pong_float, device="cpu", progress=False)
    wm = trainer.models.world_model
    assert wm.cnn_keys == ["pixels"] and wm.encoder.image_dtypes == {"pixels": torch.float32}
    assert trainer.train()["updates"] > 0
    sample = trainer.replay_buffer.sample()
    assert sample["pixels"].dtype == torch.float32 and 0 <= float(sample["pixels"].min()) <= 1
    assert sorted((tmp_path / "run" / "videos").glob("openl_*.gif"))


def test_env_instance_with_evaluation_on_the_same_env(tmp_path):
    cfg = DreamerV2Config.preset("debug", total_steps=200, prefill=100, eval_every=100, video_every=10**9)
    trainer = make_dreamerv2_trainer(cfg, tmp_path / "run", env=CatchEnv(size=8, scale=2, seed=1), device="cpu",
                                     progress=False)
    result = trainer.train()
    assert result["steps"] == 200 and result["last_eval"]["eval_length"] == 7.0
    assert trainer.config.env == "CatchEnv instance"
    with pytest.raises(ValueError, match="factory"):
        make_dreamerv2_trainer(cfg.replace(num_envs=2, train_every=10), tmp_path / "two", env=CatchEnv(size=8, scale=2),
                               device="cpu", progress=False)


def test_one_trainer_stock_and_user_hooks_and_compute_loss(tmp_path):
    cfg = DreamerV2Config.preset("debug", total_steps=260, prefill=150, train_every=10, **QUIET)
    trainer = make_dreamerv2_trainer(cfg, tmp_path / "run", device="cpu", progress=False)
    assert isinstance(trainer, DreamerV2Trainer)
    calls, methods = [], []
    trainer.register_op("post_optim", lambda: calls.append(1))  # a user's own hook
    LogScalar(key=("next", "reward"), logname="batch_reward", log_pbar=False).register(trainer)  # a stock one
    compute_loss = trainer.compute_loss

    def counting(batch, method=None):
        methods.append(method)
        return compute_loss(batch, method=method)

    trainer.compute_loss = counting
    result = trainer.train()
    # prefill 150 steps, pretrain 2, then one update per 10 steps: 2 + (260 - 150) // 10
    assert result["updates"] == len(calls) == 2 + 11
    # TorchRL's HardUpdate, stepped at post_optim: it has counted every update since its last copy
    assert trainer.target_net_updater.counter == (result["updates"] - 1) % cfg.target_update_interval
    assert methods == ["model_loss", "actor_loss", "value_loss"] * result["updates"]
    assert (tmp_path / "run" / "scalars" / "batch_reward.csv").exists()
    assert (tmp_path / "run" / "scalars" / "model_loss.csv").exists()


def test_prefill_counts_agent_steps_with_action_repeat(tmp_path):
    cfg = DreamerV2Config.preset("debug", action_repeat=4, total_steps=200, prefill=160, pretrain=3, **QUIET)
    trainer = make_dreamerv2_trainer(cfg, tmp_path / "run", device="cpu", progress=False)
    first_update = []
    trainer.register_op("post_optim", lambda: first_update.append(trainer.steps) if not first_update else None)
    result = trainer.train()
    assert first_update == [160]  # not at a quarter of the prefill
    assert result["updates"] == 3 + (200 - 160) // 10 and result["frames"] == 800
    assert trainer.collected_frames == 800


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180):
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read()[-3000:])
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"no {path.name} in time")
        time.sleep(0.2)


def _popen(*args):
    return subprocess.Popen([sys.executable, str(EXAMPLE), *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_resume_after_sigkill_continues_from_checkpoint(tmp_path):
    logdir = tmp_path / "run"
    proc = _popen("--preset", "debug", "--logdir", logdir, "--total-steps", 5000, "--checkpoint-every", 200,
                  "--eval-every", 1e9, "--video-every", 1e9, "--no-progress")
    checkpoint = logdir / CHECKPOINT_FILE
    _wait_for(checkpoint, proc)
    time.sleep(1.5)  # let it run past the checkpoint, then kill it without warning
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = Checkpoint.manifest(checkpoint)["metadata"]
    assert saved["steps"] >= 200 and saved["updates"] > 0

    cfg = DreamerV2Config(**json.loads((logdir / "config.json").read_text()))
    trainer = make_dreamerv2_trainer(cfg.replace(total_steps=saved["steps"] + 60), logdir, device="cpu",
                                     progress=False)
    assert trainer.resumed and (trainer.steps, trainer.updates) == (saved["steps"], saved["updates"])
    assert trainer.collected_frames == saved["steps"]
    rows = len(trainer.replay_buffer)
    assert rows >= saved["steps"]  # every transition of the checkpoint, plus the final rows of episodes
    assert trainer.target_net_updater.counter == (saved["updates"] - 1) % cfg.target_update_interval  # restored
    optimizer_state = trainer.optimization_stepper.optimizers["model"].state_dict()["state"]
    assert optimizer_state and all(int(s["step"]) == saved["updates"] for s in optimizer_state.values())
    result = trainer.train()
    assert result["steps"] == saved["steps"] + 60 and result["updates"] > saved["updates"]
    assert len(trainer.replay_buffer) > rows
    final = Checkpoint.manifest(checkpoint)["metadata"]
    assert final["steps"] == saved["steps"] + 60 and final["updates"] == result["updates"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_save_a_checkpoint(tmp_path, sig):
    logdir = tmp_path / "run"
    proc = _popen("--preset", "debug", "--logdir", logdir, "--total-steps", 100000, "--prefill", 50, "--no-progress",
                  "--eval-every", 1e9, "--video-every", 1e9, "--checkpoint-every", 1e9)
    _wait_for(logdir / "scalars" / "train_return.csv", proc)
    time.sleep(1.0)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "checkpoint saved" in out
    saved = Checkpoint.manifest(logdir / CHECKPOINT_FILE)["metadata"]
    assert 0 < saved["steps"] < 100000


def test_clear_errors(tmp_path):
    bad_preset = _run("--preset", "nope", "--logdir", tmp_path / "a")
    assert bad_preset.returncode == 2 and "invalid choice" in bad_preset.stderr
    both = _run("--game", "Pong", "--env", "catch", "--logdir", tmp_path / "b")
    assert both.returncode != 0 and "either --game or --env" in both.stderr + both.stdout
    zero = _run("--preset", "debug", "--total-steps", "0", "--logdir", tmp_path / "c")
    assert zero.returncode != 0 and "total_steps must be an integer >= 1" in zero.stderr + zero.stdout
    not_int = _run("--preset", "debug", "--batch-size", "2.5", "--logdir", tmp_path / "d")
    assert not_int.returncode == 2 and "integer" in not_int.stderr
    unknown_env = _run("--preset", "debug", "--env", "mujoco:ant", "--logdir", tmp_path / "e")
    assert unknown_env.returncode == 2 and "mujoco" in unknown_env.stderr
    no_module = _run("--preset", "debug", "--env", "no_such_module:make", "--logdir", tmp_path / "f")
    assert no_module.returncode == 2 and "no_such_module" in no_module.stderr
    (tmp_path / "file").write_text("x")
    a_file = _run("--preset", "debug", "--logdir", tmp_path / "file")
    assert a_file.returncode == 2 and "existing file" in a_file.stderr


def test_corrupt_checkpoint_is_reported_and_nothing_is_written(tmp_path):
    logdir = tmp_path / "run"
    logdir.mkdir()
    (logdir / CHECKPOINT_FILE).write_bytes(b"PK\x03\x04not a checkpoint")
    cfg = DreamerV2Config.preset("debug")
    with pytest.raises(CheckpointError, match="corrupt"):
        make_dreamerv2_trainer(cfg, logdir, device="cpu", progress=False)
    proc = _run("--preset", "debug", "--logdir", logdir)
    assert proc.returncode == 2 and "corrupt" in proc.stderr and "Remove" not in proc.stderr
    assert sorted(p.name for p in logdir.iterdir()) == [CHECKPOINT_FILE]


def test_several_serial_envs(tmp_path):
    cfg = DreamerV2Config.preset("debug", num_envs=2, total_steps=240, **QUIET)
    trainer = make_dreamerv2_trainer(cfg, tmp_path / "run", device="cpu", progress=False, parallel_envs=False)
    result = trainer.train()
    assert result["steps"] == 240 and result["updates"] > 0
    # 2 envs x 120 steps of 15-step Catch episodes: 16 complete episodes, each with its final row
    assert trainer.replay_buffer.num_episodes == 16 and result["episodes"] == 16
    assert len(trainer.replay_buffer) == 240 + 16
    with pytest.raises(ValueError, match="multiple of num_envs"):
        make_dreamerv2_trainer(cfg.replace(num_envs=3), tmp_path / "other", device="cpu", progress=False)


def test_parallel_envs_leave_the_learner_its_threads(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cfg = DreamerV2Config.preset("debug", num_envs=2, total_steps=200, **QUIET)
        trainer = make_dreamerv2_trainer(cfg, tmp_path / "run", device="cpu", progress=False)
        assert trainer.optimization_stepper.shard_pool.shards == 2  # the update in one shard per thread
        during = []
        trainer.register_op("post_optim", lambda: during.append(torch.get_num_threads()))
        result = trainer.train()
        # TorchRL's ParallelEnv would leave the learner cores - workers threads (here 1); the workers wait
        # while the learner updates, so it keeps its 2
        assert result["updates"] > 0 and set(during) == {2}
        assert trainer.optimization_stepper.shard_pool._executor is None  # train() stopped the update's workers
    finally:
        torch.set_num_threads(threads)


def test_batched_evaluation_takes_a_fixed_share_of_episodes_from_each_env(tmp_path):
    cfg = DreamerV2Config.preset("debug", total_steps=160, prefill=150, **QUIET)
    trainer = make_dreamerv2_trainer(cfg, tmp_path / "run", device="cpu", progress=False)
    trainer.train()
    hook = trainer.evaluation
    calls = []
    make_env = hook.make_env
    hook.make_env = lambda seed, num_envs: calls.append(num_envs) or make_env(seed, num_envs)
    hook.num_envs = 3
    result = hook.evaluate(7, seed=5)
    # 3 envs stepped together, 3 + 2 + 2 episodes; Catch episodes are 15 steps (the ball falls 15 rows)
    assert calls == [3] and len(result["returns"]) == 7 and result["lengths"] == [15] * 7
    assert all(r in (-1.0, 1.0) for r in result["returns"])
    hook.num_envs = 1
    one = hook.evaluate(2, seed=5)
    assert calls == [3, 1] and one["lengths"] == [15, 15]
    hook.num_envs = 8  # never more envs than episodes
    hook.evaluate(2, seed=5)
    assert calls[-1] == 2


def test_final_evaluation_runs_once_and_survives_resume(tmp_path):
    logdir = tmp_path / "run"
    cfg = DreamerV2Config.preset("debug", total_steps=200, final_eval_episodes=6, eval_envs=4, **QUIET)
    result = make_dreamerv2_trainer(cfg, logdir, device="cpu", progress=False).train()
    final = json.loads((logdir / "final_eval.json").read_text())
    assert final["episodes"] == 6 and len(final["returns"]) == 6 and final["steps"] == 200
    assert result["final_eval"]["eval_return"] == pytest.approx(sum(final["returns"]) / 6)
    frames, value = _last(logdir, "final_eval_return")
    assert frames == 200 and value == pytest.approx(final["eval_return"])
    # a finished run resumes with its final evaluation: nothing is evaluated or written again
    before = (logdir / "final_eval.json").stat().st_mtime_ns
    trainer = make_dreamerv2_trainer(cfg, logdir, device="cpu", progress=False)
    trainer.evaluation.make_env = None  # would fail if called
    again = trainer.train()
    assert again["final_eval"] == result["final_eval"]
    assert (logdir / "final_eval.json").stat().st_mtime_ns == before


def test_final_evaluation_stopped_is_done_again_on_resume(tmp_path):
    logdir = tmp_path / "run"
    cfg = DreamerV2Config.preset("debug", total_steps=200, final_eval_episodes=4, eval_envs=2, **QUIET)
    trainer = make_dreamerv2_trainer(cfg, logdir, device="cpu", progress=False)
    evaluate = trainer.evaluation.evaluate

    def interrupted(*args, **kwargs):  # Ctrl-C during the final evaluation
        trainer.interrupted = True
        return evaluate(*args, **kwargs)

    trainer.evaluation.evaluate = interrupted
    result = trainer.train()
    assert "final_eval" not in result and not (logdir / "final_eval.json").exists()
    again = make_dreamerv2_trainer(cfg, logdir, device="cpu", progress=False).train()
    assert again["final_eval"]["episodes"] == 4 and (logdir / "final_eval.json").exists()


@pytest.mark.slow
def test_stock_replay_from_the_command_line_trains_and_resumes(tmp_path):
    """--replay stock: TorchRL's TensorDictReplayBuffer of transitions with a SliceSampler; checkpointed with the
    run (its storage), resumed with it, and a resume without the flag is refused (the replay is a setting)."""
    logdir = tmp_path / "run"
    common = ["--preset", "debug", "--replay", "stock", "--logdir", logdir, "--no-progress", "--eval-every", 10**9]
    first = _result(_run(*common, "--total-steps", 300))
    assert first["updates"] > 0
    cfg = DreamerV2Config(**json.loads((logdir / "config.json").read_text()))
    trainer = make_dreamerv2_trainer(cfg.replace(total_steps=400), logdir, device="cpu", progress=False)
    assert type(trainer.replay_buffer).__name__ == "TensorDictReplayBuffer" and len(trainer.replay_buffer) == 300
    assert trainer.train()["updates"] > first["updates"]
    other = _run("--preset", "debug", "--logdir", logdir, "--no-progress", "--total-steps", 500)
    assert other.returncode == 2 and "replay" in other.stderr
