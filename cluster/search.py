"""What ``autobits search`` needs from the cluster layer: two options and one factory.

``add_cluster_args(parser)`` adds ``--address``, ``--workers`` and ``--worker-threads``;
``cluster_evaluate_factory(prepared, args)`` starts (or connects to) Ray, builds the
:class:`~autobits.cluster.actors.EvaluatorPool` and returns ``(evaluate_many, close)``:
``evaluate_many(list[Allocation]) -> list[Metrics]`` measures on the actors exactly what
``prepared.reward`` measures in the driver, and ``close()`` kills the actors and stops the
embedded Ray (or disconnects from the cluster).  Ray is used only when asked for:
``--address``, ``--workers N`` (N > 0), or inside a Ray job (``RAY_ADDRESS`` set);
otherwise, and always with ``--workers 0``, the factory returns ``(None, close)`` with a
no-op ``close``, and the agents evaluate in the driver.

The pool is reachable from the returned callable as ``evaluate_many.__self__`` (tests use
it to kill an actor mid-search).
"""

from __future__ import annotations

import argparse
import logging
import os
from contextlib import ExitStack
from typing import Callable

from autobits.errors import AutobitsError

__all__ = ["add_cluster_args", "cluster_evaluate_factory", "open_pool"]

log = logging.getLogger(__name__)


def add_cluster_args(parser: argparse.ArgumentParser) -> None:
    """``--address``, ``--workers`` and ``--worker-threads`` (a "Ray" argument group)."""
    g = parser.add_argument_group("Ray (distributed evaluation)")
    g.add_argument("--address", default=None,
                   help="Ray cluster to run the evaluations on (host:port of its head, or "
                   "'auto'); default: $RAY_ADDRESS inside a Ray job; with only --workers N, "
                   "an embedded local Ray (no dashboard) that stops when the search ends")
    g.add_argument("--workers", type=int, default=None,
                   help="evaluator actors (default with --address or in a Ray job: the "
                   "cluster's CPUs // --worker-threads; without: none, the search evaluates "
                   "in this process; 0: never Ray)")
    g.add_argument("--worker-threads", type=int, default=1,
                   help="torch threads (and Ray CPUs) per evaluator actor (default 1)")


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


def cluster_evaluate_factory(prepared, args: argparse.Namespace
                             ) -> tuple[Callable | None, Callable[[], None]]:
    """``(evaluate_many, close)`` for a search, from the options of :func:`add_cluster_args`.

    ``evaluate_many`` is None with ``--workers 0``, or with neither ``--address``,
    ``--workers`` nor ``RAY_ADDRESS``.  Always call ``close()`` (in a ``finally``): it
    stops the embedded Ray.
    """
    workers = getattr(args, "workers", None)
    threads = int(getattr(args, "worker_threads", 1) or 1)
    address = getattr(args, "address", None)
    if workers is not None and workers < 0:
        raise AutobitsError(f"--workers must be 0 (no Ray) or more, got {workers}")
    if workers == 0:
        if address:
            raise AutobitsError(f"--workers 0 evaluates without Ray; it cannot use --address {address}")
        return None, lambda: None
    if not (address or workers or os.environ.get("RAY_ADDRESS")):
        return None, lambda: None
    if threads < 1:
        raise AutobitsError(f"--worker-threads must be at least 1, got {threads}")
    pool, close = open_pool(prepared, address=address, workers=workers, threads=threads)
    log.info("evaluating on Ray: %d evaluator actors", pool.workers)
    return pool.evaluate_many, close
