"""Synthetic studies with known ground truth, for tests, the benchmark and trying the analysis.

A study has per-step ``train/loss`` and ``train/grad_norm`` curves, and at the Pythia checkpoint
steps the ``weights/*`` features (the statistics in ``WEIGHT_STATISTICS`` of
polypythia/evaluate/weight_stats.py), ``valid/loss`` and ``eval/<task>/acc`` for four tasks. Outlier
seeds (accuracy collapse from a given step, optional partial recovery, with the weight features
falling back to an earlier phase) and loss spikes at given steps can be injected.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.tidy_table import tidy

TASKS = ("arc_easy", "lambada_openai", "piqa", "sciq")
# The names polypythia/evaluate/weight_stats.py logs (FEATURE_NAMES there, which
# tests/analysis/test_training_maps.py checks; not imported, so that a synthetic study needs no torch).
WEIGHT_FEATURES = tuple(
    f"weights/{name}"
    for name in (
        "l1",
        "l2",
        "trace",
        "spectral",
        "code_sparsity",
        "computational_sparsity",
        "sv_mean",
        "sv_var",
        "w_mean",
        "w_median",
        "w_var",
        "b_mean",
        "b_median",
        "b_var",
    )
)


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


def write_loss_curves(
    spec: StudySpec,
    rng: np.random.Generator,
    model: str,
    size_index: int,
    steps: np.ndarray,
    out: dict[str, np.ndarray],
    noise: np.ndarray,
) -> None:
    """Dense train/loss and train/grad_norm curves of every seed of one size, spikes injected, written
    into ``out[name]`` (seeds x steps views); each seed's loss noise, then its grad-norm noise, drawn
    in seed order into ``noise`` (a (seeds, 2, steps) buffer reused across sizes)."""
    rng.standard_normal(out=noise)
    noise_sd = 0.02
    loss, grad_norm = out["train/loss"], out["train/grad_norm"]
    np.multiply(noise[:, 0], noise_sd, out=loss)
    loss += 2.5 - 0.1 * size_index + 8.0 * (steps + 10.0) ** -0.3
    np.multiply(noise[:, 1], 0.01, out=grad_norm)
    grad_norm += 0.3 + 2.0 * (steps + 10.0) ** -0.5
    for spike in spec.spikes:
        if spike.model == model and spike.seed < spec.n_seeds:
            at = np.searchsorted(steps, spike.step)
            decay = np.exp(-np.arange(spike.length_steps) / max(spike.length_steps / 3, 1))
            end = min(at + spike.length_steps, len(steps))
            loss[spike.seed, at:end] += spike.height_sd * noise_sd * decay[: end - at]
            grad_norm[spike.seed, max(at - 1, 0) : end] += 5.0


def phase(steps: np.ndarray) -> np.ndarray:
    """Training phase 0..3 of each checkpoint step (what the weight features track)."""
    return np.searchsorted(np.array([64, 3000, 40000]), steps, side="right")


def checkpoint_values(
    spec: StudySpec, rng: np.random.Generator, model: str, steps: np.ndarray, phase_means: np.ndarray
) -> dict[str, np.ndarray]:
    """Weight features, validation loss and task accuracies, (seeds x checkpoints) each, of every seed of
    one size (per seed: its weight features, validation loss, then each task's accuracy noise, in seed order)."""
    progress = 1 / (1 + np.exp(-(np.log1p(steps) - 7.5)))  # 0 at init, ~1 at the end
    n_steps, n_features = len(steps), len(WEIGHT_FEATURES)
    noise = rng.standard_normal((spec.n_seeds, n_steps * (n_features + 1 + len(TASKS))))
    out: dict[str, np.ndarray] = {}
    for seed in range(spec.n_seeds):
        drop = np.zeros(n_steps)
        phases = phase(steps)
        for c in (c for c in spec.collapses if c.model == model and c.seed == seed):
            down = (steps >= c.onset_step) & ((steps < c.recovery_step) if c.recovery_step else True)
            drop[down] = c.drop_sd
            phases = np.where(down, 1, phases)  # the weights fall back to an early phase
            if c.recovery_step is None:
                drop[steps >= c.onset_step] = np.linspace(c.drop_sd, c.drop_sd / 2, int((steps >= c.onset_step).sum()))
        draws = noise[seed]
        features = phase_means[phases] + 0.3 * draws[: n_steps * n_features].reshape(n_steps, n_features)
        rows = {name: features[:, i] for i, name in enumerate(WEIGHT_FEATURES)}
        at = n_steps * n_features
        rows["valid/loss"] = 2.6 + 8.0 * (steps + 10.0) ** -0.3 + 0.01 * draws[at : at + n_steps]
        for task_index, task in enumerate(TASKS):
            at += n_steps
            chance = 0.25 + 0.1 * task_index
            accuracy = chance + 0.3 * progress + spec.seed_sd * draws[at : at + n_steps]
            rows[f"eval/{task}/acc"] = accuracy - drop * spec.seed_sd
        for name, values in rows.items():
            out.setdefault(name, np.empty((spec.n_seeds, n_steps)))[seed] = values
    return out


def synthetic_study(spec: StudySpec | None = None, dense_loss: bool = True) -> pd.DataFrame:
    """A tidy table (model, seed, step, metric, value) following ``spec``, built column by column in the
    order :func:`analysis.tidy_table.tidy` gives (model, seed, metric, step), with categorical model, seed and
    metric columns (a 500-run study with dense curves is 143 million rows, about 2.5 GB)."""
    from analysis.tidy_table import sort_models
    from polypythia.study import label_order

    spec = spec or StudySpec()
    rng = np.random.default_rng(spec.random_state)
    checkpoint_steps = pythia_checkpoint_steps(spec.final_step)
    phase_means = rng.normal(0, 3, size=(4, len(WEIGHT_FEATURES)))
    per_model = {model: checkpoint_values(spec, rng, model, checkpoint_steps, phase_means) for model in spec.models}
    dense_steps = np.arange(0, spec.final_step + 1, spec.loss_every_steps, dtype="int64")
    dense = ("train/grad_norm", "train/loss") if dense_loss else ()
    models = sort_models(set(spec.models))
    metrics = sorted([*per_model[spec.models[0]], *dense])
    steps_of = {name: dense_steps if name in dense else checkpoint_steps for name in metrics}
    offsets = dict(zip(metrics, np.cumsum([0] + [len(steps_of[name]) for name in metrics])))
    run_rows = int(sum(len(steps_of[name]) for name in metrics))
    n_runs = spec.n_seeds * len(models)
    value = np.empty((len(models), spec.n_seeds, run_rows))  # one block per run, metrics in name order
    for model in spec.models:  # checkpoint values first, then dense curves: the draws in the study's order
        for name, values in per_model[model].items():
            value[models.index(model), :, offsets[name] : offsets[name] + values.shape[1]] = values
    noise = np.empty((spec.n_seeds, 2, len(dense_steps))) if dense_loss else None
    for size_index, model in enumerate(spec.models):
        if dense_loss:
            views = {
                name: value[models.index(model), :, offsets[name] : offsets[name] + len(dense_steps)] for name in dense
            }
            write_loss_curves(spec, rng, model, size_index, dense_steps, views, noise)
    run_steps = np.concatenate([steps_of[name] for name in metrics])
    run_metrics = np.repeat(np.arange(len(metrics), dtype="int8"), [len(steps_of[name]) for name in metrics])
    labels = sorted((str(s) for s in range(spec.n_seeds)), key=label_order)
    seed_dtype = "int8" if spec.n_seeds < 128 else "int16"
    return pd.DataFrame(
        {
            "model": pd.Categorical.from_codes(
                np.repeat(np.arange(len(models), dtype="int8"), spec.n_seeds * run_rows),
                categories=models,
                validate=False,
            ),
            "seed": pd.Categorical.from_codes(
                np.tile(np.repeat(np.arange(spec.n_seeds, dtype=seed_dtype), run_rows), len(models)),
                categories=labels,
                validate=False,
            ),
            "step": np.tile(run_steps, n_runs),
            "metric": pd.Categorical.from_codes(np.tile(run_metrics, n_runs), categories=metrics, validate=False),
            "value": value.reshape(-1),
        },
        copy=False,
    )


@dataclass
class Dip:
    """A planted excursion of one run: ``depth_sd`` seed-spread SDs below its siblings from
    ``onset_step``; back to normal at ``recovery_step`` (None: it stays down, a collapse)."""

    seed: int
    onset_step: int
    depth_sd: float = 12.0
    recovery_step: int | None = None


def correlated_study(
    n_seeds: int = 10,
    steps=None,
    correlation: float = 0.8,
    offset_share: float = 0.4,
    spread: float = 0.04,
    dips: tuple[Dip, ...] = (),
    random_state: int = 0,
) -> pd.DataFrame:
    """A one-metric study (``score`` of model ``410m``) shaped like the PolyPythias training-map score: a sigmoid in log-step from
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
    return tidy(
        pd.DataFrame(
            {
                "model": "410m",
                "seed": seeds.ravel(),
                "step": step_grid.ravel(),
                "metric": "score",
                "value": values.ravel(),
            }
        )
    )
