"""The training job in this process: real DeepSpeed engine, real checkpoints, exact resume."""

import logging
import shutil

import numpy as np
import pytest
import torch
from helpers import tiny_job
from helpers import train_here as run
from transformers import GPTNeoXForCausalLM

from polypythia.train.callbacks import Callback
from polypythia.train.checkpoint import is_resumable, list_checkpoints, verify
from polypythia.train.data import load_training_data

PROBE = torch.arange(24).reshape(2, 12) % 200


class Crash(Exception):
    pass


class CrashAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, step, metrics):
        if step == self.step:
            raise Crash(f"simulated crash at step {step}")


class KeepLogits(Callback):
    def __init__(self):
        self.logits = {}

    def on_checkpoint(self, step, path, model):
        with torch.no_grad():
            self.logits[step] = model(input_ids=PROBE).logits.clone()


class KeepNorms(Callback):
    def __init__(self):
        self.norms = []

    def on_step_end(self, step, metrics):
        self.norms.append(metrics["train/grad_norm"])


def test_same_seed_is_bit_identical_and_seeds_differ(tmp_path, cache_dir):
    keep_a = KeepNorms()
    a = run(tiny_job(tmp_path / "a", cache_dir, seed=1), [keep_a])
    b = run(tiny_job(tmp_path / "b", cache_dir, seed=1))
    c = run(tiny_job(tmp_path / "c", cache_dir, seed=2))
    assert len(a.losses) == 6 and a.losses == b.losses
    assert len(keep_a.norms) == 6 and all(0 < n < 100 for n in keep_a.norms)
    assert a.losses != c.losses
    assert all(np.isfinite(a.losses))


def test_weight_seed_and_data_seed_are_separate(tmp_path, cache_dir):
    base = tiny_job(tmp_path / "a", cache_dir, seed=1)
    other_data = tiny_job(tmp_path / "b", cache_dir, seed=1, data_seed=5)
    other_weights = tiny_job(tmp_path / "c", cache_dir, seed=1, weight_seed=5)
    batches = {
        name: load_training_data(cfg).batch(0)
        for name, cfg in [("base", base), ("data", other_data), ("weights", other_weights)]
    }
    np.testing.assert_array_equal(batches["base"], batches["weights"])
    assert not np.array_equal(batches["base"], batches["data"])
    from polypythia.model import build_model

    w = [
        build_model(2, 64, 4, 8192, cfg.effective_weight_seed).gpt_neox.embed_in.weight
        for cfg in (base, other_data, other_weights)
    ]
    assert torch.equal(w[0], w[1]) and not torch.equal(w[0], w[2])


def test_checkpoints_follow_schedule_and_load_in_transformers(tmp_path, cache_dir):
    keep = KeepLogits()
    cfg = tiny_job(tmp_path, cache_dir)
    result = run(cfg, [keep])
    assert [c.step for c in list_checkpoints(cfg.run_dir)] == [0, 1, 2, 3, 4, 6]
    # only the newest two keep the state to resume from; all keep weights and verify
    assert [is_resumable(c.path) for c in list_checkpoints(cfg.run_dir)] == [False] * 4 + [True] * 2
    for c in list_checkpoints(cfg.run_dir):
        verify(c.path)
        assert (c.path / "model.safetensors").is_file()
    assert len(result.checkpoints) == 6
    loaded = GPTNeoXForCausalLM.from_pretrained(result.checkpoints[-1])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=PROBE).logits, keep.logits[6], rtol=0, atol=0)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(result.checkpoints[-1])
    assert tok.decode(tok("def main():")["input_ids"]) == "def main():"


def test_resume_after_crash_is_bit_identical(tmp_path, cache_dir, caplog):
    reference = run(tiny_job(tmp_path / "ref", cache_dir)).losses
    cfg = tiny_job(tmp_path / "crash", cache_dir, train__keep_resume_states=None)
    with pytest.raises(Crash):
        run(cfg, [CrashAt(5)])
    assert [c.step for c in list_checkpoints(cfg.run_dir)] == [0, 1, 2, 3, 4]
    resumed = run(cfg)
    assert resumed.start_step == 4
    assert resumed.losses == reference[4:]

    # corrupt the newest checkpoint: resume falls back to the one before, with a warning
    shutil.rmtree(f"{cfg.run_dir}/checkpoints/step6")
    (list_checkpoints(cfg.run_dir)[-1].path / "model.safetensors").write_bytes(b"garbage")
    caplog.set_level(logging.WARNING)
    again = run(cfg)
    assert again.start_step == 3
    assert again.losses == reference[3:]
    assert any("is corrupt" in r.getMessage() and "Falling back" in r.getMessage() for r in caplog.records)


def test_loss_above_the_ceiling_stops_the_run(tmp_path, cache_dir):
    from polypythia.errors import DivergenceError

    cfg = tiny_job(tmp_path, cache_dir, train__loss_ceiling=1.0, train__loss_ceiling_steps=2)
    with pytest.raises(DivergenceError, match=r"stayed above train.loss_ceiling=1.0 for 2 steps \(to step 2\)"):
        run(cfg)
    assert [c.step for c in list_checkpoints(cfg.run_dir)] == [0, 1]  # kept


def test_model_flops_per_token_follows_palm():
    from polypythia.config.jobconfig import model_preset
    from polypythia.model import count_parameters, gpt_neox_config
    from polypythia.train.step import flops_per_token, matmul_params, peak_flops

    s = model_preset("70m")
    total, _ = count_parameters(gpt_neox_config(s.num_layers, s.hidden_size, s.num_heads))
    assert total == 70_426_624
    n = matmul_params(s.build(50304, 1))  # the input embedding (50304 x 512) is a look-up, not a multiply
    assert n == 70_426_624 - 50304 * 512
    assert flops_per_token(n, 6, 512, 2048) == 6 * n + 12 * 6 * 512 * 2048
    assert peak_flops(100.0) == 1e14
    if not torch.cuda.is_available():
        assert peak_flops(None) is None  # no train/mfu on a CPU


def test_activation_checkpointing_gives_the_same_curve(tmp_path, cache_dir):
    plain = run(tiny_job(tmp_path / "plain", cache_dir, budget__steps=3)).losses
    recomputed = run(
        tiny_job(tmp_path / "ckpt", cache_dir, budget__steps=3, train__activation_checkpointing=True)
    ).losses
    np.testing.assert_allclose(recomputed, plain, rtol=1e-6)


class KeepMetrics(Callback):
    def __init__(self):
        self.metrics = []

    def on_step_end(self, step, metrics):
        self.metrics.append(dict(metrics))


def test_model_flops_utilisation_is_logged_against_the_given_peak(tmp_path, cache_dir):
    """On a GPU the peak is looked up by name; train.peak_tflops gives it on any device."""
    from polypythia.train.step import flops_per_token

    keep = KeepMetrics()
    cfg = tiny_job(tmp_path, cache_dir, budget__steps=2, train__peak_tflops=0.5)
    started = []

    class KeepStart(Callback):
        def on_train_start(self, start):
            started.append(start)

    run(cfg, [keep, KeepStart()])
    embed_in = started[0].vocab_size * 64  # counted out: a look-up, not a matrix multiply
    per_token = flops_per_token(started[0].num_params - embed_in, 2, 64, 32)
    for m in keep.metrics:
        assert m["train/mfu"] == pytest.approx(m["train/tokens_per_s"] * per_token / 0.5e12, rel=1e-9)
        assert 0 < m["train/mfu"] < 1


def test_bf16_trains_on_cpu_with_bf16_weights(tmp_path, cache_dir):
    """DeepSpeed's mixed-precision path (``train.autocast=false``: ZeRO-1 keeps fp32 master weights); fp16
    has no CPU kernels in DeepSpeed and is refused at configuration (tests/config/test_config.py). The
    default, train.autocast: tests/train/test_host_autocast.py."""
    from safetensors import safe_open

    fp32 = run(tiny_job(tmp_path / "fp32", cache_dir, budget__steps=3)).losses
    cfg = tiny_job(tmp_path / "bf16", cache_dir, budget__steps=3, train__precision="bf16", train__autocast=False)
    bf16 = run(cfg)
    assert bf16.losses != fp32
    np.testing.assert_allclose(bf16.losses, fp32, rtol=1e-2)
    with safe_open(f"{bf16.checkpoints[-1]}/model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


@pytest.mark.slow
def test_torch_compile_gives_the_same_curve(tmp_path, cache_dir):
    """Inductor on CPU (a C++ compiler builds the kernels; about 30 s for the tiny model)."""
    plain = run(tiny_job(tmp_path / "plain", cache_dir, budget__steps=3)).losses
    compiled = run(tiny_job(tmp_path / "compiled", cache_dir, budget__steps=3, train__compile=True)).losses
    np.testing.assert_allclose(compiled, plain, rtol=1e-5)


def test_the_engine_applies_the_logged_learning_rate(tmp_path, cache_dir):
    """Two micro-batches per step: DeepSpeed steps the schedule once per optimizer step."""
    from polypythia.model import build_model
    from polypythia.train.distributed import init_distributed
    from polypythia.train.engine import build_engine
    from polypythia.train.schedule import lr_at

    cfg = tiny_job(tmp_path, cache_dir, budget__steps=10, budget__warmup_fraction=0.2)
    init_distributed()
    engine = build_engine(cfg, build_model(2, 64, 4, 256, 1), 1)
    tokens = torch.randint(0, 256, (4, 9), generator=torch.Generator().manual_seed(0))
    for step in range(10):
        for group in engine.optimizer.param_groups:
            assert group["lr"] == pytest.approx(lr_at(step, 10, 1e-3, 0.2, 0.1), rel=1e-12)
        for i in (0, 2):
            logits = engine(input_ids=tokens[i : i + 2, :-1]).logits
            engine.backward(torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[i : i + 2, 1:].flatten()))
            engine.step()


def test_the_job_guards_run_around_the_given_callbacks(tmp_path):
    """The NaN is injected before the given callbacks see the step; the kill and the divergence
    check come after them, so a diverged step is still recorded."""
    from polypythia.errors import DivergenceError
    from polypythia.train.callbacks import in_order
    from polypythia.train.faults import InjectNaN, KillAtStep
    from polypythia.train.guards import DivergenceCheck, callbacks_from_config
    from polypythia.train.monitor import StabilityMonitor

    cfg = tiny_job(
        tmp_path,
        tmp_path,
        seed=2,
        train__fault__nan_at_step=3,
        train__fault__nan_seeds=[2],
        train__fault__kill_at_step=5,
        train__fault__kill_seeds=[1],
    )
    first, second = KeepMetrics(), KeepMetrics()
    ordered = in_order([first, second, *callbacks_from_config(cfg)])
    assert [type(cb) for cb in ordered] == [InjectNaN, StabilityMonitor, KeepMetrics, KeepMetrics, DivergenceCheck]
    assert ordered[2] is first
    with pytest.raises(DivergenceError, match="loss at step 3 is nan") as raised:
        for step in (1, 2, 3):
            metrics = {"train/loss": 5.0}
            for cb in ordered:
                cb.on_step_end(step, metrics)
    assert raised.value.step == 3 and np.isnan(second.metrics[-1]["train/loss"])
    killer = callbacks_from_config(tiny_job(tmp_path, tmp_path, seed=1, train__fault__kill_at_step=5))[-1]
    assert isinstance(killer, KillAtStep) and in_order([killer, DivergenceCheck(None, 1)])[0] is killer
