"""Figures of a study (matplotlib, Agg backend): loss curves, metrics over steps, training maps and their
model selection.

Cross-seed spread is drawn as in the PolyPythias paper: the median across seeds with the
25th-75th percentile band, steps on a log axis (symlog, so that step 0 shows).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from analysis.tidy_table import sort_models

MAX_POINTS_PER_CURVE = 600


def thin_steps(steps: np.ndarray, max_points: int = MAX_POINTS_PER_CURVE) -> np.ndarray:
    """At most ``max_points`` of the sorted unique ``steps``, spread evenly on a log axis."""
    steps = np.unique(steps)
    if len(steps) <= max_points:
        return steps
    targets = np.geomspace(max(steps[0], 1), steps[-1], max_points)
    return np.unique(np.r_[steps[0], steps[np.clip(np.searchsorted(steps, targets), 0, len(steps) - 1)]])


def seed_curves(
    metrics: pd.DataFrame, model: str, metric: str, smooth_values: int = 1, blocks: pd.DataFrame | None = None
) -> pd.DataFrame:
    """(step x seed) values of one metric for one model, optionally a centred rolling mean, thinned.
    ``blocks``: :func:`analysis.tidy_table.run_blocks` of ``metrics``, to take the runs as array slices."""
    table = None
    if blocks is not None:
        runs = blocks[(blocks["model"] == model) & (blocks["metric"] == metric)]
        steps, values = metrics["step"].to_numpy(), metrics["value"].to_numpy(dtype="float64")
        first = steps[runs["start"].iloc[0] : runs["stop"].iloc[0]] if len(runs) else None
        if len(runs) and all(np.array_equal(steps[a:b], first) for a, b in zip(runs["start"], runs["stop"])):
            table = pd.DataFrame(
                np.column_stack([values[a:b] for a, b in zip(runs["start"], runs["stop"])]),
                index=pd.Index(first, name="step"),
                columns=pd.Index(list(runs["seed"]), name="seed"),
            )
    if table is None:  # runs with different steps: align them
        rows = metrics[(metrics["model"] == model) & (metrics["metric"] == metric)]
        table = rows.pivot_table(index="step", columns="seed", values="value", aggfunc="last", observed=True)
    if smooth_values > 1:
        table = table.rolling(smooth_values, min_periods=1, center=True).mean()
    return table.loc[thin_steps(table.index.to_numpy())]


def has_rows(metrics: pd.DataFrame, metric: str, model: str | None = None, blocks: pd.DataFrame | None = None) -> bool:
    """Whether ``metrics`` holds ``metric`` (for ``model``)."""
    if blocks is not None:
        rows = blocks["metric"] == metric
        return bool((rows & (blocks["model"] == model)).any() if model is not None else rows.any())
    rows = metrics["metric"] == metric
    return bool((rows & (metrics["model"] == model)).any() if model is not None else rows.any())


def band(ax, table: pd.DataFrame, color, label: str) -> None:
    """Median line and 25th-75th percentile band across the columns (seeds) of ``table``."""
    q25, median, q75 = (table.quantile(q, axis=1) for q in (0.25, 0.5, 0.75))
    ax.fill_between(table.index, q25, q75, color=color, alpha=0.25, linewidth=0)
    ax.plot(table.index, median, color=color, label=f"{label} median (IQR band, {table.shape[1]} seeds)")


def step_axis(ax) -> None:
    """Log-like step axis that still shows step 0."""
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("training step (log scale)")
    ax.grid(alpha=0.3)


def plot_loss_curves(
    metrics: pd.DataFrame,
    outlier_seeds: dict[str, set[int]],
    path: Path,
    metric: str = "train/loss",
    blocks: pd.DataFrame | None = None,
) -> Path | None:
    """One panel per size: median/IQR of ``metric`` across seeds, outlier seeds drawn on top.
    ``blocks``: :func:`analysis.tidy_table.run_blocks` of ``metrics``, when the caller has them."""
    models = [m for m in sort_models(metrics["model"].unique()) if has_rows(metrics, metric, m, blocks)]
    if not models:
        return None
    columns = min(3, len(models))
    rows = int(np.ceil(len(models) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.8 * rows), squeeze=False, sharey=True)
    for ax in list(axes.flat)[len(models) :]:
        ax.set_visible(False)
    for ax, model in zip(axes.flat, models):
        table = seed_curves(metrics, model, metric, smooth_values=20, blocks=blocks)
        outliers = sorted(outlier_seeds.get(model, set()) & set(table.columns))
        stable = table.drop(columns=outliers)
        band(ax, stable if stable.shape[1] else table, "tab:blue", "stable seeds")
        for seed, color in zip(outliers, plt.cm.autumn(np.linspace(0, 0.8, max(len(outliers), 1)))):
            ax.plot(table.index, table[seed], color=color, linewidth=1.2, label=f"outlier seed {seed}")
        ax.set_title(f"{model}: {metric}")
        step_axis(ax)
        ax.legend(fontsize=8)
    for row in axes:
        row[0].set_ylabel(f"{metric} (rolling mean of 20 values)")
    return save(fig, path)


def plot_metrics(
    metrics: pd.DataFrame, names: list[str], path: Path, blocks: pd.DataFrame | None = None
) -> Path | None:
    """One panel per metric: median/IQR band across seeds for each size, log-x over steps.
    ``blocks``: :func:`analysis.tidy_table.run_blocks` of ``metrics``, when the caller has them."""
    names = [n for n in names if has_rows(metrics, n, blocks=blocks)]
    if not names:
        return None
    columns = min(3, len(names))
    rows = int(np.ceil(len(names) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.8 * rows), squeeze=False)
    models = sort_models(metrics["model"].unique())
    colors = dict(zip(models, plt.cm.viridis(np.linspace(0, 0.85, len(models)))))
    for ax, name in zip(axes.flat, names):
        for model, color in colors.items():
            table = seed_curves(metrics, model, name, blocks=blocks)
            if not table.empty:
                band(ax, table, color, model)
        ax.set_title(name)
        ax.set_ylabel(name)
        step_axis(ax)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names) :]:
        ax.set_visible(False)
    return save(fig, path)


# Colours of HMM states in the PolyPythias release (EleutherAI/pythia, branch polypythias,
# polypythias/training-maps/training_map.py, ``state_colors``), cycled past nine states.
STATE_COLORS = ("#377eb8", "#ff7f00", "#4daf4a", "#f781bf", "#a65628", "#984ea3", "#999999", "#e41a1c", "#dede00")


def state_color(state: int) -> str:
    return STATE_COLORS[int(state) % len(STATE_COLORS)]


def training_map_figure(score: pd.DataFrame, paths: pd.DataFrame, model: str, outlier_seeds: set, score_name: str):
    """The map as the PolyPythias figure draws it: the score at each decoded checkpoint, coloured by HMM
    state, stable seeds in one panel and outlier / departing seeds in a second (one panel when there
    are none). None when no decoded checkpoint has a score."""
    from polypythia.study import label_order

    states = paths[paths["model"] == model].assign(seed=lambda f: f["seed"].astype(str))
    values = score[score["model"] == model][["seed", "step", "value"]].assign(seed=lambda f: f["seed"].astype(str))
    merged = states.merge(values, on=["seed", "step"]).sort_values(["seed", "step"])
    if merged.empty:
        return None
    outliers = {str(s) for s in outlier_seeds}
    flagged = merged["seed"].isin(outliers)
    groups = [
        ("stable seeds" if flagged.any() else "all seeds", merged[~flagged]),
        ("outlier / departing seeds", merged[flagged]),
    ]
    groups = [(title, rows) for title, rows in groups if not rows.empty]
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups) + 0.5, 4), sharey=True, squeeze=False)
    for ax, (title, rows) in zip(axes[0], groups):
        labelled = title.startswith("outlier")
        for seed, run in rows.groupby("seed", sort=False):
            ax.plot(run["step"], run["value"], color="0.6" if labelled else "0.8", linewidth=0.8, zorder=1)
            if labelled:
                ax.annotate(
                    f"seed {seed}",
                    (run["step"].iloc[-1], run["value"].iloc[-1]),
                    fontsize=7,
                    xytext=(3, 0),
                    textcoords="offset points",
                    va="center",
                )
        ax.scatter(
            rows["step"], rows["value"], c=[state_color(s) for s in rows["state"]], s=14, zorder=2, edgecolors="none"
        )
        seeds = sorted(rows["seed"].unique(), key=label_order)
        ax.set_title(f"{model}, {title}: {', '.join(seeds)}", fontsize=10)
        step_axis(ax)
    axes[0][0].set_ylabel(score_name)
    present = sorted(int(s) for s in merged["state"].unique())
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=state_color(s), label=f"state {s}") for s in present]
    axes[0][-1].legend(handles=handles, fontsize=8, title="HMM state", loc="best")
    fig.tight_layout()
    return fig


def plot_training_map(
    score: pd.DataFrame, paths: pd.DataFrame, model: str, outlier_seeds: set, path: Path, score_name: str
) -> Path | None:
    """Write :func:`training_map_figure` to ``path`` (None when there is nothing to draw)."""
    fig = training_map_figure(score, paths, model, outlier_seeds, score_name)
    return None if fig is None else save(fig, path)


def map_selection_figure(selection: pd.DataFrame, model: str):
    """BIC and AIC (lower is better) and the held-out log-likelihood (higher is better) against the
    number of HMM states, as the PolyPythias release plots them: dots for every restart, lines through
    the kept restart of each number of states, the chosen number marked. None without rows."""
    rows = selection[(selection["model"] == model) & np.isfinite(selection["heldout_log_likelihood"])]
    if rows.empty:
        return None
    best = rows[rows["best_of_n"]].sort_values("n_states")
    chosen = rows[rows["chosen"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, columns, label in (
        (
            left,
            (("bic", "BIC", "tab:blue"), ("aic", "AIC", "tab:orange")),
            "criterion on held-out rows (lower is better)",
        ),
        (
            right,
            (("heldout_log_likelihood", "held-out log-likelihood", "tab:green"),),
            "held-out log-likelihood (higher is better)",
        ),
    ):
        for column, name, color in columns:
            ax.scatter(rows["n_states"], rows[column], color=color, alpha=0.35, s=12, edgecolors="none")
            ax.plot(
                best["n_states"], best[column], color=color, marker="o", markersize=4, label=f"{name} (best restart)"
            )
        ax.set_xlabel("number of HMM states")
        ax.set_ylabel(label)
        ax.set_xticks(sorted(rows["n_states"].unique()))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if not chosen.empty:
        n, criterion = int(chosen["n_states"].iloc[0]), str(chosen["criterion"].iloc[0])
        for ax in (left, right):
            ax.axvline(n, color="0.4", linestyle=":", linewidth=1)
        how = "fixed" if criterion == "fixed" else f"by {'held-out LL' if criterion == 'll' else criterion.upper()}"
        fig.suptitle(
            f"{model}: HMM model selection, {n} states chosen ({how}); "
            f"{int(rows['n_heldout_rows'].iloc[0])} held-out checkpoint rows",
            fontsize=10,
        )
    fig.tight_layout()
    return fig


def plot_map_selection(selection: pd.DataFrame, model: str, path: Path) -> Path | None:
    """Write :func:`map_selection_figure` to ``path`` (None without rows for ``model``)."""
    fig = map_selection_figure(selection, model)
    return None if fig is None else save(fig, path)


def save(fig, path: Path) -> Path:
    """Write a figure as PNG and close it."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
