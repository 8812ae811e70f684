"""The interventions against instabilities (issue #23): qk-layernorm (polypythia.qknorm), the z-loss
(train.z_loss) and the skip-step action (monitor.action=skip_step, polypythia.train.skipstep)."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import on_two_ranks, record_attention_logit_maxima, tiny_job, train_here

from polypythia.config.monitor import MonitorConfig
from polypythia.errors import ConfigError
from polypythia.train.callbacks import Callback
from polypythia.train.skipstep import SkipStepAdamW, SkipStepRule, min_previous_values

OLMO = MonitorConfig()  # the default skip rule: OLMo-core's 6 SDs over the previous 128 values
PROBE = torch.arange(40).reshape(2, 20) % 97  # a fixed input for comparing logits


class Record(Callback):
    """Every step's metrics; the logits of the initial model on step 1's rows; the weights around
    chosen steps; the logits of :data:`PROBE` at each checkpoint."""

    priority = -1000

    def __init__(self, watch_steps=()):
        self.metrics, self.first_rows, self.first_logits, self.checkpoints = {}, None, None, {}
        self.watch_steps, self.weights, self.adam_steps = set(watch_steps), {}, {}

    def on_train_start(self, start):
        self.engine = start.engine

    def on_batch(self, step, rows):
        module = self.engine.module
        if step == 1 and self.first_rows is None:
            with torch.no_grad():
                self.first_rows = torch.from_numpy(rows.copy())
                self.first_logits = module(input_ids=self.first_rows[:, :-1]).logits.double()
        if step in self.watch_steps:
            self.weights[("before", step)] = [p.detach().clone() for p in module.parameters()]
            self.adam_steps[("before", step)] = _adam_steps(self.engine)
        return rows

    def on_step_end(self, step, metrics):
        self.metrics[step] = dict(metrics)
        if step in self.watch_steps:
            self.weights[("after", step)] = [p.detach().clone() for p in self.engine.module.parameters()]
            self.adam_steps[("after", step)] = _adam_steps(self.engine)

    def on_checkpoint(self, step, path, model):
        with torch.no_grad():
            self.checkpoints[step] = (path, model(input_ids=PROBE).logits.clone())


def _adam_steps(engine) -> list[float]:
    return [float(s["step"]) for s in engine.optimizer.state.values() if "step" in s]


# --- qk-layernorm ---------------------------------------------------------------------------------


def test_qk_layernorm_normalises_each_heads_queries_and_keys_and_keeps_the_plain_weights():
    from polypythia.model import build_model

    plain, qk = build_model(2, 64, 4, 512, 7), build_model(2, 64, 4, 512, 7, qk_layernorm=True)
    shared = dict(plain.named_parameters())
    extra = [n for n, _ in qk.named_parameters() if n not in shared]
    assert len(extra) == 2 * 2 * 2  # per layer: weight and bias of the query norm and of the key norm
    assert all(torch.equal(p, shared[n]) for n, p in qk.named_parameters() if n in shared)  # one seed, same start

    linear = qk.gpt_neox.layers[0].attention.query_key_value
    with torch.no_grad():
        linear.q_layernorm.weight.uniform_(0.5, 2.0)
        linear.k_layernorm.bias.uniform_(-1.0, 1.0)
        x = torch.randn(3, 5, 64)
        out = linear(x).view(3, 5, 4, 3, 16)  # GPT-NeoX's layout: per head, query | key | value
        raw = torch.nn.functional.linear(x, linear.weight, linear.bias).view(3, 5, 4, 3, 16)
    for part, norm in ((0, linear.q_layernorm), (1, linear.k_layernorm)):
        mean = raw[..., part, :].mean(-1, keepdim=True)
        var = raw[..., part, :].var(-1, unbiased=False, keepdim=True)
        expected = (raw[..., part, :] - mean) / torch.sqrt(var + 1e-5) * norm.weight + norm.bias
        torch.testing.assert_close(out[..., part, :], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[..., 2, :], raw[..., 2, :])  # values untouched


def test_the_monitor_measures_attention_logits_after_the_norm(monkeypatch):
    """monitor/attn_logit_max of a qk-layernorm model: the logits of the queries and keys attention
    actually uses (normalised, then rotated), not of the raw projection."""
    from polypythia.model import build_model
    from polypythia.train.monitor import ForwardSignals

    model = build_model(2, 64, 4, 512, 1, attn_implementation="eager", qk_layernorm=True)
    with torch.no_grad():
        for layer in model.gpt_neox.layers:  # norms that change the logits a lot
            layer.attention.query_key_value.q_layernorm.weight.fill_(3.0)
            layer.attention.query_key_value.k_layernorm.weight.fill_(2.0)
    seen = record_attention_logit_maxima(monkeypatch)
    metrics = {}
    with torch.no_grad(), ForwardSignals(model).watch(metrics):
        model(input_ids=torch.randint(0, 512, (3, 20)))
    assert len(seen) == 2
    for layer, value in enumerate(seen):
        assert metrics[f"monitor/attn_logit_max/layer{layer}"] == pytest.approx(value, rel=1e-5)


# --- the z-loss -------------------------------------------------------------------------------------


def test_z_loss_is_the_coefficient_times_mean_log_z_squared_and_train_loss_stays_cross_entropy(tmp_path, cache_dir):
    """A tiny qk-layernorm run with z-loss 1e-4: step 1's train/z_loss and train/loss against a hand
    computation on the initial model; its checkpoints say how to load them and load to the same logits."""
    from transformers import AutoModelForCausalLM, GPTNeoXForCausalLM

    from polypythia.qknorm import LOADING_NOTE, MODEL_TYPE, QKNormGPTNeoXForCausalLM

    cfg = tiny_job(tmp_path, cache_dir, train__z_loss=1e-4, model__qk_layernorm=True, monitor__every_steps=2)
    record = Record()
    train_here(cfg, [record])
    logits, targets = record.first_logits, record.first_rows[:, 1:]
    log_z = torch.logsumexp(logits, dim=-1)
    assert record.metrics[1]["train/z_loss"] == pytest.approx(1e-4 * float((log_z**2).mean()), rel=1e-5)
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    assert record.metrics[1]["train/loss"] == pytest.approx(float(ce), rel=1e-5)
    assert all("train/z_loss" in m and m["monitor/attn_logit_max"] > 0 for s, m in record.metrics.items() if s % 2 == 0)

    path, trained = record.checkpoints[cfg.budget.steps]
    folder = Path(path)
    assert MODEL_TYPE in (folder / LOADING_NOTE).read_text() and LOADING_NOTE in json.loads(
        (folder / "MANIFEST.json").read_text()
    )
    assert json.loads((folder / "config.json").read_text())["model_type"] == MODEL_TYPE
    with torch.no_grad():
        for cls in (AutoModelForCausalLM, QKNormGPTNeoXForCausalLM):
            loaded = cls.from_pretrained(folder)
            assert isinstance(loaded, QKNormGPTNeoXForCausalLM)
            assert torch.equal(loaded(input_ids=PROBE).logits, trained)
        plain = GPTNeoXForCausalLM.from_pretrained(folder)  # what LOADING.md warns against: other logits
        assert not torch.allclose(plain(input_ids=PROBE).logits, trained)


def _reference_train_step(engine, forward, rows, micro_batch_size, probes=(), z_loss=0.0, skip=None):
    """train_step as it was before the z-loss and skip-step (the plain cross-entropy step)."""
    from polypythia.train.distributed import global_mean
    from polypythia.train.step import _reported_grad_norm

    assert not probes and skip is None and z_loss == 0.0
    losses = []
    for i in range(0, len(rows), micro_batch_size):
        batch = torch.from_numpy(rows[i : i + micro_batch_size])
        logits = forward(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach())
    return global_mean(torch.stack(losses).mean()), _reported_grad_norm(engine, None), {}


def test_without_z_loss_the_step_is_the_plain_step_bit_for_bit_and_a_plain_checkpoint_loads_as_gpt_neox(
    tmp_path, cache_dir, monkeypatch
):
    from transformers import GPTNeoXForCausalLM

    import polypythia.train.loop as loop

    settings = {"monitor__every_steps": 0, "monitor__spikes": False}
    ours = Record()
    train_here(tiny_job(tmp_path / "ours", cache_dir, **settings), [ours])
    monkeypatch.setattr(loop, "train_step", _reference_train_step)
    reference = Record()
    train_here(tiny_job(tmp_path / "reference", cache_dir, **settings), [reference])
    assert [m["train/loss"] for m in ours.metrics.values()] == [m["train/loss"] for m in reference.metrics.values()]
    assert not any("train/z_loss" in m or "train/skipped_step" in m for m in ours.metrics.values())

    path, trained = ours.checkpoints[6]
    assert json.loads((Path(path) / "config.json").read_text())["model_type"] == "gpt_neox"
    assert not (Path(path) / "LOADING.md").exists()
    with torch.no_grad():
        assert torch.equal(GPTNeoXForCausalLM.from_pretrained(path)(input_ids=PROBE).logits, trained)


# --- the skip-step rule ----------------------------------------------------------------------------


def _olmo_step_factors(losses, grad_norms, window=128, sigma=6.0):
    """OLMo-core's ``SkipStepOptimizer.get_step_factor`` transcribed (src/olmo_core/optim/
    skip_step_optimizer.py): lists of at most window + 1 values, the last one the current."""
    kept_l, kept_g, factors = [], [], []
    for loss, grad_norm in zip(losses, grad_norms):
        kept_l, kept_g = (
            (kept_l + [torch.tensor(loss, dtype=torch.float64)])[-(window + 1) :],
            (kept_g + [torch.tensor(grad_norm, dtype=torch.float64)])[-(window + 1) :],
        )
        if len(kept_l) < max(2, window // 2):
            factors.append(1.0)
            continue
        l_std, l_mean = torch.std_mean(torch.stack(kept_l[:-1]))
        g_std, g_mean = torch.std_mean(torch.stack(kept_g[:-1]))
        factors.append(float(((kept_l[-1] - l_mean) <= sigma * l_std) & ((kept_g[-1] - g_mean) <= sigma * g_std)))
    return factors


def _noisy_run(seed, steps=600):
    """A falling loss and a grad norm with noise, and spikes of random heights planted in either."""
    rng = random.Random(seed)
    losses = [4 + 3 * math.exp(-s / 150) + rng.gauss(0, 0.05) for s in range(steps)]
    grad_norms = [1 + rng.gauss(0, 0.1) for _ in range(steps)]
    for s in rng.sample(range(30, steps), 40):
        series, sd = (losses, 0.05) if rng.random() < 0.5 else (grad_norms, 0.1)
        series[s] += rng.uniform(2, 15) * sd
    return losses, grad_norms


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_skip_rule_decides_as_olmo_core(seed):
    losses, grad_norms = _noisy_run(seed)
    rule = SkipStepRule(OLMO.skip_window, OLMO.skip_threshold_sd)
    ours = [0.0 if rule.decide(loss, g) else 1.0 for loss, g in zip(losses, grad_norms)]
    assert ours == _olmo_step_factors(losses, grad_norms)
    assert 0 < ours.count(0.0) < 40  # some planted spikes skip, the lower ones do not


def test_the_skip_rule_waits_for_64_values_uses_the_sample_sd_is_one_sided_and_keeps_skipped_values():
    assert min_previous_values(128) == 63
    base = [1.0, 2.0] * 40  # mean 1.5; population SD 0.5, sample SD a little more
    rule = SkipStepRule(OLMO.skip_window, OLMO.skip_threshold_sd)
    for value in base[:62]:
        assert not rule.decide(value, 1.0 + value)
    assert not rule.decide(100.0, 1.0)  # 63rd value: no verdict yet, but it enters the window
    assert len(rule.loss.values) == 63

    rule = SkipStepRule(OLMO.skip_window, OLMO.skip_threshold_sd)
    for value in base[:63]:
        rule.decide(value, 1.0 + value)
    n, mean = 63, sum(base[:63]) / 63
    pop_sd = math.sqrt(sum((v - mean) ** 2 for v in base[:63]) / n)
    sample_sd = pop_sd * math.sqrt(n / (n - 1))
    between = mean + 6 * (pop_sd + sample_sd) / 2  # a spike by the population SD, not by the sample SD
    assert not rule.decide(between, 1.5)
    assert rule.decide(mean + 20 * sample_sd, 1.5)  # well above: skipped ...
    assert rule.loss.values[-1] == mean + 20 * sample_sd  # ... and still in the window
    assert not rule.decide(-100.0, 1.5)  # far below: no reason to skip
    assert rule.decide(1.5, 1e6)  # the gradient norm alone skips too


def test_the_skip_rule_state_round_trips_through_json():
    losses, grad_norms = _noisy_run(5, steps=300)
    whole, first = (
        SkipStepRule(OLMO.skip_window, OLMO.skip_threshold_sd),
        SkipStepRule(OLMO.skip_window, OLMO.skip_threshold_sd),
    )
    for loss, g in zip(losses[:150], grad_norms[:150]):
        whole.decide(loss, g)
        first.decide(loss, g)
    resumed = SkipStepRule(OLMO.skip_window, OLMO.skip_threshold_sd)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert [whole.decide(loss, g) for loss, g in zip(losses[150:], grad_norms[150:])] == [
        resumed.decide(loss, g) for loss, g in zip(losses[150:], grad_norms[150:])
    ]


def test_a_skipped_adamw_step_changes_neither_weights_nor_moments_nor_its_step_count():
    torch.manual_seed(0)
    weights = torch.randn(5, 3)
    ours_p, ref_p = torch.nn.Parameter(weights.clone()), torch.nn.Parameter(weights.clone())
    ours, ref = SkipStepAdamW([ours_p], lr=0.1, weight_decay=0.1), torch.optim.AdamW([ref_p], lr=0.1, weight_decay=0.1)
    ours.gate = SimpleNamespace(should_skip=lambda: decision)
    for decision in (False, True, False):
        grad = torch.randn(5, 3)
        ours_p.grad, ref_p.grad = grad.clone(), grad.clone()
        before = (ours_p.detach().clone(), {k: v.clone() for k, v in ours.state[ours_p].items()})
        ours.step()
        if decision:
            assert torch.equal(ours_p, before[0])
            assert all(torch.equal(v, before[1][k]) for k, v in ours.state[ours_p].items())
        else:
            ref.step()
            assert torch.equal(ours_p, ref_p) and float(ours.state[ours_p]["step"]) == float(ref.state[ref_p]["step"])
    assert float(ours.state[ours_p]["step"]) == 2.0


# --- the skip-step action in a job -------------------------------------------------------------------


SKIP_SETTINGS = {
    "budget__steps": 12,
    "budget__checkpoint_every_steps": 6,
    "budget__log_spaced_checkpoints": False,
    "monitor__action": "skip_step",
    "monitor__skip_window": 8,
    "monitor__every_steps": 0,
    "train__fault__repeat_batch_at_step": 10,
}


@pytest.mark.integration
def test_a_forced_high_step_is_skipped_and_the_windows_survive_a_resume(tmp_path, cache_dir):
    """A tiny 12-step job with monitor.action=skip_step (window 8, so a verdict from 4 values on): step 10
    trains on a batch of one repeated token (fault injection), whose gradient norm lies far above the
    previous ones; its update is skipped (weights and Adam's step count unchanged), train/skipped_step
    says so, and a run resumed from step 6 skips the same step and ends with the same windows."""
    cfg = tiny_job(tmp_path, cache_dir, **SKIP_SETTINGS)
    record = Record(watch_steps=(9, 10))
    train_here(cfg, [record])
    skipped = [s for s, m in record.metrics.items() if m["train/skipped_step"]]
    assert skipped == [10]
    assert all(torch.equal(a, b) for a, b in zip(record.weights[("before", 10)], record.weights[("after", 10)]))
    assert record.adam_steps[("after", 10)] == record.adam_steps[("before", 10)] == record.adam_steps[("after", 9)]
    assert not all(torch.equal(a, b) for a, b in zip(record.weights[("before", 9)], record.weights[("after", 9)]))

    final = Path(cfg.run_dir) / "checkpoints" / "step12"
    state = json.loads((final / "trainer_state.json").read_text())
    windows, monitor_windows = state["skip_step"], state["stability_monitor"]
    assert len(windows["loss"]["values"]) == 8 and windows["loss"]["values"][-1] == record.metrics[12]["train/loss"]
    shutil.rmtree(final)
    resumed = Record()
    train_here(cfg, [resumed])  # from step 6
    assert min(resumed.metrics) == 7 and [s for s, m in resumed.metrics.items() if m["train/skipped_step"]] == [10]
    resumed_state = json.loads((final / "trainer_state.json").read_text())
    assert resumed_state["skip_step"] == windows
    # the stability monitor's spike windows (monitor.spikes, on by default) survive the resume too:
    # all 12 steps' values, not only the 6 the resumed run saw
    spikes = resumed_state["stability_monitor"]
    assert spikes == monitor_windows and len(spikes["train/loss"]["values"]) == 12


def _zero2_rank(rank, port, tmp_path, cache_dir, queue):
    from polypythia.train.distributed import set_rendezvous
    from polypythia.train.loop import train

    set_rendezvous(rank, 2, "127.0.0.1", port)
    cfg = tiny_job(tmp_path, cache_dir, **SKIP_SETTINGS, train__zero_stage=2, launcher__workers_per_run=2)
    record = Record(watch_steps=(10,))
    train(cfg, [record])
    unchanged = all(torch.equal(a, b) for a, b in zip(record.weights[("before", 10)], record.weights[("after", 10)]))
    state = json.loads((Path(cfg.run_dir) / "checkpoints" / "step12" / "trainer_state.json").read_text())
    logged = [record.metrics[s]["train/grad_norm"] for s in range(5, 13)]  # the window: the last 8 steps' norms
    unchanged = unchanged and (
        rank != 0 or state["skip_step"]["grad_norm"]["values"] == pytest.approx(logged, rel=1e-6)
    )
    queue.put((rank, [s for s, m in record.metrics.items() if m["train/skipped_step"]], unchanged))


@pytest.mark.integration
def test_skip_step_at_zero2_on_two_ranks_reads_deepspeeds_gradient_norm(tmp_path, cache_dir):
    """At ZeRO-2 the gradient norm is the one DeepSpeed's ZeRO optimizer computed for the step (the
    torch optimizer it wraps is called once per parameter group): the window holds the logged gradient
    norms, and both ranks skip step 10, and only it, without changing the weights."""
    assert sorted(on_two_ranks(_zero2_rank, tmp_path, cache_dir)) == [(0, [10], True), (1, [10], True)]


@pytest.mark.parametrize(
    "key, value, fragment",
    [
        ("train__z_loss", -1e-4, "train.z_loss"),
        ("monitor__action", "skip", "monitor.action"),
        ("monitor__skip_window", 3, "monitor.skip_window"),
        ("monitor__skip_threshold_sd", 0.0, "monitor.skip_threshold_sd"),
    ],
)
def test_bad_intervention_values_fail_in_one_sentence(tmp_path, cache_dir, key, value, fragment):
    with pytest.raises(ConfigError) as err:
        tiny_job(tmp_path, cache_dir, **{key: value})
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_skip_step_needs_no_cross_seed_monitor_and_the_driver_leaves_it_alone(tmp_path, cache_dir):
    cfg = tiny_job(tmp_path, cache_dir, monitor__action="skip_step", monitor__cross_seed=False)
    assert cfg.monitor.action == "skip_step"
    from polypythia.config.monitor import DRIVER_ACTIONS

    assert "skip_step" not in DRIVER_ACTIONS
