"""How much a local MLflow server takes in, whether it keeps every point, and what logging costs a step;
on SQLite, or on PostgreSQL (a lab's shared server), or both side by side (--backend).

1. Ten writer processes, each a polypythia.tracking.client.MetricsLogger on its own run, log K steps x 4
   metrics as fast as they can into one server: points/s ingested, then every point read back
   (points sent vs stored, exact duplicates, missing (key, step) pairs).
2. The logging overhead: a bare tiny-model training loop with and without a MetricsLogger logging
   the 4 train/* metrics every step (rounds interleaved), and the time spent inside log() per step.
3. Reading 50 runs' full train/loss curves (50 x --read-steps points) back with get_metric_history.

    python benchmarks/bench_tracking.py [--writers 10] [--steps 2000] [--read-runs 50] [--read-steps 2000]
    python benchmarks/bench_tracking.py --backend both --writers-only     # PostgreSQL and SQLite side by side
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

from common import REPO, bench_home, job_dict, load_average, machine_description, median

KEYS = ["train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s"]


def writer(uri: str, run_id: str, steps: int, barrier) -> tuple[int, float, float]:
    """One process: log steps x 4 metrics through a MetricsLogger; (points, seconds in log(), seconds to close)."""
    from polypythia.tracking import client as tracking

    logger = tracking.MetricsLogger(uri, run_id, flush_interval_s=2.0)
    barrier.wait()
    in_log = 0.0
    for step in range(1, steps + 1):
        started = time.perf_counter()
        logger.log(step, {k: step * 1e-3 + i for i, k in enumerate(KEYS)})
        in_log += time.perf_counter() - started
    started = time.perf_counter()
    logger.close()
    return steps * len(KEYS), in_log, time.perf_counter() - started


def concurrent_writers(uri: str, n_writers: int, steps: int, label: str = "") -> float:
    from polypythia.tracking import client as tracking

    client = tracking.client(uri)
    exp = tracking.experiment_id(client, "bench-writers")
    run_ids = [client.create_run(exp, run_name=f"writer{i}").info.run_id for i in range(n_writers)]
    ctx = mp.get_context("spawn")
    barrier = ctx.Manager().Barrier(n_writers + 1)
    with ctx.Pool(n_writers) as pool:
        results = [pool.apply_async(writer, (uri, r, steps, barrier)) for r in run_ids]
        barrier.wait()
        started = time.perf_counter()
        outs = [r.get() for r in results]
        elapsed = time.perf_counter() - started
    sent = sum(o[0] for o in outs)
    print(
        f"\n1. {label}{n_writers} concurrent writers x {steps} steps x {len(KEYS)} metrics = {sent:,} points: "
        f"{elapsed:.1f} s from first log() to last close(), {sent / elapsed:,.0f} points/s ingested ({load_average()})"
    )
    print(
        f"   time inside log(): {median([o[1] / steps * 1e6 for o in outs]):.1f} us per step of 4 metrics (median writer); "
        f"close() waited {median([o[2] for o in outs]):.1f} s (median)"
    )
    stored = duplicates = missing = 0
    for run_id in run_ids:
        for key in KEYS:
            history = client.get_metric_history(run_id, key)
            stored += len(history)
            counts = Counter((m.step, m.value, m.timestamp) for m in history)
            duplicates += sum(n - 1 for n in counts.values() if n > 1)
            missing += len(set(range(1, steps + 1)) - {m.step for m in history})
    print(f"   sent {sent:,}, stored {stored:,}, exact duplicates {duplicates}, missing (key, step) pairs {missing}")
    return sent / elapsed


def start_backend(home: Path, backend: str, postgres_uri: str | None, stack) -> str:
    """An MLflow server (SQLite, or PostgreSQL: ``postgres_uri`` or a throwaway server) under ``home``."""
    from polypythia.tracking import client as tracking

    started = time.perf_counter()
    if backend == "sqlite":
        uri = tracking.start_server(home / "mlflow", port=0)
    else:
        if not postgres_uri:
            sys.path.insert(0, str(REPO / "scripts"))
            from pg_throwaway import throwaway_postgres

            postgres_uri = stack.enter_context(throwaway_postgres())
        uri = tracking.start_server(
            home / "mlflow-pg", port=0, backend_store_uri=postgres_uri, artifacts_destination=str(home / "artifacts-pg")
        )
    print(f"MLflow server ({backend}, 2 workers) up in {time.perf_counter() - started:.1f} s at {uri}")
    return uri


def logging_overhead(home: Path, uri: str, steps: int, rounds: int, threads: int) -> None:
    """Bare tiny-model loop with and without per-step logging, interleaved."""
    from bench_train_throughput import bare_loop

    from polypythia.config.jobconfig import job_config
    from polypythia.data.embedded import ensure_embedded_dataset
    from polypythia.tracking import client as tracking

    ensure_embedded_dataset(home / "cache", 8192)
    cfg = job_config(job_dict(home, "tiny", steps, threads, checkpoints=False))
    client = tracking.client(uri)
    exp = tracking.experiment_id(client, "bench-overhead")
    plain, logged, in_log = [], [], []
    for rnd in range(rounds):
        for variant in ("plain", "logged") if rnd % 2 == 0 else ("logged", "plain"):
            if variant == "plain":
                plain += bare_loop(cfg, steps)[3:]
                continue
            logger = tracking.MetricsLogger(uri, client.create_run(exp).info.run_id, flush_interval_s=2.0)

            def log(step: int, logger: tracking.MetricsLogger = logger) -> None:
                started = time.perf_counter()
                logger.log(step, {k: 1.0 for k in KEYS})
                in_log.append(time.perf_counter() - started)

            logged += bare_loop(cfg, steps, after_step=log)[3:]
            logger.close()
    p, l_ = median(plain), median(logged)
    print(
        f"\n2. tiny model (2 layers x 64, 8 x 128 tokens/step, {threads} threads), {rounds} interleaved rounds of {steps} steps:"
    )
    print(
        f"   median step {p * 1000:.1f} ms without logging, {l_ * 1000:.1f} ms with a MetricsLogger "
        f"(ratio {l_ / p:.3f}); inside log(): {median(in_log) * 1e6:.1f} us/step = {median(in_log) / p * 100:.3f}% of a step"
    )


def read_back(uri: str, n_runs: int, steps: int) -> None:
    from mlflow.entities import Metric

    from polypythia.tracking import client as tracking

    client = tracking.client(uri)
    exp = tracking.experiment_id(client, "bench-read")
    run_ids = []
    started = time.perf_counter()
    for i in range(n_runs):
        run_id = client.create_run(exp, run_name=f"read{i}").info.run_id
        points = [Metric("train/loss", 10.0 / (1 + s), 1_700_000_000_000 + s, s) for s in range(1, steps + 1)]
        for j in range(0, len(points), 1000):
            client.log_batch(run_id, metrics=points[j : j + 1000], synchronous=True)
        run_ids.append(run_id)
    write_s = time.perf_counter() - started
    started = time.perf_counter()
    total = sum(len(client.get_metric_history(r, "train/loss")) for r in run_ids)
    serial_s = time.perf_counter() - started
    started = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        total_par = sum(pool.map(lambda r: len(client.get_metric_history(r, "train/loss")), run_ids))
    parallel_s = time.perf_counter() - started
    print(
        f"\n3. {n_runs} runs x {steps:,} steps of train/loss = {total:,} points (written in {write_s:.1f} s): "
        f"read back in {serial_s:.2f} s one run after another, {parallel_s:.2f} s with 8 threads "
        f"({total_par:,} points); {total / serial_s:,.0f} points/s serial"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--writers", type=int, default=10)
    parser.add_argument("--steps", type=int, default=2000, help="steps per writer (4 metrics each; default 2000)")
    parser.add_argument("--read-runs", type=int, default=50)
    parser.add_argument("--read-steps", type=int, default=2000)
    parser.add_argument("--overhead-steps", type=int, default=30, help="steps per round of the overhead loop")
    parser.add_argument("--overhead-rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--home", help="folder to write into (default: a fresh temporary one, removed at the end)")
    parser.add_argument(
        "--backend",
        choices=["sqlite", "postgresql", "both"],
        default="sqlite",
        help="the server's database: SQLite in its folder, PostgreSQL (--postgres-uri, else a throwaway "
        "server from scripts/pg_throwaway.py), or both side by side (default: sqlite)",
    )
    parser.add_argument(
        "--postgres-uri", help="postgresql://user:password@host:port/database to use (its runs stay there)"
    )
    parser.add_argument("--writers-only", action="store_true", help="only the concurrent writers (section 1)")
    args = parser.parse_args()

    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    with bench_home("bench_tracking_", args.home) as home, ExitStack() as stack:
        os.environ["POLYPYTHIA_HOME"] = str(home)
        print(machine_description())
        rates = {}
        for backend in backends:  # one after the other, each with the machine to itself
            uri = start_backend(home, backend, args.postgres_uri, stack)
            rates[backend] = concurrent_writers(uri, args.writers, args.steps, label=f"{backend}: ")
        if len(rates) == 2:
            print(f"\n   points/s postgresql/sqlite: {rates['postgresql'] / rates['sqlite']:.2f}")
        if not args.writers_only:
            logging_overhead(home, uri, args.overhead_steps, args.overhead_rounds, args.threads)
            read_back(uri, args.read_runs, args.read_steps)
        for server_dir in home.glob("mlflow*"):  # before the PostgreSQL server they may be using stops
            from polypythia.tracking import client as tracking

            tracking.stop_server(server_dir)
    print(machine_description())


if __name__ == "__main__":
    main()
