"""Broken replay files are never trained on (torchrl_dreamer.data).

Each test damages a run's ``replay/`` directory the way a user (or a full disk, or a cleanup script) does after a
checkpoint, then resumes as a trainer does: a new buffer on the same directory, ``loads`` (in-place checkpoint) or
``load_state_dict`` (the state held in a trainer checkpoint). The resume must stop with one line that names the
file, before any file changes. Refilling the replay (``fresh=True`` / ``reset_storage()``) keeps nothing stale.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from tensordict import MemoryMappedTensor

from test_replay import FakeEnvs, _same, check_windows, decode
from torchrl_dreamer.data import DreamerReplayBuffer, ReplayIntegrityError, make_replay_buffer

CAPACITY = 60


def make(scratch: Path, **kwargs) -> DreamerReplayBuffer:
    kwargs.setdefault("capacity", CAPACITY)
    kwargs.setdefault("seq_len", 5)
    kwargs.setdefault("batch_size", 4)
    kwargs.setdefault("seed", 0)
    return make_replay_buffer(scratch_dir=scratch, **kwargs)


def filled_run(scratch: Path, **env_kwargs) -> dict:
    """A run directory with rows and an in-place checkpoint; returns the checkpointed state (as a trainer holds it)."""
    rb = make(scratch)
    rb.extend(FakeEnvs([[13, 6]], **env_kwargs).batch(20))
    rb.dumps(scratch)
    return torch.load(scratch / "replay_state.pt", weights_only=True)


def snapshot(directory: Path) -> dict[str, tuple[int, int, str]]:
    """Size, mtime and content hash of every file under ``directory``."""
    return {
        str(path.relative_to(directory)): (path.stat().st_size, path.stat().st_mtime_ns,
                                           hashlib.sha256(path.read_bytes()).hexdigest())
        for path in sorted(directory.rglob("*")) if path.is_file()
    }


def resume(scratch: Path, state: dict, via: str) -> DreamerReplayBuffer:
    rb = make(scratch, seed=1)
    if via == "loads":
        rb.loads(scratch)
    else:
        rb.load_state_dict(state)
    return rb


def assert_refused(scratch: Path, state: dict, via: str, match: str) -> ReplayIntegrityError:
    before = snapshot(scratch)
    with pytest.raises(ReplayIntegrityError, match=match) as info:
        resume(scratch, state, via)
    message = str(info.value)
    assert "\n" not in message
    assert "--fresh-replay" in message and "fresh_replay=True" in message and "models can be kept" in message
    assert "delet" not in message.lower(), "never advise deleting the checkpoint (it drops the trained models)"
    assert isinstance(info.value, RuntimeError)
    assert snapshot(scratch) == before, "a file changed before the error"
    return info.value


def replace_storage(scratch: Path, other: Path) -> None:
    """Swaps the memmap rows for another run's (as a careless copy between run directories does)."""
    shutil.rmtree(scratch / "storage")
    shutil.copytree(other / "storage", scratch / "storage")


def _delete(scratch, tmp_path):
    (scratch / "storage" / "pixels.memmap").unlink()


def _truncate(scratch, tmp_path):  # e.g. a full disk while copying the run directory
    os.truncate(scratch / "storage" / "pixels.memmap", 128)


def _grow(scratch, tmp_path):
    with open(scratch / "storage" / "next" / "reward.memmap", "ab") as file:
        file.write(b"\0" * 64)


def _other_shape(scratch, tmp_path):
    filled_run(tmp_path / "other", pixel_shape=(1, 4, 4))
    replace_storage(scratch, tmp_path / "other")


def _other_dtype(scratch, tmp_path):
    other = make(tmp_path / "other")
    batch = FakeEnvs([[13, 6]]).batch(20)
    batch["pixels"], batch["next", "pixels"] = batch["pixels"].float(), batch["next", "pixels"].float()
    other.extend(batch)
    replace_storage(scratch, tmp_path / "other")


def _other_rows(scratch, tmp_path):  # a new run started in the same directory
    make(scratch).extend(FakeEnvs([[10]], episode_offset=7).batch(4))


def _no_storage_id(scratch, tmp_path):
    (scratch / "storage_id").unlink()


def _no_write_mark(scratch, tmp_path):
    (scratch / "write_mark.bin").unlink()


def _no_meta(scratch, tmp_path):
    (scratch / "storage" / "next" / "meta.json").unlink()


CASES = {
    "missing file": (_delete, r"pixels\.memmap: missing"),
    "truncated file": (_truncate, r"pixels\.memmap: truncated: 128 bytes, the checkpoint expects 3840"),
    "oversized file": (_grow, r"next/reward\.memmap: oversized: 304 bytes, the checkpoint expects 240"),
    "other shape": (_other_shape, r"pixels\.memmap: .*meta\.json describes uint8 \[60, 1, 4, 4\], the checkpoint "
                                  r"expects uint8 \[60, 1, 8, 8\]"),
    "other dtype": (_other_dtype, r"pixels\.memmap: .*describes float32 \[60, 1, 8, 8\], the checkpoint expects "
                                  r"uint8"),
    "other rows": (_other_rows, r"storage_id: storage id \w+ != \w+ of the checkpoint: .*other rows"),
    "missing storage id": (_no_storage_id, r"storage_id: missing"),
    "missing write mark": (_no_write_mark, r"write_mark\.bin: missing"),
    "missing meta": (_no_meta, r"next/meta\.json: missing"),
}


@pytest.mark.parametrize("via", ["loads", "load_state_dict"])
@pytest.mark.parametrize("case", list(CASES))
def test_broken_replay_is_refused_before_anything_changes(tmp_path, case, via):
    scratch = tmp_path / "run" / "replay"
    state = filled_run(scratch)
    damage, match = CASES[case]
    damage(scratch, tmp_path)
    error = assert_refused(scratch, state, via, match)
    assert error.path.is_relative_to(scratch)


def test_checkpoint_from_before_layouts_is_checked_too(tmp_path):
    scratch = tmp_path / "replay"
    state = filled_run(scratch)
    del state["storage_layout"]  # as saved before the layout was recorded
    _truncate(scratch, tmp_path)
    assert_refused(scratch, state, "load_state_dict", r"pixels\.memmap: truncated")
    _delete(scratch, tmp_path)
    assert_refused(scratch, state, "load_state_dict", r"pixels\.memmap: missing")


def test_copied_snapshot_is_checked_before_copying(tmp_path):
    scratch = tmp_path / "a"
    rb = make(scratch)
    rb.extend(FakeEnvs([[13, 6]]).batch(20))
    rb.dumps(tmp_path / "copy")
    _truncate(tmp_path / "copy", tmp_path)
    target = tmp_path / "b"
    make(target).extend(FakeEnvs([[10]]).batch(10))
    before = snapshot(target), snapshot(tmp_path / "copy")
    with pytest.raises(ReplayIntegrityError, match=r"copy/storage/pixels\.memmap: truncated"):
        make(target).loads(tmp_path / "copy")
    assert (snapshot(target), snapshot(tmp_path / "copy")) == before


def test_intact_restore_maps_every_file(tmp_path):
    scratch = tmp_path / "replay"
    state = filled_run(scratch)
    rb = resume(scratch, state, "load_state_dict")
    leaves = dict(rb.storage._storage.items(include_nested=True, leaves_only=True))
    assert len(leaves) == 7
    for key, tensor in leaves.items():
        assert isinstance(tensor, MemoryMappedTensor), key
        assert Path(tensor.filename).is_relative_to(scratch / "storage"), key
    rb.sample()


def test_files_vanishing_under_a_live_buffer_are_not_silent(tmp_path):
    scratch = tmp_path / "replay"
    rb = make(scratch)
    envs = FakeEnvs([[13, 6]])
    rb.extend(envs.batch(20))
    (scratch / "storage" / "pixels.memmap").unlink()  # the mapping survives, the file does not
    rb.extend(envs.batch(5))  # the rows now live only in this process...
    with pytest.warns(UserWarning, match=r"pixels\.memmap: removed or replaced on disk while mapped"):
        rb.dumps(scratch)  # ...which the checkpoint says,
    assert_refused(scratch, rb.state_dict(), "loads", r"pixels\.memmap: missing")  # and a resume refuses


def _expect_no_stale_files(scratch: Path) -> None:
    assert not [p.name for p in scratch.iterdir()], "stale replay files remain"


def test_fresh_replay_keeps_nothing_and_round_trips(tmp_path):
    scratch = tmp_path / "run" / "replay"
    old_state = filled_run(scratch)
    _truncate(scratch, tmp_path)
    (scratch / "storage_id.tmp").write_text("left by a crash")
    # the trainer keeps its models: it builds the replay fresh and loads its whole checkpoint as usual
    rb = make(scratch, fresh=True)
    _expect_no_stale_files(scratch)
    with pytest.warns(UserWarning, match="not restored, its rows were discarded"):
        rb.load_state_dict(old_state)
    assert len(rb) == 0 and rb.write_count == 0 and not rb.can_sample()
    _expect_no_stale_files(scratch)
    envs = FakeEnvs([[13, 6]], episode_offset=100)
    rb.extend(envs.batch(20))
    assert len(rb) == 22 and rb.write_count == 20
    assert (decode(rb.sample()["pixels"])[1] >= 100).all(), "only refilled rows are sampled"
    assert int((scratch / "write_mark.bin").stat().st_size) == 8
    rb.dumps(scratch)
    state = rb.state_dict()
    expected = [rb.sample() for _ in range(2)]
    for via in ("loads", "load_state_dict"):  # the refilled replay saves and restores as any other
        resumed = make(scratch, seed=1)
        if via == "loads":
            resumed.loads(scratch)
        else:
            resumed.load_state_dict(state)
        assert len(resumed) == 22 and resumed.write_count == 20
        for sample in expected:
            assert _same(resumed.sample(), sample)
    check_windows(resumed.sample(), envs)
    # the discarded rows' checkpoint can never be applied to the new rows
    assert_refused(scratch, old_state, "load_state_dict", r"storage_id: storage id \w+ != ")


def test_reset_storage_of_a_live_buffer(tmp_path):
    scratch = tmp_path / "replay"
    rb = make(scratch)
    envs = FakeEnvs([[13, 6]])
    rb.extend(envs.batch(20))
    old_state = rb.state_dict()
    rb.dumps(scratch)
    (scratch / "notes.txt").write_text("not the replay's")
    rb.reset_storage()
    assert [p.name for p in scratch.iterdir()] == ["notes.txt"]  # only the replay's own files go
    assert len(rb) == 0 and rb.num_episodes == 0 and not rb.storage.initialized
    refill = FakeEnvs([[13, 6]], episode_offset=50)
    rb.extend(refill.batch(20))
    assert len(rb) == 22
    _, episode, _ = check_windows(rb.sample(), refill)
    assert (episode >= 50).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the first write ended the skipping: the old state is refused
        with pytest.raises(ReplayIntegrityError, match=r"storage_id"):
            rb.load_state_dict(old_state)
    rb.dumps(scratch)
    resumed = make(scratch)
    resumed.loads(scratch)
    assert len(resumed) == 22
    check_windows(resumed.sample(), refill)
