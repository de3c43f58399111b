"""Saved SAC policies: train across models and budgets, allocate for an unseen model.

A policy file is a zip holding everything a zero-shot allocation needs:

* ``sb3_model.zip`` -- the stable-baselines3 SAC model (networks, hyper-parameters);
* ``policy.json`` -- ``format`` (:data:`POLICY_FORMAT_VERSION`), the observation
  normalisation (VecNormalize running mean / variance / count, ``clip_obs``, ``epsilon``),
  the feature spec it was trained on (``FEATURE_SPEC_VERSION`` and feature names), the
  observation column names, the storage formats it has seen in their size order (the
  action maps onto a tensor's valid formats by size), the env options (tensor order, action
  mode, penalties) and what it was trained on.

:meth:`SavedPolicy.allocate` computes no KLD: one deterministic episode over the model's
features, then the budget projection.  A model whose features follow another spec, or
whose candidates include formats the policy never saw, is refused with
:class:`PolicySpecError` (an :class:`~autobits.errors.AutobitsError`: exit code 2).
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from autobits import __version__
from autobits.allocation import Allocation
from autobits.envs import AllocTask, BitAllocEnv, FeatureSpecError
from autobits.errors import AutobitsError
from autobits.formats import get_format
from autobits.specs import DEFAULT_CANDIDATES

__all__ = ["POLICY_FORMAT_VERSION", "PolicyError", "PolicySpecError", "SavedPolicy",
           "save_policy", "load_policy", "train_policy"]

log = logging.getLogger(__name__)

POLICY_FORMAT_VERSION = 1
_MODEL = "sb3_model.zip"
_META = "policy.json"


class PolicyError(AutobitsError):
    """A policy file that is missing, unreadable or not a policy."""


class PolicySpecError(FeatureSpecError):
    """A model whose features or formats a policy was not trained on."""


def _format_order(tasks: Sequence[AllocTask]) -> list[str]:
    seen = {c.fmt for t in tasks for opts in t.table.options.values() for c in opts}
    known = [f for f in DEFAULT_CANDIDATES if f in seen]
    rest = sorted(seen - set(known), key=lambda f: -get_format(f).bits_per_weight)
    return known + rest


@dataclass
class SavedPolicy:
    """A trained policy in memory: SB3 model bytes, observation statistics, spec, options."""

    model_bytes: bytes
    obs_mean: np.ndarray
    obs_var: np.ndarray
    obs_count: float
    config: dict
    meta: dict = field(default_factory=dict)
    path: Path | None = None
    _model: Any = field(default=None, repr=False)

    # ----------------------------------------------------------------- build
    @classmethod
    def from_model(cls, *, model, vec, env: BitAllocEnv, meta: dict | None = None) -> "SavedPolicy":
        buf = io.BytesIO()
        model.save(buf)
        rms = vec.obs_rms
        config = {
            "format": POLICY_FORMAT_VERSION,
            "feature_spec": {"version": env.feature_spec["version"],
                             "names": list(env.feature_spec["names"])},
            "obs_names": list(env.obs_names),
            "formats": _format_order(env.tasks),
            "env": dict(env.config),
            "clip_obs": float(vec.clip_obs),
            "epsilon": float(vec.epsilon),
        }
        meta = {"autobits": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                **(meta or {})}
        return cls(buf.getvalue(), np.asarray(rms.mean, dtype=np.float64),
                   np.asarray(rms.var, dtype=np.float64), float(rms.count), config, meta)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the policy file atomically (temporary name beside ``path``, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        rms = {"mean": self.obs_mean.tolist(), "var": self.obs_var.tolist(),
               "count": self.obs_count}
        payload = {**self.config, "obs_rms": rms, "meta": self.meta}
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
                z.writestr(_META, json.dumps(payload, indent=2))
                z.writestr(_MODEL, self.model_bytes)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.path = path
        return path

    # ------------------------------------------------------------------ use
    @property
    def feature_spec(self) -> dict:
        return self.config["feature_spec"]

    def model(self):
        """The SB3 SAC model (loaded once, on CPU)."""
        if self._model is None:
            from stable_baselines3 import SAC

            self._model = SAC.load(io.BytesIO(self.model_bytes), device="cpu")
        return self._model

    def check(self, task: AllocTask) -> None:
        """Raise :class:`PolicySpecError` unless ``task`` matches the policy's training."""
        want, got = self.feature_spec, task.spec
        where = f"policy {str(self.path) if self.path else '(in memory)'}"
        if want["version"] != got["version"] or list(want["names"]) != list(got["names"]):
            missing = [n for n in want["names"] if n not in got["names"]]
            extra = [n for n in got["names"] if n not in want["names"]]
            raise PolicySpecError(
                f"{where} was trained on feature spec version {want['version']!r} with "
                f"{len(want['names'])} features; model {task.name!r} has features of spec "
                f"version {got['version']!r} with {len(got['names'])} features"
                + (f" (missing {missing[:5]}, extra {extra[:5]})" if missing or extra else "")
                + "; train a new policy with `autobits train-policy` on this feature spec"
            )
        formats = {c.fmt for opts in task.table.options.values() for c in opts}
        unseen = sorted(formats - set(self.config["formats"]))
        if unseen:
            raise PolicySpecError(
                f"{where} was trained on formats {self.config['formats']}; model {task.name!r} "
                f"offers formats it never saw: {unseen}"
            )

    def normalize(self, obs: np.ndarray) -> np.ndarray:
        clip = self.config["clip_obs"]
        z = (obs - self.obs_mean) / np.sqrt(self.obs_var + self.config["epsilon"])
        return np.clip(z, -clip, clip).astype(np.float32)

    def make_env(self, task: AllocTask, *, limit_bytes: int) -> BitAllocEnv:
        self.check(task)
        env = BitAllocEnv(tasks=[task], limit_bytes=limit_bytes, reward_mode="proxy",
                          **self.config["env"])
        if len(env.obs_names) != len(self.obs_mean):
            raise PolicySpecError(
                f"policy observations have {len(self.obs_mean)} columns, the env gives "
                f"{len(env.obs_names)}"
            )
        return env

    def allocate(self, table, features, *, limit_bytes: int) -> Allocation:
        """Zero-shot allocation: one deterministic episode, then the budget projection."""
        t0 = time.perf_counter()
        task = AllocTask(table, features)
        env = self.make_env(task, limit_bytes=limit_bytes)
        model = self.model()
        obs, _ = env.reset(seed=0)
        done, info = False, {}
        while not done:
            act, _ = model.predict(self.normalize(obs)[None], deterministic=True)
            obs, _, done, _, info = env.step(act[0])
        meta = {
            "method": "policy", "policy": str(self.path) if self.path else None,
            "limit_bytes": int(limit_bytes), "limit_bpw": round(limit_bytes * 8 / table.params, 6),
            "raw_bytes": info["raw_bytes"], "over_budget": info["over_budget"],
            "predicted_error": info["proxy_error"],
            "greedy_predicted_error": info["greedy_proxy_error"],
            "trained_on": self.meta.get("trained_on"),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        return table.allocation(info["allocation"], meta=meta)

    def attach(self, env: BitAllocEnv, *, seed: int):
        """Continue training this policy on ``env``: ``(model, vec_env)`` with its statistics."""
        from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

        from autobits.agents.sac_agent import sac_class

        vec = VecNormalize(DummyVecEnv([lambda: env]), norm_obs=True, norm_reward=False,
                           clip_obs=self.config["clip_obs"], epsilon=self.config["epsilon"])
        vec.obs_rms.mean = self.obs_mean.copy()
        vec.obs_rms.var = self.obs_var.copy()
        vec.obs_rms.count = self.obs_count
        vec.seed(seed)
        model = sac_class().load(io.BytesIO(self.model_bytes), env=vec, device="cpu")
        model.set_random_seed(seed)
        model.learning_starts = 0
        return model, vec


def save_policy(path: str | os.PathLike, *, model, vec, env: BitAllocEnv,
                meta: dict | None = None) -> Path:
    """Save an SB3 SAC model, its VecNormalize statistics and ``env``'s spec as a policy file."""
    return SavedPolicy.from_model(model=model, vec=vec, env=env, meta=meta).save(path)


def load_policy(path: str | os.PathLike) -> SavedPolicy:
    """Read a policy file written by :func:`save_policy` (else :class:`PolicyError`)."""
    p = Path(path)
    if not p.is_file():
        raise PolicyError(f"policy file {str(p)!r} does not exist")
    try:
        with zipfile.ZipFile(p) as z:
            names = set(z.namelist())
            if not {_MODEL, _META} <= names:
                raise PolicyError(
                    f"{str(p)!r} is not an autobits policy: it holds {sorted(names)[:5]}, "
                    f"expected {_META} and {_MODEL}"
                )
            payload = json.loads(z.read(_META))
            model_bytes = z.read(_MODEL)
    except (zipfile.BadZipFile, OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PolicyError(f"policy file {str(p)!r} is unreadable: {e}") from None
    version = payload.get("format")
    if version != POLICY_FORMAT_VERSION:
        raise PolicyError(
            f"policy file {str(p)!r} has format {version!r}, this autobits reads format "
            f"{POLICY_FORMAT_VERSION}"
        )
    rms = payload.pop("obs_rms")
    meta = payload.pop("meta", {})
    return SavedPolicy(model_bytes, np.asarray(rms["mean"], dtype=np.float64),
                       np.asarray(rms["var"], dtype=np.float64), float(rms["count"]),
                       payload, meta, path=p)


def train_policy(tasks: Sequence[AllocTask], *, bpw_range: tuple[float, float], steps: int,
                 seed: int = 0, kld_episodes: int = 0, kld_bpw_step: float = 0.25,
                 warm_budgets: int = 3, env_options: dict | None = None,
                 sac_options: dict | None = None, meta: dict | None = None) -> SavedPolicy:
    """Train one policy across ``tasks`` (models) and budgets drawn from ``bpw_range``.

    ``steps`` environment steps on the proxy reward (no evaluation), the replay buffer seeded
    with each model's greedy episode at ``warm_budgets`` budgets across the range; then,
    with ``kld_episodes`` > 0 (every task needs ``evaluate``), that many episodes on the
    measured-KLD reward with budgets on a ``kld_bpw_step`` grid (one greedy reference
    measurement per model and budget).
    """
    from autobits.agents.sac_agent import StopCallback, make_sac, seed_episode

    if steps < 1:
        raise ValueError(f"steps must be positive, got steps={steps}")
    t0 = time.perf_counter()
    env = BitAllocEnv(tasks=list(tasks), bpw_range=bpw_range, reward_mode="proxy",
                      **(env_options or {}))
    env.reset(seed=seed)
    model, vec = make_sac(env, seed=seed, **(sac_options or {}))
    lo, hi = env.bpw_range
    for i, task in enumerate(env.tasks):
        for bpw in np.linspace(lo, hi, max(1, warm_budgets)):
            limit = task.limit_of_bpw(float(bpw))
            seed_episode(model, env, task.greedy(limit)[0],
                         options={"task": i, "limit_bytes": limit})
    quality: list[float] = []

    def on_episode(info: dict) -> None:
        quality.append(float(info.get("quality", np.nan)))
        if len(quality) % 50 == 0:
            log.info("train-policy: %d episodes, mean quality of the last 50 %.4f (0 = greedy)",
                     len(quality), float(np.nanmean(quality[-50:])))

    model.learn(total_timesteps=int(steps), callback=StopCallback(on_episode=on_episode))
    if kld_episodes > 0:
        env.set_reward_mode("kld")
        env.bpw_step = float(kld_bpw_step)
        model._last_obs = vec.reset()
        model._last_original_obs = vec.get_original_obs()
        model.learn(total_timesteps=kld_episodes * max(t.n for t in env.tasks),
                    callback=StopCallback(episodes=kld_episodes, on_episode=on_episode),
                    reset_num_timesteps=False)
    env.set_reward_mode("proxy")
    info = {"trained_on": [t.name for t in env.tasks], "bpw_range": [lo, hi], "steps": int(steps),
            "kld_episodes": int(kld_episodes), "seed": seed, "episodes": len(quality),
            "seconds": round(time.perf_counter() - t0, 1),
            "final_quality": float(np.nanmean(quality[-50:])) if quality else None,
            **(meta or {})}
    return SavedPolicy.from_model(model=model, vec=vec, env=env, meta=info)
