"""The candidate table and per-tensor sensitivity features (the observation).

:func:`proxy_error` (from :mod:`autobits.proxy`, re-exported here) is the GPTQ/HAWQ
quadratic form ``tr(dW H dW^T)`` of a weight perturbation, optionally weighted per output
channel by the output Fisher (then an estimate of the KLD it adds, see
:mod:`autobits.calibrate`); :class:`TensorProxy` applies it to one tensor of a calibrated
model (the token embedding included).

:func:`build_candidates` quantizes every quantizable tensor to every valid candidate format
once, records the exact bytes and the proxy error (:class:`TensorProxy`:
by default the Fisher-weighted ``tr(dW H dW^T)``, an estimate of the KLD the tensor adds, in
nats per token) and leaves the quantized bytes in the evaluator's
:class:`~autobits.evaluate.WeightCache`.

:func:`extract_features` turns a :class:`~autobits.calibrate.Calibration` and a
:class:`~autobits.candidates.CandidateTable` into a :class:`FeatureTable`: one fixed vector
per quantizable tensor (model order).  Quantities that carry a model's units (activation
and weight scale, Hessian traces, proxy errors) are normalised *within the model* (robust
z-score: ``(v - median) / (1.4826 * MAD)``, or a natural log-ratio to the model median), so
that a policy trained on one model reads another; dimensionless quantities (kurtosis,
fractions, depth, role, shape ratios) are used as they are.  Every feature is clipped to the
range below.

================  ==================================================================  =========
name              meaning                                                             range
================  ==================================================================  =========
act_absmean       robust z of log mean over input channels of E|x|                    [-5, 5]
act_kurtosis      log(kurtosis / 3) of the input, pooled over tokens and channels     [-3, 10]
act_outlier_frac  fraction of input channels whose RMS exceeds 6x the median RMS       [0, 1]
w_std             robust z of log std(W)                                              [-5, 5]
w_kurtosis        log(kurtosis / 3) of the weights                                    [-3, 10]
w_outliers        (log10(fraction of |w - mean| > 6 std + 1e-6) + 6) / 6              [0, 1]
hess_trace        robust z of log(tr(H) * mean(W^2)) (GPTQ/HAWQ sensitivity)          [-5, 5]
fisher_trace      robust z of log(1/2 sum_j F_j * tr(H) * mean(W^2)); 0 w/o Fisher   [-5, 5]
proxy_err         log(e_ref / model median), e_ref the proxy error at the ref format  [-10, 10]
proxy_slope       log(s / model median), s the error saved per byte, ref -> high      [-10, 10]
proxy_decay       log2(e_ref / e_high) / (bpw_high - bpw_ref): error decay per bit    [-1, 4]
depth             block / (n_blocks - 1); token_embd 0, output 1                       [0, 1]
param_share       log(numel / mean numel of the quantizable tensors)                  [-5, 5]
fan_ratio         log2(row length / rows), i.e. fan-in over fan-out                   [-8, 8]
role_<r>          one-hot role, r in QUANTIZABLE_ROLES (9 columns)                     {0, 1}
================  ==================================================================  =========

``H`` is the input second moment (:meth:`Calibration.hessian`; for ``token_embd`` the token
frequencies, plus the head's ``H`` when tied), ``F`` the output Fisher diagonal.  The
reference format is ``Q4_0`` and the high format ``Q8_0``; where one does not fit a tensor,
the valid non-float format nearest in bits per weight stands in (recorded in ``raw``).  The
input of an untied ``token_embd`` is one-hot tokens: its three activation features are 0.
A tied ``token_embd`` takes the activation statistics of the head input it also multiplies.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from autobits.calibrate import Calibration, CalibrationError
from autobits.candidates import Candidate, CandidateTable
from autobits.errors import AllocationError
from autobits.formats import get_format
from autobits.proxy import (
    WEIGHTINGS, TensorProxy, embedding_proxy_error, hessian_factor, proxy_error,
    row_errors, site_factor_key,
)  # fmt: skip
from autobits.specs import DEFAULT_CANDIDATES, QUANTIZABLE_ROLES
from autobits.stages import StageTask
from autobits.threads import thread_map

__all__ = [
    "FEATURE_NAMES", "FEATURE_RANGES", "FEATURE_SPEC_VERSION", "WEIGHTINGS", "FeatureTable",
    "TensorProxy", "build_candidates", "embedding_proxy_error", "extract_features",
    "hessian_factor", "proxy_error", "row_errors",
]  # fmt: skip

log = logging.getLogger(__name__)

#: Bumped whenever a feature's definition, order or normalisation changes (saved policies
#: pin it).
FEATURE_SPEC_VERSION = 1

_BASE = (
    ("act_absmean", (-5.0, 5.0)), ("act_kurtosis", (-3.0, 10.0)), ("act_outlier_frac", (0.0, 1.0)),
    ("w_std", (-5.0, 5.0)), ("w_kurtosis", (-3.0, 10.0)), ("w_outliers", (0.0, 1.0)),
    ("hess_trace", (-5.0, 5.0)), ("fisher_trace", (-5.0, 5.0)),
    ("proxy_err", (-10.0, 10.0)), ("proxy_slope", (-10.0, 10.0)), ("proxy_decay", (-1.0, 4.0)),
    ("depth", (0.0, 1.0)), ("param_share", (-5.0, 5.0)), ("fan_ratio", (-8.0, 8.0)),
)  # fmt: skip
#: Names of the feature columns, in order.
FEATURE_NAMES: tuple[str, ...] = tuple(n for n, _ in _BASE) + tuple(
    f"role_{r}" for r in QUANTIZABLE_ROLES
)
#: (low, high) of every feature; values are clipped into it.
FEATURE_RANGES: dict[str, tuple[float, float]] = dict(_BASE) | {
    f"role_{r}": (0.0, 1.0) for r in QUANTIZABLE_ROLES
}
REF_FORMAT, HIGH_FORMAT = "Q4_0", "Q8_0"
ACT_OUTLIER_RATIO = 6.0  # channel RMS over median channel RMS
W_OUTLIER_SIGMAS = 6.0


@dataclass(frozen=True, eq=False)
class FeatureTable:
    """Feature vectors of one model: ``values[i]`` belongs to tensor ``names[i]``.

    ``values`` is float32 ``(len(names), len(feature_names))``, read-only; ``raw`` maps each
    tensor to the un-normalised statistics its features came from.
    """

    model: str
    names: tuple[str, ...]
    values: np.ndarray
    raw: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    feature_names: tuple[str, ...] = FEATURE_NAMES
    version: int = FEATURE_SPEC_VERSION

    def __post_init__(self) -> None:
        v = np.array(self.values, dtype=np.float32)
        want = (len(self.names), len(self.feature_names))
        if v.shape != want:
            raise ValueError(f"feature values have shape {v.shape}, expected {want} "
                             f"(tensors x features)")
        if len(set(self.names)) != len(self.names):
            raise ValueError("feature table has duplicate tensor names")
        if not np.isfinite(v).all():
            bad = np.argwhere(~np.isfinite(v))[0]
            raise ValueError(f"feature {self.feature_names[bad[1]]!r} of "
                             f"{self.names[bad[0]]!r} is not finite")
        v.setflags(write=False)
        object.__setattr__(self, "values", v)
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "feature_names", tuple(self.feature_names))

    def __len__(self) -> int:
        return len(self.names)

    def row(self, name: str) -> dict[str, float]:
        """Feature name -> value of tensor ``name``."""
        i = self.names.index(name)
        return {f: float(x) for f, x in zip(self.feature_names, self.values[i])}

    def column(self, feature: str) -> np.ndarray:
        return self.values[:, self.feature_names.index(feature)]

    def to_json(self) -> dict:
        """``{"model", "version", "feature_names", "tensors": [{"name", "features", "raw"}]}``."""
        return {
            "model": self.model, "version": self.version,
            "feature_names": list(self.feature_names),
            "tensors": [{"name": n, "features": self.row(n), "raw": dict(self.raw.get(n, {}))}
                        for n in self.names],
        }  # fmt: skip

    @classmethod
    def from_json(cls, payload: Mapping) -> FeatureTable:
        names = tuple(t["name"] for t in payload["tensors"])
        feats = tuple(payload["feature_names"])
        values = np.array([[t["features"][f] for f in feats] for t in payload["tensors"]],
                          dtype=np.float32).reshape(len(names), len(feats))
        return cls(model=payload["model"], names=names, values=values,
                   raw={t["name"]: t.get("raw", {}) for t in payload["tensors"]},
                   feature_names=feats, version=int(payload["version"]))

    def to_csv(self, path: str | os.PathLike | None = None) -> str:
        """CSV with a header ``tensor,<features...>``; written to ``path`` when given."""
        buf = io.StringIO()
        wr = csv.writer(buf, lineterminator="\n")
        wr.writerow(["tensor", *self.feature_names])
        for n, row in zip(self.names, self.values):
            wr.writerow([n, *(f"{x:.6g}" for x in row)])
        text = buf.getvalue()
        if path is not None:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text)
        return text


# --------------------------------------------------------------- candidates
def _site_key(calib: Calibration, name: str):
    """The key :class:`TensorProxy` caches ``name``'s Cholesky factor under, or None."""
    if name == "token_embd.weight" and not calib.tied:
        return None
    return site_factor_key(calib, name)


def _check_cache_importance(cache, lm, calib: Calibration, imatrix: bool) -> None:
    for s in lm.quantizable:
        have = cache.importance.get(s.name)
        want = calib.importance(s.name) if imatrix else None
        if want is None:
            if have is not None:
                raise CalibrationError(
                    f"the weight cache quantizes {s.name!r} with an importance vector but "
                    f"imatrix={imatrix}; use a cache built with the same importance"
                )
        elif have is None:
            cache.importance[s.name] = want
        elif not np.array_equal(np.asarray(have, dtype=np.float32), want):
            raise CalibrationError(f"the weight cache holds another importance vector for "
                                   f"{s.name!r} than this calibration")


@dataclass(frozen=True)
class _CandidateContext:
    """What every candidate worker needs besides the model (picklable for a remote runner
    unless ``cache`` is set, which only a local one does)."""

    calib: Calibration
    valid: Mapping[str, tuple[str, ...]]
    imatrix: bool
    weighting: str
    #: the driver's WeightCache (local runner): read for candidates it holds, written with
    #: the new ones; None: the quantized bytes come back in the results
    cache: Any = None
    #: return the quantized bytes (a remote runner feeding the driver's cache)
    return_data: bool = False


class _CandidateTask(StageTask):
    """Candidates of the tensors of one input site (they share one Cholesky factor of its
    ``H``, built once per item and dropped after it): ``[(name, candidates, quantized bytes
    per format or None, quantize seconds per format (wall, CPU), proxy seconds (wall,
    CPU))]``."""

    def __call__(self, names: tuple[str, ...]) -> list:
        import torch

        ctx = self.context
        factors: dict = {}
        out = []
        for name in names:
            spec = self.lm.spec(name)
            w = self.lm.reference_weight(name).detach()
            arr = w.cpu().numpy()
            imp = ctx.calib.importance(name) if ctx.imatrix else None
            c0, t0 = time.thread_time(), time.perf_counter()
            proxy = TensorProxy(ctx.calib, name, w, weighting=ctx.weighting, factors=factors)
            cands, tq, kept = [], {}, {}
            tp = [time.perf_counter() - t0, time.thread_time() - c0]
            for fmt in ctx.valid[name]:
                f = get_format(fmt)
                c0, t0 = time.thread_time(), time.perf_counter()
                if ctx.cache is not None and ctx.cache.has(name, f.name):
                    deq = ctx.cache.get(name, f.name)
                else:
                    data = f.quantize(arr, imp, tensor=name)
                    deq = torch.from_numpy(np.ascontiguousarray(f.dequantize(data, arr.shape),
                                                                dtype=np.float32))
                    if ctx.cache is not None:  # keeps the bytes; the float32 copy within budget
                        ctx.cache.put(name, f.name, data)
                    elif ctx.return_data:
                        kept[f.name] = data
                    del data
                c1, t1 = time.thread_time(), time.perf_counter()
                err = proxy(deq)
                del deq
                tq[f.name] = (t1 - t0, c1 - c0)
                tp[0] += time.perf_counter() - t1
                tp[1] += time.thread_time() - c1
                cands.append(Candidate(f.name, spec.nbytes(f.name), max(err, 0.0)))
            del proxy
            out.append((name, tuple(cands), kept or None, tq, tp))
        return out


def build_candidates(
    lm, calib: Calibration, *, formats: Sequence[str] = DEFAULT_CANDIDATES, imatrix: bool = False,
    cache=None, weighting: str | None = None, workers: int | None = None, progress: bool = True,
    runner=None,
) -> CandidateTable:
    """Every quantizable tensor x every valid format of ``formats``: exact bytes, proxy error.

    ``imatrix`` quantizes with the calibration's importance vectors (llama.cpp's imatrix);
    ``cache`` (a :class:`~autobits.evaluate.WeightCache`) receives the quantized bytes of
    every candidate, and candidates it already holds are not quantized again (by a local
    runner).  ``weighting`` is ``"fisher"`` (default when the calibration has a Fisher
    pass) or ``"none"``.  The work is one item per input site (the tensors reading it share
    one Cholesky factor of its ``H``, built once, dropped after the item), the largest
    first, run by ``runner`` (a :class:`~autobits.stages.StageRunner`; default a
    :class:`~autobits.stages.LocalRunner` of ``workers`` threads, default the CPU count;
    numpy and torch release the GIL in the heavy loops, torch's own thread count is 1
    meanwhile).  A Ray runner gives bit-identical candidates and quantized bytes.  Memory:
    per worker the dequantized candidate being measured and one site's Cholesky factor.
    ``meta["timing"]`` holds the seconds spent per format quantizing and in the proxy,
    elapsed and CPU (``*_cpu``), summed over the workers, and the wall time.
    """
    from tqdm.auto import tqdm

    from autobits.stages import LocalRunner

    calib.check_model(lm)
    weighting = weighting or ("fisher" if calib.has_fisher else "none")
    fmts = [get_format(f).name for f in formats]  # unknown names raise FormatError
    specs = lm.quantizable
    valid = {s.name: s.valid_formats(tuple(fmts)) for s in specs}
    misfit = [n for n, v in valid.items() if not v]
    if misfit:
        raise AllocationError(f"tensors {misfit[:5]} fit none of the formats {fmts}")
    if cache is not None:
        _check_cache_importance(cache, lm, calib, imatrix)
    runner = runner if runner is not None else LocalRunner(max(1, int(workers or os.cpu_count() or 1)))
    t_quant = {f: [0.0, 0.0] for f in fmts}  # format -> [worker wall, worker CPU] seconds
    t_proxy = [0.0, 0.0]
    # one item per input site (tensors without one alone), the largest first, so that the
    # workers finish together
    groups: dict = {}
    for s in specs:
        k = _site_key(calib, s.name)
        groups.setdefault(s.name if k is None else k, []).append(s)
    cost = lambda g: sum(s.numel * len(valid[s.name]) for s in g)  # noqa: E731
    items = [tuple(s.name for s in g) for g in sorted(groups.values(), key=lambda g: -cost(g))]
    local = runner.shares_memory
    context = _CandidateContext(calib=calib, valid=valid, imatrix=bool(imatrix),
                                weighting=weighting, cache=cache if local else None,
                                return_data=cache is not None and not local)
    t0 = time.perf_counter()
    options: dict[str, tuple[Candidate, ...]] = {}
    with tqdm(total=len(specs), desc="candidates", unit="tensor", disable=not progress) as bar:
        for rows in runner.map(_CandidateTask, items, lm=lm, context=context, name="candidates"):
            for name, opts, kept, tq, tp in rows:
                options[name] = opts
                for fmt, data in (kept or {}).items():
                    if not cache.has(name, fmt):
                        cache.put(name, fmt, data)
                for f, (w, c) in tq.items():
                    t_quant[f][0] += w
                    t_quant[f][1] += c
                t_proxy[0] += tp[0]
                t_proxy[1] += tp[1]
                bar.update()
    wall = time.perf_counter() - t0
    meta = {
        "weighting": weighting, "imatrix": bool(imatrix), "formats": fmts,
        "workers": runner.workers, "runner": "local" if local else "remote",
        "calibration": {"windows": calib.n_windows, "ctx": calib.ctx,
                        "fisher_tokens": calib.fisher_tokens},
        "timing": {"wall": wall, "proxy": t_proxy[0], "proxy_cpu": t_proxy[1],
                   "quantize": {f: t[0] for f, t in t_quant.items() if t[0] > 0},
                   "quantize_cpu": {f: t[1] for f, t in t_quant.items() if t[0] > 0}},
    }  # fmt: skip
    log.info("candidates of %s: %d tensors, %d candidates, %.1fs (%s weighting, %d %s workers)",
             lm.name, len(options), sum(map(len, options.values())), wall, weighting,
             runner.workers, "local" if local else "remote")
    return CandidateTable(model=lm.name, specs=lm.specs,
                          options={s.name: options[s.name] for s in specs}, meta=meta)


# ----------------------------------------------------------------- features
def _robust_z(v: np.ndarray) -> np.ndarray:
    med = np.median(v)
    scale = 1.4826 * np.median(np.abs(v - med))
    if not scale > 1e-12:
        scale = float(v.std())
    return (v - med) / scale if scale > 1e-12 else np.zeros_like(v)


def _log_ratio_median(v: np.ndarray) -> np.ndarray:
    v = np.maximum(v, 1e-300)
    return np.log(v) - np.log(np.median(v))


def _pick(opts: Sequence[Candidate], fmt: str, *, floats: bool = False) -> Candidate:
    for c in opts:
        if c.fmt == fmt:
            return c
    bpw = get_format(fmt).bits_per_weight
    pool = [c for c in opts if floats or get_format(c.fmt).block_size > 1] or list(opts)
    return min(pool, key=lambda c: (abs(get_format(c.fmt).bits_per_weight - bpw), c.bytes))


def _weight_stats(w) -> dict[str, float]:
    import torch

    # float64 copies of the whole tensor: at most two at a time (the same values as the
    # plain expressions; the outlier count is exact, so its mean is too)
    x = w.detach().reshape(-1).to(torch.float64, copy=True)
    sq_mean = float(torch.mean(x.square()))
    mu = x.mean()
    c = x.sub_(mu)
    del x
    sq = c.square()
    var = sq.mean()
    sd = float(var.sqrt())
    kurt = float(sq.square_().mean() / var.square()) if var > 0 else 3.0
    del sq
    out = (int((c.abs_() > W_OUTLIER_SIGMAS * sd).sum()) / c.numel()) if sd > 0 else 0.0
    return {"w_std": sd, "w_kurtosis": kurt, "w_outlier_frac": out, "w_sq_mean": sq_mean}


def _act_stats(st) -> dict[str, float]:
    rms = np.sqrt(st.sq_mean)
    med = float(np.median(rms))
    return {"act_absmean": float(st.abs_mean.mean()), "act_kurtosis": st.kurtosis,
            "act_outlier_frac": float((rms > ACT_OUTLIER_RATIO * med).mean()) if med > 0 else 0.0,
            "act_absmax": float(st.abs_max.max()),
            "h_trace": float(np.trace(st.h, dtype=np.float64))}


def extract_features(
    lm, calib: Calibration, candidates: CandidateTable, *, workers: int | None = None
) -> FeatureTable:
    """The :class:`FeatureTable` of ``lm`` (feature definitions in the module docstring).

    The weight statistics run on ``workers`` threads (default: the CPU count).
    """
    calib.check_model(lm)
    specs = lm.quantizable
    names = tuple(s.name for s in specs)
    if tuple(candidates.tensors) != names:
        raise CalibrationError(f"candidate table of {candidates.model!r} does not list the "
                               f"quantizable tensors of {lm.name!r}")
    blocks = [s.block for s in lm.specs if s.block is not None]
    n_blocks = max(blocks) + 1 if blocks else 1
    mean_numel = float(np.mean([s.numel for s in specs]))
    raw: dict[str, dict[str, Any]] = {}
    n_workers = max(1, int(workers or os.cpu_count() or 1))
    wstats = list(thread_map(lambda s: _weight_stats(lm.reference_weight(s.name)), specs, n_workers,
                             "features"))
    for s, ws in zip(specs, wstats):
        r: dict[str, Any] = {"role": s.role, "block": s.block, "numel": s.numel,
                             "rows": int(s.shape[0]), "row_length": s.row_length}
        r.update(ws)
        if s.role == "token_embd":
            emb_part = 1.0  # tr of the one-hot H: the frequencies sum to 1
            g = calib.gain(s.name)
            fis = 0.0 if g is None else 0.5 * float(g.sum()) * calib.embed_scale**2
            if calib.tied:
                head = _act_stats(calib.site(s.name))
                r.update(head)
                if calib.has_fisher:
                    fis += 0.5 * float(calib.head_gain.sum()) * head["h_trace"]
                r["h_trace"] = emb_part + head["h_trace"]
            else:
                r.update(act_absmean=None, act_kurtosis=None, act_outlier_frac=None,
                         h_trace=emb_part)
                fis = fis if calib.has_fisher else 0.0
        else:
            r.update(_act_stats(calib.site(s.name)))
            g = calib.gain(s.name)
            fis = 0.5 * float(g.sum()) * r["h_trace"] if g is not None else 0.0
        r["hess_trace"] = r["h_trace"] * r["w_sq_mean"]
        r["fisher_trace"] = fis * r["w_sq_mean"]
        opts = candidates.options[s.name]
        ref, high = _pick(opts, REF_FORMAT), _pick(opts, HIGH_FORMAT)
        if high.bytes <= ref.bytes:  # only one non-float size fits: use the largest format
            high = opts[0]
        r.update(ref_format=ref.fmt, high_format=high.fmt, err_ref=ref.error, err_high=high.error)
        dbytes = high.bytes - ref.bytes
        r["slope"] = (ref.error - high.error) / dbytes if dbytes > 0 else 0.0
        dbpw = get_format(high.fmt).bits_per_weight - get_format(ref.fmt).bits_per_weight
        r["decay"] = (np.log2(max(ref.error, 1e-300) / max(high.error, 1e-300)) / dbpw
                      if dbpw > 0 else 0.0)
        raw[s.name] = r
    col = lambda k: np.array([raw[n][k] for n in names], dtype=np.float64)  # noqa: E731
    n = len(names)
    feats: dict[str, np.ndarray] = {}
    has_act = np.array([raw[x]["act_absmean"] is not None for x in names])
    for k in ("act_absmean", "act_kurtosis", "act_outlier_frac"):
        feats[k] = np.zeros(n)
    a = np.array([raw[x]["act_absmean"] or 0.0 for x in names])
    if has_act.any():
        feats["act_absmean"][has_act] = _robust_z(np.log(np.maximum(a[has_act], 1e-30)))
        feats["act_kurtosis"][has_act] = np.log(
            np.maximum([raw[x]["act_kurtosis"] for x in np.array(names)[has_act]], 1e-6) / 3.0)
        feats["act_outlier_frac"][has_act] = [raw[x]["act_outlier_frac"]
                                              for x in np.array(names)[has_act]]
    feats["w_std"] = _robust_z(np.log(np.maximum(col("w_std"), 1e-30)))
    feats["w_kurtosis"] = np.log(np.maximum(col("w_kurtosis"), 1e-6) / 3.0)
    feats["w_outliers"] = (np.log10(col("w_outlier_frac") + 1e-6) + 6.0) / 6.0
    feats["hess_trace"] = _robust_z(np.log(np.maximum(col("hess_trace"), 1e-300)))
    fis = col("fisher_trace")
    feats["fisher_trace"] = (_robust_z(np.log(np.maximum(fis, 1e-300))) if (fis > 0).all()
                             else np.zeros(n))
    feats["proxy_err"] = _log_ratio_median(col("err_ref"))
    feats["proxy_slope"] = _log_ratio_median(col("slope"))
    feats["proxy_decay"] = col("decay")
    depth = []
    for s in specs:
        if s.role == "token_embd":
            depth.append(0.0)
        elif s.role == "output" or s.block is None:
            depth.append(1.0)
        else:
            depth.append(s.block / (n_blocks - 1) if n_blocks > 1 else 0.0)
    feats["depth"] = np.array(depth)
    feats["param_share"] = np.log(col("numel") / mean_numel)
    feats["fan_ratio"] = np.log2(col("row_length") / col("rows"))
    for role in QUANTIZABLE_ROLES:
        feats[f"role_{role}"] = np.array([float(s.role == role) for s in specs])
    values = np.stack([np.clip(feats[f], *FEATURE_RANGES[f]) for f in FEATURE_NAMES], axis=1)
    for name, r in raw.items():
        raw[name] = {k: (float(v) if isinstance(v, (np.floating, float)) else v)
                     for k, v in r.items()}
    return FeatureTable(model=lm.name, names=names, values=values, raw=raw)
