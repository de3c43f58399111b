"""The application layer: the whole search job as one library call, the report, the CLI.

This is the top floor of autobits: it may import every other layer (core, envs, agents,
cluster, exports, kernels); nothing below imports it.

* :func:`~autobits.app.workflow.search` with a :class:`~autobits.app.workflow.SearchConfig`
  -> :class:`~autobits.app.workflow.SearchOutcome`: prepare, allocate (solver or agent,
  selection), held-out metrics, baselines, report, GGUF;
* :mod:`~autobits.app.options` -- command-line options and their conversion to configs;
* :mod:`~autobits.app.report` -- ``report.md`` and its plots;
* :mod:`~autobits.app.packed_eval` -- a packed checkpoint evaluated through the kernels;
* :mod:`~autobits.app.cli` and :mod:`~autobits.app.commands` -- the ``autobits`` command.
"""

from __future__ import annotations

from autobits.app.workflow import SearchConfig, SearchOutcome, search

__all__ = ["SearchConfig", "SearchOutcome", "search"]
