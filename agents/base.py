"""The one small interface every search agent implements.

A :class:`SearchProblem` is everything an agent may use: the model's candidates (exact
bytes and proxy error per tensor x format), its feature table (the observation), the byte
limit, and ``evaluate``, which measures an allocation on the short calibration slice (the
reward signal; the evaluator caches dequantized weights, so a call is one forward pass per
calibration window).  Held-out metrics are computed by the caller after the search, never
inside it.

An agent returns a :class:`SearchResult`: the best feasible allocation it evaluated and the
history of every evaluation, which the report turns into plots.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Protocol

from autobits.allocation import Allocation
from autobits.candidates import CandidateTable
from autobits.errors import AutobitsError
from autobits.evaluate import Metrics

__all__ = ["SearchProblem", "Evaluation", "SearchResult", "Agent", "AgentSpec", "AGENTS",
           "register_agent", "make_agent", "AgentError", "AgentConfigError", "TOP_CANDIDATES"]

class AgentError(AutobitsError):
    """A search that cannot run as asked (too few evaluations, a warm start over the budget,
    a resume whose settings differ from the interrupted run's)."""


class AgentConfigError(AgentError):
    """An agent hyperparameter out of its range (raised by the configs' ``__post_init__``)."""


#: How many of the best allocations a search keeps for the selection step.
TOP_CANDIDATES = 8


@dataclass(frozen=True)
class SearchProblem:
    """What a search sees.  ``features`` is an ``autobits.features.FeatureTable`` whose rows
    follow ``table.tensors``; ``warm_start`` is the greedy solver's allocation when given."""

    table: CandidateTable
    features: Any
    limit_bytes: int
    evaluate: Callable[[Allocation], Metrics]
    warm_start: Allocation | None = None
    #: Measures several allocations in parallel (Ray evaluator actors; results in input
    #: order, same metrics as ``evaluate``).  None when evaluation is in-process only;
    #: agents that can propose a batch (Optuna ask k / tell k, several environments)
    #: use it when present.
    evaluate_many: Callable[[list[Allocation]], list[Metrics]] | None = None

    def __post_init__(self) -> None:
        lo, hi = self.table.min_bytes(), self.table.max_bytes()
        if not lo <= self.limit_bytes <= hi:
            raise AgentError(
                f"limit_bytes must be within the feasible range, got "
                f"limit_bytes={self.limit_bytes}, range={lo}..{hi}"
            )


@dataclass(frozen=True)
class Evaluation:
    """One evaluated allocation in a search's history."""

    index: int
    kld: float
    bytes: int
    bpw: float
    feasible: bool
    seconds: float


@dataclass
class SearchResult:
    """The best feasible allocation found, its calibration metrics, and the history."""

    agent: str
    best: Allocation
    best_metrics: Metrics
    history: list[Evaluation] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    #: The best distinct feasible allocations evaluated, by calibration KLD (best first, at
    #: most :data:`TOP_CANDIDATES`); :func:`autobits.agents.selection.select` re-measures
    #: them on a larger slice, since the reward slice is short and a search overfits it.
    candidates: list[tuple[Allocation, Metrics]] = field(default_factory=list)

    def best_so_far(self) -> list[float]:
        """Best feasible calibration KLD after each evaluation (inf before the first)."""
        out, best = [], float("inf")
        for e in self.history:
            if e.feasible:
                best = min(best, e.kld)
            out.append(best)
        return out


class Agent(Protocol):
    """Search agents: ``search(problem, evals=N, seed=S, out_dir=DIR) -> SearchResult``.

    ``batched``: the agent measures batches through ``problem.evaluate_many`` when it is
    given (so Ray evaluator actors help it); an agent that evaluates one allocation at a
    time in its own loop says False.
    """

    name: ClassVar[str]
    batched: ClassVar[bool]

    def search(
        self, problem: SearchProblem, *, evals: int, seed: int, out_dir: Path | None = None,
        resume: bool = False,
    ) -> SearchResult: ...


@dataclass(frozen=True)
class AgentSpec:
    """A registered agent: its class and the frozen config dataclass that configures it."""

    name: str
    cls: type
    config: type


#: name -> :class:`AgentSpec`; filled by :func:`register_agent`.
AGENTS: dict[str, AgentSpec] = {}


def register_agent(name: str, *, config: type):
    """Class decorator registering an agent under ``name`` (``--agent name``) with its config
    class (``cls(config_instance)`` builds the agent)."""

    def deco(cls):
        if name in AGENTS:
            raise ValueError(f"agent {name!r} is already registered")
        AGENTS[name] = AgentSpec(name=name, cls=cls, config=config)
        return cls

    return deco


def make_agent(name: str, config=None) -> Agent:
    """The agent registered as ``name``, built from ``config`` (its config class's defaults
    when None); a config of another agent's class is an :class:`AgentConfigError`."""
    spec = AGENTS.get(name)
    if spec is None:
        raise AgentConfigError(f"agent {name!r} is not available; built: {sorted(AGENTS)}")
    if config is None:
        config = spec.config()
    elif not isinstance(config, spec.config):
        raise AgentConfigError(
            f"agent {name!r} takes a {spec.config.__name__}, got {type(config).__name__}"
        )
    return spec.cls(config)
