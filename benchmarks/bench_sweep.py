"""How long a whole sweep takes against the ideal, where the gap goes, and what start-up costs.

Efficiency (default; ``--demo`` for the README demo's shape): one ``launch.py -m`` sweep through the
real launcher in a fresh POLYPYTHIA_HOME (cold, as ``make demo`` on a new machine), against

    ideal = total training tokens of all jobs / the bare PyTorch loop's tokens/s with all cores

measured in the same run (``bench_train_throughput.bare_loop``, same model, optimizer recipe and
batches, ``nproc`` threads, median step after warm-up). The last line is ``sweep_wall/ideal: X``.
The gap is broken down in core-seconds (cores x sweep wall): per job start-up (its process's start, or its
Ray task's start in a worker process started earlier, to its first step's start), training (the sum of its step times, times the threads each
step ran with, ``train/threads``), checkpoint writing (``train/checkpoint_seconds``), checkpoint
evaluation (the evaluation passes' seconds, ``<run>/evaluation_passes.jsonl``), the launch before
the first job's run exists (driver: Hydra, Ray, MLflow server, data cache), and what is left:
idle cores and anything not counted above.

Start-up (``--startup``): seconds from ``launch.py`` to the first training step, cold and warm, for
one job and for two jobs starting together, and the cold start-up pieces timed one by one.

    python benchmarks/bench_sweep.py                 # 3 x 14m, demo budget: a few minutes
    python benchmarks/bench_sweep.py --demo          # seed=1,2,3 model=70m budget=demo (the README demo)
    python benchmarks/bench_sweep.py --startup [--seeds 2] [--model 14m] [--steps 10]
    python benchmarks/bench_sweep.py --demo train.valid_max_rows=16   # the demo with an override (what it costs)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from common import REPO, bench_home, child_env, job_dict, load_average, machine_description, timed


def launch(home: Path, seeds: list[int], model: str, steps: int | None, study: str, overrides: list[str] = ()) -> dict:
    """One `launch.py -m` sweep; wall time and seconds from start to each run's first logged step.
    ``overrides``: more Hydra overrides, after the shape's own."""
    from polypythia.tracking import client as tracking

    cmd = (
        [
            sys.executable,
            str(REPO / "launch.py"),
            "-m",
            "seed=" + ",".join(map(str, seeds)),
            f"model={model}",
            "budget=demo",
            "launcher.progress=false",
            f"study={study}",
        ]
        + ([f"budget.steps={steps}"] if steps else [])
        + list(overrides)
    )
    env = child_env(home)
    started = time.time()
    proc = subprocess.run(cmd, cwd=home, env=env, capture_output=True, text=True)
    wall_s = time.time() - started
    if proc.returncode != 0:
        raise RuntimeError(f"launch.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    uri = tracking.running_server(home / "mlflow")
    client = tracking.client(uri)
    exp = client.get_experiment_by_name(study)
    firsts = []
    for run in client.search_runs([exp.experiment_id], "tags.`polypythia.kind` = 'job'"):
        history = client.get_metric_history(run.info.run_id, "train/loss")
        firsts.append(min(m.timestamp for m in history) / 1000 - started)
    return {
        "wall_s": wall_s,
        "first_step_s": sorted(firsts),
        "started": started,
        "client": client,
        "experiment_id": exp.experiment_id,
    }


def fresh_python(code: str) -> float:
    """Seconds a fresh interpreter takes to run ``code`` (it prints its own timing)."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    return float(out.stdout.strip().splitlines()[-1])


def breakdown(home: Path, model: str, threads: int) -> dict[str, float]:
    import ray

    from polypythia.data.embedded import ensure_embedded_dataset
    from polypythia.tracking import client as tracking

    pieces: dict[str, float] = {}
    with timed("MLflow server start (fresh SQLite db)", pieces):
        tracking.start_server(home / "mlflow-breakdown", port=0)
    tracking.stop_server(home / "mlflow-breakdown")
    with timed("data cache build (tokenizer + corpus)", pieces):
        ensure_embedded_dataset(home / "cache-breakdown", 8192)
    timer = "import time; t = time.perf_counter(); {}; print(time.perf_counter() - t)"
    pieces["import torch + transformers (fresh interpreter)"] = fresh_python(timer.format("import torch, transformers"))
    pieces["import deepspeed (fresh interpreter, incl. torch)"] = fresh_python(timer.format("import deepspeed"))
    pieces["import ray (fresh interpreter)"] = fresh_python(timer.format("import ray"))
    with timed("ray.init (local)", pieces):
        ray.init(include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:

        @ray.remote(max_calls=1, num_cpus=1)
        def noop() -> int:
            return os.getpid()

        with timed("Ray worker start (max_calls=1 task round trip)", pieces):
            ray.get(noop.remote())
    finally:
        ray.shutdown()
    code = (
        "import time, torch; t = time.perf_counter();"
        "from polypythia.config.jobconfig import job_config; from polypythia.train import distributed, engine, threads;"
        "from polypythia.train.data import load_training_data; from polypythia.model import build_model, padded_vocab_size;"
        f"cfg = job_config({job_dict(home, model, 10, threads)!r}); threads.fix_threads(cfg);"
        "distributed.init_distributed(); d = load_training_data(cfg); m = cfg.model;"
        "model = build_model(m.num_layers, m.hidden_size, m.num_heads, padded_vocab_size(d.tokenizer_vocab_size), 1);"
        "engine.build_engine(cfg, model, 1); print(time.perf_counter() - t)"
    )
    pieces["polypythia + deepspeed imports, process group, data, model, DeepSpeed engine (after import torch)"] = (
        fresh_python(code)
    )
    return pieces


def job_breakdown(client, run, home: Path, study: str) -> dict[str, float]:
    """Core-seconds of one job's start-up, training, checkpoint writing and checkpoint evaluation."""
    import json

    run_id = run.info.run_id
    history = {
        key: sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        for key in ("train/loss", "train/tokens_per_s", "train/threads", "train/checkpoint_seconds")
    }
    tokens = int(run.data.params["budget.global_batch_size"]) * int(run.data.params["budget.seq_length"])
    threads = {m.step: m.value for m in history["train/threads"]}
    step_s = {m.step: tokens / m.value for m in history["train/tokens_per_s"] if m.value > 0}
    first = history["train/loss"][0]
    started = float(run.data.tags.get("process_started", run.info.start_time / 1000))
    task = float(run.data.tags.get("task_started", started))
    if task - started > 2.0:  # a worker process Ray started earlier (pre-started, or one an evaluation task used)
        started = task  # waited idle for this job: its start-up counts from the task's start
    out = {
        "started": started,
        "start-up": max(0.0, first.timestamp / 1000 - step_s.get(first.step, 0.0) - started),
        "training": sum(s * threads.get(step, 1.0) for step, s in step_s.items()),
        "checkpoint writing": sum(m.value for m in history["train/checkpoint_seconds"]),
        "checkpoint evaluation": 0.0,
        "wall_training_s": sum(step_s.values()),
    }
    passes = home / "runs" / study / run.info.run_name / "evaluation_passes.jsonl"
    if passes.exists():
        out["checkpoint evaluation"] = sum(
            json.loads(line)["seconds"] for line in passes.read_text().splitlines() if line
        )
    return out


def bare_tokens_per_s(home: Path, model: str, threads: int, steps: int = 12, warmup: int = 3) -> float:
    """The bare PyTorch loop's tokens/s (median step after ``warmup``) with ``threads`` threads."""
    import statistics

    from bench_train_throughput import bare_loop

    from polypythia.config.jobconfig import job_config

    cfg = job_config(job_dict(home, model, steps, threads, checkpoints=False))  # the demo budget's shapes
    seconds = bare_loop(cfg, steps)[warmup:]
    return cfg.budget.global_batch_size * cfg.budget.seq_length / statistics.median(seconds)


def efficiency(args) -> None:
    """The sweep against the ideal, and the breakdown of the gap (see the module doc)."""
    seeds = list(range(1, args.seeds + 1))
    cores = os.cpu_count() or 1
    with bench_home("bench_sweep_", args.home) as home:
        print(machine_description(), flush=True)
        sweep = launch(home, seeds, args.model, args.steps, "efficiency", args.overrides)
        if args.overrides:
            print(f"overrides: {' '.join(args.overrides)}", flush=True)
        client = sweep["client"]
        runs = [r for r in client.search_runs([sweep["experiment_id"]], "tags.`polypythia.kind` = 'job'")]
        parts = {r.info.run_name: job_breakdown(client, r, home, "efficiency") for r in runs}
        tokens = sum(
            int(r.data.params["budget.steps"])
            * int(r.data.params["budget.global_batch_size"])
            * int(r.data.params["budget.seq_length"])
            for r in runs
        )
        print(f"sweep: {len(runs)} x {args.model}, wall {sweep['wall_s']:.1f} s ({load_average()})", flush=True)
        bare = bare_tokens_per_s(home, args.model, cores)
        ideal = tokens / bare
        print(
            f"bare PyTorch loop, {cores} threads: {bare:,.0f} tokens/s; ideal = {tokens:,} tokens / that = {ideal:.1f} s "
            f"({load_average()})"
        )
        total = cores * sweep["wall_s"]
        first_run = min(p["started"] for p in parts.values()) - sweep["started"]
        rows = {"launch before the first job (Hydra, Ray, MLflow server, data cache; all cores)": cores * first_run}
        for key in ("start-up", "training", "checkpoint writing", "checkpoint evaluation"):
            rows[f"jobs: {key}"] = sum(p[key] for p in parts.values())
        rows["idle cores and the rest"] = total - sum(rows.values())
        print(f"\nwhere the {total:.0f} core-seconds ({cores} cores x {sweep['wall_s']:.1f} s) went:")
        for label, value in rows.items():
            print(f"  {value:8.1f}  {100 * value / total:5.1f}%  {label}")
        print(
            "\nper job (seconds): "
            + "; ".join(
                f"{name}: start-up {p['start-up']:.1f}, training {p['wall_training_s']:.1f} wall, checkpoints "
                f"{p['checkpoint writing']:.1f}, evaluation {p['checkpoint evaluation']:.1f}"
                for name, p in sorted(parts.items())
            )
        )
        print(machine_description())
        print(f"sweep_wall/ideal: {sweep['wall_s'] / ideal:.2f}")


def startup(args) -> None:
    with bench_home("bench_sweep_", args.home) as home:
        print(machine_description())
        seeds = list(range(1, args.seeds + 1))
        steps = args.steps or 10
        cold = launch(home, seeds, args.model, steps, "cold")
        print(
            f"cold sweep ({args.seeds} x {args.model}, {steps} steps): wall {cold['wall_s']:.1f} s, first training "
            f"step after {', '.join(f'{s:.1f}' for s in cold['first_step_s'])} s ({load_average()})",
            flush=True,
        )
        warm = launch(home, [s + 100 for s in seeds], args.model, steps, "warm")
        print(
            f"warm sweep (server and data cache reused): wall {warm['wall_s']:.1f} s, first training step after "
            f"{', '.join(f'{s:.1f}' for s in warm['first_step_s'])} s ({load_average()})",
            flush=True,
        )
        one = launch(home, [200], args.model, steps, "warm-one")
        print(f"warm, one job: first training step after {one['first_step_s'][0]:.1f} s ({load_average()})", flush=True)
        print("\ncold start-up pieces, timed separately:")
        for label, seconds in breakdown(home, args.model, os.cpu_count() or 1).items():
            print(f"  {seconds:6.1f} s  {label}")
    print(machine_description())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--demo", action="store_true", help="the README demo's shape: seed=1,2,3 model=70m budget=demo")
    parser.add_argument(
        "--startup", action="store_true", help="start-up to the first step, cold and warm, and its pieces"
    )
    parser.add_argument("--seeds", type=int, default=3, help="seeds in the sweep (default 3)")
    parser.add_argument("--model", default="14m", help="conf/model name (default 14m)")
    parser.add_argument("--steps", type=int, help="steps per run (default: the demo budget's)")
    parser.add_argument("--home", help="folder to write into (default: a fresh temporary one, removed at the end)")
    parser.add_argument(
        "overrides",
        nargs="*",
        help="more overrides for the sweep (efficiency only), e.g. "
        "budget.log_spaced_checkpoints=false; the ideal stays the runs' training tokens at the bare loop's speed, "
        "and the bare loop keeps the demo budget's batch shape",
    )
    args = parser.parse_args()
    if args.demo:
        args.seeds, args.model, args.steps = 3, "70m", None
    if args.startup and args.overrides:
        parser.error("overrides apply to the efficiency sweep only, not to --startup")
    if args.startup:
        if args.seeds == 3 and not args.demo:
            args.seeds = 2
        startup(args)
    else:
        efficiency(args)


if __name__ == "__main__":
    main()
