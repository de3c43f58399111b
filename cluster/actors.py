"""Evaluator actors and the pool that sends allocations to them.

An :class:`EvaluatorActor` is one forward-pass worker: it holds the model, the reference
log-probabilities of the reward windows, and the cache of dequantized candidate weights,
and answers ``evaluate(allocation) -> Metrics`` exactly as ``Prepared.reward`` does in the
driver (same windows, same scoring, same :class:`~autobits.evaluate.Evaluator`).

What goes where:

* the driver puts three objects into Ray's object store, once: the model *shell* (the
  pickled torch module with every parameter emptied: config, buffers, structure), the
  float32 reference weights, and the *quantized bytes* of every candidate (tensor x
  format: ``bpw / 32`` of a float32 copy each), both as dicts of numpy arrays;
* Ray copies an object to a node the first time an actor there asks for it; every actor
  on that node then reads the same shared-memory copy: the arrays arrive as read-only
  zero-copy views; the model points at the reference ones (``LoadedModel.set_weight``
  swaps pointers; nothing ever writes to a weight), and each actor's
  :class:`~autobits.evaluate.WeightCache` dequantizes the candidates it is asked for into
  its own bounded least-recently-used cache (``cache_bytes`` per actor), bit for bit the
  driver's weights;
* a candidate that is not in the shared bytes (a format the table does not offer) is
  quantized by the actor itself, as the driver's WeightCache would.

:class:`EvaluatorPool` keeps ``workers`` actors busy: :meth:`EvaluatorPool.evaluate_many`
dispatches a batch to the idle actors and returns the metrics in input order.  An actor
that dies mid-evaluation (killed process, lost node: ``RayActorError``) is replaced by a
new one and its evaluation retried, so a batch always comes back complete.  The pool is
thread-safe: several threads may call it at once (e.g. one per environment).
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import ray

from autobits.errors import AutobitsError
from autobits.evaluate import WeightCache
from autobits.formats import get_format

__all__ = ["EvaluatorPool", "EvaluatorActor", "PoolStats", "actor_count", "model_shell",
           "reference_arrays", "shared_arrays", "store_bytes"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------- driver side
def model_shell(model) -> bytes:
    """The pickled torch module with every parameter emptied (structure, config, buffers).

    Parameters shared between modules (tied embeddings) stay shared in the copy.  The
    driver's model is untouched afterwards.
    """
    import torch

    params = {id(p): p for p in model.parameters(recurse=True)}
    for _, p in model.named_parameters(remove_duplicate=False):
        params[id(p)] = p
    saved = {k: p.data for k, p in params.items()}
    try:
        for p in params.values():
            p.data = torch.empty(0, dtype=p.dtype)
        return pickle.dumps(model, protocol=5)
    finally:
        for k, p in params.items():
            p.data = saved[k]


def reference_arrays(lm) -> dict[str, np.ndarray]:
    """numpy views of the reference weights (GGUF name -> array), what actors point their
    model shell at."""
    return {s.name: lm.reference_weight(s.name).detach().cpu().numpy()
            for s in lm.specs if s.hf_name}


def shared_arrays(lm, cache, candidates: Mapping[str, Sequence[str]]):
    """``(reference, candidates)``: :func:`reference_arrays` and the quantized bytes of every
    (tensor, format) in ``candidates`` (quantizing the ones ``cache`` does not hold yet)."""
    ref = reference_arrays(lm)
    cand = {}
    for name, fmts in candidates.items():
        for fmt in fmts:
            if cache.keeps(fmt):  # a float format is a cast of the reference: the actor's job
                cand[(name, get_format(fmt).name)] = cache.quantize(name, fmt)
    return ref, cand


def store_bytes(lm, candidates: Mapping[str, Sequence[str]]) -> int:
    """Bytes the pool puts in the object store: float32 reference weights plus the exact
    quantized bytes of every tensor per candidate format (float formats excepted, see
    :meth:`~autobits.evaluate.WeightCache.keeps`)."""
    from autobits.evaluate import WeightCache

    ref = sum(s.numel for s in lm.specs if s.hf_name)
    cand = sum(lm.spec(n).nbytes(f) for n, fmts in candidates.items() for f in fmts
               if WeightCache.keeps(f))
    return 4 * ref + cand


def actor_count(workers: int | None, threads: int) -> int:
    """Actors of ``threads`` CPUs each the connected cluster can run at once: ``workers``
    checked against its CPUs, or (None) as many as fit."""
    if threads < 1:
        raise AutobitsError(f"threads per worker must be at least 1, got threads={threads}")
    cpus = int(ray.cluster_resources().get("CPU", 0))
    workers = max(1, cpus // threads) if workers is None else int(workers)
    if workers < 1:
        raise AutobitsError(f"workers must be at least 1, got workers={workers}")
    if workers * threads > cpus:
        raise AutobitsError(f"{workers} workers x {threads} threads need {workers * threads} "
                            f"CPUs, the Ray cluster has {cpus}")
    return workers


# ---------------------------------------------------------------------- actor side
def _as_tensor(arr: np.ndarray):
    """torch view of a (read-only, shared) numpy array; torch warns it is not writable:
    nothing writes to it, the model only swaps pointers."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)


def build_loaded_model(*, shell: bytes, reference: Mapping[str, np.ndarray], specs, name: str,
                       architecture: str):
    """A LoadedModel from a :func:`model_shell` whose parameters point at ``reference``."""
    from pathlib import Path

    from autobits.model import LoadedModel

    model = pickle.loads(shell)
    params = dict(model.named_parameters(remove_duplicate=False))
    for s in specs:
        if s.hf_name:
            params[s.hf_name].data = _as_tensor(reference[s.name])
    empty = sorted(n for n, p in params.items() if p.numel() == 0)
    if empty:
        raise AutobitsError(f"{len(empty)} parameter(s) have no reference weight: {empty[:5]}")
    model.eval()
    return LoadedModel(name=name, path=Path(name), architecture=architecture, model=model,
                       tokenizer=None, specs=tuple(specs))


class _EvaluatorActorImpl:
    """Holds a model, its reference log-probs on the reward windows, and the weight cache.

    Construction arguments arrive resolved by Ray: ``reference`` and ``cache`` (quantized
    bytes per (tensor, format)) are dicts of read-only numpy views into this node's object
    store; ``cache_bytes`` bounds this actor's dequantized weights (None: the default).
    """

    def __init__(self, *, shell: bytes, reference: Mapping[str, np.ndarray],
                 cache: Mapping[tuple[str, str], np.ndarray], specs, name: str,
                 architecture: str, windows: np.ndarray, score_from: int | None,
                 importance: Mapping[str, np.ndarray] | None, threads: int,
                 cache_bytes: int | None = None):
        import torch

        from autobits.evaluate import Evaluator

        t0 = time.perf_counter()
        torch.set_num_threads(max(1, int(threads)))
        self.lm = build_loaded_model(shell=shell, reference=reference, specs=specs, name=name,
                                     architecture=architecture)
        t1 = time.perf_counter()
        shared = WeightCache(self.lm, importance, packed=cache, budget_bytes=cache_bytes)
        t2 = time.perf_counter()
        self.evaluator = Evaluator(self.lm, windows, score_from=score_from, cache=shared)
        t3 = time.perf_counter()
        self.evaluations = 0
        self.eval_cpu_seconds = 0.0  # CPU time of this process spent in evaluations
        self.init_seconds = t3 - t0
        #: where the start-up went: model shell + shared reference weights, indexing the
        #: shared candidate bytes, the reference forward pass
        self.phases = {"model": t1 - t0, "cache": t2 - t1, "reference": t3 - t2}

    def info(self) -> dict:
        """pid, node and start-up time of this actor (the pool logs it; tests kill by pid)."""
        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                "init_seconds": self.init_seconds, "phases": dict(self.phases),
                "ref_ppl": self.evaluator.ref_ppl, "evaluations": self.evaluations,
                "eval_cpu_seconds": self.eval_cpu_seconds}

    def ping(self) -> None:
        """A no-op call: its round trip is Ray's per-call overhead."""

    def evaluate(self, allocation):
        c0 = time.process_time()
        try:
            return self.evaluator.evaluate(allocation)
        finally:
            self.evaluations += 1
            self.eval_cpu_seconds += time.process_time() - c0


#: The Ray actor class (``EvaluatorActor.options(...).remote(...)``).
EvaluatorActor = ray.remote(_EvaluatorActorImpl)


# ------------------------------------------------------------------------ the pool
def _lost(error: BaseException) -> bool:
    """An actor lost to the system (process killed, node lost, out of memory), as opposed to
    an exception raised by our own code (its constructor or an evaluation)."""
    if isinstance(error, ray.exceptions.RayActorError):
        return not error.actor_init_failed
    return isinstance(error, (ray.exceptions.OutOfMemoryError, ray.exceptions.WorkerCrashedError,
                              ray.exceptions.NodeDiedError))


@dataclass
class PoolStats:
    """Counters and timings of a pool (per completed evaluation: wall = dispatch to result,
    actor = the actor's own evaluation time; the difference is Ray's overhead)."""

    evaluations: int = 0
    retries: int = 0
    replacements: int = 0
    put_seconds: float = 0.0
    put_bytes: int = 0
    start_seconds: float = 0.0
    wall: list[float] = field(default_factory=list)
    actor: list[float] = field(default_factory=list)

    def to_json(self) -> dict:
        n = max(len(self.wall), 1)
        return {"evaluations": self.evaluations, "retries": self.retries,
                "replacements": self.replacements, "put_seconds": self.put_seconds,
                "put_bytes": self.put_bytes, "start_seconds": self.start_seconds,
                "mean_wall": sum(self.wall) / n, "mean_actor": sum(self.actor) / n}


class EvaluatorPool:
    """``workers`` evaluator actors over one model and one set of reward windows.

    Use :meth:`from_prepared` in searches.  ``max_replacements`` bounds how many dead
    actors are replaced before the pool gives up (default ``2 * workers + 2``);
    ``on_dispatch(pool, slot, index)`` is called after each evaluation is sent (tests use
    it to kill an actor mid-evaluation).  Needs a connected Ray (see
    :func:`autobits.cluster.runtime.ray_session`).
    """

    def __init__(self, *, lm, windows: np.ndarray, cache, candidates: Mapping[str, Sequence[str]],
                 workers: int | None = None, threads: int = 1, score_from: int | None = None,
                 max_replacements: int | None = None,
                 on_dispatch: Callable[["EvaluatorPool", int, int], None] | None = None):
        if not ray.is_initialized():
            raise AutobitsError("EvaluatorPool needs a connected Ray (use ray_session())")
        self.workers, self.threads = actor_count(workers, threads), int(threads)
        self.max_replacements = (2 * self.workers + 2 if max_replacements is None
                                 else int(max_replacements))
        self.on_dispatch = on_dispatch
        self.stats = PoolStats()
        self.pool_id = uuid.uuid4().hex[:8]
        self._lock = threading.Lock()
        self._closed = False

        t0 = time.perf_counter()
        reference, cand = shared_arrays(lm, cache, candidates)
        self.stats.put_bytes = int(sum(a.nbytes for a in reference.values())
                                   + sum(a.nbytes for a in cand.values()))
        self._refs = {
            "shell": ray.put(model_shell(lm.model)),
            "reference": ray.put(reference),
            "cache": ray.put(cand),
        }
        del reference, cand
        self.stats.put_seconds = time.perf_counter() - t0
        log.info("object store: %.2f GB of reference weights and candidate bytes put once "
                 "(%.1fs)",
                 self.stats.put_bytes / 1e9, self.stats.put_seconds)
        self._init_kw = {
            "specs": tuple(lm.specs), "name": lm.name, "architecture": lm.architecture,
            "windows": np.ascontiguousarray(windows), "score_from": score_from,
            "importance": dict(cache.importance) or None, "threads": self.threads,
            "cache_bytes": cache.budget_bytes,
        }
        t0 = time.perf_counter()
        self._actors: list[Any] = [None] * self.workers
        self._spawned = 0
        try:
            for slot in range(self.workers):
                self._actors[slot] = self._spawn(slot)
            self.info = self._ready(list(range(self.workers)))
        except BaseException:
            self.close()
            raise
        self.stats.start_seconds = time.perf_counter() - t0
        nodes = len({i["node"] for i in self.info})
        log.info("%d evaluator actors x %d threads on %d node(s) ready in %.1fs (reference PPL %.4f)",
                 self.workers, self.threads, nodes, self.stats.start_seconds, self.info[0]["ref_ppl"])
        self._idle: queue.Queue[int] = queue.Queue()
        for slot in range(self.workers):
            self._idle.put(slot)

    @staticmethod
    def candidates_of(prepared) -> dict[str, list[str]]:
        """tensor -> its candidate formats, from ``prepared.table``."""
        table = prepared.table
        return {t: [o.fmt for o in table.options[t]] for t in table.tensors}

    @classmethod
    def from_prepared(cls, prepared, **kw) -> "EvaluatorPool":
        """A pool measuring exactly what ``prepared.reward`` measures (same windows, same
        candidates, same importance vectors)."""
        windows = prepared.config.reward_slice(prepared.split.calib)
        return cls(lm=prepared.lm, windows=windows, cache=prepared.cache,
                   candidates=cls.candidates_of(prepared), **kw)

    # ------------------------------------------------------------ actors
    def _spawn(self, slot: int):
        self._spawned += 1
        name = f"autobits-eval-{self.pool_id}-{slot}-{self._spawned}"
        return EvaluatorActor.options(
            name=name, num_cpus=self.threads, max_restarts=0, max_task_retries=0,
        ).remote(shell=self._refs["shell"], reference=self._refs["reference"],
                 cache=self._refs["cache"], **self._init_kw)

    def _ready(self, slots: list[int]) -> list[dict]:
        """Wait for the actors in ``slots``; one lost at start (killed, out of memory) is
        replaced like one lost mid-search; an exception in its constructor is raised."""
        out: dict[int, dict] = {}
        while len(out) < len(slots):
            todo = [s for s in slots if s not in out]
            refs = {self._actors[s].info.remote(): s for s in todo}
            for ref, s in refs.items():
                actor = self._actors[s]
                try:
                    out[s] = ray.get(ref)
                except Exception as e:
                    if not _lost(e):
                        raise AutobitsError(f"evaluator actor failed to start: {e}") from None
                    self._replace(s, actor, e)
        return [out[s] for s in slots]

    @property
    def actors(self) -> list[Any]:
        """The current actor handles, one per slot (a replaced actor's slot gets the new one)."""
        return list(self._actors)

    def actor_info(self, slot: int) -> dict:
        """pid/node of the actor currently in ``slot``."""
        return ray.get(self._actors[slot].info.remote())

    def _replace(self, slot: int, dead, error: Exception) -> None:
        with self._lock:
            if self._actors[slot] is not dead:  # another thread replaced it already
                return
            self.stats.replacements += 1
            if self.stats.replacements > self.max_replacements:
                raise AutobitsError(
                    f"{self.stats.replacements} evaluator actors died (at most "
                    f"{self.max_replacements} are replaced); last error: {error}"
                )
            try:
                ray.kill(dead, no_restart=True)
            except Exception:  # already gone
                pass
            self._actors[slot] = self._spawn(slot)
        log.warning("evaluator actor in slot %d lost (%s); replaced (%d so far)", slot,
                    type(error).__name__, self.stats.replacements)

    # -------------------------------------------------------- evaluation
    def evaluate(self, allocation):
        """Metrics of one allocation, measured on an actor."""
        return self.evaluate_many([allocation])[0]

    def evaluate_many(self, allocations: Sequence[Any]) -> list:
        """Metrics of every allocation, in input order, measured in parallel on the actors.

        An evaluation whose actor dies is retried on its replacement.  Evaluation errors
        (a bad allocation) are raised.
        """
        if self._closed:
            raise AutobitsError("the evaluator pool is closed")
        allocations = list(allocations)
        results: list[Any] = [None] * len(allocations)
        pending = list(range(len(allocations)))[::-1]  # pop() takes the first
        inflight: dict[Any, tuple[int, int, Any, float]] = {}
        while pending or inflight:
            while pending:
                try:
                    slot = self._idle.get(block=not inflight, timeout=None)
                except queue.Empty:
                    break
                i = pending.pop()
                actor = self._actors[slot]
                ref = actor.evaluate.remote(allocations[i])
                inflight[ref] = (slot, i, actor, time.perf_counter())
                if self.on_dispatch is not None:
                    self.on_dispatch(self, slot, i)
            done, _ = ray.wait(list(inflight), num_returns=1)
            for ref in done:
                slot, i, actor, t0 = inflight.pop(ref)
                try:
                    m = ray.get(ref)
                except Exception as e:
                    if not _lost(e):
                        self._idle.put(slot)
                        for s, *_ in inflight.values():  # let the others finish
                            self._idle.put(s)
                        raise
                    try:
                        self._replace(slot, actor, e)
                    finally:
                        self._idle.put(slot)
                    with self._lock:
                        self.stats.retries += 1
                    log.warning("retrying evaluation %d of the batch on the new actor", i)
                    pending.append(i)
                    continue
                except BaseException:
                    self._idle.put(slot)
                    for s, *_ in inflight.values():  # let the others finish, free their slots
                        self._idle.put(s)
                    raise
                self._idle.put(slot)
                results[i] = m
                with self._lock:
                    self.stats.evaluations += 1
                    self.stats.wall.append(time.perf_counter() - t0)
                    self.stats.actor.append(float(m.seconds))
        return results

    def close(self) -> None:
        """Kill the actors and release the objects (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for a in self._actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass
        self._actors = []
        self._refs.clear()
        s = self.stats
        log.info("evaluator pool closed: %d evaluations, %d retried, %d actors replaced",
                 s.evaluations, s.retries, s.replacements)

    def __enter__(self) -> "EvaluatorPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
