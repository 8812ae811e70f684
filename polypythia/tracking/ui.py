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
  sections by the prefix before ``/`` (``train/loss`` is in "train").
- **Child runs.** With the default order (``attributes.start_time``) the runs table nests children
  under their parent (``mlflow.parentRunId``) and shows the parent collapsed; only rows on screen
  are charted, so the training runs drew nothing. Any other order key lists runs flat
  (``nestChildren`` in ``3878.*.chunk.js``: nest only when there is no order key and no filter, or
  the order is by start time). The link orders by run name and filters to the study's job runs
  (``searchFilter``, ``orderByKey``, ``orderByAsc``: the search facets the URL carries, module
  ``57637`` in ``3793.*.chunk.js``). Expanding a parent cannot be asked for: ``runsExpanded`` is
  kept out of shared views (``hN`` in ``main.*.js``, module ``1395``).
- **More than ten runs.** The charts show the first ten runs unless told otherwise
  (``runsHiddenMode`` ``FIRST_10_RUNS`` in ``main.*.js``, module ``1395``). A saved view (the
  "Views" menu; an experiment tag ``mlflow.sharedViewState.<id>`` holding
  ``{"name", "createdAt", "updatedAt", "state"}`` with ``state`` a JSON string, module ``53787`` in
  ``3448.*.chunk.js``; opened by ``?viewStateShareKey=<id>``, ``3878.*.chunk.js``) can carry the
  filter, the order and ``runsHiddenMode: SHOW_ALL``: :func:`save_study_view`. The UI ignores a
  view when the URL also has search facets, so :func:`study_url` gives one or the other.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from urllib.parse import quote, urlencode

from polypythia.study import JOB_KIND, KIND_TAG, PARENT_TAG

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_EXPERIMENT_KIND = "custom_model_development"  # the UI's "Machine learning" kind
WORKFLOW_TYPE = "machine_learning"  # the UI's "Model training" switch position
SHARED_VIEW_TAG_PREFIX = "mlflow.sharedViewState."
RUN_NAME_ORDER = "tags.`mlflow.runName`"  # any order but start time lists child runs flat
SEEDS_PREFIX = "seeds/"


def mark_training_experiment(client, experiment_id: str) -> None:
    """Tag the experiment as model training (``mlflow.experimentKind=custom_model_development``),
    the kind the UI's experiment-kind selector writes (``setExperimentTag`` with
    ``"mlflow.experimentKind"`` in ``mlflow/server/js/build/static/js/2809.*.chunk.js``; the values
    are the enum with ``CUSTOM_MODEL_DEVELOPMENT="custom_model_development"`` in ``main.*.js``).
    MLflow 3.17's UI lands by its GenAI / Model training switch instead, so the link from
    :func:`study_url` carries that; the tag serves UIs that still read it. Idempotent."""
    client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, TRAINING_EXPERIMENT_KIND)


def runs_filter(parent_run_id: str | None = None) -> str:
    """The runs search filter of a study's training runs: its job runs, or one sweep's."""
    query = f"tags.`{KIND_TAG}` = '{JOB_KIND}'"
    if parent_run_id:
        query += f" and tags.`{PARENT_TAG}` = '{parent_run_id}'"
    return query


def study_url(
    tracking_uri: str,
    experiment_id: str,
    parent_run_id: str | None = None,
    *,
    view_id: str | None = None,
    charts: bool = True,
) -> str:
    """The address to print: the experiment's ``runs`` tab in the UI's Model training mode, on its
    charts (``charts=False``: the table), listing the training runs flat, by run name: those of the
    sweep ``parent_run_id`` if given, else every job run of the study.

    With ``view_id`` (from :func:`save_study_view`) the link opens that saved view instead, which
    holds the filter and order and also charts more than ten runs; the UI ignores a view when the
    URL has its own filter, so ``parent_run_id`` is then unused.

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


def study_view_state(parent_run_id: str | None = None, group_by_tag: str | None = None) -> dict:
    """The state of a saved runs view: the study's training runs (or one sweep's), by run name,
    every one of them charted (``runsHiddenMode`` ``SHOW_ALL``; the default charts ten).
    ``group_by_tag`` (e.g. ``"model"``) groups the runs by that tag: the charts then draw each
    group's mean with its min-max band (the runs tab's "Group by"; ``groupBy`` as in
    ``3878.*.chunk.js``, ``{aggregateFunction, groupByKeys: [{mode: "tag", groupByData}]}``)."""
    state = {
        "searchFilter": runs_filter(parent_run_id),
        "orderByKey": RUN_NAME_ORDER,
        "orderByAsc": True,
        "runsHiddenMode": "SHOW_ALL",
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
    view_id = "polypythia-" + hashlib.sha1(f"{experiment_id}:{parent_run_id or ''}".encode()).hexdigest()[:12]
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


def seeds_band_metrics(values_by_run: dict[str, float]) -> dict[str, float]:
    """The ``seeds/*`` metrics a sweep's parent run carries at one step, from each child run's
    (smoothed) loss at that step: median, quartiles (numpy's linear percentiles), min and max.
    NaN and infinite values are skipped; nothing left (or no input) gives ``{}``."""
    import numpy as np

    values = np.array([float(v) for v in values_by_run.values() if v is not None and math.isfinite(float(v))])
    if values.size == 0:
        return {}
    p25, median, p75 = np.percentile(values, [25, 50, 75])
    return {
        f"{SEEDS_PREFIX}loss_median": float(median),
        f"{SEEDS_PREFIX}loss_p25": float(p25),
        f"{SEEDS_PREFIX}loss_p75": float(p75),
        f"{SEEDS_PREFIX}loss_min": float(values.min()),
        f"{SEEDS_PREFIX}loss_max": float(values.max()),
    }
