"""Cross-seed analysis of polypythia studies: load, statistics, spikes, outliers, training maps, report.

Read a study from MLflow, lm-evaluation-harness result files or a tidy CSV into one table
(``model, seed, step, metric, value``) and analyse it, from a notebook::

    from analysis import load_study, cross_seed_stats, find_spikes, find_outliers, fit_training_maps
    study = load_study("my-study", tracking_uri="http://127.0.0.1:5050")
    stats = cross_seed_stats(study.metrics)

or from the shell: ``python -m analysis <source> --out DIR`` (see ``--help``). Port 5050 is the local
tracking server's first choice (``polypythia.runtime.env.DEFAULT_TRACKING_PORT``); it takes the next free
port when that one is busy, and ``python -m polypythia.tracking.client status`` prints the URI it runs on.
"""

from analysis.errors import AnalysisError
from analysis.lmeval import load_lm_eval_folder
from analysis.load import load_study
from analysis.mlflow_load import load_mlflow
from analysis.outliers import (
    OutlierRule,
    decision_threshold,
    find_outliers,
    flag_mad_outliers,
    flag_trajectory_outliers,
    pooled_deviation,
    standardised_accuracy,
)
from analysis.report import AnalysisOptions, AnalysisResult, run_analysis
from analysis.spikes import find_spikes
from analysis.stats import (
    BootstrapComparison,
    checkpoint_steps,
    compare_models,
    cross_seed_stats,
    multi_bootstrap,
    spread_test,
)
from analysis.summary import final_loss_summary, print_summary
from analysis.table_file import load_tidy_file
from analysis.tidy_table import Study, sort_models, tidy
from analysis.training_maps import TrainingMaps, fit_training_maps

__all__ = [
    "AnalysisError",
    "AnalysisOptions",
    "OutlierRule",
    "AnalysisResult",
    "BootstrapComparison",
    "Study",
    "TrainingMaps",
    "checkpoint_steps",
    "compare_models",
    "cross_seed_stats",
    "final_loss_summary",
    "find_outliers",
    "find_spikes",
    "decision_threshold",
    "fit_training_maps",
    "flag_mad_outliers",
    "flag_trajectory_outliers",
    "load_lm_eval_folder",
    "load_mlflow",
    "load_study",
    "load_tidy_file",
    "multi_bootstrap",
    "pooled_deviation",
    "print_summary",
    "run_analysis",
    "sort_models",
    "spread_test",
    "standardised_accuracy",
    "tidy",
]
