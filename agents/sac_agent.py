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

With ``out_dir``, step 3 writes a checkpoint every ``checkpoint_every`` episodes
(:data:`CHECKPOINT_FILE`: safetensors tensors -- networks, optimiser moments, the replay
buffer, observation statistics, torch/NumPy RNG states -- and a JSON manifest in its
metadata: counters, the other RNG states, every evaluation so far, the best allocations,
the search's settings); ``resume=True`` continues from it, and a resumed run reaches the
allocation the uninterrupted run with the same seed would have.  Without ``resume`` an
existing checkpoint is an error unless ``force=True``.  The trained policy is saved as
:data:`POLICY_FILE` (see :mod:`autobits.agents.policy`).

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

import dataclasses
import json
from dataclasses import dataclass
import logging
import random
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from autobits.agents.base import TOP_CANDIDATES, Evaluation, SearchProblem, SearchResult
from autobits.agents.base import AgentConfigError, AgentError, register_agent
from autobits.agents.base import metrics_from_json, problem_fingerprint, search_state_file
from autobits.allocation import Allocation
from autobits.envs import AllocTask, BitAllocEnv
from autobits.errors import AutobitsError
from autobits.io import write_atomic

__all__ = ["SACAgent", "make_sac", "seed_episode", "StopCallback", "CountingEvaluator",
           "deterministic_index", "sac_class", "POLICY_FILE", "CHECKPOINT_FILE"]

log = logging.getLogger(__name__)

#: The trained policy a search leaves in its run folder.
POLICY_FILE = "sac_policy.safetensors"
#: The checkpoint of a search in progress (resume continues from it).
CHECKPOINT_FILE = "sac_checkpoint.safetensors"
_CKPT_KEY = "autobits.sac_checkpoint"
_CKPT_VERSION = 1
_RB_FIELDS = ("observations", "next_observations", "actions", "rewards", "dones", "timeouts")


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

    def state(self) -> dict:
        """Everything measured so far, as JSON (for a checkpoint)."""
        keys = list(self.cache)
        return {
            "calls": self.calls,
            "history": [dataclasses.asdict(e) for e in self.history],
            "cache": [[[list(p) for p in key], m.to_json()] for key, m in self.cache.items()],
            "feasible": [[keys.index(key), {"tensors": dict(a.tensors), "meta": a.meta}]
                         for key, a in self.feasible.items()],
            "best": None if self.best is None else keys.index(self.best[0].key),
        }

    def restore(self, state: dict, table) -> None:
        """Back to a :meth:`state` of a search over ``table``."""
        keys = [tuple(tuple(p) for p in key) for key, _ in state["cache"]]
        self.cache = {k: metrics_from_json(m) for k, (_, m) in zip(keys, state["cache"])}
        self.feasible = {keys[i]: table.allocation(a["tensors"], meta=a["meta"])
                         for i, a in state["feasible"]}
        self.history = [Evaluation(**e) for e in state["history"]]
        self.calls = int(state["calls"])
        b = state["best"]
        self.best = None if b is None else (self.feasible[keys[b]], self.cache[keys[b]])


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
    from stable_baselines3.common.logger import Logger
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
    # SB3's default logger makes a folder /tmp/SB3-<date> per learn() call; nothing here
    # reads its records, so it gets one that writes nowhere
    model.set_logger(Logger(folder=None, output_formats=[]))
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


# ------------------------------------------------------------------ checkpoints
def _optimizers(model) -> dict:
    out = {"actor": model.actor.optimizer, "critic": model.critic.optimizer}
    if getattr(model, "ent_coef_optimizer", None) is not None:
        out["ent_coef"] = model.ent_coef_optimizer
    return out


def save_checkpoint(path: Path, *, model, vec, env: BitAllocEnv, state: dict) -> Path:
    """Write the SAC model, its training state and ``state`` (JSON) atomically to ``path``."""
    import torch
    from safetensors.torch import save

    t = {f"policy.{k}": v.detach().cpu().contiguous() for k, v in model.policy.state_dict().items()}
    if getattr(model, "log_ent_coef", None) is not None:
        t["log_ent_coef"] = model.log_ent_coef.detach().cpu().reshape(-1).contiguous()
    optim = {}
    for name, opt in _optimizers(model).items():
        sd = opt.state_dict()
        plain: dict = {}
        for pid, st in sd["state"].items():
            for k, v in st.items():
                if torch.is_tensor(v):
                    t[f"opt.{name}.{pid}.{k}"] = v.detach().cpu().contiguous()
                else:
                    plain.setdefault(str(pid), {})[k] = v
        optim[name] = {"ids": [int(i) for i in sd["state"]], "plain": plain,
                       "param_groups": sd["param_groups"]}
    rb = model.replay_buffer
    filled = rb.buffer_size if rb.full else rb.pos
    for f in _RB_FIELDS:
        t[f"rb.{f}"] = torch.from_numpy(np.ascontiguousarray(getattr(rb, f)[:filled]))
    t["rng.torch"] = torch.get_rng_state()
    np_name, np_keys, np_pos, np_gauss, np_cached = np.random.get_state()
    t["rng.numpy"] = torch.from_numpy(np_keys.astype(np.int64))
    t["vec.obs_mean"] = torch.from_numpy(np.asarray(vec.obs_rms.mean, dtype=np.float64).copy())
    t["vec.obs_var"] = torch.from_numpy(np.asarray(vec.obs_rms.var, dtype=np.float64).copy())
    t["last_obs"] = torch.from_numpy(np.ascontiguousarray(model._last_obs))
    t["last_original_obs"] = torch.from_numpy(np.ascontiguousarray(model._last_original_obs))
    t["last_episode_starts"] = torch.from_numpy(np.ascontiguousarray(model._last_episode_starts))
    py = random.getstate()
    manifest = {
        "version": _CKPT_VERSION,
        "model": {"num_timesteps": int(model.num_timesteps), "n_updates": int(model._n_updates),
                  "episode_num": int(model._episode_num),
                  "learning_starts": int(model.learning_starts),
                  "gradient_steps": int(model.gradient_steps),
                  "progress_remaining": float(model._current_progress_remaining)},
        "replay": {"pos": int(rb.pos), "full": bool(rb.full)},
        "obs_count": float(vec.obs_rms.count),
        "optim": optim,
        "rng": {"numpy": [np_name, int(np_pos), int(np_gauss), float(np_cached)],
                "python": [py[0], list(py[1]), py[2]],
                "action_space": model.action_space.np_random.bit_generator.state,
                "env": env.np_random.bit_generator.state},
        **state,
    }
    blob = json.dumps(manifest, default=lambda o: o.item() if hasattr(o, "item") else str(o))
    data = save(t, metadata={_CKPT_KEY: blob})
    return write_atomic(Path(path), data)


def load_checkpoint(path: Path) -> tuple[dict, dict]:
    """``(manifest, tensors)`` of a checkpoint written by :func:`save_checkpoint`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(_CKPT_KEY)
        manifest = json.loads(raw) if raw is not None else None
        if not isinstance(manifest, dict) or manifest.get("version") != _CKPT_VERSION:
            raise AutobitsError(f"{str(path)!r} is not an autobits SAC checkpoint of version "
                                f"{_CKPT_VERSION}; delete it or pass --force to start anew")
        return manifest, load_file(str(path))
    except (SafetensorError, OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AutobitsError(f"checkpoint {str(path)!r} is unreadable ({e}); delete it or pass "
                            f"--force to start anew") from None


def restore_checkpoint(manifest: dict, t: dict, *, model, vec, env: BitAllocEnv) -> None:
    """Put ``model``, ``vec`` and ``env`` back in the state :func:`save_checkpoint` saved."""
    import torch

    model.policy.load_state_dict({k[len("policy."):]: v for k, v in t.items()
                                  if k.startswith("policy.")})
    if "log_ent_coef" in t and getattr(model, "log_ent_coef", None) is not None:
        with torch.no_grad():
            model.log_ent_coef.copy_(t["log_ent_coef"].reshape(model.log_ent_coef.shape))
    for name, opt in _optimizers(model).items():
        o = manifest["optim"][name]
        state = {}
        for pid in o["ids"]:
            prefix = f"opt.{name}.{pid}."
            st = {k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)}
            st.update(o["plain"].get(str(pid), {}))
            state[pid] = st
        groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g
                  for g in o["param_groups"]]
        opt.load_state_dict({"state": state, "param_groups": groups})
    rb = model.replay_buffer
    for f in _RB_FIELDS:
        arr = t[f"rb.{f}"].numpy()
        getattr(rb, f)[:len(arr)] = arr
    rb.pos, rb.full = int(manifest["replay"]["pos"]), bool(manifest["replay"]["full"])
    vec.obs_rms.mean = t["vec.obs_mean"].numpy().copy()
    vec.obs_rms.var = t["vec.obs_var"].numpy().copy()
    vec.obs_rms.count = float(manifest["obs_count"])
    model._last_obs = t["last_obs"].numpy().copy()
    model._last_original_obs = t["last_original_obs"].numpy().copy()
    model._last_episode_starts = t["last_episode_starts"].numpy().copy()
    m = manifest["model"]
    model.num_timesteps, model._n_updates = m["num_timesteps"], m["n_updates"]
    model._episode_num, model.learning_starts = m["episode_num"], m["learning_starts"]
    model.gradient_steps = m["gradient_steps"]
    model._current_progress_remaining = m["progress_remaining"]
    rng = manifest["rng"]
    torch.set_rng_state(t["rng.torch"])
    name, pos, gauss, cached = rng["numpy"]
    np.random.set_state((name, t["rng.numpy"].numpy().astype(np.uint32), pos, gauss, cached))
    random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
    model.action_space.np_random.bit_generator.state = rng["action_space"]
    env.np_random.bit_generator.state = rng["env"]


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
    :param checkpoint_every: KLD episodes between checkpoints in the run folder (0: only the
        one at the end of the fine-tuning)
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
    checkpoint_every: int = 10

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
        if self.checkpoint_every < 0:
            raise AgentConfigError(f"checkpoint_every must be >= 0, got checkpoint_every={self.checkpoint_every}")
        if self.projection not in ("shift", "proxy"):
            raise AgentConfigError(f"projection must be 'shift' or 'proxy', got projection={self.projection!r}")


@register_agent("sac", config=SACConfig)
class SACAgent:
    """SAC search over :class:`~autobits.envs.BitAllocEnv` (see the module docstring),
    configured by a :class:`SACConfig`."""

    name = "sac"
    batched = False  # one environment, one evaluation per episode
    min_evals = 2  # the greedy warm start, then at least one policy episode

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
        self.checkpoint_every = int(c.checkpoint_every)

    def search(self, problem: SearchProblem, *, evals: int, seed: int, out_dir: Path | None = None,
               resume: bool = False, force: bool = False) -> SearchResult:
        if evals < self.min_evals:
            raise AgentError(
                f"sac needs at least {self.min_evals} evaluations (greedy + policy), got {evals=}"
            )
        t_start = time.perf_counter()
        ckpt = search_state_file(out_dir, CHECKPOINT_FILE, resume=resume, force=force)
        table, limit = problem.table, int(problem.limit_bytes)
        counter = CountingEvaluator(problem.evaluate, limit_bytes=limit, total=evals,
                                    log_every=self.log_every)
        task = AllocTask(table, problem.features, evaluate=counter)
        env_kw = dict(self.env_kw)
        init = self.policy
        saved = None
        if init is not None:
            from autobits.agents.policy import load_policy

            saved = load_policy(init)
            saved.check(task)
            env_kw = {**env_kw, **{k: v for k, v in saved.config["env"].items() if k in env_kw}}
        settings = {"seed": int(seed), "limit_bytes": limit,
                    "problem": problem_fingerprint(table, limit),
                    "warm_start": None if problem.warm_start is None else
                    [list(p) for p in problem.warm_start.key],
                    "sac": {k: (list(v) if isinstance(v, tuple) else v)
                            for k, v in self.sac_kw.items()},
                    "env": env_kw, "pretrain_episodes": self.pretrain_episodes,
                    "keep_proxy_buffer": self.keep_proxy_buffer,
                    "finetune_gradient_steps": self.finetune_gradient_steps,
                    "max_episode_factor": self.max_episode_factor,
                    "checkpoint_every": self.checkpoint_every,
                    "policy": None if init is None else str(init)}
        restored = None
        if resume and ckpt is not None and ckpt.exists():
            restored = load_checkpoint(ckpt)
            old = restored[0]["settings"]
            diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
            if diff:
                raise AutobitsError(f"cannot resume {str(ckpt)!r}: its search differs in {diff} "
                                    f"(checkpoint value, requested value)")
            counter.restore(restored[0]["counter"], table)
            log.info("sac: resuming from %s: %d of %d evaluations done", ckpt, counter.used, evals)
        env = BitAllocEnv(tasks=[task], limit_bytes=limit, reward_mode="proxy", **env_kw)
        env.reset(seed=seed)

        # 1. the warm start: greedy (or the given warm start), evaluated first
        warm = problem.warm_start
        warm_index = task.index_of(warm.tensors) if warm is not None else env._greedy_index
        greedy_alloc = table.allocation(task.choice(warm_index), meta={"method": "greedy"})
        if restored is None:
            greedy_kld = counter(greedy_alloc).kld
        else:
            greedy_kld = counter.cache[greedy_alloc.key].kld
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
        if restored is not None:
            stats.update(restored[0]["stats"])
            recent.extend(restored[0]["recent"])

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
        if pre > 0 and restored is None:
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
        if restored is None:
            if not self.keep_proxy_buffer:
                model.replay_buffer.reset()
            seed_episode(model, env, warm_index)
            model._last_obs = vec.reset()  # a fresh episode in KLD mode
            model._last_original_obs = vec.get_original_obs()
            if self.finetune_gradient_steps is not None:
                model.gradient_steps = int(self.finetune_gradient_steps)
        else:
            vec.reset()  # the env at a fresh episode, as at the checkpoint
            restore_checkpoint(*restored, model=model, vec=vec, env=env)
        budget_left = lambda: counter.used >= evals - 1  # noqa: E731
        max_episodes = max(1, self.max_episode_factor * evals)
        chunk = self.checkpoint_every if ckpt is not None and self.checkpoint_every else max_episodes
        t0 = time.perf_counter() - stats.get("finetune_seconds", 0.0)

        def checkpoint() -> None:
            stats["finetune_seconds"] = time.perf_counter() - t0
            save_checkpoint(ckpt, model=model, vec=vec, env=env, state={
                "settings": settings, "counter": counter.state(), "stats": stats,
                "recent": recent})

        # learn in chunks of `chunk` episodes (an episode is task.n steps), checkpointing
        # between them: the state there is complete (trained, RNGs, a fresh episode)
        while not budget_left() and stats["episodes"] < max_episodes:
            n = min(chunk, max_episodes - stats["episodes"])
            model.learn(total_timesteps=n * task.n,
                        callback=StopCallback(should_stop=budget_left, on_episode=on_episode),
                        reset_num_timesteps=False)
            if ckpt is not None and not budget_left():
                checkpoint()
        stats["finetune_seconds"] = time.perf_counter() - t0
        if ckpt is not None:
            checkpoint()

        # 4. the deterministic policy
        env.set_reward_mode("kld")
        d_index, d_info = deterministic_index(model, vec, env.spawn())
        stats["deterministic_kld"] = d_info["kld"]
        stats["deterministic_bpw"] = d_info["bpw"]
        if out_dir is not None:
            from autobits.agents.policy import save_policy

            path = save_policy(Path(out_dir) / POLICY_FILE, model=model, vec=vec, env=env,
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
