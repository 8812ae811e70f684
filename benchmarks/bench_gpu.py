"""Model FLOPs utilisation of a Pythia-shaped training step on one GPU (skipped without one).

For each shape in --models and each setting (bf16 autocast, fp16 autocast + GradScaler, each with
SDPA attention and fused AdamW, and with --compile also torch.compile'd), times --steps optimizer
steps after --warmup and reports tokens/s and MFU:

    flops/step = 6 * N * tokens + 12 * layers * hidden * seq_length * tokens   (PaLM appendix B)
    MFU        = flops/step / step time / (--peak-tflops * 1e12)

N counts every parameter except the input embedding. The default peak is an H100 SXM's dense
bf16/fp16 figure (989 TFLOP/s); pass --peak-tflops for another GPU.

With --job, each shape and precision is also trained through polypythia's own training loop
(``polypythia.train.loop.train``: the DeepSpeed engine as a job builds it, fused AdamW, the default
stability monitor, one NCCL rank) on the embedded corpus with the Pythia vocabulary size, and its
tokens/s is printed next to the plain loop's as a ratio. By default the job trains as the plain loop
does, fp32 weights under autocast (``train.autocast``, ZeRO stage 0, DeepSpeed's loss scaler under
fp16); with --no-autocast it keeps DeepSpeed's fp16/bf16 weights and fp32 master copy at ZeRO stage 1.

    python benchmarks/bench_gpu.py [--models 70m,160m] [--seq-length 2048] [--micro-batch 8] [--compile] [--job]
        [--no-autocast]
"""

from __future__ import annotations

import argparse
import time

from common import StepTimer, bench_home, job_dict, machine_description, median, model_shape

PYTHIA_VOCAB = 50304


def step_flops(model, layers: int, hidden: int, seq: int, tokens: int) -> float:
    """The same count as the training job's ``train/mfu`` (``polypythia.train.step``)."""
    from polypythia.train.step import flops_per_token, matmul_params

    return tokens * flops_per_token(matmul_params(model), layers, hidden, seq)


def measure(name: str, dtype_name: str, compile_model: bool, args) -> dict:
    import torch

    from polypythia.model import build_model

    shape = model_shape(name)
    model = (
        build_model(
            shape["num_layers"], shape["hidden_size"], shape["num_heads"], PYTHIA_VOCAB, 1, attn_implementation="sdpa"
        )
        .cuda()
        .train()
    )
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=shape["lr"], betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=True
    )
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=dtype_name == "fp16")
    forward = torch.compile(model) if compile_model else model
    tokens = args.micro_batch * args.seq_length
    batch = torch.randint(0, PYTHIA_VOCAB, (args.micro_batch, args.seq_length + 1), device="cuda")
    times = []
    for step in range(args.warmup + args.steps):
        torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.autocast("cuda", dtype=dtype):
            logits = forward(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - started)
    step_s = median(times)
    flops = step_flops(model, shape["num_layers"], shape["hidden_size"], args.seq_length, tokens)
    result = {
        "tokens_per_s": tokens / step_s,
        "step_ms": step_s * 1000,
        "mfu": flops / step_s / (args.peak_tflops * 1e12),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
    }
    del model, optimizer
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return result


def measure_job(name: str, dtype_name: str, args, home) -> dict:
    """The same shape trained by polypythia's loop: tokens/s and train/mfu, medians after --warmup."""
    from polypythia.config.jobconfig import job_config
    from polypythia.train.callbacks import Callback
    from polypythia.train.loop import train

    class KeepMfu(Callback):
        def __init__(self):
            self.mfu = []

        def on_step_end(self, step, metrics):
            self.mfu.append(metrics.get("train/mfu", float("nan")))

    raw = job_dict(
        home,
        name,
        args.warmup + args.steps,
        threads=None,
        checkpoints=False,
        study=f"gpu-{name}-{dtype_name}",
        seq_length=args.seq_length,
        global_batch_size=args.micro_batch,
        micro_batch_size=args.micro_batch,
    )
    raw["model"]["vocab_size"] = PYTHIA_VOCAB
    raw["train"].update(precision=dtype_name, peak_tflops=args.peak_tflops, autocast=not args.no_autocast)
    raw["launcher"]["num_gpus_per_job"] = 1
    timer, mfu = StepTimer(), KeepMfu()
    train(job_config(raw), [timer, mfu])
    step_s = median(timer.step_seconds()[args.warmup :])
    return {
        "tokens_per_s": args.micro_batch * args.seq_length / step_s,
        "step_ms": step_s * 1000,
        "mfu": median(mfu.mfu[args.warmup :]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--models", default="70m,160m")
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    parser.add_argument("--job", action="store_true", help="also train each shape through polypythia's DeepSpeed loop")
    parser.add_argument(
        "--no-autocast", action="store_true", help="--job with train.autocast=false: DeepSpeed's fp16/bf16 weights"
    )
    parser.add_argument(
        "--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak (default: H100 SXM, 989)"
    )
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("skipped: no GPU")
        return
    print(machine_description())
    print(
        f"seq_length {args.seq_length}, micro batch {args.micro_batch}, {args.steps} steps after {args.warmup}, "
        f"peak {args.peak_tflops:g} TFLOP/s"
    )
    with bench_home("polypythia-gpu-") as home:
        for name in args.models.split(","):
            for dtype_name in ("bf16", "fp16"):
                plain = None
                for compile_model in (False, True) if args.compile else (False,):
                    r = measure(name, dtype_name, compile_model, args)
                    plain = plain or r
                    label = f"{name} {dtype_name} sdpa fused-AdamW{' compile' if compile_model else ''}"
                    print(
                        f"  {label:<40} {r['tokens_per_s']:10,.0f} tok/s  {r['step_ms']:7.1f} ms/step  "
                        f"MFU {r['mfu'] * 100:5.1f}%  peak mem {r['peak_mem_gib']:.1f} GiB",
                        flush=True,
                    )
                if args.job:
                    r = measure_job(name, dtype_name, args, home)
                    label = f"{name} {dtype_name} polypythia loop (DeepSpeed)"
                    print(
                        f"  {label:<40} {r['tokens_per_s']:10,.0f} tok/s  {r['step_ms']:7.1f} ms/step  "
                        f"train/mfu {r['mfu'] * 100:5.1f}%  loop/plain {r['tokens_per_s'] / plain['tokens_per_s']:.3f}",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
