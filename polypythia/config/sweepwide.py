"""Which ``launcher.*`` and ``tracking.*`` settings belong to a whole sweep, and the check that the
jobs of one sweep agree on them.

A sweep has one driver, one Ray runtime, one live table and one MLflow server, so the keys that
choose those (:data:`SWEEP_WIDE`) must be the same for every job of a sweep: ``python launch.py -m
seed=1,2 launcher.address=a,b`` is refused in one line naming the key, before anything starts,
instead of job 0's value silently applying to all. The other keys of these two sections work per
job (:data:`PER_JOB`): each job's Ray task gets its own CPUs, GPUs, workers, retries and stall
timeout, and each job's metrics logger its own flush interval, outage limit and system metrics.
"""

from __future__ import annotations

from typing import Any

from polypythia.errors import ConfigError

SWEEP_WIDE = (
    "launcher.address",
    "launcher.progress",
    "tracking.uri",
    "tracking.dir",
    "tracking.host",
    "tracking.port",
    "tracking.backend_store_uri",
    "tracking.artifacts_destination",
)
PER_JOB = (
    "launcher.num_cpus_per_job",
    "launcher.num_gpus_per_job",
    "launcher.workers_per_run",
    "launcher.max_retries",
    "launcher.stall_timeout_s",
    "launcher.allow_slow",
    "tracking.flush_interval_s",
    "tracking.max_outage_s",
    "tracking.system_metrics",
)


def _value(job: Any, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(job, section), name, None)


def check_sweep_wide(jobs: list[Any]) -> None:
    """A :class:`ConfigError` naming the first sweep-wide key whose value differs between ``jobs``
    (JobConfigs), with the first two values and the jobs that have them."""
    for key in SWEEP_WIDE:
        first = _value(jobs[0], key)
        for index, job in enumerate(jobs[1:], start=1):
            value = _value(job, key)
            if value != first:
                raise ConfigError(
                    f"{key} differs between the jobs of this sweep (job #0: {first!r}, job #{index}: {value!r}), "
                    "but one sweep has one driver, Ray runtime and tracking server; give it one value for every "
                    "job, or launch the jobs that need another value as a sweep of their own."
                )
