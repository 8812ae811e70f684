"""One job's configuration: the :class:`JobConfig` that gathers the sections, its named checks, and
its registration with Hydra.

Each default is written once, in a dataclass: the sections' in :mod:`polypythia.config.schema` (and
:mod:`polypythia.config.monitor`), the job's own keys (study, seeds, home, ...) in :class:`JobConfig`
below. They are both the schema (the keys and their types) and the default values, registered with
Hydra's ConfigStore as ``polypythia_defaults``, which ``conf/config.yaml`` puts first in its defaults
list (Hydra 1.3, "Structured Config schema" and "Config Store API":
https://hydra.cc/docs/1.3/tutorials/structured_config/schema,
https://hydra.cc/docs/1.3/tutorials/structured_config/config_store). The YAML files under ``conf/``
hold only what differs from these defaults: the model sizes (``conf/model/``, each citing its GPT-NeoX
config) and the budgets (``conf/budget/``), which the dataclasses leave ``MISSING``, the data kinds and
the study presets. Why dataclasses rather than YAML: a job's config is also built from plain dicts
outside Hydra (tests, benchmarks, an evaluation rebuilding a run's config from its MLflow params), and
those rely on the defaults being where the types are. The environment's defaults (``POLYPYTHIA_HOME``,
the tracking port, ...) come from :mod:`polypythia.runtime.env`.

The defaults are stored untyped, so Hydra composes without checking types; :func:`job_config` then
turns one composed config into a :class:`JobConfig`, checking types (OmegaConf's structured configs)
and values (:data:`JOB_CHECKS`), so that every mistake surfaces as one :class:`ConfigError` sentence
before any job starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from polypythia.config.fault import FaultConfig
from polypythia.config.limits import check_limits
from polypythia.config.monitor import MonitorConfig
from polypythia.config.preflight import (
    CPU_SLOW_HOURS,
    CPU_TRAIN_FLOPS_PER_S,
    budget_tokens,
    check_token_ids,
    format_duration,
    short_count,
    training_params,
    writable_folder_problem,
)
from polypythia.config.schema import BudgetConfig, DataConfig, LauncherConfig, ModelConfig, TrackingConfig, TrainConfig
from polypythia.errors import ConfigError
from polypythia.recipe import GPT_NEOX_20B_TOKENS, VOCAB_MULTIPLE
from polypythia.runtime import env as runtime_env

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"  # Hydra's config folder (launch.py's config_path)
DEFAULTS_NAME = "polypythia_defaults"  # the ConfigStore entry conf/config.yaml starts from
__all__ = [  # the sections of a JobConfig, re-exported beside it
    "BudgetConfig",
    "DataConfig",
    "FaultConfig",
    "LauncherConfig",
    "ModelConfig",
    "MonitorConfig",
    "TrackingConfig",
    "TrainConfig",
]


# DeepSpeed's fp16 optimizer at ZeRO stage 0 with a torch optimizer (FP16_UnfusedOptimizer) divides
# every gradient by the loss scale in step(), but DeepSpeed 0.19's engine.backward() never multiplies
# the loss by it (https://github.com/deepspeedai/DeepSpeed/pull/8393, open): seen on an H100, the
# gradients reached Adam 4096 times too small and clipping could never act.
FP16_ZERO0_REFUSED = (
    "fp16 with train.zero_stage=0 is refused: DeepSpeed's fp16 optimizer at ZeRO stage 0 divides the gradients "
    "by the loss scale without engine.backward() having scaled the loss (deepspeedai/DeepSpeed PR #8393), so "
    "every update would come out thousands of times too small; use train.zero_stage=1 (Pythia's setting), "
    "train.precision=bf16, or train.autocast=true on one worker."
)


@dataclass
class JobConfig:
    """One job: one (model, seed) training run. The job's own keys have their defaults here, each section
    in its own class."""

    model: ModelConfig = field(default_factory=ModelConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    study: str = "polypythia"  # the MLflow experiment; runs_dir/<study>/<run_name>/ holds the checkpoints
    seed: int = 1  # sets both the weight seed and the data seed ...
    weight_seed: Optional[int] = None  # ... unless one of these overrides it (null: seed)
    data_seed: Optional[int] = None
    # A rerun of the same seeds (replicate=1,2 beside replicate=0): the spread between replicates is
    # the study's nondeterminism floor (python -m analysis reports it). Part of the run name when nonzero.
    replicate: int = 0
    # Everything a study writes (checkpoints, MLflow database, caches) lives under POLYPYTHIA_HOME,
    # by default .polypythia/ in the directory you launch from.
    home: str = f"${{oc.env:{runtime_env.HOME_ENV},{runtime_env.DEFAULT_HOME}}}"
    runs_dir: str = "${home}/runs"  # checkpoints: <runs_dir>/<study>/<run_name>/

    def check(self) -> None:
        """Every check of :data:`JOB_CHECKS`, in order: the first problem is raised as one sentence."""
        for check in JOB_CHECKS:
            check(self)

    @property
    def effective_weight_seed(self) -> int:
        return self.seed if self.weight_seed is None else self.weight_seed

    @property
    def effective_data_seed(self) -> int:
        return self.seed if self.data_seed is None else self.data_seed

    @property
    def run_name(self) -> str:
        """``<model>-seed<k>``, or with both seeds when they differ; ``-rep<r>`` after it for a replicate."""
        w, d = self.effective_weight_seed, self.effective_data_seed
        name = f"{self.model.name}-seed{w}" if w == d else f"{self.model.name}-wseed{w}-dseed{d}"
        return f"{name}-rep{self.replicate}" if self.replicate else name

    @property
    def run_dir(self) -> str:
        return os.path.join(self.runs_dir, self.study, self.run_name)

    def check_run_dir(self) -> None:
        """The run's folder lies inside ``<runs_dir>/<study>/`` (a second line behind the name checks:
        nothing a name says may put checkpoints elsewhere)."""
        study_dir = os.path.normpath(os.path.join(self.runs_dir, self.study))
        run_dir = os.path.normpath(self.run_dir)
        inside = os.path.dirname(run_dir) == study_dir and os.path.dirname(study_dir) == os.path.normpath(self.runs_dir)
        if not inside:
            raise ConfigError(
                f"The run folder {run_dir} would lie outside runs_dir={self.runs_dir}/<study>/; give "
                "study and model.name plain names (letters, digits, '-', '_', '.')."
            )


def check_folder_name(key: str, name: str) -> None:
    """A configured name that becomes a folder name (a study, a model's name in ``<model>-seed<k>``)
    must stay one folder: no path separator, not '.' or '..', no NUL byte."""
    separators = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    if not name or name in (".", "..") or "\0" in name or any(sep in name for sep in separators):
        raise ConfigError(
            f"{key} must be a plain name (it names a folder under runs_dir), without '/' and other than "
            f"'.' or '..', got {name!r}; pick a name such as 'pythia-seeds'."
        )


# --- the checks JobConfig.check runs, in order ------------------------------------------------------


def check_seeds(cfg: JobConfig) -> None:
    for key in ("seed", "weight_seed", "data_seed", "replicate"):
        value = getattr(cfg, key)
        if value is not None and value < 0:
            raise ConfigError(f"{key} must be a non-negative integer, got {value}.")


def check_names(cfg: JobConfig) -> None:
    check_folder_name("study", cfg.study)
    check_folder_name("model.name", cfg.model.name)


def check_sections(cfg: JobConfig) -> None:
    """Each section's own checks (:mod:`polypythia.config.schema`)."""
    cfg.model.check()
    cfg.launcher.check()  # before the budget, whose batch check divides by launcher.workers_per_run
    cfg.budget.check(cfg.launcher.workers_per_run)
    cfg.data.check()
    cfg.train.check()
    cfg.tracking.check()
    cfg.monitor.check()


def check_precision(cfg: JobConfig) -> None:
    """fp16 needs a GPU, and (:data:`FP16_ZERO0_REFUSED`) a ZeRO stage above 0 where DeepSpeed's fp16 weights
    train (``train.autocast`` on one worker trains fp32 weights, without DeepSpeed's fp16 optimizer)."""
    gpus = cfg.launcher.num_gpus_per_job > 0
    if cfg.train.precision == "fp16" and not gpus:
        raise ConfigError(
            "train.precision=fp16 needs a GPU per worker (DeepSpeed has no fp16 on CPU): set "
            "launcher.num_gpus_per_job=1, or use train.precision=bf16 or fp32 on CPU."
        )
    fp16 = cfg.train.precision == "fp16" or (cfg.train.precision == "auto" and gpus)
    autocast = cfg.train.autocast and cfg.launcher.workers_per_run == 1
    if fp16 and cfg.train.zero_stage == 0 and not autocast:
        raise ConfigError(FP16_ZERO0_REFUSED)


def check_seq_length(cfg: JobConfig) -> None:
    if cfg.budget.seq_length > cfg.model.max_positions:
        raise ConfigError(
            f"budget.seq_length ({cfg.budget.seq_length}) exceeds model.max_positions ({cfg.model.max_positions}), "
            "the longest sequence the model is built for; lower budget.seq_length or raise model.max_positions."
        )


def check_vocab_size(cfg: JobConfig) -> None:
    """A set ``model.vocab_size`` holds every token id of the tokenizer."""
    if cfg.model.vocab_size is None:
        return
    size, tokenizer = cfg.data.tokenizer_vocab_size()
    if cfg.model.vocab_size < size:
        raise ConfigError(
            f"model.vocab_size ({cfg.model.vocab_size}) is below the {size} tokens of {tokenizer}, so some "
            f"token ids would have no embedding row; set model.vocab_size to at least {size}, or null for "
            f"the tokenizer's vocabulary padded to a multiple of {VOCAB_MULTIPLE}."
        )


def check_folders_writable(cfg: JobConfig) -> None:
    """The folders the job writes to can be written, the fix naming home when they lie under it."""
    folders = [("runs_dir", cfg.runs_dir)]
    folders += [("tracking.dir", cfg.tracking.dir)] if not cfg.tracking.uri else []
    folders += [("data.cache_dir", cfg.data.cache_dir)] if cfg.data.kind == "embedded" else []
    for key, folder in folders:
        problem = writable_folder_problem(folder)
        if problem:
            home = os.path.abspath(cfg.home)
            under_home = os.path.commonpath([os.path.abspath(folder), home]) == home
            fix = (
                f"set {runtime_env.HOME_ENV} (or home=...) to a folder you can write to"
                if under_home
                else f"set {key} to a folder you can write to"
            )
            raise ConfigError(f"{key}={folder} cannot be written ({problem}); {fix}.")


def check_cpu_time(cfg: JobConfig) -> None:
    """A CPU job whose budget would take longer than :data:`CPU_SLOW_HOURS` needs ``launcher.allow_slow``."""
    if cfg.launcher.num_gpus_per_job > 0 or cfg.launcher.allow_slow:
        return
    tokenizer_size = cfg.data.vocab_size if cfg.data.kind == "embedded" else GPT_NEOX_20B_TOKENS
    params = training_params(cfg.model, cfg.model.padded_vocab_size(tokenizer_size))
    tokens = budget_tokens(cfg.budget)
    seconds = 6.0 * params * tokens / CPU_TRAIN_FLOPS_PER_S
    if seconds > CPU_SLOW_HOURS * 3600:
        raise ConfigError(
            f"model={cfg.model.name} budget={cfg.budget.name} on the CPU (launcher.num_gpus_per_job=0) would "
            f"take about {format_duration(seconds)} per run (6 x {short_count(params)} weights x "
            f"{short_count(tokens)} tokens at an assumed {CPU_TRAIN_FLOPS_PER_S:.0e} FLOP/s, what 2 CPU cores "
            "reached); give it GPUs (launcher.num_gpus_per_job=1), pick a smaller budget, or set "
            "launcher.allow_slow=true to run anyway."
        )


JOB_CHECKS: tuple[Callable[[JobConfig], None], ...] = (
    check_seeds,
    check_names,
    check_sections,
    check_limits,  # the lower bounds of durations and counts (polypythia.config.limits)
    check_precision,
    check_seq_length,
    check_vocab_size,
    JobConfig.check_run_dir,
    check_token_ids,  # a sample of indexed data's tokens against the model's vocabulary
    check_folders_writable,
    check_cpu_time,
)


_PATH_FIELDS = (
    ("data", "path"),
    ("data", "tokenizer"),
    ("data", "cache_dir"),
    ("tracking", "dir"),
    ("", "runs_dir"),
    ("", "home"),
)


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


def model_preset(name: str) -> ModelConfig:
    """The model ``conf/model/<name>.yaml`` (``model=<name>``), typed and checked: e.g. a Pythia size."""
    path = CONF_DIR / "model" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"No model '{name}': {path} does not exist.")
    typed: ModelConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path)))
    typed.check()
    return typed


def defaults_node() -> dict[str, Any]:
    """Every key of a job's config with its default (MISSING ones as ``???``), interpolations kept."""
    return OmegaConf.to_container(OmegaConf.structured(JobConfig), resolve=False)


def register_defaults() -> None:
    """Store :func:`defaults_node` in Hydra's ConfigStore as ``polypythia_defaults`` (untyped, so that
    a bad value reaches :func:`job_config` and its one-sentence error rather than failing composition)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=DEFAULTS_NAME, node=defaults_node(), provider="polypythia")


register_defaults()  # on import, as Hydra's structured configs are: launch.py imports this module
