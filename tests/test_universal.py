"""Which resumes go through DeepSpeed's universal checkpoint layout (the resumes themselves:
tests/test_data_parallel.py and tests/test_failures.py)."""

import pytest

from helpers import tiny_job
from polypythia.train.loop import deepspeed_config, effective_zero_stage
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


def test_one_fp32_worker_runs_zero0_and_mixed_precision_keeps_the_stage(tmp_path):
    cfg = tiny_job(tmp_path, tmp_path, train__precision="fp32")
    assert (effective_zero_stage(cfg, 1), effective_zero_stage(cfg, 2)) == (0, 1)
    bf16 = tiny_job(tmp_path, tmp_path, train__precision="bf16")
    assert (effective_zero_stage(bf16, 1), effective_zero_stage(bf16, 2)) == (1, 1)
    assert "checkpoint" not in deepspeed_config(cfg, 2)
    assert deepspeed_config(cfg, 2, load_universal=True)["checkpoint"] == {"load_universal": True}
