"""A detached study: the sweep's driver submitted to a running Ray cluster as a Ray job, so the
terminal comes back at once and the study outlives the ssh session that started it.

    python -m polypythia.driver.detach submit --address http://head:8265 -- -m seed=1,2,3 model=160m
    python -m polypythia.driver.detach status polypythia-20261206-201500-1a2b
    python -m polypythia.driver.detach logs polypythia-20261206-201500-1a2b [--follow]
    python -m polypythia.driver.detach stop polypythia-20261206-201500-1a2b
    python -m polypythia.driver.detach list

It uses Ray's Jobs API (``ray.job_submission.JobSubmissionClient``, the dashboard's HTTP address,
default ``$RAY_ADDRESS`` or http://127.0.0.1:8265): the entrypoint is ``python launch.py <args>``,
run on the head node in this repository, uploaded as the job's ``working_dir`` without ``.venv``,
``.git`` and ``.polypythia`` (``excludes``); its driver attaches to the cluster (Ray sets
``RAY_ADDRESS`` for it). The job's environment carries what the driver must share with this
machine: ``POLYPYTHIA_HOME`` (absolute: runs on storage every node sees) and the tracking server's
address (a detached study needs one that outlives its driver: ``MLFLOW_TRACKING_URI``, or the local
server this machine runs). ``stop`` asks Ray to stop the job: Ray sends the driver SIGTERM, which
stops a sweep as Ctrl-C does (jobs cancelled, runs KILLED), with ``RAY_JOB_STOP_WAIT_TIME_S`` set to
60 s for it to close its runs before Ray kills it; then ``stop`` marks every run of the study's
sweep that is KILLED or still RUNNING with ``failure_reason=stopped: ...`` naming the command.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from polypythia.driver.orphans import SUBMISSION_ENV, SUBMISSION_TAG  # the driver tags its parent runs with the id
from polypythia.errors import ConfigError, PolypythiaError, exit_with
from polypythia.runtime import env as runtime_env
from polypythia.tracking import client as tracking

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
PREFIX = "polypythia-"
# Not uploaded: the virtual environment, git's objects, a local study's home, caches and build output.
EXCLUDES = [".venv/", ".git/", ".polypythia/", "**/__pycache__/", "*.egg-info/", ".pytest_cache/", "analysis-out/"]
STOP_WAIT_S = 60  # RAY_JOB_STOP_WAIT_TIME_S: how long the driver has to close its runs after SIGTERM
AGENT_WAIT_S = 300.0  # a cluster just started: its job agent took over 90 s to register on 2 busy cores


def client(address: Optional[str]) -> Any:
    """A JobSubmissionClient for the dashboard at ``address``, or a one-line :class:`ConfigError`."""
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get(runtime_env.RAY_ADDRESS_ENV) or DEFAULT_DASHBOARD
    try:
        return JobSubmissionClient(address)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"Cannot reach the Ray dashboard at {address} ({first[:200]}); start the cluster with its "
            "dashboard (ray start --head --include-dashboard=true) or give its http://host:8265 address "
            "in --address or RAY_ADDRESS."
        ) from None


def submit(jobs: Any, launch_args: list[str], python: str, tracking_uri: Optional[str], home: str) -> str:
    """Submit ``python launch.py <launch_args>`` as a Ray job; returns its submission id."""
    if not launch_args:
        raise ConfigError("Nothing to launch; give launch.py's arguments after --, e.g. -- -m seed=1,2 model=tiny.")
    uri = tracking_uri or tracking.default_tracking_uri()
    if not uri:
        raise ConfigError(
            "A detached study needs a tracking server that outlives its driver, and none is set; start "
            "one (python -m polypythia.tracking.client start --host 0.0.0.0) or set MLFLOW_TRACKING_URI."
        )
    tracking.require_reachable(uri, "start it or fix --tracking-uri (or MLFLOW_TRACKING_URI)")
    submission_id = f"{PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    # Keys of their own: Ray refuses to merge the job's env_vars with the driver's ray.init (raysetup.init_ray)
    # where a key is in both, so the worker settings (runtime_env.ray_env_vars) are not repeated here.
    env_vars = {
        runtime_env.HOME_ENV: str(Path(home).resolve()),
        runtime_env.TRACKING_URI_ENV: uri,
        SUBMISSION_ENV: submission_id,
        "RAY_JOB_STOP_WAIT_TIME_S": str(STOP_WAIT_S),
    }
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            jobs.submit_job(
                entrypoint=f"{shlex.quote(python)} -u launch.py {shlex.join(launch_args)}",  # -u: logs as they come
                submission_id=submission_id,
                metadata={"tracking_uri": uri, "polypythia_home": env_vars[runtime_env.HOME_ENV]},
                runtime_env={"working_dir": str(REPO), "excludes": EXCLUDES, "env_vars": env_vars},
            )
            return submission_id
        except RuntimeError as exc:  # a cluster just started: its job agent registers after the dashboard
            if "No available agent" not in str(exc):
                raise
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"The Ray cluster's dashboard answers but no job agent took the study within "
                    f"{AGENT_WAIT_S:.0f} s; check that the head node's dashboard agent runs (ray status, "
                    "and its dashboard_agent.log) and submit again."
                ) from None
            time.sleep(3)


def info(jobs: Any, submission_id: str, address: str) -> Any:
    """The Ray job's details, or a one-line :class:`ConfigError` for an id the cluster does not know."""
    try:
        return jobs.get_job_info(submission_id)
    except RuntimeError as exc:
        if "404" not in str(exc) and "does not exist" not in str(exc):
            raise
        raise ConfigError(
            f"The Ray cluster at {address} has no job {submission_id!r}; python -m polypythia.driver.detach list "
            "shows the studies submitted to it."
        ) from None


def describe(details: Any) -> str:
    """One line: the job's state, since when, and Ray's message."""
    start, end = details.start_time, details.end_time
    when = f"started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(start / 1000))}" if start else "not started"
    if end:
        when += f", ended {time.strftime('%H:%M:%S', time.localtime(end / 1000))}"
    message = f": {details.message}" if details.message else ""
    return f"{details.submission_id}: {details.status.value} ({when}){message}"


def stop(jobs: Any, submission_id: str, address: str, wait_s: float = STOP_WAIT_S + 30) -> list[str]:
    """Stop the study's Ray job, wait until Ray says it ended, and mark its runs KILLED with the reason;
    returns a line per run marked."""
    details = info(jobs, submission_id, address)
    jobs.stop_job(submission_id)
    deadline = time.monotonic() + wait_s
    while not jobs.get_job_status(submission_id).is_terminal() and time.monotonic() < deadline:
        time.sleep(1)
    uri = (details.metadata or {}).get("tracking_uri")
    if not uri:
        return []
    reason = f"stopped: python -m polypythia.driver.detach stop {submission_id} (the study's Ray job was stopped)"
    return close_runs(tracking.client(uri), submission_id, reason)


def close_runs(mlflow_client: Any, submission_id: str, reason: str) -> list[str]:
    """Every run of the sweeps tagged with ``submission_id`` that is RUNNING, or KILLED by the interrupt,
    ends KILLED with ``reason``."""
    from polypythia.study import search_job_runs

    marked = []
    experiments = [e.experiment_id for e in mlflow_client.search_experiments()]
    parents = mlflow_client.search_runs(experiments, filter_string=f"tags.`{SUBMISSION_TAG}` = '{submission_id}'")
    for parent in parents:
        runs = search_job_runs(mlflow_client, parent.info.experiment_id, parent.info.run_id) + [parent]
        for run in runs:
            if run.info.status == "RUNNING" or (run.info.status == "KILLED" and not _stopped(run)):
                mlflow_client.set_tag(run.info.run_id, "failure_reason", reason)
                mlflow_client.set_terminated(run.info.run_id, status="KILLED")
                marked.append(f"{run.info.run_name}: KILLED ({reason})")
    return marked


def _stopped(run: Any) -> bool:
    return run.data.tags.get("failure_reason", "").startswith("stopped")


def _follow(jobs: Any, submission_id: str) -> None:
    import asyncio

    async def tail() -> None:
        async for lines in jobs.tail_job_logs(submission_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m polypythia.driver.detach",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("action", choices=["submit", "status", "logs", "stop", "list"])
    parser.add_argument("id", nargs="?", help="the study's submission id (status, logs, stop)")
    parser.add_argument("--address", help=f"the Ray dashboard (default: $RAY_ADDRESS, else {DEFAULT_DASHBOARD})")
    parser.add_argument("--python", default="python", help="submit: the head node's Python with polypythia installed")
    parser.add_argument(
        "--tracking-uri", help="submit: the MLflow server (default: $MLFLOW_TRACKING_URI, else the local one)"
    )
    parser.add_argument("--follow", action="store_true", help="logs: follow until the job ends")
    argv = list(sys.argv[1:] if argv is None else argv)
    launch_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    address = args.address or os.environ.get(runtime_env.RAY_ADDRESS_ENV) or DEFAULT_DASHBOARD
    try:
        if args.action != "list" and args.action != "submit" and not args.id:
            raise ConfigError(
                f"{args.action} needs the study's submission id (python -m polypythia.driver.detach list shows them)."
            )
        jobs = client(address)
        if args.action == "submit":
            sid = submit(jobs, launch_args, args.python, args.tracking_uri, str(runtime_env.home()))
            print(
                f"Submitted the study as Ray job {sid} to {address}.\n"
                f"  status: python -m polypythia.driver.detach status {sid}\n  logs:   python -m polypythia.driver.detach logs {sid} "
                f"--follow\n  stop:   python -m polypythia.driver.detach stop {sid}",
                flush=True,
            )
        elif args.action == "status":
            print(describe(info(jobs, args.id, address)))
        elif args.action == "logs":
            info(jobs, args.id, address)
            _follow(jobs, args.id) if args.follow else print(jobs.get_job_logs(args.id), end="")
        elif args.action == "stop":
            lines = stop(jobs, args.id, address)
            print("\n".join([describe(info(jobs, args.id, address))] + lines))
        else:
            for details in sorted(jobs.list_jobs(), key=lambda d: d.start_time or 0):
                if (details.submission_id or "").startswith(PREFIX):
                    print(describe(details))
    except PolypythiaError as exc:
        exit_with(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
