"""Starting (or joining) Ray so that everything it opens stays on 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import os

# Without this Ray binds its services to the machine's external address (DESIGN §9). Set before Ray
# starts any process, so every process it launches inherits it.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402 - after the environment above


def ensure_ray(num_cpus: float | None = None, address: str | None = None) -> None:
    """Join `address` (e.g. a KubeRay head) if given, else start a local Ray on loopback once."""
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=True,
    )
