"""Past one machine, on a local Ray cluster: the data-parallel learner is one process on the whole batch, the
collectors' episodes stay whole, and faults are survived (``pip install -e ".[distributed]"``)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

import torch.distributed as dist  # noqa: E402

from torchrl_dreamer.config import DreamerV2Config  # noqa: E402
from torchrl_dreamer.modules import actor as actor_module, rssm as rssm_module  # noqa: E402
from torchrl_dreamer.trainers.distributed import RankStepper, init_ray, make_dreamerv2_ray_trainer  # noqa: E402

from conftest import row_local_sample as _row_local_sample  # noqa: E402

# the recording stepper below, and the draws it patches in, run on the ranks
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
ray.cloudpickle.register_pickle_by_value(sys.modules["conftest"])


@pytest.fixture(scope="module")
def cluster():
    init_ray(num_cpus=5)
    yield
    ray.shutdown()


def _config(**overrides) -> DreamerV2Config:
    settings = dict(env="gym:CartPole-v1", total_steps=360, prefill=200, pretrain=1, batch_size=4, batch_length=8,
                    train_every=40, imagination_horizon=4, compile=False, compile_policy=False, seed=3,
                    eval_every=10**9, video_every=10**9, log_every=10**9)
    settings.update(overrides)
    return DreamerV2Config.preset("debug", **settings)


class _Recording(RankStepper):
    """Each rank writes, per update, its batch, the parameters before and after and the gradients it applied."""

    out_dir: str = ""

    def step(self, trainer, sub_batch):
        rssm_module.straight_through_sample = _row_local_sample
        actor_module.straight_through_sample = _row_local_sample
        loss = self.stepper.loss
        before = {n: p.detach().clone() for n, p in loss.named_parameters()}
        metrics = super().step(trainer, sub_batch)
        self.updates = getattr(self, "updates", 0) + 1
        record = {
            "batch": sub_batch.detach().cpu().clone(), "before": before,
            "grads": {n: None if p.grad is None else p.grad.detach().clone() for n, p in loss.named_parameters()},
            "after": {n: p.detach().clone() for n, p in loss.named_parameters()},
            "world_size": dist.get_world_size(),
        }
        torch.save(record, Path(self.out_dir) / f"rank{dist.get_rank()}_update{self.updates}.pt")
        return metrics


@pytest.mark.parametrize("shards", [1, 2], ids=["eager", "sharded"])
def test_two_learners_hold_one_model_and_take_the_whole_batch_update(cluster, tmp_path, monkeypatch, shards):
    records = tmp_path / "records"
    records.mkdir()

    def make_stepper(stepper, target_updater):
        recording = _Recording(stepper, target_updater)
        recording.out_dir = str(records)
        return recording

    config = _config(log_every=40)
    trainer = make_dreamerv2_ray_trainer(config, tmp_path / "run", collectors=1, learners=2, shards=shards,
                                         progress=False, make_stepper=make_stepper)
    trainer.train()
    # each row records the weights that collected it; the learner logs how many updates old the sampled rows are
    versions = torch.cat([e["rows"]["policy_version"] for e in trainer.replay.client().episodes()])
    assert versions.min() == 0 and versions.max() >= 1  # prefill rows, then rows of published weights
    assert (tmp_path / "run" / "scalars" / "policy_lag.csv").exists()
    updates = sorted(records.glob("rank0_update*.pt"))
    assert len(updates) >= 3, updates
    for k in range(1, len(updates) + 1):
        rank0, rank1 = (torch.load(records / f"rank{r}_update{k}.pt", weights_only=False) for r in (0, 1))
        assert rank0["world_size"] == 2 and "policy_version" in rank0["batch"].keys()
        for name in rank0["after"]:  # one model: identical on both ranks after every update
            assert torch.equal(rank0["after"][name], rank1["after"][name]), (k, name)
        assert not torch.equal(rank0["batch"]["observation"], rank1["batch"]["observation"])  # each its own half
    # the first update, again in this process on both halves together: the same gradients and parameters
    monkeypatch.setattr(rssm_module, "straight_through_sample", _row_local_sample)
    monkeypatch.setattr(actor_module, "straight_through_sample", _row_local_sample)
    rank0, rank1 = (torch.load(records / f"rank{r}_update1.pt", weights_only=False) for r in (0, 1))
    models = trainer.models
    loss = config.make_loss(models)
    with torch.no_grad():
        for name, param in loss.named_parameters():
            param.copy_(rank0["before"][name])
    stepper = RankStepper(config.make_stepper(loss), config.make_target_updater(loss))
    stepper.step(None, torch.cat([rank0["batch"], rank1["batch"]]).exclude("index", "policy_version"))
    for name, param in loss.named_parameters():
        expected = param.grad
        got = rank0["grads"][name]
        if expected is None:
            assert got is None or not got.any(), name
            continue
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(rank0["after"][name], param.detach(), rtol=1e-4, atol=1e-6, msg=name)


def _batch_mean_rank(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    from torchrl_dreamer.objectives.functional import batch_mean, data_parallel

    inputs, mask = _halves()[rank]
    weight = _weight()  # a parameter both ranks hold
    values = weight * inputs
    with data_parallel():
        loss = batch_mean(values, mask).clamp_min(0.5) + batch_mean(values.square())
    loss.backward()
    grad = weight.grad.clone()
    dist.all_reduce(grad)  # DDP's average of the ranks' gradients
    torch.save({"loss": loss.detach(), "grad": grad / 2}, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _weight() -> torch.Tensor:
    return torch.linspace(0.5, 1.5, 6).requires_grad_(True)


def _halves():
    gen = torch.Generator().manual_seed(0)
    values = torch.rand(2, 6, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 0, 0, 1, 0, 0]], dtype=torch.float32)  # 5 and 2 known rows
    return list(zip(values.unbind(0), mask.unbind(0)))


def test_batch_statistics_span_every_rank_and_ddp_averaging_gives_the_whole_batch_gradient(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_batch_mean_rank, args=(port, str(tmp_path)), nprocs=2)
    (x0, m0), (x1, m1) = _halves()
    weight = _weight()
    values, mask = torch.cat([weight * x0, weight * x1]), torch.cat([m0, m1])
    # one process on the whole batch: the masked mean over all 7 known rows, the plain mean over all 12
    expected = ((values * mask).sum() / mask.sum()).clamp_min(0.5) + values.square().mean()
    expected.backward()
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["loss"], expected.detach())
        torch.testing.assert_close(got["grad"], weight.grad)


def test_two_collectors_write_whole_episodes_with_ids_unique_across_workers(cluster, tmp_path):
    config = _config(total_steps=400, prefill=400)  # random actions only: the collectors and the replay service
    trainer = make_dreamerv2_ray_trainer(config, tmp_path / "run", collectors=2, learners=1, progress=False)
    trainer.train()
    episodes = trainer.replay.client().episodes()
    assert {episode["key"] % 2 for episode in episodes} == {0, 1}  # both workers' episodes, told apart by id
    assert len({episode["key"] for episode in episodes}) == len(episodes)  # no id shared by two episodes
    for episode in episodes:  # each one episode: it starts at its first row and nowhere else, and ends at most once
        rows = episode["rows"]
        assert rows["is_init"][0].item() and not rows["is_init"][1:].any(), episode["key"]
        done = rows["next", "done"].reshape(-1)  # on the row of the last step; then the final observation's row
        if episode["closed"]:
            assert len(done) >= 2 and done[-2] and not done[:-2].any(), episode["key"]
        else:  # the episodes still running when collection stopped
            assert not done.any(), episode["key"]
    closed = [episode for episode in episodes if episode["closed"]]
    assert len(closed) >= 10  # CartPole's random episodes last ~20 steps
    # the workers report the episodes they end; the driver logs them as the local trainer does
    logged = _csv(tmp_path / "run" / "scalars" / "train_episodes.csv")
    in_flight = 2 * 2 * config.train_every // 8  # at most: the batches still collecting when the run stopped
    assert len(closed) - in_flight <= int(float(logged[-1][1])) <= len(closed)
    returns = [float(row[1]) for row in _csv(tmp_path / "run" / "scalars" / "train_return.csv")]
    stored = [episode["rows"]["next", "reward"].sum().item() for episode in closed]
    assert min(stored) <= min(returns) and max(returns) <= max(stored)  # each logged row: a mean of real returns


def test_a_collector_killed_mid_run_is_restarted_its_episodes_closed_and_collection_goes_on(cluster, tmp_path,
                                                                                              capfd):
    config = _config(total_steps=1200, prefill=200, train_every=20)
    trainer = make_dreamerv2_ray_trainer(config, tmp_path / "run", collectors=2, learners=1, progress=False)
    killed = {}

    def kill_worker_0() -> None:  # once, mid-run, with updates made and weights published
        if not killed and trainer._optim_count >= 10:
            killed["at"] = trainer.collected_frames
            killed["keys"] = set(trainer.replay.client().episode_keys())
            ray.kill(trainer.collector.remote_collectors[0])

    trainer.register_op("post_steps", kill_worker_0)
    result = trainer.train()
    assert killed and result["steps"] >= 1200  # collection went on to the end of the budget
    assert trainer.collector.restarts == 1
    assert "collector worker 0 died" in capfd.readouterr().err
    assert [row[1] for row in _csv(tmp_path / "run" / "scalars" / "collector_restarts.csv")] == ["1.0"]
    episodes = trainer.replay.client().episodes()
    assert len({episode["key"] for episode in episodes}) == len(episodes)  # the successor's ids are new ones
    for episode in episodes:  # none spliced: each starts at its first row and nowhere else
        assert episode["rows"]["is_init"][0].item() and not episode["rows"]["is_init"][1:].any(), episode["key"]
    dead = [e for e in episodes if e["key"] % 2 == 0 and e["key"] in killed["keys"]]
    successor = [e for e in episodes if e["key"] % 2 == 0 and e["key"] not in killed["keys"]]
    assert dead and all(e["closed"] for e in dead)  # the dead worker's episodes: all closed, none continued
    assert sum(len(e["rows"]) for e in successor) >= 100  # the successor collected
    versions = torch.cat([e["rows"]["policy_version"].reshape(-1) for e in successor])
    assert versions.max() > 10  # with the learner's weights: they reach the successor


def _csv(path):
    import csv

    return list(csv.reader(open(path)))


def test_several_updates_per_command_keep_the_ratio_of_updates_to_agent_steps(cluster, tmp_path):
    config = _config(total_steps=600, prefill=200, train_every=20)
    trainer = make_dreamerv2_ray_trainer(config, tmp_path / "run", collectors=1, learners=1, progress=False,
                                         updates_per_command=4)
    result = trainer.train()
    one_per_train_every = (result["steps"] - config.prefill) / config.train_every  # the local path's count
    assert abs(result["updates"] - one_per_train_every) <= 4, result
    assert result["updates"] % 4 == 0  # 4 updates per learner command


def test_the_cli_trains_on_ray_and_a_resume_with_other_learners_is_one_line(tmp_path):
    import subprocess

    cli = Path(__file__).resolve().parents[1] / "examples" / "dreamerv2_atari.py"
    command = [sys.executable, str(cli), "--preset", "debug", "--env", "gym:CartPole-v1", "--prefill", "200",
               "--batch-size", "4", "--batch-length", "8", "--train-every", "40", "--collectors", "2",
               "--logdir", str(tmp_path / "run"), "--no-progress", "--eval-every", "1000000000"]
    first = subprocess.run([*command, "--total-steps", "320", "--learners", "2"], capture_output=True, text=True,
                           timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    refused = subprocess.run([*command, "--total-steps", "480", "--learners", "1"], capture_output=True, text=True,
                             timeout=600)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith("error: ") and "--learners 2" in refused.stderr
    other = subprocess.run([*command, "--total-steps", "480", "--learners", "2", "--batch-length", "10"],
                           capture_output=True, text=True, timeout=600)  # not a schedule: refused as locally
    assert other.returncode == 2
    line = other.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "batch_length: 8 (saved) vs 10" in line, line
    resumed = subprocess.run([*command, "--total-steps", "480", "--learners", "2"], capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming" in resumed.stdout
    assert json_steps(resumed.stdout) >= 480 > json_steps(first.stdout)


def json_steps(stdout: str) -> int:
    import json

    return json.loads([line for line in stdout.splitlines() if line.startswith('{"steps"')][-1])["steps"]


def test_the_sweep_runs_games_x_seeds_as_ray_tasks_resumes_unfinished_ones_and_builds_the_table(tmp_path):
    import json
    import subprocess

    sweep = Path(__file__).resolve().parents[1] / "scripts" / "sweep.py"
    command = [sys.executable, str(sweep), "--preset", "debug", "--tasks", "gym:CartPole-v1=100", "gym:Pendulum-v1=-200",
               "--seeds", "1", "--random-episodes", "2", "--eval-episodes", "1", "--out", str(tmp_path)]
    first = subprocess.run([*command, "--steps", "200"], capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    runs = [tmp_path / task / "seed0" for task in ("gym-CartPole-v1", "gym-Pendulum-v1")]
    assert all((run / "checkpoint.tdz").exists() and (run / "wall_minutes.txt").exists() for run in runs)
    rows = [line for line in (tmp_path / "learning.md").read_text().splitlines() if line.startswith("| gym:")]
    assert [row.split(" | ")[:2] for row in rows] == [["| gym:CartPole-v1", "200"], ["| gym:Pendulum-v1", "200"]]
    # a later budget: the same sweep resumes every run from its checkpoint
    again = subprocess.run([*command, "--steps", "300"], capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert all("Resuming" in (run / "stdout.log").read_text() for run in runs)
    summary = json.loads(again.stdout.strip().splitlines()[-1])
    assert [task["budget"] for task in summary["tasks"]] == [300, 300]


def _kill_one(pattern: str) -> int:
    """SIGKILLs one process whose command line matches ``pattern`` (a Ray actor: ``ray::<Class>``); its pid."""
    import os
    import signal
    import subprocess

    pids = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    assert pids, f"no process matches {pattern}"
    os.kill(int(pids[-1]), signal.SIGKILL)
    return int(pids[-1])


@pytest.mark.parametrize("victim, named", [
    ("ray::_RayLearnerWorker", "a learner rank"),
    ("ray::DreamerReplayBuffer", "the replay service"),
], ids=["learner", "replay"])  # a killed collector worker is restarted: the test above
def test_a_killed_actor_stops_the_job_with_one_line_and_the_same_command_resumes_from_the_checkpoint(
        tmp_path, victim, named):
    import csv
    import subprocess
    import time

    cli = Path(__file__).resolve().parents[1] / "examples" / "dreamerv2_atari.py"
    logdir = tmp_path / "run"
    command = [sys.executable, str(cli), "--preset", "debug", "--env", "gym:CartPole-v1", "--prefill", "100",
               "--batch-size", "4", "--batch-length", "8", "--train-every", "20", "--collectors", "2",
               "--learners", "2" if named == "a learner rank" else "1", "--logdir", str(logdir), "--no-progress",
               "--eval-every", "1000000000",
               "--checkpoint-every", "100", "--log-every", "20", "--total-steps", "100000"]
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    manifest = logdir / "checkpoint_ray" / "manifest.json"
    deadline = time.monotonic() + 300
    while not manifest.exists() and time.monotonic() < deadline and job.poll() is None:
        time.sleep(0.5)
    assert manifest.exists(), job.communicate()[1][-3000:] if job.poll() is not None else "no checkpoint in 300 s"
    time.sleep(1.0)
    _kill_one(victim)
    _, err = job.communicate(timeout=300)
    assert job.returncode == 2, err[-3000:]
    line = [line for line in err.strip().splitlines() if line.startswith("error: ")][-1]
    assert line.startswith(f"error: {named} died") and "run the same command to resume" in line, line
    if named == "the replay service":  # killed mid-run: it reloads its last consistent state, the checkpoint's
        [saved] = (logdir / "checkpoint_ray" / "components").glob("*-replay_buffer/replay_state.pt")
        checkpointed = int(torch.load(saved, weights_only=False)["writer"]["end"])
        written = int.from_bytes((logdir / "replay" / "write_mark.bin").read_bytes()[:8], "little")
        started = not ray.is_initialized()
        init_ray(num_cpus=5)
        reloaded = make_dreamerv2_ray_trainer(_config(env="gym:CartPole-v1"), logdir, collectors=2, learners=1,
                                              progress=False, keep_saved_config=True)
        rows = len(reloaded.replay.client())
        reloaded.collector.shutdown()
        reloaded.replay.shutdown()
        if started:
            ray.shutdown()
        assert rows == checkpointed <= written  # rows written after the checkpoint (if any yet) are not counted
    # the same command, with a budget it can reach: it resumes from the last checkpoint and finishes
    resumed = subprocess.run([*command[:-1], "400"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    start = int(resumed.stdout.split("Resuming")[1].split(" at ")[1].split(" / ")[0])
    assert start >= 100  # not from 0: from the checkpoint
    assert json_steps(resumed.stdout) >= 400
    steps = [int(row[0]) for row in csv.reader(open(logdir / "scalars" / "model_loss.csv"))]
    assert steps == sorted(set(steps))  # no step logged twice, none backwards
