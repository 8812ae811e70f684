"""Checks of a job's configuration against the world outside it, run at validation before any job
starts: can a tokenizer be read and how large is its vocabulary, does a tracking URI name a file
store, can a folder be written, and how long would a budget take on CPUs.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

from polypythia.errors import ConfigError
from polypythia.recipe import VOCAB_MULTIPLE


def tokenizer_file_size(path: str) -> int:
    """The vocabulary (added tokens included, as training counts it) of a tokenizer.json."""
    stat = os.stat(path)
    return _cached_tokenizer_size(os.path.abspath(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=16)  # a sweep validates every job against the same file
def _cached_tokenizer_size(path: str, mtime_ns: int, size: int) -> int:
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(path).get_vocab_size(with_added_tokens=True)
    except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exceptions for unreadable files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"The tokenizer {path} cannot be read ({reason}); give data.tokenizer a Hugging Face tokenizer.json."
        ) from None


def is_file_store(uri: str) -> bool:
    """Whether MLflow would read ``uri`` as a file store: ``file:`` or a plain path (``databricks`` aside)."""
    scheme = urlsplit(uri).scheme.lower()
    if scheme == "file":
        return True
    if len(scheme) == 1:  # a Windows drive letter, C:\\mlruns
        return True
    return not scheme and not uri.startswith("databricks")


# What the CPU estimate assumes: a training step of 6 x N FLOPs per token at this rate. Measured on this
# project's development machine (2 cores AMD EPYC, no GPU; README "Performance"): a 70m step of 1,024
# tokens (N = 23.1M with the embedded 8,192-token vocabulary) took 1.19 s, i.e. 6 x 23.1M x 1,024 / 1.19
# = 1.2e11 FLOP/s for the whole machine; 1e11 is that, rounded down. Other CPUs differ: the estimate is a
# rough guide, only meant to stop a run that would take months or years.
CPU_TRAIN_FLOPS_PER_S = 1e11
CPU_SLOW_HOURS = 24.0  # a CPU job estimated to take longer than this needs launcher.allow_slow=true


def training_params(model, vocab_size: int) -> int:  # model: a polypythia.config.schema.ModelConfig
    """N, the weights every token passes through: 12 x layers x hidden^2 in the blocks plus the output
    layer's vocab x hidden (Kaplan et al. 2020's count, with the unembedding added); training costs
    about 6 x N FLOPs per token."""
    return 12 * model.num_layers * model.hidden_size**2 + vocab_size * model.hidden_size


def budget_tokens(budget) -> int:  # budget: a polypythia.config.schema.BudgetConfig
    return budget.steps * budget.global_batch_size * budget.seq_length


def short_count(n: float) -> str:
    """``354M``, ``300B``, ``72k``."""
    for suffix, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{suffix}"
    return f"{n:.0f}"


def format_duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``5.2 hours``, ``36 days``, ``4.3 years``: one unit, two figures."""
    for unit, size, at_least in (("years", 365.25 * 86400, 2), ("days", 86400, 2), ("hours", 3600, 2), ("min", 60, 1)):
        if seconds >= at_least * size:
            value = seconds / size
            return f"{value:,.0f} {unit}" if value >= 10 else f"{value:.1f} {unit}"
    return f"{seconds:.0f} s"


def writable_folder_problem(path: str) -> Optional[str]:
    """Why the folder ``path`` cannot be created or written to, or None: the nearest folder that
    exists must be a writable folder (``os.access``; root passes it whatever the mode bits say)."""
    current = Path(path)
    while not current.exists():
        if current.parent == current:
            return None
        current = current.parent
    if not current.is_dir():
        return f"{current} is a file, not a folder"
    if not os.access(current, os.W_OK | os.X_OK):
        return f"the folder {current} is not writable"
    return None


def check_token_ids(cfg) -> None:  # cfg: a polypythia.config.jobconfig.JobConfig
    """A ConfigError when indexed data holds token ids the model has no embedding row for (found in
    a sample of the ``.bin`` file: a wrong tokenizer or vocabulary), before any job starts."""
    if cfg.data.kind != "indexed":
        return  # the embedded corpus is built with its own tokenizer
    size = cfg.data.tokenizer_vocab_size()[0]
    vocab = cfg.model.padded_vocab_size(size)
    source = (
        f"model.vocab_size={cfg.model.vocab_size}"
        if cfg.model.vocab_size
        else f"model.vocab_size=null: the tokenizer's {size:,} tokens padded to a multiple of {VOCAB_MULTIPLE}"
    )
    problem = token_id_problem(cfg.data.path, vocab, source)
    if problem:
        raise ConfigError(f"data.path={cfg.data.path}: {problem}.")


def token_id_problem(prefix: str, vocab_size: int, vocab_source: str) -> Optional[str]:
    """Why the ``.bin/.idx`` pair at ``prefix`` does not fit a model of ``vocab_size`` embedding rows
    (``vocab_source`` says where that number comes from), from a sample of its tokens, or None."""
    stat = os.stat(prefix + ".bin")  # the cache key: a changed file is sampled again
    low, high, read = _cached_token_range(os.path.abspath(prefix), stat.st_mtime_ns, stat.st_size)
    bad = high if high >= vocab_size else low if low < 0 else None
    if bad is None:
        return None
    return (
        f"the token file {prefix}.bin holds token id {bad:,} (in a sample of {short_count(read)} tokens), "
        f"beyond the model's vocabulary of {vocab_size:,} rows ({vocab_source}); check that data.tokenizer is the "
        "tokenizer the data was prepared with (re-run polypythia-prepare with it), or raise model.vocab_size"
    )


@functools.lru_cache(maxsize=16)  # a sweep validates every job against the same dataset
def _cached_token_range(prefix: str, mtime_ns: int, size: int) -> tuple[int, int, int]:
    from polypythia.data.indexed import sample_token_range

    return sample_token_range(prefix)
