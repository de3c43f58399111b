"""The Ray runtime of one search: an embedded local Ray, or a connection to a cluster.

:func:`ray_session` is the only place autobits calls ``ray.init``:

* without an address (and outside a Ray job) it starts an embedded, single-node Ray on the
  loopback interface with no dashboard and the workers' output kept out of the terminal,
  and stops it when the block ends;
* with an address (``host:port`` of a cluster's GCS, or ``auto``) -- or inside a Ray job,
  where the job supervisor sets ``RAY_ADDRESS`` -- it connects as a driver and only
  disconnects at the end: the cluster keeps running.

Authentication is Ray's own, never turned off here: an embedded Ray is a new local
cluster, for which Ray (2.5x and later) enables token authentication by default (the token
in ``~/.ray/auth_token``, generated there when missing); a cluster given by ``--address``
keeps its own settings, and a driver needs its token (``RAY_AUTH_TOKEN``,
``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``) when it has one.

:data:`RAY_ENV` is what a single-machine run needs on top (the embedded Ray binds to the
loopback interface only; no usage statistics): :func:`apply_ray_env` sets it unless the user
already did.  :data:`JOB_ENV` is what job submission passes on to a job's processes: not the
loopback setting, since a cluster may span machines.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

from autobits.errors import AutobitsError

__all__ = ["LOOPBACK", "RAY_ENV", "JOB_ENV", "RaySession", "apply_ray_env", "ray_session",
           "cluster_cpus"]

log = logging.getLogger(__name__)

#: The only interface an embedded Ray listens on.
LOOPBACK = "127.0.0.1"

#: A job's environment on a cluster: no usage-stats prompt or upload attempt (no network).
JOB_ENV: dict[str, str] = {"RAY_USAGE_STATS_ENABLED": "0"}
#: This process's environment for a single-machine run: Ray on loopback (Ray reads this when
#: it is first imported; see :func:`_force_loopback`), plus :data:`JOB_ENV`.
RAY_ENV: dict[str, str] = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **JOB_ENV}

#: Ray namespace of autobits' actors (named actors of different searches never collide:
#: their names carry a per-pool id).
NAMESPACE = "autobits"


def apply_ray_env() -> None:
    """Set :data:`RAY_ENV` in this process's environment, keeping values the user set."""
    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)


def _force_loopback() -> None:
    """Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` when it is first imported; if that
    happened before :func:`apply_ray_env` (another module imported Ray first), its constant
    is set here so that the embedded node still resolves to the loopback address."""
    from ray._private import ray_constants

    if os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0" and ray_constants.ENABLE_RAY_CLUSTER:
        log.debug("Ray was imported before RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0; applying it now")
        ray_constants.ENABLE_RAY_CLUSTER = False


@dataclass
class RaySession:
    """What :func:`ray_session` connected to."""

    address: str
    embedded: bool
    owned: bool
    resources: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def cpus(self) -> int:
        return int(self.resources.get("CPU", 0))


def cluster_cpus() -> int:
    """CPUs of the connected cluster (all nodes, free or not)."""
    import ray

    return int(ray.cluster_resources().get("CPU", 0))


@contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None,
                object_store_memory: int | None = None, quiet: bool = True) -> Iterator[RaySession]:
    """Connect to Ray for the length of a ``with`` block.

    ``address`` ``None`` starts an embedded Ray on :data:`LOOPBACK` (``num_cpus`` defaults to
    the machine's; ``object_store_memory`` to Ray's default, 30% of memory) unless
    ``RAY_ADDRESS`` is set (a Ray job's driver), in which case that cluster is used.  When
    this process is already connected (a test, a job driver that initialised Ray itself),
    the existing connection is used and left open.  ``quiet`` keeps the workers' stdout and
    stderr out of the terminal (they stay in the session's log files).
    """
    apply_ray_env()
    import ray

    if ray.is_initialized():
        ctx = ray.get_runtime_context()
        yield RaySession(address=ctx.gcs_address, embedded=False, owned=False,
                         resources=dict(ray.cluster_resources()))
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    t0 = time.perf_counter()
    common = {"namespace": NAMESPACE, "log_to_driver": not quiet,
              "logging_level": logging.WARNING if quiet else logging.INFO,
              "configure_logging": True}
    if address:
        if num_cpus is not None or object_store_memory is not None:
            raise AutobitsError(
                f"num_cpus/object_store_memory describe an embedded Ray; a cluster at "
                f"{address!r} has its own (got num_cpus={num_cpus}, "
                f"object_store_memory={object_store_memory})"
            )
        try:
            ray.init(address=address, **common)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise AutobitsError(f"cannot connect to the Ray cluster at {address!r}: {e}") from None
        embedded = False
    else:
        _force_loopback()
        if num_cpus is not None and num_cpus < 1:
            raise AutobitsError(f"an embedded Ray needs at least 1 CPU, got num_cpus={num_cpus}")
        # Ray enables token authentication for a new local cluster and says so on stderr;
        # a quiet run keeps that notice out of the terminal (the setting itself stands)
        notice = logging.getLogger("ray._private.authentication.authentication_token_setup")
        level = notice.level
        if quiet:
            notice.setLevel(logging.ERROR)
        try:
            ray.init(num_cpus=num_cpus, object_store_memory=object_store_memory,
                     include_dashboard=False, _node_ip_address=LOOPBACK, **common)
        finally:
            notice.setLevel(level)
        embedded = True
    session = RaySession(address=ray.get_runtime_context().gcs_address, embedded=embedded,
                         owned=True, resources=dict(ray.cluster_resources()),
                         seconds=time.perf_counter() - t0)
    log.info("%s Ray at %s: %d CPUs, %.1f GB object store (%.1fs)",
             "embedded" if embedded else "connected to", session.address, session.cpus,
             session.resources.get("object_store_memory", 0) / 1e9, session.seconds)
    try:
        yield session
    finally:
        # embedded: stops the local Ray processes; connected: disconnects this driver only
        ray.shutdown()
        log.info("%s Ray at %s", "stopped" if embedded else "disconnected from", session.address)
