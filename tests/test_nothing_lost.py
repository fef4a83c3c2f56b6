"""Nothing lost, round two: kills before the first checkpoint, full disks, bad values, no-op runs, honest health
signals and pace. Everything runs the command as a user would (``examples/dreamerv2_atari.py``)."""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from torchrl_dreamer.config import DreamerV2Config
from torchrl_dreamer.trainers import CHECKPOINT_FILE, make_dreamerv2_trainer

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "dreamerv2_atari.py"


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, str(EXAMPLE), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=_env())


def _popen(*args):
    return subprocess.Popen([sys.executable, str(EXAMPLE), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT, env=_env())


def _steps_strictly_increase(logdir: Path) -> None:
    for path in sorted((logdir / "scalars").glob("*.csv")):
        steps = [float(line.split(",")[0]) for line in path.read_text().splitlines() if line.strip()]
        assert steps == sorted(set(steps)), f"{path.name}: {steps}"
        assert all(math.isfinite(float(line.split(",")[1])) for line in path.read_text().splitlines() if line.strip())


def _one_error_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


# ---- no duplicate or backward step, ever -----------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("moment", ["before the first checkpoint", "during a checkpoint write", "after a checkpoint"])
def test_kill_anywhere_leaves_strictly_increasing_logs(tmp_path, moment, monkeypatch):
    logdir = tmp_path / "run"
    args = ["--preset", "debug", "--logdir", logdir, "--total-steps", 700, "--prefill", 100, "--log-every", 20,
            "--eval-every", 100, "--video-every", 1e9, "--no-progress"]
    checkpoint = logdir / CHECKPOINT_FILE
    if moment == "before the first checkpoint":
        proc = _popen(*args, "--checkpoint-every", 10**6)
        deadline = time.time() + 120
        while not list((logdir / "scalars").glob("*.csv")) or (logdir / "scalars" / "model_loss.csv").exists() is False:
            assert proc.poll() is None and time.time() < deadline, "the run ended before any log"
            time.sleep(0.2)
        time.sleep(1.0)
    elif moment == "during a checkpoint write":
        proc = _popen(*args, "--checkpoint-every", 100)
        deadline = time.time() + 120
        while not list(logdir.glob(f"{CHECKPOINT_FILE}.tmp*")) and not list(logdir.glob(f".{CHECKPOINT_FILE}*")):
            assert proc.poll() is None and time.time() < deadline, "no checkpoint write seen"
            time.sleep(0.005)
    else:
        proc = _popen(*args, "--checkpoint-every", 100)
        deadline = time.time() + 120
        while not checkpoint.exists():
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.1)
        time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if moment == "before the first checkpoint":
        assert not checkpoint.exists() and (logdir / "scalars" / "model_loss.csv").exists()
    done = _run(*args, "--checkpoint-every", 100)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["steps"] == 700
    _steps_strictly_increase(logdir)
    assert not list(logdir.glob(f"*{CHECKPOINT_FILE}.tmp*"))


# ---- a full disk: one line, nothing lost -----------------------------------------------------------------------

def _mount(kind: str, where: Path, megabytes: int) -> None:
    where.mkdir(parents=True)
    if kind == "tmpfs":
        command = ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(where)]
    else:
        image = where.parent / f"{where.name}.img"
        with open(image, "wb") as file:
            file.truncate(megabytes * 2**20)
        if subprocess.run(["mkfs.ext4", "-q", str(image)], capture_output=True).returncode:
            pytest.skip("mkfs.ext4 is not available")
        command = ["mount", "-o", "loop", str(image), str(where)]
    if os.geteuid() != 0 or subprocess.run(command, capture_output=True).returncode:
        pytest.skip(f"cannot mount a {kind} here (needs root)")


def _unmount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mount")
@pytest.mark.parametrize("kind", ["tmpfs", "ext4"])
def test_full_disk_is_one_line_and_the_same_command_resumes(tmp_path, kind):
    disk = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    _mount(kind, disk, 24)
    try:
        logdir = disk / "run"
        # the replay cannot be allocated whole on the disk: refused before anything trains, its files removed
        too_big = _run("--preset", "debug", "--env", "catch:64", "--replay-capacity", 200_000, "--logdir", logdir,
                       "--no-progress")
        assert too_big.returncode == 2
        line = _one_error_line(too_big)
        assert "is full" in line and "replay" in line and "GiB" in line and "same command" in line
        assert not [p for p in (logdir / "replay" / "storage").rglob("*.memmap")]
        shutil.rmtree(logdir)
        # a run that fills the disk with its logs, videos and checkpoints stops with one line
        args = ["--preset", "debug", "--env", "catch:64", "--replay-capacity", 3000, "--total-steps", 4000,
                "--checkpoint-every", 300, "--video-every", 100, "--eval-every", 1e9, "--logdir", logdir,
                "--no-progress"]
        full = _run(*args)
        assert full.returncode == 2, full.stderr[-3000:]
        line = _one_error_line(full)
        assert "is full" in line and "same command" in line and "MiB" in line
        checkpoint = logdir / CHECKPOINT_FILE
        assert checkpoint.exists()
        assert not list(logdir.rglob("*.tmp")) and not list(logdir.glob(f".{CHECKPOINT_FILE}*"))
        # every video is whole (no partial GIF or tensor)
        for gif in (logdir / "videos").glob("*.gif"):
            from PIL import Image

            with Image.open(gif) as image:
                image.seek(image.n_frames - 1)
        # the previous checkpoint and the replay it describes still load
        cfg = DreamerV2Config(**json.loads((logdir / "config.json").read_text()))
        trainer = make_dreamerv2_trainer(cfg, logdir, device="cpu", progress=False)
        assert trainer.resumed and len(trainer.replay_buffer) > 0
        trainer.shutdown()
        for logger in trainer.logger.loggers:  # its TensorBoard writer, before the files go
            getattr(getattr(logger, "experiment", None), "close", lambda: None)()
        trainer.run_lock.release()
        # with space freed, the same command resumes and finishes
        for video in (logdir / "videos").glob("*"):
            video.unlink()
        if kind == "tmpfs":
            subprocess.run(["mount", "-o", "remount,size=256m", str(disk)], check=True)
        else:
            shutil.rmtree(logdir / "tb", ignore_errors=True)
            args[args.index("--video-every") + 1] = 10**9
        done = _run(*args)
        assert done.returncode == 0, done.stderr[-3000:]
        _steps_strictly_increase(logdir)
    finally:
        _unmount(disk)


# ---- one line for every bad value ------------------------------------------------------------------------------

def test_bad_values_are_one_line_with_status_2(tmp_path):
    for args, expected in (
        (["--total-steps", "inf"], "expected a finite number"),
        (["--batch-length", "1"], "batch_length must be an integer >= 2"),
        (["--imagination-horizon", "1"], "imagination_horizon must be an integer >= 2"),
        (["--batch-size", "100000"], "needs about"),
        (["--seed", "abc"], "invalid int value"),  # argparse's own errors too: one line, not the whole usage
        (["--precision", "fp8"], "invalid choice"),
    ):
        proc = _run("--preset", "debug", "--logdir", tmp_path / "run", "--no-progress", *args)
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        assert expected in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr[-2000:])
        errors = [line for line in proc.stderr.splitlines() if not line.startswith("warning: ")]
        assert len(errors) == 1 and errors[0].startswith("error: "), (args, proc.stderr[-2000:])
        assert not (tmp_path / "run").exists()  # refused before anything was written


def test_a_batch_too_large_for_memory_is_refused_before_any_work(tmp_path, monkeypatch):
    from torchrl_dreamer.trainers import memory

    monkeypatch.setattr(memory, "available_memory", lambda: 2**20)
    from torchrl_dreamer.trainers import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "available_memory", lambda: 2**20)
    with pytest.raises(ValueError, match=r"needs about [\d.]+ GiB of memory .* and 0.1 GiB are free"):
        make_dreamerv2_trainer(DreamerV2Config.preset("debug"), tmp_path / "run", device="cpu", progress=False)
    assert not (tmp_path / "run").exists()


def test_the_memory_estimate_is_the_order_of_an_update_peak():
    """The estimate that refuses batches is within a factor 2 of a measured update's peak (a small preset)."""
    code = (
        "import resource, torch, json\n"
        "from torchrl.data import Composite, Unbounded, OneHot\n"
        "from torchrl_dreamer.config import DreamerV2Config\n"
        "from torchrl_dreamer.trainers.memory import estimate_update_memory\n"
        "import sys; sys.path.insert(0, 'benchmarks')\n"
        "from update_speed import make_batch\n"
        "torch.set_num_threads(1)\n"
        "cfg = DreamerV2Config.preset('small', batch_size=32)\n"
        "m = cfg.make_models(Composite(pixels=Unbounded((1, 64, 64), dtype=torch.uint8)), OneHot(18))\n"
        "loss = cfg.make_loss(m); stepper = cfg.make_stepper(loss)\n"
        "batch = make_batch(32, 32, 18, torch.device('cpu'))\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "stepper.step(None, batch.clone())\n"
        "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
        "est = estimate_update_memory(m.world_model, m.actor, m.critic, batch_size=32, batch_length=32, "
        "imagination_horizon=15, dynamics_gradients=False)\n"
        "print(json.dumps({'peak': peak, 'estimate': est}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=_env())
    assert out.returncode == 0, out.stderr[-2000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert 0.5 <= figures["estimate"] / figures["peak"] <= 2.0, figures


# ---- a no-op changes nothing -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_finished_or_over_budget_run_changes_no_file(tmp_path):
    logdir = tmp_path / "run"
    args = ["--preset", "debug", "--logdir", logdir, "--total-steps", 300, "--no-progress"]
    assert _run(*args).returncode == 0
    before = _tree(logdir)
    for extra in ([], ["--total-steps", 200]):  # finished; asked for fewer steps than done
        again = _run(*args, *extra)
        assert again.returncode == 0, again.stderr[-2000:]
        assert _tree(logdir) == before


# ---- health signals that are right -----------------------------------------------------------------------------

def test_one_nan_observation_gives_integer_counts_no_nan_rows_and_no_false_warnings(tmp_path, capsys):
    """One NaN observation: one warning naming the key; the skipped update is left out of the averaged metrics
    (no NaN row, no false critic or entropy warning) and nonfinite_updates is an integer."""
    from torchrl_dreamer.envs import CatchEnv

    class OneNaN(CatchEnv):
        count = 0

        def _step(self, tensordict):
            out = super()._step(tensordict)
            OneNaN.count += 1
            if OneNaN.count == 160:
                out.set("observation", torch.full_like(out.get("observation"), float("nan")))
            return out

    cfg = DreamerV2Config.preset("debug", total_steps=400, prefill=100, log_every=50, eval_every=10**9,
                                 video_every=10**9, mlp_keys="observation", cnn_keys="")
    with pytest.warns(UserWarning, match="NaN or inf in 'observation'"):
        trainer = make_dreamerv2_trainer(cfg, tmp_path / "run", env=lambda: OneNaN(size=8, vector_obs=True),
                                         device="cpu", progress=False)
        trainer.train()
    out = capsys.readouterr().out
    assert "diverging" not in out and "collapsed" not in out
    _steps_strictly_increase(tmp_path / "run")
    counts = (tmp_path / "run" / "scalars" / "nonfinite_updates.csv").read_text().split()
    assert all(float(row.split(",")[1]).is_integer() for row in counts)
    assert trainer.optimization_stepper.nonfinite_updates >= 1


def test_entropy_fraction_only_for_discrete_actions():
    from torchrl.data import Bounded, Composite, OneHot, Unbounded

    from conftest import make_batch
    from torchrl_dreamer.modules import DEBUG_SIZES, make_dreamerv2_models
    from torchrl_dreamer.objectives import make_dreamerv2_loss

    pixels = Composite(pixels=Unbounded((1, 16, 16), dtype=torch.uint8))
    for spec, discrete in ((OneHot(3), True), (Bounded(-1.0, 1.0, (3,)), False)):
        loss = make_dreamerv2_loss(make_dreamerv2_models(pixels, spec, **DEBUG_SIZES))
        _, posteriors = loss.model_loss(make_batch(2, 5, discrete=discrete))
        out, _ = loss.actor_loss(posteriors)
        assert ("actor_ent_fraction" in out.keys()) == discrete
        assert ("actor_ent_fraction" in loss.actor_loss.out_keys) == discrete


def test_channels_last_images_and_a_broken_config_are_named(tmp_path):
    from torchrl.data import Composite, OneHot, Unbounded

    from torchrl_dreamer.modules import DEBUG_SIZES, make_dreamerv2_models

    with pytest.raises(ValueError, match=r"\[64, 64, 3\]: channels last.*ToTensorImage"):
        make_dreamerv2_models(Composite(pixels=Unbounded((64, 64, 3), dtype=torch.uint8)), OneHot(3), **DEBUG_SIZES)
    logdir = tmp_path / "run"
    args = ["--preset", "debug", "--logdir", logdir, "--total-steps", 200, "--no-progress"]
    assert _run(*args).returncode == 0
    (logdir / "config.json").write_text("garbage")
    proc = _run(*args, "--total-steps", 300)
    assert proc.returncode == 2
    line = _one_error_line(proc)
    assert "config.json is not a valid config" in line and "delete config.json to resume with it" in line


# ---- an honest progress bar ------------------------------------------------------------------------------------

def test_the_bar_says_prefill_then_counts_only_this_session(tmp_path):
    cfg = DreamerV2Config.preset("debug", total_steps=300, prefill=150, eval_every=10**9, video_every=10**9)
    trainer = make_dreamerv2_trainer(cfg, tmp_path / "run", device="cpu", progress=True)
    seen = []
    trainer.register_op("post_steps", lambda: seen.append((trainer._pbar.phase, trainer._pbar.total,
                                                            trainer._pbar.initial)))
    trainer.train()
    assert seen[0] == ("prefill", 150, 0) and seen[-1][:2] == ("train", 300)
    trainer = make_dreamerv2_trainer(cfg.replace(total_steps=400), tmp_path / "run", device="cpu", progress=True)
    seen.clear()
    trainer.register_op("post_steps", lambda: seen.append((trainer._pbar.phase, trainer._pbar.total,
                                                            trainer._pbar.initial)))
    trainer.train()
    assert seen[0] == ("train", 400, 300)  # the resumed steps are where the bar starts, not steps done now
