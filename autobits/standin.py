"""Float stand-ins: a float model made from a quantized GGUF, on no ggml grid, close to it.

Every model autobits can install is quantized, and re-quantizing a tensor to its source
format reproduces it exactly (the format is free).  A *stand-in* is an F32 GGUF with the
source's metadata and tokenizer whose quantized weights have been moved off their grids
while the model's function is kept:

* every element of a quantized tensor ends at least ``offset`` grid steps away from the
  nearest point of its source grid (the grid of its block: ``a + step * k``, read from the
  source bytes by :func:`grid_of`), so re-quantizing to the source format costs a real
  error (``bench/standin.py`` measures it against Gaussian data);
* the move is made column by column (input channels) with error feedback, as GPTQ
  quantizes: column ``j`` is set to its off-grid target and the output change this causes
  on the calibration inputs (``H = E[x x^T]`` of the tensor's input, from
  :func:`autobits.calibrate.calibrate` on the source model) is compensated in the columns
  not yet moved, through the Cholesky factor of ``H^-1``.  The compensation moves later
  columns off their grid by itself, so most of them need little or no push of their own;
  ``W x`` stays nearly what it was on the calibration text;
* tensors without an input second moment (a tied ``token_embd``: its rows are looked up
  by token as well as used as the output head) are pushed off-grid without feedback; float
  tensors of the source (norms, biases, an F16 weight) are copied unchanged.

The construction is deterministic for a source file and a :class:`StandinConfig` on one
machine (seeded signs; calibration with a fixed worker count); its parameters are written into the
file as ``autobits.standin.*`` keys.  :func:`build_standin` writes the file atomically.

Memory: a model whose calibration statistics (:func:`calibration_bytes`) fit
``calibration_budget`` (default :data:`CALIBRATION_BUDGET`; SmolLM2-135M needs 1.3 GB,
Gemma-3-270M 1.4 GB) is calibrated in one pass, as always.  A larger one (Qwen2.5-Coder-1.5B:
1.06 GB per block, 30 GB in all) is calibrated in groups of blocks that follow one another
in the file, each group's pass stopping after its last block
(:func:`autobits.calibrate.calibrate` with ``tensors``), its tensors written, its statistics
freed before the next; the head's input gets a group (a whole pass) of its own.  A site's
statistics are bit-identical either way, so is the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from autobits.io import atomic_path
from autobits.errors import AutobitsError, ModelLoadError
from autobits.gguf_scan import GGUFSource

try:
    from autobits import _standin_native as _native
except ImportError:  # no C compiler at install time: the NumPy batch runs (same bits)
    _native = None

__all__ = [
    "CALIBRATION_BUDGET", "STANDIN_VERSION", "StandinConfig", "StandinError", "build_standin",
    "calibration_bytes", "calibration_name", "grid_of", "inverse_factor", "off_grid",
    "perturb_tensor", "standin_metadata",
]  # fmt: skip

log = logging.getLogger(__name__)

#: Version of the construction (part of the cache key and of the file's metadata).
#: 2: the calibration windows are tokenised as llama.cpp does (autobits/tokenizer.py).
STANDIN_VERSION = 2
#: Prefix of the metadata keys that record the construction.
META_PREFIX = "autobits.standin."
#: Calibration threads (fixed: the sums' order, hence the last bits, depend on it).
_CALIB_WORKERS = 2
#: Bytes of calibration statistics (every worker's accumulators and the finished ``H`` of
#: each input site, :func:`calibration_bytes`) one calibration pass may hold: a model above
#: it is calibrated in groups of blocks (module docstring).  3 GB: SmolLM2-135M (1.3 GB) and
#: Gemma-3-270M (1.4 GB) fit one pass; Qwen2.5-Coder-1.5B (1.06 GB per block) goes three
#: blocks at a time, next to its 7.1 GB float32 model.
CALIBRATION_BUDGET = 3 << 30
#: Rows moved at once when a tensor has no error feedback (bounds an embedding's memory).
_CHUNK_ROWS = 8192
#: Rows moved at once with error feedback (rows are independent given ``H``'s factor; the
#: grids and the loop's transposed copies take about 12 float32 copies of the rows): an
#: untied vocabulary head (Qwen2.5-1.5B: 151,936 x 1536) in one piece would take 11 GB.
#: Every block tensor of the built-ins has fewer rows (8960 at most), so it moves whole; a
#: tensor in chunks gets the values it would get whole (the signs are drawn in the same
#: order; tests/test_standin.py checks the bits).
_FEEDBACK_ROWS = 16384
#: Tensors made at once per thread between writes: the finished ones wait for their turn
#: to be written in file order, so this bounds the memory they hold.
_TENSORS_PER_THREAD = 4
#: ggml types that are float already (copied, never perturbed).
FLOAT_TYPES = ("F32", "F16", "BF16", "F64")


class StandinError(AutobitsError):
    """A source a stand-in cannot be made from (type without a known grid), or bad options."""


@dataclass(frozen=True)
class StandinConfig:
    """How a stand-in is made.

    ``offset``: the smallest distance, in grid steps, of every quantized element from its
    source grid (0 < offset <= 0.5; 0.5 is the middle of a cell).  ``feedback``: compensate
    each column's move in the later columns (GPTQ-style) with the calibration ``H``;
    ``damp``: the ridge added to ``H``'s diagonal, relative to its mean; ``block``: columns
    per lazy-update block.  Calibration: the first ``calib_windows`` windows of ``ctx``
    tokens of ``text`` (:func:`autobits.text.load_text`).  ``seed``: the signs of elements
    that sit exactly on a grid point.
    """

    offset: float = 0.2
    feedback: bool = True
    damp: float = 0.01
    block: int = 128
    text: str = "stdlib"
    ctx: int = 512
    calib_windows: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < float(self.offset) <= 0.5:
            raise StandinError(f"offset must be in (0, 0.5] grid steps, got {self.offset!r}")
        if not float(self.damp) > 0.0:
            raise StandinError(f"damp must be > 0, got {self.damp!r}")
        for k in ("block", "ctx", "calib_windows"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < (2 if k == "ctx" else 1):
                raise StandinError(f"{k} must be a positive integer, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise StandinError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.text, str) or not self.text:
            raise StandinError(f"text must be a text source name or path, got {self.text!r}")

    def key(self) -> str:
        """A short hash of the parameters (part of the cached file's name)."""
        blob = json.dumps(asdict(self) | {"version": STANDIN_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


# ----------------------------------------------------------------------------- grids
#: Per ggml type: the byte ranges of a block that hold the codes, and the byte that sets
#: every code of a range to 1 (zero bytes give code 0).  Dequantization is affine in the
#: code, so ``v(0)`` and ``v(1) - v(0)`` are each element's grid offset and step.
_CODE_BYTES: dict[str, tuple[tuple[int, int, int], ...]] = {
    "Q4_0": ((2, 18, 0x11),),
    "Q4_1": ((4, 20, 0x11),),
    "Q5_0": ((2, 6, 0x00), (6, 22, 0x11)),
    "Q5_1": ((4, 8, 0x00), (8, 24, 0x11)),
    "Q8_0": ((2, 34, 0x01),),
    "Q4_K": ((16, 144, 0x11),),
    "Q5_K": ((16, 48, 0x00), (48, 176, 0x11)),
    "Q6_K": ((0, 128, 0x11), (128, 192, 0x00)),
    "Q2_K": ((16, 80, 0x55),),
}


def grid_of(raw: np.ndarray, type_name: str) -> tuple[np.ndarray, np.ndarray]:
    """The grid of every element of a quantized tensor: ``(offset, step)`` float32 arrays
    shaped like the dequantized tensor, so that its possible values are
    ``offset + step * k`` (``k`` an integer code).

    ``raw`` is the tensor's bytes as gguf-py reads them (``(..., row_bytes)`` uint8).
    Dequantization (:mod:`autobits.formats`) is affine in each element's code: decoding
    the bytes with every code set to 0 gives the offsets, with every code 1 the steps.
    """
    from autobits.formats import get_format

    spans = _CODE_BYTES.get(type_name)
    if spans is None:
        raise StandinError(
            f"no grid is known for ggml type {type_name}; stand-ins support "
            f"{', '.join(_CODE_BYTES)} (and float tensors, copied)"
        )
    fmt = get_format(type_name)
    raw = np.asarray(raw, dtype=np.uint8)
    shape = (*raw.shape[:-1], raw.shape[-1] // fmt.type_size * fmt.block_size)
    blocks = raw.reshape(-1, fmt.type_size)
    zero, one = blocks.copy(), blocks.copy()
    for lo, hi, byte in spans:
        zero[:, lo:hi] = 0
        one[:, lo:hi] = byte
    v0 = fmt.dequantize(zero.reshape(raw.shape), shape).astype(np.float32)
    v1 = fmt.dequantize(one.reshape(raw.shape), shape).astype(np.float32)
    return v0, v1 - v0


def off_grid(w: np.ndarray, offset: np.ndarray, step: np.ndarray, *, min_dist: float,
             signs: np.ndarray) -> np.ndarray:
    """``w`` moved to at least ``min_dist`` grid steps from its grid, by the least move.

    Arrays of one shape (float32); an element on a grid point moves by ``signs`` (+-1); a
    zero step (a constant block) leaves the element unchanged.
    """
    zero = step == 0
    return _off_grid(w, offset, np.where(zero, np.float32(1), step), zero,
                     np.float32(min_dist), signs)


def _off_grid(w, offset, safe, zero, min_dist, signs) -> np.ndarray:
    """:func:`off_grid` with the step's guards given: ``zero`` (``step == 0``) and ``safe``
    (the step, 1 where it is zero), ``min_dist`` float32."""
    f = (w - offset) / safe
    k = np.rint(f)
    d = f - k
    s = np.where(d == 0, signs, np.sign(d))
    moved = offset + safe * (k + s * np.maximum(np.abs(d), min_dist))
    return np.where(zero, w, moved).astype(np.float32, copy=False)


def perturb_tensor(
    w: np.ndarray, offset: np.ndarray, step: np.ndarray, *, h: np.ndarray | None,
    config: StandinConfig, rng: np.random.Generator, factor: np.ndarray | None = None,
) -> np.ndarray:  # fmt: skip
    """The stand-in values of one tensor (rows = output channels, columns = input channels).

    With ``h`` (``E[x x^T]`` of the input, ``(cols, cols)``) and ``config.feedback`` the
    columns move one by one with GPTQ error feedback (module docstring); otherwise every
    element moves on its own.  ``factor``: :func:`inverse_factor` of ``h`` and
    ``config.damp`` when already computed (tensors reading one input share it).  Returns
    float32, the shape of ``w``.
    """
    if w.ndim != 2 or offset.shape != w.shape or step.shape != w.shape:
        raise StandinError(f"tensor of shape {w.shape} needs a grid of the same shape")
    w = np.asarray(w, dtype=np.float32)
    offset = np.asarray(offset, dtype=np.float32)
    step = np.asarray(step, dtype=np.float32)
    signs = (rng.integers(0, 2, size=w.shape, dtype=np.int8) * 2 - 1).astype(np.float32)
    dist = float(config.offset)
    if h is None or not config.feedback:
        return off_grid(w, offset, step, min_dist=dist, signs=signs)
    cols = w.shape[1]
    if h.shape != (cols, cols):
        raise StandinError(f"H of shape {h.shape} does not fit a tensor with {cols} columns")
    u = inverse_factor(h, config.damp) if factor is None else factor
    # columns as rows (contiguous): the loop reads and updates one column at a time
    wt = np.ascontiguousarray(w.T)
    _feedback_loop(wt, np.ascontiguousarray(offset.T), np.ascontiguousarray(step.T),
                   np.ascontiguousarray(signs.T), u, dist, config.block)
    return np.ascontiguousarray(wt.T)


def _feedback_loop(wt, at, st, signs_t, u, dist: float, block: int) -> None:
    """GPTQ's lazy-batch loop over the columns of ``W`` (``wt`` = ``W^T``, in place), with
    off-grid targets instead of grid points.  Each batch runs in C when the extension is
    built (:mod:`autobits._standin_native`, the same bits, the GIL released), else in
    :func:`_feedback_batch`."""
    cols, rows = wt.shape
    zero_t = st == 0  # the step's guards of :func:`off_grid`, for every column at once
    safe_t = np.where(zero_t, np.float32(1), st)
    min_dist = np.float32(dist)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = wt[i1:i2]  # a view: updated in place
        err = np.empty_like(w1)
        u1 = np.ascontiguousarray(u[i1:i2, i1:i2])
        if _native is not None:
            _native.feedback_batch(w1, at[i1:i2], safe_t[i1:i2], zero_t[i1:i2].view(np.uint8),
                                   signs_t[i1:i2], u1, err, i2 - i1, rows, float(min_dist))
        else:
            _feedback_batch(w1, at[i1:i2], safe_t[i1:i2], zero_t[i1:i2], signs_t[i1:i2], u1,
                            err, min_dist)
        if i2 < cols:
            wt[i2:] -= u[i1:i2, i2:].T @ err


def _feedback_batch(w1, a1, safe1, zero1, signs1, u1, err, min_dist) -> None:
    """One batch of :func:`_feedback_loop` in NumPy: the columns ``w1`` (rows of the
    batch, in place) moved one by one, each error written to ``err`` and fed back into the
    batch's later columns through ``u1`` (the batch's block of the inverse factor)."""
    upd = np.empty_like(w1)  # a column's update of the rest
    for j in range(w1.shape[0]):
        col = w1[j]
        t = _off_grid(col, a1[j], safe1[j], zero1[j], min_dist, signs1[j])
        e = (col - t) / u1[j, j]
        w1[j] = t
        rest = w1[j + 1 :]
        tmp = upd[: len(rest)]
        np.multiply(u1[j, j + 1 :, None], e[None, :], out=tmp)
        rest -= tmp
        err[j] = e


def inverse_factor(h: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) * I)^-1 = U^T U`` (float32),
    as GPTQ; a dead input channel (zero diagonal) gets a unit diagonal."""
    import torch

    hh = torch.from_numpy(np.array(h, dtype=np.float64))
    diag = torch.diagonal(hh)
    dead = diag <= 0
    hh[dead, :] = 0
    hh[:, dead] = 0
    diag[dead] = 1.0
    diag += float(damp) * float(diag.mean())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared machine one thread is several times faster here
    try:
        # float64 d x d buffers go as soon as they are used (ffn_down of Qwen2.5-1.5B: 640 MB)
        low, info = torch.linalg.cholesky_ex(hh)
        del hh, diag, dead
        if int(info) != 0:
            raise StandinError("the calibration second moment is not positive definite even "
                               f"with damp={damp}; use more calibration windows or a larger damp")
        inv = torch.cholesky_inverse(low)
        del low
        upper = torch.linalg.cholesky(inv, upper=True)
        del inv
        return upper.float().numpy()
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- file
def standin_metadata(config: StandinConfig, *, source: Path, source_sha256: str,
                     text_sha256: str, calib_tokens: int) -> dict[str, Any]:
    """The ``autobits.standin.*`` keys recorded in a stand-in file."""
    meta: dict[str, Any] = {
        "version": STANDIN_VERSION,
        "method": ("every quantized element moved >= offset grid steps off its source grid, "
                   "column by column with GPTQ error feedback through the calibration "
                   "second moment (tied token_embd: no feedback); float tensors copied"),
        "source": source.name,
        "source_sha256": source_sha256,
        "text_sha256": text_sha256,
        "calib_tokens": int(calib_tokens),
    }
    for k, v in asdict(config).items():
        meta[k] = v
    return {META_PREFIX + k: v for k, v in meta.items()}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _text_sha256(text: str) -> str:
    from autobits.text import load_text

    return load_text(text).sha256


def _load_source(source: Path):
    """The source model, in float32 (the one place a build loads it)."""
    from autobits.model import load_model

    return load_model(source)


def _source_windows(source: Path, config: StandinConfig):
    """The source model, its calibration windows and the text's sha256."""
    from autobits.text import load_text, make_windows

    lm = _load_source(source)
    corpus = load_text(config.text)
    split = make_windows(corpus, lm.tokenizer, ctx=config.ctx).split(
        calib=config.calib_windows, eval=0)
    return lm, split.calib, corpus.sha256


def _calibrate_with(lm, windows, config: StandinConfig, tensors=None):
    """Input second moments of ``tensors`` (None: every tensor) of the source model."""
    from autobits.calibrate import calibrate

    # two windows at once, torch's threads 1 each (faster than one window on all cores,
    # above all on a shared machine); the sums are merged in a fixed order: deterministic
    return calibrate(lm, windows, fisher_windows=0, seed=config.seed, progress=False,
                     workers=_CALIB_WORKERS, tensors=tensors)


def _calibrate(source: Path, config: StandinConfig):
    """Input second moments of the source model on the calibration windows."""
    lm, windows, text_sha = _source_windows(source, config)
    return _calibrate_with(lm, windows, config), text_sha


def _site_bytes(d: int) -> int:
    """Calibration memory of a ``d``-channel input site: the accumulators of every
    calibration worker and the finished float32 ``H``."""
    from autobits.calibrate import accumulator_bytes

    return _CALIB_WORKERS * accumulator_bytes(d) + 4 * int(d) * int(d)


@dataclass(frozen=True)
class _Group:
    """Tensors calibrated together: ``blocks`` (in file order; empty for the head's group),
    ``tensors`` the quantized tensors whose input sites are measured, ``nbytes`` what their
    statistics take (:func:`_site_bytes` per site)."""

    blocks: tuple[int, ...]
    tensors: tuple[str, ...]
    nbytes: int

    @property
    def label(self) -> str:
        return "head" if not self.blocks else "blocks " + ",".join(map(str, self.blocks))


def _feedback_sites(tensors, config: StandinConfig) -> dict[str, tuple[str, int]]:
    """Tensor name -> (input site, channels) of every tensor moved with error feedback:
    the quantized tensors of the source that a calibration measures (a tied or untied
    ``token_embd`` never: it is moved without feedback), in file order."""
    from autobits.calibrate import site_of
    from autobits.specs import QUANTIZABLE_ROLES, TensorSpec, block_of, role_of

    out: dict[str, tuple[str, int]] = {}
    if not config.feedback:
        return out
    for t in tensors:
        role = role_of(t.name)
        if (t.tensor_type.name in FLOAT_TYPES or role not in QUANTIZABLE_ROLES
                or role == "token_embd" or len(t.shape) != 2):
            continue
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        spec = TensorSpec(name=t.name, shape=shape, role=role, block=block_of(t.name))
        out[t.name] = (site_of(spec), shape[-1])
    return out


def calibration_bytes(sites: dict[str, int]) -> int:
    """Memory a calibration pass of these input sites (site -> channels) takes: every
    calibration worker's float64 accumulators and the finished float32 ``H``."""
    return sum(_site_bytes(d) for d in sites.values())


def _plan_groups(tensors, config: StandinConfig, budget: int,
                 head_d: int | None) -> list[_Group] | None:
    """The calibration groups of a source (None: one pass over the whole model fits).

    ``head_d``: the channels of the head's input (the one-pass calibration measures it
    whatever the tensors).  Blocks are grouped as they follow one another in the file
    (llama.cpp lists ``blk.0, blk.1, blk.10, ...``), each group within ``budget``, so as
    to run the fewest blocks in all: a group's pass runs up to its highest block.
    """
    from autobits.calibrate import HEAD_SITE
    from autobits.specs import block_of

    need = _feedback_sites(tensors, config)
    every = {site: d for site, d in need.values()}
    if head_d is not None:
        every.setdefault(HEAD_SITE, head_d)
    total = calibration_bytes(every)
    if total <= budget or not need:  # (no tensor moved with feedback: the pass of old)
        return None
    groups: list[_Group] = []
    head = [n for n in need if block_of(n) is None]
    if head:
        groups.append(_Group((), tuple(head), calibration_bytes(dict(need[n] for n in head))))
    order: list[int] = []  # blocks in file order
    sites_of: dict[int, dict[str, int]] = {}
    names_of: dict[int, list[str]] = {}
    for n, (site, d) in need.items():
        b = block_of(n)
        if b is None:
            continue
        if b not in sites_of:
            order.append(b)
            sites_of[b], names_of[b] = {}, []
        sites_of[b][site] = d
        names_of[b].append(n)
    cost = [calibration_bytes(sites_of[b]) for b in order]
    for b, c in zip(order, cost):
        if c > budget:
            raise StandinError(f"block {b} alone needs {c:,} bytes of calibration statistics, "
                               f"more than the budget of {budget:,}; raise calibration_budget")
    # best[i]: (blocks run, passes) of the best grouping of order[:i]; cut[i]: where its
    # last group starts
    best, cut = [(0, 0)] + [None] * len(order), [0] * (len(order) + 1)
    for i in range(1, len(order) + 1):
        size = 0
        for j in range(i - 1, -1, -1):
            size += cost[j]
            if size > budget:
                break
            run = (best[j][0] + max(order[j:i]) + 1, best[j][1] + 1)
            if best[i] is None or run < best[i]:
                best[i], cut[i] = run, j
    spans, i = [], len(order)
    while i > 0:
        spans.append((cut[i], i))
        i = cut[i]
    for j, i in reversed(spans):
        blocks = tuple(order[j:i])
        groups.append(_Group(blocks, tuple(n for b in blocks for n in names_of[b]),
                             sum(cost[j:i])))
    log.info("calibration statistics of %d bytes exceed the budget of %d: %d groups, %d "
             "blocks run of %d (%s)", total, budget, len(groups), best[-1][0], len(order),
             "; ".join(g.label for g in groups))
    return groups


def calibration_name(source_sha256: str, config: StandinConfig) -> str:
    """File name of the calibration a stand-in of that source and config uses (cacheable:
    the calibration pass is most of a stand-in's build time).  It holds the stand-in
    version, since a version may change the calibration itself (v2: its windows' tokens)."""
    return (f"calibration-v{STANDIN_VERSION}-{source_sha256[:12]}-{config.calib_windows}x"
            f"{config.ctx}-{hashlib.sha256(config.text.encode()).hexdigest()[:8]}.npz")


def build_standin(source: str | os.PathLike, out_path: str | os.PathLike, *,
                  config: StandinConfig = StandinConfig(),
                  calibration_dir: str | os.PathLike | None = None,
                  calibration_budget: int = CALIBRATION_BUDGET) -> Path:
    """Write the float stand-in of the quantized GGUF ``source`` to ``out_path`` (F32).

    All of the source's metadata (tokenizer included) is kept, ``general.file_type`` is
    set to ALL_F32 and the construction is recorded (:func:`standin_metadata`).  The file
    is written under a temporary name in the target folder and renamed when complete.

    ``calibration_budget``: the bytes of calibration statistics one pass may hold
    (:func:`calibration_bytes`; default :data:`CALIBRATION_BUDGET`).  Within it, the whole
    model is calibrated at once; with ``calibration_dir`` that calibration is read from
    there when present (:func:`calibration_name`) and saved there otherwise.  Above it, the
    model is calibrated in groups of blocks (module docstring) and nothing is cached (a
    group's statistics are used once, and Qwen2.5-Coder-1.5B's would take 10 GB of disk);
    the model stays loaded meanwhile.  The file is the same bytes either way.
    """
    import gguf

    from autobits.calibrate import Calibration
    from autobits.names import SUPPORTED_ARCHITECTURES

    source, out = Path(source), Path(out_path)
    t0 = time.perf_counter()
    try:
        reader = GGUFSource(source)
    except ModelLoadError as e:
        raise StandinError(f"{str(source)!r} is not a readable GGUF file ({e})") from None
    arch = reader.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise StandinError(f"{str(source)!r}: unsupported architecture {arch!r}")
    if isinstance(calibration_budget, bool) or not isinstance(calibration_budget, int) \
            or calibration_budget <= 0:
        raise StandinError(f"calibration_budget must be a positive number of bytes, got "
                           f"{calibration_budget!r}")
    source_sha = _sha256(source)
    output = next((t for t in reader.tensors if t.name == "output.weight"), None)
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    head = output if output is not None else embd
    groups = _plan_groups(reader.tensors, config, calibration_budget,
                          None if head is None else int(head.shape[0]))
    lm = windows = None
    if groups is None:
        calib_path = (None if calibration_dir is None
                      else Path(calibration_dir) / calibration_name(source_sha, config))
        if calib_path is not None and calib_path.is_file():
            calib = Calibration.load(calib_path)
            text_sha = _text_sha256(config.text)
        else:
            calib, text_sha = _calibrate(source, config)
            if calib_path is not None:
                calib.save(calib_path)
        log.info("stand-in of %s: calibrated on %d tokens in %.1fs", source.name,
                 calib.n_tokens, time.perf_counter() - t0)
        n_tokens = calib.n_tokens
    else:
        calib = None
        lm, windows, text_sha = _source_windows(source, config)
        n_tokens = int(windows.size)
    meta = standin_metadata(config, source=source, source_sha256=source_sha,
                            text_sha256=text_sha, calib_tokens=n_tokens)
    with atomic_path(out, suffix=".partial") as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        try:
            reader.copy_kv(writer, skip={"general.architecture", "general.file_type"})
            writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
            for k, v in meta.items():
                _add_meta(writer, k, v)
            for t in reader.tensors:
                shape = tuple(int(x) for x in reversed(t.shape.tolist()))
                writer.add_tensor_info(t.name, shape, np.dtype(np.float32),
                                       int(np.prod(shape, dtype=np.int64)) * 4)
            writer.write_header_to_file(tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            if groups is None:
                _write_tensors(writer, list(enumerate(reader.tensors)), calib, config)
            else:
                _write_grouped(writer, reader.tensors, groups, lm, windows, config)
        finally:
            writer.close()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
    log.info("wrote stand-in %s (%d bytes) in %.1fs", out, out.stat().st_size,
             time.perf_counter() - t0)
    return out


def _write_grouped(writer, tensors, groups: list[_Group], lm, windows,
                   config: StandinConfig) -> None:
    """Every tensor's stand-in values, written in file order, calibrating one group at a
    time: a run of tensors is written with the calibration of the group its tensors need
    (tensors needing none go with the run before them); a group's statistics are freed
    when the next group is calibrated."""
    group_of = {n: g for g in groups for n in g.tensors}
    runs: list[tuple[_Group | None, list]] = []
    for item in enumerate(tensors):
        g = group_of.get(item[1].name)
        if not runs or (g is not None and g is not runs[-1][0]):
            if runs and runs[-1][0] is None and g is not None:
                runs[-1] = (g, runs[-1][1])  # the leading tensors without a group
            else:
                runs.append((g, []))
        runs[-1][1].append(item)
    done: set[int] = set()
    calib = current = None
    for g, items in runs:
        if g is not None and g is not current:
            if id(g) in done:
                log.warning("stand-in: the file lists %s's tensors apart; calibrating it again",
                            g.label)
            calib = None  # the previous group's statistics go before the next are measured
            t0 = time.perf_counter()
            calib = _calibrate_with(lm, windows, config, tensors=g.tensors)
            current = g
            done.add(id(g))
            log.info("stand-in: calibrated %s (%d tensors, %d sites, %d bytes of statistics) "
                     "in %.1fs", g.label, len(g.tensors), len(calib.sites), g.nbytes,
                     time.perf_counter() - t0)
        _write_tensors(writer, items, calib, config)


def _write_tensors(writer, jobs: list, calib, config: StandinConfig) -> None:
    """Stand-in values of ``jobs`` (``(index in the file, tensor)``, in file order),
    written in that order; ``calib``: the calibration of their inputs (None: none needed).

    Tensors are independent (each has its own seeded signs), so they are made on one thread
    per core (torch's own thread count 1 meanwhile), a few per thread at a time.
    """
    from autobits.threads import thread_map

    factors = _SiteFactors(calib, config, [t.name for _, t in jobs])
    workers = max(1, os.cpu_count() or 1)
    batch = _TENSORS_PER_THREAD * workers

    def job(item) -> np.ndarray:
        i, t = item
        return _standin_tensor(t, calib, config, i, factors)

    for s in range(0, len(jobs), batch):
        for data in thread_map(job, jobs[s : s + batch], workers, "standin"):
            writer.write_tensor_data(data)


class _SiteFactors:
    """:func:`inverse_factor` of each input site's ``H``, computed once for the tensors that
    read that input (attention q/k/v, ffn gate/up) and dropped after the last of them.
    Thread-safe: a site's factor is computed by the first thread asking for it."""

    def __init__(self, calib, config: StandinConfig, names: list[str]):
        import threading

        self.calib, self.damp = calib, config.damp
        self.users: dict[str, int] = {}
        if config.feedback and calib is not None:
            for name in names:
                site = calib.tensor_site.get(name)
                if site is not None:
                    self.users[site] = self.users.get(site, 0) + 1
        self.factors: dict[str, list] = {}  # site -> [lock, factor or None]
        self.lock = threading.Lock()

    def take(self, name: str) -> np.ndarray:
        """The factor for tensor ``name`` (one with a site), counted as used."""
        import threading

        site = self.calib.tensor_site[name]
        with self.lock:
            entry = self.factors.setdefault(site, [threading.Lock(), None])
        with entry[0]:
            if entry[1] is None:
                entry[1] = inverse_factor(self.calib.hessian(name), self.damp)
        with self.lock:
            self.users[site] -= 1
            if self.users[site] == 0:
                del self.factors[site]
        return entry[1]


def _standin_tensor(t, calib, config: StandinConfig, index: int,
                    factors: _SiteFactors) -> np.ndarray:
    import gguf

    from autobits.formats import get_format

    type_name = t.tensor_type.name
    shape = tuple(int(x) for x in reversed(t.shape.tolist()))
    if type_name in FLOAT_TYPES:
        values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        return np.ascontiguousarray(values, dtype=np.float32).reshape(shape)
    try:
        fmt = get_format(type_name)
    except AutobitsError:
        raise StandinError(f"tensor {t.name!r} has ggml type {type_name}, which autobits "
                           f"cannot read") from None
    raw = np.asarray(t.data).reshape(-1, np.asarray(t.data).shape[-1])
    cols = shape[-1]
    h = (calib.hessian(t.name)
         if config.feedback and calib is not None and t.name in calib.tensor_site else None)
    u = factors.take(t.name) if h is not None else None
    rng = np.random.default_rng([config.seed, index])
    t0 = time.perf_counter()
    # every row is on its own (with feedback: given the shared factor), so row chunks bound
    # the memory of an embedding or a vocabulary head
    step_rows = _FEEDBACK_ROWS if h is not None else _CHUNK_ROWS
    out = np.empty((raw.shape[0], cols), dtype=np.float32)
    for r in range(0, raw.shape[0], step_rows):
        part = raw[r : r + step_rows]  # dequantized a chunk at a time too (rows are blocks)
        w2 = fmt.dequantize(part, (part.shape[0], cols)).astype(np.float32)
        a, st = grid_of(part, type_name)
        out[r : r + step_rows] = perturb_tensor(w2, a, st, h=h, config=config, rng=rng,
                                                factor=u)
    log.debug("stand-in %s (%s, %s): %.2fs", t.name, type_name,
              "feedback" if h is not None and config.feedback else "no feedback",
              time.perf_counter() - t0)
    return np.ascontiguousarray(out.reshape(shape))


def _add_meta(writer, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_int64(key, value)
    elif isinstance(value, float):
        writer.add_float64(key, value)
    else:
        writer.add_string(key, str(value))
