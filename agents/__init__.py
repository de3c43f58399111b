"""Search agents (SAC, Optuna) behind one small interface; see :mod:`autobits.agents.base`."""

from __future__ import annotations

import importlib

from autobits.agents.base import AGENTS, Agent, Evaluation, SearchProblem, SearchResult, register_agent

# agent modules register themselves on import; a module not written yet is skipped
for _mod in ("optuna_agent", "sac_agent"):
    try:
        importlib.import_module(f"autobits.agents.{_mod}")
    except ModuleNotFoundError as _e:
        if _e.name != f"autobits.agents.{_mod}":
            raise
del _mod

__all__ = ["AGENTS", "Agent", "Evaluation", "SearchProblem", "SearchResult", "register_agent"]
