"""Two data-parallel ranks on gloo without Ray, and checkpoints that cross between worker counts."""

import shutil

import numpy as np
import pytest
import torch.multiprocessing as mp
from helpers import tiny_job, train_here

from polypythia.net import free_port
from polypythia.train.checkpoint import verify
from polypythia.train.distributed import set_rendezvous
from polypythia.train.loop import train

pytestmark = pytest.mark.integration


def precision_of(precision: str) -> dict:
    """``bf16``: DeepSpeed's bf16 weights on any worker count; ``bf16+autocast``: the default, whose one
    worker trains fp32 weights under torch.autocast at ZeRO-0 while two take DeepSpeed's bf16 weights."""
    name, _, autocast = precision.partition("+")
    return {"train__precision": name, "train__autocast": bool(autocast)}


def _rank(rank, world_size, port, tmp_path, cache_dir, queue, zero_stage, precision):
    set_rendezvous(rank, world_size, "127.0.0.1", port)
    cfg = tiny_job(
        tmp_path,
        cache_dir,
        train__zero_stage=zero_stage,
        **precision_of(precision),
        train__threads=1,
        train__keep_resume_states=None,
        launcher__workers_per_run=world_size,
    )
    result = train(cfg)
    queue.put((rank, result.start_step, result.losses))


def train_ranks(world_size, tmp_path, cache_dir, zero_stage, precision):
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(target=_rank, args=(r, world_size, port, tmp_path, cache_dir, queue, zero_stage, precision))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    results = sorted(queue.get() for _ in range(world_size))
    return results[0][1], results[0][2]


def single(tmp_path, cache_dir, zero_stage, precision):
    r = train_here(
        tiny_job(
            tmp_path,
            cache_dir,
            train__zero_stage=zero_stage,
            **precision_of(precision),
            train__threads=1,
            train__keep_resume_states=None,
        )
    )
    return r.start_step, r.losses


def resumable_again(run_dir, step):
    """Drop the checkpoints after ``step`` so that the next start resumes from it."""
    for path in (run_dir / "checkpoints").iterdir():
        if int(path.name.removeprefix("step")) > step:
            shutil.rmtree(path)


# ZeRO-0 state is whole on every rank and loads as it is; ZeRO-1/2 state is split across the
# ranks that wrote it and goes through DeepSpeed's universal checkpoint layout. One fp32 worker
# always runs ZeRO-0, so with zero_stage=1 the two directions are 1 -> 0 and 0 -> 1; in DeepSpeed's
# bf16 both sides run ZeRO-1 (its ZeRO optimizer keeping fp32 master weights, as on a GPU).
@pytest.mark.parametrize(
    ("zero_stage", "precision"),
    [  # make test keeps the ZeRO-0 <-> ZeRO-1 crossing; the others run with the slow marker (CI runs both)
        pytest.param(0, "fp32", marks=pytest.mark.slow),
        (1, "fp32"),
        pytest.param(2, "fp32", marks=pytest.mark.slow),
        pytest.param(1, "bf16", marks=pytest.mark.slow),
    ],
)
def test_checkpoints_cross_between_one_and_two_workers(tmp_path, cache_dir, zero_stage, precision):
    _, reference = single(tmp_path / "one", cache_dir, zero_stage, precision)
    _, two = train_ranks(2, tmp_path / "two", cache_dir, zero_stage, precision)
    np.testing.assert_allclose(two, reference, rtol=1e-5, atol=1e-6)
    cross_over(tmp_path, cache_dir, zero_stage, precision, reference, rtol=1e-5)


def test_the_default_bf16_crosses_between_autocast_and_deepspeeds_weights(tmp_path, cache_dir):
    """One worker under train.autocast (fp32 weights, torch AdamW at ZeRO-0), two with DeepSpeed's bf16
    weights at ZeRO-1: each side's state converts for the other (numerics differ: a bf16 tolerance)."""
    _, reference = single(tmp_path / "one", cache_dir, 1, "bf16+autocast")
    _, two = train_ranks(2, tmp_path / "two", cache_dir, 1, "bf16+autocast")
    assert two != reference
    np.testing.assert_allclose(two, reference, rtol=1e-2)
    cross_over(tmp_path, cache_dir, 1, "bf16+autocast", reference, rtol=1e-2)


def cross_over(tmp_path, cache_dir, zero_stage, precision, reference, rtol):
    """Resume the two-worker run on one worker and the one-worker run on two, from step 4."""
    # written by 2 workers, resumed by 1
    run_dir = tmp_path / "two" / "runs" / "polypythia" / "tiny-seed1"
    resumable_again(run_dir, 4)
    start, rest = single(tmp_path / "two", cache_dir, zero_stage, precision)
    assert start == 4
    np.testing.assert_allclose(rest, reference[4:], rtol=rtol, atol=1e-6)
    # the converted copy is gone and the checkpoint it came from still verifies
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [f"step{s}" for s in (0, 1, 2, 3, 4, 6)]
    verify(run_dir / "checkpoints" / "step4")

    # written by 1 worker, resumed by 2
    run_dir = tmp_path / "one" / "runs" / "polypythia" / "tiny-seed1"
    resumable_again(run_dir, 4)
    start, rest = train_ranks(2, tmp_path / "one", cache_dir, zero_stage, precision)
    assert start == 4
    np.testing.assert_allclose(rest, reference[4:], rtol=rtol, atol=1e-6)


def _rank_failing_conversion(rank, world_size, port, tmp_path, cache_dir, queue):
    """Rank 0's conversion fails (as on a full disk): every rank must raise, none may wait."""
    from polypythia.train import universal

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    universal.to_universal = full_disk
    set_rendezvous(rank, world_size, "127.0.0.1", port)
    try:
        train(tiny_job(tmp_path, cache_dir, budget__steps=2, train__threads=1, launcher__workers_per_run=world_size))
        queue.put((rank, "no error"))
    except Exception as exc:  # noqa: BLE001 - the child reports any failure to the parent through the queue
        queue.put((rank, f"{type(exc).__name__}: {exc}"))


def test_a_failed_conversion_stops_every_rank(tmp_path, cache_dir):
    single(tmp_path, cache_dir, 1, "fp32")  # 6 steps on one worker
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(target=_rank_failing_conversion, args=(r, 2, port, tmp_path, cache_dir, queue)) for r in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung and all(p.exitcode == 0 for p in procs), "a rank hung or died instead of raising"
    errors = sorted(queue.get() for _ in range(2))
    for rank, error in errors:
        assert error.startswith("CheckpointError: Converting checkpoint") and "No space left" in error, (rank, error)
