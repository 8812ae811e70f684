"""Screenshot a small fake study in the MLflow UI at the address a sweep prints (docs/img/mlflow_study.png).

    .venv/bin/python scripts/screenshot_mlflow_ui.py [--out docs/img/mlflow_study.png] [--models 70m 160m] [--seeds 3]

Starts a real ``mlflow server`` on loopback in a temporary folder, logs a study into it the way a
sweep does (a parent run tagged ``polypythia.kind=sweep`` carrying the ``seeds/*`` band, child runs
tagged ``polypythia.kind=job``, ``model`` and ``seed`` with a ``train/loss`` curve), marks it with
:mod:`polypythia.tracking.ui`, opens :func:`~polypythia.tracking.ui.study_url` in headless Chromium
(Debian: ``apt-get install chromium``), waits until the loss chart is drawn and saves a screenshot;
then stops the browser and the server.

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: JSON messages
ended by a NUL byte on file descriptors 3 and 4), so nothing beyond the standard library is needed.
Before the UI loads, the script sets the two localStorage entries that keep MLflow's assistant panel
from opening on a first visit (``mlflow.assistant.fab.autoOpenedOnFirstLoad`` and
``mlflow.assistant.panelOpen``, in ``mlflow/server/js/build/static/js/main.*.js``), as a browser
that has been there before would have them.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from polypythia.tracking import client as tracking
from polypythia.tracking import ui as mlflow_ui  # noqa: E402

# A fresh browser profile opens MLflow's assistant panel once; a returning one has these set.
ASSISTANT_CLOSED = {"mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true", "mlflow.assistant.panelOpen_v1": "false"}
# Drawn line traces of the runs' charts (MLflow draws them with Plotly).
CHART_TRACES_JS = "document.querySelectorAll('.js-plotly-plot .scatterlayer .trace').length"


class Chromium:
    """Headless Chromium driven over ``--remote-debugging-pipe``; one page, flat sessions."""

    def __init__(self, binary: str, width: int, height: int):
        self.profile = tempfile.mkdtemp(prefix="polypythia-chromium-")
        to_child_r, self._out = os.pipe()
        self._in, from_child_w = os.pipe()

        def onto_3_and_4():  # in the child, before exec: the pipe ends Chromium expects
            a = fcntl.fcntl(to_child_r, fcntl.F_DUPFD, 10)
            b = fcntl.fcntl(from_child_w, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [
                binary,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                "--remote-debugging-pipe",
                f"--user-data-dir={self.profile}",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            preexec_fn=onto_3_and_4,
            pass_fds=(3, 4, to_child_r, from_child_w),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self._buffer, self._id = b"", 0
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
            page=True,
        )

    def call(self, method: str, params: dict | None = None, page: bool = False) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if page:
            message["sessionId"] = self.session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = os.read(self._in, 1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium exited")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:  # events and other replies are skipped
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, page=True)[
            "result"
        ].get("value")

    def goto(self, url: str) -> None:
        self.call("Page.navigate", {"url": url}, page=True)

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", {"format": "png"}, page=True)["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        for fd in (self._out, self._in):
            try:
                os.close(fd)
            except OSError:
                pass
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)


def loss_curve(model_index: int, seed: int, steps: int) -> list[float]:
    """A made-up loss curve: larger models end lower; seeds differ in speed, noise and one bump."""
    rng = random.Random(1000 * model_index + seed)
    floor, rate, bump_at = 3.2 - 0.45 * model_index, 0.07 + 0.015 * rng.random(), rng.randrange(15, steps - 5)
    loss = []
    for step in range(steps):
        value = floor + 7.8 * math.exp(-rate * step) + 0.08 * rng.gauss(0, 1) + 0.5 * math.exp(-abs(step - bump_at))
        loss.append(value)
    return loss


def log_fake_study(uri: str, study: str, models: list[str], seeds: int, steps: int) -> tuple[str, str]:
    """A sweep's parent run with ``seeds/*`` and one child run per (model, seed); (experiment id, parent id)."""
    from mlflow.entities import Metric

    client = tracking.client(uri)
    experiment_id = tracking.experiment_id(client, study)
    mlflow_ui.mark_training_experiment(client, experiment_id)
    parent = client.create_run(experiment_id, run_name="sweep-demo", tags={"polypythia.kind": "sweep"}).info.run_id
    start = int(time.time() * 1000)
    curves: dict[str, list[float]] = {}
    for m, model in enumerate(models):
        for seed in range(1, seeds + 1):
            run = client.create_run(
                experiment_id,
                run_name=f"{model}-seed{seed}",
                tags={"polypythia.kind": "job", "model": model, "seed": str(seed), "mlflow.parentRunId": parent},
            )
            curve = curves[run.info.run_id] = loss_curve(m, seed, steps)
            client.log_batch(
                run.info.run_id, metrics=[Metric("train/loss", v, start + 1000 * s, s) for s, v in enumerate(curve)]
            )
            client.set_terminated(run.info.run_id)
    band = [
        Metric(key, value, start + 1000 * s, s)
        for s in range(steps)
        for key, value in mlflow_ui.seeds_band_metrics({r: c[s] for r, c in curves.items()}).items()
    ]
    for i in range(0, len(band), 1000):
        client.log_batch(parent, metrics=band[i : i + 1000])
    client.set_terminated(parent)
    return experiment_id, parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "mlflow_study.png")
    parser.add_argument("--models", nargs="+", default=["70m"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument(
        "--view", action="store_true", help="open a saved view (save_study_view) instead of a filtered link"
    )
    parser.add_argument("--group-by", default=None, help="with --view: group the runs by this tag (e.g. model)")
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for the chart")
    parser.add_argument(
        "--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser") or "chromium"
    )
    args = parser.parse_args(argv)

    folder = Path(tempfile.mkdtemp(prefix="polypythia-ui-"))
    browser = None
    try:
        uri = tracking.start_server(folder / "mlflow", port=0)
        experiment_id, parent = log_fake_study(uri, "demo-study", args.models, args.seeds, args.steps)
        view_id = (
            mlflow_ui.save_study_view(tracking.client(uri), experiment_id, parent, group_by_tag=args.group_by)
            if args.view
            else None
        )
        url = mlflow_ui.study_url(uri, experiment_id, parent, view_id=view_id)
        print(url)

        browser = Chromium(args.chromium, args.width, args.height)
        browser.goto(uri + "/health")  # the UI's origin, to set its localStorage before it loads
        time.sleep(1.0)
        browser.evaluate(
            "".join(f"localStorage.setItem({json.dumps(k)}, {json.dumps(v)});" for k, v in ASSISTANT_CLOSED.items())
        )
        browser.goto(url)
        deadline, drawn, steady = time.monotonic() + args.timeout, 0, 0
        while time.monotonic() < deadline and steady < 3:  # until the charts stop changing for 3 s
            time.sleep(1.0)
            now = browser.evaluate(CHART_TRACES_JS) or 0
            steady = steady + 1 if now and now == drawn else 0
            drawn = now
        browser.call("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": 2, "y": args.height - 2}, page=True)
        time.sleep(2.0)  # let the last frames paint
        args.out.parent.mkdir(parents=True, exist_ok=True)
        browser.screenshot(args.out)
        print(
            f"{args.out}: {drawn} chart trace(s) drawn for {len(args.models) * args.seeds} run(s); "
            f"page {browser.evaluate('location.href')}"
        )
        return 0 if drawn else 1
    finally:
        if browser is not None:
            browser.close()
        tracking.stop_server(folder / "mlflow")
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
