"""Which resumes go through DeepSpeed's universal checkpoint layout, and the edge cases of those
resumes (across worker counts: tests/train/test_data_parallel.py and tests/job/test_failures.py)."""

import math

import pytest
from helpers import tiny_job
from helpers import train_here as run

from polypythia.train.engine import deepspeed_config, effective_zero_stage
from polypythia.train.universal import needs_conversion


@pytest.mark.parametrize(
    ("saved", "now", "expected"),
    [
        ((1, 0), (1, 0), False),  # same layout
        ((2, 1), (2, 1), False),
        ((1, 0), (2, 0), False),  # ZeRO-0 state is whole on every rank
        ((2, 1), (1, 0), True),  # partitioned on one side
        ((1, 0), (2, 1), True),
        ((2, 2), (4, 2), True),
        ((1, 1), (1, 0), True),  # same workers, stage changed
    ],
)
def test_needs_conversion(saved, now, expected):
    assert needs_conversion(*saved, *now) is expected


def test_one_worker_of_fp32_weights_runs_zero0_and_deepspeeds_mixed_precision_keeps_the_stage(tmp_path):
    cfg = tiny_job(tmp_path, tmp_path, train__precision="fp32")
    assert (effective_zero_stage(cfg, 1), effective_zero_stage(cfg, 2)) == (0, 1)
    bf16 = tiny_job(tmp_path, tmp_path, train__precision="bf16")  # train.autocast: fp32 weights on one worker
    assert (effective_zero_stage(bf16, 1), effective_zero_stage(bf16, 2)) == (0, 1)
    deepspeeds = tiny_job(tmp_path, tmp_path, train__precision="bf16", train__autocast=False)
    assert (effective_zero_stage(deepspeeds, 1), effective_zero_stage(deepspeeds, 2)) == (1, 1)
    assert "checkpoint" not in deepspeed_config(cfg, 2)
    assert deepspeed_config(cfg, 2, load_universal=True)["checkpoint"] == {"load_universal": True}


def test_a_step0_checkpoint_needs_no_conversion_and_stale_conversions_are_removed(tmp_path, cache_dir):
    """Written by one fp32 worker (ZeRO-0), resumed in bf16 (ZeRO-1): from step 0 the run starts
    afresh (its seed rebuilds the same initial weights, in full precision); leftovers of a
    conversion that died half-way are removed."""
    import shutil

    first = run(tiny_job(tmp_path, cache_dir, budget__steps=2))
    checkpoints = tmp_path / "runs" / "polypythia" / "tiny-seed1" / "checkpoints"
    for path in checkpoints.iterdir():
        if path.name != "step0":
            shutil.rmtree(path)
    (checkpoints / "step7.universal" / "state").mkdir(parents=True)
    resumed = run(tiny_job(tmp_path, cache_dir, budget__steps=2, train__precision="bf16"))
    fresh = run(tiny_job(tmp_path / "fresh", cache_dir, budget__steps=2, train__precision="bf16"))
    assert resumed.start_step == 0 and resumed.losses == fresh.losses != first.losses
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step0", "step1", "step2"]


@pytest.mark.parametrize("autocast", [True, False])
def test_precision_can_change_at_a_checkpoint(tmp_path, cache_dir, autocast):
    """fp32 at ZeRO-0 up to step 2, bf16 after it: under train.autocast at ZeRO-0 (the same state), with
    DeepSpeed's bf16 weights at ZeRO-1 (through the universal layout)."""
    run(tiny_job(tmp_path, cache_dir, budget__steps=2))
    resumed = run(
        tiny_job(
            tmp_path,
            cache_dir,
            budget__steps=4,
            budget__checkpoint_every_steps=2,
            train__precision="bf16",
            train__autocast=autocast,
        )
    )
    assert resumed.start_step == 2 and len(resumed.losses) == 2
    assert all(math.isfinite(v) for v in resumed.losses)


def test_mixed_precision_zero0_state_is_refused_before_training(tmp_path, cache_dir):
    from polypythia.errors import CheckpointError

    deepspeeds = {"train__precision": "bf16", "train__autocast": False}
    run(tiny_job(tmp_path, cache_dir, budget__steps=2, train__zero_stage=0, **deepspeeds))
    with pytest.raises(CheckpointError, match="cannot resume at ZeRO stage 1 .*written with"):
        run(tiny_job(tmp_path, cache_dir, budget__steps=4, **deepspeeds))
    # nor does it load as train.autocast's fp32 weights at ZeRO-0
    with pytest.raises(CheckpointError, match="cannot resume at ZeRO stage 0 .*train.autocast"):
        run(tiny_job(tmp_path, cache_dir, budget__steps=4, train__precision="bf16", train__zero_stage=0))
