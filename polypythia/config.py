"""The typed schema of one job's configuration, and its validation.

Hydra composes plain YAML from ``conf/``; :func:`job_config` turns one composed config into a
:class:`JobConfig`, checking types (through OmegaConf's structured configs) and values (in
``check()`` methods), so that every user mistake surfaces as one :class:`ConfigError` sentence
before any job starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from polypythia.errors import ConfigError


@dataclass
class ModelConfig:
    name: str = "tiny"
    num_layers: int = 2
    hidden_size: int = 64
    num_heads: int = 4
    lr: float = 1.0e-3
    # null: the tokenizer's vocabulary padded to a multiple of 128, as GPT-NeoX does.
    vocab_size: Optional[int] = None
    max_positions: int = 2048

    def check(self) -> None:
        for key in ("num_layers", "hidden_size", "num_heads"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.{key} must be at least 1, got {getattr(self, key)}.")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_heads "
                f"({self.num_heads})."
            )
        if not self.lr > 0:
            raise ConfigError(f"model.lr must be positive, got {self.lr}.")


@dataclass
class BudgetConfig:
    name: str = "smoke"
    steps: int = 4
    global_batch_size: int = 4  # sequences per optimizer step, summed over workers
    micro_batch_size: int = 2  # sequences per forward pass on one worker
    seq_length: int = 32
    warmup_fraction: float = 0.01
    min_lr_ratio: float = 0.1
    checkpoint_every_steps: int = 1000
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
    vocab_size: int = 8192  # of the embedded tokenizer
    cache_dir: str = ".polypythia/cache"
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
                    f"data.tokenizer={self.tokenizer} is not a file; give the path of the dataset's "
                    "tokenizer.json."
                )
        if not 0 <= self.valid_fraction < 1:
            raise ConfigError(f"data.valid_fraction must lie in [0, 1), got {self.valid_fraction}.")


@dataclass
class FaultConfig:
    """Fault injection, for testing how a study survives failures (all off by default)."""

    nan_at_step: Optional[int] = None  # report a NaN loss at this step ...
    nan_seeds: Optional[list[int]] = None  # ... in jobs with these seeds (null: every job)
    kill_at_step: Optional[int] = None  # SIGKILL the job's process once, after this step ...
    kill_seeds: Optional[list[int]] = None  # ... in jobs with these seeds (null: every job) ...
    kill_ranks: Optional[list[int]] = None  # ... and these data-parallel ranks (null: every rank)


@dataclass
class TrainConfig:
    precision: str = "auto"  # auto: fp16 with loss scaling on GPU (as Pythia), fp32 on CPU
    zero_stage: int = 1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1.0e-8
    weight_decay: float = 0.1
    gradient_clipping: float = 1.0
    attn_implementation: str = "sdpa"
    activation_checkpointing: bool = False
    compile: bool = False
    threads: Optional[int] = None  # torch intra-op threads; null: the CPUs Ray gave the job
    peak_tflops: Optional[float] = None  # per GPU, for train/mfu; null: looked up from the GPU's name
    loss_ceiling: Optional[float] = None  # stop when the loss stays above this ...
    loss_ceiling_steps: int = 10  # ... for this many consecutive steps
    eval_every_checkpoint: bool = True  # validation loss at each checkpoint
    valid_max_rows: int = 64
    # after training: downstream tasks (lm-eval, offline) and the rest of `python -m polypythia.evaluate`
    evaluate_after_training: bool = False
    eval_limit_items: Optional[int] = None  # first items of each task only (null: all)
    # checkpoints that keep the (large) optimizer state needed to resume; older ones keep weights only
    keep_resume_states: Optional[int] = 2
    fault: FaultConfig = field(default_factory=FaultConfig)

    def check(self) -> None:
        if self.precision not in ("auto", "fp32", "fp16", "bf16"):
            raise ConfigError(f"train.precision must be auto, fp32, fp16 or bf16, got '{self.precision}'.")
        if self.zero_stage not in (0, 1, 2):
            raise ConfigError(f"train.zero_stage must be 0, 1 or 2, got {self.zero_stage}.")
        if self.keep_resume_states is not None and self.keep_resume_states < 1:
            raise ConfigError(f"train.keep_resume_states must be at least 1 (or null for all), got {self.keep_resume_states}.")


@dataclass
class TrackingConfig:
    uri: Optional[str] = None  # null: start (or reuse) a local MLflow server
    dir: str = ".polypythia/mlflow"  # the local server's database and artifacts
    host: str = "127.0.0.1"
    port: int = 5050
    flush_interval_s: float = 2.0
    max_outage_s: float = 300.0  # a server away longer than this fails the job
    system_metrics: bool = True


@dataclass
class LauncherConfig:
    address: Optional[str] = None  # null: a local Ray runtime; "auto" or host:port: a cluster
    num_cpus_per_job: float = 1.0
    num_gpus_per_job: float = 0.0  # per worker
    workers_per_run: int = 1
    max_retries: int = 2
    progress: bool = True

    def check(self) -> None:
        if self.workers_per_run < 1:
            raise ConfigError(f"launcher.workers_per_run must be at least 1, got {self.workers_per_run}.")
        if self.num_cpus_per_job <= 0 or self.num_gpus_per_job < 0 or self.max_retries < 0:
            raise ConfigError(
                "launcher.num_cpus_per_job must be positive and launcher.num_gpus_per_job and "
                "launcher.max_retries non-negative."
            )


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    study: str = "polypythia"
    seed: int = 1
    weight_seed: Optional[int] = None  # null: seed
    data_seed: Optional[int] = None  # null: seed
    home: str = ".polypythia"  # POLYPYTHIA_HOME: runs, MLflow data and caches
    runs_dir: str = ".polypythia/runs"  # checkpoints: <runs_dir>/<study>/<run_name>/

    def check(self) -> None:
        for key in ("seed", "weight_seed", "data_seed"):
            value = getattr(self, key)
            if value is not None and value < 0:
                raise ConfigError(f"{key} must be a non-negative integer, got {value}.")
        if not self.study or "/" in self.study:
            raise ConfigError(f"study must be a non-empty name without '/', got '{self.study}'.")
        self.model.check()
        self.budget.check(self.launcher.workers_per_run)
        self.data.check()
        self.train.check()
        self.launcher.check()
        if self.train.precision == "fp16" and self.launcher.num_gpus_per_job <= 0:
            raise ConfigError(
                "train.precision=fp16 needs a GPU per worker (DeepSpeed has no fp16 on CPU): set "
                "launcher.num_gpus_per_job=1, or use train.precision=bf16 or fp32 on CPU."
            )

    @property
    def effective_weight_seed(self) -> int:
        return self.seed if self.weight_seed is None else self.weight_seed

    @property
    def effective_data_seed(self) -> int:
        return self.seed if self.data_seed is None else self.data_seed

    @property
    def run_name(self) -> str:
        """``<model>-seed<k>``, or with both seeds when they differ."""
        w, d = self.effective_weight_seed, self.effective_data_seed
        if w == d:
            return f"{self.model.name}-seed{w}"
        return f"{self.model.name}-wseed{w}-dseed{d}"

    @property
    def run_dir(self) -> str:
        return os.path.join(self.runs_dir, self.study, self.run_name)


_PATH_FIELDS = (("data", "path"), ("data", "tokenizer"), ("data", "cache_dir"), ("tracking", "dir"), ("", "runs_dir"), ("", "home"))


def _absolutise(cfg: JobConfig, base_dir: str) -> None:
    """Relative paths are relative to where the user launched; workers run elsewhere."""
    for section, key in _PATH_FIELDS:
        holder = getattr(cfg, section) if section else cfg
        value = getattr(holder, key)
        if value:
            setattr(holder, key, os.path.abspath(os.path.join(base_dir, os.path.expanduser(value))))


def job_config(cfg: DictConfig | dict[str, Any], base_dir: str | None = None) -> JobConfig:
    """Validate a composed config (``hydra`` key ignored) and return it typed, paths absolute."""
    if isinstance(cfg, DictConfig):
        plain = OmegaConf.to_container(cfg, resolve=True)
    else:
        plain = dict(cfg)
    plain.pop("hydra", None)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(JobConfig), plain)
        typed: JobConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        msg = str(exc).splitlines()[0]
        raise ConfigError(f"Invalid configuration value at '{key}': {msg}.") from None
    _absolutise(typed, base_dir or os.getcwd())
    typed.check()
    return typed


def to_dict(cfg: JobConfig) -> dict[str, Any]:
    """A plain, picklable dict (what crosses process boundaries)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def flat_params(cfg: JobConfig) -> dict[str, str]:
    """``section.key -> value`` strings, for MLflow params."""
    out: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = str(node)

    walk("", to_dict(cfg))
    return out
