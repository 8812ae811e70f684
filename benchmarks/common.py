"""Helpers shared by the benchmark scripts: what machine a figure came from, a timer, job configs.

The training, sweep and tracking benchmarks write under ``bench_home`` (a temporary folder, never the
repository), and every benchmark prints :func:`machine_description` with its figures so a number
always says where it was taken.
"""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(REPO))

# The same small shapes the launcher's demo uses; a step takes well under a second for 14m on 2 cores.
DEFAULT_BUDGET = {"seq_length": 128, "global_batch_size": 8, "micro_batch_size": 8}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_description() -> str:
    """One line: date, CPU, cores, load average, Python, torch and its threads (and GPU if any)."""
    parts = [datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), cpu_model(), f"nproc={os.cpu_count()}"]
    try:
        load = os.getloadavg()
        parts.append("load avg %.2f/%.2f/%.2f" % load)
    except OSError:
        pass
    parts.append(f"Python {platform.python_version()}")
    try:
        import torch

        parts.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
        if torch.cuda.is_available():
            parts.append(torch.cuda.get_device_name(0))
    except ImportError:
        pass
    return "machine: " + ", ".join(parts)


def load_average() -> str:
    try:
        return "load avg %.2f/%.2f/%.2f" % os.getloadavg()
    except OSError:
        return "load avg unknown"


@contextmanager
def timed(label: str, into: dict[str, float]) -> Iterator[None]:
    """Add the seconds the block took to ``into[label]``."""
    started = time.perf_counter()
    try:
        yield
    finally:
        into[label] = into.get(label, 0.0) + time.perf_counter() - started


@contextmanager
def bench_home(prefix: str, keep: str | None = None) -> Iterator[Path]:
    """A fresh folder for everything the benchmark writes (``keep``: use this one instead). On the
    way out every MLflow server started under it (``mlflow*/``) is stopped and, unless kept, the
    folder is removed."""
    if keep:
        path = Path(keep).resolve()
        path.mkdir(parents=True, exist_ok=True)
    else:
        path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        from polypythia.tracking import client as tracking

        for server_dir in path.glob("mlflow*"):
            tracking.stop_server(server_dir)
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


# What an in-process training run leaves in this process's environment (polypythia's rendezvous,
# and DeepSpeed's): a child inheriting MASTER_PORT would try to bind this process's port.
DIST_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "LOCAL_WORLD_SIZE",
    "CROSS_RANK",
    "CROSS_SIZE",
)


def child_env(home: Path) -> dict:
    """This process's environment for a child writing under ``home``, less :data:`DIST_VARS`."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    return {**env, "POLYPYTHIA_HOME": str(home)}


def model_shape(name: str) -> dict:
    """The model section of ``conf/model/<name>.yaml`` as a dict."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml"), resolve=True)


def job_dict(
    home: Path,
    model: str,
    steps: int,
    threads: int | None,
    cache_dir: Path | None = None,
    checkpoints: bool = True,
    seed: int = 1,
    study: str = "bench",
    **budget,
) -> dict:
    """A job config (as a plain dict for :func:`polypythia.config.jobconfig.job_config`) writing under ``home``.

    ``checkpoints=False`` keeps only the checkpoints every run writes (step 0 and the last step).
    """
    budget_cfg = {
        "name": "bench",
        "steps": steps,
        **DEFAULT_BUDGET,
        **budget,
        "checkpoint_every_steps": 50 if checkpoints else steps + 1,
        "log_spaced_checkpoints": checkpoints,
    }
    return {
        "model": model_shape(model),
        "budget": budget_cfg,
        "data": {"cache_dir": str(cache_dir or home / "cache")},
        "train": {"threads": threads},
        "tracking": {"dir": str(home / "mlflow")},
        "launcher": {"progress": False},
        "home": str(home),
        "runs_dir": str(home / "runs"),
        "study": study,
        "seed": seed,
    }


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


from polypythia.train.callbacks import Callback, TrainStart  # noqa: E402  (after the helpers that need no torch)


class StepTimer(Callback):
    """Records when each optimizer step ended; runs after every other callback."""

    priority = -1000

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.started = 0.0

    def on_train_start(self, start: TrainStart) -> None:
        self.started = time.perf_counter()

    def on_step_end(self, step: int, metrics: dict) -> None:
        self.ends.append(time.perf_counter())

    def step_seconds(self) -> list[float]:
        """Seconds of steps 1, 2, ... (the first includes nothing before the loop)."""
        points = [self.started, *self.ends]
        return [b - a for a, b in zip(points, points[1:])]
