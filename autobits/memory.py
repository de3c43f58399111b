"""Process memory: what this process holds now and at its peak, and a preflight estimate.

* :func:`rss_bytes` / :func:`peak_rss_bytes`: the resident set now and its high-water mark
  (``VmRSS`` / ``VmHWM`` of ``/proc/self/status``; elsewhere ``resource.getrusage``);
* :func:`available_bytes`: what the machine can still give (``MemAvailable`` of
  ``/proc/meminfo``);
* :func:`log_memory`: one debug line per pipeline stage (where the memory went);
* :func:`estimate_peak_bytes` / :func:`check_memory`: the peak a search is expected to reach,
  from the model's tensor shapes, the candidate formats and the weight-cache budget, and a
  refusal (:class:`~autobits.errors.MemoryBudgetError`) when it would not fit, instead of the
  kernel killing the process minutes later.

The estimate follows where the memory of a search goes (measured stage by stage with
:func:`log_memory`): the float32 reference model, the quantized bytes of every candidate
(:class:`~autobits.evaluate.WeightCache` keeps those, not float32 copies), the bounded
cache of dequantized weights plus one model's worth swapped in during an evaluation, the
calibration statistics (``d x d`` second moments per input site, float64 while they are
accumulated), the reference next-token distributions of the held-out windows, and the
activations of one calibration window with its backward pass.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from autobits.errors import MemoryBudgetError

__all__ = [
    "MemoryEstimate", "available_bytes", "check_memory", "configure_allocator",
    "estimate_peak_bytes", "fisher_concurrency", "fisher_window_bytes", "format_bytes",
    "log_memory", "peak_rss_bytes", "release_free_memory",
    "rss_bytes", "site_sizes",
]  # fmt: skip

log = logging.getLogger(__name__)

#: Resident memory of the interpreter with torch, transformers and numpy imported (measured
#: on Linux, CPU torch: about 0.45 GB before a model is loaded).
RUNTIME_BYTES = 600 << 20


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _rusage_max_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # macOS: bytes


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far, in bytes (``VmHWM``)."""
    kb = _status_kb("VmHWM")
    return kb * 1024 if kb is not None else _rusage_max_bytes()


def rss_bytes() -> int:
    """Resident memory of this process now, in bytes (``VmRSS``; the peak where unknown)."""
    kb = _status_kb("VmRSS")
    return kb * 1024 if kb is not None else _rusage_max_bytes()


def available_bytes() -> int | None:
    """Memory the machine can still give without swapping (``MemAvailable``), or None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def format_bytes(n: int | float) -> str:
    """``1.23 GB`` (decimal units, as the rest of the project prints sizes)."""
    n = float(n)
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def log_memory(stage: str) -> None:
    """A debug line: resident memory now and at its peak, after ``stage``."""
    if log.isEnabledFor(logging.DEBUG):
        log.debug("memory after %s: rss %s, peak %s", stage, format_bytes(rss_bytes()),
                  format_bytes(peak_rss_bytes()))


# ------------------------------------------------------------------------ allocator
_CONFIGURED = False


def _libc():
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


#: Allocations at least this large are served by ``mmap`` (see :func:`configure_allocator`).
MMAP_THRESHOLD = 1 << 20


def configure_allocator(mmap_threshold: int = MMAP_THRESHOLD) -> bool:
    """Make freed tensors go back to the OS (glibc; once per process; True when set).

    glibc serves a large allocation by ``mmap`` and unmaps it when freed, but raises that
    threshold (up to 32 MB) each time such a block is freed; after that, the window-sized
    buffers of calibration and evaluation come from the threads' heaps, which keep the
    memory after it is freed, so the resident set only grows.  A fixed threshold
    (``M_MMAP_THRESHOLD``) keeps large buffers mapped and returned on free.
    """
    global _CONFIGURED
    if _CONFIGURED:
        return True
    libc = _libc()
    if libc is None:
        return False
    _CONFIGURED = bool(libc.mallopt(-3, int(mmap_threshold)))  # -3: M_MMAP_THRESHOLD
    return _CONFIGURED


def release_free_memory() -> None:
    """Return the heaps' free memory to the OS (glibc ``malloc_trim``; elsewhere nothing)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


# ------------------------------------------------------------------------ estimate
@dataclass(frozen=True)
class MemoryEstimate:
    """Expected peak resident bytes of a search, by part (see :func:`estimate_peak_bytes`).

    ``runtime``: the interpreter and libraries; ``model``: the float32 reference weights;
    ``statistics``: the calibration's second moments (float32, kept); ``accumulators``:
    their float64 sums while calibrating; ``activations``: the calibration windows in
    flight (a Fisher window keeps every block's activations for its backward pass);
    ``candidates``: the quantized bytes of every candidate; ``references``: the held-out
    reference distributions; ``cache``: the dequantized-weight budget plus one model's worth
    swapped in, and the evaluation windows in flight.
    """

    runtime: int
    model: int
    statistics: int
    accumulators: int
    activations: int
    candidates: int
    references: int
    cache: int

    def __post_init__(self) -> None:
        for k, v in self.parts().items():
            if v < 0:
                raise ValueError(f"memory estimate part {k} must be >= 0, got {v}")

    def parts(self) -> dict[str, int]:
        return {"runtime": self.runtime, "model": self.model, "statistics": self.statistics,
                "accumulators": self.accumulators, "activations": self.activations,
                "candidates": self.candidates, "references": self.references,
                "cache": self.cache}

    @property
    def calibration_stage(self) -> int:
        return self.accumulators + self.activations

    @property
    def search_stage(self) -> int:
        return self.candidates + self.references + self.cache

    @property
    def total(self) -> int:
        """The peak: what every stage holds, plus the larger of calibration (accumulators
        and activations) and the search (candidates, references, cache)."""
        return (self.runtime + self.model + self.statistics
                + max(self.calibration_stage, self.search_stage))

    def describe(self) -> str:
        return ", ".join(f"{k} {format_bytes(v)}" for k, v in self.parts().items() if v)


def site_sizes(shapes: Mapping[str, Sequence[int]]) -> list[int]:
    """Channels of each calibration input site: one per block and input group, plus the
    head's input (see :func:`autobits.calibrate.site_of`)."""
    from autobits.calibrate import HEAD_SITE, site_of
    from autobits.specs import QUANTIZABLE_ROLES, TensorSpec, block_of, role_of

    sites: dict[str, int] = {}
    hidden = 0
    for name, shape in shapes.items():
        role = role_of(name)
        if role not in QUANTIZABLE_ROLES or len(shape) != 2:
            continue
        if role == "token_embd":
            hidden = int(shape[-1])
            continue
        spec = TensorSpec(name=name, shape=tuple(int(s) for s in shape), role=role,
                          block=block_of(name), quantizable=True)
        sites[site_of(spec)] = int(shape[-1])
    sites.setdefault(HEAD_SITE, hidden)
    return list(sites.values())


#: float32 (ctx x vocab) buffers a Fisher window holds at once (logits, log-probabilities,
#: probabilities, their gradients) and per block (ctx x hidden) activations it keeps for the
#: backward pass (torch's fused attention keeps no score matrix); fitted to the measured
#: peaks of SmolLM2's main job (one Fisher window adds about 0.8 GB at 512 tokens).
_FISHER_VOCAB_BUFFERS = 5
_FISHER_BLOCK_BUFFERS = 12
#: float32 (scored tokens x vocab) buffers an evaluation window holds at once.
_EVAL_VOCAB_BUFFERS = 4
#: Memory that Fisher windows run side by side may hold beyond the first one: calibration
#: runs as many at once as fit (:func:`fisher_concurrency`).  1.5 GiB: SmolLM2's windows
#: (0.9 GB by :func:`fisher_window_bytes`) run two at once on two cores, 39 s -> 31 s of
#: calibration for 0.46 GB more peak; Gemma-3-270M's (3.0 GB: its 262,144-token
#: vocabulary) one at a time, two at once would add 2.4 GB.
FISHER_PARALLEL_BYTES = 3 << 29


def fisher_window_bytes(*, vocab: int, hidden: int, n_blocks: int, ctx: int) -> int:
    """Bytes one Fisher window (a forward pass kept for its backward one) holds at its peak:
    the ``ctx x vocab`` buffers of the head and the ``ctx x hidden`` activations per block
    (:data:`_FISHER_VOCAB_BUFFERS`, :data:`_FISHER_BLOCK_BUFFERS`)."""
    return 4 * int(ctx) * (_FISHER_VOCAB_BUFFERS * int(vocab)
                           + int(n_blocks) * _FISHER_BLOCK_BUFFERS * int(hidden))


def fisher_concurrency(window_bytes: int, workers: int) -> int:
    """How many Fisher windows of ``window_bytes`` a calibration with ``workers`` threads runs
    at once: one, plus as many more as :data:`FISHER_PARALLEL_BYTES` holds."""
    return max(1, min(int(workers), 1 + FISHER_PARALLEL_BYTES // max(1, int(window_bytes))))


def estimate_peak_bytes(
    *, shapes: Mapping[str, Sequence[int]], formats: Sequence[str], cache_bytes: int,
    vocab: int | None = None, ctx: int = 512, eval_windows: int = 8, calib_workers: int = 1,
    fisher_threads: int | None = None, eval_threads: int = 1,
) -> MemoryEstimate:
    """Expected peak resident memory of preparing and searching a model.

    ``shapes``: GGUF tensor name -> shape (numpy order, rows first), e.g.
    ``{n: s for n, (s, _) in read_gguf_header(path).tensors.items()}`` (no weights read) or
    ``{s.name: s.shape for s in lm.specs}``; ``formats``: the candidate formats;
    ``cache_bytes``: the budget of the dequantized-weight cache
    (:class:`~autobits.evaluate.WeightCache`); ``vocab``: the vocabulary (default: the
    embedding's rows); ``ctx`` / ``eval_windows``: the held-out windows whose reference
    distributions are kept; ``calib_workers``: calibration threads (each has its own
    accumulators), ``fisher_threads`` of which run a Fisher window at once (default as
    calibration does, :func:`fisher_concurrency`);
    ``eval_threads``: windows evaluated at once.
    """
    from autobits.formats import get_format
    from autobits.specs import QUANTIZABLE_ROLES, role_of

    if cache_bytes < 0:
        raise ValueError(f"cache_bytes must be >= 0, got {cache_bytes}")
    fmts = [get_format(f) for f in formats]
    numel = {n: int(np.prod([int(x) for x in shape], dtype=np.int64)) for n, shape in shapes.items()}
    model = 4 * sum(numel.values())
    candidates = hidden = 0
    for n, shape in shapes.items():
        if role_of(n) not in QUANTIZABLE_ROLES or len(shape) != 2:
            continue
        if role_of(n) == "token_embd":
            vocab = vocab or int(shape[0])
            hidden = int(shape[-1])
        # the bytes the weight cache keeps: every fitting format but the float ones
        candidates += sum(f.nbytes(tuple(shape)) for f in fmts
                          if f.block_size > 1 and f.fits(int(shape[-1])))
    vocab = int(vocab or 0)
    d = site_sizes(shapes)
    from autobits.calibrate import accumulator_bytes

    accumulators = calib_workers * sum(accumulator_bytes(x) for x in d)
    statistics = sum(4 * x * x for x in d)
    n_blocks = len({n.split(".")[1] for n in shapes if n.startswith("blk.")})
    per_window = fisher_window_bytes(vocab=vocab, hidden=hidden, n_blocks=n_blocks, ctx=ctx)
    fisher = min(calib_workers, fisher_threads or fisher_concurrency(per_window, calib_workers))
    activations = fisher * per_window
    scored = max(1, ctx - ctx // 2 - 1)
    references = 4 * eval_windows * scored * vocab
    evaluation = eval_threads * _EVAL_VOCAB_BUFFERS * 4 * scored * vocab
    cache = int(cache_bytes) + model + evaluation
    return MemoryEstimate(runtime=RUNTIME_BYTES, model=model, statistics=statistics,
                          accumulators=accumulators, activations=activations,
                          candidates=candidates, references=references, cache=cache)


def check_memory(
    estimate: MemoryEstimate | int, *, available: int | None = None, what: str = "this search",
    lower_by: str = "a smaller --cache-gb or fewer candidate formats",
) -> None:
    """Raise :class:`MemoryBudgetError` when ``estimate`` exceeds the available memory.

    ``available`` defaults to :func:`available_bytes` (tests inject a tiny one); unknown
    available memory passes.  ``lower_by`` names the option that lowers the estimate.
    """
    total = estimate.total if isinstance(estimate, MemoryEstimate) else int(estimate)
    avail = available_bytes() if available is None else int(available)
    detail = f" ({estimate.describe()})" if isinstance(estimate, MemoryEstimate) else ""
    if avail is None:
        log.debug("memory estimate for %s: %s%s; available memory unknown", what,
                 format_bytes(total), detail)
        return
    log.debug("memory estimate for %s: %s%s; available %s", what, format_bytes(total), detail,
             format_bytes(avail))
    if total > avail:
        raise MemoryBudgetError(
            f"{what} needs about {format_bytes(total)} of memory{detail}, but this machine "
            f"has {format_bytes(avail)} available; lower it with {lower_by}"
        )
