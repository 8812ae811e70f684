"""The step without DeepSpeed's per-tensor host work (polypythia/train/lighten.py) does the same arithmetic:
fp16 overflows are still caught and skipped, the foreach norms and clipping equal DeepSpeed's own."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from polypythia.model import build_model
from polypythia.train.lighten import _clip_fp32


@pytest.fixture(scope="module")
def dist():
    from polypythia.train.distributed import init_distributed

    init_distributed()


def build(precision: str, monkeypatch, tmp_path, **overrides):
    """A real one-rank DeepSpeed ZeRO-1 engine around the tiny model, built as a job builds it; fp16 runs
    on CPU once DeepSpeed's CPU accelerator is told it has fp16 (the same code path as on a GPU)."""
    from deepspeed.accelerator import get_accelerator
    from helpers import tiny_job

    from polypythia.train.engine import build_engine

    if precision == "fp16" and not torch.cuda.is_available():
        monkeypatch.setattr(get_accelerator(), "is_fp16_supported", lambda: True)
    cfg = tiny_job(
        tmp_path,
        tmp_path / "cache",
        train__precision=precision,
        **{"train__zero_stage": 1, "train__autocast": False, **overrides},
        model__vocab_size=8192,
        budget__global_batch_size=1,
        budget__micro_batch_size=1,
        launcher__num_gpus_per_job=1 if precision == "fp16" else 0,
    )
    return build_engine(cfg, build_model(2, 64, 4, 8192, 1), 1)


def loss_of(engine, scale: float = 1.0) -> torch.Tensor:
    batch = torch.randint(0, 8192, (1, 17), generator=torch.Generator().manual_seed(0))
    logits = engine(input_ids=batch[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten()) * scale


def test_fp16_overflow_is_caught_by_the_global_norm_alone(dist, monkeypatch, tmp_path):
    engine = build("fp16", monkeypatch, tmp_path)
    optimizer = engine.optimizer
    assert optimizer.check_grad_overflow is False  # no per-tensor check ...
    engine.backward(loss_of(engine))
    engine.step()
    assert engine.was_step_applied()
    weights = [p.detach().clone() for p in engine.module.parameters()]
    engine.backward(loss_of(engine, float("inf")))  # ... yet an overflowing step is skipped
    engine.step()
    assert not engine.was_step_applied() and engine.skipped_steps == 1
    assert engine.get_global_grad_norm() == float("inf")
    assert all(torch.equal(w, p) for w, p in zip(weights, engine.module.parameters()))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_zero_foreach_norm_equals_deepspeeds(dist, monkeypatch, tmp_path, precision):
    engine = build(precision, monkeypatch, tmp_path)
    optimizer = engine.optimizer
    grads, params = [], []
    for group in optimizer.bit16_groups:
        for p in group:
            grads.append(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(grads))).to(p.dtype))
            params.append(p)
    ours = optimizer.get_grad_norm_direct(grads, params)
    theirs = type(optimizer).get_grad_norm_direct(optimizer, grads, params)
    assert float(ours) == pytest.approx(float(theirs), rel=1e-6)
    grads[3][0] = float("nan")
    assert float(optimizer.get_grad_norm_direct(grads, params)) == -1.0  # DeepSpeed's mark of a non-finite norm


def test_fp32_foreach_clipping_equals_deepspeeds(dist):
    from deepspeed.runtime.utils import clip_grad_norm_

    model = build_model(2, 64, 4, 512, 1)
    twin = copy.deepcopy(model)
    for i, (p, q) in enumerate(zip(model.parameters(), twin.parameters())):
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(i))
        q.grad = p.grad.clone()
    engine = SimpleNamespace(module=model, gradient_clipping=lambda: 1.0, _global_grad_norm=None)
    _clip_fp32(engine, tuple(model.parameters()))
    theirs = clip_grad_norm_(list(twin.parameters()), max_norm=1.0)
    assert float(engine._global_grad_norm) == pytest.approx(float(theirs), rel=1e-6)
    for ours, reference in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(ours.grad, reference.grad, rtol=1e-6, atol=0)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_step_leaves_no_gradient_on_fp32_weights(dist, monkeypatch, tmp_path, precision):
    """fp32, and bf16 under train.autocast: engine.zero_grad clears the gradients from the parameter list
    lighten_step made once (DeepSpeed walks the module tree each step), all of them."""
    engine = build(precision, monkeypatch, tmp_path, train__autocast=True)
    assert engine.zero_optimization_stage() == 0 and engine.zero_grad.__module__ == "polypythia.train.lighten"
    engine.backward(loss_of(engine))
    assert all(p.grad is not None for p in engine.module.parameters())
    engine.step()
    assert engine.was_step_applied() and all(p.grad is None for p in engine.module.parameters())
