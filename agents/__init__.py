"""Search agents (SAC, Optuna) behind one small interface; see :mod:`autobits.agents.base`.

Each agent is registered with its frozen config dataclass: ``make_agent("optuna",
OptunaConfig(sampler="cmaes"))`` builds one; ``AGENTS`` lists them.
"""

from __future__ import annotations

from autobits.agents.base import (
    AGENTS,
    Agent,
    AgentConfigError,
    AgentError,
    AgentSpec,
    Evaluation,
    SearchProblem,
    SearchResult,
    make_agent,
    register_agent,
)
from autobits.agents.optuna_agent import OptunaAgent, OptunaConfig
from autobits.agents.sac_agent import SACAgent, SACConfig

__all__ = ["AGENTS", "Agent", "AgentConfigError", "AgentError", "AgentSpec", "Evaluation",
           "SearchProblem", "SearchResult", "make_agent", "register_agent", "OptunaAgent",
           "OptunaConfig", "SACAgent", "SACConfig"]
