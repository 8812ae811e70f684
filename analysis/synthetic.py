"""Synthetic studies with known ground truth, for tests, the benchmark and trying the analysis.

A study has per-step ``train/loss`` and ``train/grad_norm`` curves, and at the Pythia checkpoint
steps 14 ``weights/*`` features, ``valid/loss`` and ``eval/<task>/acc`` for four tasks. Outlier
seeds (accuracy collapse from a given step, optional partial recovery, with the weight features
falling back to an earlier phase) and loss spikes at given steps can be injected.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.load import tidy

TASKS = ("arc_easy", "lambada_openai", "piqa", "sciq")
# The names polypythia/evaluate/weight_stats.py logs (FEATURE_NAMES there).
WEIGHT_FEATURES = tuple(f"weights/{name}" for name in (
    "l1", "l2", "trace", "spectral", "code_sparsity", "computational_sparsity", "sv_mean",
    "sv_var", "w_mean", "w_median", "w_var", "b_mean", "b_median", "b_var"))


def pythia_checkpoint_steps(final_step: int = 143_000) -> np.ndarray:
    """Step 0, 1, 2, 4, ..., 512, then every 1,000 steps up to ``final_step`` (154 for 143,000)."""
    return np.r_[0, 2 ** np.arange(10), np.arange(1000, final_step + 1, 1000)].astype("int64")


@dataclass
class Collapse:
    """An outlier seed: standardised accuracy collapses at ``onset_step``; back to normal at ``recovery_step``
    (None: only a partial recovery, it stays below the band)."""

    model: str
    seed: int
    onset_step: int
    recovery_step: int | None = None
    drop_sd: float = 8.0  # accuracy drop in units of the cross-seed SD at that step


@dataclass
class Spike:
    """A loss spike of ``height_sd`` noise SDs at ``step`` decaying over ``length_steps`` steps."""

    model: str
    seed: int
    step: int
    height_sd: float = 30.0
    length_steps: int = 5


@dataclass
class StudySpec:
    """What to generate."""

    models: tuple[str, ...] = ("70m", "160m")
    n_seeds: int = 5
    final_step: int = 143_000
    loss_every_steps: int = 1
    collapses: list[Collapse] = field(default_factory=list)
    spikes: list[Spike] = field(default_factory=list)
    seed_sd: float = 0.01  # cross-seed SD of accuracies
    random_state: int = 0


def loss_rows(spec: StudySpec, rng: np.random.Generator) -> list[pd.DataFrame]:
    """Dense train/loss and train/grad_norm curves for every run, spikes injected."""
    steps = np.arange(0, spec.final_step + 1, spec.loss_every_steps, dtype="int64")
    frames = []
    for size_index, model in enumerate(spec.models):
        for seed in range(spec.n_seeds):
            noise_sd = 0.02
            loss = 2.5 - 0.1 * size_index + 8.0 * (steps + 10.0) ** -0.3 + rng.normal(0, noise_sd, len(steps))
            grad_norm = 0.3 + 2.0 * (steps + 10.0) ** -0.5 + rng.normal(0, 0.01, len(steps))
            for spike in spec.spikes:
                if spike.model == model and spike.seed == seed:
                    at = np.searchsorted(steps, spike.step)
                    decay = np.exp(-np.arange(spike.length_steps) / max(spike.length_steps / 3, 1))
                    end = min(at + spike.length_steps, len(steps))
                    loss[at:end] += spike.height_sd * noise_sd * decay[: end - at]
                    grad_norm[max(at - 1, 0):end] += 5.0
            for metric, values in (("train/loss", loss), ("train/grad_norm", grad_norm)):
                frames.append(pd.DataFrame({"model": model, "seed": seed, "step": steps, "metric": metric,
                                            "value": values}))
    return frames


def phase(steps: np.ndarray) -> np.ndarray:
    """Training phase 0..3 of each checkpoint step (what the weight features track)."""
    return np.searchsorted(np.array([64, 3000, 40000]), steps, side="right")


def checkpoint_rows(spec: StudySpec, rng: np.random.Generator) -> list[pd.DataFrame]:
    """Weight features, validation loss and task accuracies at the checkpoint steps."""
    steps = pythia_checkpoint_steps(spec.final_step)
    progress = 1 / (1 + np.exp(-(np.log1p(steps) - 7.5)))  # 0 at init, ~1 at the end
    phase_means = rng.normal(0, 3, size=(4, len(WEIGHT_FEATURES)))
    frames = []
    for model in spec.models:
        for seed in range(spec.n_seeds):
            drop = np.zeros(len(steps))
            phases = phase(steps)
            for c in (c for c in spec.collapses if c.model == model and c.seed == seed):
                out = (steps >= c.onset_step) & ((steps < c.recovery_step) if c.recovery_step else True)
                drop[out] = c.drop_sd
                phases = np.where(out, 1, phases)  # the weights fall back to an early phase
                if c.recovery_step is None:
                    drop[steps >= c.onset_step] = np.linspace(c.drop_sd, c.drop_sd / 2, int((steps >= c.onset_step).sum()))
            features = phase_means[phases] + rng.normal(0, 0.3, size=(len(steps), len(WEIGHT_FEATURES)))
            rows = {name: features[:, i] for i, name in enumerate(WEIGHT_FEATURES)}
            rows["valid/loss"] = 2.6 + 8.0 * (steps + 10.0) ** -0.3 + rng.normal(0, 0.01, len(steps))
            for task_index, task in enumerate(TASKS):
                chance = 0.25 + 0.1 * task_index
                accuracy = chance + 0.3 * progress + rng.normal(0, spec.seed_sd, len(steps))
                rows[f"eval/{task}/acc"] = accuracy - drop * spec.seed_sd
            for metric, values in rows.items():
                frames.append(pd.DataFrame({"model": model, "seed": seed, "step": steps, "metric": metric,
                                            "value": values}))
    return frames


def synthetic_study(spec: StudySpec | None = None, dense_loss: bool = True) -> pd.DataFrame:
    """A tidy table (model, seed, step, metric, value) following ``spec``."""
    spec = spec or StudySpec()
    rng = np.random.default_rng(spec.random_state)
    frames = checkpoint_rows(spec, rng)
    if dense_loss:
        frames += loss_rows(spec, rng)
    return tidy(pd.concat(frames, ignore_index=True))


@dataclass
class Dip:
    """A planted excursion of one run: ``depth_sd`` seed-spread SDs below its siblings from
    ``onset_step``; back to normal at ``recovery_step`` (None: it stays down, a collapse)."""

    seed: int
    onset_step: int
    depth_sd: float = 12.0
    recovery_step: int | None = None


def correlated_study(n_seeds: int = 10, steps=None, correlation: float = 0.8, offset_share: float = 0.4,
                     spread: float = 0.04, dips: tuple[Dip, ...] = (), model: str = "410m", metric: str = "score",
                     random_state: int = 0) -> pd.DataFrame:
    """A one-metric study shaped like the PolyPythias training-map score: a sigmoid in log-step from
    about -1.1 to 1.05 on the study's 27 evaluation checkpoints, each run off the median by a constant
    offset (``offset_share`` of the variance) plus AR(1) noise correlated ``correlation`` between
    consecutive checkpoints, total cross-seed SD ``spread``; ``dips`` planted on top."""
    from analysis.load import POLYPYTHIAS_EVAL_STEPS
    from analysis.outliers import null_studies

    steps = np.asarray(POLYPYTHIAS_EVAL_STEPS if steps is None else steps, dtype="int64")
    rng = np.random.default_rng(random_state)
    curve = -1.1 + 2.15 / (1 + np.exp(-(np.log1p(steps) - 8.0) * 1.2))
    noise = null_studies(1, len(steps), n_seeds, correlation, rng, offset_share)[0] * spread
    values = curve[:, None] + noise
    for dip in dips:
        down = (steps >= dip.onset_step) & ((steps < dip.recovery_step) if dip.recovery_step else True)
        values[down, dip.seed] -= dip.depth_sd * spread
    seeds, step_grid = np.meshgrid(np.arange(n_seeds), steps)
    return tidy(pd.DataFrame({"model": model, "seed": seeds.ravel(), "step": step_grid.ravel(), "metric": metric,
                              "value": values.ravel()}))
