"""Connecting the batch to Ray: an embedded local cluster by default, or an existing one.

- `address=None`: start a private local Ray inside this process (`address="local"`, so a
  stray RAY_ADDRESS in the environment is not followed), bound to 127.0.0.1, no dashboard.
- `address="auto"` or `"ray://host:10001"` / `"host:6379"`: join that cluster.
- Already connected (e.g. a test session or a Ray job's driver): reuse the connection.

`ray_session(...)` is a context manager that shuts Ray down afterwards only when it was
started here.
"""
from __future__ import annotations

import contextlib
import logging
import os

logger = logging.getLogger("storymem.batch")

LOCAL_HOST = "127.0.0.1"


class RayConnectionError(RuntimeError):
    """Ray could not be started or reached; names the address."""


def connect_ray(address: str | None = None, *, num_cpus: float | None = None,
                num_gpus: float | None = None) -> bool:
    """Make sure this process is connected to Ray; returns True when it started Ray."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        if address:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
            logger.info("joined Ray cluster at %s", address)
        else:
            kwargs = {}
            if num_cpus is not None:
                kwargs["num_cpus"] = num_cpus
            if num_gpus is not None:
                kwargs["num_gpus"] = num_gpus
            ray.init(address="local", include_dashboard=False, log_to_driver=False,
                     configure_logging=False, _node_ip_address=LOCAL_HOST, **kwargs)
            logger.info("started an embedded local Ray on %s", LOCAL_HOST)
    except Exception as exc:  # ray raises ConnectionError, RuntimeError, ValueError...
        where = address or f"an embedded local cluster on {LOCAL_HOST}"
        raise RayConnectionError(f"cannot connect to Ray ({where}): {exc}") from exc
    return True


@contextlib.contextmanager
def ray_session(address: str | None = None, **kwargs):
    """Connected for the duration of the block; shut down after only if started here."""
    import ray

    started = connect_ray(address, **kwargs)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()
