"""Helpers shared by the tests in every folder (kept out of conftest.py, whose module name is not unique):
tiny jobs, launching ``launch.py``, reading a study's runs back, watching listening sockets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def tiny_job(tmp_path: Path, cache_dir: Path, **overrides):
    """A validated tiny/smoke JobConfig writing under ``tmp_path``."""
    from polypythia.config.jobconfig import job_config

    return job_config(_smoke_dict(tmp_path, cache_dir, overrides))


def _smoke_dict(tmp_path: Path, cache_dir: Path, overrides: dict, **tracking) -> dict:
    """The tiny model on the smoke budget, writing under ``tmp_path``; ``a__b=v`` in ``overrides`` sets ``a.b``."""
    raw = {
        "model": {"name": "tiny", "num_layers": 2, "hidden_size": 64, "num_heads": 4, "lr": 1e-3},
        "budget": {
            "name": "smoke",
            "steps": 6,
            "global_batch_size": 4,
            "micro_batch_size": 2,
            "seq_length": 32,
            "checkpoint_every_steps": 3,
        },
        "data": {"cache_dir": str(cache_dir)},
        "home": str(tmp_path),
        "runs_dir": str(tmp_path / "runs"),
        "tracking": {"dir": str(tmp_path / "mlflow"), **tracking},
    }
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return raw


def write_small_pair(folder: Path, repeats: int, copies: int):
    """A byte-level BPE tokenizer of 300 tokens (``folder/tokenizer.json``) and a .bin/.idx pair of its
    ids (``folder/d``) made from two pangrams; returns the tokenizer."""
    import numpy as np

    from polypythia.data.embedded import EOD_TOKEN, train_tokenizer
    from polypythia.data.indexed import write_indexed_dataset

    texts = [
        "the quick brown fox jumps over the lazy dog " * repeats,
        "pack my box with five dozen liquor jugs " * repeats,
    ] * copies
    tokenizer = train_tokenizer(texts, 300)
    tokenizer.save(str(folder / "tokenizer.json"))
    eod = tokenizer.token_to_id(EOD_TOKEN)
    docs = [np.asarray(e.ids + [eod], dtype=np.uint16) for e in tokenizer.encode_batch(texts)]
    write_indexed_dataset(folder / "d", docs, np.uint16)
    return tokenizer


def record_attention_logit_maxima(monkeypatch) -> list[float]:
    """The largest causal attention logit of every eager attention call from now on, computed from
    the query and key that transformers' GPT-NeoX attention hands its kernel (an independent check
    of the stability monitor's probe); the list fills as the model runs."""
    import torch
    from transformers.models.gpt_neox import modeling_gpt_neox

    seen: list[float] = []
    eager = modeling_gpt_neox.eager_attention_forward

    def recording(module, query, key, value, attention_mask, scaling, **kwargs):
        logits = torch.matmul(query, key.transpose(2, 3)) * scaling
        future = torch.ones(logits.shape[-2:], dtype=torch.bool).triu(1)
        seen.append(float(logits.masked_fill(future, float("-inf")).amax()))
        return eager(module, query, key, value, attention_mask, scaling, **kwargs)

    monkeypatch.setattr(modeling_gpt_neox, "eager_attention_forward", recording)
    return seen


def on_two_ranks(target, *args, timeout_s: float = 300) -> list:
    """Run ``target(rank, port, *args, queue)`` in two spawned processes (ranks 0 and 1 of a gloo group
    on a free loopback port); returns what they put on the queue, one item each."""
    import torch.multiprocessing as mp

    from polypythia.net import free_port

    ctx = mp.get_context("spawn")
    queue, port = ctx.SimpleQueue(), free_port()
    procs = [ctx.Process(target=target, args=(rank, port, *args, queue)) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout_s)
        assert p.exitcode == 0
    return [queue.get() for _ in range(2)]


def train_here(cfg, callbacks=()):
    """Train ``cfg`` in this process, then leave its process group, so the next test can start one."""
    from polypythia.job.run import teardown
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


class ListenerWatch:
    """Every listening TCP socket of process ``pid`` and its descendants, sampled in a thread while it
    runs (``with ListenerWatch(pid) as watch``): ``watch.seen`` maps (address, command line) to ports."""

    def __init__(self, pid: int, every_s: float = 0.3):
        import threading

        self.pid, self.every_s = pid, every_s
        self.seen: dict[tuple[str, str], set[int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> "ListenerWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        import psutil

        while not self._stop.wait(self.every_s):
            try:
                root = psutil.Process(self.pid)
                processes = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
            for proc in processes:
                try:
                    command = " ".join(proc.cmdline())
                    for conn in proc.net_connections(kind="inet"):
                        if conn.status == psutil.CONN_LISTEN:
                            self.seen.setdefault((conn.laddr.ip, command), set()).add(conn.laddr.port)
                except psutil.Error:
                    continue


def beyond_loopback(seen: dict[tuple[str, str], set[int]]) -> list[tuple[str, str]]:
    """(address, command) of each listener in ``seen`` (:attr:`ListenerWatch.seen`) on an address other
    than loopback (a dual-stack socket shows 127.0.0.1 as ::ffff:127.0.0.1)."""
    import ipaddress

    return [(ip, command) for ip, command in seen if not ipaddress.ip_address(ip.removeprefix("::ffff:")).is_loopback]


def job(tmp_path: Path, **overrides) -> dict:
    """A tiny/smoke job's config dict writing under ``tmp_path``; ``a__b=v`` sets ``a.b``."""
    return _smoke_dict(tmp_path, tmp_path / "cache", overrides, uri=None)


def indexed(folder: Path) -> dict:
    return {"data__kind": "indexed", "data__path": str(folder / "d"), "data__tokenizer": str(folder / "tokenizer.json")}


def launch(tmp_path, *overrides, uri=None, timeout=600, env_extra=None, listeners=None):
    """``launch.py overrides``; with ``listeners`` (a dict), the listening sockets of its processes are
    sampled while it runs into it (:attr:`ListenerWatch.seen`)."""
    from polypythia.train.distributed import RENDEZVOUS_ENV

    env = {**os.environ, "POLYPYTHIA_HOME": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    for key in RENDEZVOUS_ENV:  # set by in-process tests
        env.pop(key, None)
    if uri:
        env["MLFLOW_TRACKING_URI"] = uri
    env.update(env_extra or {})
    command = [sys.executable, "launch.py", *overrides]
    if listeners is None:
        return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    with subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        with ListenerWatch(proc.pid) as watch:
            try:
                stdout, stderr = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
        listeners.update(watch.seen)
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def child_runs(client, study):
    exp = client.get_experiment_by_name(study)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("polypythia.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("polypythia.kind") == "job"]
    return parents, children
