"""What a search needs from the cluster layer: where its heavy work runs, and two entry points.

:func:`prepare_on_ray` opens the search's Ray session and a
:class:`~autobits.cluster.stages.RayStageRunner` that runs ``prepare``'s calibration shards and
candidate items on actors (bit-identical to the local path for the same shards).
:class:`RayOptions` says where (``--address``, ``--workers``, ``--worker-threads`` on the
command line); ``cluster_evaluate_factory(prepared, options)`` starts (or connects to) Ray, builds the
:class:`~autobits.cluster.actors.EvaluatorPool` and returns ``(evaluate_many, close)``:
``evaluate_many(list[Allocation]) -> list[Metrics]`` measures on the actors exactly what
``prepared.reward`` measures in the driver, and ``close()`` kills the actors and stops the
embedded Ray (or disconnects from the cluster).  Ray is used only when asked for:
``--address``, ``--workers N`` (N > 0), or inside a Ray job (``RAY_ADDRESS`` set);
otherwise, and always with ``--workers 0``, the factory returns ``(None, close)`` with a
no-op ``close``, and the agents evaluate in the driver.

The pool is reachable from the returned callable as ``evaluate_many.__self__`` (tests use
it to kill an actor mid-search).  Inside :func:`prepare_on_ray`'s session the pool reuses
that session (and leaves it open).
"""

from __future__ import annotations

import logging
import os
import socket
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

from autobits.errors import AutobitsError

__all__ = ["RayOptions", "cluster_evaluate_factory", "open_pool", "prepare_on_ray",
           "search_store_bytes"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RayOptions:
    """Where a search's heavy work runs: the preparation's calibration shards and candidate
    items (:func:`prepare_on_ray`) and a batched agent's evaluations
    (:func:`cluster_evaluate_factory`).

    :param address: Ray cluster (host:port of its head, or ``"auto"``); None: ``$RAY_ADDRESS``
        inside a Ray job, else an embedded local Ray when ``workers`` asks for one
    :param workers: actors per stage, and calibration shards (None: the cluster's CPUs //
        ``worker_threads`` with an address or in a Ray job, no Ray otherwise; 0: never Ray)
    :param worker_threads: torch threads (and Ray CPUs) per actor
    """

    address: str | None = None
    workers: int | None = None
    worker_threads: int = 1

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 0:
            raise AutobitsError(f"--workers must be 0 (no Ray) or more, got {self.workers}")
        if self.workers == 0 and self.address:
            raise AutobitsError(
                f"--workers 0 runs everything in this process, without Ray; it cannot use --address {self.address}"
            )
        if self.worker_threads < 1:
            raise AutobitsError(f"--worker-threads must be at least 1, got {self.worker_threads}")

    def check_reachable(self, *, timeout: float = 5.0) -> None:
        """Fail fast on an ``address`` nothing answers at (a TCP connection to its host:port),
        before a search prepares its model; ``"auto"``, an embedded Ray and a Ray job's own
        ``$RAY_ADDRESS`` are not probed."""
        if not self.address or self.address == "auto":
            return
        hostport = self.address.split("://", 1)[-1].rstrip("/")
        host, sep, port = hostport.rpartition(":")
        if not sep or not port.isdigit():
            raise AutobitsError(f"--address must be host:port (or 'auto'), got {self.address!r}")
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
        except OSError as e:
            raise AutobitsError(
                f"--address {self.address}: no Ray head answers there ({e.strerror or e})"
            ) from None

    @property
    def requested(self) -> bool:
        """Ray asked for on the command line (``address`` or ``workers`` > 0), not merely
        available (``$RAY_ADDRESS`` inside a Ray job)."""
        return bool(self.address or self.workers)

    @property
    def uses_ray(self) -> bool:
        """Ray only when asked for: an address, workers > 0, or inside a Ray job."""
        if self.workers == 0:
            return False
        return bool(self.address or self.workers or os.environ.get("RAY_ADDRESS"))


def open_pool(prepared, *, address: str | None = None, workers: int | None = None,
              threads: int = 1, num_cpus: int | None = None, on_dispatch=None):
    """``(pool, close)``: a Ray session plus an EvaluatorPool over ``prepared``'s reward."""
    from autobits.cluster.actors import EvaluatorPool, store_bytes
    from autobits.cluster.runtime import ray_session

    store = None
    if not (address or os.environ.get("RAY_ADDRESS")):
        # an embedded Ray's object store sized for the weights it must hold (plus room for
        # Ray's own small objects) instead of Ray's default share of memory
        store = int(1.1 * store_bytes(prepared.lm, EvaluatorPool.candidates_of(prepared))) + (512 << 20)
    stack = ExitStack()
    try:
        stack.enter_context(ray_session(address, num_cpus=num_cpus, object_store_memory=store))
        pool = EvaluatorPool.from_prepared(prepared, workers=workers, threads=threads,
                                           on_dispatch=on_dispatch)
        stack.callback(pool.close)
    except BaseException:
        stack.close()
        raise
    return pool, stack.close


def cluster_evaluate_factory(prepared, options: RayOptions
                             ) -> tuple[Callable | None, Callable[[], None]]:
    """``(evaluate_many, close)`` for a search.

    ``evaluate_many`` is None unless :attr:`RayOptions.uses_ray`.  Always call ``close()``
    (in a ``finally``): it stops the embedded Ray.
    """
    if not options.uses_ray:
        return None, lambda: None
    pool, close = open_pool(prepared, address=options.address, workers=options.workers,
                            threads=options.worker_threads)
    log.info("evaluating on Ray: %d evaluator actors", pool.workers)
    return pool.evaluate_many, close


def search_store_bytes(lm, formats) -> int:
    """Object store an embedded Ray needs for a search: the larger of the stages' objects
    (reference weights, the calibration's ``H``, the quantized bytes of every candidate
    coming back) and the evaluator pool's (reference weights plus every candidate's bytes),
    plus room for Ray's own small objects."""
    from autobits.cluster.actors import store_bytes
    from autobits.memory import site_sizes

    candidates = {s.name: s.valid_formats(tuple(formats)) for s in lm.quantizable}
    h = sum(4 * d * d for d in site_sizes({s.name: s.shape for s in lm.specs}))
    return int(1.1 * (store_bytes(lm, candidates) + h)) + (512 << 20)


@contextmanager
def prepare_on_ray(options: RayOptions, *, lm, formats) -> Iterator:
    """A Ray session for a whole search, and a :class:`~autobits.cluster.stages.RayStageRunner`
    for its preparation (``options.workers`` actors of ``options.worker_threads`` threads):
    ``with prepare_on_ray(...) as runner: prepare(..., runner=runner); runner.close(); ...``.

    Close the runner when the preparation is done (its actors hold a model each); the
    session lasts until the ``with`` block ends, so that the evaluator pool of
    :func:`cluster_evaluate_factory` reuses it.  An embedded Ray's object store is sized
    for both.  Without :attr:`RayOptions.uses_ray` it yields None and starts nothing.
    """
    from autobits.cluster.runtime import ray_session
    from autobits.cluster.stages import RayStageRunner

    if not options.uses_ray:
        yield None
        return
    store = None
    if not (options.address or os.environ.get("RAY_ADDRESS")):
        store = search_store_bytes(lm, formats)
    with ray_session(options.address, object_store_memory=store):
        with RayStageRunner(workers=options.workers, threads=options.worker_threads) as runner:
            log.info("preparing on Ray: %d stage actors", runner.workers)
            yield runner
