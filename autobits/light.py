"""The light path: a candidate table from a GGUF file's weights and an importance matrix alone.

The full path (:func:`autobits.pipeline.prepare`) loads the model into torch in float32, runs
a calibration pass with a backward pass for the output Fisher, and quantizes every tensor
whole to every candidate format.  :func:`light_candidates` needs none of that, so it runs on
models of any size:

* the GGUF file's header is scanned once (:func:`autobits.gguf_scan.scan_gguf_header`: the
  tensors' names, shapes, types and offsets; no metadata parsing, no tokenizer);
* tensor by tensor, a deterministic sample of whole rows (:func:`sample_rows`: at most
  :attr:`LightConfig.rows` rows and about :attr:`LightConfig.max_values` values) is read
  from the file (positioned reads of those rows' bytes only) and dequantized with the
  project's formats (gguf-py's dequantizer for a source type autobits does not write);
* each candidate format (the same candidates and validity rules as the full path:
  :data:`~autobits.specs.DEFAULT_CANDIDATES`, :meth:`TensorSpec.valid_formats`) quantizes
  those rows with the tensor's importance vector, as llama.cpp's quantizer does with an
  imatrix, and its error is measured on them; its bytes are exact, for the whole tensor
  (:meth:`TensorSpec.nbytes`).

Memory is the sampled rows of the tensors in flight (a few MB each); no float copy of a
whole tensor is ever made, and the file is not mapped.  The result is an ordinary
:class:`~autobits.candidates.CandidateTable`, so every solver and agent works unchanged.

**The error, and why it is on one scale across tensors.**  With ``D`` the importance vector
of the tensor's input (``E[x_i^2]`` per input channel, llama.cpp's imatrix; all ones
without one) and ``W`` the sampled rows, a format's error is

    e(t, f) = gain(t) * sum_ij D_j (Q_f(W) - W)_ij^2 / sum_ij D_j W_ij^2

The ratio is the noise-to-signal ratio at the tensor's output under the diagonal
approximation of ``H = E[x x^T]``: ``tr(dW diag(D) dW^T) / tr(W diag(D) W^T)``.  It does
not depend on the tensor's weight scale or its input's magnitude, which differ between
tensors by orders of magnitude.  The full path's Fisher proxy
``1/2 sum_j F_j (dW H dW^T)_jj`` (an estimate of the KLD the tensor adds) is that ratio
times ``G_t = 1/2 sum_j F_j (W diag(D) W^T)_jj``, the Fisher-weighted output energy of the
tensor, whenever the error spreads over the output channels as the energy does.  ``G_t``
needs a backward pass; the light path predicts it (:func:`tensor_gain`):

    gain(t) = ROLE_GAINS[role][0] * kappa_t      with an importance vector
    gain(t) = ROLE_GAINS[role][1]                without an imatrix file

where ``kappa_t = sqrt(max_i D_i / median_i D_i)`` is the crest factor of the input's
channel RMS (:func:`crest_factor`).  ``kappa`` is what explains the largest gains: the
tensors that read the model's massive activations (ffn_down of a few blocks, kappa of
several hundred) have Fisher-weighted output energies up to e^5 above the median, and no
role or depth rule sees that.  A tied ``token_embd`` is both the lookup and the output
head: its gain is the sum of both roles' (the head's with kappa of the head input).  With
an imatrix file, a tensor that has no vector in it (an untied ``token_embd``, whose input
is one-hot) takes its unweighted gain times :data:`WEIGHTED_SCALE`, the factor between
the two columns' scales.

The constants were fitted once (:data:`GAINS_SOURCE`; ``python -m bench.light_gains``
reprints them from a model's full calibration); ``LightConfig(gains=False)`` drops them
(every tensor's gain 1: the plain relative error).
"""

from __future__ import annotations

import logging
import os
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from autobits.candidates import Candidate, CandidateTable
from autobits.errors import AllocationError, AutobitsError, ModelLoadError
from autobits.formats import FORMAT_TABLE, get_format
from autobits.gguf_scan import GGUFTensor, scan_gguf_header, tensor_table
from autobits.names import SUPPORTED_ARCHITECTURES
from autobits.specs import (
    DEFAULT_CANDIDATES, QUANTIZABLE_ROLES, TensorSpec, block_of, order_specs, role_of,
)

__all__ = [
    "GAINS_SOURCE", "ROLE_GAINS", "WEIGHTED_SCALE", "GGUFWeights", "LightConfig",
    "crest_factor", "light_candidates", "open_gguf", "relative_errors", "sample_rows",
    "tensor_gain",
]  # fmt: skip

log = logging.getLogger(__name__)

#: Role -> (gain with an importance vector, multiplied by the tensor's crest factor; gain
#: without an imatrix file), relative to the model's median tensor.  Each is the median over
#: the role's tensors of ``log G_t - log kappa_t`` (first column) or ``log G_t`` (second),
#: minus that quantity's median over all linear tensors (:data:`GAINS_SOURCE`).
#: ``token_embd`` is the lookup alone (its input is one-hot: no vector, second column only);
#: ``output`` the head, fitted on the head part of SmolLM2's tied embedding.
ROLE_GAINS: Mapping[str, tuple[float | None, float]] = {
    "token_embd": (None, 23.9),
    "attn_q": (0.45, 0.99),
    "attn_k": (0.97, 2.5),
    "attn_v": (0.63, 1.46),
    "attn_output": (1.26, 0.54),
    "ffn_gate": (1.10, 0.93),
    "ffn_up": (1.28, 1.00),
    "ffn_down": (1.60, 1.08),
    "output": (311.0, 789.0),
}
#: exp(median log G_t - median (log G_t - log kappa_t)): a tensor without an importance
#: vector in a run with an imatrix file takes its second-column gain times this.
WEIGHTED_SCALE = 13.2
#: Where :data:`ROLE_GAINS` and :data:`WEIGHTED_SCALE` come from.
GAINS_SOURCE = (
    "smollm2-135m-float (stand-in v2, 30 blocks, tied embedding): the full path's calibration "
    "(8 stdlib windows x 512 tokens, output Fisher on 4), G_t = 1/2 sum_j F_j sum_i D_i W_ji^2 "
    "per quantizable tensor; log G_t regressed on the role alone explains 19% of its variance, "
    "on the role and log kappa_t 54% (slope 0.50 on log max/median D, i.e. kappa^1.0); a "
    "piecewise-linear depth profile added 3% more and was left out"
)

#: Quantizable tensors of this role read one-hot tokens (no input statistics).
_LOOKUP = "token_embd"


@dataclass(frozen=True)
class LightConfig:
    """How the light path samples and weighs.  Validated on construction."""

    #: most rows sampled per tensor (a tensor with fewer is read whole)
    rows: int = 256
    #: about this many values (rows x row length) per tensor: fewer rows for long rows
    max_values: int = 1 << 17
    #: at least this many rows (when the tensor has them), whatever the row length
    min_rows: int = 16
    #: seed of the row sample (mixed with each tensor's name)
    seed: int = 0
    #: candidate formats (each tensor gets those that fit its rows)
    formats: tuple[str, ...] = DEFAULT_CANDIDATES
    #: apply :data:`ROLE_GAINS` and the crest factor (False: every gain is 1)
    gains: bool = True

    def __post_init__(self) -> None:
        for key in ("rows", "max_values", "min_rows"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise AutobitsError(f"LightConfig.{key} must be a positive count, got {value!r}")
        if self.min_rows > self.rows:
            raise AutobitsError(f"LightConfig.min_rows ({self.min_rows}) exceeds rows ({self.rows})")
        if not self.formats:
            raise AutobitsError("LightConfig.formats is empty")
        object.__setattr__(self, "formats", tuple(get_format(f).name for f in self.formats))


# ------------------------------------------------------------------------ the file
class GGUFWeights:
    """A GGUF file's tensors: its :class:`TensorSpec` list (the full path's names, roles and
    quantizable set) and the rows of any 2-D tensor on demand, read from the open file.
    Open with :func:`open_gguf`."""

    def __init__(self, path: Path, name: str, architecture: str,
                 tensors: Mapping[str, GGUFTensor]):
        self._fd = None
        self.path, self.name, self.architecture = path, name, architecture
        self.tensors = dict(tensors)
        specs = []
        for t in self.tensors.values():
            role = role_of(t.name)
            specs.append(TensorSpec(name=t.name, shape=t.shape, role=role, block=block_of(t.name),
                                    source_type=t.type_name,
                                    quantizable=role in QUANTIZABLE_ROLES and len(t.shape) == 2))
        self.specs: tuple[TensorSpec, ...] = order_specs(specs)
        self._fd = os.open(path, os.O_RDONLY)

    def close(self) -> None:
        """Close the file (also when garbage-collected)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    __del__ = close

    @property
    def quantizable(self) -> tuple[TensorSpec, ...]:
        return tuple(s for s in self.specs if s.quantizable)

    @property
    def tied(self) -> bool:
        """Whether ``token_embd`` is also the output head (the file has no ``output.weight``)."""
        return "output.weight" not in self.tensors

    def read_rows(self, name: str, index: np.ndarray) -> np.ndarray:
        """Rows ``index`` (sorted) of tensor ``name``, dequantized: float32
        ``(len(index), row_length)``.

        Only those rows' bytes are read, one positioned read per run of consecutive rows
        (thread-safe; nothing is mapped, so the pages of the rows not read never count in
        this process's memory)."""
        t = self.tensors[name]
        index = np.asarray(index, dtype=np.int64)
        row_bytes = t.nbytes // t.n_rows
        raw = np.empty((len(index), row_bytes), dtype=np.uint8)
        cuts = [0, *(np.flatnonzero(np.diff(index) != 1) + 1).tolist(), len(index)]
        for a, b in zip(cuts, cuts[1:]):
            at, n = t.start + int(index[a]) * row_bytes, (b - a) * row_bytes
            buf = os.pread(self._fd, n, at)
            if len(buf) != n:
                raise ModelLoadError(f"{str(self.path)!r} ended while reading tensor {name!r} "
                                     f"(byte {at + len(buf):,}): was it truncated meanwhile?")
            raw[a:b] = np.frombuffer(buf, dtype=np.uint8).reshape(b - a, row_bytes)
        shape = (len(index), t.row_length)
        if t.type_name in FORMAT_TABLE:
            return get_format(t.type_name).dequantize(raw, shape)
        import gguf

        return np.asarray(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(t.type_id)),
                          dtype=np.float32).reshape(shape)


def open_gguf(model: str | os.PathLike) -> GGUFWeights:
    """Open a built-in model name or a GGUF file for the light path (milliseconds: the
    header is scanned, nothing is parsed or loaded).  A folder, a corrupt or truncated file,
    or an unsupported architecture is a :class:`ModelLoadError`."""
    from autobits.registry import resolve_model_path

    path = resolve_model_path(model)
    if path.is_dir():
        raise ModelLoadError(f"{str(path)!r} is a folder: the light path reads GGUF files "
                             f"(convert a Hugging Face folder with llama.cpp's converter first)")
    header = scan_gguf_header(path)  # magic, version and every count checked against the size
    if header.architecture not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(f"{str(path)!r}: unsupported architecture {header.architecture!r}; "
                             f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    tensors = tensor_table(path, header)  # types, whole blocks, inside the file, once each
    weights = GGUFWeights(path, str(model), header.architecture, tensors)
    if not weights.quantizable:
        raise ModelLoadError(f"{str(path)!r} has no quantizable weight tensor")
    return weights


# ------------------------------------------------------------------------ the errors
def sample_rows(n_rows: int, row_length: int, name: str, config: LightConfig) -> np.ndarray:
    """The sorted row indices the light path reads of a tensor: every row when there are at
    most ``min(config.rows, max(config.min_rows, config.max_values // row_length))``, else
    that many drawn without replacement, seeded by ``config.seed`` and the tensor's name
    (the same rows on every run and machine)."""
    k = min(n_rows, config.rows, max(config.min_rows, config.max_values // max(1, row_length)))
    if k >= n_rows:
        return np.arange(n_rows, dtype=np.int64)
    rng = np.random.default_rng([config.seed, zlib.crc32(name.encode())])
    return np.sort(rng.choice(n_rows, size=k, replace=False)).astype(np.int64)


def relative_errors(w: np.ndarray, importance: np.ndarray | None, formats, *,
                    tensor: str | None = None) -> dict[str, float]:
    """Format -> ``sum_ij D_j (Q(W) - W)_ij^2 / sum_ij D_j W_ij^2`` over the rows ``w``
    (``D`` the importance vector, ones when None; each format quantizes with it, as
    llama.cpp's quantizer does with an imatrix).  All zeros when ``w`` is all zero."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    d = None if importance is None else np.asarray(importance, dtype=np.float64)
    wsq = np.square(w, dtype=np.float64)
    energy = float((wsq @ d).sum() if d is not None else wsq.sum())
    out = {}
    for name in formats:
        f = get_format(name)
        diff = np.square(f.dequantize(f.quantize(w, importance, tensor=tensor), w.shape) - w,
                         dtype=np.float64)
        err = float((diff @ d).sum() if d is not None else diff.sum())
        out[f.name] = err / energy if energy > 0 else 0.0
    return out


def crest_factor(importance: np.ndarray) -> float:
    """``sqrt(max_i D_i / median_i D_i)``: the peak channel RMS of a tensor's input over the
    median one (1 when the median is 0)."""
    d = np.asarray(importance, dtype=np.float64)
    med = float(np.median(d))
    return float(np.sqrt(d.max() / med)) if med > 0 else 1.0


def tensor_gain(spec: TensorSpec, importance: np.ndarray | None, *, weighted: bool,
                tied: bool) -> float:
    """The predicted Fisher-weighted output energy of ``spec`` relative to the model's median
    tensor (module docstring): ``weighted`` is True when the run has an imatrix file,
    ``importance`` the tensor's vector in it (None: none), ``tied`` whether a
    ``token_embd`` is also the head."""
    def one(role: str, vec) -> float:
        with_vec, plain = ROLE_GAINS[role]
        if not weighted:
            return plain
        if vec is None or with_vec is None:
            return plain * WEIGHTED_SCALE
        return with_vec * crest_factor(vec)

    if spec.role == _LOOKUP and tied:
        return one(_LOOKUP, None) + one("output", importance)
    return one(spec.role, importance)


# ------------------------------------------------------------------------ the table
def _importance_of(imatrix, weights: GGUFWeights) -> dict[str, np.ndarray] | None:
    from autobits.imatrix import Imatrix, read_imatrix

    if imatrix is None:
        return None
    imx = imatrix if isinstance(imatrix, Imatrix) else read_imatrix(imatrix)
    return imx.importance_for(weights.specs, model=weights.name)


def light_candidates(
    *, model: str | os.PathLike | GGUFWeights, imatrix=None, config: LightConfig | None = None,
    workers: int | None = None, progress: bool = False,
) -> CandidateTable:
    """The light path's :class:`CandidateTable` of a GGUF model (module docstring).

    ``model``: a built-in name, a GGUF path, or an :func:`open_gguf` result; ``imatrix``: a
    llama.cpp imatrix file (path) or an :class:`~autobits.imatrix.Imatrix`, matched by
    tensor name and row length (:meth:`Imatrix.importance_for`), or None (unweighted);
    ``workers``: threads measuring tensors (default: the CPU count).  ``meta`` records the
    weighting, the sample sizes, the config and the timings.
    """
    from tqdm.auto import tqdm

    config = config or LightConfig()
    weights = model if isinstance(model, GGUFWeights) else open_gguf(model)
    importance = _importance_of(imatrix, weights)
    weighted = importance is not None
    specs = weights.quantizable
    valid = {s.name: s.valid_formats(config.formats) for s in specs}
    misfit = [n for n, v in valid.items() if not v]
    if misfit:
        raise AllocationError(f"tensors {misfit[:5]} fit none of the formats {list(config.formats)}")
    n_workers = max(1, int(workers or os.cpu_count() or 1))

    def job(spec: TensorSpec):
        t0 = time.perf_counter()
        t = weights.tensors[spec.name]
        rows = sample_rows(t.n_rows, t.row_length, spec.name, config)
        w = weights.read_rows(spec.name, rows)
        t1 = time.perf_counter()
        vec = importance.get(spec.name) if weighted else None
        rel = relative_errors(w, vec, valid[spec.name], tensor=spec.name)
        gain = tensor_gain(spec, vec, weighted=weighted, tied=weights.tied) if config.gains else 1.0
        opts = tuple(Candidate(f, spec.nbytes(f), rel[f] * gain) for f in valid[spec.name])
        return spec.name, opts, len(rows), w.size, gain, t1 - t0, time.perf_counter() - t1

    t_start = time.perf_counter()
    options, gains = {}, {}
    read_s = quant_s = 0.0
    rows_read = values_read = 0
    order = sorted(specs, key=lambda s: -min(s.numel, config.max_values) * len(valid[s.name]))
    with ThreadPoolExecutor(n_workers, thread_name_prefix="light") as pool, \
            tqdm(total=len(order), desc="light candidates", unit="tensor",
                 disable=not progress) as bar:
        for name, opts, n_rows, n_values, gain, rs, qs in pool.map(job, order):
            options[name], gains[name] = opts, gain
            rows_read += n_rows
            values_read += n_values
            read_s += rs
            quant_s += qs
            bar.update()
    wall = time.perf_counter() - t_start
    meta = {
        "light": True, "source": str(weights.path), "weighting": "imatrix" if weighted else "none",
        "imatrix": None if imatrix is None else str(getattr(imatrix, "path", imatrix)),
        "gains": "ROLE_GAINS x crest factor" if config.gains and weighted else
                 ("ROLE_GAINS" if config.gains else "none"),
        "tensor_gains": gains, "formats": list(config.formats), "workers": n_workers,
        "rows_read": rows_read, "values_read": values_read,
        "values_total": int(sum(s.numel for s in specs)), "config": asdict(config),
        "timing": {"wall": wall, "read": read_s, "quantize": quant_s},
    }  # fmt: skip
    log.info("light candidates of %s: %d tensors, %d candidates, %.1fs (%s of %s values read, "
             "%s weighting)", weights.name, len(options), sum(map(len, options.values())), wall,
             f"{values_read:,}", f"{meta['values_total']:,}", meta["weighting"])
    return CandidateTable(model=weights.name, specs=weights.specs,
                          options={s.name: options[s.name] for s in specs}, meta=meta)
