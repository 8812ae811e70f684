"""The glibc allocator settings every Ray worker gets (polypythia/runtime/env.py, ALLOCATOR_ENV).

That a sweep's workers receive them is checked with a real Ray runtime in test_local_ray.py.
"""

import json
import os
import platform
import subprocess
import sys

import pytest

from polypythia.runtime import env as runtime_env

# A step-like pattern: a 64 MiB tensor and a small one allocated, the large one freed, 24 times; then
# the page faults of 4 more rounds. With glibc's defaults every round maps fresh pages (~16k faults
# of 4 KiB each); with ALLOCATOR_ENV the heap grows for the first few rounds and is then reused.
FAULTS = r"""
import json, resource, torch
for _ in range(24):
    x = torch.ones(16 << 20); y = torch.ones(1000); del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    x = torch.ones(16 << 20); y = torch.ones(1000); del x
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before))
"""


def _clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if not runtime_env.sets_allocator(k)}


def _without_allocator_settings(monkeypatch) -> None:
    for key in [k for k in os.environ if runtime_env.sets_allocator(k)]:
        monkeypatch.delenv(key)


def test_workers_get_the_allocator_settings_unless_the_caller_sets_their_own(monkeypatch):
    _without_allocator_settings(monkeypatch)
    assert runtime_env.ray_env_vars() == {**runtime_env.WORKER_ENV, **runtime_env.ALLOCATOR_ENV}
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert runtime_env.allocator_env() == {}
    assert "MALLOC_TOP_PAD_" not in runtime_env.ray_env_vars(offline=True)
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0")
    assert runtime_env.allocator_env() == {}


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc's")
def test_the_settings_stop_a_freed_tensor_from_being_mapped_again():
    def faults(extra: dict) -> int:
        out = subprocess.run(
            [sys.executable, "-c", FAULTS], env={**_clean_env(), **extra}, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    default, kept = faults({}), faults(runtime_env.ALLOCATOR_ENV)
    if default < 4 * 8000:  # 4 x 64 MiB of fresh 4 KiB pages; fewer where the kernel hands out huge pages
        pytest.skip(
            f"{default} page faults for 256 MiB: this kernel maps huge pages, the count cannot show the difference"
        )
    assert kept < default / 10, (kept, default)


def test_a_local_runtime_gets_the_settings_by_inheritance_and_the_driver_gets_its_environment_back(monkeypatch):
    from polypythia.runtime import raysetup

    _without_allocator_settings(monkeypatch)
    monkeypatch.setenv("PYTHONUNBUFFERED", "0")  # a value of the caller's, overridden while Ray starts
    before = dict(os.environ)
    with raysetup.local_worker_env(None):
        assert {k: os.environ.get(k) for k in runtime_env.ray_env_vars()} == runtime_env.ray_env_vars()
        assert os.environ["MALLOC_TOP_PAD_"] == runtime_env.ALLOCATOR_ENV["MALLOC_TOP_PAD_"]
    assert dict(os.environ) == before
    with raysetup.local_worker_env("10.0.0.1:6379"):  # a cluster's workers get them as the runtime_env
        assert dict(os.environ) == before
