"""``python -m analysis power``: the command line of :mod:`analysis.power` (seeds per arm, the power curve
for 2-30 seeds, the SD interval and the outlier distance), printed as a table or, with ``--out``, also
written to ``power.csv`` and drawn in ``power_curve.png``. The last line printed is ``seeds per arm: N``.

``python -m analysis`` hands its arguments here when the first is ``power`` (see :mod:`analysis.__main__`).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from analysis.errors import AnalysisError
from analysis.power import (
    CURVE_SEEDS,
    MAX_SEEDS,
    Design,
    SeedSpread,
    check_design,
    outlier_distance_sd,
    power_at,
    power_table,
    sd_interval,
    seed_spread,
    seeds_per_arm,
    simulated_power,
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m analysis power",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="How many seeds per arm a comparison needs, how well n seeds pin down the seed SD, and how "
        "far a new seed must lie from n reference seeds to be an outlier (Colas et al. 2018, "
        "arXiv 1806.08295). The last line printed is 'seeds per arm: N'.",
        epilog="examples:\n  python -m analysis power --effect 1\n"
        "  python -m analysis power --from polypythias-evals/ --metric arc_easy/acc --model 410m --delta 0.01\n"
        "  python -m analysis power --effect 0.5 --paired --out results/power\n\n"
        "An MLflow experiment literally named 'power': python -m analysis -- power (a folder: ./power).\n"
        "See docs/power.md.",
    )
    p.add_argument(
        "--effect",
        type=float,
        metavar="D",
        help="the difference to detect in seed SDs (Cohen's d; paired: d_z, in SDs of the per-seed differences)",
    )
    p.add_argument(
        "--delta",
        type=float,
        metavar="X",
        help="the difference to detect in the metric's own units (needs --from and --metric: d = X / "
        "the seed SD found there)",
    )
    p.add_argument(
        "--from",
        dest="source",
        metavar="SOURCE",
        help="take the seed SD from a study: anything python -m analysis reads (MLflow experiment, "
        "folder of lm-eval results, .csv/.tsv table)",
    )
    p.add_argument("--metric", help="the metric of --from whose seed SD counts (e.g. arc_easy/acc, train/loss)")
    p.add_argument("--model", help="the model of --from (needed when it holds several)")
    p.add_argument("--step", type=int, help="the step of --from (default: the model's last step of --metric)")
    p.add_argument("--alpha", type=float, default=0.05, help="the test's level (default 0.05)")
    p.add_argument("--power", type=float, default=0.8, help="the power to reach (default 0.8)")
    p.add_argument(
        "--paired", action="store_true", help="each seed runs in both arms: a paired t-test on the per-seed differences"
    )
    p.add_argument("--one-sided", action="store_true", help="test one direction only (as Colas et al. do)")
    p.add_argument(
        "--level",
        type=float,
        default=0.95,
        help="confidence of the SD interval and the outlier (prediction) interval (default 0.95)",
    )
    p.add_argument(
        "--simulations",
        type=int,
        default=10_000,
        help="studies simulated with scipy.stats.power to check the analytic power (0: skip; default 10000)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed of the simulation (default 0)")
    p.add_argument("--out", type=Path, help="write power.csv and power_curve.png into this folder")
    p.add_argument("--tracking-uri", help="MLflow tracking URI of --from (default: as python -m analysis)")
    p.add_argument("--parent-run", help="with --from an MLflow experiment: only this sweep's runs")
    return p


def options_error(args) -> str | None:
    """What is wrong with the options before anything is loaded, as one sentence."""
    if args.effect is None and args.delta is None:
        return "Give the difference to detect: --effect D in seed SDs, or --delta X in the metric's units with --from."
    if args.effect is not None and args.delta is not None:
        return "Give the difference to detect once: --effect D in seed SDs or --delta X in metric units, not both."
    if args.delta is not None and args.source is None:
        return (
            "--delta is in the metric's units and needs the seed SD: add --from SOURCE --metric M, or give "
            "--effect D in seed SDs instead."
        )
    if args.delta is not None and args.paired:
        return (
            "--delta with --paired needs the SD of the per-seed differences, which one study's seed spread does "
            "not give; give --effect as d_z (mean difference / SD of the differences) instead."
        )
    if args.delta is not None and not (math.isfinite(args.delta) and args.delta > 0):
        return f"--delta must be a positive difference in the metric's units, not {args.delta:g}."
    if (args.source is None) != (args.metric is None):
        return "--from and --metric go together: the seed SD is that of one metric of one study."
    if not 0 < args.level < 1 or args.simulations < 0:
        return "--level must lie between 0 and 1 (default 0.95) and --simulations must be 0 or more."
    return None


def study_spread(args) -> SeedSpread:
    """The seed spread of ``--metric`` in ``--from``: a file source is read whole (so that a missing metric
    can be told apart from a misspelt one), an MLflow one only for that metric."""
    from analysis.load import choose_source, load_study
    from polypythia.tracking.client import default_tracking_uri

    from_mlflow = choose_source(args.source).kind == "mlflow"
    try:
        study = load_study(
            args.source,
            tracking_uri=args.tracking_uri or default_tracking_uri(),
            parent_run_id=args.parent_run,
            metrics=[args.metric] if from_mlflow else None,
            model=args.model,
        )
    except AnalysisError as error:
        if from_mlflow and "holds no metric values" in str(error):
            raise AnalysisError(
                f"The source {args.source} has no metric {args.metric!r}; give one of its metrics with --metric."
            ) from None
        raise
    return seed_spread(study, args.metric, args.model, args.step)


def effect_of(args, spread: SeedSpread | None) -> tuple[float, list[str]]:
    """The effect in seed SDs, and lines saying where the seed SD came from."""
    if spread is None:
        return args.effect, []
    lines = [
        f"Seed SD of {spread.metric}, model {spread.model}, step {spread.step}: {spread.sd:.4g} (mean "
        f"{spread.mean:.4g}) over {len(spread.values)} runs: {', '.join(spread.values.index)}; they vary the "
        f"{spread.design}."
    ]
    if spread.left_out:
        lines.append(f"  Runs without a value at step {spread.step}, left out: {', '.join(spread.left_out)}.")
    if args.delta is None:
        return args.effect, lines
    if not spread.sd > 0:
        raise AnalysisError(
            f"The {len(spread.values)} runs of {spread.model} give the same {spread.metric} at step "
            f"{spread.step} (SD 0), so --delta is no number of SDs; give --effect instead."
        )
    effect = args.delta / spread.sd
    lines.append(f"Effect: delta {args.delta:g} = {effect:.3g} seed SDs.")
    return effect, lines


def sd_lines(args, design: Design, spread: SeedSpread, level: float) -> list[str]:
    """In the metric's units: where the true SD lies, what that means for --delta, and the outlier bounds."""
    n = len(spread.values)
    low, high = (float(x) * spread.sd for x in sd_interval(n, level))
    lines = [f"With {n} seeds the true SD of {spread.model} lies within {low:.4g}-{high:.4g} ({level:.0%})."]
    if args.delta is not None and low > 0:
        ends = []
        for sd in (high, low):
            try:
                ends.append(
                    str(
                        seeds_per_arm(
                            Design(args.delta / sd, design.alpha, design.power, design.paired, design.one_sided)
                        )
                    )
                )
            except AnalysisError:
                ends.append(f"more than {MAX_SEEDS:,}")
        lines.append(
            f"  With the SD at either end of that interval, delta {args.delta:g} needs {ends[1]}-{ends[0]} "
            "seeds per arm."
        )
    k = float(outlier_distance_sd(n, level))
    lines.append(
        f"A new seed of {spread.model} at step {spread.step} is an outlier ({level:.0%} prediction interval "
        f"of these {n}) outside {spread.mean - k * spread.sd:.4g} to {spread.mean + k * spread.sd:.4g} "
        f"(mean +- {k:.2f} SD)."
    )
    return lines


def table_lines(design: Design, n: int, level: float) -> list[str]:
    """The power curve, the SD interval and the outlier distance for 2-30 seeds, one line each."""
    table = power_table(design, level)
    lines = [
        f"{'pairs' if design.paired else 'seeds':>6}  power  true SD / measured SD  outlier beyond",
        f"{'':15}{'(' + format(level, '.0%') + ', chi-square)':^22} {'(SDs from the mean)':>19}",
    ]
    for row in table.itertuples():
        mark = "   <- seeds per arm" if row.seeds == n else ""
        lines.append(
            f"{row.seeds:>6}  {row.power:5.3f}  {row.sd_low:9.2f} - {row.sd_high:<9.2f}{row.outlier_sd:12.2f}{mark}"
        )
    return [
        *lines,
        "  power: of the test with that many seeds per arm; true SD: where the seed SD lies, given the "
        "one measured on that many seeds;",
        "  outlier: how far from the mean of that many reference seeds a "
        f"new seed leaves their {level:.0%} prediction interval.",
    ]


def report(args, design: Design, spread: SeedSpread | None, source_lines: list[str]) -> tuple[list[str], int]:
    """Every line printed, ending with 'seeds per arm: N', and N."""
    n = seeds_per_arm(design)
    lines = [
        *source_lines,
        f"Seeds per arm to detect d = {design.effect_sd:.3g} seed SDs ({design.describe()}):",
        f"  {n} give power {float(power_at(n, design)):.3f} (noncentral t)"
        + (f"; {n - 1} give {float(power_at(n - 1, design)):.3f}." if n > 2 else "."),
    ]
    if args.simulations:
        simulated = simulated_power(n, design, args.simulations, args.seed)
        se = math.sqrt(simulated * (1 - simulated) / args.simulations)
        lines.append(
            f"  Simulated with scipy.stats.power ({args.simulations:,} studies of {n} seeds per arm): "
            f"power {simulated:.3f} +- {se:.3f}."
        )
    lines += ["", *table_lines(design, n, args.level), ""]
    if spread is not None:
        lines += [*sd_lines(args, design, spread, args.level), ""]
    if n > CURVE_SEEDS[-1]:
        lines.append(f"{n} seeds per arm lie beyond the table's {CURVE_SEEDS[-1]}.")
    return [*lines, f"seeds per arm: {n}"], n


def plot_power_curve(design: Design, n: int, path: Path) -> Path:
    """The power against seeds per arm (2-30, and n), the target power and n marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted(set(CURVE_SEEDS) | {n})
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(seeds, power_at(seeds, design), marker="o", markersize=3)
    ax.axhline(design.power, color="grey", linestyle="--", linewidth=1, label=f"power {design.power:g}")
    ax.axvline(n, color="tab:red", linewidth=1, label=f"{n} seeds per arm")
    ax.set(
        xlabel="pairs of seeds" if design.paired else "seeds per arm",
        ylabel="power",
        ylim=(0, 1.02),
        title=f"d = {design.effect_sd:.3g} SD, {design.describe()}",
    )
    ax.title.set_fontsize(8)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(args) -> int:
    error = options_error(args)
    if error and Path("power").exists():
        error = error[:-1] + " (to analyse the study ./power instead, write python -m analysis ./power)."
    if error:
        raise AnalysisError(error)
    if args.effect is not None:  # before a study is loaded
        check_design(Design(args.effect, args.alpha, args.power, args.paired, args.one_sided))
    check_design(Design(1.0, args.alpha, args.power))
    spread = study_spread(args) if args.source is not None else None
    effect, source_lines = effect_of(args, spread)
    design = Design(effect, args.alpha, args.power, args.paired, args.one_sided)
    lines, n = report(args, design, spread, source_lines)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        power_table(design, args.level).to_csv(args.out / "power.csv", index=False)
        figure = plot_power_curve(design, n, args.out / "power_curve.png")
        lines.insert(-1, f"Wrote {args.out / 'power.csv'} and {figure}.")
    print("\n".join(lines))
    return 0


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return run(args)
    except AnalysisError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
