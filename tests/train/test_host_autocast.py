"""``train.autocast``: one worker in bf16/fp16 trains fp32 weights at ZeRO-0 under torch.autocast, with
DeepSpeed's own dynamic loss scaler under fp16 (polypythia/train/engine.py ``autocast_dtype``,
polypythia/train/lighten.py ``DeepSpeedLossScaling``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import tiny_job
from helpers import train_here as run

from polypythia.model import build_model
from polypythia.train.callbacks import Callback
from polypythia.train.engine import build_engine, deepspeed_config, effective_zero_stage


class Stopped(Exception):
    pass


class StopAfter(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, step, metrics):
        if step == self.step:
            raise Stopped(f"stopped after step {step}")


@pytest.fixture(scope="module")
def dist():
    from polypythia.train.distributed import init_distributed

    init_distributed()


def autocast_job(tmp_path, cache_dir, precision: str, **overrides):
    gpus = 1 if precision == "fp16" else 0  # the config refuses fp16 without a GPU; autocast runs it on CPU
    return tiny_job(
        tmp_path,
        cache_dir,
        train__precision=precision,
        train__autocast=True,
        launcher__num_gpus_per_job=gpus,
        **overrides,
    )


def engine_of(tmp_path, precision: str, **overrides):
    cfg = autocast_job(
        tmp_path,
        tmp_path / "cache",
        precision,
        model__vocab_size=8192,
        budget__global_batch_size=1,  # every engine.step() is an optimizer step
        budget__micro_batch_size=1,
        **overrides,
    )
    return build_engine(cfg, build_model(2, 64, 4, 8192, 1), 1)


def backward_and_step(engine, scale: float = 1.0) -> None:
    batch = torch.randint(0, 8192, (1, 17), generator=torch.Generator().manual_seed(0))
    logits = engine(input_ids=batch[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
    engine.backward(loss * scale)
    engine.step()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_one_worker_autocast_is_zero0_and_more_workers_keep_deepspeeds_path(tmp_path, precision):
    cfg = autocast_job(tmp_path, tmp_path, precision)
    assert (effective_zero_stage(cfg, 1), effective_zero_stage(cfg, 2)) == (0, 1)
    one, two = deepspeed_config(cfg, 1), deepspeed_config(cfg, 2)
    assert one["torch_autocast"] == {"enabled": True, "dtype": precision} and precision not in one
    assert "torch_autocast" not in two and two[precision]["enabled"]
    zero2 = autocast_job(tmp_path, tmp_path, precision, train__zero_stage=2)
    assert effective_zero_stage(zero2, 1) == 2 and "torch_autocast" not in deepspeed_config(zero2, 1)


def test_fp16_overflow_skips_the_update_and_the_schedule_with_deepspeeds_hysteresis(dist, tmp_path):
    engine = engine_of(tmp_path, "fp16")
    scaling = engine.torch_autocast_z0_gradscaler
    assert next(engine.module.parameters()).dtype == torch.float32 and scaling.cur_scale == 2.0**12
    backward_and_step(engine)
    assert engine.was_step_applied() and engine.get_global_grad_norm() > 0
    lr, weights = engine.get_lr(), [p.detach().clone() for p in engine.module.parameters()]
    backward_and_step(engine, float("inf"))  # hysteresis 2: the first overflow keeps the scale ...
    assert not engine.was_step_applied() and scaling.cur_scale == 2.0**12
    backward_and_step(engine, float("inf"))  # ... the second halves it
    assert scaling.cur_scale == 2.0**11 and engine.skipped_steps == 2
    assert engine.get_global_grad_norm() == float("inf") and engine.get_lr() == lr
    assert all(torch.equal(w, p) for w, p in zip(weights, engine.module.parameters()))
    backward_and_step(engine)
    assert engine.was_step_applied() and engine.get_lr() != lr


def test_fp16_unscales_and_clips_with_zeros_factor(dist, tmp_path):
    engine = engine_of(tmp_path, "fp16")
    params = list(engine.module.parameters())
    for i, p in enumerate(params):
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 2.0**12
    expected = [p.grad.double() for p in params]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in expected])) / 2.0**12
    factor = 2.0**12 * max(1.0, (float(norm) + 1e-6) / engine.gradient_clipping())
    engine.torch_autocast_z0_gradscaler.unscale_(engine.optimizer)
    assert float(engine.get_global_grad_norm()) == pytest.approx(float(norm), rel=1e-5)  # fp32 sums
    for p, g in zip(params, expected):
        torch.testing.assert_close(p.grad.double(), g / factor, rtol=1e-5, atol=0)


def test_the_loss_scalers_state_is_in_the_checkpoint_and_the_monitor_reads_it(dist, tmp_path):
    from polypythia.train.signals import loss_scale

    engine = engine_of(tmp_path, "fp16")
    backward_and_step(engine, float("inf"))
    backward_and_step(engine, float("inf"))
    engine.save_checkpoint(str(tmp_path / "ckpt"), tag="t")
    state = vars(engine.torch_autocast_z0_gradscaler.scaler).copy()
    again = engine_of(tmp_path, "fp16")
    assert loss_scale(again) == 2.0**12
    again.load_checkpoint(str(tmp_path / "ckpt"), tag="t")
    assert vars(again.torch_autocast_z0_gradscaler.scaler) == state and loss_scale(again) == 2.0**11


@pytest.mark.integration
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_follows_fp32_resumes_bit_identically_and_saves_fp32_weights(tmp_path, cache_dir, precision):
    from safetensors import safe_open

    fp32 = run(tiny_job(tmp_path / "fp32", cache_dir)).losses
    reference = run(autocast_job(tmp_path / "ref", cache_dir, precision))
    assert reference.losses != fp32
    np.testing.assert_allclose(reference.losses, fp32, rtol=1e-2)
    cfg = autocast_job(tmp_path / "cut", cache_dir, precision)
    with pytest.raises(Stopped):
        run(cfg, [StopAfter(4)])
    resumed = run(cfg)
    assert resumed.start_step == 3 and resumed.losses == reference.losses[3:]
    with safe_open(f"{reference.checkpoints[-1]}/model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}


def test_skip_step_reads_the_norm_the_loss_scaling_measured(dist, tmp_path):
    from types import SimpleNamespace

    from polypythia.config.monitor import MonitorConfig
    from polypythia.train.skipstep import SkipStep

    engine = engine_of(tmp_path, "fp16", monitor__action="skip_step")
    skip = SkipStep(
        MonitorConfig(action="skip_step", skip_window=8, skip_threshold_sd=6.0)
    )  # judges from the 4th step on
    skip.on_train_start(SimpleNamespace(rank=0, engine=engine, trainer_state={}))
    for step, loss in enumerate([1.0, 1.1, 0.9, 1.0, 50.0], start=1):
        weights = [p.detach().clone() for p in engine.module.parameters()]
        skip.before_update(loss, None)
        backward_and_step(engine)
        assert skip.rule.grad_norm.values[-1] == pytest.approx(float(engine.get_global_grad_norm()))
        skip.on_step_end(step, {})
    assert skip.skipped_steps == [5]
    assert all(torch.equal(w, p) for w, p in zip(weights, engine.module.parameters()))


def test_the_monitor_reads_the_unscaled_gradients_under_fp16_autocast(dist, tmp_path):
    """The probe runs before the update, on gradients still multiplied by the loss scale: its per-group
    norms combine to the norm the loss scaling measured, and it reports that scale."""
    from polypythia.train.callbacks import TrainStart
    from polypythia.train.monitor import StabilityMonitor
    from polypythia.train.step import train_step

    engine = engine_of(tmp_path, "fp16")
    cfg = autocast_job(tmp_path, tmp_path / "cache", "fp16", model__vocab_size=8192)
    monitor = StabilityMonitor.from_config(cfg)
    n = sum(p.numel() for p in engine.module.parameters())
    monitor.on_train_start(TrainStart(0, 1, 0, 8192, 0, n, (), None, engine))
    rows = np.random.default_rng(0).integers(0, 8192, (1, 17))
    probe = monitor.probe(monitor.every_steps)
    _, grad_norm, _ = train_step(engine, engine, rows, 1, [probe])
    groups = [v for k, v in probe.metrics.items() if k.startswith("monitor/grad_norm/")]
    assert np.sqrt(np.sum(np.square(groups))) == pytest.approx(grad_norm, rel=1e-5)
    assert probe.metrics["monitor/loss_scale"] == 2.0**12 and probe.metrics["monitor/attn_logit_max"] > 0
