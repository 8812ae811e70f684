"""The sections of a job's configuration (model, budget, data, train, tracking, launcher; monitor and
train.fault in modules of their own): typed fields, their defaults and their checks. :mod:`polypythia.config.jobconfig` assembles them into one
:class:`~polypythia.config.jobconfig.JobConfig`, registers the defaults with Hydra and validates; see its
docstring for why the defaults live here rather than in YAML.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from omegaconf import MISSING

from polypythia.config.fault import FaultConfig
from polypythia.config.monitor import MonitorConfig as MonitorConfig  # a section, in its own module
from polypythia.config.preflight import is_file_store, tokenizer_file_size
from polypythia.errors import ConfigError
from polypythia.recipe import (
    ATTN_IMPLEMENTATION,
    PYTHIA_MAX_POSITIONS,
    PYTHIA_VOCAB_SIZE,
    VOCAB_MULTIPLE,
    padded_vocab_size,
)
from polypythia.runtime import env as runtime_env

if TYPE_CHECKING:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM


@dataclass
class ModelConfig:
    """A GPT-NeoX network of the Pythia suite's shape; the sizes are the YAML files in ``conf/model/``."""

    name: str = MISSING
    num_layers: int = MISSING
    hidden_size: int = MISSING
    num_heads: int = MISSING
    lr: float = MISSING  # peak learning rate of the cosine schedule
    # null: the tokenizer's vocabulary padded to a multiple of 128, as GPT-NeoX does (recipe.padded_vocab_size)
    vocab_size: Optional[int] = None
    max_positions: int = PYTHIA_MAX_POSITIONS
    # LayerNorm on each head's queries and keys (polypythia.qknorm; Wortsman et al. 2023); not Pythia's recipe
    qk_layernorm: bool = False

    def check(self) -> None:
        for key in ("num_layers", "hidden_size", "num_heads"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.{key} must be at least 1, got {getattr(self, key)}.")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_heads ({self.num_heads})."
            )
        if not self.lr > 0:
            raise ConfigError(f"model.lr must be positive, got {self.lr}.")
        if self.max_positions < 1:
            raise ConfigError(f"model.max_positions must be at least 1, got {self.max_positions}.")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ConfigError(
                f"model.vocab_size must be at least 1, or null for the tokenizer's vocabulary padded to a "
                f"multiple of {VOCAB_MULTIPLE}, got {self.vocab_size}."
            )

    def padded_vocab_size(self, tokenizer_vocab_size: int) -> int:
        """``vocab_size``, or (null) the tokenizer's vocabulary padded (:func:`polypythia.recipe.padded_vocab_size`)."""
        return self.vocab_size or padded_vocab_size(tokenizer_vocab_size)

    def gpt_neox_config(self, vocab_size: int = PYTHIA_VOCAB_SIZE) -> GPTNeoXConfig:
        """The transformers config of this network with ``vocab_size`` embedding rows."""
        from polypythia.model import gpt_neox_config

        return gpt_neox_config(self.num_layers, self.hidden_size, self.num_heads, vocab_size, self.max_positions)

    def build(
        self, vocab_size: int, weight_seed: int, attn_implementation: str = ATTN_IMPLEMENTATION
    ) -> GPTNeoXForCausalLM:
        """The network with Pythia's initialisation, its weights decided by ``weight_seed`` alone."""
        from polypythia.model import build_model

        return build_model(
            self.num_layers,
            self.hidden_size,
            self.num_heads,
            vocab_size,
            weight_seed,
            self.max_positions,
            attn_implementation,
            self.qk_layernorm,
        )


@dataclass
class BudgetConfig:
    """How long and on how many tokens a job trains; the budgets are the YAML files in ``conf/budget/``.

    The schedule's shape is Pythia's (GPT-NeoX configs: ``"warmup": 0.01``, ``min_lr`` a tenth of
    the peak ``lr``, ``extra-save-iters`` 0, 1, 2, 4, ..., 512); its length and batch have no default.
    """

    name: str = MISSING
    steps: int = MISSING
    global_batch_size: int = MISSING  # sequences per optimizer step, summed over workers
    micro_batch_size: int = MISSING  # sequences per forward pass on one worker
    seq_length: int = MISSING
    warmup_fraction: float = 0.01
    min_lr_ratio: float = 0.1
    checkpoint_every_steps: int = MISSING
    log_spaced_checkpoints: bool = True  # steps 0, 1, 2, 4, ..., 512 as in Pythia

    def check(self, workers: int) -> None:
        if self.steps < 1:
            raise ConfigError(
                f"budget.steps must be at least 1, got {self.steps}; pick another budget or set budget.steps."
            )
        for key in ("global_batch_size", "micro_batch_size", "seq_length", "checkpoint_every_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"budget.{key} must be at least 1, got {getattr(self, key)}.")
        if self.global_batch_size % (self.micro_batch_size * workers):
            raise ConfigError(
                f"budget.global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"budget.micro_batch_size x launcher.workers_per_run ({self.micro_batch_size} x {workers})."
            )
        if not 0 <= self.warmup_fraction < 1 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("budget.warmup_fraction must lie in [0, 1) and budget.min_lr_ratio in [0, 1].")


@dataclass
class DataConfig:
    # "embedded": corpus and tokenizer built from Python's own text; "indexed": a .bin/.idx pair.
    kind: str = "embedded"
    path: Optional[str] = None  # prefix of the .bin/.idx pair (kind=indexed)
    tokenizer: Optional[str] = None  # a Hugging Face tokenizer.json (kind=indexed)
    vocab_size: int = 8192  # of the embedded tokenizer (unused for indexed data: the tokenizer file decides)
    cache_dir: str = "${home}/cache"
    valid_fraction: float = 0.01

    def check(self) -> None:
        if self.kind not in ("embedded", "indexed"):
            raise ConfigError(f"data.kind must be 'embedded' or 'indexed', got '{self.kind}'.")
        if self.kind == "indexed":
            if not self.path:
                raise ConfigError("data.path is required for data=indexed: the prefix of a .bin/.idx pair.")
            for suffix in (".bin", ".idx"):
                if not os.path.isfile(self.path + suffix):
                    raise ConfigError(
                        f"data.path={self.path} has no {suffix} file ({self.path}{suffix}); give the "
                        "common prefix of an existing .bin/.idx pair or build one with polypythia-prepare."
                    )
            if not self.tokenizer or not os.path.isfile(self.tokenizer):
                raise ConfigError(
                    f"data.tokenizer={self.tokenizer} is not a file; give the path of the dataset's tokenizer.json."
                )
            from polypythia.data.indexed import check_indexed_files
            from polypythia.errors import DataError

            try:  # the header against the file sizes: a few bytes read, however large the dataset
                check_indexed_files(self.path)
            except DataError as exc:
                raise ConfigError(f"data.path={self.path}: {exc}") from None
        if not 0 <= self.valid_fraction < 1:
            raise ConfigError(f"data.valid_fraction must lie in [0, 1), got {self.valid_fraction}.")

    def tokenizer_vocab_size(self) -> tuple[int, str]:
        """(size, which tokenizer) of the tokenizer the job will train with, found cheaply: the
        tokenizer file of indexed data, or of the embedded corpus once its cache is built; before
        that, ``data.vocab_size``, the size the embedded tokenizer will be trained to."""
        if self.kind == "indexed":
            return tokenizer_file_size(self.tokenizer), f"the tokenizer {self.tokenizer}"
        from polypythia.data.embedded import embedded_dir

        folder = embedded_dir(self.cache_dir, self.vocab_size)
        if (folder / "COMPLETE").is_file() and (folder / "tokenizer.json").is_file():
            return tokenizer_file_size(
                str(folder / "tokenizer.json")
            ), f"the embedded tokenizer {folder / 'tokenizer.json'}"
        return self.vocab_size, "the embedded tokenizer (data.vocab_size; its corpus is not built yet)"


@dataclass
class TrainConfig:
    """The Pythia optimiser recipe (EleutherAI/pythia ``models/*/pythia-*.yml``, GPT-NeoX): Adam
    (0.9, 0.95), eps 1e-8, weight decay 0.1, gradient clipping 1.0, ZeRO stage 1; fp16 with dynamic
    loss scaling on GPU, fp32 on CPU."""

    precision: str = "auto"  # auto: fp16 with loss scaling on GPU (as Pythia), fp32 on CPU; or fp32, fp16, bf16
    zero_stage: int = 1
    # one worker in bf16/fp16: fp32 weights + torch.autocast at ZeRO 0; false: DeepSpeed's bf16/fp16 weights
    autocast: bool = True  # (polypythia/train/engine.py autocast_dtype)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1.0e-8
    weight_decay: float = 0.1
    gradient_clipping: float = 1.0
    z_loss: float = (
        0.0  # coefficient of log(Z)^2 of the output softmax added to the loss (PaLM: 1e-4); 0: off, as Pythia
    )
    attn_implementation: str = ATTN_IMPLEMENTATION  # "sdpa" (torch's fused kernel), "eager", ...
    activation_checkpointing: bool = False
    compile: bool = False
    threads: Optional[int] = None  # torch intra-op threads; null: the CPUs Ray gave the job
    peak_tflops: Optional[float] = None  # per GPU, for train/mfu; null: looked up from the GPU's name (H100: 989)
    loss_ceiling: Optional[float] = None  # stop when the loss stays above this ...
    loss_ceiling_steps: int = 10  # ... for this many consecutive steps
    eval_every_checkpoint: bool = True  # validation loss at each checkpoint
    valid_max_rows: int = 64
    # after training: downstream tasks (lm-eval, offline) and the rest of `python -m polypythia.evaluate`
    evaluate_after_training: bool = False
    eval_limit_items: Optional[int] = None  # first items of each task only (null: all)
    # the weight statistics (WEIGHT_STATISTICS in polypythia/evaluate/weight_stats.py): "polypythias" (the released PolyPythias code) or "hu" (Hu et al. 2023 prose)
    weight_stats: str = "polypythias"
    # checkpoints that keep the (large) optimizer state needed to resume; older ones keep weights only
    keep_resume_states: Optional[int] = 2
    # fault injection for testing failure handling, e.g. train.fault.nan_at_step=3 train.fault.nan_seeds=[2]
    fault: FaultConfig = field(default_factory=FaultConfig)

    def check(self) -> None:
        if self.precision not in ("auto", "fp32", "fp16", "bf16"):
            raise ConfigError(f"train.precision must be auto, fp32, fp16 or bf16, got '{self.precision}'.")
        if self.zero_stage not in (0, 1, 2):
            raise ConfigError(f"train.zero_stage must be 0, 1 or 2, got {self.zero_stage}.")
        if self.weight_stats not in ("polypythias", "hu"):
            raise ConfigError(f"train.weight_stats must be polypythias or hu, got '{self.weight_stats}'.")
        if self.keep_resume_states is not None and self.keep_resume_states < 1:
            raise ConfigError(
                f"train.keep_resume_states must be at least 1 (or null for all), got {self.keep_resume_states}."
            )
        for key in ("adam_beta1", "adam_beta2"):
            value = getattr(self, key)
            if not 0 <= value < 1:
                raise ConfigError(
                    f"train.{key} must lie in [0, 1) (Pythia: adam_beta1 0.9, adam_beta2 0.95), got {value}."
                )
        if not (self.adam_eps > 0 and math.isfinite(self.adam_eps)):
            raise ConfigError(f"train.adam_eps must be a small positive number (Pythia: 1e-8), got {self.adam_eps}.")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ConfigError(
                f"train.weight_decay must be 0 (none) or positive (Pythia: 0.1), got {self.weight_decay}."
            )
        if not (self.gradient_clipping >= 0 and math.isfinite(self.gradient_clipping)):
            raise ConfigError(
                f"train.gradient_clipping must be 0 (no clipping) or a positive norm, got {self.gradient_clipping}."
            )
        if not (self.z_loss >= 0 and math.isfinite(self.z_loss)):
            raise ConfigError(
                f"train.z_loss must be 0 (off) or a positive coefficient (PaLM: 1e-4), got {self.z_loss}."
            )
        self.fault.check()


@dataclass
class TrackingConfig:
    """MLflow. ``uri`` null (and no ``MLFLOW_TRACKING_URI``) starts, or reuses, a local server on
    ``host``:``port`` (the next free port if taken), its record under ``dir``, on a SQLite database there
    or on ``backend_store_uri`` (PostgreSQL); set ``uri`` to use a server that every node can reach."""

    uri: Optional[str] = f"${{oc.env:{runtime_env.TRACKING_URI_ENV},null}}"
    dir: str = f"${{home}}/{runtime_env.MLFLOW_SUBDIR}"  # the local server's database and artifacts
    host: str = runtime_env.DEFAULT_TRACKING_HOST
    port: int = runtime_env.DEFAULT_TRACKING_PORT
    flush_interval_s: float = 2.0
    max_outage_s: float = 300.0  # a server away longer than this fails the job
    system_metrics: bool = True
    backend_store_uri: Optional[str] = None  # the local server's database: null (SQLite in dir) or postgresql://...
    artifacts_destination: Optional[str] = None  # where it keeps artifacts: null (<dir>/artifacts), a folder, s3://...

    def check(self) -> None:
        from polypythia.tracking.store import check_keys

        if self.uri and is_file_store(self.uri):
            raise ConfigError(
                f"tracking.uri={self.uri} (or MLFLOW_TRACKING_URI) is an MLflow file store, which the tracking "
                "server and the metrics logger do not support; give an http:// server address "
                "(tracking.uri=http://host:port) or tracking.uri=null for the local server."
            )
        if not 0 <= self.port <= 65535:
            raise ConfigError(
                f"tracking.port must be a TCP port from 1 to 65535 (or 0 for any free port), got {self.port}."
            )
        check_keys(self)  # flush_interval_s, max_outage_s, backend_store_uri, artifacts_destination


@dataclass
class LauncherConfig:
    """Where and how jobs run (Ray)."""

    # null (and no RAY_ADDRESS): a local Ray runtime; "auto" or host:port: attach to a running cluster
    address: Optional[str] = f"${{oc.env:{runtime_env.RAY_ADDRESS_ENV},null}}"
    num_cpus_per_job: float = 1.0
    num_gpus_per_job: float = 0.0  # per worker
    workers_per_run: int = 1
    max_retries: int = 2
    progress: bool = True
    stall_timeout_s: float = 600.0  # kill (and retry) a job with no progress report for this long; 0: off
    # run a job even when its budget would take days on the CPU (JobConfig.check's estimate, CPU_TRAIN_FLOPS_PER_S)
    allow_slow: bool = False

    def check(self) -> None:
        if self.workers_per_run < 1:
            raise ConfigError(
                f"launcher.workers_per_run must be at least 1 (the data-parallel workers of one run), "
                f"got {self.workers_per_run}."
            )
        if not (self.num_cpus_per_job > 0 and math.isfinite(self.num_cpus_per_job)):
            raise ConfigError(
                f"launcher.num_cpus_per_job must be a positive number of CPUs (e.g. 1), got {self.num_cpus_per_job}."
            )
        if not (self.num_gpus_per_job >= 0 and math.isfinite(self.num_gpus_per_job)):
            raise ConfigError(
                f"launcher.num_gpus_per_job must be 0 (CPU) or a positive number of GPUs, got {self.num_gpus_per_job}."
            )
        if self.max_retries < 0:
            raise ConfigError(
                f"launcher.max_retries must be 0 (no retry) or a positive number of retries, got {self.max_retries}."
            )
        if not self.stall_timeout_s >= 0:
            raise ConfigError(
                f"launcher.stall_timeout_s must be 0 (off) or a number of seconds, got {self.stall_timeout_s}."
            )
