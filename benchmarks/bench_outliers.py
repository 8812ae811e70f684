"""False alarms and detections of the outlier rule on generated studies, beside the literal band rule.

Run:  PYTHONPATH=. python benchmarks/bench_outliers.py [--draws 400]

Each study has 10 runs on the PolyPythias 27 evaluation checkpoints (analysis/synthetic.py,
``correlated_study``): a shared curve plus per-run noise that is part constant offset, part AR(1)
noise correlated between consecutive checkpoints. Healthy studies are drawn on a grid of
correlations and offset shares, including settings outside those the threshold was calibrated on
(analysis/outliers.py, NULL_MODELS); studies with planted collapses measure how often the rule
finds them at their onset checkpoint. The baseline is the study's band read literally: a run
more than 2 SD from the others' mean at three consecutive checkpoints.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

from analysis.outliers import band_deviation, decision_threshold, find_outliers
from analysis.synthetic import Dip, correlated_study

NULL_GRID = [(0.0, 0.0), (0.5, 0.2), (0.8, 0.4), (0.9, 0.5), (0.95, 0.7), (0.99, 0.3)]


def literal_band_rule(study: pd.DataFrame, band_sd: float = 2.0, consecutive: int = 3) -> set[str]:
    """Runs more than ``band_sd`` from the others' mean at ``consecutive`` checkpoints in a row."""
    table = study.pivot_table(index="step", columns="seed", values="value", observed=True)
    outside = (band_deviation(table).abs() > band_sd).to_numpy()
    flagged = set()
    for column, run in zip(table.columns, outside.T):
        streak = np.convolve(run.astype(int), np.ones(consecutive, dtype=int), mode="valid")
        if (streak == consecutive).any():
            flagged.add(str(column))
    return flagged


def null_rates(draws: int) -> pd.DataFrame:
    """Share of healthy studies with any flagged run, and of healthy runs flagged, per null setting."""
    rows = []
    for correlation, share in NULL_GRID:
        ours = literal = ours_runs = literal_runs = 0
        for draw in range(draws):
            study = correlated_study(correlation=correlation, offset_share=share, random_state=10_000 + draw)
            flagged = set(find_outliers(study, outlier_metrics=["score"])["seed"])
            band = literal_band_rule(study)
            ours, literal = ours + bool(flagged), literal + bool(band)
            ours_runs, literal_runs = ours_runs + len(flagged), literal_runs + len(band)
        rows.append(
            {
                "correlation": correlation,
                "offset_share": share,
                "studies": draws,
                "studies_with_false_alarm": ours / draws,
                "healthy_runs_flagged": ours_runs / (10 * draws),
                "literal_band_studies": literal / draws,
                "literal_band_runs": literal_runs / (10 * draws),
            }
        )
    return pd.DataFrame(rows)


def detection_rates(draws: int) -> pd.DataFrame:
    """Share of planted excursions found at their onset checkpoint, by depth (in seed-spread SDs)."""
    rows = []
    for depth in (8.0, 10.0, 12.0, 15.0):
        for kind, dips in (
            ("collapse at 83,000", (Dip(3, 83_000, depth),)),
            ("dip 23,000-63,000", (Dip(6, 23_000, depth, 63_000),)),
            ("two collapses at 93,000", (Dip(2, 93_000, depth), Dip(7, 93_000, depth))),
        ):
            at_onset = recovered_right = other_runs = 0
            for draw in range(draws):
                study = correlated_study(dips=dips, random_state=20_000 + draw)
                found = find_outliers(study, outlier_metrics=["score"])
                planted = {str(d.seed) for d in dips}
                hits = found[found["seed"].isin(planted)]
                onsets = {(str(r.seed), int(r.onset_step)) for r in hits.itertuples()}
                at_onset += all((str(d.seed), d.onset_step) in onsets for d in dips)
                if dips[0].recovery_step:
                    recovered_right += bool(len(hits)) and bool(hits["recovered"].iloc[0])
                other_runs += int((~found["seed"].isin(planted)).sum())
            rows.append(
                {
                    "depth_sd": depth,
                    "planted": kind,
                    "found_at_onset": at_onset / draws,
                    "marked_recovered": recovered_right / draws if dips[0].recovery_step else np.nan,
                    "healthy_runs_flagged": other_runs / (draws * (10 - len(dips))),
                }
            )
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=400, help="studies per setting (default 400)")
    args = parser.parse_args()
    start = time.perf_counter()
    print(
        f"threshold for 10 runs x 27 checkpoints: {decision_threshold(10, 27):.2f} SD "
        f"(20 runs: {decision_threshold(20, 27):.2f}; 5 runs: {decision_threshold(5, 27):.2f})"
    )
    pd.set_option("display.width", 200)
    print("\nHealthy studies (10 runs x 27 checkpoints): share of studies with any outlier, and of runs flagged")
    print(null_rates(args.draws).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"\nPlanted excursions ({max(args.draws // 4, 1)} studies each)")
    print(detection_rates(max(args.draws // 4, 1)).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
