"""The study data model: what identifies a run, how runs are tagged in MLflow and found again,
and the columns of the tidy tables that training, evaluation and analysis write and read.

A run is one (model, weight_seed, data_seed). PolyPythias sets both seeds from one number, so a
run is usually named by that number; its 160M side study varies only the data order or only the
weights (Van der Wal et al., "PolyPythias", ICLR 2025, section 3), and then one number no longer
tells runs apart. :func:`run_label` gives the label every table uses in its ``seed`` column:
``"3"`` when both seeds are 3, ``"w1-d2"`` when the weight seed is 1 and the data seed 2. A
replicate (the same seeds trained again, ``replicate=1``) is its own run, ``"3-rep1"`` or
``"w1-d2-rep1"``: never merged with replicate 0, and set aside from the seed statistics (its spread
beside its seed's is the nondeterminism floor, :mod:`analysis.replicates`).
"""

from __future__ import annotations

import re

# MLflow tags of a study's runs (polypythia.job.mlflowrun writes them; evaluation and analysis read them).
KIND_TAG = "polypythia.kind"  # "sweep" (a parent run), "job" (one training run), "analysis"
SWEEP_KIND, JOB_KIND, ANALYSIS_KIND = "sweep", "job", "analysis"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own nesting tag
MODEL_TAG, SEED_TAG, WEIGHT_SEED_TAG, DATA_SEED_TAG = "model", "seed", "weight_seed", "data_seed"
REPLICATE_TAG = "replicate"  # 0 (absent in runs logged before it existed), or which rerun of the same seeds
WEIGHT_STATS_TAG = "weight_stats"  # which definition of the weight statistics the run logged
RUN_DIR_TAG = "run_dir"  # the run's folder (checkpoints, run record)

# Metric families logged at training steps (every step, every few, or on a clock), not at checkpoints:
# train/* by the loop, monitor/* by the stability monitor, system/* by the sampler, seeds/* on the
# parent run. Everything else (weights/*, valid/*, eval/*) is logged at checkpoints.
PER_STEP_FAMILIES = ("train/", "monitor/", "system/", "seeds/")

# The tidy table every study becomes: one row per (run, step, metric); ``seed`` is the run label.
TIDY_COLUMNS = ["model", "seed", "step", "metric", "value"]
# ... and with the run's two seeds spelled out (what python -m polypythia.evaluate writes).
TIDY_COLUMNS_WITH_SEEDS = ["model", "seed", "weight_seed", "data_seed", "step", "metric", "value"]

_LABEL = re.compile(r"^(?:(?P<seed>\d+)|w(?P<w>\d+)-d(?P<d>\d+))(?:-rep(?P<rep>\d+))?$")


def run_label(weight_seed: int, data_seed: int, replicate: int = 0) -> str:
    """``"k"`` when both seeds are k, else ``"w<weight_seed>-d<data_seed>"``; ``"-rep<r>"`` after it
    for a nonzero replicate."""
    weight_seed, data_seed = int(weight_seed), int(data_seed)
    label = str(weight_seed) if weight_seed == data_seed else f"w{weight_seed}-d{data_seed}"
    return f"{label}-rep{int(replicate)}" if int(replicate) else label


def label_replicate(label) -> int:
    """The replicate of a run label (0 for a label without ``-rep<r>``, or one that is not a run label)."""
    match = _LABEL.match(str(label).strip())
    return int(match.group("rep")) if match and match.group("rep") is not None else 0


def seed_label(label) -> str:
    """The label of the seeds a run trained with, without its replicate: ``"3-rep1"`` -> ``"3"``."""
    seeds = parse_run_label(label)
    return run_label(*seeds) if seeds else str(label)


def parse_run_label(label) -> tuple[int, int] | None:
    """(weight_seed, data_seed) of a label made by :func:`run_label` (or a plain seed number; a replicate's
    seeds are its seeds); None otherwise."""
    match = _LABEL.match(str(label).strip())
    if not match:
        return None
    if match.group("seed") is not None:
        return int(match.group("seed")), int(match.group("seed"))
    return int(match.group("w")), int(match.group("d"))


def replicate_from_tags(tags: dict[str, str]) -> int:
    """The replicate of a job run from its tags (0 for runs logged before the tag existed)."""
    return int(tags.get(REPLICATE_TAG, 0) or 0)


def seeds_from_tags(tags: dict[str, str]) -> tuple[int, int]:
    """(weight seed, data seed) of a job run from its tags (runs logged before both existed: ``seed``)."""
    seed = int(tags.get(SEED_TAG, 0))
    return int(tags.get(WEIGHT_SEED_TAG, seed)), int(tags.get(DATA_SEED_TAG, seed))


def search_job_runs(client, experiment_id: str, parent_run_id: str | None = None) -> list:
    """Every job run of an MLflow experiment, or of one sweep's parent run, page by page (1,000 a page)."""
    query = f"tags.`{KIND_TAG}` = '{JOB_KIND}'"
    if parent_run_id:
        query += f" and tags.`{PARENT_TAG}` = '{parent_run_id}'"
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=query, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def label_order(label) -> tuple:
    """Sort key: plain seeds by number, then variants by (weight seed, data seed), anything else by name."""
    seeds = parse_run_label(label)
    return (0, *seeds, label_replicate(label), "") if seeds else (1, 0, 0, 0, str(label))


def seed_design(weight_seeds, data_seeds) -> str:
    """Which seed a set of runs varies, in words: together, data order only, weights only, or both apart."""
    pairs = set(zip(map(int, weight_seeds), map(int, data_seeds)))
    weights, orders = {w for w, _ in pairs}, {d for _, d in pairs}
    if len(pairs) <= 1:
        return "one run"
    if all(w == d for w, d in pairs):
        return "weight and data seed together (one seed per run)"
    if len(weights) == 1:
        return f"data seed only (weight seed {next(iter(weights))})"
    if len(orders) == 1:
        return f"weight seed only (data seed {next(iter(orders))})"
    return "weight and data seeds independently"
