"""The learner's adaptive CPU thread count (AdaptiveThreads): its choices under a changing load, and in a trainer."""
import math

import pytest
import torch

from torchrl_dreamer.config import DreamerV2Config
from torchrl_dreamer.trainers import AdaptiveThreads, available_cores, make_dreamerv2_trainer
from torchrl_dreamer.trainers import threads as threads_module


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


class _Machine:
    """A fake clock: an update takes ``seconds[load][count]`` with ``count`` the torch thread count set for it."""

    seconds = {"idle": {2: 4.0, 3: 5.0}, "busy": {2: 7.5, 3: 6.7}}

    def __init__(self, monkeypatch):
        self.now, self.load = 0.0, "idle"
        monkeypatch.setattr(threads_module.time, "perf_counter", lambda: self.now)

    def run(self, policy: AdaptiveThreads, updates: int) -> list[int]:
        used = []
        for _ in range(updates):
            with policy:
                used.append(torch.get_num_threads())
                self.now += self.seconds[self.load][used[-1]]
        return used


def test_keeps_the_faster_count_and_follows_the_load(monkeypatch, restore_threads):
    machine = _Machine(monkeypatch)
    torch.set_num_threads(1)  # torch's count before the policy's first update
    policy = AdaptiveThreads((2, 3), warmup=2, history=3, min_interval=4, max_interval=32)
    # idle: 2 threads stay; each losing probe doubles the interval, so probes get rarer
    used = machine.run(policy, 200)
    assert policy.current == 2 and policy.switches == 0
    assert used[6:8] == [3, 3]  # 2 untimed updates, 4 timed (min_interval), then the first probe: 2 updates
    assert policy.interval == 32 and used.count(3) == 2 * policy.probes and 4 <= policy.probes <= 9
    # a core gets busy: the times drift, a probe comes soon and 3 threads take over
    machine.load = "busy"
    used = machine.run(policy, 12)
    assert policy.current == 3 and policy.switches == 1 and used.index(3) <= 7 and used.count(3) >= 6
    # it stays there (probes of 2 lose), then the core is free again and 2 threads come back
    machine.run(policy, 100)
    assert policy.current == 3 and policy.switches == 1
    machine.load = "idle"
    used = machine.run(policy, 20)
    assert policy.current == 2 and policy.switches == 2 and used[-1] == 2
    # the count from before the first update is put back
    assert torch.get_num_threads() == 2
    policy.restore()
    assert torch.get_num_threads() == 1


def test_a_much_slower_probe_stops_the_probes_until_the_load_changes(monkeypatch, restore_threads):
    machine = _Machine(monkeypatch)
    machine.seconds = {"idle": {2: 4.0, 3: 40.0}, "busy": {2: 8.0, 3: 6.0}}  # e.g. oversubscribed spin barriers
    policy = AdaptiveThreads((2, 3), warmup=0, history=2, min_interval=2, max_interval=50)
    used = machine.run(policy, 200)
    assert used.count(3) == 1 and policy.interval == math.inf  # one update of the probe, then no more
    machine.load = "busy"
    used = machine.run(policy, 10)
    assert policy.current == 3 and used[-1] == 3


def test_a_failed_update_is_not_timed(monkeypatch, restore_threads):
    machine = _Machine(monkeypatch)
    policy = AdaptiveThreads((2, 3), warmup=0, history=1, min_interval=1)
    with pytest.raises(RuntimeError):
        with policy:
            machine.now += 100.0
            raise RuntimeError("update failed")
    machine.run(policy, 4)
    assert policy.current == 2 and policy.switches == 0


def test_a_coarse_clock_and_an_interrupted_probe(monkeypatch, restore_threads):
    """A clock that does not move (no division by zero); a probe interrupted by a failed update carries on."""
    machine = _Machine(monkeypatch)
    machine.seconds = {"idle": {2: 0.0, 3: 0.0}}
    still = AdaptiveThreads((2, 3), warmup=0, history=1, min_interval=1)
    machine.run(still, 10)
    assert still.current == 2 and still.probes >= 2
    machine.seconds = {"idle": {2: 4.0, 3: 5.0}}
    policy = AdaptiveThreads((2, 3), warmup=0, history=1, min_interval=1)
    assert machine.run(policy, 2) == [2, 3]  # one timed update, then the probe's first update
    with pytest.raises(RuntimeError):
        with policy:
            raise RuntimeError("update failed")
    assert machine.run(policy, 1) == [3] and policy.probes == 1  # the probe's second update ends it
    # between updates the process is back at the current count
    assert policy.current == 2 and torch.get_num_threads() == 2


def test_bad_settings_are_refused():
    for counts in [(2, 2), (0, 1), (2,), (2, 3, 4), (2.0, 3), (True, 2)]:
        with pytest.raises(ValueError, match="two different thread counts"):
            AdaptiveThreads(counts)
    with pytest.raises(ValueError, match="min_interval"):
        AdaptiveThreads((1, 2), min_interval=10, max_interval=5)
    with pytest.raises(ValueError, match="probe_updates"):
        AdaptiveThreads((1, 2), probe_updates=0)
    with pytest.raises(ValueError, match="must be ints"):
        AdaptiveThreads((1, 2), history="3")
    with pytest.raises(ValueError, match="drift"):
        AdaptiveThreads((1, 2), drift=float("nan"))
    with pytest.raises(ValueError, match="margin"):
        AdaptiveThreads((1, 2), margin=1.5)
    default = AdaptiveThreads()
    base = min(torch.get_num_threads(), available_cores())
    assert default.counts == (base, base + 1) and default.current == base


def test_trainer_sets_the_count_for_each_update(tmp_path, restore_threads):
    """Through the trainer's hooks: each update runs with the policy's count, and torch's count comes back."""
    torch.set_num_threads(1)
    cfg = DreamerV2Config.preset("debug", env="catch", total_steps=140, prefill=100, eval_every=10**9,
                                 video_every=10**9)
    trainer = make_dreamerv2_trainer(cfg, tmp_path / "auto", device="cpu", progress=False, threads="auto")
    assert isinstance(trainer.threads, AdaptiveThreads) and trainer.threads.counts == (1, 2)
    # probe at every chance, to see both counts used
    trainer.threads.warmup, trainer.threads.min_interval, trainer.threads.interval = 0, 1, 1
    trainer.threads.margin, trainer.threads.probe_updates = 0.99, 1  # never switch: the probes run with 2
    during, step = [], trainer.optimization_stepper.step

    def recording_step(*args):  # the count each update runs with
        during.append(torch.get_num_threads())
        return step(*args)

    trainer.optimization_stepper.step = recording_step
    result = trainer.train()
    assert result["updates"] == len(during) > 4
    assert set(during) == {1, 2} and trainer.threads.probes == during.count(2)
    assert torch.get_num_threads() == 1
    # by default: no policy, torch's count as it is; an explicit count: no policy, that count
    default = make_dreamerv2_trainer(cfg, tmp_path / "default", device="cpu", progress=False)
    assert default.threads is None and torch.get_num_threads() == 1
    default.shutdown()
    fixed = make_dreamerv2_trainer(cfg, tmp_path / "fixed", device="cpu", progress=False, threads=2)
    assert fixed.threads is None and torch.get_num_threads() == 2
    fixed.shutdown()
    # a build that fails puts the count back; auto cannot steer compiled CPU kernels
    torch.set_num_threads(1)

    def broken_env():
        raise RuntimeError("no env here")

    with pytest.raises(RuntimeError, match="no env here"):
        make_dreamerv2_trainer(cfg, tmp_path / "broken", env=broken_env, device="cpu", progress=False, threads=2)
    assert torch.get_num_threads() == 1
    with pytest.raises(ValueError, match="compiled CPU kernels"):
        make_dreamerv2_trainer(cfg.replace(compile=True), tmp_path / "compiled", device="cpu", threads="auto")
