"""``sac``: Soft Actor-Critic (stable-baselines3) over :class:`~autobits.envs.BitAllocEnv`.

A search spends its evaluation budget ``evals`` like this:

1. the greedy solution (the warm start) is evaluated first: it is the reward's reference
   (``-log(kld / kld_greedy)``) and the fallback, so the result is never worse than greedy
   on the calibration slice;
2. *proxy pretraining* (``pretrain_episodes``, no evaluation): the reward is the summed
   proxy error of the projected allocation, so the policy learns the budget and the
   proxy's trade-offs for free; the replay buffer is seeded with the greedy episode;
3. *fine-tuning on measured KLD*: every episode end measures the projected allocation once
   (identical allocations are measured once: repeats cost nothing), until ``evals - 1``
   evaluations are spent; the greedy episode is seeded again with its KLD reward;
4. the deterministic policy's allocation is measured with the last evaluation.

The best allocation seen (every episode's projected allocation is a feasible candidate) is
returned with the full history.  Observations are normalised with ``VecNormalize``.

Defaults, and why: the env's ``action="sensitivity"`` (the policy corrects each tensor's
proxy error by a gain, the allocation is the equal-slope solution of the corrected errors:
always feasible, and the zero action is the greedy solver) with gSDE exploration (one noise
draw per episode, a function of the features, so tensors of a kind move together).  On a
synthetic problem whose "KLD" re-weights the proxy (attn_v x10, early ffn_down x5; 57
tensors, 80 evaluations, greedy 0.0650, optimum 0.0604) this reached 0.0624 (best seen) and
0.0638 (deterministic policy), where RAMP's absolute mapping and the residual mapping with
per-step noise never improved on greedy in 80 evaluations (numbers in the bench notes).
"""

from __future__ import annotations

from dataclasses import dataclass

import logging
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from autobits.agents.base import TOP_CANDIDATES, Evaluation, SearchProblem, SearchResult
from autobits.agents.base import AgentConfigError, AgentError, register_agent
from autobits.allocation import Allocation
from autobits.envs import AllocTask, BitAllocEnv

__all__ = ["SACAgent", "make_sac", "seed_episode", "StopCallback", "CountingEvaluator",
           "deterministic_index", "sac_class"]

log = logging.getLogger(__name__)


class CountingEvaluator:
    """Wraps ``evaluate``: measures each distinct allocation once, keeps history and best."""

    def __init__(self, evaluate: Callable[[Allocation], Any], *, limit_bytes: int, total: int,
                 label: str = "sac", log_every: int = 10):
        self.evaluate, self.limit, self.total = evaluate, int(limit_bytes), int(total)
        self.label, self.log_every = label, max(1, int(log_every))
        self.cache: dict[tuple, Any] = {}
        self.feasible: dict[tuple, Allocation] = {}
        self.history: list[Evaluation] = []
        self.best: tuple[Allocation, Any] | None = None
        self.calls = 0

    @property
    def used(self) -> int:
        return len(self.history)

    def __call__(self, allocation: Allocation):
        self.calls += 1
        key = allocation.key
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        if self.used >= self.total:
            raise RuntimeError(f"evaluation budget of {self.total} exhausted")  # a bug if reached
        t0 = time.perf_counter()
        m = self.evaluate(allocation)
        seconds = time.perf_counter() - t0
        self.cache[key] = m
        feasible = allocation.bytes <= self.limit
        if feasible:
            self.feasible[key] = allocation
        self.history.append(Evaluation(index=self.used, kld=float(m.kld), bytes=allocation.bytes,
                                       bpw=allocation.bpw, feasible=feasible, seconds=seconds))
        new_best = feasible and (self.best is None or m.kld < self.best[1].kld)
        if new_best:
            self.best = (allocation, m)
        if new_best or self.used % self.log_every == 0 or self.used == self.total:
            b = self.best[1] if self.best else None
            log.info("%s eval %d/%d: kld %.6f at %.4f bpw%s; best %s", self.label, self.used,
                     self.total, m.kld, allocation.bpw, " (new best)" if new_best else "",
                     f"{b.kld:.6f} at {b.bpw:.4f} bpw" if b else "none")
        return m

    def top(self, k: int) -> list[tuple[Allocation, Any]]:
        """The ``k`` best distinct feasible allocations measured, best first."""
        keys = sorted(self.feasible, key=lambda key: self.cache[key].kld)[:k]
        return [(self.feasible[key], self.cache[key]) for key in keys]


class StopCallback:
    """SB3 callback factory: stop after ``episodes`` episodes or when ``should_stop()``."""

    def __new__(cls, *, episodes: int | None = None, should_stop: Callable[[], bool] | None = None,
                on_episode: Callable[[dict], None] | None = None):
        from stable_baselines3.common.callbacks import BaseCallback

        class _Stop(BaseCallback):
            def __init__(self):
                super().__init__()
                self.episodes = 0

            def _on_step(self) -> bool:
                dones = self.locals.get("dones")
                if dones is None or not np.any(dones):
                    return True
                for d, info in zip(dones, self.locals.get("infos", ())):
                    if d:
                        self.episodes += 1
                        if on_episode is not None:
                            on_episode(info)
                if episodes is not None and self.episodes >= episodes:
                    return False
                return not (should_stop is not None and should_stop())

        return _Stop()


_SAC_CLASS = None


def sac_class():
    """stable-baselines3's SAC whose network work (updates, action sampling, predict) runs on
    ``train_threads`` torch threads (1 by default: tiny MLPs gain nothing from more, and on
    a busy machine OpenMP oversubscription makes two threads many times slower); the rest
    of the process (the evaluator's forward passes) keeps its thread count."""
    global _SAC_CLASS
    if _SAC_CLASS is None:
        import torch
        from stable_baselines3 import SAC

        class ThreadedSAC(SAC):
            train_threads = 1

            def _threads(self, fn, *args, **kwargs):
                old = torch.get_num_threads()
                torch.set_num_threads(self.train_threads)
                try:
                    return fn(*args, **kwargs)
                finally:
                    torch.set_num_threads(old)

            def train(self, gradient_steps: int, batch_size: int = 64) -> None:
                self._threads(super().train, gradient_steps, batch_size)

            def _sample_action(self, *args, **kwargs):
                return self._threads(super()._sample_action, *args, **kwargs)

            def predict(self, *args, **kwargs):
                return self._threads(super().predict, *args, **kwargs)

        _SAC_CLASS = ThreadedSAC
    return _SAC_CLASS


def make_sac(env: BitAllocEnv, *, seed: int, learning_rate: float = 3e-4, batch_size: int = 128,
             buffer_size: int = 200_000, gamma: float = 0.99, tau: float = 0.005,
             gradient_steps: int = 32, learning_starts: int | None = None,
             net_arch: Sequence[int] = (128, 128), ent_coef: str | float = "auto_0.1",
             target_entropy: str | float = "auto", use_sde: bool = False,
             log_std_init: float = -3.0, device: str = "cpu"):
    """SB3 SAC on ``env`` wrapped in DummyVecEnv + VecNormalize (observations only).

    Trains once per episode (``train_freq=(1, "episode")``) with ``gradient_steps`` updates;
    ``learning_starts`` defaults to one episode of uniform random actions.  ``use_sde``
    explores with generalised state-dependent noise drawn once per episode (``log_std_init``
    its initial scale): within an episode, tensors with similar features are pushed the same
    way, which suits allocations better than independent per-step noise.
    Returns ``(model, vec_env)``.
    """
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    vec = VecNormalize(DummyVecEnv([lambda: env]), norm_obs=True, norm_reward=False,
                       clip_obs=10.0, gamma=gamma)
    vec.seed(seed)
    n = max(t.n for t in env.tasks)
    policy_kwargs: dict[str, Any] = {"net_arch": list(net_arch)}
    if use_sde:
        policy_kwargs["log_std_init"] = float(log_std_init)
    model = sac_class()(
        "MlpPolicy", vec, learning_rate=learning_rate, buffer_size=buffer_size,
        learning_starts=n if learning_starts is None else int(learning_starts),
        batch_size=batch_size, tau=tau, gamma=gamma, train_freq=(1, "episode"),
        gradient_steps=int(gradient_steps), ent_coef=ent_coef, target_entropy=target_entropy,
        use_sde=bool(use_sde), sde_sample_freq=-1, use_sde_at_warmup=bool(use_sde),
        policy_kwargs=policy_kwargs, seed=seed, device=device, verbose=0,
    )
    return model, vec


def seed_episode(model, env: BitAllocEnv, index: np.ndarray, *,
                 options: dict | None = None) -> dict:
    """Play the episode that chooses candidate ``index`` in a copy of ``env`` and add its
    transitions (raw observations, as SB3 stores them under VecNormalize) to the replay
    buffer.  Returns the final info."""
    play = env.spawn()
    obs, _ = play.reset(options=options)
    actions = play.index_to_actions(index)
    info: dict = {}
    for a in actions:
        act = np.array([a], dtype=np.float32)
        nxt, r, done, _, info = play.step(act)
        model.replay_buffer.add(obs[None], nxt[None], act[None], np.array([r], dtype=np.float32),
                                np.array([done]), [{}])
        obs = nxt
    return info


def deterministic_index(model, vec, env: BitAllocEnv, *,
                        options: dict | None = None) -> tuple[np.ndarray, dict]:
    """Run the deterministic policy for one episode of ``env``; (projected index, final info)."""
    obs, _ = env.reset(options=options)
    done, info = False, {}
    while not done:
        act, _ = model.predict(vec.normalize_obs(obs[None]), deterministic=True)
        obs, _, done, _, info = env.step(act[0])
    return info["index"], info


def _candidates(best: Allocation, best_m, best_alloc: Allocation, counter: CountingEvaluator,
                warm: Allocation) -> list[tuple[Allocation, Any]]:
    """The selection candidates: the best (with the result's meta), the next best, and the
    warm start wherever it ranks."""
    top = [c for c in counter.top(TOP_CANDIDATES) if c[0] is not best_alloc]
    out = [(best, best_m)] + top[: TOP_CANDIDATES - 1]
    if all(a.key != warm.key for a, _ in out):
        out.append((warm, counter.cache[warm.key]))
    return out


@dataclass(frozen=True)
class SACConfig:
    """Hyperparameters of the :class:`SACAgent`.

    :param pretrain_episodes: episodes on the proxy reward (free) before measured KLD
    :param gradient_steps: SAC updates per episode
    :param batch_size: SAC minibatch size
    :param learning_rate: Adam learning rate of actor and critics
    :param gamma: discount factor
    :param net_arch: hidden layer sizes of actor and critics
    :param ent_coef: entropy coefficient (``"auto_<init>"`` learns it)
    :param target_entropy: SAC's target entropy (``"auto"``: minus the action dimension)
    :param use_sde: explore with gSDE noise
    :param log_std_init: initial log standard deviation of the gSDE noise
    :param order: tensor order of an episode, ``"model"`` or ``"sensitivity"``
    :param action: action mapping of the env: ``"absolute"`` (RAMP's), ``"residual"`` or
        ``"sensitivity"`` (proxy-error gains solved by the equal-slope allocation)
    :param span: candidate steps a residual action may move
    :param gain_range: bound of the sensitivity action's log-gain
    :param cliff: penalty for exceeding the budget before projection
    :param unused: penalty per unit of budget left unused
    :param shaping: weight of the per-step proxy shaping reward
    :param projection: ``"shift"`` or ``"proxy"`` (see :class:`~autobits.envs.BitAllocEnv`)
    :param feature_norm: feature normalisation of the env
    :param policy: a saved policy file to start from instead of pretraining
    :param max_episode_factor: episodes allowed per evaluation (repeated allocations are free)
    :param keep_proxy_buffer: keep the proxy transitions when switching to measured KLD
    :param finetune_gradient_steps: updates per episode on measured KLD (None: ``gradient_steps``)
    :param log_every: log every N evaluations (and every new best)
    :param device: torch device of the networks
    """

    pretrain_episodes: int = 40
    gradient_steps: int = 32
    batch_size: int = 128
    learning_rate: float = 3e-4
    gamma: float = 0.99
    net_arch: tuple[int, ...] = (128, 128)
    ent_coef: str | float = "auto_0.1"
    target_entropy: str | float = "auto"
    use_sde: bool = True
    log_std_init: float = -3.0
    order: str = "model"
    action: str = "sensitivity"
    span: int = 2
    gain_range: float = 4.0
    cliff: float = 2.0
    unused: float = 0.5
    shaping: float = 0.0
    projection: str = "shift"
    feature_norm: str = "none"
    policy: str | Path | None = None
    max_episode_factor: int = 4
    keep_proxy_buffer: bool = False
    finetune_gradient_steps: int | None = 64
    log_every: int = 10
    device: str = "cpu"

    def __post_init__(self) -> None:
        object.__setattr__(self, "net_arch", tuple(int(n) for n in self.net_arch))
        for name in ("pretrain_episodes",):
            if getattr(self, name) < 0:
                raise AgentConfigError(f"{name} must be >= 0, got {name}={getattr(self, name)}")
        for name in ("gradient_steps", "batch_size", "max_episode_factor", "log_every"):
            if getattr(self, name) < 1:
                raise AgentConfigError(f"{name} must be at least 1, got {name}={getattr(self, name)}")
        if self.finetune_gradient_steps is not None and self.finetune_gradient_steps < 1:
            raise AgentConfigError(
                f"finetune_gradient_steps must be at least 1 or None, got "
                f"finetune_gradient_steps={self.finetune_gradient_steps}"
            )
        if not self.learning_rate > 0:
            raise AgentConfigError(f"learning_rate must be positive, got learning_rate={self.learning_rate}")
        if not 0 <= self.gamma <= 1:
            raise AgentConfigError(f"gamma must be in [0, 1], got gamma={self.gamma}")
        if not self.net_arch or min(self.net_arch) < 1:
            raise AgentConfigError(f"net_arch must be positive layer sizes, got net_arch={self.net_arch}")
        if self.order not in ("model", "sensitivity"):
            raise AgentConfigError(f"order must be 'model' or 'sensitivity', got order={self.order!r}")
        if self.action not in ("absolute", "residual", "sensitivity"):
            raise AgentConfigError(
                f"action must be 'absolute', 'residual' or 'sensitivity', got action={self.action!r}"
            )
        if self.projection not in ("shift", "proxy"):
            raise AgentConfigError(f"projection must be 'shift' or 'proxy', got projection={self.projection!r}")


@register_agent("sac", config=SACConfig)
class SACAgent:
    """SAC search over :class:`~autobits.envs.BitAllocEnv` (see the module docstring),
    configured by a :class:`SACConfig`."""

    name = "sac"
    batched = False  # one environment, one evaluation per episode

    def __init__(self, config: SACConfig | None = None):
        c = SACConfig() if config is None else config
        self.config = c
        self.sac_kw = {"gradient_steps": c.gradient_steps, "batch_size": c.batch_size,
                       "learning_rate": c.learning_rate, "gamma": c.gamma,
                       "net_arch": tuple(c.net_arch), "ent_coef": c.ent_coef,
                       "target_entropy": c.target_entropy, "use_sde": c.use_sde,
                       "log_std_init": c.log_std_init, "device": c.device}
        self.env_kw = {"order": c.order, "action": c.action, "span": c.span,
                       "gain_range": c.gain_range, "cliff": c.cliff, "unused": c.unused,
                       "shaping": c.shaping, "projection": c.projection,
                       "feature_norm": c.feature_norm}
        self.pretrain_episodes = int(c.pretrain_episodes)
        self.keep_proxy_buffer = bool(c.keep_proxy_buffer)
        self.finetune_gradient_steps = c.finetune_gradient_steps
        self.policy = c.policy
        self.max_episode_factor = int(c.max_episode_factor)
        self.log_every = int(c.log_every)

    def search(self, problem: SearchProblem, *, evals: int, seed: int, out_dir: Path | None = None,
               resume: bool = False) -> SearchResult:
        if evals < 2:
            raise AgentError(
                f"sac needs at least 2 evaluations (greedy + policy), got evals={evals}"
            )
        t_start = time.perf_counter()
        table, limit = problem.table, int(problem.limit_bytes)
        counter = CountingEvaluator(problem.evaluate, limit_bytes=limit, total=evals,
                                    log_every=self.log_every)
        task = AllocTask(table, problem.features, evaluate=counter)
        env_kw = dict(self.env_kw)
        init = self.policy
        if resume and out_dir is not None and (Path(out_dir) / "sac_policy.zip").is_file():
            init = Path(out_dir) / "sac_policy.zip"
        saved = None
        if init is not None:
            from autobits.agents.policy import load_policy

            saved = load_policy(init)
            saved.check(task)
            env_kw = {**env_kw, **{k: v for k, v in saved.config["env"].items() if k in env_kw}}
        env = BitAllocEnv(tasks=[task], limit_bytes=limit, reward_mode="proxy", **env_kw)
        env.reset(seed=seed)

        # 1. the warm start: greedy (or the given warm start), evaluated first
        warm = problem.warm_start
        warm_index = task.index_of(warm.tensors) if warm is not None else env._greedy_index
        greedy_alloc = table.allocation(task.choice(warm_index), meta={"method": "greedy"})
        greedy_kld = counter(greedy_alloc).kld
        if warm is not None and greedy_alloc.bytes > limit:
            raise AgentError(f"warm start needs {greedy_alloc.bytes} bytes, over the limit {limit}")
        env.set_kld_reference(greedy_kld)
        log.info("sac: %s, %d tensors, limit %d bytes (%.4f bpw), greedy kld %.6f, %d evaluations",
                 table.model, task.n, limit, limit * 8 / table.params, greedy_kld, evals)

        if saved is not None:
            model, vec = saved.attach(env, seed=seed)
        else:
            model, vec = make_sac(env, seed=seed, **self.sac_kw)
        stats: dict[str, Any] = {"pretrain_seconds": 0.0, "episodes": 0, "over_budget": 0}

        recent: list[float] = []

        def on_episode(info: dict) -> None:
            stats["episodes"] += 1
            stats["over_budget"] += bool(info.get("over_budget"))
            recent.append(float(info.get("quality", np.nan)) - float(info.get("penalty", 0.0)))
            if stats["episodes"] % 25 == 0:
                log.info("sac: %d KLD episodes, %d/%d evaluations used (%d repeats), mean reward "
                         "of the last 25 %.4f (0 = greedy), %.0fs", stats["episodes"],
                         counter.used, evals, counter.calls - counter.used,
                         float(np.nanmean(recent[-25:])), time.perf_counter() - t_start)

        # 2. proxy pretraining (free)
        pre = self.pretrain_episodes if saved is None else 0
        if pre > 0:
            t0 = time.perf_counter()
            seed_episode(model, env, warm_index)
            model.learn(total_timesteps=pre * task.n, callback=StopCallback(episodes=pre),
                        reset_num_timesteps=True)
            stats["pretrain_seconds"] = time.perf_counter() - t0
            p_index, p_info = deterministic_index(model, vec, env.spawn())
            ratio = p_info["proxy_error"] / max(p_info["greedy_proxy_error"], 1e-30)
            stats["pretrain_proxy_ratio"] = ratio
            log.info("sac: proxy pretraining %d episodes in %.0fs; deterministic policy proxy "
                     "error %.4fx greedy", pre, stats["pretrain_seconds"], ratio)

        # 3. fine-tune on measured KLD until evals - 1 are spent; the proxy transitions leave
        #    the replay buffer (their reward is another quantity), the networks keep what
        #    they learned
        env.set_reward_mode("kld")
        if not self.keep_proxy_buffer:
            model.replay_buffer.reset()
        seed_episode(model, env, warm_index)
        model._last_obs = vec.reset()  # a fresh episode in KLD mode
        model._last_original_obs = vec.get_original_obs()
        if self.finetune_gradient_steps is not None:
            model.gradient_steps = int(self.finetune_gradient_steps)
        budget_left = lambda: counter.used >= evals - 1  # noqa: E731
        max_episodes = max(1, self.max_episode_factor * evals)
        t0 = time.perf_counter()
        if not budget_left():
            model.learn(total_timesteps=max_episodes * task.n,
                        callback=StopCallback(episodes=max_episodes, should_stop=budget_left,
                                              on_episode=on_episode),
                        reset_num_timesteps=False)
        stats["finetune_seconds"] = time.perf_counter() - t0

        # 4. the deterministic policy
        env.set_reward_mode("kld")
        d_index, d_info = deterministic_index(model, vec, env.spawn())
        stats["deterministic_kld"] = d_info["kld"]
        stats["deterministic_bpw"] = d_info["bpw"]
        if out_dir is not None:
            from autobits.agents.policy import save_policy

            path = save_policy(Path(out_dir) / "sac_policy.zip", model=model, vec=vec, env=env,
                               meta={"trained_on": [table.model], "limit_bytes": limit,
                                     "evals": counter.used, "seed": seed})
            stats["policy"] = str(path)

        best_alloc, best_m = counter.best
        meta = {"method": "sac", "limit_bytes": limit,
                "limit_bpw": round(limit * 8 / table.params, 6), "calib_kld": best_m.kld}
        best = table.allocation(best_alloc.tensors, meta=meta)
        seconds = time.perf_counter() - t_start
        log.info("sac: best kld %.6f at %.4f bpw (greedy %.6f) after %d evaluations, "
                 "%d episodes, %.0fs", best_m.kld, best.bpw, greedy_kld, counter.used,
                 stats["episodes"], seconds)
        return SearchResult(
            agent="sac", best=best, best_metrics=best_m, history=list(counter.history),
            meta={"greedy_kld": greedy_kld, "seconds": seconds, "seed": seed,
                  "evaluate_calls": counter.calls, "pretrain_episodes": pre,
                  "options": {**{k: (list(v) if isinstance(v, tuple) else v)
                                 for k, v in self.sac_kw.items()}, **env_kw,
                              "policy": None if init is None else str(init)},
                  **stats},
            candidates=_candidates(best, best_m, best_alloc, counter, greedy_alloc),
        )
