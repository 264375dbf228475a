"""Starting (or joining) Ray so that everything it opens stays on 127.0.0.1 unless told otherwise.

The environment that keeps Ray on loopback is set by `cluster/__init__.py`, which runs before this.
"""

from __future__ import annotations

import ray


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
