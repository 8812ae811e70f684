"""A run's folder (``<runs_dir>/<study>/<run_name>/``) and what it remembers between launches.

Besides ``checkpoints/`` it holds three small files:

- ``run.lock``: locked (``fcntl.flock``) by the one job that owns the folder while it runs, naming
  its pid and host; the lock dies with the process. A second job of the same run stops at once
  (:func:`claim`), and a launch that finds the folder in use refuses before anything starts.
- ``run_config.json``: the resolved config the run was started with. A later launch of the same
  run must agree on every key that changes the training (:func:`training_differences`); anything
  else (tracking, launcher, paths, evaluation, threads, fault injection, ...) may change. Every
  checkpoint's trainer state keeps the config too (``"config"``), so a folder without this record
  (written before it existed, or deleted, as the corrupt-record error allows) is checked against its
  newest checkpoint's (:func:`check_trainer_state`); a folder whose checkpoints predate that as well is
  checked by the job against its MLflow run's params (:func:`check_mlflow_params`), before it trains.
- ``mlflow_run.json``: the MLflow run the job logs to (``run_id``, ``tracking_uri``), written
  atomically; a relaunch continues that run, found by its id.

:func:`check_relaunch` is what the driver calls for every job before anything starts; the job
calls it again once it owns the folder, before it touches MLflow. Nothing here imports torch or
MLflow.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from polypythia.config.jobconfig import JobConfig, to_dict
from polypythia.errors import ConfigError
from polypythia.files import FileLock, describe_owner, is_locked, read_json, write_json_atomic

LOCK_FILE = "run.lock"
CONFIG_RECORD = "run_config.json"
MLFLOW_RECORD = "mlflow_run.json"

# Keys that do not change what a run trains: where and how it runs, what it evaluates and logs
# besides training, and how its steps are computed (the same sums, in other pieces or kernels).
# A key is exempt if it equals one of these or lies under one ending in ".".
# fmt: off
FREE_KEYS = (  # one line per section of the config
    "tracking.", "launcher.", "home", "runs_dir", "data.cache_dir",
    "seed", "weight_seed", "data_seed", "replicate",
    "budget.name", "budget.micro_batch_size", "budget.checkpoint_every_steps", "budget.log_spaced_checkpoints",
    "train.threads", "train.peak_tflops", "train.compile", "train.activation_checkpointing", "train.attn_implementation",
    "train.loss_ceiling", "train.loss_ceiling_steps",
    "train.eval_every_checkpoint", "train.evaluate_after_training", "train.eval_limit_items", "train.keep_resume_states",
    "train.fault.",
    "monitor.action", "monitor.skip_batches", "monitor.max_rewinds",  # what the driver does; rewinds.json keeps it
)
# fmt: on
BY_FILE_NAME = ("data.path", "data.tokenizer")  # the same dataset may move: compared by file name only
SHOWN_DIFFERENCES = 4
_STEP_DIR = re.compile(r"^step(\d+)$")


class RunFolderError(ConfigError):
    """A run's folder belongs to another configuration or holds an unreadable record."""


class RunInUseError(RunFolderError):
    """Another job owns the run's folder right now."""


# ----------------------------------------------------------------------------- ownership

_held: dict[str, list] = {}  # resolved run folder -> [FileLock, how many claims of this process]


class Claim:
    """This process's ownership of a run folder; :meth:`release` (or ``with``) gives it up."""

    def __init__(self, key: str):
        self.key = key
        self._released = False

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        entry = _held[self.key]
        entry[1] -= 1
        if entry[1] == 0:
            entry[0].release()
            del _held[self.key]

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _key(run_dir: str | Path) -> str:
    return str(Path(run_dir).resolve())


def claim(run_dir: str | Path) -> Claim:
    """Own ``run_dir`` (created if need be) until the claim is released or this process ends;
    :class:`RunInUseError` if another process owns it. Claims nest within one process."""
    key = _key(run_dir)
    if key in _held:
        _held[key][1] += 1
        return Claim(key)
    lock = FileLock(Path(run_dir) / LOCK_FILE)
    if not lock.try_acquire():
        raise _in_use(run_dir)
    _held[key] = [lock, 1]
    return Claim(key)


def _in_use(run_dir: str | Path) -> RunInUseError:
    return RunInUseError(
        f"Run folder {run_dir} is in use by another job ({describe_owner(Path(run_dir) / LOCK_FILE)}); wait for "
        "that job to end (or stop it) before launching this run again, or give this launch another study=."
    )


def check_not_in_use(run_dir: str | Path) -> None:
    """:class:`RunInUseError` if another process owns ``run_dir`` now (nothing is created or held)."""
    if _key(run_dir) not in _held and is_locked(Path(run_dir) / LOCK_FILE):
        raise _in_use(run_dir)


# ----------------------------------------------------------------------------- the config a run was started with


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _is_free(key: str) -> bool:
    return any(key == free or (free.endswith(".") and key.startswith(free)) for free in FREE_KEYS)


def training_config(config: dict[str, Any]) -> dict[str, Any]:
    """The keys of a resolved config (:func:`polypythia.config.jobconfig.to_dict`) that decide what a run
    trains, flat (``section.key``); dataset paths by file name only."""
    flat = {k: v for k, v in _flat(config).items() if not _is_free(k)}
    for key in BY_FILE_NAME:
        if flat.get(key):
            flat[key] = os.path.basename(str(flat[key]))
    return flat


def training_differences(saved: dict[str, Any], config: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, saved value, new value) for each training key set in both configs that differs
    (a key one of them lacks, from an older or newer version of polypythia, is not compared)."""
    old, new = training_config(saved), training_config(config)
    return [(k, old[k], new[k]) for k in sorted(old.keys() & new.keys()) if old[k] != new[k]]


def record_config(cfg: JobConfig) -> None:
    """Keep ``cfg`` as the config the run in ``cfg.run_dir`` trains with."""
    write_json_atomic(Path(cfg.run_dir) / CONFIG_RECORD, to_dict(cfg))


def saved_config(run_dir: str | Path) -> dict[str, Any] | None:
    """The config recorded in ``run_dir``, or None if none was."""
    path = Path(run_dir) / CONFIG_RECORD
    if not path.is_file():
        return None
    saved = read_json(
        path,
        RunFolderError,
        "the config the run was started with",
        f"delete it if you are sure this launch's config matches the run's (or delete {run_dir} "
        "to start the run afresh)",
    )
    if not isinstance(saved, dict):
        raise RunFolderError(f"{path} should hold the config the run was started with; delete it (or {run_dir}).")
    return saved


def _way_forward(run_dir: str | Path) -> str:
    return (
        f"launch it with the values it was started with, give this configuration another study=, or delete "
        f"{run_dir} to start the run afresh"
    )


def check_config(cfg: JobConfig) -> None:
    """:class:`RunFolderError` naming the differing keys if ``cfg.run_dir`` holds a run started
    with another training config."""
    saved = saved_config(cfg.run_dir)
    if saved is None:
        return
    diffs = training_differences(saved, to_dict(cfg))
    if diffs:
        raise RunFolderError(
            f"Run {cfg.run_dir} was started with another training configuration ({_shown(diffs)}); "
            f"{_way_forward(cfg.run_dir)}."
        )


def _shown(diffs: list[tuple[str, Any, Any]]) -> str:
    """The first :data:`SHOWN_DIFFERENCES` differences, and how many more."""
    shown = ", ".join(f"{k}={new!r} (was {old!r})" for k, old, new in diffs[:SHOWN_DIFFERENCES])
    return shown + (f" and {len(diffs) - SHOWN_DIFFERENCES} more" if len(diffs) > SHOWN_DIFFERENCES else "")


def _checkpoint_files(run_dir: str | Path, name: str) -> list[Path]:
    """The file ``name`` of each of the run's checkpoints that has one, newest first."""
    found = [
        (int(m.group(1)), p / name)
        for p in (Path(run_dir) / "checkpoints").glob("step*")
        if (m := _STEP_DIR.match(p.name)) and (p / name).is_file()
    ]
    return [path for _, path in sorted(found, reverse=True)]


def checkpoint_config(run_dir: str | Path) -> tuple[Path, dict[str, Any] | None] | None:
    """(checkpoint folder, the config its trainer state keeps, or None if it predates keeping one) of
    the run's newest checkpoint with a readable trainer state; None without one."""
    for path in _checkpoint_files(run_dir, "trainer_state.json"):  # the sealed checkpoints
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a corrupt checkpoint is reported, and skipped, when the job resumes
        config = state.get("config") if isinstance(state, dict) else None
        return path.parent, config if isinstance(config, dict) else None
    return None


def _refuse(cfg: JobConfig, diffs: list[tuple[str, Any, Any]], source: str) -> None:
    raise RunFolderError(
        f"Run {cfg.run_dir} has no {CONFIG_RECORD}, and {source} was trained with another "
        f"training configuration ({_shown(diffs)}); {_way_forward(cfg.run_dir)}."
    )


def check_trainer_state(cfg: JobConfig) -> bool:
    """For a run folder without ``run_config.json``: :class:`RunFolderError` naming the differing keys
    (budget and schedule included) if its newest checkpoint was trained with another config. Returns
    whether there was a config to compare with (False: no checkpoint, or one from before trainer states
    kept it; the job then checks its MLflow run's params, :func:`check_mlflow_params`)."""
    found = checkpoint_config(cfg.run_dir)
    if found is None or found[1] is None:
        return False
    folder, saved = found
    diffs = training_differences(saved, to_dict(cfg))
    if diffs:
        _refuse(cfg, diffs, f"its newest checkpoint {folder.name}")
    return True


def check_mlflow_params(cfg: JobConfig, params: dict[str, str], run_id: str) -> None:
    """:class:`RunFolderError` if the MLflow run ``run_id`` that this run continues was started with
    another training config than ``cfg`` (its ``params``: the config it was made with, as strings)."""
    from polypythia.config.jobconfig import flat_params

    diffs = training_differences(params, flat_params(cfg))
    if diffs:
        _refuse(cfg, diffs, f"its MLflow run {run_id} (whose params are the config the run was started with)")


def config_known(cfg: JobConfig) -> bool:
    """Whether the launch checks of ``cfg.run_dir`` had a config to compare with: ``run_config.json``
    or the newest checkpoint's."""
    return saved_config(cfg.run_dir) is not None or check_trainer_state(cfg)


def check_checkpoint(cfg: JobConfig) -> None:
    """:class:`RunFolderError` if the newest checkpoint in ``cfg.run_dir`` holds another network
    than ``cfg.model`` (for runs older than ``run_config.json``, and as a second line of defence)."""
    found = _checkpoint_files(cfg.run_dir, "config.json")
    if not found:
        return
    path = found[0]
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # a corrupt checkpoint is reported, and skipped, when the job resumes
    model = cfg.model
    expected = {
        "num_hidden_layers": ("model.num_layers", model.num_layers),
        "hidden_size": ("model.hidden_size", model.hidden_size),
        "num_attention_heads": ("model.num_heads", model.num_heads),
        "max_position_embeddings": ("model.max_positions", model.max_positions),
    }
    if model.vocab_size:
        expected["vocab_size"] = ("model.vocab_size", model.vocab_size)
    diffs = [
        f"{key}={value} (the checkpoint has {saved[name]})"
        for name, (key, value) in expected.items()
        if name in saved and saved[name] != value
    ]
    if diffs:
        raise RunFolderError(
            f"Checkpoint {path.parent} holds another network than this launch asks for "
            f"({', '.join(diffs)}); {_way_forward(cfg.run_dir)}."
        )


# ----------------------------------------------------------------------------- the MLflow run


def read_mlflow_record(run_dir: str | Path) -> dict[str, str] | None:
    """``{"run_id", "tracking_uri"}`` of the MLflow run recorded in ``run_dir``, or None."""
    path = Path(run_dir) / MLFLOW_RECORD
    if not path.is_file():
        return None
    fix = (
        "delete it to log the run into a new MLflow run, or write the run's id into it as "
        '{"run_id": "<id from the MLflow UI>"}'
    )
    record = read_json(path, RunFolderError, "the id of the run's MLflow run", fix)
    if not isinstance(record, dict) or not isinstance(record.get("run_id"), str) or not record["run_id"]:
        raise RunFolderError(f"{path} should hold the id of the run's MLflow run but has no run_id; {fix}.")
    return record


def write_mlflow_record(run_dir: str | Path, run_id: str, tracking_uri: str) -> None:
    write_json_atomic(Path(run_dir) / MLFLOW_RECORD, {"run_id": run_id, "tracking_uri": tracking_uri})


# ----------------------------------------------------------------------------- before a launch


def check_relaunch(cfg: JobConfig) -> None:
    """Everything a launch can check about the run's folder before anything starts: that no other
    job owns it, that it was started with the same training config (its record, else its newest
    checkpoint's), that its newest checkpoint holds the same network, and that its MLflow record is
    readable. Raises a :class:`ConfigError` (a :class:`RunFolderError`) in one sentence; a folder that
    does not exist yet passes."""
    if not Path(cfg.run_dir).is_dir():
        return
    check_not_in_use(cfg.run_dir)
    check_config(cfg)
    check_checkpoint(cfg)  # the network first: the plainer error when the shape differs too
    if saved_config(cfg.run_dir) is None:
        check_trainer_state(cfg)
    read_mlflow_record(cfg.run_dir)
