"""The data flow of one search, as plain functions: model + text -> everything a search needs.

    model ──load──▶ LoadedModel
    text ──windows──▶ calibration windows │ held-out windows (never overlapping)
    LoadedModel + calibration ──calibrate──▶ Calibration ──▶ CandidateTable + FeatureTable
    (optional) Scale Folding before the candidates are built
    Evaluator on a short calibration slice ─▶ the reward; Evaluator on held-out ─▶ the report

Commands (search, allocate, export) and benchmarks share :func:`prepare`, so they all see
the same windows, the same candidates and the same caches.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from autobits.allocation import Allocation
from autobits.calibrate import Calibration
from autobits.errors import AutobitsError
from autobits.evaluate import DEFAULT_CACHE_BYTES, Evaluator, Metrics, WeightCache
from autobits.formats import get_format
from autobits.registry import DEFAULT_MODEL
from autobits.specs import DEFAULT_CANDIDATES

__all__ = ["NUMERICS", "PrepareConfig", "Prepared", "prepare"]

#: The held-out metrics' numerics (:attr:`PrepareConfig.numerics`), with what they mean.
NUMERICS = {"llama": "llama.cpp's CPU activation rounding, float KV cache",
            "float": "float (torch), float KV cache"}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrepareConfig:
    """How to measure a model.  Validated on construction."""

    model: str = DEFAULT_MODEL
    text: str = "stdlib"
    ctx: int = 512
    calib_windows: int = 8
    eval_windows: int = 8
    reward_windows: int = 2
    reward_ctx: int = 256
    #: calibration windows (after the reward ones, full ``ctx``) on which a search's best
    #: allocations are re-measured before one is chosen (:mod:`autobits.agents.selection`)
    select_windows: int = 4
    fold: bool = False
    #: the format Scale Folding searches its scales for (one rule for every command, so a
    #: search and an export of the same allocation fold the same way)
    fold_format: str = "Q4_0"
    imatrix: bool = False
    #: an importance-matrix file (llama.cpp's GGUF imatrix or legacy ``.dat``) whose vectors
    #: replace the calibration's E[x^2] wherever an imatrix is used (candidates, exports);
    #: needs ``imatrix=True``
    imatrix_file: str | None = None
    #: the first min(fisher_windows, calib_windows) calibration windows also run backward for
    #: the output Fisher (the proxy's weights)
    fisher_windows: int = 4
    formats: tuple[str, ...] = DEFAULT_CANDIDATES
    #: budget of the dequantized weights the evaluators keep between evaluations (bytes;
    #: None: :data:`autobits.evaluate.DEFAULT_CACHE_BYTES`); the quantized bytes of every
    #: candidate are kept regardless, and the metrics do not depend on it
    cache_bytes: int | None = None
    #: the held-out metrics' numerics: ``"llama"`` rounds every linear layer's input as
    #: llama.cpp's CPU matmuls do (:mod:`autobits.numerics`), so that a file checked in
    #: llama.cpp reads what autobits printed; ``"float"`` is plain torch.  The KV cache stays
    #: float (llama.cpp's default is F16: ``autobits judge --kv-type f32`` compares exactly).
    #: The reward and selection slices are always float (speed; a ranking, not a report).
    numerics: str = "llama"

    def __post_init__(self) -> None:
        if self.ctx < 16:
            raise AutobitsError(f"ctx must be at least 16 tokens, got ctx={self.ctx}")
        if self.calib_windows < 1 or self.eval_windows < 0:
            raise AutobitsError(
                f"need at least one calibration window and no negative held-out count, got "
                f"calib_windows={self.calib_windows}, eval_windows={self.eval_windows}"
            )
        if not 1 <= self.reward_windows <= self.calib_windows:
            raise AutobitsError(
                f"reward windows are taken from the calibration windows, got "
                f"reward_windows={self.reward_windows}, calib_windows={self.calib_windows}"
            )
        if not 16 <= self.reward_ctx <= self.ctx:
            raise AutobitsError(
                f"reward_ctx must be in [16, ctx], got reward_ctx={self.reward_ctx}, ctx={self.ctx}"
            )
        if self.select_windows < 0:
            raise AutobitsError(f"select_windows must be >= 0, got select_windows={self.select_windows}")
        if self.fisher_windows < 0:
            raise AutobitsError(f"fisher_windows must be >= 0, got fisher_windows={self.fisher_windows}")
        if self.imatrix_file is not None:
            if not self.imatrix:
                raise AutobitsError(f"imatrix_file={self.imatrix_file!r} needs imatrix=True")
            if self.fold:
                raise AutobitsError(
                    f"imatrix file {self.imatrix_file!r} describes the unfolded model's inputs "
                    f"and Scale Folding changes them: use --imatrix without a file with --fold")
        if self.numerics not in NUMERICS:
            raise AutobitsError(f"numerics must be one of {', '.join(NUMERICS)}, got "
                                f"numerics={self.numerics!r}")
        get_format(self.fold_format)  # an unknown name is a FormatError here, not after loading
        if self.cache_bytes is not None and self.cache_bytes < 0:
            raise AutobitsError(f"the weight cache budget must be >= 0 bytes, got "
                                f"cache_bytes={self.cache_bytes}")

    def reward_slice(self, calib: np.ndarray) -> np.ndarray:
        """The search's reward windows: the first ``reward_windows`` calibration windows,
        cut to ``reward_ctx`` tokens."""
        return calib[: self.reward_windows, : self.reward_ctx]

    def select_slice(self, calib: np.ndarray) -> np.ndarray:
        """The selection windows: the calibration windows after the reward ones (all of them
        when none are left), at full length, at most ``select_windows`` (at least one)."""
        rest = calib[self.reward_windows :]
        return (rest if len(rest) else calib)[: max(1, self.select_windows)]


@dataclass
class Prepared:
    """A measured model, ready for solvers, agents and evaluation."""

    config: PrepareConfig
    lm: Any
    split: Any  # autobits.text.WindowSplit
    calib: Any  # autobits.calibrate.Calibration
    table: Any  # CandidateTable
    features: Any  # FeatureTable
    cache: WeightCache
    fold_report: Any = None
    timings: dict[str, float] = field(default_factory=dict)
    _reward: Evaluator | None = None
    _heldout: Evaluator | None = None
    _select: Evaluator | None = None

    @property
    def reward_evaluator(self) -> Evaluator:
        """Evaluator on the short calibration slice (the search's reward; never held-out)."""
        if self._reward is None:
            windows = self.config.reward_slice(self.split.calib)
            self._reward = Evaluator(self.lm, windows, cache=self.cache)
        return self._reward

    @property
    def heldout_evaluator(self) -> Evaluator:
        """Evaluator on the held-out windows (final reporting only)."""
        if self._heldout is None:
            self._heldout = Evaluator(self.lm, self.split.eval, cache=self.cache,
                                      llama_numerics=self.config.numerics == "llama")
        return self._heldout

    @property
    def select_evaluator(self) -> Evaluator:
        """Evaluator on :meth:`PrepareConfig.select_slice` of the calibration windows; never
        held-out."""
        if self._select is None:
            windows = self.config.select_slice(self.split.calib)
            self._select = Evaluator(self.lm, windows, cache=self.cache)
        return self._select

    def select(self, allocation: Allocation) -> Metrics:
        return self.select_evaluator.evaluate(allocation)

    def reward(self, allocation: Allocation) -> Metrics:
        return self.reward_evaluator.evaluate(allocation)

    def heldout(self, allocation: Allocation) -> Metrics:
        return self.heldout_evaluator.evaluate(allocation)

    def importance(self) -> dict | None:
        """Per-tensor importance vectors when the config asks for an imatrix, else None (with
        ``imatrix_file``: the file's vectors)."""
        if not self.config.imatrix:
            return None
        return {s.name: v for s in self.lm.quantizable
                if (v := self.calib.importance(s.name)) is not None}


@dataclass(frozen=True, eq=False)
class _FileImportanceCalibration(Calibration):
    """A calibration whose :meth:`importance` answers from an imatrix file (tensors without
    an entry: None); every other statistic is the measured one."""

    file_importance: dict = field(default_factory=dict)

    def importance(self, name: str) -> np.ndarray | None:
        return self.file_importance.get(name)


def _with_importance(calib: Calibration, importance: dict) -> Calibration:
    values = {f.name: getattr(calib, f.name) for f in fields(calib) if f.init}
    values.pop("file_importance", None)
    return _FileImportanceCalibration(**values, file_importance=importance)


def prepare(config: PrepareConfig, *, lm=None, calibration=None, candidates: bool = True,
            progress: bool = True, workers: int | None = None, runner=None) -> Prepared:
    """Load (unless ``lm`` is given), window the text, calibrate, fold, build candidates.

    The one path from a model to what solvers, agents, exports and benches use:

    * ``calibration``: a saved :class:`~autobits.calibrate.Calibration` of ``lm`` to reuse
      instead of the calibration pass (it must have measured the unfolded model);
    * ``candidates=False``: stop after calibration and folding (an export needs the folded
      weights and the importance vectors, not the candidate table); ``table``, ``features``
      and ``cache`` are then None and the Fisher pass is skipped (it only weights the proxy);
    * ``progress``: progress bars of the calibration pass and the candidate table;
    * ``workers``: calibration shards and candidate threads (default: the runner's workers,
      else the CPU count);
    * ``runner``: where calibration shards and candidate items run (a
      :class:`~autobits.stages.StageRunner`, e.g. ``autobits.cluster.stages.RayStageRunner``;
      default: threads of this process); the same shards give bit-identical results.
    """
    from autobits.calibrate import calibrate
    from autobits.features import build_candidates, extract_features
    from autobits.memory import check_memory, estimate_peak_bytes, log_memory, release_free_memory
    from autobits.model import load_model
    from autobits.text import load_text, make_windows

    timings: dict[str, float] = {}
    t = time.perf_counter()
    corpus = load_text(config.text)  # a missing or empty text fails before the model loads
    timings["text"] = time.perf_counter() - t
    t = time.perf_counter()
    if lm is None:
        lm = load_model(config.model)
    timings["load"] = time.perf_counter() - t
    lm.check_context(config.ctx)
    log_memory("load")
    if candidates:  # refuse what would not fit before the slow stages, not be killed in them
        check_memory(estimate_peak_bytes(
            shapes={s.name: s.shape for s in lm.specs}, formats=config.formats,
            cache_bytes=DEFAULT_CACHE_BYTES if config.cache_bytes is None else config.cache_bytes,
            ctx=config.ctx, eval_windows=config.eval_windows, calib_workers=os.cpu_count() or 1,
            eval_threads=os.cpu_count() or 1,
        ), what=f"preparing {lm.name}", lower_by="--cache-gb 0, fewer --windows or fewer "
           "candidate formats")
    file_importance = None
    if config.imatrix_file is not None:  # read and matched before the slow calibration
        from autobits.imatrix import read_imatrix

        file_importance = read_imatrix(config.imatrix_file).importance_for(lm.specs, model=lm.name)

    t = time.perf_counter()
    windows = make_windows(corpus, lm.tokenizer, ctx=config.ctx)
    split = windows.split(calib=config.calib_windows, eval=config.eval_windows)
    timings["text"] += time.perf_counter() - t

    t = time.perf_counter()
    if calibration is not None:
        calib = calibration
    else:
        calib = calibrate(lm, split.calib, fisher_windows=config.fisher_windows if candidates else 0,
                          progress=progress, workers=workers, runner=runner)
    timings["calibrate"] = time.perf_counter() - t
    release_free_memory()  # the accumulators and activations of the pass
    log_memory("calibration")
    if file_importance is not None:
        calib = _with_importance(calib, file_importance)

    fold_report = None
    if config.fold:
        from autobits.folding import fold, folded_calibration

        t = time.perf_counter()
        fold_report = fold(lm, calib, fmt=config.fold_format, imatrix=config.imatrix)
        # the folded model's inputs are x / s: rescale the statistics instead of a new pass
        calib = folded_calibration(calib, lm)
        timings["fold"] = time.perf_counter() - t
        log.info("Scale Folding for %s: %d groups folded, calibration error %.4g -> %.4g",
                 config.fold_format, fold_report.folded, fold_report.error_before,
                 fold_report.error_after)

    table = features = cache = None
    if candidates:
        t = time.perf_counter()
        cache = WeightCache(lm, importance=(
            {s.name: calib.importance(s.name) for s in lm.quantizable} if config.imatrix else None
        ), budget_bytes=config.cache_bytes)
        table = build_candidates(lm, calib, formats=config.formats, imatrix=config.imatrix,
                                 cache=cache, workers=workers, progress=progress, runner=runner)
        timings["candidates"] = time.perf_counter() - t
        release_free_memory()  # the dequantized candidates and Cholesky factors
        log_memory(f"candidates ({len(cache)} kept, {cache.packed_bytes / 1e9:.2f} GB quantized)")

        t = time.perf_counter()
        features = extract_features(lm, calib, table)
        timings["features"] = time.perf_counter() - t
        log_memory("features")
    log.info("prepared %s: %s", lm.name, ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    return Prepared(config=config, lm=lm, split=split, calib=calib, table=table,
                    features=features, cache=cache, fold_report=fold_report, timings=timings)
