"""Array form of one allocation problem for the environment: candidates, features, projection.

An :class:`AllocTask` is one model's :class:`~autobits.candidates.CandidateTable` and its
feature table laid out as numpy arrays (one row per tensor, candidates largest first), with
the per-model feature normalisation, the candidate-derived observation columns, the
action <-> format mapping, the budget projection and a cache of the greedy solution per
byte limit (the reward's reference).  Nothing here knows about gymnasium.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from autobits.candidates import CandidateTable
from autobits.errors import AllocationError, AutobitsError
from autobits.solvers.problem import Packed, check_limit, pack
from autobits.solvers.lagrange import greedy_index
from autobits.solvers.projection import project

__all__ = [
    "AllocTask",
    "FeatureSpecError",
    "feature_spec",
    "normalise_features",
    "rank_of_action",
    "action_of_rank",
]

log = logging.getLogger(__name__)

#: Bound of every observation entry; normalised columns are clipped to it.
OBS_CLIP = 10.0
#: z-scored feature columns are clipped to +-FEATURE_CLIP before entering the observation.
FEATURE_CLIP = 5.0


class FeatureSpecError(AutobitsError):
    """Feature tables that do not match each other, the candidate table, or a saved policy."""


def feature_spec(features: Any) -> dict:
    """``{"version": ..., "names": [...]}`` of a FeatureTable(-like) object.

    The version is the table's own ``version`` (or ``spec_version``) attribute when it has
    one, else ``autobits.features.FEATURE_SPEC_VERSION``; a table carrying neither is an
    error.
    """
    names = list(getattr(features, "feature_names", None) or getattr(features, "FEATURE_NAMES", ()))
    version = getattr(features, "version", None)
    if version is None:
        version = getattr(features, "spec_version", None)
    if version is None:
        try:
            from autobits.features import FEATURE_SPEC_VERSION as version  # noqa: N811
        except ImportError:
            version = None
    if version is None:
        raise FeatureSpecError(
            f"feature table of model {getattr(features, 'model', '?')!r} carries no feature "
            f"spec version (no spec_version attribute, autobits.features not importable)"
        )
    return {"version": version, "names": names}


def normalise_features(values: np.ndarray) -> np.ndarray:
    """Per-model z-score of every column, clipped to +-FEATURE_CLIP; constant columns -> 0.

    Normalising within the model (not with statistics of the training models) is what lets
    a policy read a model it has never seen: what matters is how a tensor compares with the
    other tensors of its own model.
    """
    v = np.asarray(values, dtype=np.float64)
    mean = v.mean(axis=0)
    std = v.std(axis=0)
    out = np.zeros_like(v)
    ok = std > 1e-12 * np.maximum(1.0, np.abs(mean))
    out[:, ok] = (v[:, ok] - mean[ok]) / std[ok]
    return np.clip(out, -FEATURE_CLIP, FEATURE_CLIP)


def _zscore(x: np.ndarray) -> np.ndarray:
    return normalise_features(np.asarray(x, dtype=np.float64)[:, None])[:, 0]


def rank_of_action(a: np.ndarray | float, count: np.ndarray | int) -> np.ndarray:
    """Map actions in [-1, 1] to a rank from the smallest format: -1 -> 0, +1 -> count-1.

    The interval is cut into ``count`` equal bins, one per valid format ordered by size.
    """
    a = np.clip(np.asarray(a, dtype=np.float64), -1.0, 1.0)
    count = np.asarray(count)
    return np.minimum(count - 1, np.floor((a + 1.0) * 0.5 * count)).astype(np.int64)


def action_of_rank(rank: np.ndarray | int, count: np.ndarray | int) -> np.ndarray:
    """The centre of ``rank``'s bin: the action that :func:`rank_of_action` maps back to it."""
    return (2.0 * np.asarray(rank, dtype=np.float64) + 1.0) / np.asarray(count) - 1.0


@dataclass
class AllocTask:
    """One model's allocation problem as arrays (rows follow ``table.tensors``).

    ``evaluate`` (optional) measures an :class:`~autobits.allocation.Allocation` and returns
    Metrics (or a float KLD); it is the reward of the ``"kld"`` mode.
    """

    table: CandidateTable
    features: Any
    evaluate: Callable[[Any], Any] | None = None
    name: str = ""
    packed: Packed = field(init=False, repr=False)
    spec: dict = field(init=False)
    raw: np.ndarray = field(init=False, repr=False)  # (n, F) feature values as given
    zscored: np.ndarray = field(init=False, repr=False)  # (n, F) z-scored within the model
    slope: np.ndarray = field(init=False, repr=False)  # (n,) z-scored log proxy slope
    size: np.ndarray = field(init=False, repr=False)  # (n,) z-scored log numel
    _greedy: dict = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.name = self.name or self.table.model
        names = tuple(getattr(self.features, "names", ()))
        if names != self.table.tensors:
            diff = next((i for i, (a, b) in enumerate(zip(names, self.table.tensors)) if a != b),
                        min(len(names), len(self.table.tensors)))
            raise FeatureSpecError(
                f"feature table rows must follow the candidate table's tensors: model "
                f"{self.name!r} has {len(self.table.tensors)} tensors and {len(names)} feature "
                f"rows, first difference at row {diff}"
            )
        values = np.asarray(self.features.values, dtype=np.float64)
        self.spec = feature_spec(self.features)
        if values.ndim != 2 or values.shape[0] != len(names) or (
            self.spec["names"] and values.shape[1] != len(self.spec["names"])
        ):
            raise FeatureSpecError(
                f"feature values of model {self.name!r} must have shape ({len(names)}, "
                f"{len(self.spec['names'])}), got {values.shape}"
            )
        bad = ~np.isfinite(values)
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise FeatureSpecError(
                f"feature table of model {self.name!r} has {int(bad.sum())} non-finite values, "
                f"first at tensor {names[r]!r}, feature {c}"
            )
        self.raw = np.clip(values, -OBS_CLIP, OBS_CLIP).astype(np.float32)
        self.zscored = normalise_features(values).astype(np.float32)
        self.packed = pack(self.table)
        p = self.packed
        rows = np.arange(self.n)
        top, bottom = p.bytes[:, 0], p.bytes[rows, p.count - 1]
        drop = p.error[rows, p.count - 1] - p.error[:, 0]
        span = np.maximum(top - bottom, 1)
        self.slope = _zscore(np.log(np.maximum(drop, 1e-30) / span)).astype(np.float32)
        numel = np.array([s.numel for s in self.table.specs if s.quantizable], dtype=np.float64)
        self.size = _zscore(np.log(numel)).astype(np.float32)
        self.min_row = bottom.astype(np.int64)
        self.max_row = top.astype(np.int64)
        self.lo, self.hi = self.table.min_bytes(), self.table.max_bytes()

    def features_for(self, norm: str) -> np.ndarray:
        """Feature rows as the observation uses them: ``"none"`` (as given, clipped to
        +-OBS_CLIP) or ``"zscore"`` (:func:`normalise_features`)."""
        if norm == "none":
            return self.raw
        if norm == "zscore":
            return self.zscored
        raise ValueError(f"feature_norm must be 'none' or 'zscore', got {norm!r}")

    @property
    def n(self) -> int:
        return len(self.packed.names)

    @property
    def params(self) -> int:
        return self.table.params

    def limit_of_bpw(self, bpw: float) -> int:
        """Byte limit of a file-level bpw, clipped into this model's feasible range."""
        return int(min(self.hi, max(self.lo, int(bpw * self.params // 8))))

    def check_limit(self, limit_bytes: int) -> int:
        return check_limit(self.table, limit_bytes)

    def greedy(self, limit: int) -> tuple[np.ndarray, float, float]:
        """Greedy candidate index per row at ``limit``, its summed proxy error and the
        Lagrangian price per byte (the slope the equal-slope allocation stopped at)."""
        hit = self._greedy.get(limit)
        if hit is None:
            index = greedy_index(self.packed, limit)
            hit = (index, self.packed.total_error(index), self._price(index))
            if len(self._greedy) > 4096:
                self._greedy.clear()
            self._greedy[limit] = hit
        return hit

    def _price(self, index: np.ndarray) -> float:
        """Geometric mean of the cheapest downgrade and the dearest upgrade slope at ``index``."""
        p, rows = self.packed, np.arange(self.n)
        cur_b = p.bytes[rows, index][:, None]
        cur_e = p.error[rows, index][:, None]
        d_bytes = cur_b - p.bytes
        d_err = p.error - cur_e
        with np.errstate(divide="ignore", invalid="ignore"):
            down = np.where(p.valid & (d_bytes > 0), d_err / np.maximum(d_bytes, 1), np.inf)
            up = np.where(p.valid & (d_bytes < 0), -d_err / np.maximum(-d_bytes, 1), -np.inf)
        lo, hi = float(up.max()), float(down.min())
        if np.isfinite(lo) and np.isfinite(hi) and lo > 0 and hi > 0:
            return float(np.sqrt(lo * hi))
        return max(lo, hi, 0.0) if np.isfinite(max(lo, hi)) else 0.0

    def choice(self, index: np.ndarray) -> dict[str, str]:
        return self.packed.choice(index)

    def index_of(self, choice: Mapping[str, str]) -> np.ndarray:
        """Candidate index per row of a tensor -> format mapping."""
        out = np.empty(self.n, dtype=np.int64)
        for i, (name, fmts) in enumerate(zip(self.packed.names, self.packed.fmts)):
            try:
                out[i] = fmts.index(choice[name])
            except (KeyError, ValueError):
                raise AllocationError(
                    f"tensor {name!r}: {choice.get(name)!r} is not one of its candidates "
                    f"{list(fmts)}"
                ) from None
        return out
