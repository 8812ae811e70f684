"""GPT-NeoX with qk-layernorm: a LayerNorm on each head's queries and keys before attention.

``model.qk_layernorm=true`` builds this network instead of the plain Pythia one (off by default:
the Pythia recipe stays exact). Queries and keys are normalised over each head's ``head_dim``
(one LayerNorm of ``head_dim`` for queries and one for keys, shared by the heads of a layer),
before the rotary embedding, as OLMo-core's ``use_head_qk_norm`` (https://github.com/allenai/OLMo-core,
``src/olmo_core/nn/attention/__init__.py``: ``q_norm``/``k_norm`` of size ``head_dim`` applied to the
per-head views, then RoPE). Wortsman et al. 2023 ("Small-scale proxies for large-scale Transformer
training instabilities", https://arxiv.org/abs/2309.14322) show that qk-layernorm prevents the
attention-logit growth that makes small Transformers diverge at high learning rates (after
Dehghani et al. 2023, https://arxiv.org/abs/2302.05442).

Everything else is transformers' own ``GPTNeoXForCausalLM``: the norms live inside the attention's
fused ``query_key_value`` projection (:class:`QKNormLinear`, an ``nn.Linear`` whose output has its
query and key parts normalised), so transformers' attention code, rotary embedding and attention
kernels run unchanged, and every hook on ``query_key_value`` (the stability monitor's attention-logit
probe) sees the normalised queries and keys that attention uses.

The network has a config class of its own (``model_type`` :data:`MODEL_TYPE`) registered with
transformers' ``AutoConfig`` and ``AutoModelForCausalLM`` when this module is imported, so
``AutoModelForCausalLM.from_pretrained`` loads its checkpoints in any process that imported
polypythia; each such checkpoint carries a ``LOADING.md`` (:func:`write_loading_note`) that says so.
A plain Pythia checkpoint is untouched by all this (``model_type`` ``gpt_neox``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM

MODEL_TYPE = "polypythia_gpt_neox_qknorm"
LOADING_NOTE = "LOADING.md"


class QKNormGPTNeoXConfig(GPTNeoXConfig):
    """A GPT-NeoX config whose attention normalises queries and keys per head (``qk_layernorm``)."""

    model_type = MODEL_TYPE

    def __init__(self, qk_layernorm: bool = True, **kwargs):
        self.qk_layernorm = qk_layernorm
        super().__init__(**kwargs)


class QKNormLinear(nn.Linear):
    """GPT-NeoX's fused query/key/value projection, then a LayerNorm over ``head_dim`` on the query
    and key parts of each head. The output keeps GPT-NeoX's layout (per head: query, key, value,
    ``head_dim`` each), which transformers' attention splits as before."""

    def __init__(self, hidden_size: int, num_heads: int, bias: bool, eps: float):
        super().__init__(hidden_size, 3 * hidden_size, bias=bias)
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.q_layernorm = nn.LayerNorm(self.head_dim, eps=eps)
        self.k_layernorm = nn.LayerNorm(self.head_dim, eps=eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv = super().forward(hidden_states)
        heads = qkv.view(*qkv.shape[:-1], self.num_heads, 3, self.head_dim)
        query, key, value = heads.unbind(-2)
        normed = torch.stack([self.q_layernorm(query), self.k_layernorm(key), value], dim=-2)
        return normed.view(qkv.shape)


class QKNormGPTNeoXForCausalLM(GPTNeoXForCausalLM):
    """transformers' ``GPTNeoXForCausalLM`` with :class:`QKNormLinear` as every layer's
    ``attention.query_key_value``; parameter names gain ``...query_key_value.q_layernorm.*`` and
    ``...k_layernorm.*`` and keep every other GPT-NeoX name."""

    config_class = QKNormGPTNeoXConfig

    def __init__(self, config: QKNormGPTNeoXConfig):
        super().__init__(config)
        for layer in self.gpt_neox.layers:
            old = layer.attention.query_key_value
            new = QKNormLinear(
                config.hidden_size, config.num_attention_heads, old.bias is not None, config.layer_norm_eps
            )
            new.to(device=old.weight.device, dtype=old.weight.dtype)
            with torch.no_grad():  # keep whatever transformers initialised it with
                new.weight.copy_(old.weight)
                if old.bias is not None:
                    new.bias.copy_(old.bias)
            layer.attention.query_key_value = new


AutoConfig.register(MODEL_TYPE, QKNormGPTNeoXConfig)
AutoModelForCausalLM.register(QKNormGPTNeoXConfig, QKNormGPTNeoXForCausalLM)


def qk_config(config: GPTNeoXConfig) -> QKNormGPTNeoXConfig:
    """The qk-layernorm config of the network ``config`` describes (same sizes and recipe)."""
    values = config.to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        values.pop(key, None)
    return QKNormGPTNeoXConfig(qk_layernorm=True, **values)


def write_loading_note(directory: str | Path) -> None:
    """``LOADING.md`` in a qk-layernorm checkpoint folder: how to load it (a plain
    ``GPTNeoXForCausalLM.from_pretrained`` would drop the query/key norms)."""
    text = f"""# Loading this checkpoint

This is a GPT-NeoX (Pythia-shaped) network trained by polypythia with **qk-layernorm**
(`model.qk_layernorm=true`): a LayerNorm over each head's dimensions on the queries and keys,
before the rotary embedding. Its `config.json` has `"model_type": "{MODEL_TYPE}"`.

Load it with polypythia installed; importing `polypythia.qknorm` registers the model type with
transformers' Auto classes:

```python
import polypythia.qknorm  # noqa: F401  (registers {MODEL_TYPE})
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("<this folder>")
# or: polypythia.qknorm.QKNormGPTNeoXForCausalLM.from_pretrained("<this folder>")
```

Do not load it with `GPTNeoXForCausalLM.from_pretrained`: that class has no query/key norms, would
leave the `q_layernorm`/`k_layernorm` weights unused and compute other logits.
"""
    (Path(directory) / LOADING_NOTE).write_text(text)
