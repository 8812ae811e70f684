"""Wall time of a sweep through the launcher against the same runs in a bare loop, and its start-up cost.

1. `python launch.py -m seed=1,...,N model=M budget=demo budget.steps=S` (a subprocess, fresh
   POLYPYTHIA_HOME: cold) against N bare PyTorch runs one after another with all the machine's
   threads (the sweep's jobs share the same cores: launcher.num_cpus_per_job=1, 1 thread each).
2. Time from the subprocess start to the first training step (the first train/loss point's
   timestamp in MLflow), cold and warm (a second launch reusing the MLflow server and data cache).
3. The cold cost broken down, each piece timed separately in this process (or a fresh
   interpreter for imports): MLflow server start, data cache build, `import deepspeed`, ray.init,
   a Ray worker start (a max_calls=1 task's round trip), process group + DeepSpeed engine init.

    python benchmarks/bench_sweep.py [--seeds 2] [--model 14m] [--steps 10]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from common import REPO, bench_home, child_env, job_dict, load_average, machine_description, timed


def launch(home: Path, seeds: list[int], model: str, steps: int, study: str) -> dict:
    """One `launch.py -m` sweep; wall time and seconds from start to each run's first logged step."""
    from polypythia import tracking

    cmd = [sys.executable, str(REPO / "launch.py"), "-m", "seed=" + ",".join(map(str, seeds)), f"model={model}",
           "budget=demo", f"budget.steps={steps}", "launcher.progress=false", f"study={study}"]
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
    return {"wall_s": wall_s, "first_step_s": sorted(firsts)}


def bare_runs(home: Path, seeds: list[int], model: str, steps: int, threads: int) -> float:
    from bench_train_throughput import bare_loop

    from polypythia.config import job_config

    started = time.perf_counter()
    for seed in seeds:
        bare_loop(job_config(job_dict(home, model, steps, threads, seed=seed)), steps)
    return time.perf_counter() - started


def fresh_python(code: str) -> float:
    """Seconds a fresh interpreter takes to run ``code`` (it prints its own timing)."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    return float(out.stdout.strip().splitlines()[-1])


def breakdown(home: Path, model: str, threads: int) -> dict[str, float]:
    import ray

    from polypythia import tracking
    from polypythia.data.embedded import ensure_embedded_dataset

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
        "from polypythia.config import job_config; from polypythia.train import distributed, engine;"
        "from polypythia.train.data import load_training_data; from polypythia.model import build_model, padded_vocab_size;"
        f"cfg = job_config({job_dict(home, model, 10, threads)!r}); engine.set_threads(cfg);"
        "distributed.init_distributed(); d = load_training_data(cfg); m = cfg.model;"
        "model = build_model(m.num_layers, m.hidden_size, m.num_heads, padded_vocab_size(d.tokenizer_vocab_size), 1);"
        "engine.build_engine(cfg, model, 1); print(time.perf_counter() - t)"
    )
    pieces["polypythia + deepspeed imports, process group, data, model, DeepSpeed engine (after import torch)"] = fresh_python(code)
    return pieces


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--seeds", type=int, default=2, help="seeds in the sweep (default 2)")
    parser.add_argument("--model", default="14m", help="conf/model name (default 14m)")
    parser.add_argument("--steps", type=int, default=10, help="steps per run (budget=demo otherwise: 8 x 128 tokens)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of each bare run (default nproc)")
    parser.add_argument("--home", help="folder to write into (default: a fresh temporary one, removed at the end)")
    args = parser.parse_args()

    with bench_home("bench_sweep_", args.home) as home:
        print(machine_description())
        seeds = list(range(1, args.seeds + 1))
        cold = launch(home, seeds, args.model, args.steps, "cold")
        print(f"cold sweep ({args.seeds} x {args.model}, {args.steps} steps): wall {cold['wall_s']:.1f} s, first training "
              f"step after {', '.join(f'{s:.1f}' for s in cold['first_step_s'])} s ({load_average()})", flush=True)
        warm = launch(home, [s + 100 for s in seeds], args.model, args.steps, "warm")
        print(f"warm sweep (server and data cache reused): wall {warm['wall_s']:.1f} s, first training step after "
              f"{', '.join(f'{s:.1f}' for s in warm['first_step_s'])} s ({load_average()})", flush=True)
        bare_s = bare_runs(home, seeds, args.model, args.steps, args.threads)
        print(f"{args.seeds} bare runs one after another ({args.threads} threads each, cache built): {bare_s:.1f} s ({load_average()})")
        print(f"ratio sweep wall / bare wall: cold {cold['wall_s'] / bare_s:.2f}, warm {warm['wall_s'] / bare_s:.2f}")
        print("\ncold start-up pieces, timed separately:")
        for label, seconds in breakdown(home, args.model, args.threads).items():
            print(f"  {seconds:6.1f} s  {label}")
    print(machine_description())


if __name__ == "__main__":
    main()
