"""Screenshot the MLflow UI at the link a real sweep prints (docs/img/mlflow_study.png).

    flock /tmp/polypythia-heavy.lock .venv/bin/python scripts/screenshot_mlflow_ui.py

Runs ``make demo``'s sweep (``launch.py -m seed=1,2,3 model=70m``, its default budget and monitor;
with ``--steps N``, a shorter one: N steps, the in-step monitor every 5 steps and the seed band every
2, so that ``train/*``, ``valid/*``, ``seeds/*`` and ``monitor/*`` all have points to chart) in a
fresh ``POLYPYTHIA_HOME`` (a temporary folder, or ``--home``), takes the link the sweep printed, opens it in headless Chromium
(Debian: ``apt-get install chromium``), waits until the charts are drawn and saves a screenshot;
then stops the browser and the sweep's MLflow server. ``--link URL`` screenshots a link of a sweep
already run (its server up) instead. About 8 minutes on 2 CPU cores (the demo, 2026-12-07; with ``--steps 40`` at 14m, the runs take 83 s). Exit
status 1 if no chart was drawn or the ``loss`` section of charts is not above ``monitor``.

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: JSON messages
ended by a NUL byte on file descriptors 3 and 4), so nothing beyond the standard library is needed.
MLflow 3.17 has no server setting for its assistant panel: the UI opens it once on a first visit
whenever the page's host is ``localhost``/``127.0.0.1``/``::1`` (``isLocalServer`` in
``mlflow/server/js/build/static/js/main.*.js``, module ``5264``; ``MLFLOW_ENABLE_REMOTE_ASSISTANT``
only allows more). So, before the UI loads, the script sets the two localStorage entries that a
browser that has been there before has (``mlflow.assistant.fab.autoOpenedOnFirstLoad`` and
``mlflow.assistant.panelOpen``, version 1).
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from polypythia.tracking import client as tracking  # noqa: E402 (after the path and the environment)

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


# The top of the first element showing exactly each text (a chart section's title), -1 if none.
SECTION_TOPS_JS = """(names => Object.fromEntries(names.map(n => {
  const hit = [...document.querySelectorAll('body *')].find(e => e.children.length === 0 && e.textContent.trim() === n);
  return [n, hit ? hit.getBoundingClientRect().top : -1];
})))(%s)"""
LINK_PREFIX = " in MLflow: "  # the line polypythia.driver.sweep prints: "Study <name> in MLflow: <link>"


def run_sweep(home: Path, model: str, steps: int | None, seeds: str, more: list[str]) -> str:
    """Run a real sweep into ``home`` (``make demo``'s, or ``steps`` long) and return the link it printed."""
    shorter = []
    if steps:
        shorter = [
            f"budget.steps={steps}",
            f"budget.checkpoint_every_steps={max(1, steps // 2)}",  # valid/loss at two checkpoints
            "monitor.every_steps=5",  # monitor/* points to chart
            "monitor.cross_seed_every_steps=2",  # the seeds/* band at every other step (default: the checkpoints)
        ]
    overrides = ["-m", f"seed={seeds}", f"model={model}", *shorter, "launcher.progress=false", *more]
    env = {**os.environ, "POLYPYTHIA_HOME": str(home)}
    print("running:", " ".join(["launch.py", *overrides]), flush=True)
    done = subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), *overrides], cwd=ROOT, env=env, capture_output=True, text=True
    )
    output = done.stdout + done.stderr
    links = [line.split(LINK_PREFIX, 1)[1].strip() for line in output.splitlines() if LINK_PREFIX in line]
    if done.returncode != 0 or not links:
        sys.stderr.write(output[-5000:])
        raise SystemExit(
            f"the sweep failed (exit status {done.returncode}) or printed no MLflow link; its output is above"
        )
    return links[-1]


def start_server_of(home: Path) -> str:
    """The sweep's MLflow server (the sweep leaves it up; started again if it is not)."""
    return tracking.start_server(home / "mlflow")


def wait_for_charts(browser: Chromium, timeout: float) -> int:
    """Chart traces drawn, once they stop changing for 3 s (or at ``timeout``)."""
    deadline, drawn, steady = time.monotonic() + timeout, 0, 0
    while time.monotonic() < deadline and steady < 3:
        time.sleep(1.0)
        now = browser.evaluate(CHART_TRACES_JS) or 0
        steady = steady + 1 if now and now == drawn else 0
        drawn = now
    return drawn


def screenshot(url: str, origin: str, out: Path, args: argparse.Namespace) -> tuple[int, dict]:
    """Open ``url`` in headless Chromium as a returning visitor; (traces drawn, section tops) after the screenshot."""
    browser = Chromium(args.chromium, args.width, args.height)
    try:
        browser.goto(origin + "/health")  # the UI's origin, to set its localStorage before it loads
        time.sleep(1.0)
        browser.evaluate(
            "".join(f"localStorage.setItem({json.dumps(k)}, {json.dumps(v)});" for k, v in ASSISTANT_CLOSED.items())
        )
        browser.goto(url)
        drawn = wait_for_charts(browser, args.timeout)
        browser.call("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": 2, "y": args.height - 2}, page=True)
        time.sleep(2.0)  # let the last frames paint
        out.parent.mkdir(parents=True, exist_ok=True)
        browser.screenshot(out)
        tops = browser.evaluate(SECTION_TOPS_JS % json.dumps(["loss", "train", "valid", "seeds", "monitor"]))
        return drawn, tops or {}
    finally:
        browser.close()


def loss_first(tops: dict) -> bool:
    """The ``loss`` section is drawn, above ``monitor`` (when that is drawn at all)."""
    loss, monitor = tops.get("loss", -1), tops.get("monitor", -1)
    return loss >= 0 and (monitor < 0 or loss < monitor)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "mlflow_study.png")
    parser.add_argument(
        "--home", type=Path, default=None, help="the sweep's POLYPYTHIA_HOME (default: a temporary one)"
    )
    parser.add_argument("--model", default="70m")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument(
        "--steps", type=int, default=None, help="a shorter sweep of this many steps (default: the demo's)"
    )
    parser.add_argument("overrides", nargs="*", help="more launch.py overrides, e.g. budget=smoke")
    parser.add_argument("--link", default=None, help="screenshot this link (a sweep's, its server up) instead")
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for the charts")
    parser.add_argument(
        "--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser") or "chromium"
    )
    args = parser.parse_args(argv)

    if args.link:
        url = args.link
        return report(url, *screenshot(url, url.split("/#/")[0], args.out, args), args.out)
    home = args.home or Path(tempfile.mkdtemp(prefix="polypythia-ui-"))
    try:
        url = run_sweep(home, args.model, args.steps, args.seeds, args.overrides)
        origin = start_server_of(home)
        url = origin + "/#/" + url.split("/#/", 1)[1]  # the server's address now (the same unless it restarted)
        return report(url, *screenshot(url, origin, args.out, args), args.out)
    finally:
        tracking.stop_server(home / "mlflow")
        if args.home is None:
            shutil.rmtree(home, ignore_errors=True)


def report(url: str, drawn: int, tops: dict, out: Path) -> int:
    print(url)
    print(f"{out}: {drawn} chart trace(s) drawn; section tops {tops}")
    return 0 if drawn and loss_first(tops) else 1


if __name__ == "__main__":
    sys.exit(main())
