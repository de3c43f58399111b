"""Where the heavy stages of :func:`~autobits.pipeline.prepare` run their items.

Calibration (shards of windows) and the candidate table (input sites: the tensors that read
one input) are maps of one :class:`StageTask` over independent items.  A *runner* executes
that map:

* :class:`LocalRunner` -- this process, one thread per worker, torch's own thread count 1
  meanwhile (:func:`~autobits.threads.thread_map`); the task sees the driver's objects;
* ``autobits.cluster.stages.RayStageRunner`` -- Ray actors, each holding its own copy of
  the model (the shell and the shared weights of the object store) and of the task's
  context, torch's thread count 1 in each.

A task's result depends only on its item and context, never on which worker ran it or how
many there were (the items and their order are fixed by the driver: calibration shards by
:func:`autobits.calibrate.calibrate`'s ``workers``, candidates by tensor), so both runners
give bit-identical results for the same items.  Results come back in item order.

A task is a module-level class (Ray pickles it by reference) constructed once per worker as
``Task(lm, context)``: its constructor is the per-worker setup (registering hooks, building
caches), ``task(item)`` does one item, ``task.close()`` undoes the setup.  ``context`` must
be picklable for a remote runner; :attr:`StageRunner.shares_memory` tells the stage whether
it may put driver-only objects (a lock, a cache) in it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, Iterator, Protocol, Sequence

from autobits.threads import thread_map

__all__ = ["LocalRunner", "StageRunner", "StageTask"]


class StageTask(ABC):
    """One worker's share of a stage: set up in ``__init__``, one item per call."""

    def __init__(self, lm, context: Any) -> None:
        self.lm = lm
        self.context = context

    @abstractmethod
    def __call__(self, item: Any) -> Any:
        """The result of one item (picklable for a remote runner)."""

    def close(self) -> None:
        """Undo what ``__init__`` set up (hooks, caches); called once, after the last item."""


class StageRunner(Protocol):
    """Runs ``task_cls`` over ``items``; results in item order."""

    #: workers the items are spread over
    workers: int
    #: True when the tasks run in this process and see the driver's objects
    shares_memory: bool

    def map(self, task_cls: type[StageTask], items: Sequence[Any], *, lm, context: Any,
            name: str, on_result: Callable[[Any], None] | None = None) -> Iterator[Any]:
        """``task_cls(lm, context)(item)`` for every item, in item order (``on_result`` is
        called as each result arrives, e.g. for a progress bar)."""
        ...


class LocalRunner:
    """Threads of this process: one task object shared by ``workers`` threads (a task must
    therefore keep per-thread state itself, as calibration's thread-local accumulators do).

    :param workers: threads (1: the calling thread, torch's thread count untouched)
    """

    shares_memory = True

    def __init__(self, workers: int = 1) -> None:
        if int(workers) < 1:
            raise ValueError(f"a local runner needs at least one worker, got workers={workers}")
        self.workers = int(workers)

    def map(self, task_cls, items, *, lm, context, name, on_result=None):
        task = task_cls(lm, context)
        try:
            for r in thread_map(task, list(items), self.workers, name):
                if on_result is not None:
                    on_result(r)
                yield r
        finally:
            task.close()
