"""The study in the MLflow UI: the link to print, the tags that make the UI show training runs, and
the ``seeds/*`` band a sweep's parent run carries.

What MLflow 3.17's UI does, read from the installed package (``mlflow/server/js/build/static/js``;
the bundle is minified, so the places are named by the strings to grep for):

- **Which pages an experiment opens on.** ``#/experiments/<id>`` redirects to a tab chosen from the
  *workflow type*, a UI-wide switch ("GenAI" | "Model training" in the sidebar), not from the
  experiment: ``experimentPage.*.chunk.js`` (module ``24546``, the hook with
  ``getExperimentPageTabRoute``) picks the ``runs`` tab for ``custom_model_development`` and
  ``traces``/``overview`` for ``genai_development``, and that kind comes from ``workflowType``
  (``main.*.js``, module ``7975`` with ``"mlflow.workflowType"``): the URL's
  ``?workflowType=genai|machine_learning``, else the browser's localStorage (written only when the
  switch is clicked), else ``genai``. The experiment tag ``mlflow.experimentKind``
  (``custom_model_development`` | ``genai_development``, the enum next to ``GENAI_DEVELOPMENT=`` in
  ``main.*.js``) is read only while the feature flag of the switch is off (module ``31080``, the
  hook with ``"mlflow.experimentKind"===e.key``; the flag is ``Z0`` of module ``89511``, ``()=>!0``
  in 3.17), so the tag alone no longer changes the landing page (checked in headless Chromium: a
  tagged experiment still opens on "Overview"), and no ``mlflow server`` option sets the default.
  The link therefore names the ``runs`` tab and ``workflowType=machine_learning``;
  :func:`mark_training_experiment` still sets the tag, which earlier 3.x UIs and the UI's own kind
  selector (``setExperimentTag`` with ``"mlflow.experimentKind"`` in ``2809.*.chunk.js``) use.
- **The chart view.** ``?compareRunsMode=CHART`` (``TABLE`` by default; the ``compareRunsMode``
  module in ``2809.*.chunk.js``) opens the runs tab on its charts, one per metric, grouped in
  sections by the prefix before the last ``/`` (``train/loss`` is in "train").
- **Child runs.** With the default order (``attributes.start_time``) the runs table nests children
  under their parent (``mlflow.parentRunId``) and shows the parent collapsed; only rows on screen
  are charted, so the training runs drew nothing. Any other order key lists runs flat
  (``nestChildren`` in ``3878.*.chunk.js``: nest only when there is no order key and no filter, or
  the order is by start time). The link orders by run name and filters to the study's job runs,
  or to one sweep's runs and its parent run (``searchFilter``, ``orderByKey``, ``orderByAsc``: the search facets the URL carries, module
  ``57637`` in ``3793.*.chunk.js``). Expanding a parent cannot be asked for: ``runsExpanded`` is
  kept out of shared views (``hN`` in ``main.*.js``, module ``1395``).
- **The sweep's view.** A saved view (the "Views" menu; an experiment tag
  ``mlflow.sharedViewState.<id>`` holding ``{"name", "createdAt", "updatedAt", "state"}`` with
  ``state`` a JSON string, module ``53787`` in ``3448.*.chunk.js``; opened by
  ``?viewStateShareKey=<id>``, ``3878.*.chunk.js``) carries the UI state keys listed in ``main.*.js``
  module ``1395`` (``compareRunCharts``, ``compareRunSections``, ``isAccordionReordered``,
  ``runsHiddenMode``, ...) besides the search facets. :func:`open_sweep_view` saves one per sweep:
  the sweep's runs (its parent run too, for the band: :data:`SWEEP_TAG`), all charted (the default
  charts ten), and the charts laid out by :func:`chart_layout`. The UI ignores a view when the URL
  also has search facets, so :func:`study_url` gives one or the other.
- **Chart order.** Without a saved layout the UI makes one chart per metric, in sections named by the
  prefix before the last ``/``, the sections sorted by name (``getBaseChartAndSectionConfigs`` in
  ``main.*.js``, module ``63989``), so ``monitor`` comes before ``seeds``, ``train`` and ``valid``;
  metrics that appear later are re-sorted the same way unless ``isAccordionReordered`` is set
  (``updateChartAndSectionConfigs``, same module). A metric that no chart shows yet gets a chart in
  its prefix's section, added at the end when the view does not name that section.
- **The assistant panel.** No server setting: the UI opens it once on a first visit whenever the
  page's host is loopback (``isLocalServer`` from ``window.location.hostname`` in module ``5264`` of
  ``main.*.js``; ``MLFLOW_ENABLE_REMOTE_ASSISTANT`` only allows it off loopback too), and remembers
  that in localStorage (``mlflow.assistant.fab.autoOpenedOnFirstLoad``), which a link cannot set.
- **Run colours.** A run's colour is its ``mlflow.runColor`` tag (the ``colorByRunUuid`` reducer in
  ``main.*.js``, filled from the runs' tags; the UI's colour picker writes the same tag), else a hash
  of the run id into a 29-colour palette (module ``75795``, palette in module ``28797``), where
  three runs collide with odds of about 1 in 10. :func:`join_sweep_view` tags each run with a colour
  of :data:`RUN_COLORS` by its place in the sweep.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from urllib.parse import quote, urlencode

from polypythia.study import JOB_KIND, KIND_TAG

log = logging.getLogger(__name__)

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_EXPERIMENT_KIND = "custom_model_development"  # the UI's "Machine learning" kind
WORKFLOW_TYPE = "machine_learning"  # the UI's "Model training" switch position
SHARED_VIEW_TAG_PREFIX = "mlflow.sharedViewState."
RUN_NAME_ORDER = "tags.`mlflow.runName`"  # any order but start time lists child runs flat
SEEDS_PREFIX = "seeds/"
SWEEP_TAG = "polypythia.sweep"  # the sweep's parent run id, on the parent run and on each of its runs
JOBS_TAG = "jobs"  # on a sweep's parent run: its run names, in job order, joined by ", "
RUN_COLOR_TAG = "mlflow.runColor"
# Well-apart colours of the UI's own palette (module 28797 of main.*.js), in the order runs get them.
RUN_COLORS = (
    "#2272b4",  # blue
    "#de7921",  # orange
    "#308613",  # green
    "#c83243",  # red
    "#8a63bf",  # purple
    "#04867d",  # teal
    "#a6630c",  # brown
    "#b45091",  # pink
    "#4299e0",  # light blue
    "#facb66",  # yellow
    "#5f7281",  # grey
    "#93320b",  # rust
)
BAND_COLOR = "#1f272d"  # the parent run (its seeds/* band): near-black, unlike any run's
LOSS_SECTION = "loss"  # the first section of a sweep's charts
BAND_KEYS = tuple(f"{SEEDS_PREFIX}loss_{q}" for q in ("median", "p25", "p75", "min", "max"))
# The sections after the loss, in this order; a prefix not named here follows them, as the UI meets it.
SECTION_ORDER = ("train", "valid", "seeds", "eval", "monitor")
MODEL_METRICS, SYSTEM_METRICS = "Model metrics", "System metrics"  # the UI's own last two sections


def mark_training_experiment(client, experiment_id: str) -> None:
    """Tag the experiment as model training (``mlflow.experimentKind=custom_model_development``),
    the kind the UI's experiment-kind selector writes (``setExperimentTag`` with
    ``"mlflow.experimentKind"`` in ``mlflow/server/js/build/static/js/2809.*.chunk.js``; the values
    are the enum with ``CUSTOM_MODEL_DEVELOPMENT="custom_model_development"`` in ``main.*.js``).
    MLflow 3.17's UI lands by its GenAI / Model training switch instead, so the link from
    :func:`study_url` carries that; the tag serves UIs that still read it. Idempotent."""
    client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, TRAINING_EXPERIMENT_KIND)


def runs_filter(parent_run_id: str | None = None) -> str:
    """The runs search filter of a study's training runs (its job runs), or of one sweep: its job
    runs and its parent run, which carries the ``seeds/*`` band (MLflow's filter has no ``OR``, so
    both carry :data:`SWEEP_TAG`)."""
    if parent_run_id:
        return f"tags.`{SWEEP_TAG}` = '{parent_run_id}'"
    return f"tags.`{KIND_TAG}` = '{JOB_KIND}'"


def study_url(
    tracking_uri: str,
    experiment_id: str,
    parent_run_id: str | None = None,
    *,
    view_id: str | None = None,
    charts: bool = True,
) -> str:
    """The address to print: the experiment's ``runs`` tab in the UI's Model training mode, on its
    charts (``charts=False``: the table), listing the runs flat, by run name: those of the sweep
    ``parent_run_id`` if given, else every job run of the study.

    With ``view_id`` (from :func:`open_sweep_view` or :func:`save_study_view`) the link opens that
    saved view instead, which holds the filter, the order and the chart layout; the UI ignores a
    view when the URL has its own filter, so ``parent_run_id`` is then unused.

    Built from MLflow 3.17's UI (``mlflow/server/js/build/static/js``): routes
    ``/experiments/:experimentId/:tabName`` and ``workflowType`` in ``main.*.js``,
    ``compareRunsMode`` in ``2809.*.chunk.js``, the search facets in ``3793.*.chunk.js`` and
    ``viewStateShareKey`` in ``3878.*.chunk.js`` (see the module docstring)."""
    params: dict[str, str] = {"workflowType": WORKFLOW_TYPE}
    if charts:
        params["compareRunsMode"] = "CHART"
    if view_id:
        params["viewStateShareKey"] = view_id
    else:
        params.update(searchFilter=runs_filter(parent_run_id), orderByKey=RUN_NAME_ORDER, orderByAsc="true")
    base = tracking_uri.rstrip("/")
    return f"{base}/#/experiments/{quote(str(experiment_id), safe='')}/runs?{urlencode(params, quote_via=quote)}"


def _uuid(name: str) -> str:
    """A stable id for a section or a chart of the layout, or for a saved view (the UI only needs them unique)."""
    return "polypythia-" + hashlib.sha1(name.encode()).hexdigest()[:12]


def _line_chart(section: str, metric_key: str, title: str, keys: tuple[str, ...] | None = None) -> dict:
    """A line chart card as the UI's ``RunsChartsLineCardConfig`` (``class g`` of module ``63989``
    in ``main.*.js``) serializes it; ``keys``: several metrics in one chart."""
    return {
        "uuid": _uuid(f"chart:{title}"),
        "type": "LINE",
        "runsCountToCompare": 10,
        "metricSectionId": _uuid(f"section:{section}"),
        "deleted": False,
        "isGenerated": False,  # laid out here: the UI does not swap it for a generated one
        "displayName": title,
        "metricKey": metric_key,
        "selectedMetricKeys": list(keys) if keys else None,
        "lineSmoothness": 0,
        "xAxisScaleType": "linear",
        "scaleType": "linear",
        "range": {"xMin": None, "xMax": None, "yMin": None, "yMax": None},
        "xAxisKey": "step",
        "selectedXAxisMetricKey": "",
        "yAxisKey": "metric",
        "yAxisExpressions": [],
        "ignoreOutliers": False,
        "useGlobalXaxisKey": True,
        "useGlobalLineSmoothing": True,
    }


def chart_layout() -> tuple[list[dict], list[dict]]:
    """(charts, sections) of a sweep's chart view: first a ``loss`` section with ``train/loss``,
    ``valid/loss`` and the seed band (the parent run's ``seeds/loss_*`` in one chart: median,
    quartiles, min and max), then the sections of :data:`SECTION_ORDER`, then the UI's own.
    ``isAccordionReordered`` (set by :func:`study_view_state`) keeps this order: without it the UI
    sorts the sections by name, ``monitor`` first (module ``63989`` of ``main.*.js``). Every other
    metric gets its chart from the UI, in its prefix's section."""
    charts = [
        _line_chart(LOSS_SECTION, "train/loss", "train/loss"),
        _line_chart(LOSS_SECTION, "valid/loss", "valid/loss"),
        _line_chart(LOSS_SECTION, BAND_KEYS[0], "seed band (seeds/loss_*)", BAND_KEYS),
    ]
    names = (LOSS_SECTION, *SECTION_ORDER, MODEL_METRICS, SYSTEM_METRICS)
    sections = [
        {"uuid": _uuid(f"section:{n}"), "name": n, "display": True, "isReordered": False, "deleted": False}
        for n in names
    ]
    return charts, sections


def study_view_state(parent_run_id: str | None = None, group_by_tag: str | None = None) -> dict:
    """The state of a saved runs view: the study's training runs (or one sweep's, with its parent
    run), by run name, every one of them charted (``runsHiddenMode`` ``SHOW_ALL``; the default
    charts ten), the charts laid out by :func:`chart_layout`. ``group_by_tag`` (e.g. ``"model"``)
    groups the runs by that tag: the charts then draw each group's mean with its min-max band (the
    runs tab's "Group by"; ``groupBy`` as in ``3878.*.chunk.js``,
    ``{aggregateFunction, groupByKeys: [{mode: "tag", groupByData}]}``)."""
    charts, sections = chart_layout()
    state = {
        "searchFilter": runs_filter(parent_run_id),
        "orderByKey": RUN_NAME_ORDER,
        "orderByAsc": True,
        "runsHiddenMode": "SHOW_ALL",
        "compareRunCharts": charts,
        "compareRunSections": sections,
        "isAccordionReordered": True,
    }
    if group_by_tag:
        state["groupBy"] = {
            "aggregateFunction": "average",
            "groupByKeys": [{"mode": "tag", "groupByData": group_by_tag}],
        }
    return state


def save_study_view(
    client,
    experiment_id: str,
    parent_run_id: str | None = None,
    name: str | None = None,
    group_by_tag: str | None = None,
) -> str:
    """Save the study's training runs as a view of the experiment (the runs tab's "Views" menu) and
    return its id for :func:`study_url`. The same sweep always gets the same id, so saving again
    updates the view. MLflow 3.17 keeps a view in the experiment tag
    ``mlflow.sharedViewState.<id>`` as ``{"name", "createdAt", "updatedAt", "state"}``, ``state``
    the JSON of the search facets and the UI state (``mlflow/server/js/build/static/js/3448.*.chunk.js``,
    the module with ``Invalid saved-view envelope``; read back in ``3878.*.chunk.js``, the hook with
    ``Error loading shared view state``)."""
    view_id = _uuid(f"{experiment_id}:{parent_run_id or ''}")
    key = SHARED_VIEW_TAG_PREFIX + view_id
    now = int(time.time() * 1000)
    created = now
    existing = client.get_experiment(experiment_id).tags.get(key)
    if existing:
        try:
            created = int(json.loads(existing)["createdAt"])
        except (ValueError, KeyError, TypeError):
            pass
    label = name or ("Training runs" if parent_run_id is None else f"Training runs of sweep {parent_run_id[:8]}")
    envelope = {
        "name": label,
        "createdAt": created,
        "updatedAt": now,
        "state": json.dumps(study_view_state(parent_run_id, group_by_tag)),
    }
    client.set_experiment_tag(experiment_id, key, json.dumps(envelope))
    return view_id


def open_sweep_view(client, experiment_id: str, parent_run_id: str) -> str:
    """Make the sweep ``parent_run_id`` show in the UI as :func:`study_url` with the returned view id
    opens it: the experiment marked as training, the parent run in the sweep's runs (its
    :data:`SWEEP_TAG`) with the band's colour, and the sweep's saved view. Each job run joins with
    :func:`join_sweep_view`."""
    mark_training_experiment(client, experiment_id)
    client.set_tag(parent_run_id, SWEEP_TAG, parent_run_id)
    client.set_tag(parent_run_id, RUN_COLOR_TAG, BAND_COLOR)
    return save_study_view(client, experiment_id, parent_run_id)


def run_color(run_name: str, run_names: list[str]) -> str:
    """The colour of a sweep's run: the next of :data:`RUN_COLORS` by its place in the sweep (they
    repeat after twelve runs); a run name not in ``run_names``, one from a hash of the name."""
    if run_name in run_names:
        return RUN_COLORS[run_names.index(run_name) % len(RUN_COLORS)]
    return RUN_COLORS[int(hashlib.sha1(run_name.encode()).hexdigest(), 16) % len(RUN_COLORS)]


def join_sweep_view(client, run_id: str, parent_run_id: str | None, run_name: str) -> None:
    """Tag a job run for its sweep's view (:func:`open_sweep_view`): :data:`SWEEP_TAG`, and a colour
    of its own by its place among the parent run's :data:`JOBS_TAG`. A run without a sweep is left
    as it is; a resumed run is tagged for the sweep that resumes it. An MLflow error is logged, not raised."""
    if not parent_run_id:
        return
    from mlflow.entities import RunTag

    try:
        names = client.get_run(parent_run_id).data.tags.get(JOBS_TAG, "").split(", ")
        tags = {SWEEP_TAG: parent_run_id, RUN_COLOR_TAG: run_color(run_name, names)}
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    except Exception as exc:  # noqa: BLE001 - how the UI shows a run must not fail its training
        log.warning("Could not tag run %s for its sweep's MLflow view: %s", run_id, exc)


def seeds_band_metrics(values_by_run: dict[str, float]) -> dict[str, float]:
    """The ``seeds/*`` metrics a sweep's parent run carries at one step, from each child run's
    (smoothed) loss at that step: median, quartiles (numpy's linear percentiles), min and max.
    NaN and infinite values are skipped; nothing left (or no input) gives ``{}``."""
    import numpy as np

    values = np.array([float(v) for v in values_by_run.values() if v is not None and math.isfinite(float(v))])
    if values.size == 0:
        return {}
    p25, median, p75 = np.percentile(values, [25, 50, 75])
    return dict(zip(BAND_KEYS, map(float, (median, p25, p75, values.min(), values.max()))))  # BAND_KEYS' order
