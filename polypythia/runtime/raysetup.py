"""The Ray runtime of a sweep or an offline evaluation (:mod:`polypythia.evaluate.runner`): started
locally or attached to a cluster, checked for the resources the jobs ask for, and a placement group
per multi-worker run (used by :class:`polypythia.driver.sweep.Sweep`).

``ray.init`` arguments for a local runtime are :mod:`polypythia.runtime.localray`'s; the environment its
workers get is :func:`polypythia.runtime.env.ray_env_vars`. Ray's placement groups are described in
the Ray docs ("Placement Groups", ``ray.util.placement_group``).

How the workers get that environment: a cluster's as the job's ``runtime_env`` (``env_vars``); a local
runtime's by inheritance, since its raylet, and every worker the raylet starts, is a child process
of ``ray.init`` (:func:`local_worker_env`). A job-level ``runtime_env`` would make Ray start new workers
for the job instead of handing the first tasks to the ones it pre-starts, which costs each of the first
jobs about 0.7 s of start-up.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from polypythia.errors import ConfigError
from polypythia.runtime import localray
from polypythia.runtime.env import ray_env_vars

PACKAGE_DIRS = ("polypythia",)  # the code a cluster's workers import (uploaded when attaching to one)


def init_ray(address: str | None, offline: bool = False, option: str = "launcher.address") -> bool:
    """Start a local Ray runtime (``address`` null) or attach to the cluster at ``address``; True
    when this call started a local runtime (the sweep shuts it down again). ``offline``: the workers
    read local files only (:data:`polypythia.runtime.env.OFFLINE_ENV`, for lm-eval); ``option``: the
    setting that gave ``address``, named in the error when the cluster does not answer."""
    import ray

    if ray.is_initialized():
        return False
    runtime_env: dict[str, Any] | None = None
    check_reachable(address, option=option)
    if address:
        root = Path(__file__).resolve().parents[2]
        runtime_env = {
            "env_vars": ray_env_vars(offline),
            "py_modules": [str(root / d) for d in PACKAGE_DIRS if (root / d).is_dir()],
        }
    try:
        with local_worker_env(address, offline):
            ray.init(
                **localray.init_args(address),
                include_dashboard=False,
                log_to_driver=False,
                runtime_env=runtime_env,
                logging_level=logging.WARNING,
            )
    except ConnectionError as exc:
        raise ConfigError(
            f"Cannot connect to the Ray cluster at {option}={address} ({exc}); start it or fix {option}."
        ) from None
    return not address


@contextmanager
def local_worker_env(address: str | None, offline: bool = False) -> Iterator[None]:
    """With no ``address`` (a local runtime): :func:`ray_env_vars` set in this process's environment for
    the duration, so that the Ray processes started meanwhile inherit them, then put back as they were.
    With an address, nothing (:func:`init_ray` passes them as the job's ``runtime_env``)."""
    changes = {} if address else ray_env_vars(offline)
    saved = {key: os.environ.get(key) for key in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def check_resources(launcher: Any) -> None:
    """A one-line ConfigError when the cluster has fewer GPUs or CPUs than one job asks for."""
    import ray

    total = ray.cluster_resources()
    workers = launcher.workers_per_run
    need_gpus = launcher.num_gpus_per_job * workers
    if need_gpus > 0 and total.get("GPU", 0) < need_gpus:
        per_worker = f" ({launcher.num_gpus_per_job:g} per worker x {workers} workers)" if workers > 1 else ""
        raise ConfigError(
            f"Each job asks for {need_gpus:g} GPU(s){per_worker} (launcher.num_gpus_per_job) but the Ray "
            f"cluster has {total.get('GPU', 0):g}; lower launcher.num_gpus_per_job or launcher.workers_per_run, "
            "or attach to a cluster with more GPUs."
        )
    need_cpus = launcher.num_cpus_per_job * workers
    if total.get("CPU", 0) < need_cpus:
        raise ConfigError(
            f"Each job asks for {need_cpus:g} CPUs but the Ray cluster has {total.get('CPU', 0):g}; "
            "lower launcher.num_cpus_per_job or launcher.workers_per_run."
        )


def reserve_workers(jobs: list[Any]) -> dict[int, Any]:
    """A placement group per multi-worker run (by job index), so all its ranks start together or not at all."""
    from ray.util.placement_group import placement_group

    groups = {}
    for i, job in enumerate(jobs):
        n = job.launcher.workers_per_run
        if n > 1:
            bundle = {"CPU": job.launcher.num_cpus_per_job}
            if job.launcher.num_gpus_per_job:
                bundle["GPU"] = job.launcher.num_gpus_per_job
            groups[i] = placement_group([bundle] * n, strategy="PACK", name=f"{job.run_name}-workers")
    return groups


def check_reachable(address: str | None, timeout_s: float = 5.0, option: str = "launcher.address") -> None:
    """Fail in seconds, not minutes, when a host:port cluster address does not answer, or answers
    but is not a Ray cluster (``ray.init`` would retry it for minutes, printing warnings)."""
    if not address or address in ("auto", "local") or "://" in address or ":" not in address:
        return
    import socket

    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"Cannot connect to the Ray cluster at {option}={address} ({exc}); start it "
            f"(ray start --head) or fix {option}."
        ) from None
    problem = gcs_problem(address, timeout_s)
    if problem:
        raise ConfigError(
            f"The program at {option}={address} is not a Ray cluster's head ({problem}); give {option} "
            "the address `ray start --head` printed (its GCS port, 6379 by default), or fix the address."
        )


def gcs_problem(address: str, timeout_s: float = 5.0) -> str | None:
    """None if ``address`` answers as a Ray cluster's GCS (Ray's global control service, gRPC) would,
    else what it did instead. The question is ``NodeInfoGcsService.CheckAlive`` with no node, which
    the GCS answers with its Ray version; a cluster that wants a token may refuse it as unauthenticated,
    which only a gRPC server that knows the method does."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).CheckAlive(
                gcs_service_pb2.CheckAliveRequest(), timeout=timeout_s
            )
            return None
        except grpc.RpcError as exc:
            code, details = exc.code(), (exc.details() or "").strip().splitlines()
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return None
    if code == grpc.StatusCode.UNAVAILABLE:  # connected, but no gRPC (HTTP/2) answer: another protocol
        return "it does not speak gRPC, Ray's protocol"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"no answer within {timeout_s:g} s"
    return f"{code.name}: {details[0] if details else 'no details'}"
