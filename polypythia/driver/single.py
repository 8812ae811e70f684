"""A job launched without ``-m``: Hydra's task function (``launch.py``) runs it in the launching process,
which is its driver; without a sweep's live table, its progress is printed as a line now and then.
(A sweep's jobs run :func:`polypythia.job.worker.run_job` in Ray workers instead.)
"""

from __future__ import annotations

import time
from typing import Callable

from polypythia.driver.progress import ProgressBoard, line
from polypythia.errors import PolypythiaError
from polypythia.job import run as job
from polypythia.runtime.env import quiet_libraries


def _print_progress(run_name: str, every_s: float = 10.0) -> Callable[[dict], None]:
    """Without a sweep there is no live table: the same board, printed as a line every ``every_s``."""
    board = ProgressBoard([run_name])
    last_print = [0.0]

    def report(update: dict) -> None:
        board.update(0, update)
        row = board.rows[0]
        if time.monotonic() - last_print[0] >= every_s or row["step"] == row["total"]:
            last_print[0] = time.monotonic()
            print(line(row), flush=True)

    return report


def run_from_hydra(cfg) -> dict:
    """Hydra's task function for a job without ``-m``: validate this job's config and run it here.

    (A sweep does not call it: each of its jobs runs :func:`polypythia.job.worker.run_job` in a Ray worker.)
    """
    from hydra.core.hydra_config import HydraConfig

    from polypythia.config.jobconfig import job_config
    from polypythia.errors import exit_with

    hydra_cfg = HydraConfig.get()
    try:
        job_cfg = job_config(cfg, hydra_cfg.runtime.cwd)
        quiet_libraries()
        return job.run(
            job_cfg,
            tracking_uri=None,
            parent_run_id=None,
            overrides=list(hydra_cfg.overrides.task),
            progress=_print_progress(job_cfg.run_name),
        )
    except PolypythiaError as exc:
        exit_with(exc)
    finally:
        job.teardown()
