"""Gymnasium environments over a model's candidate table (``autobits.envs``).

``autobits/BitAlloc-v0`` is :class:`~autobits.envs.bitalloc.BitAllocEnv`; make it with
``gymnasium.make("autobits/BitAlloc-v0", table=..., features=..., limit_bytes=...)``.
"""

from __future__ import annotations

import gymnasium

from autobits.envs._core import AllocTask, FeatureSpecError, feature_spec, project
from autobits.envs.bitalloc import REWARD_MODES, STATE_NAMES, BitAllocEnv

__all__ = [
    "ENV_ID",
    "BitAllocEnv",
    "AllocTask",
    "FeatureSpecError",
    "feature_spec",
    "project",
    "STATE_NAMES",
    "REWARD_MODES",
]

ENV_ID = "autobits/BitAlloc-v0"

if ENV_ID not in gymnasium.registry:
    gymnasium.register(id=ENV_ID, entry_point="autobits.envs.bitalloc:BitAllocEnv")
