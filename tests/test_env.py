"""BitAllocEnv on synthetic candidate/feature tables: env checkers, determinism, projection,
penalties, reward modes, registration, input errors."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import gymnasium
import numpy as np
import pytest

from autobits.candidates import Candidate, CandidateTable
from autobits.envs import ENV_ID, AllocTask, BitAllocEnv, FeatureSpecError
from autobits.errors import AutobitsError, BudgetError
from autobits.evaluate import Metrics
from autobits.formats import get_format
from autobits.solvers import solve
from autobits.specs import TensorSpec

# ----------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class FakeFeatures:
    """The FeatureTable fields the env reads."""

    model: str
    names: tuple
    feature_names: tuple
    values: np.ndarray
    version: int = 1


def llama_specs(n_layers=3, d=64, ffn=256, vocab=512):
    """A small llama: rows of 64 fit only 32-blocks, ffn_down's 256 rows fit the K-quants."""
    q = lambda name, shape, role, blk: TensorSpec(name, shape, role, blk, quantizable=True)  # noqa: E731
    out = [q("token_embd.weight", (vocab, d), "token_embd", None),
           TensorSpec("output_norm.weight", (d,), "norm", None)]
    for i in range(n_layers):
        p = f"blk.{i}."
        out += [TensorSpec(p + "attn_norm.weight", (d,), "norm", i),
                q(p + "attn_q.weight", (d, d), "attn_q", i),
                q(p + "attn_k.weight", (d // 2, d), "attn_k", i),
                q(p + "attn_v.weight", (d // 2, d), "attn_v", i),
                q(p + "attn_output.weight", (d, d), "attn_output", i),
                TensorSpec(p + "ffn_norm.weight", (d,), "norm", i),
                q(p + "ffn_gate.weight", (ffn, d), "ffn_gate", i),
                q(p + "ffn_up.weight", (ffn, d), "ffn_up", i),
                q(p + "ffn_down.weight", (d, ffn), "ffn_down", i)]
    return out


def synthetic_table(specs, *, seed=0, model="synthetic", formats=None):
    rng = np.random.default_rng(seed)
    opts = {}
    for s in specs:
        if not s.quantizable:
            continue
        w = rng.lognormal(0.0, 1.0) * s.numel
        cands = []
        for f in s.valid_formats(*(() if formats is None else (tuple(formats),))):
            bpw = get_format(f).bits_per_weight
            e = 0.0 if f in ("F16", "BF16") else w * 2.0 ** (-2 * bpw) * rng.uniform(0.8, 1.2)
            cands.append(Candidate(f, s.nbytes(f), float(e)))
        opts[s.name] = tuple(sorted(cands, key=lambda c: -c.bytes))
    return CandidateTable(model, tuple(specs), opts)


ROLES = ("token_embd", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def synthetic_features(table, *, version=1, names=None):
    """depth + role one-hot per tensor."""
    rows = []
    for s in table.specs:
        if s.quantizable:
            rows.append([0.0 if s.block is None else s.block / 4] + [float(s.role == r) for r in ROLES])
    return FakeFeatures(table.model, table.tensors, tuple(names or ("depth",) + ROLES),
                        np.array(rows, dtype=np.float32), version)


def problem(n_layers=3, *, seed=0, bpw=5.25, model="synthetic"):
    table = synthetic_table(llama_specs(n_layers), seed=seed, model=model)
    return table, synthetic_features(table), int(bpw * table.params // 8)


def fake_evaluate(table, *, weights=None, calls=None):
    """A deterministic stand-in for the evaluator: proxy error re-weighted per tensor."""
    weights = weights or {}

    def evaluate(alloc):
        if calls is not None:
            calls.append(alloc)
        err = sum(weights.get(n, 1.0) * c.error for n in table.tensors for c in table.options[n]
                  if c.fmt == alloc.tensors[n])
        return Metrics(kld=err * 1e-5, ppl=1.0, top1=1.0, bytes=alloc.bytes, bpw=alloc.bpw,
                       seconds=0.0, tokens=0, windows=0, ref_ppl=1.0)

    return evaluate


def rollout(env, actions, **reset_kw):
    obs, info = env.reset(**reset_kw)
    trace = [(obs, 0.0, info)]
    for a in actions:
        obs, r, term, trunc, info = env.step(np.array([a], dtype=np.float32))
        trace.append((obs, r, info))
        if term or trunc:
            break
    return trace


# ------------------------------------------------------------------------------- tests


def test_gymnasium_check_env():
    from gymnasium.utils.env_checker import check_env

    table, feats, limit = problem()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no render modes / no spec" notices
        check_env(BitAllocEnv(table, feats, limit_bytes=limit), skip_render_check=True)


def test_sb3_check_env():
    from stable_baselines3.common.env_checker import check_env

    table, feats, limit = problem()
    check_env(BitAllocEnv(table, feats, limit_bytes=limit), warn=True)


def test_registered_with_gymnasium():
    table, feats, limit = problem()
    env = gymnasium.make(ENV_ID, table=table, features=feats, limit_bytes=limit)
    obs, info = env.reset(seed=0)
    assert env.spec.id == ENV_ID
    assert env.observation_space.contains(obs)
    assert info["limit_bytes"] == limit


def test_observation_layout_and_bounds():
    table, feats, limit = problem()
    env = BitAllocEnv(table, feats, limit_bytes=limit)
    assert len(env.obs_names) == env.observation_space.shape[0] == len(feats.feature_names) + 12
    assert env.obs_names[0] == "feature:depth"
    rng = np.random.default_rng(0)
    trace = rollout(env, rng.uniform(-1, 1, 100), seed=0)
    assert len(trace) == len(table.tensors) + 1  # one step per tensor
    for obs, _, _ in trace:
        assert env.observation_space.contains(obs)
    progress = [o[env.obs_names.index("progress")] for o, _, _ in trace[:-1]]
    assert progress == sorted(progress) and progress[0] == 0


@pytest.mark.parametrize("action", ["absolute", "residual", "sensitivity"])
def test_same_seed_same_rollout(action):
    t1, f1, _ = problem(seed=1)
    t2, f2, _ = problem(2, seed=2, model="other")
    make = lambda: BitAllocEnv(tasks=[AllocTask(t1, f1), AllocTask(t2, f2)],  # noqa: E731
                               bpw_range=(4.6, 6.0), action=action)
    acts = np.random.default_rng(5).uniform(-1, 1, 64)
    a, b = rollout(make(), acts, seed=3), rollout(make(), acts, seed=3)
    assert len(a) == len(b)
    for (oa, ra, ia), (ob, rb, ib) in zip(a, b):
        np.testing.assert_array_equal(oa, ob)
        assert ra == rb
        assert ia.get("allocation") == ib.get("allocation")
    limits = {rollout(make(), acts[:1], seed=s)[0][2]["limit_bytes"] for s in range(8)}
    assert len(limits) > 1  # the budget is drawn from the seed


@pytest.mark.parametrize("projection", ["shift", "proxy"])
@pytest.mark.parametrize("action", ["absolute", "residual", "sensitivity"])
def test_projection_always_feasible(projection, action):
    table, feats, _ = problem()
    rng = np.random.default_rng(0)
    n = len(table.tensors)
    for bpw in (table.min_bytes() * 8 / table.params + 0.01, 4.5, 5.25, 7.0):
        limit = int(bpw * table.params // 8)
        env = BitAllocEnv(table, feats, limit_bytes=limit, projection=projection, action=action)
        for acts in (np.ones(n), -np.ones(n), rng.uniform(-1, 1, n), rng.choice([-1.0, 1.0], n)):
            info = rollout(env, acts, seed=0)[-1][2]
            assert info["bytes"] <= limit
            assert table.allocation(info["allocation"]).bytes == info["bytes"]
            # fill-up: no single upgrade of any tensor still fits
            left = limit - info["bytes"]
            for t in table.tensors:
                cur = table._get(t, info["allocation"][t])
                assert not any(c.bytes - cur.bytes <= left and c.error < cur.error and c.bytes > cur.bytes
                               for c in table.options[t])


def test_cliff_and_unused_penalties():
    table, feats, limit = problem()
    n = len(table.tensors)
    env = BitAllocEnv(table, feats, limit_bytes=limit, cliff=3.0, unused=0.5)
    over = rollout(env, np.ones(n), seed=0)
    r, info = over[-1][1], over[-1][2]
    assert info["over_budget"] and info["raw_bytes"] > limit and info["penalty"] == 3.0
    assert r == pytest.approx(info["quality"] - 3.0)
    under = rollout(env, -np.ones(n), seed=0)
    r, info = under[-1][1], under[-1][2]
    assert not info["over_budget"]
    expect = 0.5 * (limit - info["raw_bytes"]) / (limit - table.min_bytes())
    assert info["raw_bytes"] == table.min_bytes()  # every tensor at its smallest format
    assert info["penalty"] == pytest.approx(expect) == pytest.approx(0.5)
    assert r == pytest.approx(info["quality"] - expect)


@pytest.mark.parametrize("action", ["absolute", "residual", "sensitivity"])
def test_greedy_actions_reproduce_greedy(action):
    table, feats, limit = problem()
    env = BitAllocEnv(table, feats, limit_bytes=limit, action=action)
    env.reset(seed=0)
    acts = env.index_to_actions(env._greedy_index)
    info = rollout(env, acts, seed=0)[-1][2]
    assert info["allocation"] == solve("greedy", table, limit_bytes=limit).tensors
    assert info["quality"] == pytest.approx(0.0, abs=1e-9)
    assert not info["over_budget"]


def test_kld_reward_measures_projected_allocation_once_per_budget():
    table, feats, limit = problem()
    calls = []
    env = BitAllocEnv(table, feats, limit_bytes=limit, evaluate=fake_evaluate(table, calls=calls))
    assert env.reward_mode == "kld"
    acts = np.random.default_rng(1).uniform(-1, 1, len(table.tensors))
    info = rollout(env, acts, seed=0)[-1][2]
    assert len(calls) == 2  # the greedy reference, then the episode
    ref = fake_evaluate(table)(table.allocation(env.task.choice(env._greedy_index))).kld
    assert info["kld"] == pytest.approx(fake_evaluate(table)(table.allocation(info["allocation"])).kld)
    assert info["quality"] == pytest.approx(-math.log((info["kld"] + 1e-6) / (ref + 1e-6)))
    rollout(env, acts, seed=0)
    assert len(calls) == 3  # the reference is measured once per budget
    env.set_reward_mode("proxy")
    rollout(env, acts, seed=0)
    assert len(calls) == 3  # proxy mode measures nothing


def test_shaping_rewards_each_step():
    table, feats, limit = problem()
    env = BitAllocEnv(table, feats, limit_bytes=limit, shaping=1.0)
    trace = rollout(env, np.ones(len(table.tensors)), seed=0)
    assert all(r <= 0 for _, r, _ in trace[1:-1]) and any(r < 0 for _, r, _ in trace[1:-1])


def test_sensitivity_order_visits_every_tensor_once():
    table, feats, limit = problem()
    env = BitAllocEnv(table, feats, limit_bytes=limit, order="sensitivity")
    env.reset(seed=0)
    assert sorted(env.step_order) == list(range(len(table.tensors)))
    assert list(env.step_order) != list(range(len(table.tensors)))


def test_input_errors_state_the_numbers():
    table, feats, limit = problem()
    with pytest.raises(BudgetError, match="feasible range"):
        BitAllocEnv(table, feats, limit_bytes=table.min_bytes() - 1)
    with pytest.raises(BudgetError, match="misses the feasible range"):
        BitAllocEnv(table, feats, bpw_range=(40.0, 50.0))
    with pytest.raises(BudgetError):
        BitAllocEnv(table, feats, limit_bytes=limit, bpw_range=(4, 5))
    shuffled = FakeFeatures(feats.model, feats.names[::-1], feats.feature_names, feats.values)
    with pytest.raises(FeatureSpecError, match="first difference at row 0"):
        BitAllocEnv(table, shuffled, limit_bytes=limit)
    bad = feats.values.copy()
    bad[2, 1] = np.nan
    with pytest.raises(FeatureSpecError, match="1 non-finite"):
        BitAllocEnv(table, FakeFeatures(feats.model, feats.names, feats.feature_names, bad),
                    limit_bytes=limit)
    other = synthetic_features(table, version=2)
    with pytest.raises(FeatureSpecError, match="share one feature spec") as e:
        BitAllocEnv(tasks=[AllocTask(table, feats), AllocTask(table, other)], bpw_range=(5, 6))
    assert isinstance(e.value, AutobitsError)
    with pytest.raises(ValueError, match="needs an evaluate"):
        BitAllocEnv(table, feats, limit_bytes=limit, reward_mode="kld")
