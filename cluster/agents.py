"""Agents that keep several evaluator actors busy.

Both use ``SearchProblem.evaluate_many`` (set by the search command when an
:class:`~autobits.cluster.actors.EvaluatorPool` is running) and fall back to the plain
sequential agent without it.

* :class:`BatchOptunaAgent` (``optuna-ray``): the ``optuna`` agent's search space, decoding,
  samplers and journal, with batch ask/tell: ask ``batch`` trials, evaluate the distinct
  new allocations among them in parallel, tell them all.  The journal records exactly what
  the sequential agent records, so ``resume`` works across both (trials asked but never told,
  left by a killed driver, are failed on resume as the sequential agent does).
* :class:`BatchedEvalVecEnv`: an SB3 ``DummyVecEnv`` over ``n`` environments whose steps run
  in threads; the terminal evaluations requested in one ``step`` are gathered by an
  :class:`EvaluationBatcher` and sent to ``evaluate_many`` as one batch (in environment
  order, so a run is reproducible), while SB3 sees an ordinary vectorised environment.
  (SB3's SAC refuses ``train_freq`` in episodes with more than one environment: use a
  step-based ``train_freq``, e.g. one episode length.)
"""

from __future__ import annotations

import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from autobits.agents.base import SearchProblem, SearchResult, register_agent

__all__ = ["BatchOptunaAgent", "EvaluationBatcher", "BatchedEvalVecEnv", "batch_size_of"]

log = logging.getLogger(__name__)


def batch_size_of(evaluate_many: Callable | None, default: int = 2) -> int:
    """The number of evaluator actors behind ``evaluate_many`` (its pool's ``workers``)."""
    pool = getattr(evaluate_many, "__self__", None)
    return int(getattr(pool, "workers", 0) or default)


# ----------------------------------------------------------------------- Optuna
try:
    from autobits.agents.optuna_agent import OptunaAgent as _OptunaBase
except ImportError:  # the optuna agent is not built: BatchOptunaAgent is unavailable
    _OptunaBase = None


if _OptunaBase is not None:

    @register_agent("optuna-ray")
    class BatchOptunaAgent(_OptunaBase):
        """The ``optuna`` agent with batch ask/tell over ``problem.evaluate_many``.

        ``batch``: trials asked per round (default: the pool's workers).  Every other option
        is the ``optuna`` agent's.  Without ``evaluate_many`` (or with ``batch=1``) this is
        exactly the sequential agent.
        """

        name = "optuna-ray"

        def __init__(self, *, batch: int | None = None, **options: Any) -> None:
            super().__init__(**options)
            if batch is not None and batch < 1:
                raise ValueError(f"batch must be at least 1, got {batch=}")
            self.batch = batch

        def search(self, problem: SearchProblem, *, evals: int, seed: int,
                   out_dir: Path | None = None, resume: bool = False) -> SearchResult:
            k = self.batch or batch_size_of(problem.evaluate_many)
            if problem.evaluate_many is None or k == 1:
                return super().search(problem, evals=evals, seed=seed, out_dir=out_dir, resume=resume)
            return _batch_search(self, problem, evals=evals, seed=seed, out_dir=out_dir,
                                 resume=resume, batch=k)

    def _batch_search(agent, problem: SearchProblem, *, evals: int, seed: int,
                      out_dir: Path | None, resume: bool, batch: int) -> SearchResult:
        """The sequential agent's loop with ``batch`` trials in flight (see the module doc)."""
        from optuna.trial import TrialState

        from autobits.agents import optuna_agent as oa

        if evals < 1:
            raise ValueError(f"evals must be at least 1, got {evals=}")
        t_start = time.perf_counter()
        agent._setup(problem)
        p, limit = agent._packed, int(problem.limit_bytes)
        settings = agent.settings(problem, seed)
        with oa._quiet_optuna():
            study = agent._open_study(out_dir, settings, resume)
            for tr in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                study.tell(tr.number, state=TrialState.FAIL)  # left by a killed driver
            done = list(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
            seen: dict[tuple, Any] = {}
            history, raw_over = [], []
            for tr in done:
                rec = oa.FrozenRecord.from_trial(tr)
                seen.setdefault(rec.key, rec)
                if not rec.cached:
                    history.append(rec.evaluation(len(history)))
                    raw_over.append(rec.raw_over)
            best = min(seen.values(), key=lambda r: r.kld, default=None)
            if not any(r.warm for r in seen.values()):
                study.enqueue_trial(agent._warm_params, user_attrs={"warm": True})
            n_trials = len(done)
            max_trials = int(math.ceil(agent.max_trials_factor * evals))
            rounds = 0
            while len(history) < evals and n_trials < max_trials:
                want = min(batch, evals - len(history))
                fresh: dict[tuple, list] = {}  # key -> [(trial, attrs, alloc)], first evaluated
                while len(fresh) < want and n_trials < max_trials:
                    study.sampler = agent._make_sampler(oa._trial_seed(seed, n_trials))
                    trial = study.ask(agent._dists)
                    n_trials += 1
                    try:
                        index, raw_bytes = agent.decode(trial.params, limit)
                    except BaseException:
                        study.tell(trial, state=TrialState.FAIL)
                        raise
                    key = tuple(int(i) for i in index)
                    attrs = {"index": list(key), "raw_bytes": int(raw_bytes),
                             "raw_over": bool(raw_bytes > limit)}
                    hit = seen.get(key)
                    if hit is not None:  # evaluated before: answered from the record
                        _tell_cached(study, trial, attrs, hit)
                        continue
                    fresh.setdefault(key, []).append((trial, attrs))
                if not fresh:
                    break
                keys = list(fresh)
                allocs = [problem.table.allocation(p.choice(np.array(k))) for k in keys]
                t0 = time.perf_counter()
                try:
                    metrics = problem.evaluate_many(allocs)
                except BaseException:
                    for group in fresh.values():
                        for trial, _ in group:
                            study.tell(trial, state=TrialState.FAIL)
                    raise
                seconds = (time.perf_counter() - t0) / len(keys)  # wall share per evaluation
                rounds += 1
                for key, m in zip(keys, metrics):
                    (trial, attrs), *dups = fresh[key]
                    attrs.update(metrics=m.to_json(), seconds=seconds, eval_index=len(history))
                    for a, v in attrs.items():
                        trial.set_user_attr(a, v)
                    rec = oa.FrozenRecord(trial.number, key, float(m.kld), m.to_json(), seconds,
                                          attrs["raw_over"], False, bool(trial.user_attrs.get("warm")),
                                          dict(trial.params))
                    study.tell(trial, float(m.kld))
                    seen[key] = rec
                    history.append(rec.evaluation(len(history)))
                    raw_over.append(rec.raw_over)
                    for dup, dattrs in dups:
                        _tell_cached(study, dup, dattrs, rec)
                    if best is None or rec.kld < best.kld:
                        best = rec
                        log.info("eval %d/%d: new best KLD %.5f at %.4f bpw (trial %d)",
                                 len(history), evals, rec.kld, rec.metrics["bpw"], rec.number)
                log.info("round %d: %d evaluations in parallel (%.1fs); %d/%d done, best KLD %.5f",
                         rounds, len(keys), time.perf_counter() - t0, len(history), evals, best.kld)
            if len(history) < evals:
                log.warning("stopping after %d trials: only %d distinct allocations found",
                            n_trials, len(history))
        if best is None:
            raise ValueError("the search evaluated nothing")
        best_alloc = problem.table.allocation(p.choice(np.array(best.key)), meta={
            "method": "optuna", "space": agent.space, "sampler": agent.sampler, "seed": int(seed),
            "trial": best.number, "calib_kld": best.kld, "limit_bytes": limit})
        warm = next((r for r in seen.values() if r.warm), None)
        meta = {
            **settings, "evals": len(history), "trials": n_trials, "limit_bytes": limit,
            "limit_bpw": limit * 8 / problem.table.params, "best_trial": best.number,
            "warm_kld": warm.kld if warm else None, "raw_over": raw_over,
            "groups": getattr(agent, "_groups", None), "seconds": time.perf_counter() - t_start,
            "journal": str(Path(out_dir) / oa.JOURNAL) if out_dir is not None else None,
            "batch": batch, "rounds": rounds,
        }
        if agent.space == "groups":
            meta["best_params"] = {k[2:]: v for k, v in best.params.items()}
        return SearchResult(agent="optuna", best=best_alloc, best_metrics=oa._metrics(best.metrics),
                            history=history, meta=meta)

    def _tell_cached(study, trial, attrs: dict, rec) -> None:
        trial.set_user_attr("cached", rec.number)
        for a, v in attrs.items():
            trial.set_user_attr(a, v)
        trial.set_user_attr("metrics", rec.metrics)
        study.tell(trial, rec.kld)

else:  # pragma: no cover - only while the optuna agent is missing
    BatchOptunaAgent = None  # type: ignore[assignment,misc]


# -------------------------------------------------------------------------- SAC
class EvaluationBatcher:
    """A thread-safe ``evaluate(allocation)`` that gathers concurrent calls into batches.

    Inside :meth:`round` (``n`` threads each running one environment's step), a call blocks
    until every one of the ``n`` threads has either asked for an evaluation or finished its
    step; the waiting allocations then go to ``evaluate_many`` as one batch, ordered by the
    callers' ``order`` (their environment index).  Outside a round a call is evaluated at once.
    """

    def __init__(self, evaluate_many: Callable[[list], list]):
        self.evaluate_many = evaluate_many
        self._cond = threading.Condition()
        self._pending: list[dict] = []
        self._active = 0
        self._local = threading.local()
        self.batches: list[int] = []  # sizes of the batches sent (for logs and tests)

    def set_order(self, order: int) -> None:
        self._local.order = order

    def round(self, n: int):
        batcher = self

        class _Round:
            def __enter__(self):
                with batcher._cond:
                    batcher._active = n

            def __exit__(self, *exc):
                with batcher._cond:
                    batcher._active = 0

        return _Round()

    def finished(self) -> None:
        """The calling thread's step is done (it will ask for nothing more this round)."""
        with self._cond:
            self._active -= 1
            self._flush_if_ready()

    def __call__(self, allocation):
        slot = {"alloc": allocation, "order": getattr(self._local, "order", 0), "done": False}
        with self._cond:
            self._pending.append(slot)
            self._flush_if_ready()
            while not slot["done"]:
                self._cond.wait()
        if "error" in slot:
            raise slot["error"]
        return slot["result"]

    def _flush_if_ready(self) -> None:
        if not self._pending or len(self._pending) < self._active:
            return
        batch = sorted(self._pending, key=lambda s: s["order"])
        self._pending = []
        self.batches.append(len(batch))
        try:
            results = self.evaluate_many([s["alloc"] for s in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"evaluate_many returned {len(results)} results for "
                                   f"{len(batch)} allocations")
            for s, r in zip(batch, results):
                s["result"] = r
        except BaseException as e:  # every waiting step sees the error
            for s in batch:
                s["error"] = e
        for s in batch:
            s["done"] = True
        self._cond.notify_all()


def _dummy_vec_env_class():
    from stable_baselines3.common.vec_env import DummyVecEnv

    class _BatchedEvalVecEnv(DummyVecEnv):
        """DummyVecEnv whose ``step_wait`` steps the environments in threads, so that their
        terminal evaluations reach ``evaluate_many`` together (see :class:`EvaluationBatcher`)."""

        def __init__(self, env_fns: Sequence[Callable[[Callable], Any]], evaluate_many: Callable):
            self.batcher = EvaluationBatcher(evaluate_many)
            super().__init__([(lambda fn=fn: fn(self.batcher)) for fn in env_fns])
            self._threads = ThreadPoolExecutor(max_workers=max(1, len(env_fns)),
                                               thread_name_prefix="autobits-env")

        def _step_one(self, env_idx: int):
            self.batcher.set_order(env_idx)
            try:
                obs, rew, terminated, truncated, info = self.envs[env_idx].step(self.actions[env_idx])
            finally:
                self.batcher.finished()
            return obs, rew, terminated, truncated, info

        def step_wait(self):
            from copy import deepcopy

            with self.batcher.round(self.num_envs):
                outs = list(self._threads.map(self._step_one, range(self.num_envs)))
            for env_idx, (obs, rew, terminated, truncated, info) in enumerate(outs):
                self.buf_rews[env_idx] = rew
                self.buf_infos[env_idx] = info
                self.buf_dones[env_idx] = terminated or truncated
                info["TimeLimit.truncated"] = truncated and not terminated
                if self.buf_dones[env_idx]:
                    info["terminal_observation"] = obs
                    obs, self.reset_infos[env_idx] = self.envs[env_idx].reset()
                self._save_obs(env_idx, obs)
            return (self._obs_from_buf(), np.copy(self.buf_rews), np.copy(self.buf_dones),
                    deepcopy(self.buf_infos))

        def close(self) -> None:
            self._threads.shutdown(wait=True)
            super().close()

    return _BatchedEvalVecEnv


def BatchedEvalVecEnv(env_fns: Sequence[Callable[[Callable], Any]],  # noqa: N802
                      evaluate_many: Callable):
    """An SB3 VecEnv over ``env_fns``; each ``fn(evaluate)`` builds one environment that calls
    ``evaluate(allocation)`` for its terminal reward.  Those calls are batched per step to
    ``evaluate_many``; ``vec.batcher.batches`` records the batch sizes."""
    return _dummy_vec_env_class()(env_fns, evaluate_many)
