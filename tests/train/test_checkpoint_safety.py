"""What a job start and a resume do not do: compile DeepSpeed ops (or wait on a build lock left by a
killed build), and run code from the files of a run folder."""

import logging
import os
import random
import time

import numpy as np
import pytest
import torch
from helpers import tiny_job
from helpers import train_here as run

from polypythia.errors import CheckpointError
from polypythia.train import checkpoint as ckpt
from polypythia.train import trainerstate as trainer_state
from polypythia.train.distributed import SHM_COMM_OP, BuildLockError, check_build_locks


class RunsCode:
    """Unpickling this creates ``marker``: what a crafted checkpoint file would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def stale_lock(root, op=SHM_COMM_OP, age_s=3600):
    lock = root / op / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()
    os.utime(lock, (time.time() - age_s, time.time() - age_s))
    return lock


def test_a_stale_build_lock_is_reported_and_a_live_one_is_not(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    check_build_locks([SHM_COMM_OP])  # no lock at all
    lock = stale_lock(tmp_path, age_s=10)
    check_build_locks([SHM_COMM_OP])  # a build that started seconds ago
    os.utime(lock, (time.time() - 3600, time.time() - 3600))
    fd = os.open(lock, os.O_RDONLY)  # an old build still running here keeps its lock open
    try:
        check_build_locks([SHM_COMM_OP])
    finally:
        os.close(fd)
    with pytest.raises(BuildLockError, match=f"{lock} is a build lock left 60 minutes ago .* delete it"):
        check_build_locks([SHM_COMM_OP])


def test_trainer_state_is_json_and_safetensors_and_restores_every_rng(tmp_path):
    state = {
        "step": 5,
        "weight_seed": 1,
        "data_seed": 2,
        "world_size": 1,
        "zero_stage": 0,
        "precision": "fp32",
        "loss": float("nan"),
    }
    random.gauss(0, 1)  # a cached Gaussian in Python's RNG state
    ckpt.save_trainer_state(tmp_path, state)
    expected = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist())
    loaded = trainer_state.load_trainer_state(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trainer_state.json", "trainer_state.safetensors"]
    assert loaded["step"] == 5 and loaded["zero_stage"] == 0 and np.isnan(loaded["loss"])
    trainer_state.set_rng_state(loaded["rng"])
    assert (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()) == expected


def test_a_legacy_pickled_trainer_state_is_read_as_data_only(tmp_path):
    torch.save(
        {"step": 3, "world_size": 1, "loss": 2.5, "rng": trainer_state.rng_state()}, tmp_path / "trainer_state.pt"
    )
    assert ckpt.is_resumable(tmp_path) is False  # no state/ yet
    (tmp_path / "state").mkdir()
    assert ckpt.is_resumable(tmp_path)
    legacy = trainer_state.load_trainer_state(tmp_path)
    assert legacy["step"] == 3
    trainer_state.set_rng_state(legacy["rng"])

    marker = tmp_path / "ran"
    torch.save({"step": 3, "rng": RunsCode(marker)}, tmp_path / "trainer_state.pt")
    with pytest.raises(CheckpointError, match="trainer_state.pt, a pickle .* is not loaded"):
        trainer_state.load_trainer_state(tmp_path)
    assert not marker.exists()


@pytest.mark.timeout(300)  # before the fix, a job waited for the stale lock forever
def test_a_job_compiles_nothing_and_resume_runs_no_code_from_the_run_folder(tmp_path, cache_dir, monkeypatch, caplog):
    """One tiny job started with a stale DeepSpeed build lock in its extensions folder, then crafted
    pickles in its checkpoints: as a DeepSpeed state file (its hash no longer matches: skipped), as an
    unlisted extra state file (refused), and as the trainer state with a rewritten manifest (refused)."""
    import deepspeed.comm.comm

    extensions = tmp_path / "torch_extensions"
    lock = stale_lock(extensions)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions))
    monkeypatch.setattr(deepspeed.comm.comm, "cdb", None)  # DeepSpeed's backend starts afresh, as in a new process
    cfg = tiny_job(
        tmp_path, cache_dir, budget__steps=2, budget__checkpoint_every_steps=2
    )  # steps 1 and 2 keep a resume state
    started = time.monotonic()
    result = run(cfg)
    assert result.losses and time.monotonic() - started < 240
    assert [p for p in extensions.rglob("*") if p.is_file()] == [lock]  # nothing was built

    from polypythia.train.resume import plan_resume

    marker = tmp_path / "ran"
    step1, step2 = ckpt.step_dir(cfg.run_dir, 1), ckpt.step_dir(cfg.run_dir, 2)
    torch.save({"module": RunsCode(marker)}, step2 / "state" / "state" / "mp_rank_00_model_states.pt")
    with caplog.at_level(logging.WARNING):
        plan = plan_resume(cfg, 1)
    assert plan.checkpoint.step == 1 and "mp_rank_00_model_states.pt is missing or does not match" in caplog.text

    extra = step1 / "state" / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": RunsCode(marker)}, extra)
    with pytest.raises(
        CheckpointError, match="zero_pp_rank_0_mp_rank_00_optim_states.pt, which its manifest does not list"
    ):
        ckpt.verify(step1)
    extra.unlink()

    for name in ("trainer_state.json", "trainer_state.safetensors"):
        (step1 / name).unlink()
    torch.save({"step": 1, "rng": RunsCode(marker)}, step1 / "trainer_state.pt")
    ckpt.write_manifest(step1)  # as someone who can write the run folder would
    with pytest.raises(CheckpointError, match="is not loaded"):
        plan_resume(cfg, 1)
    assert not marker.exists()
