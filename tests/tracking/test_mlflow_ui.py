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


def test_study_url_lands_on_the_sweeps_runs_charted():
    url = mlflow_ui.study_url("http://127.0.0.1:5050", "7", PARENT)
    origin, route, params = _split(url)
    assert origin == "http://127.0.0.1:5050/"
    assert route == "/experiments/7/runs"
    assert params == {
        "workflowType": "machine_learning",
        "compareRunsMode": "CHART",
        "searchFilter": f"tags.`polypythia.sweep` = '{PARENT}'",  # its job runs and its parent (the band)
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


def _layout_order(state: dict) -> list[tuple[str, list[str]]]:
    """(section name, chart titles) in the order the UI draws them: sections as listed, charts in
    each section as listed (what the UI does when ``isAccordionReordered`` is set)."""
    names = {s["uuid"]: s["name"] for s in state["compareRunSections"]}
    assert len(names) == len(state["compareRunSections"])  # unique ids
    order = []
    for section in state["compareRunSections"]:
        titles = [c["displayName"] for c in state["compareRunCharts"] if c["metricSectionId"] == section["uuid"]]
        order.append((section["name"], titles))
    assert {c["metricSectionId"] for c in state["compareRunCharts"]} <= set(names)  # no chart without a section
    return order


def test_the_sweeps_view_charts_the_loss_and_the_seed_band_before_the_monitor():
    state = mlflow_ui.study_view_state(PARENT)
    assert state["isAccordionReordered"] is True  # else the UI sorts the sections by name: monitor first
    order = _layout_order(state)
    assert order[0] == ("loss", ["train/loss", "valid/loss", "seed band (seeds/loss_*)"])
    names = [name for name, _ in order]
    assert names.index("loss") < names.index("train") < names.index("valid") < names.index("seeds")
    assert names.index("seeds") < names.index("monitor")
    assert names[-2:] == ["Model metrics", "System metrics"]  # the UI's own sections stay last
    assert sorted(names[:-2]) != names[:-2]  # not the UI's alphabetical order, which puts monitor first
    band = state["compareRunCharts"][2]
    assert band["metricKey"] == "seeds/loss_median"
    assert band["selectedMetricKeys"] == [f"seeds/loss_{q}" for q in ("median", "p25", "p75", "min", "max")]
    assert set(band["selectedMetricKeys"]) == set(mlflow_ui.seeds_band_metrics({"a": 1.0}))  # the keys logged
    assert {c["type"] for c in state["compareRunCharts"]} == {"LINE"}
    assert not any(c["isGenerated"] for c in state["compareRunCharts"])  # the UI must not replace them
    assert state["runsHiddenMode"] == "SHOW_ALL"
    json.dumps(state)  # it travels as JSON in an experiment tag


def test_the_sweeps_filter_takes_its_runs_and_its_parent_the_studys_only_job_runs():
    assert mlflow_ui.runs_filter(PARENT) == f"tags.`polypythia.sweep` = '{PARENT}'"
    assert mlflow_ui.runs_filter() == "tags.`polypythia.kind` = 'job'"


class _FakeRunClient:
    """The calls of open_sweep_view/join_sweep_view: experiment and run tags, the parent run's tags."""

    def __init__(self, parent_tags):
        self.experiment_tags, self.run_tags = {}, {}
        self.parent_tags = parent_tags

    def set_experiment_tag(self, experiment_id, key, value):
        self.experiment_tags[key] = value

    def get_experiment(self, experiment_id):
        return _FakeExperiment(dict(self.experiment_tags))

    def set_tag(self, run_id, key, value):
        self.run_tags.setdefault(run_id, {})[key] = value

    def log_batch(self, run_id, tags=()):
        self.run_tags.setdefault(run_id, {}).update({t.key: t.value for t in tags})

    def get_run(self, run_id):
        from types import SimpleNamespace

        assert run_id == PARENT
        return SimpleNamespace(data=SimpleNamespace(tags=dict(self.parent_tags)))


def test_open_and_join_the_sweep_view_colour_each_run_apart():
    names = ["14m-seed1", "14m-seed2", "14m-seed3"]
    client = _FakeRunClient({"jobs": ", ".join(names)})
    view_id = mlflow_ui.open_sweep_view(client, "5", PARENT)
    assert client.experiment_tags["mlflow.experimentKind"] == "custom_model_development"
    assert (
        json.loads(json.loads(client.experiment_tags[f"mlflow.sharedViewState.{view_id}"])["state"])[
            "compareRunSections"
        ][0]["name"]
        == "loss"
    )
    assert client.run_tags[PARENT] == {"polypythia.sweep": PARENT, "mlflow.runColor": mlflow_ui.BAND_COLOR}
    for i, name in enumerate(reversed(names)):  # in whatever order the jobs start
        mlflow_ui.join_sweep_view(client, f"run-{i}", PARENT, name)
    colours = [client.run_tags[f"run-{i}"]["mlflow.runColor"] for i in range(3)]
    assert all(client.run_tags[f"run-{i}"]["polypythia.sweep"] == PARENT for i in range(3))
    assert len(set(colours + [mlflow_ui.BAND_COLOR])) == 4  # each run its own, none the band's
    assert colours == list(reversed(mlflow_ui.RUN_COLORS[:3]))  # by place in the sweep, not start order
    mlflow_ui.join_sweep_view(client, "lone", None, "x")  # no sweep: nothing to tag
    assert "lone" not in client.run_tags


def test_joining_the_sweep_view_never_fails_the_run(caplog):
    class Down(_FakeRunClient):
        def get_run(self, run_id):
            raise ConnectionError("server down")

    mlflow_ui.join_sweep_view(Down({}), "run-0", PARENT, "14m-seed1")  # logged, not raised
    assert "Could not tag run run-0" in caplog.text


def test_run_colors_are_distinct_before_they_repeat():
    assert len(set(mlflow_ui.RUN_COLORS)) == len(mlflow_ui.RUN_COLORS)
    assert mlflow_ui.BAND_COLOR not in mlflow_ui.RUN_COLORS
    assert all(c.startswith("#") and len(c) == 7 for c in (*mlflow_ui.RUN_COLORS, mlflow_ui.BAND_COLOR))
    names = [f"r{i}" for i in range(14)]
    assert mlflow_ui.run_color("r12", names) == mlflow_ui.RUN_COLORS[0]  # twelve, then again
    assert mlflow_ui.run_color("elsewhere", names) in mlflow_ui.RUN_COLORS  # not in the list: a hash, still one of them


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
def test_the_sweeps_filter_finds_its_parent_and_its_runs_on_a_real_server(mlflow_uri):
    """MLflow's filter has no OR: the parent run (the band) and the job runs share the sweep tag."""
    import uuid

    from polypythia.tracking import client as tracking

    client = tracking.client(mlflow_uri)
    experiment_id = tracking.experiment_id(client, f"ui-sweep-{uuid.uuid4().hex[:8]}")
    parent = client.create_run(experiment_id, run_name="sweep", tags={"polypythia.kind": "sweep", "jobs": "a, b"})
    parent_id = parent.info.run_id
    view_id = mlflow_ui.open_sweep_view(client, experiment_id, parent_id)
    runs = {}
    for name in ("b", "a"):
        run = client.create_run(
            experiment_id, run_name=name, tags={"polypythia.kind": "job", "mlflow.parentRunId": parent_id}
        )
        mlflow_ui.join_sweep_view(client, run.info.run_id, parent_id, name)
        runs[name] = run.info.run_id
    client.create_run(experiment_id, run_name="other sweep's", tags={"polypythia.kind": "job"})
    state = json.loads(
        json.loads(client.get_experiment(experiment_id).tags[f"mlflow.sharedViewState.{view_id}"])["state"]
    )
    found = client.search_runs(
        [experiment_id], filter_string=state["searchFilter"], order_by=["tags.`mlflow.runName` ASC"]
    )
    assert [r.info.run_name for r in found] == ["a", "b", "sweep"]
    colours = {r.info.run_name: r.data.tags["mlflow.runColor"] for r in found}
    assert colours == {"a": mlflow_ui.RUN_COLORS[0], "b": mlflow_ui.RUN_COLORS[1], "sweep": mlflow_ui.BAND_COLOR}


def _screenshot_script():
    """scripts/screenshot_mlflow_ui.py as a module (scripts/ is no package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "scripts" / "screenshot_mlflow_ui.py"
    spec = importlib.util.spec_from_file_location("screenshot_mlflow_ui", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs headless Chromium (apt-get install chromium)")
def test_a_real_sweeps_printed_link_charts_the_loss_first_in_a_browser(tmp_path, cache_dir):
    """scripts/screenshot_mlflow_ui.py: a real (tiny) sweep of two seeds, the link it printed in
    headless Chromium; it fails unless charts are drawn and the ``loss`` section is above ``monitor``
    (and it stops the MLflow server the sweep started)."""
    module = _screenshot_script()
    out, home = tmp_path / "study.png", tmp_path / "home"
    argv = ["--out", str(out), "--home", str(home), "--model", "tiny", "--seeds", "1,2", "--steps", "6"]
    assert module.main([*argv, "--timeout", "60", "budget=smoke", f"data.cache_dir={cache_dir}"]) == 0
    assert out.stat().st_size > 10_000
    from polypythia.tracking import client as tracking

    assert tracking.running_server(home / "mlflow") is None


def test_the_section_check_of_the_screenshot_script():
    """The check the screenshot's exit status rests on: ``loss`` drawn, above ``monitor`` if that is drawn."""
    module = _screenshot_script()
    assert module.loss_first({"loss": 300.0, "train": 700.0, "monitor": 2400.0})
    assert module.loss_first({"loss": 300.0, "monitor": -1})  # monitor off: nothing to be above
    assert not module.loss_first({"loss": 2400.0, "monitor": 300.0})  # MLflow's own order: monitor first
    assert not module.loss_first({"loss": -1, "monitor": 300.0})
