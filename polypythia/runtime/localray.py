"""The arguments of ``ray.init``: attach to the cluster at an address, or start a Ray instance that
only this machine can reach.

A Ray instance started by ``ray.init()`` on Linux listens on the machine's network address, and
whoever reaches its ports can run code in it (https://docs.ray.io/en/latest/ray-security/index.html).
A sweep without ``launcher.address`` needs no other machine, so its instance listens on loopback:
its node address is 127.0.0.1, which Ray's GCS server, raylet and workers then bind to. Ray rewrites
a loopback ``_node_ip_address`` to the machine's address unless it runs in its single-node mode (the
default on macOS and Windows, ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``; see ``resolve_ip_for_localhost``
in ``ray/_private/services.py``), so this process is switched to that mode while it starts one, and
switched back before attaching to a cluster.

Token authentication stays as Ray sets it (a new local instance has it on unless ``RAY_AUTH_MODE``
says otherwise); only Ray's log line advising to turn it off is not shown.
"""

from __future__ import annotations

import logging
from typing import Any

LOOPBACK = "127.0.0.1"
_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
_cluster_mode: bool | None = None  # Ray's own setting in this process, before any change here


def init_args(address: str | None) -> dict[str, Any]:
    """``ray.init`` arguments for ``address`` (``host:port``, ``auto``, a ``ray://`` URL), or, with
    none, for a new Ray instance on loopback (``address="local"``: never one found running)."""
    _quiet_auth_advice()
    _single_node_mode(not address)
    if address:
        return {"address": address}
    return {"address": "local", "_node_ip_address": LOOPBACK}


def _single_node_mode(on: bool) -> None:
    global _cluster_mode
    from ray._private import ray_constants

    if _cluster_mode is None:
        _cluster_mode = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = _cluster_mode and not on


class _DropAuthOptOut(logging.Filter):
    """Drops Ray's "set RAY_AUTH_MODE=disabled to opt out" line (and nothing else it logs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "RAY_AUTH_MODE=disabled" not in record.getMessage()


def _quiet_auth_advice() -> None:
    logger = logging.getLogger(_AUTH_LOGGER)
    if not any(isinstance(f, _DropAuthOptOut) for f in logger.filters):
        logger.addFilter(_DropAuthOptOut())
