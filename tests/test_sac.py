"""The ``sac`` agent: short runs on a synthetic problem and on the tiny model's real evaluator."""

from __future__ import annotations

import numpy as np
import pytest

from autobits.agents import AGENTS, AgentError, SACConfig, SearchProblem, make_agent
from autobits.solvers import solve

from test_env import fake_evaluate, problem, synthetic_features

TINY = {"net_arch": (32, 32), "batch_size": 32, "gradient_steps": 4, "log_every": 1}


def test_sac_is_registered():
    assert "sac" in AGENTS
    assert AGENTS["sac"].cls.name == "sac" and AGENTS["sac"].config is SACConfig


def test_short_sac_run_is_feasible_and_never_worse_than_greedy(tmp_path):
    table, feats, limit = problem()
    weights = {n: 4.0 for n in table.tensors if ".attn_v" in n}  # the proxy misjudges attn_v
    prob = SearchProblem(table=table, features=feats, limit_bytes=limit,
                         evaluate=fake_evaluate(table, weights=weights))
    res = make_agent("sac", SACConfig(pretrain_episodes=8, **TINY)).search(prob, evals=6, seed=0, out_dir=tmp_path)
    greedy = solve("greedy", table, limit_bytes=limit)
    assert res.agent == "sac"
    assert res.best.bytes <= limit and res.best.model == table.model
    assert 2 <= len(res.history) <= 6
    assert [e.index for e in res.history] == list(range(len(res.history)))
    assert res.history[0].kld == pytest.approx(fake_evaluate(table, weights=weights)(greedy).kld)
    assert all(e.feasible and e.bytes <= limit for e in res.history)
    assert res.best_metrics.kld == min(e.kld for e in res.history) <= res.history[0].kld
    assert res.best_so_far()[-1] == res.best_metrics.kld
    assert res.meta["pretrain_episodes"] == 8 and res.meta["episodes"] >= 1
    assert (tmp_path / "sac_policy.zip").is_file()


def test_sac_with_warm_start_and_residual_actions():
    table, feats, limit = problem(seed=3)
    warm = solve("uniform", table, limit_bytes=limit)
    prob = SearchProblem(table=table, features=feats, limit_bytes=limit,
                         evaluate=fake_evaluate(table), warm_start=warm)
    res = make_agent("sac", SACConfig(pretrain_episodes=2, action="residual", **TINY)).search(prob, evals=4, seed=1)
    assert res.history[0].bytes == warm.bytes  # the warm start is evaluated first
    assert res.best.bytes <= limit


def test_sac_rejects_too_few_evaluations():
    table, feats, limit = problem()
    prob = SearchProblem(table=table, features=feats, limit_bytes=limit, evaluate=fake_evaluate(table))
    with pytest.raises(AgentError, match="evals=1"):
        make_agent("sac").search(prob, evals=1, seed=0)


def test_sac_on_tiny_model_with_real_evaluator(tiny_lm):
    """Real KLD on the tiny llama: exact candidate bytes, synthetic proxy errors."""
    from autobits.candidates import Candidate, CandidateTable
    from autobits.evaluate import Evaluator

    formats = ("Q8_0", "Q5_0", "Q4_0")
    rng = np.random.default_rng(0)
    opts = {}
    for s in tiny_lm.quantizable:
        w = rng.lognormal() * s.numel
        opts[s.name] = tuple(
            Candidate(f, s.nbytes(f), float(w * 2.0 ** (-2 * b)))
            for f, b in ((f, {"Q8_0": 8.5, "Q5_0": 5.5, "Q4_0": 4.5}[f]) for f in formats)
            if s.fits(f)
        )
    table = CandidateTable("tiny", tiny_lm.specs, opts)
    feats = synthetic_features(table)
    windows = rng.integers(0, len(tiny_lm.tokenizer), size=(1, 24))
    ev = Evaluator(tiny_lm, windows)
    limit = int(5.5 * table.params // 8)
    prob = SearchProblem(table=table, features=feats, limit_bytes=limit, evaluate=ev.evaluate)
    res = make_agent("sac", SACConfig(pretrain_episodes=2, **TINY)).search(prob, evals=3, seed=0)
    assert res.best.bytes <= limit
    assert np.isfinite(res.best_metrics.kld) and res.best_metrics.kld >= 0
    assert res.best_metrics.windows == 1


def test_sac_sensitivity_actions_with_gsde():
    table, feats, limit = problem(seed=5)
    prob = SearchProblem(table=table, features=feats, limit_bytes=limit, evaluate=fake_evaluate(table))
    res = make_agent("sac", SACConfig(pretrain_episodes=2, action="sensitivity", use_sde=True,
                        finetune_gradient_steps=8, **TINY)).search(prob, evals=4, seed=0)
    assert res.best.bytes <= limit
    assert res.meta["over_budget"] == 0  # the corrected greedy allocation always fits
    assert res.meta["options"]["use_sde"] and res.meta["options"]["action"] == "sensitivity"
