"""Keeping several evaluator actors busy from an agent.

``SearchProblem.evaluate_many`` (set by the search command when an
:class:`~autobits.cluster.actors.EvaluatorPool` runs) measures a batch of allocations in
parallel.  The ``optuna`` agent uses it itself (batch ask/tell: ``batch`` trials per round,
default the pool's workers, TPE with the constant liar; the journal keeps resume working).
For environment-based agents (SAC) this module provides:

* :class:`BatchedEvalVecEnv`: an SB3 ``DummyVecEnv`` over ``n`` environments whose steps run
  in threads; the terminal evaluations requested in one ``step`` are gathered by an
  :class:`EvaluationBatcher` and sent to ``evaluate_many`` as one batch (in environment
  order, so a run is reproducible), while SB3 sees an ordinary vectorised environment.
  (SB3's SAC refuses ``train_freq`` in episodes with more than one environment: use a
  step-based ``train_freq``, e.g. one episode length.)
* :func:`batch_size_of`: the number of actors behind an ``evaluate_many``.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import numpy as np

__all__ = ["EvaluationBatcher", "BatchedEvalVecEnv", "batch_size_of"]

log = logging.getLogger(__name__)


def batch_size_of(evaluate_many: Callable | None, default: int = 2) -> int:
    """The number of evaluator actors behind ``evaluate_many`` (its pool's ``workers``)."""
    pool = getattr(evaluate_many, "__self__", None)
    return int(getattr(pool, "workers", 0) or default)


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
