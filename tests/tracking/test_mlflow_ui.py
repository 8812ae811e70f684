"""The study in the MLflow UI (polypythia.tracking.ui): the printed link, the experiment's tags, the seeds band."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from polypythia.tracking import ui as mlflow_ui

PARENT = "0123456789abcdef0123456789abcdef"


def _split(url: str) -> tuple[str, str, dict[str, str]]:
    """(origin, hash route, query of the hash route) of a UI link."""
    parts = urlsplit(url)
    route, _, query = parts.fragment.partition("?")
    params = {k: v[0] for k, v in parse_qs(query, keep_blank_values=True, strict_parsing=True).items()}
    return f"{parts.scheme}://{parts.netloc}{parts.path}", route, params


# ----------------------------------------------------------------------------- study_url


def test_study_url_lands_on_the_sweeps_training_runs_charted():
    url = mlflow_ui.study_url("http://127.0.0.1:5050", "7", PARENT)
    origin, route, params = _split(url)
    assert origin == "http://127.0.0.1:5050/"
    assert route == "/experiments/7/runs"
    assert params == {
        "workflowType": "machine_learning",
        "compareRunsMode": "CHART",
        "searchFilter": f"tags.`polypythia.kind` = 'job' and tags.`mlflow.parentRunId` = '{PARENT}'",
        "orderByKey": "tags.`mlflow.runName`",
        "orderByAsc": "true",
    }
    assert " " not in url and "`" not in url and "'" not in url  # percent-encoded: the link survives copy and paste


def test_study_url_without_a_sweep_lists_every_job_run_of_the_study():
    _, route, params = _split(mlflow_ui.study_url("http://localhost:5050/", 3))
    assert route == "/experiments/3/runs"
    assert params["searchFilter"] == "tags.`polypythia.kind` = 'job'"


def test_study_url_table_view():
    _, _, params = _split(mlflow_ui.study_url("http://127.0.0.1:5050", "1", charts=False))
    assert "compareRunsMode" not in params
    assert params["workflowType"] == "machine_learning"


def test_study_url_with_a_saved_view_carries_no_search_facets():
    """The UI ignores a saved view when the URL also has a filter or an order."""
    _, route, params = _split(mlflow_ui.study_url("http://127.0.0.1:5050", "1", PARENT, view_id="polypythia-abc"))
    assert route == "/experiments/1/runs"
    assert params == {
        "workflowType": "machine_learning",
        "compareRunsMode": "CHART",
        "viewStateShareKey": "polypythia-abc",
    }


# ----------------------------------------------------------------------------- saved view


class _FakeExperiment:
    def __init__(self, tags):
        self.tags = tags


class _FakeClient:
    def __init__(self):
        self.tags: dict[str, dict[str, str]] = {}

    def get_experiment(self, experiment_id):
        return _FakeExperiment(dict(self.tags.get(experiment_id, {})))

    def set_experiment_tag(self, experiment_id, key, value):
        self.tags.setdefault(experiment_id, {})[key] = value


def test_save_study_view_writes_the_uis_saved_view_envelope():
    client = _FakeClient()
    view_id = mlflow_ui.save_study_view(client, "4", PARENT, group_by_tag="model")
    envelope = json.loads(client.tags["4"][mlflow_ui.SHARED_VIEW_TAG_PREFIX + view_id])
    assert set(envelope) == {"name", "createdAt", "updatedAt", "state"}
    assert isinstance(envelope["name"], str) and isinstance(envelope["createdAt"], int)
    assert isinstance(envelope["state"], str)  # the UI parses the state from a string
    state = json.loads(envelope["state"])
    assert state["searchFilter"] == mlflow_ui.runs_filter(PARENT)
    assert state["orderByKey"] == "tags.`mlflow.runName`" and state["orderByAsc"] is True
    assert state["runsHiddenMode"] == "SHOW_ALL"
    assert state["groupBy"] == {
        "aggregateFunction": "average",
        "groupByKeys": [{"mode": "tag", "groupByData": "model"}],
    }


def test_save_study_view_again_updates_the_same_view():
    client = _FakeClient()
    first = mlflow_ui.save_study_view(client, "4", PARENT)
    created = json.loads(client.tags["4"][mlflow_ui.SHARED_VIEW_TAG_PREFIX + first])["createdAt"]
    assert mlflow_ui.save_study_view(client, "4", PARENT, name="renamed") == first
    again = json.loads(client.tags["4"][mlflow_ui.SHARED_VIEW_TAG_PREFIX + first])
    assert again["createdAt"] == created and again["name"] == "renamed"
    assert mlflow_ui.save_study_view(client, "4", None) != first  # another sweep (here: the whole study), another view
    assert "groupBy" not in json.loads(again["state"])


# ----------------------------------------------------------------------------- seeds band


def test_seeds_band_metrics_are_numpy_percentiles_skipping_nan():
    band = mlflow_ui.seeds_band_metrics({"a": 1.0, "b": 2.0, "c": float("nan"), "d": 3.0, "e": 4.0})
    assert band == pytest.approx(
        {
            "seeds/loss_median": 2.5,
            "seeds/loss_p25": 1.75,
            "seeds/loss_p75": 3.25,
            "seeds/loss_min": 1.0,
            "seeds/loss_max": 4.0,
        }
    )
    assert all(isinstance(v, float) for v in band.values())


def test_seeds_band_metrics_of_one_run_and_of_none():
    assert mlflow_ui.seeds_band_metrics({"a": 2.0}) == {
        k: 2.0 for k in ("seeds/loss_median", "seeds/loss_p25", "seeds/loss_p75", "seeds/loss_min", "seeds/loss_max")
    }
    assert mlflow_ui.seeds_band_metrics({}) == {}
    assert mlflow_ui.seeds_band_metrics({"a": float("nan"), "b": math.nan}) == {}


# ----------------------------------------------------------------------------- a real server


@pytest.mark.integration
def test_mark_training_experiment_and_saved_view_on_a_real_server(mlflow_uri):
    import uuid

    from polypythia.tracking import client as tracking

    client = tracking.client(mlflow_uri)  # the session's server: an experiment of this test's own
    experiment_id = tracking.experiment_id(client, f"ui-study-{uuid.uuid4().hex[:8]}")
    mlflow_ui.mark_training_experiment(client, experiment_id)
    mlflow_ui.mark_training_experiment(client, experiment_id)  # idempotent
    tags = client.get_experiment(experiment_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"

    view_id = mlflow_ui.save_study_view(client, experiment_id, PARENT)
    stored = json.loads(client.get_experiment(experiment_id).tags[f"mlflow.sharedViewState.{view_id}"])
    assert json.loads(stored["state"])["runsHiddenMode"] == "SHOW_ALL"


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs headless Chromium (apt-get install chromium)")
def test_the_printed_link_charts_the_training_runs_in_a_browser(tmp_path):
    """scripts/screenshot_mlflow_ui.py: a real server, a fake study, the link in headless Chromium;
    it fails unless the runs' loss chart is drawn (and it stops the server it starts)."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "scripts" / "screenshot_mlflow_ui.py"
    spec = importlib.util.spec_from_file_location("screenshot_mlflow_ui", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "study.png"
    assert module.main(["--out", str(out), "--timeout", "60"]) == 0
    assert out.stat().st_size > 10_000
