"""A local sweep's Ray instance is reachable from this machine only (polypythia/runtime/localray.py)."""

import json
import os
import secrets
import subprocess
import sys

import pytest
from helpers import REPO

from polypythia.runtime.env import ALLOCATOR_ENV, sets_allocator

pytestmark = pytest.mark.integration

# Run in a fresh interpreter: Ray's authentication mode and node settings are per process.
SCRIPT = r"""
import json, sys
import psutil, ray
from ray._raylet import AuthenticationMode, get_authentication_mode
sys.path.insert(0, "tests")
from helpers import tiny_job
from polypythia.config.jobconfig import to_dict
from polypythia.jobspec import JobRequest
from polypythia.driver.sweep import Sweep

from pathlib import Path
out = Path(sys.argv[1])
sweep = Sweep([JobRequest(config=to_dict(tiny_job(out, out)))], launch_dir=str(out))
sweep._init_ray()
try:
    node = ray._private.worker.global_worker.node
    listening = {name: sorted({c.laddr.ip for info in node.all_processes[name]
                               for c in psutil.Process(info.process.pid).net_connections(kind="inet")
                               if c.status == psutil.CONN_LISTEN})
                 for name in ("gcs_server", "raylet")}
    where = ray.remote(num_cpus=0)(lambda: ray.util.get_node_ip_address())
    import os
    allocator = ray.remote(num_cpus=0)(lambda: {k: os.environ.get(k) for k in ("MALLOC_TOP_PAD_", "MALLOC_TRIM_THRESHOLD_")})
    print(json.dumps({"nodes": [n["NodeManagerAddress"] for n in ray.nodes()],
                      "gcs": ray.get_runtime_context().gcs_address, "listening": listening,
                      "worker": ray.get(where.remote()), "allocator": ray.get(allocator.remote()),
                      "auth_token": get_authentication_mode() == AuthenticationMode.TOKEN}))
finally:
    sweep.shutdown()
"""


def test_a_local_sweep_starts_ray_on_loopback_with_its_authentication_kept(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS") and not sets_allocator(k)}
    env["RAY_AUTH_TOKEN"] = secrets.token_hex(16)  # Ray's default (token) mode, without a token file
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["nodes"] == ["127.0.0.1"] and seen["worker"] == "127.0.0.1"
    assert seen["gcs"].rsplit(":", 1)[0] == "127.0.0.1"
    for name, addresses in seen["listening"].items():  # a dual-stack socket shows as ::ffff:127.0.0.1
        assert addresses and all(a in ("127.0.0.1", "::ffff:127.0.0.1") for a in addresses), (name, addresses)
    assert seen["auth_token"]
    assert seen["allocator"] == ALLOCATOR_ENV  # every worker keeps freed memory (polypythia/runtime/env.py)
    assert "RAY_AUTH_MODE=disabled" not in out.stdout + out.stderr  # Ray's advice to turn it off


EVALUATION_SCRIPT = r"""
import json, os, ray
from polypythia.runtime import raysetup
assert raysetup.init_ray(None, offline=True, option="--ray-address")
try:
    seen = ray.get(ray.remote(num_cpus=0)(lambda: {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "MALLOC_TOP_PAD_")}).remote())
    print(json.dumps({"worker": seen, "driver": os.environ.get("HF_HUB_OFFLINE")}))
finally:
    ray.shutdown()
"""


def test_an_offline_evaluations_local_workers_inherit_its_environment():
    """polypythia.evaluate's local Ray runtime (raysetup.init_ray, offline): the workers read local files
    only and keep the allocator settings; the driver's own environment is put back."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "HF_HUB_OFFLINE") and not sets_allocator(k)}
    out = subprocess.run(
        [sys.executable, "-c", EVALUATION_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen == {
        "worker": {"HF_HUB_OFFLINE": "1", "MALLOC_TOP_PAD_": ALLOCATOR_ENV["MALLOC_TOP_PAD_"]},
        "driver": None,
    }
