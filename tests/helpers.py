"""Helpers shared by the top-level tests (kept out of conftest.py, whose module name is not unique)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def tiny_job(tmp_path: Path, cache_dir: Path, **overrides):
    """A validated tiny/smoke JobConfig writing under ``tmp_path``."""
    from polypythia.config import job_config

    raw = {
        "model": {"name": "tiny", "num_layers": 2, "hidden_size": 64, "num_heads": 4, "lr": 1e-3},
        "budget": {"name": "smoke", "steps": 6, "global_batch_size": 4, "micro_batch_size": 2,
                   "seq_length": 32, "checkpoint_every_steps": 3},
        "data": {"cache_dir": str(cache_dir)},
        "home": str(tmp_path),
        "runs_dir": str(tmp_path / "runs"),
        "tracking": {"dir": str(tmp_path / "mlflow")},
    }
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return job_config(raw)


def train_here(cfg, callbacks=()):
    """Train ``cfg`` in this process, then leave its process group, so the next test can start one."""
    from polypythia.job import teardown
    from polypythia.train.loop import train

    try:
        return train(cfg, callbacks)
    finally:
        teardown()


class FakeMlflow:
    """An MLflow client stand-in for unit tests: records what is sent to a run."""

    def __init__(self):
        self.points, self.tags = [], {}

    def log_batch(self, run_id, metrics, synchronous=True):
        self.points.extend((m.key, m.step) for m in metrics)

    def set_tag(self, run_id, key, value):
        self.tags[key] = value
