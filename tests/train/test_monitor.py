"""The live stability monitor (polypythia.train.monitor), the spike detector, and the instability faults."""

import copy
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import on_two_ranks, record_attention_logit_maxima, tiny_job, train_here
from safetensors.torch import load_file

from polypythia.config.monitor import MonitorConfig
from polypythia.config.schema import TrainConfig
from polypythia.errors import ConfigError
from polypythia.train.callbacks import Callback, TrainResult, TrainStart
from polypythia.train.faults import BoostLR, RepeatBatch
from polypythia.train.guards import callbacks_from_config
from polypythia.train.monitor import ForwardSignals, StabilityMonitor
from polypythia.train.schedule import lr_at
from polypythia.train.signals import UpdateSignals, group_of
from polypythia.train.spikes import SpikeDetector

GROUPS = ["embed", "layer0.attn", "layer0.mlp", "layer1.attn", "layer1.mlp", "head"]
BOOST_AT, BOOST = 4, 10.0


class Record(Callback):
    """Every step's metrics, and the learning rate the optimizer holds as each step starts."""

    priority = -1000  # after every other callback: sees what they added

    def __init__(self):
        self.metrics, self.lr = {}, {}

    def on_train_start(self, start):
        self.engine = start.engine

    def on_batch(self, step, rows):
        self.lr[step] = self.engine.get_lr()[0]
        return rows

    def on_step_end(self, step, metrics):
        self.metrics[step] = dict(metrics)


def monitored(tmp_path, cache_dir, **overrides):
    settings = {
        "monitor__every_steps": 2,
        "train__fault__lr_boost_at_step": BOOST_AT,
        "train__fault__lr_boost": BOOST,
        "train__fault__lr_boost_seeds": [1],
        **overrides,
    }
    return tiny_job(tmp_path, cache_dir, **settings)


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache_dir):
    """One tiny 6-step run (ZeRO 0, one process) with the monitor every 2 steps and the LR boosted
    10x from step 4, and its metrics."""
    tmp_path = tmp_path_factory.mktemp("monitored")
    cfg = monitored(tmp_path, cache_dir)
    record = Record()
    result = train_here(cfg, [record])
    return SimpleNamespace(cfg=cfg, result=result, metrics=record.metrics, lr=record.lr)


def test_monitor_signals_at_sampled_steps(run):
    for step, metrics in run.metrics.items():
        names = {k for k in metrics if k.startswith("monitor/")}
        assert bool(names) == (step % 2 == 0), step
    m = run.metrics[2]
    for signal in ("grad_norm", "update_ratio", "adam_rms"):
        assert [k.split("/")[2] for k in m if k.startswith(f"monitor/{signal}/")] == GROUPS
    assert {
        "monitor/attn_logit_max/layer0",
        "monitor/attn_logit_max/layer1",
        "monitor/attn_logit_max",
        "monitor/logz_mean",
        "monitor/logz_max",
        "monitor/update_ratio",
        "monitor/adam_rms",
    } <= set(m)
    assert "monitor/loss_scale" not in m  # fp32
    for step in (2, 4, 6):
        m = run.metrics[step]
        # the groups partition the parameters: their squares add up to the gradient norm's square
        squares = sum(v**2 for k, v in m.items() if k.startswith("monitor/grad_norm/"))
        assert math.sqrt(squares) == pytest.approx(m["train/grad_norm"], rel=1e-5)
        assert all(0 < m[f"monitor/adam_rms/{g}"] < 5 for g in GROUPS)
        assert 0 < m["monitor/attn_logit_max"] < 100 and math.isfinite(m["monitor/attn_logit_max"])
        # at initialisation the output is near uniform over the 8,192 ids: log Z near log(8192)
        assert 8 < m["monitor/logz_mean"] <= m["monitor/logz_max"] < 11
    assert run.result.spikes == []


def test_update_ratio_matches_the_checkpoints(run):
    """Steps 1 and 2 are checkpoints: the ratio at step 2 is ||w2 - w1|| / ||w1|| of their weights."""
    checkpoints = f"{run.cfg.run_dir}/checkpoints"
    w1, w2 = load_file(f"{checkpoints}/step1/model.safetensors"), load_file(f"{checkpoints}/step2/model.safetensors")
    change, weight = dict.fromkeys(GROUPS, 0.0), dict.fromkeys(GROUPS, 0.0)
    for name in w1:
        change[group_of(name)] += float((w2[name].double() - w1[name].double()).square().sum())
        weight[group_of(name)] += float(w1[name].double().square().sum())
    m = run.metrics[2]  # the monitor sums in fp32: about 1e-4 off over the embedding's 0.5M mostly tiny changes
    for g in GROUPS:
        assert m[f"monitor/update_ratio/{g}"] == pytest.approx(math.sqrt(change[g] / weight[g]), rel=1e-3)
    assert m["monitor/update_ratio"] == pytest.approx(math.sqrt(sum(change.values()) / sum(weight.values())), rel=1e-3)


def test_monitor_does_not_change_training(run, tmp_path, cache_dir):
    off = train_here(monitored(tmp_path, cache_dir, monitor__every_steps=0, monitor__spikes=False))
    assert off.losses == run.result.losses


def test_lr_boost_from_its_step_for_its_seeds(run):
    b = run.cfg.budget
    for step in range(1, 7):
        planned = lr_at(step - 1, b.steps, run.cfg.model.lr, b.warmup_fraction, b.min_lr_ratio)
        factor = BOOST if step >= BOOST_AT else 1.0
        assert run.lr[step] == pytest.approx(planned * factor, rel=1e-6), step  # what the optimizer applied
        assert run.metrics[step]["train/lr"] == pytest.approx(planned * factor, rel=1e-6)  # what is logged
    cfg = copy.deepcopy(run.cfg)
    assert any(isinstance(cb, BoostLR) for cb in callbacks_from_config(cfg))
    cfg.seed = 2  # not in train.fault.lr_boost_seeds
    assert not any(isinstance(cb, BoostLR) for cb in callbacks_from_config(cfg))
    cfg.seed, cfg.train.fault.lr_boost_seeds = 2, None  # null: every seed
    assert any(isinstance(cb, BoostLR) for cb in callbacks_from_config(cfg))


def test_repeat_batch_replaces_its_steps_batches():
    rows = np.arange(24, dtype=np.int64).reshape(2, 12) + 5
    fault = RepeatBatch(3, steps=2)
    assert fault.on_batch(2, rows) is rows and fault.on_batch(5, rows) is rows
    for step in (3, 4):
        repeated = fault.on_batch(step, rows)
        assert repeated.shape == rows.shape and repeated.dtype == rows.dtype and (repeated == 5).all()


def test_spike_detector_flags_a_planted_spike_and_not_noise():
    rng = np.random.default_rng(0)
    values = 3.0 + 0.1 * rng.standard_normal(2000)
    values[1500] = 3.0 + 0.1 * 12  # 12 SDs above the noise's mean
    values[1700] = 3.0 - 0.1 * 12  # a dip is no spike
    detector = SpikeDetector(128, 6.0)  # OLMo-core: 6 SDs over the previous 128 values
    flagged = {i: h for i, v in enumerate(values) if (h := detector.update(v)) is not None}
    assert list(flagged) == [1500] and 10 < flagged[1500] < 14
    # nothing is judged before the window is full, unless asked; non-finite values are skipped
    early = SpikeDetector(window=128, threshold_sd=6.0)
    assert all(early.update(v) is None for v in [1.0, 1.1, 0.9] * 10 + [100.0])
    short = SpikeDetector(window=128, threshold_sd=6.0, min_values=5)
    assert [short.update(v) for v in [1.0, 1.1, 0.9, 1.0, 1.1]] == [None] * 5
    assert short.update(float("nan")) is None and short.update(float("inf")) is None and len(short.values) == 5
    assert short.update(100.0) > 6


def spike_monitor() -> StabilityMonitor:
    """A monitor of spikes only, on a window of 8 values."""
    return StabilityMonitor(MonitorConfig(every_steps=0, spike_window=8), TrainConfig(), global_batch_size=4)


def run_monitor(monitor: StabilityMonitor, steps, spike_at: int, seed: int = 1) -> list[dict]:
    """Steps of noisy losses and gradient norms through ``monitor``, a loss of 9 at ``spike_at``; the
    noise of step ``s`` is the same whichever steps run."""
    seen = []
    for step in steps:
        rng = np.random.default_rng([seed, step])
        metrics = {
            "train/loss": 5.0 + 0.01 * rng.standard_normal(),
            "train/grad_norm": 1.0 + 0.01 * rng.standard_normal(),
        }
        if step == spike_at:
            metrics["train/loss"] = 9.0
        monitor.on_step_end(step, metrics)
        seen.append(metrics)
    return seen


def restarted(monitor: StabilityMonitor, trainer_state: dict, start_step: int) -> StabilityMonitor:
    """``monitor`` started as a job resumed at ``start_step`` from a checkpoint with ``trainer_state``."""
    start = TrainStart(0, 1, start_step, 512, 0, 0, (), data=None, trainer_state=trainer_state)
    monitor.on_train_start(start)
    return monitor


def test_the_monitors_spike_windows_survive_a_resume_and_a_rewind():
    """Saved in the trainer state (as JSON) at step 10 and handed back on a restart from it, the
    windows judge step 13 as the run that never stopped does; a monitor started empty cannot (it has
    3 values, its window needs 8)."""
    whole = spike_monitor()
    whole_seen = run_monitor(whole, range(1, 21), spike_at=13)
    first = spike_monitor()
    run_monitor(first, range(1, 11), spike_at=13)
    saved = json.loads(json.dumps(first.trainer_state()))
    assert len(saved["stability_monitor"]["train/loss"]["values"]) == 8
    resumed = restarted(spike_monitor(), saved, 10)
    assert run_monitor(resumed, range(11, 21), spike_at=13) == whole_seen[10:]
    assert "monitor/spike/loss" in whole_seen[12]
    empty = restarted(spike_monitor(), {}, 10)
    assert not any("monitor/spike/loss" in m for m in run_monitor(empty, range(11, 21), spike_at=13))
    # a rewind restarts from an older checkpoint: its windows, not the ones the run reached later
    later = spike_monitor()
    run_monitor(later, range(1, 16), spike_at=13)
    rewound = restarted(later, saved, 10)
    assert run_monitor(rewound, range(11, 21), spike_at=13) == whole_seen[10:]


def test_monitor_reports_spikes_with_their_batch():
    monitor = spike_monitor()
    seen = run_monitor(monitor, range(1, 21), spike_at=15)
    assert [i + 1 for i, m in enumerate(seen) if "monitor/spike/loss" in m] == [15]
    assert not any("monitor/spike/grad_norm" in m for m in seen)
    result = TrainResult("tiny-seed1", 20, 0, 5.0)
    monitor.on_train_end(result)
    (spike,) = result.spikes
    assert spike["metric"] == "train/loss" and spike["step"] == 15 and spike["value"] == 9.0
    assert spike["height_sd"] == seen[14]["monitor/spike/loss"] > 6
    assert spike["batch_rows"] == (56, 60)  # the batch at 0-based index 14: polypythia-batch --step 15


def test_forward_signals_match_an_independent_computation(monkeypatch):
    from polypythia.model import build_model

    model = build_model(2, 64, 4, 512, 1, attn_implementation="eager")
    x = torch.randint(0, 512, (3, 20))
    seen = record_attention_logit_maxima(monkeypatch)
    metrics = {}
    with torch.no_grad(), ForwardSignals(model).watch(metrics):
        logits = model(input_ids=x).logits
    assert len(seen) == 2
    for layer, value in enumerate(seen):
        assert metrics[f"monitor/attn_logit_max/layer{layer}"] == pytest.approx(value, rel=1e-5)
    log_z = torch.logsumexp(logits.double(), dim=-1)
    assert metrics["monitor/logz_mean"] == pytest.approx(float(log_z.mean()), rel=1e-5)
    assert metrics["monitor/logz_max"] == pytest.approx(float(log_z.max()), rel=1e-5)
    # the hooks are gone afterwards
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_fp16_flat_master_weights_and_loss_scale():
    """DeepSpeed's fused fp16 optimizer at ZeRO 0 (FP16_Optimizer, which DeepSpeed builds only around its
    own FusedAdam; polypythia's torch AdamW never gets it, and fp16 at ZeRO 0 is refused): one flat fp32
    master copy per group, gradients scaled by the loss scale. Emulated here with the same attributes;
    tests/train/test_gpu.py checks the real fp16 ZeRO-1 path on a GPU."""
    from polypythia.model import build_model

    model = build_model(2, 64, 4, 512, 1)
    params = list(model.parameters())
    grads = [torch.randn_like(p) for p in params]
    scale = 1024.0
    for p, g in zip(params, grads):
        p.grad = g * scale
    flat = torch.cat([p.detach().reshape(-1) for p in params]).clone()
    optimizer = SimpleNamespace(
        fp16_groups=[params], fp32_groups_flat=[flat], cur_scale=scale, optimizer=SimpleNamespace(state={})
    )
    engine = SimpleNamespace(module=model, optimizer=optimizer, device=torch.device("cpu"), fp16_enabled=lambda: True)
    signals = UpdateSignals(model, max_grad_norm=0.0, beta2=0.95, eps=1e-8)
    metrics = {}
    kept = signals.before(engine, metrics)
    by_group = {}
    for (name, _), g in zip(model.named_parameters(), grads):
        by_group[group_of(name)] = by_group.get(group_of(name), 0.0) + float(g.double().square().sum())
    for group, square in by_group.items():
        assert metrics[f"monitor/grad_norm/{group}"] == pytest.approx(math.sqrt(square), rel=1e-5)
        assert metrics[f"monitor/adam_rms/{group}"] == pytest.approx(1.0, rel=1e-3)  # first step: v_hat = g^2
    flat.sub_(0.01)  # the "optimizer step", on the master copy
    signals.after(engine, kept, metrics)
    offset = 0
    sizes = {}
    for name, p in model.named_parameters():
        g = group_of(name)
        sizes[g] = sizes.get(g, (0, 0.0))
        sizes[g] = (
            sizes[g][0] + p.numel(),
            sizes[g][1] + float((flat[offset : offset + p.numel()] + 0.01).double().square().sum()),
        )
        offset += p.numel()
    for g, (n, square) in sizes.items():
        assert metrics[f"monitor/update_ratio/{g}"] == pytest.approx(0.01 * math.sqrt(n / square), rel=1e-4)
    assert metrics["monitor/loss_scale"] == scale


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("monitor__every_steps", -1, "monitor.every_steps must be 0 (off)"),
        ("monitor__spike_window", 1, "monitor.spike_window must be at least 2"),
        ("monitor__spike_threshold_sd", 0.0, "monitor.spike_threshold_sd must be a positive"),
        (
            "monitor__spike_min_values",
            500,
            "monitor.spike_min_values must lie between 2 and monitor.spike_window (128)",
        ),
        ("train__fault__lr_boost", 0.0, "train.fault.lr_boost must be a positive factor"),
        ("train__fault__lr_boost_at_step", 0, "train.fault.lr_boost_at_step must be a step of at least 1"),
        ("train__fault__repeat_batch_steps", 0, "train.fault.repeat_batch_steps must be at least 1"),
        ("train__gradient_clipping", -1.0, "train.gradient_clipping must be 0 (no clipping) or a positive norm"),
    ],
)
def test_bad_monitor_and_fault_values_fail_in_one_sentence(tmp_path, cache_dir, key, value, fragment):
    with pytest.raises(ConfigError) as err:
        tiny_job(tmp_path, cache_dir, **{key: value})
    message = str(err.value)
    assert fragment in message and "\n" not in message and message.endswith(".")


# --- ZeRO-2 on two gloo ranks: partitioned gradients, weights and Adam state -----------------------


def _rank(rank, port, tmp_path, cache_dir, queue):
    from polypythia.train.distributed import set_rendezvous
    from polypythia.train.loop import train

    set_rendezvous(rank, 2, "127.0.0.1", port)
    cfg = monitored(
        tmp_path,
        cache_dir,
        train__zero_stage=2,
        launcher__workers_per_run=2,
        budget__log_spaced_checkpoints=False,
        budget__checkpoint_every_steps=6,
    )
    record = Record()
    train(cfg, [record])
    queue.put((rank, {s: m for s, m in record.metrics.items() if s in (2, 4)}))


@pytest.mark.integration
def test_zero2_on_two_ranks_matches_one_process(run, tmp_path, cache_dir):
    ranks = dict(on_two_ranks(_rank, tmp_path, cache_dir))
    for step in (2, 4):
        one, two = run.metrics[step], ranks[0][step]
        for key, value in one.items():
            if key.startswith("monitor/") and "/attn_logit_max" not in key and "/logz" not in key:
                assert two[key] == pytest.approx(value, rel=1e-4), (step, key)
                assert ranks[1][step][key] == two[key]  # every rank has the totals


def test_a_spike_becomes_a_tag_on_the_mlflow_run():
    from polypythia.job.run import MLflowCallback

    class Recorder:
        def __init__(self):
            self.tags, self.points = {}, []

        def set_tag(self, run_id, key, value):
            self.tags[key] = value

        def log(self, step, metrics):
            self.points.append((step, metrics))

    recorder = Recorder()
    callback = MLflowCallback(recorder, recorder, "run")
    callback.on_step_end(7, {"train/loss": 3.0})
    callback.on_step_end(8, {"train/loss": 9.0, "monitor/spike/loss": 41.5, "monitor/spike/grad_norm": 12.25})
    assert recorder.tags == {} and len(recorder.points) == 2  # nothing sent from inside the step

    def away(run_id, key, value):
        raise ConnectionError("the tracking server is away")

    recorder.set_tag = away
    callback.send_pending_tags()  # an outage keeps the tag for later, and does not fail the run
    del recorder.set_tag
    callback.on_train_end(None)
    assert recorder.tags == {
        "stability.spike.step8": "grad_norm 12.2 SD, loss 41.5 SD; batch: polypythia-batch --step 8"
    }
