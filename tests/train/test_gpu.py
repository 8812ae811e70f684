"""The GPU paths of the training job, on one CUDA GPU (skipped without one: CI has none).

DeepSpeed's fp16 optimizer (dynamic loss scaling) at ZeRO stage 1 and bf16 optimizer at stages 0
and 1 (``train.autocast=false``), and the default ``train.autocast`` (fp32 weights at ZeRO 0 under
torch.autocast, DeepSpeed's loss scaler under fp16), with fused AdamW, in an NCCL process group: the curve against the same run in fp32 on the CPU, the
seeded initial weights, ``train/mfu`` from the GPU's name, the stability monitor's signals read
out of DeepSpeed's master weights, exact resume, and evaluation on the GPU.

    python -m pytest -m gpu tests/train/test_gpu.py
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import tiny_job, train_here

from polypythia.train.callbacks import Callback
from polypythia.train.distributed import RENDEZVOUS_ENV

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (CI has none)", allow_module_level=True)
pytestmark = pytest.mark.gpu

STEPS, EVERY = 10, 2
# (precision, train.zero_stage, train.autocast); fp16 at ZeRO 0 is refused (test_fp16_at_zero0_is_refused)
SETTINGS = [("fp16", 1, False), ("bf16", 0, False), ("bf16", 1, False), ("fp16", 1, True), ("bf16", 1, True)]


def gpu_job(tmp_path: Path, cache_dir: Path, precision: str, zero: int, autocast: bool, **overrides):
    return tiny_job(
        tmp_path,
        cache_dir,
        budget__steps=STEPS,
        train__precision=precision,
        train__zero_stage=zero,
        train__autocast=autocast,
        launcher__num_gpus_per_job=1,
        monitor__every_steps=EVERY,
        **overrides,
    )


def torch_optimizer(engine) -> torch.optim.Optimizer:
    """The torch AdamW inside DeepSpeed's optimizer wrappers."""
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer):
        opt = opt.optimizer
    return opt


class Watch(Callback):
    """What the engine is, every step's metrics, and where the optimizer keeps its step counts."""

    priority = -1000  # after every other callback: sees the monitor's metrics

    def __init__(self):
        self.metrics: dict[int, dict] = {}

    def on_train_start(self, start):
        engine = start.engine
        self.engine, self.vocab_size, self.start_step = engine, start.vocab_size, start.start_step
        self.backend = torch.distributed.get_backend()
        self.device = engine.device
        self.fp16, self.bf16 = engine.fp16_enabled(), engine.bfloat16_enabled()
        self.zero = engine.zero_optimization_stage()
        self.fused = torch_optimizer(engine).defaults.get("fused")
        self.param_dtype = next(engine.module.parameters()).dtype

    def on_step_end(self, step, metrics):
        self.metrics[step] = dict(metrics)

    def on_train_end(self, result):
        state = torch_optimizer(self.engine).state.values()
        self.step_devices = {s["step"].device.type for s in state if torch.is_tensor(s.get("step"))}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    """One 10-step tiny run per setting, monitor every 2 steps."""
    out = {}
    for precision, zero, autocast in SETTINGS:
        tmp = tmp_path_factory.mktemp(f"{precision}-zero{zero}-autocast{int(autocast)}")
        cfg = gpu_job(tmp, cache_dir, precision, zero, autocast)
        watch = Watch()
        out[precision, zero, autocast] = SimpleNamespace(cfg=cfg, result=train_here(cfg, [watch]), watch=watch)
    return out


@pytest.fixture(scope="module")
def cpu_fp32(tmp_path_factory, cache_dir, runs):
    """The same run in fp32 on the CPU, in a process that sees no GPU."""
    tmp = tmp_path_factory.mktemp("cpu-fp32")
    code = (
        "import json, sys; from pathlib import Path; from helpers import tiny_job, train_here; "
        f"cfg = tiny_job(Path(sys.argv[1]), Path(sys.argv[2]), budget__steps={STEPS}, train__precision='fp32', "
        f"monitor__every_steps={EVERY}); print('LOSSES', json.dumps(train_here(cfg).losses))"
    )
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_ENV}  # this process's group is not the child's
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp), str(cache_dir)],
        cwd=Path(__file__).parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(next(line for line in out.stdout.splitlines() if line.startswith("LOSSES"))[7:])


@pytest.mark.parametrize(("precision", "zero", "autocast"), SETTINGS)
def test_mixed_precision_on_one_gpu_follows_the_fp32_curve(runs, cpu_fp32, precision, zero, autocast):
    run = runs[precision, zero, autocast]
    w = run.watch
    assert (w.backend, w.device.type) == ("nccl", "cuda")
    if autocast:  # fp32 weights at ZeRO 0, DeepSpeed's torch_autocast section
        assert (w.fp16, w.bf16, w.zero, w.param_dtype) == (False, False, 0, torch.float32)
        assert w.engine.torch_autocast_enabled()
    else:
        assert (w.fp16, w.bf16, w.zero) == (precision == "fp16", precision == "bf16", zero)
        assert w.param_dtype == (torch.float16 if precision == "fp16" else torch.bfloat16)
    assert w.fused is True
    assert w.step_devices == {"cuda"}  # fused AdamW keeps its step counts on the GPU
    losses = run.result.losses
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
    print(
        f"{precision} ZeRO {zero} autocast {autocast}: max |GPU - CPU fp32| / CPU = "
        f"{max(abs(a - b) / b for a, b in zip(losses, cpu_fp32)):.2e}"
    )
    np.testing.assert_allclose(losses, cpu_fp32, rtol=1e-2)


@pytest.mark.parametrize(("precision", "zero", "autocast"), SETTINGS)
def test_initial_weights_are_the_seeded_cpu_weights(runs, precision, zero, autocast):
    """The step-0 checkpoint holds the weights the seed gives on the CPU, cast to the run's precision."""
    from transformers import AutoModelForCausalLM

    run = runs[precision, zero, autocast]
    assert run.result.checkpoints[0].endswith("step0")
    dtype = run.watch.param_dtype
    saved = AutoModelForCausalLM.from_pretrained(run.result.checkpoints[0], dtype=dtype).state_dict()
    reference = run.cfg.model.build(run.watch.vocab_size, run.cfg.effective_weight_seed).state_dict()
    assert set(saved) == set(reference)
    for key, tensor in saved.items():
        assert tensor.dtype == dtype or not tensor.is_floating_point(), key
        assert torch.equal(tensor, reference[key].to(tensor.dtype)), key


@pytest.mark.parametrize(("precision", "zero", "autocast"), SETTINGS)
def test_mfu_from_the_gpu_name(runs, precision, zero, autocast):
    from polypythia.train.step import flops_per_token, peak_flops

    peak = peak_flops(None)
    if peak is None:
        pytest.skip(f"{torch.cuda.get_device_name()} is not in polypythia.train.step.PEAK_TFLOPS")
    run = runs[precision, zero, autocast]
    m = run.cfg.model
    n = sum(p.numel() for name, p in run.watch.engine.module.named_parameters() if "embed_in" not in name)
    per_token = flops_per_token(n, m.num_layers, m.hidden_size, run.cfg.budget.seq_length)
    for metrics in run.watch.metrics.values():
        assert metrics["train/mfu"] == pytest.approx(metrics["train/tokens_per_s"] * per_token / peak, rel=1e-9)
        assert 0 < metrics["train/mfu"] < 1


@pytest.mark.parametrize(("precision", "zero", "autocast"), SETTINGS)
def test_monitor_reads_deepspeeds_master_weights(runs, precision, zero, autocast):
    """At each sampled step the per-group gradient norms add up to the step's train/grad_norm (both
    unscaled under fp16), and the update ratios and Adam RMS come out of the fp32 master copy."""
    run = runs[precision, zero, autocast]
    sampled = [s for s in range(EVERY, STEPS + 1, EVERY)]
    for step in sampled:
        metrics = run.watch.metrics[step]
        groups = [k for k in metrics if k.startswith("monitor/grad_norm/")]
        assert len(groups) >= 4, sorted(metrics)
        total = math.sqrt(sum(metrics[k] ** 2 for k in groups))
        assert total == pytest.approx(metrics["train/grad_norm"], rel=1e-2), step
        for prefix in ("monitor/update_ratio/", "monitor/adam_rms/"):
            values = [v for k, v in metrics.items() if k.startswith(prefix)]
            assert values and all(math.isfinite(v) and v > 0 for v in values), (prefix, step)
        if precision == "fp16":
            scale = metrics["monitor/loss_scale"]
            assert scale >= 1 and math.log2(scale).is_integer() and scale <= 2**12
        else:
            assert "monitor/loss_scale" not in metrics
    assert not any(k.startswith("monitor/") and not k.startswith("monitor/spike") for k in run.watch.metrics[1])


@pytest.mark.parametrize("autocast", [False, True])
def test_resume_on_the_gpu_continues_the_curve(runs, tmp_path, cache_dir, autocast):
    """Pythia's GPU recipe (fp16, ZeRO 1; with train.autocast, fp32 weights at ZeRO 0): a run that crashes
    after step 7 resumes from its step-6 checkpoint with the loss scale, learning rate and optimizer state it had."""
    from test_train import Crash, CrashAt

    reference = runs["fp16", 1, autocast]
    cfg = gpu_job(tmp_path, cache_dir, "fp16", 1, autocast, train__keep_resume_states=None)
    with pytest.raises(Crash):
        train_here(cfg, [CrashAt(7)])
    watch = Watch()
    resumed = train_here(cfg, [watch])
    assert resumed.start_step == watch.start_step == 6
    assert watch.fused is True and watch.step_devices == {"cuda"}
    expected = reference.result.losses[6:]
    print(
        f"resume: max |resumed - uninterrupted| / uninterrupted = "
        f"{max(abs(a - b) / b for a, b in zip(resumed.losses, expected)):.2e}"
    )
    np.testing.assert_allclose(resumed.losses, expected, rtol=1e-4)
    for step in (8, 10):
        for key in ("train/lr", "monitor/loss_scale"):
            assert watch.metrics[step][key] == reference.watch.metrics[step][key], (step, key)


def test_validation_loss_on_the_gpu_matches_the_cpu(runs):
    from transformers import AutoModelForCausalLM

    from polypythia.evaluate.perplexity import validation_loss

    run = runs["fp16", 1, True]
    rows = torch.randint(
        0, run.watch.vocab_size, (6, run.cfg.budget.seq_length + 1), generator=torch.Generator().manual_seed(0)
    )
    model = AutoModelForCausalLM.from_pretrained(run.result.checkpoints[-1], dtype=torch.float32)
    on_cpu = validation_loss(model, rows, 4)
    on_gpu = validation_loss(model.cuda(), rows, 4)
    assert on_gpu[0] == pytest.approx(on_cpu[0], rel=1e-4)


def test_fp16_at_zero0_is_refused_where_auto_means_fp16(tmp_path, cache_dir):
    """precision=auto is fp16 on a GPU: a job the launcher gave no GPU still refuses DeepSpeed's fp16 weights
    at ZeRO 0 when it finds one, before DeepSpeed starts (polypythia.config.jobconfig.FP16_ZERO0_REFUSED)."""
    from polypythia.errors import ConfigError

    cfg = tiny_job(tmp_path, cache_dir, train__precision="auto", train__zero_stage=0, train__autocast=False)
    with pytest.raises(ConfigError, match="zero_stage=0 is refused"):
        train_here(cfg)
