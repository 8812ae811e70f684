"""Fixtures of the analysis tests: small synthetic studies (the MLflow server fixtures are in tests/conftest.py)."""

from __future__ import annotations

import pytest

from analysis.synthetic import Collapse, Spike, StudySpec, synthetic_study


@pytest.fixture(scope="session")
def outlier_study():
    """410m: seed 3 collapses at 8,000 and is back at 14,000; seed 7 collapses at 12,000, recovers only partly.
    70m: seed 2 has loss spikes at steps 5,000 and 9,000. Everything else is stable."""
    spec = StudySpec(
        models=("70m", "410m"),
        n_seeds=10,
        final_step=20_000,
        collapses=[Collapse("410m", 3, 8_000, 14_000), Collapse("410m", 7, 12_000, None)],
        spikes=[Spike("70m", 2, 5_000, height_sd=30), Spike("70m", 2, 9_000, height_sd=15)],
    )
    return synthetic_study(spec)


@pytest.fixture(scope="session")
def stable_study():
    """Two sizes, ten seeds, nothing injected."""
    return synthetic_study(StudySpec(models=("70m", "160m"), n_seeds=10, final_step=30_000, random_state=7))
