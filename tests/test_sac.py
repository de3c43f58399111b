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


def test_short_sac_run_is_feasible_and_returns_its_best(tmp_path):
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
    assert res.best_metrics.kld == min(e.kld for e in res.history)
    # the returned allocation is the one that scored best (not, e.g., the last one)
    assert fake_evaluate(table, weights=weights)(res.best).kld == res.best_metrics.kld
    assert res.best_so_far()[-1] == res.best_metrics.kld
    assert res.meta["pretrain_episodes"] == 8 and res.meta["episodes"] >= 1
    assert (tmp_path / "sac_policy.safetensors").is_file() and (tmp_path / "sac_checkpoint.safetensors").is_file()


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


class _Interrupt(Exception):
    """Stands for a killed run: raised from inside the evaluation."""


def test_interrupted_sac_resumes_to_the_uninterrupted_result(tmp_path):
    from autobits.agents.sac_agent import CHECKPOINT_FILE, load_checkpoint
    from autobits.errors import AutobitsError

    table, feats, limit = problem(seed=2)
    weights = {n: 4.0 for n in table.tensors if ".attn_v" in n}

    def make(evaluate):
        return SearchProblem(table=table, features=feats, limit_bytes=limit, evaluate=evaluate)

    opts = dict(pretrain_episodes=4, checkpoint_every=2, **TINY)
    evals = 10
    full = make_agent("sac", SACConfig(**opts)).search(make(fake_evaluate(table, weights=weights)), evals=evals,
                                        seed=3, out_dir=tmp_path / "full")
    # the fine-tuning spent the budget (the deterministic policy's allocation may be a repeat)
    assert len(full.history) >= evals - 1

    run = tmp_path / "run"
    seen: list = []
    base = fake_evaluate(table, weights=weights)

    def killed_after_7(alloc):
        if len(seen) >= 7:
            raise _Interrupt
        seen.append(alloc.key)
        return base(alloc)

    with pytest.raises(_Interrupt):
        make_agent("sac", SACConfig(**opts)).search(make(killed_after_7), evals=evals, seed=3, out_dir=run)
    manifest, _ = load_checkpoint(run / CHECKPOINT_FILE)
    done = len(manifest["counter"]["history"])
    assert 1 < done <= 7  # a checkpoint from the middle of the fine-tuning
    with pytest.raises(AutobitsError, match=r"sac_checkpoint.*--resume.*--force"):
        make_agent("sac", SACConfig(**opts)).search(make(base), evals=evals, seed=3, out_dir=run)
    with pytest.raises(AutobitsError, match="cannot resume.*seed"):
        make_agent("sac", SACConfig(**opts)).search(make(base), evals=evals, seed=4, out_dir=run, resume=True)

    again: list = []
    resumed = make_agent("sac", SACConfig(**opts)).search(make(fake_evaluate(table, weights=weights, calls=again)),
                                           evals=evals, seed=3, out_dir=run, resume=True)
    assert resumed.best.tensors == full.best.tensors
    assert [e.kld for e in resumed.history] == [e.kld for e in full.history]
    assert [(e.bytes, e.feasible) for e in resumed.history] == [(e.bytes, e.feasible) for e in full.history]
    assert resumed.meta["deterministic_kld"] == full.meta["deterministic_kld"]
    assert resumed.meta["episodes"] == full.meta["episodes"]
    assert len(again) == len(full.history) - done  # what the checkpoint held is not measured again
    assert [a.tensors for a, _ in resumed.candidates] == [a.tensors for a, _ in full.candidates]
