"""A Hydra launcher that hands every job of a sweep to :class:`polypythia.driver.sweep.Sweep`, which runs
each as a Ray task in a fresh worker process.

Why our own and not hydra-ray-launcher: that plugin pins cloudpickle<3 (which conflicts with
hmmlearn's scikit-learn), swallows job exceptions so Ray never retries, and forces a 75 MB object
store that breaks attaching to a running cluster.

This module is only glue between Hydra and the sweep. :meth:`PolypythiaRayLauncher.launch` takes
the configs Hydra composed for the jobs, resolves them here, in the launching process (a worker on
another node has another environment), and hands them to the sweep as plain
:class:`~polypythia.jobspec.JobRequest` values, together with the hook that prints the cross-seed
summary at the end (from ``analysis``, which ``polypythia`` does not import). It writes each job's
Hydra folder (``.hydra/`` with the composed config and overrides; the job's log file lands there
too), runs the sweep, and turns the jobs' outcomes into Hydra's ``JobReturn`` values.

Hydra's task function (``launch.py``) is not called in a sweep: each job's worker runs
:func:`polypythia.job.worker.run_job`, which calls :func:`polypythia.job.run.run` as the task function does
for a job launched without ``-m``.
"""

import copy
import os
import signal
import threading
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus, configure_log, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from polypythia.jobspec import JobOutcome, JobRequest


@dataclass
class PolypythiaRayLauncherConf:
    _target_: str = "hydra_plugins.polypythia_launcher.launcher.PolypythiaRayLauncher"


ConfigStore.instance().store(
    group="hydra/launcher", name="polypythia_ray", node=PolypythiaRayLauncherConf, provider="polypythia"
)


class PolypythiaRayLauncher(Launcher):
    def __init__(self) -> None:
        self.config: Optional[DictConfig] = None
        self.task_function: Optional[TaskFunction] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from polypythia.driver.sweep import Sweep
        from polypythia.errors import PolypythiaError, exit_with

        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        job_configs = [
            self._job_config(list(overrides), initial_job_idx + i) for i, overrides in enumerate(job_overrides)
        ]
        previous = signal.getsignal(signal.SIGTERM)
        try:
            try:
                sweep = Sweep(
                    [_job_request(c) for c in job_configs],
                    launch_dir=os.getcwd(),  # validates every job
                    on_finished=print_cross_seed_summary,
                )
                for job_cfg in job_configs:
                    _save_hydra_folder(job_cfg)
                sweep.prepare()
            except PolypythiaError as exc:  # a user's mistake: one line, no traceback, no job started
                exit_with(exc)
            stop = threading.Event()
            signal.signal(signal.SIGINT, partial(_raise_interrupt, stop))
            signal.signal(signal.SIGTERM, partial(_raise_interrupt, stop))  # as Ctrl-C (after ray.init's handler)
            outcomes = sweep.run(stop)
        except KeyboardInterrupt:  # the sweep stopped its jobs and marked their MLflow runs KILLED
            print(
                "\npolypythia: interrupted; the jobs were stopped and their MLflow runs marked KILLED "
                "(failure_reason=interrupted).",
                flush=True,
            )
            raise SystemExit(130) from None
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
            signal.signal(signal.SIGINT, signal.default_int_handler)
        returns = [_job_return(c, outcome) for c, outcome in zip(job_configs, outcomes)]
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        failed = sum(r.status == JobStatus.FAILED for r in returns)
        if failed:  # already reported per job above; Hydra would add a traceback of the first only
            print(
                f"polypythia: {failed} of {len(returns)} jobs did not finish (see the sweep outcome above).", flush=True
            )
            raise SystemExit(1)
        return returns

    def _job_config(self, overrides: list[str], idx: int) -> DictConfig:
        """Job ``idx``'s config as Hydra composes it, with its ``hydra`` node, interpolations resolved
        here in the launching process's environment (``${oc.env:POLYPYTHIA_HOME}`` and the like)."""
        job_cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(job_cfg):
            job_cfg.hydra.job.id = f"job{idx}"
            job_cfg.hydra.job.num = idx
            output_dir = os.path.join(str(job_cfg.hydra.sweep.dir), str(job_cfg.hydra.sweep.subdir))
            job_cfg.hydra.runtime.output_dir = os.path.abspath(output_dir)
            for key, value in OmegaConf.to_container(_job_body(job_cfg), resolve=True).items():
                job_cfg[key] = value
        return job_cfg


def _raise_interrupt(stop: threading.Event, signum: int, frame: Any) -> None:
    """Ctrl-C and SIGTERM during a sweep: KeyboardInterrupt, and ``stop`` set, which the sweep's loop
    also checks (a KeyboardInterrupt raised inside a library call, Ray's or MLflow's, may be lost)."""
    stop.set()
    raise KeyboardInterrupt


def _job_body(job_cfg: DictConfig) -> DictConfig:
    """The job's own config without the ``hydra`` node."""
    body = copy.deepcopy(job_cfg)
    with open_dict(body):
        body.pop("hydra", None)
    return body


def _job_request(job_cfg: DictConfig) -> JobRequest:
    """What the sweep needs of a Hydra job config, as plain data."""
    job_logging = job_cfg.hydra.job_logging
    return JobRequest(
        config=OmegaConf.to_container(_job_body(job_cfg), resolve=True),
        overrides=tuple(job_cfg.hydra.overrides.task),
        logging_config=None if job_logging is None else OmegaConf.to_container(job_logging, resolve=True),
        debug_loggers=_debug_loggers(job_cfg.hydra.verbose),
    )


def _debug_loggers(verbose: Any) -> tuple[str, ...]:
    """Hydra's ``hydra.verbose`` (true, a logger name or a list of them) as logger names."""
    if isinstance(verbose, bool):
        return ("root",) if verbose else ()
    if isinstance(verbose, str):
        return (verbose,)
    return tuple(str(name) for name in verbose)


def _save_hydra_folder(job_cfg: DictConfig) -> None:
    """The job's Hydra folder, as Hydra's own ``run_job`` writes it: ``.hydra/`` with the composed
    config, Hydra's config and the overrides."""
    output_dir = Path(job_cfg.hydra.runtime.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if job_cfg.hydra.output_subdir is None:
        return
    hydra_output = output_dir / str(job_cfg.hydra.output_subdir)
    hydra_output.mkdir(parents=True, exist_ok=True)
    for name, node in (
        ("config.yaml", _job_body(job_cfg)),
        ("hydra.yaml", OmegaConf.masked_copy(job_cfg, "hydra")),
        ("overrides.yaml", job_cfg.hydra.overrides.task),
    ):
        (hydra_output / name).write_text(OmegaConf.to_yaml(node), encoding="utf-8")


def _job_return(job_cfg: DictConfig, outcome: JobOutcome) -> JobReturn:
    """Hydra's record of one job, from the sweep's :class:`~polypythia.jobspec.JobOutcome`."""
    ret = JobReturn()
    ret.cfg = _job_body(job_cfg)
    ret.hydra_cfg = OmegaConf.masked_copy(job_cfg, "hydra")
    ret.overrides = list(job_cfg.hydra.overrides.task)
    ret.working_dir = os.getcwd()  # jobs do not change directory (hydra.job.chdir: their paths are absolute)
    ret.task_name = str(job_cfg.hydra.job.name)
    ret.status = JobStatus.COMPLETED if outcome.ok else JobStatus.FAILED  # ok: finished, or stopped by the monitor
    ret.return_value = outcome.summary if outcome.ok else outcome.error
    return ret


def print_cross_seed_summary(tracking_uri: str, study: str, parent_run_id: str) -> None:
    """The sweep's ``on_finished`` hook: the final-loss summary across the seeds of ``study``."""
    from analysis.summary import print_summary

    print_summary(tracking_uri, study, parent_run_id=parent_run_id)
