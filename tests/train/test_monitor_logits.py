"""The stability monitor's attention-logit maxima (``ForwardSignals``, batched over layers) against a
straightforward per-layer computation: transformers' ``apply_rotary_pos_emb`` on each layer's q and k,
the scores, an explicit causal mask, the maximum."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import GPTNeoXForCausalLM
from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb

from polypythia.config.jobconfig import model_preset
from polypythia.model import gpt_neox_config
from polypythia.train import monitor
from polypythia.train.monitor import ForwardSignals


def per_layer_maxima(model, drop_rotary=(), unmasked=None) -> tuple[list[float], list]:
    """Forward hooks computing each layer's largest causal logit q.k/sqrt(d) as it runs (in fp32,
    unrotated for the layers in ``drop_rotary``); returns the list that fills and the hook handles.
    ``unmasked``, a list: gets each layer's largest logit over all positions, future ones included."""
    seen, rotary, handles = [], {}, []

    def keep_rotary(layer, module, args, kwargs):
        rotary[layer] = None if layer in drop_rotary else kwargs["position_embeddings"]

    @torch.no_grad()
    def maximum(layer, attn, module, args, qkv):
        batch, length = qkv.shape[:2]
        q, k, _ = qkv.view(batch, length, -1, 3 * attn.head_size).transpose(1, 2).chunk(3, dim=-1)
        q, k = q.float(), k.float()
        if rotary[layer] is not None:
            cos, sin = rotary[layer]
            q, k = apply_rotary_pos_emb(q, k, cos.float(), sin.float())
        with torch.autocast(q.device.type, enabled=False):
            scores = (q @ k.transpose(-1, -2)) * attn.head_size**-0.5
        causal = torch.tensor([[j <= i for j in range(length)] for i in range(length)])
        seen.append(float(scores.masked_fill(~causal, float("-inf")).max()))
        if unmasked is not None:
            unmasked.append(float(scores.max()))

    for i, layer in enumerate(model.gpt_neox.layers):
        attn = layer.attention
        handles.append(attn.register_forward_pre_hook(lambda *a, i=i: keep_rotary(i, *a), with_kwargs=True))
        handles.append(attn.query_key_value.register_forward_hook(lambda *a, i=i, m=attn: maximum(i, m, *a)))
    return seen, handles


def neox(num_layers: int, rotary_pct: float) -> GPTNeoXForCausalLM:
    """A GPT-NeoX of ``num_layers`` layers rotating ``rotary_pct`` of each head, with q and k large enough
    to give logits of order 10."""
    config = gpt_neox_config(num_layers, 64, 4, 512)
    config.rope_parameters["partial_rotary_factor"] = rotary_pct
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(config)
    with torch.no_grad():
        for layer in model.gpt_neox.layers:
            layer.attention.query_key_value.weight.mul_(20)
    assert model.gpt_neox.layers[0].attention.rotary_ndims == int(16 * rotary_pct)
    return model


MODELS = {
    "tiny": lambda: model_preset("tiny").build(512, 1),
    "5 layers, rotary 25%": lambda: neox(5, 0.25),
    "6 layers, rotary 50%": lambda: neox(6, 0.5),
    "4 layers, rotary 100%": lambda: neox(4, 1.0),
}
# FORWARD_CHUNK (fp32 scores) for the batch of 3 x 4 heads x 20 x 20 positions of one layer = 4800:
# every layer in one group, 2 layers a group, one layer scored 2 rows at a time, 1 row at a time.
CHUNKS = {"all layers": 1 << 20, "2 layers": 2 * 4800, "2 rows": 3200, "1 row": 1}


@pytest.mark.parametrize("chunk", CHUNKS.values(), ids=CHUNKS.keys())
@pytest.mark.parametrize("name", MODELS)
def test_logit_maxima_equal_a_per_layer_computation(name, chunk, monkeypatch):
    monkeypatch.setattr(monitor, "FORWARD_CHUNK", chunk)
    model = MODELS[name]().train()
    unmasked = []
    expected, handles = per_layer_maxima(model, unmasked=unmasked)
    metrics = {}
    with ForwardSignals(model).watch(metrics):  # the training forward: grad on
        model(input_ids=torch.randint(0, 512, (3, 20), generator=torch.Generator().manual_seed(2)))
    for handle in handles:
        handle.remove()
    got = [metrics[f"monitor/attn_logit_max/layer{i}"] for i in range(len(expected))]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-6, atol=0)
    assert metrics["monitor/attn_logit_max"] == max(got) and max(got) > 1
    assert any(u > e for u, e in zip(unmasked, expected))  # the mask matters for these logits
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_logit_maxima_under_autocast_are_fp32_scores_of_the_low_precision_qkv(dtype):
    model = neox(4, 0.25).train()
    unmasked = []
    expected, handles = per_layer_maxima(model, unmasked=unmasked)
    metrics = {}
    with torch.autocast("cpu", dtype=dtype), ForwardSignals(model).watch(metrics):
        model(input_ids=torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(3)))
    for handle in handles:
        handle.remove()
    got = [metrics[f"monitor/attn_logit_max/layer{i}"] for i in range(4)]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-6, atol=0)
    assert any(u > e for u, e in zip(unmasked, expected))  # the mask matters for these logits


@pytest.mark.parametrize("chunk", [1 << 20, 1], ids=["all layers", "1 row"])
def test_layers_handed_no_rotary_are_scored_unrotated(chunk, monkeypatch):
    """A layer whose attention got no ``position_embeddings`` keyword (here: dropped) is scored without
    rotation, between rotated ones."""
    monkeypatch.setattr(monitor, "FORWARD_CHUNK", chunk)
    keep = ForwardSignals._keep_rotary

    def drop_layer_1(found, layer, module, args, kwargs):
        keep(found, layer, module, args, {} if layer == 1 else kwargs)

    monkeypatch.setattr(ForwardSignals, "_keep_rotary", staticmethod(drop_layer_1))
    model = neox(4, 0.25)
    expected, handles = per_layer_maxima(model, drop_rotary={1})
    metrics = {}
    with torch.no_grad(), ForwardSignals(model).watch(metrics):
        model(input_ids=torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(4)))
    for handle in handles:
        handle.remove()
    got = [metrics[f"monitor/attn_logit_max/layer{i}"] for i in range(4)]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-6, atol=0)
    unrotated, _ = per_layer_maxima(model, drop_rotary={0, 1, 2, 3})
    with torch.no_grad():
        model(input_ids=torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(4)))
    assert unrotated[0] != expected[0] and unrotated[1] == expected[1]  # the drop changes what it should


class _OpCount(TorchDispatchMode):
    """The number of aten ops dispatched while active (backward included)."""

    count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def probe_ops(num_layers: int) -> int:
    """The aten ops the probe adds to a training forward and backward pass of a ``num_layers`` model."""
    model, x = neox(num_layers, 0.25).train(), torch.randint(0, 512, (1, 16))
    counts = []
    for probed in (False, True):
        model(input_ids=x).logits.sum().backward()  # warm-up
        with _OpCount() as ops, ForwardSignals(model).watch({}) if probed else nullcontext():
            model(input_ids=x).logits.sum().backward()
        counts.append(ops.count)
    return counts[1] - counts[0]


def test_the_probes_op_count_does_not_grow_with_the_layers():
    """All layers' logits are scored in one batched pass: 2 or 6 layers, the same ops (about 50;
    scored layer by layer, it was about 44 more per layer)."""
    assert probe_ops(2) == probe_ops(6) < 60
