"""A sweep of training jobs on Ray: validation, shared setup, submission, live progress, outcome.

The Hydra launcher plugin composes one config per job and hands them here; this module knows
nothing of Hydra. Everything a job receives is plain data: its composed config, the tracking URI,
the sweep's parent run id.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig

from polypythia import tracking
from polypythia.config import JobConfig, job_config
from polypythia.errors import ConfigError
from polypythia.progress import ProgressBoard, ProgressDisplay

log = logging.getLogger(__name__)

PACKAGE_DIRS = ("polypythia", "analysis", "hydra_plugins")


def _validate_all(raw_configs: list[DictConfig], launch_dir: str) -> list[JobConfig]:
    jobs = []
    for i, raw in enumerate(raw_configs):
        try:
            jobs.append(job_config(raw, launch_dir))
        except ConfigError as exc:
            raise ConfigError(f"Job #{i}: {exc}") from None
    names = Counter((j.study, j.run_name) for j in jobs)
    repeated = [f"{study}/{name}" for (study, name), n in names.items() if n > 1]
    if repeated:
        raise ConfigError(f"The sweep has the same run more than once ({', '.join(repeated)}); each (model, seed) may appear only once.")
    return jobs


class Sweep:
    def __init__(self, raw_configs: list[DictConfig], launch_dir: str):
        self.jobs = _validate_all(raw_configs, launch_dir)
        self.launcher = self.jobs[0].launcher
        self.uri: str | None = None
        self.parent_runs: dict[str, str] = {}
        self._started_ray = False
        self.placement_groups: dict[int, Any] = {}

    # -- setup shared by all jobs, before any starts ----------------------------------------

    def prepare(self) -> None:
        """Shared setup, in the order that leaves nothing behind when a check fails: the Ray
        runtime and its resources first (shut down again on any error), the tracking server last."""
        self._build_data_caches()
        try:
            self._init_ray()
            self._check_resources()
            first = self.jobs[0].tracking
            self.uri = tracking.resolve_tracking_uri(first.uri, first.dir, first.host, first.port)
            print(f"MLflow tracking server: {self.uri}  (open it in a browser to see the runs)", flush=True)
            self._reserve_workers()
            self._open_parent_runs()
        except BaseException:
            self.shutdown()
            raise

    def _build_data_caches(self) -> None:
        from polypythia.data.embedded import ensure_embedded_dataset

        for cache_dir, vocab in sorted({(j.data.cache_dir, j.data.vocab_size) for j in self.jobs if j.data.kind == "embedded"}):
            ensure_embedded_dataset(cache_dir, vocab)

    def _init_ray(self) -> None:
        import ray

        if ray.is_initialized():
            return
        env_vars = {"MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        runtime_env: dict[str, Any] = {"env_vars": env_vars}
        address = self.launcher.address
        _check_reachable(address)
        if address:
            root = Path(__file__).resolve().parent.parent
            runtime_env["py_modules"] = [str(root / d) for d in PACKAGE_DIRS if (root / d).is_dir()]
        try:
            ray.init(address=address or None, include_dashboard=False, log_to_driver=False,
                     runtime_env=runtime_env, logging_level=logging.WARNING)
        except ConnectionError as exc:
            raise ConfigError(f"Cannot connect to the Ray cluster at launcher.address={address} ({exc}); start it or fix the address.") from None
        self._started_ray = not address

    def _check_resources(self) -> None:
        import ray

        total = ray.cluster_resources()
        workers = self.launcher.workers_per_run
        need_gpus = self.launcher.num_gpus_per_job * workers
        if need_gpus > 0 and total.get("GPU", 0) < need_gpus:  # prepare() shuts Ray down again
            per_worker = f" ({self.launcher.num_gpus_per_job:g} per worker x {workers} workers)" if workers > 1 else ""
            raise ConfigError(
                f"Each job asks for {need_gpus:g} GPU(s){per_worker} (launcher.num_gpus_per_job) but the Ray "
                f"cluster has {total.get('GPU', 0):g}; lower launcher.num_gpus_per_job or launcher.workers_per_run, "
                "or attach to a cluster with more GPUs."
            )
        need_cpus = self.launcher.num_cpus_per_job * workers
        if total.get("CPU", 0) < need_cpus:
            raise ConfigError(
                f"Each job asks for {need_cpus:g} CPUs but the Ray cluster has {total.get('CPU', 0):g}; "
                "lower launcher.num_cpus_per_job or launcher.workers_per_run."
            )

    def _reserve_workers(self) -> None:
        """A placement group per multi-worker run, so all its ranks start together or not at all."""
        from ray.util.placement_group import placement_group

        for i, job in enumerate(self.jobs):
            n = job.launcher.workers_per_run
            if n > 1:
                bundle = {"CPU": job.launcher.num_cpus_per_job}
                if job.launcher.num_gpus_per_job:
                    bundle["GPU"] = job.launcher.num_gpus_per_job
                self.placement_groups[i] = placement_group([bundle] * n, strategy="PACK", name=f"{job.run_name}-workers")

    def ranks(self, index: int) -> dict[str, Any] | None:
        """What rank 0 of a multi-worker run needs to start the others (None for one worker)."""
        if index not in self.placement_groups:
            return None
        from polypythia.config import to_dict

        job = self.jobs[index]
        return {"job": to_dict(job), "world_size": job.launcher.workers_per_run,
                "placement_group": self.placement_groups[index],
                "num_cpus": job.launcher.num_cpus_per_job, "num_gpus": job.launcher.num_gpus_per_job}

    def _open_parent_runs(self) -> None:
        client = tracking.client(self.uri)
        stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
        for study in sorted({j.study for j in self.jobs}):
            exp_id = tracking.experiment_id(client, study)
            run = client.create_run(exp_id, run_name=f"sweep-{stamp}", tags={
                "polypythia.kind": "sweep",
                "jobs": ", ".join(j.run_name for j in self.jobs if j.study == study),
            })
            self.parent_runs[study] = run.info.run_id

    # -- running -----------------------------------------------------------------------------

    def task_options(self, index: int) -> dict[str, Any]:
        job = self.jobs[index]
        extra = {}
        if index in self.placement_groups:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            extra["scheduling_strategy"] = PlacementGroupSchedulingStrategy(self.placement_groups[index], placement_group_bundle_index=0)
        return {**extra,
            "num_cpus": job.launcher.num_cpus_per_job,
            "num_gpus": job.launcher.num_gpus_per_job,
            "max_retries": job.launcher.max_retries,  # process deaths only: Python errors are final
            "retry_exceptions": False,
            "name": job.run_name,
        }

    def context(self, index: int) -> dict[str, Any]:
        job = self.jobs[index]
        return {"tracking_uri": self.uri, "parent_run_id": self.parent_runs[job.study], "job_index": index}

    def run(self, submit: Callable[[Any, Any, int, dict], Any]) -> list[Any]:
        """Submit every job with ``submit(ray, board, index, context) -> ObjectRef``; wait for all.

        Returns, per job in order, the task's return value or the exception that ended it.
        """
        import ray

        outcomes: dict[int, Any] = {}
        rows: dict[int, dict] = {}
        try:
            board = ray.remote(ProgressBoard).options(num_cpus=0).remote([j.run_name for j in self.jobs])
            refs = [submit(ray, board, i, self.context(i)) for i in range(len(self.jobs))]
            pending = {ref: i for i, ref in enumerate(refs)}
            with ProgressDisplay(enabled=self.launcher.progress) as display:
                while pending:
                    done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=2.0)
                    for ref in done:
                        index = pending.pop(ref)
                        try:
                            outcomes[index] = ray.get(ref)
                        except Exception as exc:  # noqa: BLE001 - reported per job below
                            outcomes[index] = exc
                            board.update.remote(index, {"state": "failed"})
                    display.update(ray.get(board.snapshot.remote()))
            rows = ray.get(board.snapshot.remote())
        finally:
            self._finish(outcomes)
        self._report(outcomes, rows)
        return [outcomes[i] for i in range(len(self.jobs))]

    def _finish(self, outcomes: dict[int, Any]) -> None:
        client = tracking.client(self.uri)
        for study, run_id in self.parent_runs.items():
            failed = any(not _succeeded(outcomes.get(i)) for i, j in enumerate(self.jobs) if j.study == study)
            try:
                client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")
            except Exception as exc:  # noqa: BLE001 - a dead server must not hide the jobs' outcome
                log.error("Could not close the sweep's MLflow run %s: %s", run_id, exc)
        self.shutdown()

    def _report(self, outcomes: dict[int, Any], rows: dict[int, dict]) -> None:
        print("\nSweep outcome:", flush=True)
        for i, job in enumerate(self.jobs):
            outcome = outcomes.get(i)
            attempts = rows.get(i, {}).get("attempt", 1) or 1
            retried = f" (retried {attempts - 1}x)" if attempts > 1 else ""
            if _succeeded(outcome):
                value = outcome["return_value"]
                print(f"  {job.run_name}: finished{retried}, final loss {value['final_loss']:.4f}, MLflow run {value['run_id']}")
            else:
                print(f"  {job.run_name}: {rows.get(i, {}).get('state', 'failed')}{retried}: {_reason(outcome)}")
        self._print_summary()

    def _print_summary(self) -> None:
        try:
            from analysis.summary import print_summary
        except ImportError:
            return
        for study, run_id in self.parent_runs.items():
            try:
                print_summary(self.uri, study, parent_run_id=run_id)
            except Exception as exc:  # noqa: BLE001 - the summary must not fail a finished sweep
                log.error("Could not print the cross-seed summary: %s", exc)

    def shutdown(self) -> None:
        import ray

        if ray.is_initialized():
            from ray.util.placement_group import remove_placement_group

            for pg in self.placement_groups.values():
                remove_placement_group(pg)
        self.placement_groups = {}
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
            self._started_ray = False


def _check_reachable(address: str | None, timeout_s: float = 5.0) -> None:
    """Fail in seconds, not minutes, when a host:port cluster address does not answer."""
    if not address or address in ("auto", "local") or "://" in address or ":" not in address:
        return
    import socket

    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"Cannot connect to the Ray cluster at launcher.address={address} ({exc}); start it "
            "(ray start --head) or fix the address."
        ) from None


def _succeeded(outcome: Any) -> bool:
    return isinstance(outcome, dict) and outcome.get("status") == "COMPLETED"


def _reason(outcome: Any) -> str:
    if isinstance(outcome, dict):
        exc = outcome.get("return_value")
        return f"{type(exc).__name__}: {exc}" if isinstance(exc, BaseException) else str(exc)
    if isinstance(outcome, BaseException):
        text = str(outcome).strip().splitlines()
        return f"{type(outcome).__name__}: {text[-1] if text else ''}"
    return "did not finish"


def _rank_worker(job: dict, rank: int, world_size: int, master_addr: str, master_port: int) -> list[float]:
    """A data-parallel rank other than 0: trains in step with rank 0, tracks nothing itself."""
    from polypythia.config import job_config
    from polypythia.job import quiet_libraries
    from polypythia.train.loop import set_rendezvous, train

    set_rendezvous(rank, world_size, master_addr, master_port)
    quiet_libraries()
    return train(job_config(job)).losses


def start_other_ranks(job: dict, world_size: int, placement_group, num_cpus: float, num_gpus: float) -> list:
    """Called in rank 0's process: start ranks 1..N-1 in the run's placement group and point
    this process's environment at the rendezvous (rank 0 hosts it on a free port)."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from polypythia.net import free_port
    from polypythia.train.loop import set_rendezvous

    addr = ray.util.get_node_ip_address()
    port = free_port()
    refs = [
        ray.remote(max_calls=1)(_rank_worker).options(
            num_cpus=num_cpus, num_gpus=num_gpus, max_retries=0, name=f"rank{rank}",
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group, placement_group_bundle_index=rank),
        ).remote(job, rank, world_size, addr, port)
        for rank in range(1, world_size)
    ]
    set_rendezvous(0, world_size, addr, port)
    return refs
