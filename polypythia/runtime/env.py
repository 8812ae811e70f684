"""The process environment polypythia runs in: where its files live, and what it sets for its libraries.

Every environment default is written here once, and nothing is written to ``os.environ`` on
import:

- :func:`home` is ``$POLYPYTHIA_HOME`` or ``.polypythia`` (in the folder you launch from): the
  checkpoints, the MLflow server's folder, the data caches and the evaluation tables live under it.
  The job config's own defaults (``home``, ``runs_dir``, ``data.cache_dir``, ``tracking.dir``,
  ``tracking.uri``, ``launcher.address``) are built from the names below (polypythia/config/jobconfig.py).
- :func:`apply` sets the MLflow client settings (and, for offline evaluation, the Hugging Face
  offline flags) where they are unset; it is called at start-up by whatever opens an MLflow client
  (:func:`polypythia.tracking.client.client`, ``analysis.mlflow_load.mlflow_client``) or runs lm-eval.
- :func:`ray_env_vars` is the ``env_vars`` of the Ray runtime environment of every task a sweep or
  an evaluation starts, so that workers have these settings before they import anything; they
  include glibc allocator settings that spare a CPU training step its page faults (ALLOCATOR_ENV).
- :func:`quiet_libraries` turns the chatty libraries (DeepSpeed, transformers) down to warnings in
  the process that calls it (a job, a worker, an evaluation task).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

HOME_ENV = "POLYPYTHIA_HOME"
DEFAULT_HOME = ".polypythia"
MLFLOW_SUBDIR = "mlflow"  # the local tracking server's folder, under the home folder

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"  # MLflow's own variable: a server every process can reach
RAY_ADDRESS_ENV = "RAY_ADDRESS"  # Ray's own variable: a running cluster to attach to
DEFAULT_TRACKING_HOST = "127.0.0.1"
DEFAULT_TRACKING_PORT = 5050  # the local MLflow server's first choice (the next free port if taken)

# MLflow clients: no usage telemetry (MLflow >= 3.2 sends it from a background thread by default);
# no retries inside the client, since polypythia.tracking.client.MetricsLogger retries itself for up to
# tracking.max_outage_s; and a 30 s limit per request.
MLFLOW_CLIENT_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
# The local `mlflow server` process: no telemetry, and no background job runner (it forks eight
# ~250 MB processes that a tracking server does not need). These override the caller's values.
MLFLOW_SERVER_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
# Ray workers: no MLflow telemetry, no thread pool in Hugging Face tokenizers (forked data loading
# would warn and may deadlock), unbuffered output.
WORKER_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
# Ray workers on glibc (Linux): keep freed memory in the heap instead of giving it back to the kernel.
# By default glibc returns large blocks (mmap'd, or trimmed from the heap top) on free, so every
# training step of a CPU job maps its activations, logits and gradients afresh and the kernel zeroes
# them page by page: 35-55k page faults a step, 7% of a 70m step and 26% of a 14m one on the
# machine in README.md's Performance table. A large top pad with trimming off lets the heap grow to the
# step's peak once and serve every later step from it (RSS about 50-70 MB higher for 14m and 70m; at
# most about the pad, 1 GiB, above glibc's default behaviour). The variables are
# glibc's (mallopt(3), "ENVIRONMENT"); other C libraries ignore them. A caller who sets any MALLOC_*
# variable or GLIBC_TUNABLES keeps their own settings instead.
ALLOCATOR_ENV = {"MALLOC_TOP_PAD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 36)}
# Offline evaluation: lm-eval and transformers read local files only, never the Hugging Face Hub.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def home() -> Path:
    """``$POLYPYTHIA_HOME``, else ``.polypythia`` (relative to the current folder)."""
    return Path(os.environ.get(HOME_ENV, DEFAULT_HOME))


def default_server_dir() -> Path:
    """The local MLflow server's folder: ``<home>/mlflow``."""
    return home() / MLFLOW_SUBDIR


def apply(offline: bool = False) -> None:
    """Set the MLflow client settings (and with ``offline`` the Hugging Face offline flags) in this
    process's environment, each only where it is unset. Idempotent; call it at start-up, before
    the first ``import mlflow`` where possible (MLflow reads the telemetry switch on import)."""
    for key, value in {**MLFLOW_CLIENT_ENV, **(OFFLINE_ENV if offline else {})}.items():
        os.environ.setdefault(key, value)


def ray_env_vars(offline: bool = False) -> dict[str, str]:
    """The ``env_vars`` of a Ray runtime environment for polypythia's tasks."""
    return {**WORKER_ENV, **allocator_env(), **(OFFLINE_ENV if offline else {})}


def sets_allocator(key: str) -> bool:
    """Whether the environment variable ``key`` is one of glibc's allocator settings."""
    return key.startswith("MALLOC_") or key == "GLIBC_TUNABLES"


def allocator_env() -> dict[str, str]:
    """:data:`ALLOCATOR_ENV`, or nothing where this process's environment sets the allocator itself."""
    return {} if any(sets_allocator(key) for key in os.environ) else dict(ALLOCATOR_ENV)


def quiet_libraries() -> None:
    """DeepSpeed and transformers print a lot at INFO; a study's logs should show ours."""
    for name in ("DeepSpeed", "deepspeed", "transformers", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_warning()
    except ImportError:
        pass
