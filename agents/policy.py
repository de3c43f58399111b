"""Saved SAC policies: train across models and budgets, allocate for an unseen model.

A policy is one ``.safetensors`` file (:data:`POLICY_FORMAT_VERSION` 2), so that it can be
downloaded and shared without trusting its author: loading it runs nothing from the file.

* tensors: ``policy.<name>`` -- the state dict of the stable-baselines3 SAC policy (actor,
  critics, target critics), ``log_ent_coef`` -- the learned entropy coefficient (when it
  was learned), ``obs_rms.mean`` / ``obs_rms.var`` -- the observation normalisation
  (VecNormalize running mean and variance, float64);
* metadata key ``autobits.policy``: one JSON manifest -- ``format``; ``architecture``
  (algorithm, net_arch, activation, gSDE, critics, observation and action shapes and
  bounds), from which the SB3 policy is built before the tensors are loaded into it;
  ``sac`` (the hyper-parameters that continue its training); ``obs_count``, ``clip_obs``,
  ``epsilon``; the feature spec it was trained on (``FEATURE_SPEC_VERSION`` and feature
  names), the observation column names, the storage formats it has seen in their size order
  (the action maps onto a tensor's valid formats by size), the env options (tensor order,
  action mode, penalties); ``versions`` (autobits, stable-baselines3, torch) and ``meta``
  (what it was trained on).

Format-1 policies were zips holding a pickled SB3 model (``SAC.load`` unpickles it, which
can run arbitrary code): :func:`load_policy` refuses them with :class:`PolicyError` unless
``trust_pickle=True`` (CLI ``--trust-pickle``), which converts one in memory;
:func:`convert_policy` writes the converted file.

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
from autobits.io import write_atomic
from autobits.specs import DEFAULT_CANDIDATES

__all__ = ["POLICY_FORMAT_VERSION", "PolicyError", "PolicySpecError", "SavedPolicy",
           "save_policy", "load_policy", "convert_policy", "train_policy"]

log = logging.getLogger(__name__)

POLICY_FORMAT_VERSION = 2
#: safetensors metadata key of the JSON manifest.
MANIFEST_KEY = "autobits.policy"
#: Activation functions a manifest may name (looked up in ``torch.nn``; nothing else is).
ACTIVATIONS = ("ReLU", "Tanh", "ELU", "LeakyReLU", "SiLU", "GELU")
_ZIP_MAGIC = b"PK\x03\x04"
_V1_MODEL, _V1_META = "sb3_model.zip", "policy.json"
#: Manifest keys and their JSON types (checked before anything is built from it).
_MANIFEST_TYPES = {"format": int, "architecture": dict, "sac": dict, "feature_spec": dict,
                   "obs_names": list, "formats": list, "env": dict, "obs_count": (int, float),
                   "clip_obs": (int, float), "epsilon": (int, float), "meta": dict}
_ARCH_TYPES = {"algorithm": str, "net_arch": (list, dict), "activation": str, "use_sde": bool,
               "log_std_init": (int, float), "n_critics": int, "share_features_extractor": bool,
               "observation_shape": list, "observation_bounds": list, "action_shape": list,
               "action_bounds": list}
_SAC_TYPES = {"learning_rate": (int, float), "batch_size": int, "buffer_size": int,
              "gamma": (int, float), "tau": (int, float), "gradient_steps": int,
              "ent_coef": (str, int, float), "target_entropy": (int, float)}


class PolicyError(AutobitsError):
    """A policy file that is missing, unreadable, not a policy, or a pickled (format 1) one."""


class PolicySpecError(FeatureSpecError):
    """A model whose features or formats a policy was not trained on."""


def _format_order(tasks: Sequence[AllocTask]) -> list[str]:
    seen = {c.fmt for t in tasks for opts in t.table.options.values() for c in opts}
    known = [f for f in DEFAULT_CANDIDATES if f in seen]
    rest = sorted(seen - set(known), key=lambda f: -get_format(f).bits_per_weight)
    return known + rest


def _bounds(space) -> list[float]:
    lo, hi = np.unique(space.low), np.unique(space.high)
    if len(lo) != 1 or len(hi) != 1:
        raise ValueError(f"a policy space must have uniform bounds, got {space}")
    return [float(lo[0]), float(hi[0])]


def _versions() -> dict:
    import stable_baselines3
    import torch

    return {"autobits": __version__, "stable_baselines3": stable_baselines3.__version__,
            "torch": torch.__version__}


def _capture(model) -> tuple[dict, dict, dict]:
    """(tensors, architecture, sac hyper-parameters) of an SB3 SAC model."""
    pol = model.policy
    tensors = {f"policy.{k}": v.detach().cpu().clone().contiguous()
               for k, v in pol.state_dict().items()}
    if getattr(model, "log_ent_coef", None) is not None:
        tensors["log_ent_coef"] = model.log_ent_coef.detach().cpu().clone().reshape(-1)
    net_arch = pol.net_arch
    arch = {
        "algorithm": "SAC",
        "net_arch": dict(net_arch) if isinstance(net_arch, dict) else [int(x) for x in net_arch],
        "activation": pol.activation_fn.__name__,
        "use_sde": bool(pol.actor_kwargs.get("use_sde", False)),
        "log_std_init": float(pol.actor_kwargs.get("log_std_init", -3.0)),
        "n_critics": int(pol.critic_kwargs.get("n_critics", 2)),
        "share_features_extractor": bool(pol.share_features_extractor),
        "observation_shape": [int(x) for x in pol.observation_space.shape],
        "observation_bounds": _bounds(pol.observation_space),
        "action_shape": [int(x) for x in pol.action_space.shape],
        "action_bounds": _bounds(pol.action_space),
    }
    lr = model.learning_rate if not callable(model.learning_rate) else model.lr_schedule(1.0)
    ent = model.ent_coef if isinstance(model.ent_coef, str) else float(model.ent_coef)
    sac = {"learning_rate": float(lr), "batch_size": int(model.batch_size),
           "buffer_size": int(model.buffer_size), "gamma": float(model.gamma),
           "tau": float(model.tau), "gradient_steps": int(model.gradient_steps),
           "ent_coef": ent, "target_entropy": float(model.target_entropy)}
    return tensors, arch, sac


def _check_types(d: dict, types: dict, where: str) -> None:
    for key, typ in types.items():
        if key not in d:
            raise PolicyError(f"{where} lacks {key!r}")
        if not isinstance(d[key], typ) or (typ is int and isinstance(d[key], bool)):
            raise PolicyError(f"{where}: {key!r} is {type(d[key]).__name__}, expected "
                              f"{getattr(typ, '__name__', ' or '.join(t.__name__ for t in typ))}")


def build_sac_policy(arch: dict, *, learning_rate: float = 3e-4, where: str = "policy"):
    """The SB3 ``SACPolicy`` a manifest's ``architecture`` describes (random weights)."""
    import gymnasium as gym
    import torch
    from stable_baselines3.sac.policies import SACPolicy

    _check_types(arch, _ARCH_TYPES, f"{where} architecture")
    if arch["algorithm"] != "SAC":
        raise PolicyError(f"{where}: algorithm {arch['algorithm']!r}, expected 'SAC'")
    if arch["activation"] not in ACTIVATIONS:
        raise PolicyError(f"{where}: activation {arch['activation']!r}, expected one of "
                          f"{', '.join(ACTIVATIONS)}")

    def box(shape, bounds, what):
        ok = (all(isinstance(x, int) and 0 < x <= 1 << 16 for x in shape) and len(shape) == 1
              and len(bounds) == 2 and all(isinstance(b, (int, float)) for b in bounds)
              and bounds[0] < bounds[1])
        if not ok:
            raise PolicyError(f"{where}: {what} shape {shape} / bounds {bounds}, expected one "
                              f"positive dimension and two increasing bounds")
        return gym.spaces.Box(float(bounds[0]), float(bounds[1]), tuple(shape), np.float32)

    net_arch = arch["net_arch"]
    layers = net_arch if isinstance(net_arch, list) else [x for v in net_arch.values() for x in v]
    if not all(isinstance(x, int) and 0 < x <= 1 << 14 for x in layers):
        raise PolicyError(f"{where}: net_arch {net_arch!r}, expected positive layer widths")
    return SACPolicy(
        box(arch["observation_shape"], arch["observation_bounds"], "observation"),
        box(arch["action_shape"], arch["action_bounds"], "action"),
        lambda _: float(learning_rate), net_arch=net_arch,
        activation_fn=getattr(torch.nn, arch["activation"]), use_sde=arch["use_sde"],
        log_std_init=float(arch["log_std_init"]), n_critics=arch["n_critics"],
        share_features_extractor=arch["share_features_extractor"],
    )


@dataclass
class SavedPolicy:
    """A trained policy in memory: network tensors, observation statistics, spec, options."""

    tensors: dict  # name -> torch.Tensor ("policy.*", optionally "log_ent_coef")
    obs_mean: np.ndarray
    obs_var: np.ndarray
    obs_count: float
    config: dict  # the manifest without obs_count and meta
    meta: dict = field(default_factory=dict)
    path: Path | None = None
    _net: Any = field(default=None, repr=False)

    # ----------------------------------------------------------------- build
    @classmethod
    def from_model(cls, *, model, vec, env: BitAllocEnv, meta: dict | None = None) -> "SavedPolicy":
        rms = vec.obs_rms
        config = {
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
        return cls._of_sb3(model, config, rms.mean, rms.var, rms.count, meta)

    @classmethod
    def _of_sb3(cls, model, config: dict, mean, var, count, meta: dict) -> "SavedPolicy":
        tensors, arch, sac = _capture(model)
        config = {"format": POLICY_FORMAT_VERSION, "architecture": arch, "sac": sac, **config,
                  "versions": _versions()}
        return cls(tensors, np.asarray(mean, dtype=np.float64).copy(),
                   np.asarray(var, dtype=np.float64).copy(), float(count), config, dict(meta))

    def to_bytes(self) -> bytes:
        """The policy file's bytes (safetensors with the manifest in its metadata)."""
        import torch
        from safetensors.torch import save

        manifest = {**self.config, "obs_count": self.obs_count, "meta": self.meta}
        tensors = {**self.tensors, "obs_rms.mean": torch.from_numpy(self.obs_mean.copy()),
                   "obs_rms.var": torch.from_numpy(self.obs_var.copy())}
        return save(tensors, metadata={MANIFEST_KEY: json.dumps(manifest)})

    def save(self, path: str | os.PathLike) -> Path:
        """Write the policy file atomically (temporary name beside ``path``, then rename)."""
        path = Path(path)
        if path.suffix == ".zip":
            log.warning("%s: policies are safetensors files now; the name ends in .zip", path)
        data = self.to_bytes()
        write_atomic(path, data)
        self.path = path
        return path

    # ------------------------------------------------------------------ use
    @property
    def feature_spec(self) -> dict:
        return self.config["feature_spec"]

    @property
    def where(self) -> str:
        return f"policy {str(self.path) if self.path else '(in memory)'}"

    def network(self):
        """The SB3 ``SACPolicy`` (built from the manifest, weights loaded once, on CPU)."""
        if self._net is None:
            net = build_sac_policy(self.config["architecture"],
                                   learning_rate=self.config["sac"].get("learning_rate", 3e-4),
                                   where=self.where)
            self._load_into(net)
            net.set_training_mode(False)
            self._net = net
        return self._net

    def _load_into(self, net) -> None:
        state = {k[len("policy."):]: v for k, v in self.tensors.items() if k.startswith("policy.")}
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            raise PolicyError(f"{self.where}: its weights do not match the architecture of "
                              f"its manifest ({' '.join(first[:2])[:300]})") from None

    def check(self, task: AllocTask) -> None:
        """Raise :class:`PolicySpecError` unless ``task`` matches the policy's training."""
        want, got = self.feature_spec, task.spec
        where = self.where
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
        net = self.network()
        obs, _ = env.reset(seed=0)
        done, info = False, {}
        while not done:
            act, _ = net.predict(self.normalize(obs)[None], deterministic=True)
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
        """Continue training this policy on ``env``: ``(model, vec_env)`` with its statistics
        (a new SB3 SAC with the saved hyper-parameters, its networks and entropy coefficient
        loaded; optimiser moments start afresh)."""
        import torch

        from autobits.agents.sac_agent import make_sac

        arch = self.config["architecture"]
        if arch["activation"] != "ReLU" or arch["n_critics"] != 2:
            raise PolicyError(f"{self.where}: only ReLU policies with 2 critics can be trained "
                              f"further, it has {arch['activation']} with {arch['n_critics']}")
        sac = dict(self.config["sac"])
        model, vec = make_sac(env, seed=seed, net_arch=arch["net_arch"], use_sde=arch["use_sde"],
                              log_std_init=arch["log_std_init"], **sac)
        vec.clip_obs, vec.epsilon = self.config["clip_obs"], self.config["epsilon"]
        vec.obs_rms.mean = self.obs_mean.copy()
        vec.obs_rms.var = self.obs_var.copy()
        vec.obs_rms.count = self.obs_count
        self._load_into(model.policy)
        if "log_ent_coef" in self.tensors and model.log_ent_coef is not None:
            with torch.no_grad():
                model.log_ent_coef.copy_(self.tensors["log_ent_coef"].reshape(model.log_ent_coef.shape))
        model.learning_starts = 0
        return model, vec


def save_policy(path: str | os.PathLike, *, model, vec, env: BitAllocEnv,
                meta: dict | None = None) -> Path:
    """Save an SB3 SAC model, its VecNormalize statistics and ``env``'s spec as a policy file."""
    return SavedPolicy.from_model(model=model, vec=vec, env=env, meta=meta).save(path)


def _pickle_refusal(p: Path) -> PolicyError:
    return PolicyError(
        f"policy file {str(p)!r} is a format-1 zip policy, whose pickled SB3 model can run "
        f"arbitrary code when loaded: refused; if you trust its source, convert it once with "
        f"--trust-pickle (autobits.agents.policy.convert_policy(src, dst, trust_pickle=True)) "
        f"and use the .safetensors file it writes"
    )


def load_policy(path: str | os.PathLike, *, trust_pickle: bool = False) -> SavedPolicy:
    """Read a policy file written by :func:`save_policy` (else :class:`PolicyError`).

    Nothing in the file is executed: the manifest is JSON, the tensors are safetensors.  A
    format-1 zip policy (pickled) is refused unless ``trust_pickle`` (then it is unpickled by
    stable-baselines3 and converted in memory: only for files from a source you trust).
    """
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if not p.is_file():
        raise PolicyError(f"policy file {str(p)!r} does not exist")
    try:
        with p.open("rb") as fh:
            head = fh.read(4)
    except OSError as e:
        raise PolicyError(f"policy file {str(p)!r} is unreadable: {e}") from None
    if head == _ZIP_MAGIC:
        if not trust_pickle:
            raise _pickle_refusal(p)
        return _convert_v1(p)
    where = f"policy file {str(p)!r}"
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            raw = (f.metadata() or {}).get(MANIFEST_KEY)
            if raw is None:
                raise PolicyError(f"{where} is not an autobits policy: its safetensors metadata "
                                  f"has no {MANIFEST_KEY!r} manifest")
            manifest = json.loads(raw)
            if not isinstance(manifest, dict):
                raise PolicyError(f"{where}: its manifest is not a JSON object")
            version = manifest.get("format")
            if version != POLICY_FORMAT_VERSION:
                raise PolicyError(f"{where} has format {version!r}, this autobits reads format "
                                  f"{POLICY_FORMAT_VERSION}")
            _check_types(manifest, _MANIFEST_TYPES, where)
            _check_types(manifest["sac"], _SAC_TYPES, f"{where} sac")
            extra = sorted(set(manifest["sac"]) - set(_SAC_TYPES))
            sac = manifest["sac"]
            if extra or not (0 < sac["buffer_size"] <= 10**7 and 0 < sac["batch_size"] <= 1 << 16
                             and 0 < sac["gradient_steps"] <= 1 << 16):
                raise PolicyError(f"{where}: sac settings {sac}, expected {sorted(_SAC_TYPES)} "
                                  f"with buffer_size <= 10**7, batch_size and gradient_steps "
                                  f"<= 65536")
            keys = set(f.keys())
            bad = sorted(k for k in keys if not (k.startswith("policy.") or k in
                                                  ("log_ent_coef", "obs_rms.mean", "obs_rms.var")))
            if bad or not {"obs_rms.mean", "obs_rms.var"} <= keys:
                raise PolicyError(f"{where}: tensors {sorted(keys)[:6]}, expected policy.*, "
                                  f"log_ent_coef, obs_rms.mean and obs_rms.var")
            tensors = {k: f.get_tensor(k) for k in sorted(keys)}
    except (SafetensorError, OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PolicyError(f"{where} is unreadable: {str(e).splitlines()[0] if str(e) else e}") from None
    mean = tensors.pop("obs_rms.mean").double().numpy()
    var = tensors.pop("obs_rms.var").double().numpy()
    n_obs = len(manifest["obs_names"])
    if mean.shape != (n_obs,) or var.shape != (n_obs,):
        raise PolicyError(f"{where}: observation statistics of shape {tuple(mean.shape)}, "
                          f"expected ({n_obs},) like its obs_names")
    count = float(manifest.pop("obs_count"))
    meta = manifest.pop("meta")
    return SavedPolicy(tensors, mean, var, count, manifest, meta, path=p)


def _convert_v1(p: Path) -> SavedPolicy:
    """A format-1 zip policy converted in memory (unpickles it: trusted files only)."""
    from stable_baselines3 import SAC

    log.warning("unpickling the format-1 policy %s (trust_pickle): only do this for files "
                "from a source you trust", p)
    try:
        with zipfile.ZipFile(p) as z:
            names = set(z.namelist())
            if not {_V1_MODEL, _V1_META} <= names:
                raise PolicyError(
                    f"{str(p)!r} is not an autobits policy: it holds {sorted(names)[:5]}, "
                    f"expected {_V1_META} and {_V1_MODEL}"
                )
            payload = json.loads(z.read(_V1_META))
            model_bytes = z.read(_V1_MODEL)
    except (zipfile.BadZipFile, OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PolicyError(f"policy file {str(p)!r} is unreadable: {e}") from None
    if payload.get("format") != 1 or not isinstance(payload.get("obs_rms"), dict):
        raise PolicyError(f"policy file {str(p)!r} is not a format-1 policy with obs_rms")
    model = SAC.load(io.BytesIO(model_bytes), device="cpu")
    config = {k: payload[k] for k in ("feature_spec", "obs_names", "formats", "env",
                                      "clip_obs", "epsilon")}
    rms = payload["obs_rms"]
    policy = SavedPolicy._of_sb3(model, config, rms["mean"], rms["var"], rms["count"],
                                 {**payload.get("meta", {}), "converted_from": str(p)})
    policy.path = p
    return policy


def convert_policy(src: str | os.PathLike, dst: str | os.PathLike, *,
                   trust_pickle: bool = False) -> Path:
    """Convert a format-1 zip policy ``src`` into a safetensors policy file ``dst``.

    Unpickling ``src`` can run code from it: ``trust_pickle=True`` says you trust its source.
    """
    if not trust_pickle:
        raise _pickle_refusal(Path(src))
    return load_policy(src, trust_pickle=True).save(dst)


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
