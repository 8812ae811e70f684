"""Tokens/s of a polypythia training job against a bare PyTorch loop training the same model.

Side by side in one process, repetitions interleaved (the order rotates each round) so machine
noise hits every variant alike, all on the same torch thread count and the same batches:

  bare         build_model + torch.optim.AdamW (same groups, betas, eps, weight decay, clipping,
               LR schedule) on load_training_data(cfg).batch(step)
  deepspeed    polypythia.train.loop.train(cfg), no callbacks, checkpoints only at 0 and the end
  +logging     polypythia.job.run.run(cfg) against a local MLflow server, same checkpoints
  +checkpoints polypythia.job.run.run(cfg) with the normal schedule (log-spaced 1, 2, 4, ... and every
               50 steps, each with its validation/weight-statistics evaluation)
  bare+alloc   the bare loop in a child process started with the glibc allocator settings every
               Ray worker of a sweep gets (polypythia.runtime.env.ALLOCATOR_ENV): launched/bare+alloc
               is the framework's overhead alone, launched/bare what a job gains or loses against a
               plain loop run with the system's defaults
  launched     `python launch.py -m seed=1 model=M budget=demo budget.steps=N ...` (Ray task,
               Hydra, everything), read back from the MLflow run (once per model, after the rounds)

Step time is the interval between consecutive ends of optimizer steps (so a checkpoint written
after step k is charged to step k+1); the first --warmup steps of every run are dropped. Figures:
median step time and mean step time (the mean includes checkpoint stalls), as tokens/s and as
ratios to the bare loop. The target in the issue is launched/bare >= 0.95.

    python benchmarks/bench_train_throughput.py --models 14m,70m --steps 20 --repeats 2
    python benchmarks/bench_train_throughput.py --models 14m --profile   # where a step's time goes
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import REPO, StepTimer, bench_home, child_env, job_dict, load_average, machine_description, mean, median

VARIANTS = ("bare", "bare+alloc", "deepspeed", "+logging", "+checkpoints")


def bare_loop(cfg, steps: int, after_step=None) -> list[float]:
    """The same model, optimizer recipe and batches, in plain PyTorch; returns step seconds."""
    import torch

    from polypythia.model import build_model, padded_vocab_size
    from polypythia.train.data import load_training_data
    from polypythia.train.engine import param_groups
    from polypythia.train.schedule import lr_at

    torch.set_num_threads(cfg.train.threads)
    data = load_training_data(cfg)
    m, b, t = cfg.model, cfg.budget, cfg.train
    model = build_model(
        m.num_layers,
        m.hidden_size,
        m.num_heads,
        padded_vocab_size(data.tokenizer_vocab_size),
        cfg.effective_weight_seed,
        m.max_positions,
        t.attn_implementation,
    )
    model.train()
    optimizer = torch.optim.AdamW(
        param_groups(model, t.weight_decay), lr=m.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_at(s, b.steps, m.lr, b.warmup_fraction, b.min_lr_ratio) / m.lr
    )
    n_micro = b.global_batch_size // b.micro_batch_size
    seconds = []
    for step in range(steps):
        started = time.perf_counter()
        rows = data.batch(step)
        total = 0.0
        for i in range(0, len(rows), b.micro_batch_size):
            batch = torch.from_numpy(rows[i : i + b.micro_batch_size])
            logits = model(input_ids=batch[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
            (loss / n_micro).backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.gradient_clipping)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:  # e.g. a metrics logger, to measure what it costs a step
            after_step(step + 1)
        seconds.append(time.perf_counter() - started)
    return seconds


def run_variant(variant: str, home: Path, model: str, args, uri: str, tag: str) -> list[float]:
    from polypythia.config.jobconfig import job_config
    from polypythia.job import run as job
    from polypythia.train import loop

    run_home = home / f"runs-{tag}"  # a fresh run folder: a job never resumes another's checkpoints
    raw = job_dict(
        home,
        model,
        args.steps,
        args.threads,
        cache_dir=home / "cache",
        checkpoints=(variant == "+checkpoints"),
        study=f"bench-{tag}",
    )
    raw["runs_dir"] = str(run_home)
    cfg = job_config(raw)
    timer = StepTimer()
    try:
        if variant == "bare+alloc":
            return bare_in_child(raw, home)
        if variant == "bare":
            return bare_loop(cfg, args.steps)
        if variant == "deepspeed":
            loop.train(cfg, [timer])
        else:
            real_train = job.train
            job.train = lambda c, callbacks: real_train(c, [*callbacks, timer])  # timer last: sees all callbacks' cost
            try:
                job.run(cfg, tracking_uri=uri)
            finally:
                job.train = real_train
        return timer.step_seconds()
    finally:
        job.teardown()
        shutil.rmtree(run_home, ignore_errors=True)


def bare_in_child(raw: dict, home: Path) -> list[float]:
    """The bare loop in a fresh process whose environment has the Ray workers' allocator settings."""
    from polypythia.runtime.env import allocator_env

    env = {**child_env(home), **allocator_env()}  # what ray_env_vars() gives the workers (a caller's own, if set)
    proc = subprocess.run(
        [sys.executable, __file__, "--bare-child", json.dumps(raw)], env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the bare+alloc child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def launched(home: Path, model: str, args, uri: str) -> dict:
    """One job through launch.py -m (Hydra + Ray + job.run); step times read back from MLflow."""
    from polypythia.tracking import client as tracking

    study = f"launched-{model}"
    cmd = [
        sys.executable,
        str(REPO / "launch.py"),
        "-m",
        "seed=1",
        f"model={model}",
        "budget=demo",
        f"budget.steps={args.steps}",
        f"train.threads={args.threads}",
        f"launcher.num_cpus_per_job={args.threads}",
        "launcher.progress=false",
        f"data.cache_dir={home / 'cache'}",
        f"study={study}",
    ]
    env = child_env(home)
    started = time.time()
    proc = subprocess.run(cmd, cwd=home, env=env, capture_output=True, text=True)
    wall_s = time.time() - started
    if proc.returncode != 0:
        raise RuntimeError(f"launch.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    client = tracking.client(uri)
    exp = client.get_experiment_by_name(study)
    runs = client.search_runs([exp.experiment_id], "tags.`polypythia.kind` = 'job'")
    run_id = runs[0].info.run_id
    tps = sorted(client.get_metric_history(run_id, "train/tokens_per_s"), key=lambda m: m.step)
    loss = sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.step)
    tokens_per_step = 8 * 128
    in_loop = [tokens_per_step / p.value for p in tps[args.warmup :]]
    stamps = [p.timestamp / 1000 for p in loss]
    intervals = [b - a for a, b in zip(stamps, stamps[1:])][max(args.warmup - 1, 0) :]
    return {
        "in_loop": in_loop,
        "intervals": intervals,
        "wall_s": wall_s,
        "first_step_after_s": stamps[0] - started if stamps else float("nan"),
    }


def profile_deepspeed(home: Path, model: str, args) -> None:
    """cProfile of train() (no callbacks) next to the bare loop: the functions where time differs."""
    from polypythia.config.jobconfig import job_config
    from polypythia.job import run as job
    from polypythia.train import loop

    for variant in ("bare", "deepspeed"):
        raw = job_dict(
            home,
            model,
            args.steps,
            args.threads,
            cache_dir=home / "cache",
            checkpoints=False,
            study=f"profile-{variant}",
        )
        raw["runs_dir"] = str(home / "runs-profile")
        cfg = job_config(raw)
        profiler = cProfile.Profile()
        profiler.enable()
        if variant == "bare":
            bare_loop(cfg, args.steps)
        else:
            loop.train(cfg, [])
        profiler.disable()
        job.teardown()
        shutil.rmtree(home / "runs-profile", ignore_errors=True)
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out)
        stats.sort_stats("tottime").print_stats(18)
        print(f"\n--- cProfile {model} {variant}: {args.steps} steps (divide by {args.steps} for per-step) ---")
        print("\n".join(out.getvalue().splitlines()[:45]))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--models", default="14m,70m", help="comma-separated conf/model names (default 14m,70m)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per run (default 20)")
    parser.add_argument("--warmup", type=int, default=4, help="first steps of each run left out (default 4)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds of every variant (default 2)")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="torch threads for every variant (default: nproc)"
    )
    parser.add_argument("--no-launch", action="store_true", help="skip the launch.py (Ray + Hydra) variant")
    parser.add_argument("--profile", action="store_true", help="only print a cProfile of bare vs train() per model")
    parser.add_argument("--home", help="folder to write into (default: a fresh temporary one, removed at the end)")
    parser.add_argument("--bare-child", help=argparse.SUPPRESS)  # internal: one bare loop for the bare+alloc variant
    args = parser.parse_args()
    if args.bare_child:
        from polypythia.config.jobconfig import job_config

        raw = json.loads(args.bare_child)
        print(json.dumps(bare_loop(job_config(raw), raw["budget"]["steps"])))
        return

    import torch

    from polypythia.data.embedded import ensure_embedded_dataset
    from polypythia.runtime import env as runtime_env
    from polypythia.tracking import client as tracking

    torch.set_num_threads(args.threads)
    runtime_env.quiet_libraries()
    with bench_home("bench_train_", args.home) as home:
        os.environ["POLYPYTHIA_HOME"] = str(home)
        print(machine_description())
        print(
            f"budget: seq_length 128, global batch 8 = micro batch 8 ({8 * 128} tokens/step), {args.steps} steps, "
            f"first {args.warmup} dropped, {args.repeats} interleaved rounds, {args.threads} torch threads; writing to {home}"
        )
        ensure_embedded_dataset(home / "cache", 8192)
        uri = tracking.start_server(home / "mlflow", port=0)
        models = [m for m in args.models.split(",") if m]
        if args.profile:
            for model in models:
                profile_deepspeed(home, model, args)
            return
        for model in models:
            steps_by_variant: dict[str, list[float]] = {v: [] for v in VARIANTS}
            for rnd in range(args.repeats):
                order = VARIANTS[rnd % len(VARIANTS) :] + VARIANTS[: rnd % len(VARIANTS)]
                for variant in order:
                    seconds = run_variant(variant, home, model, args, uri, f"{model}-{variant.strip('+')}-{rnd}")
                    steps_by_variant[variant] += seconds[args.warmup :]
                    print(
                        f"  {model} round {rnd} {variant:>12}: median step {median(seconds[args.warmup :]) * 1000:7.1f} ms "
                        f"({load_average()})",
                        flush=True,
                    )
            launch = None
            if not args.no_launch:
                launch = launched(home, model, args, uri)
                print(
                    f"  {model} launched: median step {median(launch['intervals']) * 1000:7.1f} ms between logged "
                    f"steps, {median(launch['in_loop']) * 1000:7.1f} ms in-loop; wall {launch['wall_s']:.1f} s ({load_average()})"
                )
            report(model, steps_by_variant, launch)
    print(machine_description())


def report(model: str, steps_by_variant: dict[str, list[float]], launch: dict | None) -> None:
    tokens_per_step = 8 * 128
    bare_med, bare_mean = median(steps_by_variant["bare"]), mean(steps_by_variant["bare"])
    print(f"\n{model}: tokens/s (median step / mean step incl. checkpoint stalls) and ratio to bare")
    rows = [(v, median(s), mean(s), len(s)) for v, s in steps_by_variant.items()]
    if launch:
        rows.append(("launched", median(launch["intervals"]), mean(launch["intervals"]), len(launch["intervals"])))
    for name, med, avg, n in rows:
        print(
            f"  {name:>12}: {tokens_per_step / med:8.0f} tok/s median ({med * 1000:7.1f} ms/step), "
            f"{tokens_per_step / avg:8.0f} tok/s mean   ratio {bare_med / med:5.3f} median, {bare_mean / avg:5.3f} mean  [{n} steps]"
        )
    if launch:
        in_loop = median(launch["in_loop"])
        print(
            f"  launched in-loop train/tokens_per_s (compute only): {tokens_per_step / in_loop:8.0f} tok/s, ratio {bare_med / in_loop:5.3f}"
        )
        alloc_med = median(steps_by_variant["bare+alloc"])
        print(
            f"  launched against bare+alloc (same allocator settings): ratio {alloc_med / median(launch['intervals']):5.3f} "
            f"between logged steps, {alloc_med / in_loop:5.3f} in-loop"
        )
    print(json.dumps({"model": model, **{f"{n}_median_ms": round(med * 1000, 1) for n, med, _, _ in rows}}))


if __name__ == "__main__":
    main()
