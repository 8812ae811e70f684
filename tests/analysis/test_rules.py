"""The outlier-rule registry: a rule is one file in analysis/rules/ (the example of docs/analysis.md,
run here as written), and find_outliers, the markdown report and the replay pick it up; the built-in
rules are registered and their knobs reach them by name."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pandas as pd
import pytest

import analysis.rules as rules
from analysis import find_outliers
from analysis.__main__ import main
from analysis.outliers import MadKnobs, OutlierRule
from analysis.replay import replay
from analysis.synthetic import Dip, correlated_study

DOC = Path(__file__).parents[2] / "docs" / "analysis.md"


def doc_example() -> str:
    """The python block of the "Adding an outlier rule" section of docs/analysis.md."""
    section = DOC.read_text().split("## Adding an outlier rule", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return code


@pytest.fixture
def above_level(tmp_path, monkeypatch):
    """The doc's rule saved as one file in a folder of the analysis.rules package, found by discovery."""
    (tmp_path / "above_level.py").write_text(doc_example())
    monkeypatch.setattr(rules, "__path__", [*rules.__path__, str(tmp_path)])
    monkeypatch.setattr(rules, "_discovered", False)
    yield
    rules.unregister("above_level")
    sys.modules.pop("analysis.rules.above_level", None)


def study_with_a_blow_up() -> tuple[pd.DataFrame, float]:
    """A healthy one-metric study in which seed 2 jumps far above every other value from step 93,000."""
    study = correlated_study(random_state=3)
    level = float(study["value"].max()) + 1.0
    late = (study["seed"].astype(str) == "2") & (study["step"] >= 93_000)
    study.loc[late, "value"] += 10.0
    return study, level


def test_the_documented_rule_is_one_file_and_find_outliers_runs_it(above_level):
    study, level = study_with_a_blow_up()
    assert "above_level" in [rule.name for rule in rules.registered()]
    knobs_type = sys.modules["analysis.rules.above_level"].AboveLevelKnobs
    outliers = find_outliers(study, outlier_metrics=["score"], knobs={"above_level": knobs_type(level=level)})
    mine = outliers[outliers["rule"] == "above_level"]
    assert mine[["seed", "metric", "onset_step"]].values.tolist() == [["2", "score", 93_000]]
    assert (outliers["rule"] == "calibrated").any()  # the built-in rules still run beside it
    quiet = find_outliers(study, outlier_metrics=["score"], knobs={"above_level": knobs_type(level=level + 100)})
    assert not (quiet["rule"] == "above_level").any()
    alerts = replay(study, outliers, ["score"])  # a rule without first_alerts is not replayed
    assert set(alerts["rule"]) == {"calibrated"}


def test_the_documented_rule_reaches_the_markdown_report(above_level, tmp_path):
    study, _ = study_with_a_blow_up()  # the default level, 10, is above every healthy value (about -1 to 1)
    path = tmp_path / "study.csv"
    study.to_csv(path, index=False)
    assert main([str(path), "--out", str(tmp_path / "out"), "--outlier-metric", "score", "--no-plots"]) == 0
    report = (tmp_path / "out" / "report.md").read_text()
    assert "`above_level`: a judged value above the level (from its first such checkpoint)." in report
    outliers = pd.read_csv(tmp_path / "out" / "outliers.csv")
    assert outliers.loc[outliers["rule"] == "above_level", "onset_step"].tolist() == [93_000]


def test_the_built_in_rules_and_their_knobs_by_name():
    assert [rule.name for rule in rules.registered()][:2] == ["calibrated", "mad"]
    study = correlated_study(dips=(Dip(seed=2, onset_step=93_000, depth_sd=15.0),), random_state=3)
    strict = find_outliers(study, outlier_metrics=["score"], knobs={"calibrated": OutlierRule(false_alarm_rate=0.001)})
    assert strict[["seed", "rule", "onset_step"]].values.tolist() == [["2", "calibrated", 93_000]]
    assert find_outliers(study, outlier_metrics=["score"], knobs={"calibrated": OutlierRule(band_sd=50.0)}).empty
    assert find_outliers(study, outlier_metrics=["score"], knobs={"mad": MadKnobs(metrics=("score",))})[
        "rule"
    ].tolist() == ["calibrated", "mad_3.5"]


def test_a_rule_name_is_registered_once():
    with pytest.raises(ValueError, match="registered already"):
        rules.register(rules.REGISTRY["mad"])
