"""The whole search job behind one library call.

    outcome = search(SearchConfig(prepare=PrepareConfig(model="smollm2-135m"),
                                  budget=Budget(target_bpw=4.5), allocator="optuna",
                                  agent=OptunaConfig(sampler="tpe"), evals=300,
                                  out=Path("runs/x"), gguf=True))

does, in order: check every output path and the Ray address before the slow work; load the
model and check the budget; :func:`~autobits.pipeline.prepare` it; allocate with the
:class:`Allocator` named by ``allocator`` (a solver, or an agent warm-started from greedy,
searching on the reward slice, its best answers re-measured on the selection slice); measure
the answer and the other solvers at the same budget on the held-out windows; write
``allocation.json``, ``metrics.json``, ``report.md`` with its plots and, with ``gguf``, the
GGUF file.  The CLI (``autobits search``), the Ray job entrypoint and the benches call it;
nothing else writes this sequence out.
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from autobits.agents import AGENTS, SearchProblem, SearchResult, make_agent
from autobits.agents.base import AgentConfigError
from autobits.agents.selection import select
from autobits.allocation import Allocation, Budget
from autobits.cluster import RayOptions, cluster_evaluate_factory
from autobits.cluster.search import prepare_on_ray
from autobits.errors import AutobitsError
from autobits.evaluate import Metrics
from autobits.io import OutputError, check_output_folder, write_json_atomic
from autobits.pipeline import NUMERICS, PrepareConfig, Prepared, prepare
from autobits.requantize import check_requantize, is_quantized_source, source_record, source_types
from autobits.solvers import SOLVERS, solve

__all__ = ["SearchConfig", "SearchOutcome", "Allocated", "Allocator", "SolverAllocator",
           "AgentAllocator", "allocator_names", "make_allocator", "search", "check_out_dir"]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ allocators
@dataclass
class Allocated:
    """What an allocator answers: the allocation, its reward-slice metrics, and for a search
    agent the search record (history, selection); None for a solver."""

    allocation: Allocation
    reward: Metrics | None
    search: SearchResult | None = None


class Allocator(Protocol):
    """A solver or a search agent: ``allocate(prepared, limit_bytes=...) -> Allocated``."""

    name: str

    def allocate(self, prepared: Prepared, *, limit_bytes: int) -> Allocated: ...


@dataclass(frozen=True)
class SolverAllocator:
    """A non-learned solver (:data:`autobits.solvers.SOLVERS`): one allocation, measured once
    on the reward slice for the report."""

    name: str

    def allocate(self, prepared: Prepared, *, limit_bytes: int) -> Allocated:
        alloc = solve(self.name, prepared.table, limit_bytes=limit_bytes)
        return Allocated(allocation=alloc, reward=prepared.reward(alloc))


@dataclass(frozen=True)
class AgentAllocator:
    """A search agent warm-started from the greedy solver; its best answers are re-measured
    on the selection slice before one is chosen (:func:`~autobits.agents.selection.select`).

    :param name: registered agent name (:data:`autobits.agents.AGENTS`)
    :param config: the agent's config dataclass (None: its defaults)
    :param evals: evaluations on the reward slice
    :param seed: random seed of the search
    :param ray: where the evaluations run (SAC evaluates in this process, one allocation at a
        time; the preparation runs on Ray whatever the agent, see :func:`search`)
    :param out_dir: the run folder (the agent's journal or checkpoints live there)
    :param resume: continue an interrupted search in ``out_dir``
    :param force: replace an earlier search's journal or checkpoint in ``out_dir``
    """

    name: str
    config: Any = None
    evals: int = 300
    seed: int = 0
    ray: RayOptions = field(default_factory=RayOptions)
    out_dir: Path | None = None
    resume: bool = False
    force: bool = False

    def __post_init__(self) -> None:
        if self.name not in AGENTS:
            raise AgentConfigError(f"agent {self.name!r} is not available; built: {sorted(AGENTS)}")
        least = AGENTS[self.name].cls.min_evals
        if self.evals < least:
            raise AgentConfigError(
                f"--agent {self.name} needs --evals of at least {least}, got {self.evals}"
            )
    def allocate(self, prepared: Prepared, *, limit_bytes: int) -> Allocated:
        agent = make_agent(self.name, self.config)
        warm = solve("greedy", prepared.table, limit_bytes=limit_bytes)
        many, close = (cluster_evaluate_factory(prepared, self.ray) if AGENTS[self.name].cls.batched
                       else (None, lambda: None))
        # evaluations in this process start at the first block that differs from greedy's
        reward = prepared.reward_evaluator
        reward.set_incumbent(warm)
        try:
            problem = SearchProblem(table=prepared.table, features=prepared.features,
                                    limit_bytes=limit_bytes, evaluate=prepared.reward,
                                    warm_start=warm, evaluate_many=many)
            result = agent.search(problem, evals=self.evals, seed=self.seed,
                                  out_dir=self.out_dir, resume=self.resume, force=self.force)
        finally:
            close()
            reward.set_incumbent(None)
        done = reward.blocks_run + reward.blocks_reused
        if done:
            log.info("reward evaluations: %.0f%% of the blocks taken from greedy's outputs "
                     "instead of run", 100 * reward.blocks_reused / done)
        if prepared.config.select_windows > 0:
            prepared.select_evaluator.set_incumbent(warm)
            try:
                result = select(result, measure=prepared.select, warm_start=warm)
            finally:
                prepared.select_evaluator.set_incumbent(None)
        return Allocated(allocation=result.best, reward=result.best_metrics, search=result)


def allocator_names() -> tuple[str, ...]:
    """Every name ``allocator=`` accepts: the solvers, then the agents."""
    return tuple(SOLVERS) + tuple(sorted(AGENTS))


def make_allocator(name: str, *, agent: Any = None, evals: int = 300, seed: int = 0,
                   ray: RayOptions | None = None, out_dir: Path | None = None,
                   resume: bool = False, force: bool = False) -> Allocator:
    """The :class:`Allocator` called ``name``; a solver takes no agent config."""
    ray = ray or RayOptions()
    if name in SOLVERS:
        if agent is not None:
            raise AgentConfigError(f"{name!r} is a solver; it takes no agent config")
        return SolverAllocator(name)
    return AgentAllocator(name=name, config=agent, evals=evals, seed=seed, ray=ray,
                          out_dir=out_dir, resume=resume, force=force)


# ------------------------------------------------------------------ the job
@dataclass(frozen=True)
class SearchConfig:
    """One search job.

    :param prepare: how the model is measured (model, text, windows, fold, imatrix)
    :param budget: the size budget (bits per weight or bytes, over the whole file)
    :param allocator: a solver (``uniform``, ``llamacpp``, ``greedy``, ``ilp``) or an agent
        (``optuna``, ``sac``)
    :param agent: the agent's config dataclass (None: its defaults; solvers take none)
    :param evals: evaluations of an agent's search
    :param seed: random seed of an agent's search
    :param out: run folder for allocation.json, metrics.json, report.md (None: write nothing)
    :param gguf: also export the answer as GGUF: True for ``OUT/<model>-<bpw>bpw.gguf``, a
        path, or None for no export
    :param resume: continue an interrupted agent search in ``out``
    :param force: write into a non-empty ``out`` (files of an earlier run are replaced, an
        agent's journal or checkpoints started afresh); without it a non-empty ``out`` is
        refused unless resuming, so no run silently mixes with or destroys another
    :param ray: where the preparation's calibration and candidates, and a batched agent's
        evaluations, run (Ray or this process)
    :param baselines: solvers measured on the held-out windows at the same budget for the
        report (those equal to ``allocator`` are skipped)
    :param allow_requantize: accept a source whose weights are already quantized (refused
        otherwise: :func:`~autobits.requantize.check_requantize`)
    """

    prepare: PrepareConfig
    budget: Budget
    allocator: str = "greedy"
    agent: Any = None
    evals: int = 300
    seed: int = 0
    out: Path | None = None
    gguf: Path | bool | None = None
    resume: bool = False
    force: bool = False
    ray: RayOptions = field(default_factory=RayOptions)
    baselines: tuple[str, ...] = tuple(SOLVERS)
    allow_requantize: bool = False

    def __post_init__(self) -> None:
        if self.allocator not in allocator_names():
            raise AgentConfigError(
                f"allocator must be one of {', '.join(allocator_names())}, got {self.allocator!r}"
            )
        bad = sorted(set(self.baselines) - set(SOLVERS))
        if bad:
            raise AgentConfigError(f"baselines must be solvers {tuple(SOLVERS)}, got {bad}")
        if not (self.gguf is None or self.gguf is True or isinstance(self.gguf, Path)):
            raise AutobitsError(f"gguf must be True, a Path or None, got {self.gguf!r}")
        if self.gguf is True and self.out is None:
            raise AutobitsError("gguf=True writes into the run folder: give out too")
        if self.resume and self.out is None:
            raise AutobitsError("resume continues the search in its run folder: give out too")
        if self.resume and self.force:
            raise AutobitsError("--resume continues the run in --out, --force starts it afresh: "
                                "give one of them")

    def allocator_for(self) -> Allocator:
        return make_allocator(self.allocator, agent=self.agent, evals=self.evals, seed=self.seed,
                              ray=self.ray, out_dir=self.out, resume=self.resume, force=self.force)


@dataclass
class SearchOutcome:
    """What :func:`search` found, measured and wrote."""

    allocation: Allocation
    #: held-out metrics of the answer
    heldout: Metrics
    #: reward-slice metrics of the answer (what the search optimised)
    reward: Metrics | None
    #: the agent's search record (history, selection); None for a solver
    search: SearchResult | None
    #: solver name -> (allocation, held-out metrics) at the same budget
    baselines: dict[str, tuple[Allocation, Metrics]]
    limit_bytes: int
    prepared: Prepared
    #: "allocation", "metrics", "report" (+ plots), "gguf" -> the files written
    paths: dict[str, Path] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def reward_best(self) -> tuple[Allocation, Metrics] | None:
        """An agent's best allocation on the reward slice, before selection, with its
        reward-slice metrics (the head of ``search.candidates``); None for a solver."""
        if self.search is None:
            return None
        r = self.search
        return r.candidates[0] if r.candidates else (r.best, r.best_metrics)

    def metrics_json(self, config: SearchConfig) -> dict:
        """The ``metrics.json`` payload: the answer's held-out metrics and how they were had."""
        p = self.prepared
        payload = {**self.heldout.to_json(), "model": p.lm.name, "agent": config.allocator,
                   "budget": config.budget.describe(), "limit_bytes": self.limit_bytes,
                   "text": p.split.to_json(), "numerics": p.config.numerics,
                   "timings": {**p.timings, **self.timings},
                   "baselines": {n: m.to_json() for n, (_, m) in self.baselines.items()},
                   "source": source_record(p.lm.specs, allow=config.allow_requantize)}
        if self.search is not None and "selection" in self.search.meta:
            payload["selection"] = self.search.meta["selection"]
        if "gguf" in self.paths:
            payload["gguf"] = str(self.paths["gguf"])
        return payload


def check_out_dir(out: Path, *, resume: bool = False, force: bool = False) -> None:
    """Refuse a run folder that cannot be written, or that holds another run (unless
    ``resume`` continues it or ``force`` replaces it), before any slow work starts."""
    probe = out
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    try:  # missing, a file, or refusing a new file
        check_output_folder(probe)
    except OutputError as e:
        raise AutobitsError(f"--out {str(out)!r}: {e}") from None
    if probe == out and any(out.iterdir()) and not (resume or force):
        raise AutobitsError(
            f"--out {str(out)!r} is not empty (an earlier run?): give a new folder, --resume "
            f"to continue that search, or --force to replace its files"
        )
    if resume and not out.is_dir():
        raise AutobitsError(f"--resume: run folder {str(out)!r} does not exist")


def _gguf_path(config: SearchConfig, model: str, alloc: Allocation) -> Path | None:
    if config.gguf is None:
        return None
    if config.gguf is True:
        return config.out / f"{Path(model).name}-{alloc.bpw:.2f}bpw.gguf"
    return Path(config.gguf)


def search(config: SearchConfig, *, lm=None, prepared: Prepared | None = None) -> SearchOutcome:
    """Run one search job (see the module docstring); returns what it found and wrote.

    ``lm`` reuses a loaded model, ``prepared`` a prepared one (then ``config.prepare`` must
    be the config it was prepared with).
    """
    allocator = config.allocator_for()  # a bad agent config fails here, before any work
    if config.out is not None:
        check_out_dir(config.out, resume=config.resume, force=config.force)
    if config.ray.uses_ray:
        config.ray.check_reachable()  # a wrong --address fails now, not after prepare
    if isinstance(config.gguf, Path):
        try:
            check_output_folder(config.gguf.parent)
        except OutputError as e:
            raise AutobitsError(f"--gguf: {e}") from None
    if prepared is not None and prepared.config != config.prepare:
        raise AutobitsError("prepared was made with another PrepareConfig than config.prepare")

    with ExitStack() as ray_scope:  # with --address/--workers: one Ray session for the job
        if prepared is None:
            if lm is None:
                from autobits.model import load_model

                lm = load_model(config.prepare.model)
            check_requantize(lm.specs, model=lm.name, allow=config.allow_requantize)
            limit = config.budget.check_feasible(lm.specs, config.prepare.formats)
            runner = ray_scope.enter_context(
                prepare_on_ray(config.ray, lm=lm, formats=config.prepare.formats))
            prepared = prepare(config.prepare, lm=lm, runner=runner)
            if runner is not None:
                runner.close()  # the session stays for the evaluator actors
        else:
            check_requantize(prepared.lm.specs, model=prepared.lm.name,
                             allow=config.allow_requantize)
            limit = config.budget.check_feasible(prepared.lm.specs, config.prepare.formats)

        timings: dict[str, float] = {}
        t = time.perf_counter()
        got = allocator.allocate(prepared, limit_bytes=limit)
        timings["allocate"] = time.perf_counter() - t
        alloc = got.allocation

    t = time.perf_counter()
    heldout = prepared.heldout(alloc)
    baselines: dict[str, tuple[Allocation, Metrics]] = {}
    for method in config.baselines:
        if method == config.allocator:
            continue
        try:
            b = solve(method, prepared.table, limit_bytes=limit)
        except AutobitsError as e:  # e.g. no llama.cpp preset fits this budget
            log.info("baseline %s skipped: %s", method, e)
            continue
        baselines[method] = (b, prepared.heldout(b))
    timings["heldout"] = time.perf_counter() - t

    outcome = SearchOutcome(allocation=alloc, heldout=heldout, reward=got.reward,
                            search=got.search, baselines=baselines, limit_bytes=limit,
                            prepared=prepared, timings=timings)
    if config.out is not None:
        _write(outcome, config)
    return outcome


def _source_note(specs) -> str:
    types = ", ".join(f"{t} x{n}" for t, n in sorted(source_types(specs).items()))
    if is_quantized_source(specs):
        return (f"already quantized ({types}; requantized with --allow-requantize): formats at "
                f"or above the source's own reproduce it exactly, so the quality numbers are "
                f"optimistic")
    return f"float ({types})"


def _write(outcome: SearchOutcome, config: SearchConfig) -> None:
    from autobits.app.report import write_report
    from autobits.exports.gguf import export_gguf

    out, p = config.out, outcome.prepared
    outcome.paths["allocation"] = outcome.allocation.save(out / "allocation.json")
    gguf_path = _gguf_path(config, p.lm.name, outcome.allocation)
    if gguf_path is not None:
        t = time.perf_counter()
        outcome.paths["gguf"] = export_gguf(p.lm, outcome.allocation, gguf_path,
                                            importance=p.importance(), cache=p.cache)
        outcome.timings["gguf"] = time.perf_counter() - t
    outcome.paths.update(write_report(
        name=config.allocator, allocation=outcome.allocation, reward=outcome.reward,
        search=outcome.search, out_dir=out, heldout=outcome.heldout,
        baselines=outcome.baselines, specs=p.lm.specs, limit_bytes=outcome.limit_bytes,
        source_note=_source_note(p.lm.specs), numerics=NUMERICS[p.config.numerics],
    ))
    outcome.paths["metrics"] = write_json_atomic(out / "metrics.json", outcome.metrics_json(config))
