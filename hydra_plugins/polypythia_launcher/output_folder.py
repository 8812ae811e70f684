"""A Hydra callback that checks, before Hydra creates anything, that the launch's output folder
(``hydra.sweep.dir`` with ``-m``, else ``hydra.run.dir``; both under ``$POLYPYTHIA_HOME/hydra/``)
can be written.

Hydra creates that folder itself, before any job config is validated: in the sweeper for a sweep
(``BasicSweeper.sweep``) and in ``run_job`` for a single job. On a read-only or misplaced home
that ``mkdir`` was a Python traceback. The callback hooks (``on_multirun_start``,
``on_run_start``) run just before; see https://hydra.cc/docs/experimental/callbacks/. The callback
is registered in ``conf/config.yaml`` under ``hydra.callbacks``.
"""

from __future__ import annotations

import os
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class WritableOutputFolder(Callback):
    """Leaves with one line (exit code 2, nothing started) when the output folder cannot be written.

    A subclass of Hydra's ``Callback``, whose other hooks (``on_multirun_end``, ``on_job_start``, ...)
    do nothing: Hydra calls every hook on every callback, and a missing one was a warning at the end
    of each sweep."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_output_folder(config, "hydra.sweep.dir")

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_output_folder(config, "hydra.run.dir")


def check_output_folder(config: DictConfig, key: str) -> None:
    from polypythia.errors import ConfigError, exit_with

    problem = output_folder_problem(str(config.home), key, str(_select(config, key)))
    if problem:
        exit_with(ConfigError(problem))


def _select(config: DictConfig, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = node[part]
    return node


def create_folder_problem(folder: str) -> str | None:
    """Why ``folder`` cannot be created or written, or None once it exists. It is created here, as
    Hydra would create it next (``${now:...}`` is cached, so Hydra's folder is this one): a mode bit
    check alone misses a read-only file system or a pseudo file system such as ``/sys`` for root."""
    from polypythia.config.preflight import writable_folder_problem

    problem = writable_folder_problem(folder)
    if problem is not None:
        return problem
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        return f"{exc.strerror or type(exc).__name__}: {exc.filename or folder}"
    return None


def output_folder_problem(home: str, key: str, folder: str) -> str | None:
    """The one-line error for an output ``folder`` (the value of ``key``) that cannot be created or
    written, or None. A folder under ``home`` names the home and ``POLYPYTHIA_HOME`` as the fix."""
    from polypythia.runtime.env import HOME_ENV

    problem = create_folder_problem(folder)
    if problem is None:
        return None
    home_path = os.path.abspath(home)
    if os.path.commonpath([os.path.abspath(folder), home_path]) != home_path:
        return f"{key}={folder} cannot be written ({problem}); set {key} to a folder you can write to."
    named = f"{HOME_ENV}={home}" if os.environ.get(HOME_ENV) == home else f"home={home} ({HOME_ENV})"
    return (
        f"{named} cannot be written ({problem}), so Hydra cannot create {folder}; set {HOME_ENV} "
        "(or home=...) to a folder you can write to."
    )
