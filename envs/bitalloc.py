"""BitAllocEnv: per-tensor format allocation under a global byte budget, as a Gymnasium env."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Callable, Sequence

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from autobits.candidates import CandidateTable
from autobits.envs._core import (
    OBS_CLIP,
    AllocTask,
    FeatureSpecError,
    action_of_rank,
    rank_of_action,
)
from autobits.errors import BudgetError
from autobits.solvers.lagrange import greedy_index
from autobits.solvers.projection import project
from autobits.specs import DEFAULT_CANDIDATES

__all__ = ["BitAllocEnv", "STATE_NAMES", "REWARD_MODES", "ACTION_MODES"]

log = logging.getLogger(__name__)

#: Names of the budget-state columns appended to the feature columns of the observation.
STATE_NAMES: tuple[str, ...] = (
    "budget_left", "slack_ratio", "progress", "prev_action", "need_min", "need_max",
    "range_share", "target", "greedy_hint", "n_formats", "proxy_slope", "size_log",
)
REWARD_MODES = ("kld", "proxy")
ACTION_MODES = ("absolute", "residual", "sensitivity")
_EPS_KLD = 1e-6


def _clip(x: float, lo: float, hi: float) -> float:
    return lo if x < lo else hi if x > hi else float(x)


class BitAllocEnv(gym.Env):
    """Choose a storage format for every quantizable tensor of a model, one tensor per step.

    An episode walks the tensors of one model (``order="model"``: the candidate table's
    order, embedding first then block by block; ``order="sensitivity"``: decreasing proxy
    error per byte, so the most sensitive tensors are decided while budget is plentiful).
    With several tasks (models) or a ``bpw_range``, each reset draws a model and a budget
    from ``np_random``; the same seed gives the same episode.

    ## Action Space

    ``Box(-1, 1, (1,), float32)``.  ``action="absolute"`` (default): [-1, 1] is cut into
    one equal bin per valid format of the current tensor, ordered by size, -1 the smallest
    and +1 the largest (RAMP's continuous action mapped to a discrete bit-width).
    ``action="residual"``: the action moves ``round(a * span)`` formats up (a > 0) or down
    from the greedy solver's choice for this tensor, clipped to the valid formats.
    ``action="sensitivity"`` (beyond RAMP): the action is a correction of this tensor's
    proxy error by the factor ``gain_range ** a``; the episode's allocation is the
    equal-slope greedy solution of the corrected errors at the budget (so it always fits
    and spends the budget: no projection, no cliff), 0 everywhere being the greedy solver.

    ## Observation Space

    ``Box(-10, 10, (n_features + 12,), float32)``: the current tensor's feature row
    (``feature_norm="none"``, default: as the FeatureTable gives it -- its features are
    already normalised within the model -- clipped to +-10; ``"zscore"``: z-scored within
    the model, clip +-5), followed by the budget state.  ``B`` is the byte limit,
    ``C`` the bytes committed so far (fixed float tensors plus the tensors already decided),
    ``R_min``/``R_max`` the bytes of the undecided tensors (this one included) at their
    smallest/largest format, ``lo``/``hi`` the model's smallest/largest file.

    | column | meaning | range |
    |---|---|---|
    | features 0..F-1 | FeatureTable row (:mod:`autobits.features` defines them) | [-10, 10] |
    | budget_left | (B - C - R_min) / (hi - lo) | [-2, 2] |
    | slack_ratio | (B - C - R_min) / (R_max - R_min): remaining upgrades affordable | [-2, 2] |
    | progress | tensors decided / tensors | [0, 1] |
    | prev_action | previous action (0 at the first step) | [-1, 1] |
    | need_min | this tensor's smallest format bytes / (B - C) | [0, 2] |
    | need_max | this tensor's largest format bytes / (B - C) | [0, 2] |
    | range_share | this tensor's (max - min) bytes / (R_max - R_min) | [0, 1] |
    | target | (B - lo) / (hi - lo): how generous the budget is | [0, 1] |
    | greedy_hint | the greedy solver's format for this tensor at B, as an action | [-1, 1] |
    | n_formats | valid formats of this tensor / 12 | (0, 1] |
    | proxy_slope | log proxy error per byte, largest to smallest format, z in model | [-5, 5] |
    | size_log | log parameter count, z-scored in model | [-5, 5] |

    ## Rewards

    Quality first, as RAMP.  Each step gives ``-shaping * regret / E_greedy`` where
    ``regret`` is this tensor's Lagrangian regret ``(e - e_g) + lambda (b - b_g)`` against
    the greedy choice ``g`` at the greedy price ``lambda`` (0 with the default
    ``shaping=0``).  The last step projects the allocation onto the budget and adds the
    terms below.  ``projection="shift"`` (default) adds one common offset to every action
    and takes the largest offset (found by bisection) whose allocation fits, so the
    policy's *relative* preferences survive; ``projection="proxy"`` repairs with the
    cheapest proxy-error-per-byte downgrades until the file fits (which tends to undo the
    policy's upgrades first: they are the cheapest downgrades by the proxy).  Either way,
    with ``fill`` (default) the leftover bytes are then spent on the upgrades with the most
    proxy error saved per byte that still fit (:func:`autobits.solvers.projection.project`).

    * quality ``-log(q / q_greedy)``, clipped to [-5, 5]: ``q`` is the measured KLD of the
      projected allocation (``reward_mode="kld"``, via the task's ``evaluate``) or its summed
      proxy error (``"proxy"``, no evaluation), ``q_greedy`` the same for the greedy solution
      at this budget (so 0 means as good as greedy, > 0 better);
    * a cliff ``-cliff`` when the unprojected allocation exceeded the budget;
    * ``-unused * (B - bytes) / (B - lo)`` when the unprojected allocation left budget unused.

    ## Starting State

    The first tensor of the drawn model with nothing committed; ``reset(options=...)`` takes
    ``task`` (index), ``limit_bytes`` or ``bpw`` to fix the episode.

    ## Episode End

    Terminates after the last tensor (episode length = number of quantizable tensors); never
    truncated.  The final ``info`` holds ``allocation`` (projected tensor -> format),
    ``bytes``, ``raw_bytes``, ``limit_bytes``, ``over_budget``, ``proxy_error``, ``kld``
    (None in proxy mode), ``quality``, ``penalty`` and ``task``.
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        table: CandidateTable | None = None,
        features: Any = None,
        *,
        limit_bytes: int | None = None,
        bpw_range: tuple[float, float] | None = None,
        evaluate: Callable[[Any], Any] | None = None,
        tasks: Sequence[AllocTask] | None = None,
        reward_mode: str | None = None,
        order: str = "model",
        action: str = "absolute",
        span: int = 2,
        gain_range: float = 4.0,
        cliff: float = 2.0,
        unused: float = 0.5,
        shaping: float = 0.0,
        fill: bool = True,
        projection: str = "shift",
        feature_norm: str = "none",
        bpw_step: float = 0.01,
    ):
        super().__init__()
        if tasks is None:
            if table is None or features is None:
                raise ValueError("give table and features, or tasks")
            tasks = [AllocTask(table, features, evaluate=evaluate)]
        elif table is not None or features is not None or evaluate is not None:
            raise ValueError("give either table/features/evaluate or tasks, not both")
        self.tasks = list(tasks)
        if not self.tasks:
            raise ValueError("tasks must not be empty")
        spec = self.tasks[0].spec
        for t in self.tasks[1:]:
            if t.spec != spec:
                raise FeatureSpecError(
                    f"all models must share one feature spec: {self.tasks[0].name!r} has "
                    f"version {spec['version']!r} with {len(spec['names'])} features, "
                    f"{t.name!r} has version {t.spec['version']!r} with {len(t.spec['names'])}"
                )
        self.feature_spec = spec
        if order not in ("model", "sensitivity"):
            raise ValueError(f"order must be 'model' or 'sensitivity', got {order!r}")
        if projection not in ("shift", "proxy"):
            raise ValueError(f"projection must be 'shift' or 'proxy', got {projection!r}")
        if action not in ACTION_MODES:
            raise ValueError(f"action must be one of {ACTION_MODES}, got {action!r}")
        if not gain_range > 1:
            raise ValueError(f"gain_range must be > 1, got {gain_range}")
        if (limit_bytes is None) == (bpw_range is None):
            raise BudgetError(
                f"give exactly one of limit_bytes or bpw_range, got limit_bytes={limit_bytes}, "
                f"bpw_range={bpw_range}"
            )
        if limit_bytes is not None:
            if len(self.tasks) != 1:
                raise BudgetError("a fixed limit_bytes needs a single model; use bpw_range")
            self.tasks[0].check_limit(limit_bytes)
        else:
            lo_bpw, hi_bpw = map(float, bpw_range)
            if not 0 < lo_bpw <= hi_bpw:
                raise BudgetError(f"bpw_range must be 0 < LO <= HI, got {lo_bpw}:{hi_bpw}")
            for t in self.tasks:
                t_lo, t_hi = t.lo * 8 / t.params, t.hi * 8 / t.params
                if hi_bpw < t_lo or lo_bpw > t_hi:
                    raise BudgetError(
                        f"bpw range {lo_bpw:g}:{hi_bpw:g} misses the feasible range of model "
                        f"{t.name!r}: {t_lo:.3f}..{t_hi:.3f} bpw"
                    )
        self.limit_bytes = None if limit_bytes is None else int(limit_bytes)
        self.bpw_range = None if bpw_range is None else (float(bpw_range[0]), float(bpw_range[1]))
        self.order, self.action_mode, self.span = order, action, int(span)
        self.gain_range = float(gain_range)
        self.cliff, self.unused, self.shaping = float(cliff), float(unused), float(shaping)
        self.fill, self.bpw_step = bool(fill), float(bpw_step)
        self.projection = projection
        self.feature_norm = feature_norm
        self._feats = [t.features_for(feature_norm) for t in self.tasks]
        #: constructor options besides the tasks and budget (saved with a policy)
        self.config = {"order": order, "action": action, "span": self.span,
                       "gain_range": self.gain_range, "cliff": self.cliff,
                       "unused": self.unused, "shaping": self.shaping, "fill": self.fill,
                       "projection": projection, "feature_norm": feature_norm,
                       "bpw_step": self.bpw_step}
        if reward_mode is None:
            reward_mode = "kld" if all(t.evaluate is not None for t in self.tasks) else "proxy"
        self.set_reward_mode(reward_mode)
        self.n_features = self._feats[0].shape[1]
        self.obs_names = tuple(f"feature:{n}" for n in spec["names"]) + STATE_NAMES
        if len(self.obs_names) != self.n_features + len(STATE_NAMES):  # unnamed feature columns
            self.obs_names = tuple(f"feature:{i}" for i in range(self.n_features)) + STATE_NAMES
        self.observation_space = spaces.Box(-OBS_CLIP, OBS_CLIP, (len(self.obs_names),), np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, (1,), np.float32)
        self._orders = [self._make_order(t) for t in self.tasks]
        self.kld_reference: dict[tuple[int, int], float] = {}
        self._task_i = 0
        self._t = 0
        self._index = np.zeros(0, dtype=np.int64)
        self.last_info: dict = {}

    # ------------------------------------------------------------ configuration
    def set_reward_mode(self, mode: str) -> None:
        """Switch between the measured-KLD reward and the proxy-only reward."""
        if mode not in REWARD_MODES:
            raise ValueError(f"reward_mode must be one of {REWARD_MODES}, got {mode!r}")
        if mode == "kld":
            missing = [t.name for t in self.tasks if t.evaluate is None]
            if missing:
                raise ValueError(
                    f"reward_mode 'kld' needs an evaluate callable; missing for {missing}"
                )
        self.reward_mode = mode

    def set_kld_reference(self, kld: float, *, task: int = 0,
                          limit_bytes: int | None = None) -> None:
        """Give the greedy solution's KLD at a budget (else it is measured on first need)."""
        limit = self.limit_bytes if limit_bytes is None else int(limit_bytes)
        self.kld_reference[(task, limit)] = float(kld)

    def spawn(self) -> "BitAllocEnv":
        """A new env over the same tasks, budget, options, reward mode and KLD references."""
        env = BitAllocEnv(tasks=self.tasks, limit_bytes=self.limit_bytes, bpw_range=self.bpw_range,
                          reward_mode=self.reward_mode, **self.config)
        env.kld_reference = self.kld_reference  # shared on purpose: one measurement per budget
        return env

    def _make_order(self, task: AllocTask) -> np.ndarray:
        if self.order == "model":
            return np.arange(task.n)
        return np.argsort(-task.slope, kind="stable")

    # ---------------------------------------------------------------- helpers
    @property
    def task(self) -> AllocTask:
        return self.tasks[self._task_i]

    @property
    def episode_limit(self) -> int:
        return self._limit

    @property
    def step_order(self) -> np.ndarray:
        """Row of the tensor decided at each step of the current task."""
        return self._orders[self._task_i]

    def index_to_actions(self, index: np.ndarray) -> np.ndarray:
        """Actions (in step order) that make this episode choose candidate ``index``."""
        p, order = self.task.packed, self.step_order
        count = p.count[order]
        rank = count - 1 - np.asarray(index)[order]
        if self.action_mode == "absolute":
            return action_of_rank(rank, count).astype(np.float32)
        if self.action_mode == "sensitivity":  # only the greedy allocation is expressible
            return np.zeros(len(order), dtype=np.float32)
        g_rank = count - 1 - self._greedy_index[order]
        return np.clip((rank - g_rank) / max(self.span, 1), -1, 1).astype(np.float32)

    def _indices(self, actions: np.ndarray) -> np.ndarray:
        """Candidate index of every row for per-row actions (absolute ones clipped to [-1, 1])."""
        count = self.task.packed.count
        if self.action_mode == "absolute":
            rank = rank_of_action(np.clip(actions, -1.0, 1.0), count)
        else:
            g_rank = count - 1 - self._greedy_index
            step = np.floor(actions * self.span + 0.5).astype(np.int64)
            rank = np.clip(g_rank + step, 0, count - 1)
        return count - 1 - rank

    def _shift_project(self) -> np.ndarray:
        """The largest common shift of all actions whose allocation fits, then ``fill``."""
        p, limit = self.task.packed, self._limit
        reach = 2.0 if self.action_mode == "absolute" else 1.0 + p.count.max() / max(self.span, 1)
        fits = lambda d: p.total_bytes(self._indices(self._actions + d)) <= limit  # noqa: E731
        if fits(reach):
            lo = reach
        else:
            lo, hi = -reach, reach  # fits(-reach): every tensor at its smallest format
            for _ in range(40):
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        index = self._indices(self._actions + lo)
        return project(p, index, limit, fill=self.fill) if self.fill else index

    def _sensitivity_allocation(self) -> np.ndarray:
        """Equal-slope greedy allocation of the proxy errors scaled by ``gain_range ** a``."""
        p = self.task.packed
        gain = self.gain_range ** np.clip(self._actions, -1.0, 1.0)
        return greedy_index(dataclasses.replace(p, error=p.error * gain[:, None]), self._limit)

    def _row_index(self, row: int, a: float) -> int:
        count = int(self.task.packed.count[row])
        if self.action_mode == "sensitivity":  # provisional: decided at the end
            return int(self._greedy_index[row])
        if self.action_mode == "absolute":
            rank = int(rank_of_action(a, count))
        else:
            g_rank = count - 1 - int(self._greedy_index[row])
            rank = int(np.clip(g_rank + int(np.round(a * self.span)), 0, count - 1))
        return count - 1 - rank

    def _draw_limit(self, task: AllocTask) -> int:
        lo_bpw, hi_bpw = self.bpw_range
        t_lo, t_hi = task.lo * 8 / task.params, task.hi * 8 / task.params
        lo_bpw, hi_bpw = max(lo_bpw, t_lo), min(hi_bpw, t_hi)
        steps = int(math.floor((hi_bpw - lo_bpw) / self.bpw_step)) if self.bpw_step > 0 else 0
        bpw = lo_bpw
        if steps:
            bpw += self.bpw_step * int(self.np_random.integers(0, steps + 1))
        return task.limit_of_bpw(bpw)

    # ------------------------------------------------------------------- API
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        options = dict(options or {})
        if "task" in options:
            self._task_i = int(options["task"])
        elif len(self.tasks) > 1:
            self._task_i = int(self.np_random.integers(0, len(self.tasks)))
        else:
            self._task_i = 0
        task = self.task
        if "limit_bytes" in options:
            self._limit = task.check_limit(int(options["limit_bytes"]))
        elif "bpw" in options:
            self._limit = task.check_limit(task.limit_of_bpw(float(options["bpw"])))
        elif self.limit_bytes is not None:
            self._limit = self.limit_bytes
        else:
            self._limit = self._draw_limit(task)
        self._greedy_index, self._greedy_error, self._price = task.greedy(self._limit)
        self._index = np.zeros(task.n, dtype=np.int64)
        self._actions = np.zeros(task.n, dtype=np.float64)
        self._t = 0
        self._committed = int(task.packed.fixed_bytes)
        self._rem_min = int(task.min_row.sum())
        self._rem_max = int(task.max_row.sum())
        self._prev = 0.0
        self.last_info = {}
        info = {"task": task.name, "limit_bytes": self._limit, "bpw": self._limit * 8 / task.params}
        return self._obs(), info

    def _obs(self) -> np.ndarray:
        task = self.task
        i = int(self.step_order[min(self._t, task.n - 1)])
        B, C = self._limit, self._committed
        slack = B - C - self._rem_min
        rem_range = max(self._rem_max - self._rem_min, 1)
        left = B - C
        count = int(task.packed.count[i])
        g_rank = count - 1 - int(self._greedy_index[i])
        state = np.array([
            _clip(slack / max(task.hi - task.lo, 1), -2.0, 2.0),
            _clip(slack / rem_range, -2.0, 2.0),
            self._t / task.n,
            self._prev,
            _clip(task.min_row[i] / left, 0.0, 2.0) if left > 0 else 2.0,
            _clip(task.max_row[i] / left, 0.0, 2.0) if left > 0 else 2.0,
            _clip((task.max_row[i] - task.min_row[i]) / rem_range, 0.0, 1.0),
            _clip((B - task.lo) / max(task.hi - task.lo, 1), 0.0, 1.0),
            (2.0 * g_rank + 1.0) / count - 1.0,
            count / len(DEFAULT_CANDIDATES),
            task.slope[i],
            task.size[i],
        ], dtype=np.float32)
        obs = np.concatenate([self._feats[self._task_i][i], state]).astype(np.float32)
        return np.clip(obs, -OBS_CLIP, OBS_CLIP)

    def step(self, action):
        task = self.task
        if self._t >= task.n:
            raise RuntimeError("episode is over; call reset()")
        a = float(np.clip(np.asarray(action, dtype=np.float64).reshape(-1)[0], -1.0, 1.0))
        i = int(self.step_order[self._t])
        k = self._row_index(i, a)
        p = task.packed
        self._index[i] = k
        self._actions[i] = a
        self._committed += int(p.bytes[i, k])
        self._rem_min -= int(task.min_row[i])
        self._rem_max -= int(task.max_row[i])
        self._prev = a
        self._t += 1
        reward = 0.0
        if self.shaping:
            g = int(self._greedy_index[i])
            regret = (p.error[i, k] - p.error[i, g]) + self._price * float(
                p.bytes[i, k] - p.bytes[i, g])
            reward -= self.shaping * float(regret) / max(self._greedy_error, 1e-30)
        terminated = self._t >= task.n
        info: dict = {}
        if terminated:
            final, info = self._finish()
            reward += final
            self.last_info = info
        obs = self._obs()
        return obs, float(reward), terminated, False, info

    # ------------------------------------------------------------ episode end
    def _finish(self) -> tuple[float, dict]:
        task, limit = self.task, self._limit
        raw_bytes = task.packed.total_bytes(self._index)
        if self.action_mode == "sensitivity":
            final = self._sensitivity_allocation()
            raw_bytes = task.packed.total_bytes(final)
        elif self.projection == "shift":
            final = self._shift_project()
        else:
            final = project(task.packed, self._index, limit, fill=self.fill)
        nbytes = task.packed.total_bytes(final)
        proxy = task.packed.total_error(final)
        kld = None
        if self.reward_mode == "kld":
            kld = self._measure(final)
            ref = self._reference_kld()
            quality = -math.log((kld + _EPS_KLD) / (ref + _EPS_KLD))
        else:
            eps = 1e-9 * max(self._greedy_error, 1e-30)
            quality = -math.log((proxy + eps) / (self._greedy_error + eps))
        quality = float(np.clip(quality, -5.0, 5.0))
        over = raw_bytes > limit
        if over:
            penalty = self.cliff
        else:
            penalty = self.unused * (limit - raw_bytes) / max(limit - task.lo, 1)
        info = {
            "task": task.name, "allocation": task.choice(final), "index": final,
            "bytes": nbytes, "raw_bytes": raw_bytes, "limit_bytes": limit,
            "bpw": nbytes * 8 / task.params, "over_budget": bool(over),
            "proxy_error": proxy, "greedy_proxy_error": self._greedy_error, "kld": kld,
            "quality": quality, "penalty": float(penalty),
        }
        return quality - float(penalty), info

    def _allocation(self, index: np.ndarray):
        task = self.task
        return task.table.allocation(task.choice(index), meta={"limit_bytes": self._limit})

    def _measure(self, index: np.ndarray) -> float:
        t0 = time.perf_counter()
        m = self.task.evaluate(self._allocation(index))
        kld = float(getattr(m, "kld", m))
        log.debug("evaluated %s: kld %.6f (%.2fs)", self.task.name, kld, time.perf_counter() - t0)
        return kld

    def _reference_kld(self) -> float:
        key = (self._task_i, self._limit)
        if key not in self.kld_reference:
            self.kld_reference[key] = self._measure(self._greedy_index)
        return self.kld_reference[key]

    def greedy_allocation(self):
        """The greedy solver's allocation at the current episode's budget."""
        return self._allocation(self._greedy_index)
