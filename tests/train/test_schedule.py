"""The Pythia learning-rate and checkpoint schedules."""

import math

import pytest

from polypythia.train.schedule import checkpoint_steps, lr_at, warmup_steps


def test_pythia_checkpoint_schedule_has_154_checkpoints():
    steps = checkpoint_steps(143_000, 1000)
    assert len(steps) == 154
    assert steps[:11] == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    assert steps[11:13] == [1000, 2000] and steps[-1] == 143_000


def test_short_runs_cut_the_log_spaced_part():
    assert checkpoint_steps(6, 3) == [0, 1, 2, 3, 4, 6]
    assert checkpoint_steps(10, 100, log_spaced=False) == [0, 10]


def test_lr_warmup_then_cosine_to_a_tenth():
    total, peak = 143_000, 6e-4
    assert warmup_steps(total, 0.01) == 1430
    assert lr_at(0, total, peak, 0.01, 0.1) == pytest.approx(peak / 1430)
    assert lr_at(1429, total, peak, 0.01, 0.1) == pytest.approx(peak)
    assert lr_at(total - 1, total, peak, 0.01, 0.1) == pytest.approx(0.1 * peak)
    mid = 1430 + (total - 1 - 1430) // 2
    assert lr_at(mid, total, peak, 0.01, 0.1) == pytest.approx(0.55 * peak, rel=1e-3)
    values = [lr_at(s, total, peak, 0.01, 0.1) for s in range(1430, total, 997)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert all(math.isfinite(v) for v in values)
