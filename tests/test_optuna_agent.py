"""The optuna agent on synthetic candidate tables (fast), and one short run on the tiny model."""

from __future__ import annotations

import dataclasses
import hashlib
import logging

import numpy as np
import pytest

from autobits.agents import (
    AGENTS,
    AgentConfigError,
    AgentError,
    OptunaConfig,
    SearchProblem,
    make_agent,
)
from autobits.agents.optuna_agent import JOURNAL, OptunaAgent, tensor_groups
from autobits.solvers.projection import project
from autobits.candidates import Candidate, CandidateTable
from autobits.errors import AutobitsError
from autobits.evaluate import Metrics
from autobits.formats import get_format
from autobits.solvers import solve
from autobits.solvers.problem import pack
from autobits.specs import TensorSpec

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


def small_specs(n_layers=4, d=64, ffn=256, vocab=512):
    """A llama-like model: ffn_down rows (256) fit K-quants, the others only 32-blocks."""
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
                q(p + "ffn_gate.weight", (ffn, d), "ffn_gate", i),
                q(p + "ffn_up.weight", (ffn, d), "ffn_up", i),
                q(p + "ffn_down.weight", (d, ffn), "ffn_down", i)]
    return out


def synthetic_table(specs, *, seed=0):
    rng = np.random.default_rng(seed)
    opts = {}
    for s in specs:
        if not s.quantizable:
            continue
        w = rng.lognormal(0.0, 1.0) * s.numel
        cands = []
        for f in s.valid_formats():
            bpw = get_format(f).bits_per_weight
            e = 0.0 if f == "F16" else w * 2.0 ** (-2 * bpw) * rng.uniform(0.8, 1.2)
            cands.append(Candidate(f, s.nbytes(f), float(e)))
        opts[s.name] = tuple(sorted(cands, key=lambda c: -c.bytes))
    return CandidateTable("synthetic", tuple(specs), opts)


class SyntheticKLD:
    """KLD = proxy error re-weighted per tensor (a miscalibrated proxy) + deterministic noise.

    Counts its calls and remembers what it evaluated; raises after ``fail_after`` calls.
    """

    def __init__(self, table, *, seed=0, fail_after=None):
        rng = np.random.default_rng(seed + 100)
        self.err = {t: {c.fmt: c.error for c in table.options[t]} for t in table.tensors}
        self.w = {t: float(np.exp(rng.normal(0, 1.0))) for t in table.tensors}
        self.calls, self.seen, self.fail_after = 0, [], fail_after

    def __call__(self, alloc):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("interrupted")
        self.calls += 1
        key = tuple(sorted(alloc.tensors.items()))
        self.seen.append(key)
        h = int(hashlib.sha256(repr(key).encode()).hexdigest()[:8], 16)
        kld = sum(self.w[t] * self.err[t][f] for t, f in alloc.tensors.items()) * 1e-3
        kld *= 1 + 0.01 * np.random.default_rng(h).normal()
        return Metrics(kld=kld, ppl=1.0 + kld, top1=1.0, bytes=alloc.bytes, bpw=alloc.bpw,
                       seconds=0.0, tokens=1, windows=1, ref_ppl=1.0)


@pytest.fixture(scope="module")
def table():
    return synthetic_table(small_specs(), seed=1)


def make_problem(table, evaluate, *, bpw=5.0):
    limit = int(bpw * table.params // 8)
    warm = solve("greedy", table, limit_bytes=limit)
    return SearchProblem(table=table, features=None, limit_bytes=limit, evaluate=evaluate,
                         warm_start=warm)


# ----------------------------------------------------------------- unit
def test_registered_and_options():
    assert AGENTS["optuna"].cls is OptunaAgent and AGENTS["optuna"].config is OptunaConfig
    with pytest.raises(AgentConfigError, match="sampler"):
        OptunaAgent(OptunaConfig(sampler="nope"))
    with pytest.raises(AgentConfigError, match="space"):
        OptunaAgent(OptunaConfig(space="nope"))
    with pytest.raises(AgentConfigError, match="bias_range"):
        OptunaAgent(OptunaConfig(bias_range=0))
    with pytest.raises(AgentError, match="evals"):
        OptunaAgent().search(make_problem(synthetic_table(small_specs(n_layers=1)),
                                          lambda a: None), evals=0, seed=0)


def test_tensor_groups(table):
    names, index = tensor_groups(table, depth_buckets=2)
    assert "token_embd" in names and "blk.0-1.ffn_down" in names and "blk.2-3.attn_q" in names
    assert len(names) == 1 + 7 * 2 and index.shape == (len(table.tensors),)
    t = table.tensors.index("blk.3.attn_v.weight")
    assert names[index[t]] == "blk.2-3.attn_v"


def test_project_fits_and_fills(table):
    p = pack(table)
    limit = int(4.5 * table.params // 8)
    top = np.zeros(len(p.names), dtype=np.int64)  # every tensor at its largest candidate
    idx = project(p, top, limit)
    assert p.total_bytes(idx) <= limit
    unfilled = project(p, top, limit, fill=False)
    assert p.total_bytes(unfilled) <= p.total_bytes(idx) <= limit


# ----------------------------------------------------------------- search
@pytest.mark.parametrize("space", ["groups", "offsets", "categorical"])
def test_feasible_and_warm_start_first(table, space):
    ev = SyntheticKLD(table)
    prob = make_problem(table, ev)
    res = OptunaAgent(OptunaConfig(space=space, n_startup=4)).search(prob, evals=12, seed=0)
    assert len(res.history) == 12 == ev.calls
    assert ev.seen[0] == tuple(sorted(prob.warm_start.tensors.items()))  # trial 0 is the greedy
    assert res.meta["warm_kld"] == res.history[0].kld
    assert all(e.feasible and e.bytes <= prob.limit_bytes for e in res.history)
    assert res.best.bytes <= prob.limit_bytes
    assert res.best_metrics.kld == min(e.kld for e in res.history)
    assert len(set(ev.seen)) == len(ev.seen)  # a duplicate is never evaluated twice
    assert len(res.meta["raw_over"]) == 12
    # the returned allocation is the one that scored best (not, e.g., the last or the warm one)
    assert ev(res.best).kld == res.best_metrics.kld
    if space == "groups":
        assert not any(res.meta["raw_over"])  # solved at the budget: never over it


@pytest.mark.parametrize("sampler", ["cmaes", "gp", "random"])
def test_other_samplers(table, sampler):
    ev = SyntheticKLD(table)
    prob = make_problem(table, ev)
    res = OptunaAgent(OptunaConfig(sampler=sampler, n_startup=2)).search(prob, evals=5, seed=0)
    assert len(res.history) == 5 and res.best.bytes <= prob.limit_bytes
    assert ev.seen[0] == tuple(sorted(prob.warm_start.tensors.items()))


def test_batches_through_evaluate_many(table):
    ev = SyntheticKLD(table)
    rounds = []

    def many(allocs):
        rounds.append(len(allocs))
        return [ev(a) for a in allocs]

    prob = dataclasses.replace(make_problem(table, ev), evaluate_many=many)
    res = OptunaAgent(OptunaConfig(batch=3, n_startup=4)).search(prob, evals=10, seed=0)
    assert len(res.history) == 10 == ev.calls and res.meta["batch"] == 3
    assert max(rounds) == 3 and sum(rounds) <= 10  # a round of one goes through evaluate
    assert ev.seen[0] == tuple(sorted(prob.warm_start.tensors.items()))
    assert all(e.bytes <= prob.limit_bytes for e in res.history)


def test_timeout_stops_early_and_resumes(table, tmp_path):
    ev = SyntheticKLD(table)
    res = OptunaAgent(OptunaConfig(timeout=1e-6)).search(make_problem(table, ev), evals=5, seed=0,
                                           out_dir=tmp_path)
    assert len(res.history) == 1 == ev.calls  # the warm start, always
    res = OptunaAgent().search(make_problem(table, ev), evals=5, seed=0, out_dir=tmp_path,
                               resume=True)
    assert len(res.history) == 5 == ev.calls


def test_patience_stops_a_search_with_nothing_new(table):
    """A budget that fits every tensor's largest format leaves one allocation to find."""
    ev = SyntheticKLD(table)
    prob = dataclasses.replace(make_problem(table, ev), limit_bytes=table.max_bytes(),
                               warm_start=None)
    res = OptunaAgent(OptunaConfig(patience=5)).search(prob, evals=20, seed=0)
    assert len(res.history) == 1 == ev.calls and res.meta["trials"] == 6


def test_improves_on_warm_start(table):
    ev = SyntheticKLD(table)
    res = OptunaAgent().search(make_problem(table, ev), evals=30, seed=0)
    assert res.best_metrics.kld < 0.95 * res.history[0].kld


def test_deterministic(table):
    runs = []
    for seed in (3, 3, 4):
        res = OptunaAgent(OptunaConfig(n_startup=4)).search(make_problem(table, SyntheticKLD(table)), evals=15,
                                              seed=seed)
        runs.append(([e.kld for e in res.history], res.best.tensors))
    assert runs[0] == runs[1]
    assert runs[0][0] != runs[2][0]


@pytest.mark.parametrize("k", [3, 7])  # interrupted among the startup trials, and after them
def test_resume_interrupted(table, tmp_path, caplog, k):
    evals = 14
    full = OptunaAgent(OptunaConfig(n_startup=4)).search(make_problem(table, SyntheticKLD(table)), evals=evals,
                                           seed=1, out_dir=tmp_path / "full")
    first = SyntheticKLD(table, fail_after=k)
    with pytest.raises(KeyboardInterrupt):
        OptunaAgent(OptunaConfig(n_startup=4)).search(make_problem(table, first), evals=evals, seed=1,
                                        out_dir=tmp_path / "run")
    assert first.calls == k and (tmp_path / "run" / JOURNAL).is_file()
    second = SyntheticKLD(table)
    with caplog.at_level(logging.INFO, logger="autobits.agents.optuna_agent"):
        res = OptunaAgent(OptunaConfig(n_startup=4)).search(make_problem(table, second), evals=evals, seed=1,
                                              out_dir=tmp_path / "run", resume=True)
    assert f"resuming: {k} of {evals}" in caplog.text
    assert second.calls == evals - k and len(res.history) == evals
    assert not set(first.seen) & set(second.seen)  # finished trials are not evaluated again
    # a resumed TPE search proposes what the uninterrupted one did
    assert [e.kld for e in res.history] == [e.kld for e in full.history]
    assert res.best.tensors == full.best.tensors
    # resuming a finished search evaluates nothing; asking for more continues it
    again = SyntheticKLD(table)
    res2 = OptunaAgent(OptunaConfig(n_startup=4)).search(make_problem(table, again), evals=evals + 3, seed=1,
                                           out_dir=tmp_path / "run", resume=True)
    assert again.calls == 3 and len(res2.history) == evals + 3


def test_resume_refuses_other_settings(table, tmp_path):
    OptunaAgent().search(make_problem(table, SyntheticKLD(table)), evals=3, seed=0, out_dir=tmp_path)
    with pytest.raises(AgentError, match="cannot resume.*space"):
        OptunaAgent(OptunaConfig(space="offsets")).search(make_problem(table, SyntheticKLD(table)), evals=3,
                                            seed=0, out_dir=tmp_path, resume=True)
    with pytest.raises(AgentError, match="out_dir"):
        OptunaAgent().search(make_problem(table, SyntheticKLD(table)), evals=3, seed=0, resume=True)
    # without resume an existing journal is kept: refused unless force=True replaces it
    before = (tmp_path / JOURNAL).read_bytes()
    ev = SyntheticKLD(table)
    with pytest.raises(AutobitsError, match=r"optuna\.journal.*--resume.*--force"):
        OptunaAgent(OptunaConfig(space="offsets")).search(make_problem(table, ev), evals=3, seed=0,
                                            out_dir=tmp_path)
    assert ev.calls == 0 and (tmp_path / JOURNAL).read_bytes() == before
    res = OptunaAgent(OptunaConfig(space="offsets")).search(make_problem(table, ev), evals=3, seed=0,
                                              out_dir=tmp_path, force=True)
    assert ev.calls == 3 and len(res.history) == 3 and res.meta["space"] == "offsets"


# ----------------------------------------------------------------- real model
def test_tiny_model_search(tiny_lm, tmp_path):
    """A short search on the tiny llama with a real Evaluator (weight-MSE proxy errors)."""
    from autobits.evaluate import Evaluator, WeightCache

    cache = WeightCache(tiny_lm)
    opts = {}
    for s in tiny_lm.quantizable:
        ref = tiny_lm.reference_weight(s.name).float()
        cands = [Candidate(f, s.nbytes(f), float(((cache.get(s.name, f) - ref) ** 2).sum()))
                 for f in s.valid_formats(("F16", "Q8_0", "Q5_0", "Q4_0", "Q6_K", "Q4_K"))]
        opts[s.name] = tuple(sorted(cands, key=lambda c: -c.bytes))
    table = CandidateTable(tiny_lm.name, tiny_lm.specs, opts)
    windows = np.random.default_rng(0).integers(0, 1000, size=(2, 32))
    ev = Evaluator(tiny_lm, windows, cache=cache)
    # the embedding is 96% of this model: at 5.6 bpw it drops to a 5-bit format and the
    # block tensors trade bits among themselves
    limit = int(5.6 * table.params // 8)
    prob = SearchProblem(table=table, features=None, limit_bytes=limit, evaluate=ev.evaluate)
    res = make_agent("optuna", OptunaConfig(space="offsets", n_startup=3)).search(prob, evals=6, seed=0,
                                                                out_dir=tmp_path)
    assert len(res.history) == 6 and res.best.bytes <= limit
    assert res.best_metrics.kld == min(e.kld for e in res.history) > 0
    assert ev.evaluate(res.best).kld == pytest.approx(res.best_metrics.kld, rel=1e-5)
    assert res.best.tensors == table.allocation(res.best.tensors).tensors
    assert (tmp_path / JOURNAL).is_file()
