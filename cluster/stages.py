"""The heavy stages of ``prepare`` on Ray: calibration shards and candidate items on actors.

:class:`RayStageRunner` is the Ray :class:`~autobits.stages.StageRunner`: ``workers`` stage
actors (``threads`` torch threads and Ray CPUs each), each holding the model once (the
pickled shell of :func:`~autobits.cluster.actors.model_shell` pointed at the reference
weights, which the driver puts into the object store once and every actor of a node reads
zero-copy).  For each stage the driver puts the task's context (windows, or the calibration
with its ``H``) once; every actor builds the task from it, and items go to whichever actor
is idle, results coming back in item order.  The items are the driver's (the calibration
shards, one candidate item per input site), so the results are bit-identical to the local
runner's for the same items, whatever the number of actors or nodes.

An actor lost to the system (process killed, node lost, out of memory) is replaced and its
item sent again, at most ``max_replacements`` times; an exception raised by a task (bad
input, an unsupported architecture) is raised in the driver as it was raised.

Needs a connected Ray (:func:`~autobits.cluster.runtime.ray_session`); the runner does not
own the session.  Use it as a context manager, or call :meth:`RayStageRunner.close`.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from typing import Any, Callable, Iterator, Sequence

import ray

from autobits.cluster.actors import (
    _lost, actor_count, build_loaded_model, model_shell, reference_arrays,
)
from autobits.errors import AutobitsError

__all__ = ["RayStageRunner", "StageActor"]

log = logging.getLogger(__name__)


class _StageActorImpl:
    """One stage worker: the model, and the task of the current stage."""

    def __init__(self, *, shell: bytes, reference, specs, name: str, architecture: str,
                 threads: int):
        import torch

        t0 = time.perf_counter()
        torch.set_num_threads(max(1, int(threads)))
        self.lm = build_loaded_model(shell=shell, reference=reference, specs=specs, name=name,
                                     architecture=architecture)
        self.task = None
        self.init_seconds = time.perf_counter() - t0

    def info(self) -> dict:
        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                "init_seconds": self.init_seconds}

    def start(self, task_cls, context) -> None:
        """Set up ``task_cls(lm, context)`` for the items to come (closing the last one)."""
        self.stop()
        self.task = task_cls(self.lm, context)

    def run(self, item):
        return self.task(item)

    def stop(self) -> None:
        if self.task is not None:
            self.task.close()
            self.task = None


#: The Ray actor class (``StageActor.options(...).remote(...)``).
StageActor = ray.remote(_StageActorImpl)


class RayStageRunner:
    """Stage items on Ray actors.

    :param workers: stage actors (None: the cluster's CPUs // ``threads``)
    :param threads: torch threads (and Ray CPUs) per actor
    :param max_replacements: lost actors replaced before giving up (default ``2 * workers + 2``)
    :param on_dispatch: ``on_dispatch(runner, slot, index)`` after each item is sent (tests
        kill an actor with it)
    """

    shares_memory = False

    def __init__(self, *, workers: int | None = None, threads: int = 1,
                 max_replacements: int | None = None,
                 on_dispatch: Callable[["RayStageRunner", int, int], None] | None = None):
        if not ray.is_initialized():
            raise AutobitsError("RayStageRunner needs a connected Ray (use ray_session())")
        self.workers, self.threads = actor_count(workers, threads), int(threads)
        self.max_replacements = (2 * self.workers + 2 if max_replacements is None
                                 else int(max_replacements))
        self.replacements = 0
        self.on_dispatch = on_dispatch
        self.run_id = uuid.uuid4().hex[:8]
        self._model: tuple[int, dict] | None = None  # (id(lm), object refs + init kwargs)
        self._actors: list[Any] = []
        self._spawned = 0
        self.info: list[dict] = []

    # ------------------------------------------------------------ actors
    def warm_up(self, lm) -> None:
        """Start the actors holding ``lm`` now (else the first :meth:`map` does; the model is
        put into the object store once per model)."""
        if self._model is not None and self._model[0] == id(lm):
            return
        self._kill_actors()
        t0 = time.perf_counter()
        lm.restore()
        reference = reference_arrays(lm)
        refs = {"shell": ray.put(model_shell(lm.model)), "reference": ray.put(reference),
                "specs": tuple(lm.specs), "name": lm.name, "architecture": lm.architecture,
                "threads": self.threads}
        put = sum(a.nbytes for a in reference.values())
        del reference
        self._model = (id(lm), refs)
        self._actors = [self._spawn(slot) for slot in range(self.workers)]
        self.info = ray.get([a.info.remote() for a in self._actors])
        log.info("%d stage actors x %d threads on %d node(s) ready in %.1fs (%.2f GB of "
                 "reference weights put once)", self.workers, self.threads,
                 len({i["node"] for i in self.info}), time.perf_counter() - t0, put / 1e9)

    def _spawn(self, slot: int):
        self._spawned += 1
        kw = self._model[1]
        return StageActor.options(
            name=f"autobits-stage-{self.run_id}-{slot}-{self._spawned}", num_cpus=self.threads,
            max_restarts=0, max_task_retries=0,
        ).remote(**kw)

    def _kill_actors(self) -> None:
        for a in self._actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # already gone
                pass
        self._actors = []
        self._model = None

    def _replace(self, slot: int, error: Exception, task_cls, context_ref) -> None:
        self.replacements += 1
        if self.replacements > self.max_replacements:
            raise AutobitsError(f"{self.replacements} stage actors died (at most "
                                f"{self.max_replacements} are replaced); last error: {error}")
        try:
            ray.kill(self._actors[slot], no_restart=True)
        except Exception:
            pass
        self._actors[slot] = self._spawn(slot)
        ray.get(self._actors[slot].start.remote(task_cls, context_ref))
        log.warning("stage actor in slot %d lost (%s); replaced (%d so far)", slot,
                    type(error).__name__, self.replacements)

    # ------------------------------------------------------------- the map
    def map(self, task_cls, items: Sequence[Any], *, lm, context: Any, name: str,
            on_result: Callable[[Any], None] | None = None) -> Iterator[Any]:
        """``task_cls(lm, context)(item)`` for every item on the actors, in item order."""
        items = list(items)
        self.warm_up(lm)
        t0 = time.perf_counter()
        context_ref = ray.put(context)
        ray.get([a.start.remote(task_cls, context_ref) for a in self._actors])
        idle = list(range(len(self._actors)))[::-1]
        pending: dict[Any, tuple[int, int]] = {}  # ref -> (item index, slot)
        done: dict[int, Any] = {}
        sent = emitted = 0
        try:
            while emitted < len(items):
                while idle and sent < len(items):
                    slot = idle.pop()
                    pending[self._actors[slot].run.remote(items[sent])] = (sent, slot)
                    if self.on_dispatch is not None:
                        self.on_dispatch(self, slot, sent)
                    sent += 1
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    i, slot = pending.pop(ref)
                    try:
                        done[i] = ray.get(ref)
                    except Exception as e:
                        if not _lost(e):
                            raise
                        self._replace(slot, e, task_cls, context_ref)
                        pending[self._actors[slot].run.remote(items[i])] = (i, slot)
                        continue
                    idle.append(slot)
                    if on_result is not None:
                        on_result(done[i])
                while emitted in done:
                    yield done.pop(emitted)
                    emitted += 1
        finally:
            if pending:  # stopped early (an error): the actors are busy with stale items
                self._kill_actors()
            else:
                try:
                    ray.get([a.stop.remote() for a in self._actors], timeout=60)
                except Exception as e:  # a dead actor: replaced at the next stage or closed
                    log.debug("stopping the %s tasks: %s", name, e)
            del context_ref
        log.info("%s: %d items on %d Ray actors in %.1fs", name, len(items), len(self._actors),
                 time.perf_counter() - t0)

    def close(self) -> None:
        """Kill the actors and release the model's objects (idempotent)."""
        self._kill_actors()

    def __enter__(self) -> "RayStageRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
