"""Scale Folding: per-input-channel scales that move activation outliers into the weights.

Every linear layer ``y = W x`` reads one *input site* ``x``.  With per-channel scales
``s > 0`` the consumer's weight becomes ``W' = W diag(s)`` and the site's producer is changed
so that it emits ``x' = x / s``; then ``W' x' = W x`` and the float model computes the same
function up to rounding, while the quantizer sees columns of ``W`` stretched by ``s``
(salient input channels get more of each block's range).  No op is added: the exported
model is a standard model with different numbers.  The sites, one *group* each per block:

========  ==========================  ===============================================
site      consumers (``W diag(s)``)   compensation (the producer emits ``x / s``)
========  ==========================  ===============================================
attn_in   attn_q, attn_k, attn_v      ``attn_norm`` weight: ``w' = (o + w) / s - o``
attn_out  attn_output                 ``attn_v`` rows (and qwen2's ``attn_v`` bias) / s
ffn_in    ffn_gate, ffn_up            ``ffn_norm`` weight (gemma3: pre-feedforward norm)
ffn_out   ffn_down                    ``ffn_up`` rows / s (``act(gate) * up`` is linear in up)
========  ==========================  ===============================================

``o`` is 1 for gemma3, whose RMSNorm multiplies by ``1 + w``, and 0 for llama/qwen2.  With
grouped-query attention each value channel feeds ``n_heads / n_kv`` input channels of
``attn_output`` (head ``h`` reads kv head ``h // (n_heads / n_kv)``), so the ``attn_out``
site has one scale per value channel, repeated over the heads that share it.  The token
embedding and the (tied) output head are never touched.

**The scale.**  For a site with activation magnitude ``a_j = mean |x_j|`` over calibration
tokens and weight magnitude ``w_j = max_i |W_ij|`` over the rows of all its consumers (for
``attn_out``: mean of ``a`` and max of ``w`` over the tied channels), both floored at
``1e-3`` of their maximum::

    s_j(alpha, beta) = (a_j / w_j ** beta) ** alpha / G,   G = geometric mean of the numerator

``alpha = 0`` is no folding (``s = 1``); ``beta = 0`` is AWQ's activation-only form and
``beta = 1`` the SmoothQuant-like ratio ``(a / w) ** alpha`` (equal to SmoothQuant's
``a ** alpha / w ** (1 - alpha)`` at ``alpha = 0.5``).

**The search.**  Per group, every grid point ``(alpha, beta)`` is scored by the calibration
output error of the quantized consumers, in the original coordinates::

    E(s) = sum over consumers of tr(dW H dW^T),  dW = Q(W diag(s)) diag(1/s) - W

with ``H = X^T X / n`` the site's second-moment matrix, i.e. the mean over calibration
tokens of ``||(Q(W s) / s - W) x||^2`` (no activation is stored).  ``Q`` is the format asked
for, or the type llama.cpp falls back to where its block does not fit a row.  The grid
always holds ``alpha = 0``, so the chosen error never exceeds the unfolded one on the
calibration data.  Groups are searched independently on the unfolded weights: folding one
site leaves every other site's activations unchanged, and the row scaling of a producer
(``attn_v``, ``ffn_up``) scales whole ggml blocks, which the row-blocked formats follow
exactly up to the rounding of their block scales.

Folding changes what a later calibration measures (``x' = x / s``): use
:func:`folded_calibration` (or calibrate again) for importance vectors and proxy errors of
the folded model, and build :class:`~autobits.evaluate.WeightCache` objects after folding
(one filled before holds unfolded weights).  An :class:`~autobits.evaluate.Evaluator` built
before folding keeps the original model's reference distributions, which the folded float
model reproduces up to rounding.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from autobits.allocation import LLAMA_FALLBACK
from autobits.errors import AutobitsError
from autobits.formats import get_format
from autobits.model import LoadedModel

__all__ = [
    "DEFAULT_ALPHAS", "DEFAULT_BETAS", "SITE_KINDS", "FoldError", "FoldGroup", "FoldReport",
    "FoldStats", "Site", "apply_fold", "collect_site_stats", "fold", "fold_scales", "fold_state",
    "folded_calibration", "max_relative_logit_diff", "replace_reference", "site_error",
    "site_plan",
]

log = logging.getLogger(__name__)

#: The input sites of a block, in model order.
SITE_KINDS: tuple[str, ...] = ("attn_in", "attn_out", "ffn_in", "ffn_out")
#: Default strength grid; 0 (no folding) must stay on it.
DEFAULT_ALPHAS: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
#: Default weight exponents (0: AWQ-like activation-only scales, 1: SmoothQuant-like ratio).
DEFAULT_BETAS: tuple[float, ...] = (0.0, 1.0)
#: Floor of ``a_j`` and ``w_j`` relative to their maximum (dead channels).
MAGNITUDE_FLOOR = 1e-3
#: Attribute of a folded LoadedModel holding what was applied.
_MARK = "_autobits_fold"


class FoldError(AutobitsError):
    """Scales or calibration data that do not fit the model, or a model folded twice."""


# ------------------------------------------------------------------------------ the sites
@dataclass(frozen=True)
class Site:
    """One input site of one block: who reads it and how its producer is compensated.

    ``dim`` is the number of independent scales; ``repeat`` how many consumer input
    channels share one scale (``n_heads / n_kv`` for ``attn_out``, else 1), so the consumers'
    per-channel scales are ``np.repeat`` of the ``(groups, repeat, head_dim)`` layout, see
    :meth:`expand`.  ``norm`` is the compensated norm weight (``norm_offset`` its ``o``), or
    ``rows`` the producer tensors (weights and biases) whose output rows are divided.
    """

    id: str  # "blk.3.ffn_out"
    block: int
    kind: str
    consumers: tuple[str, ...]
    dim: int
    repeat: int = 1
    head_dim: int = 0
    norm: str | None = None
    norm_offset: float = 0.0
    rows: tuple[str, ...] = ()

    @property
    def compensated(self) -> tuple[str, ...]:  # noqa: D102
        return (self.norm,) if self.norm else self.rows

    def expand(self, s: np.ndarray) -> np.ndarray:
        """Per-consumer-input-channel scales from the site's ``dim`` independent scales."""
        if self.repeat == 1:
            return s
        g = s.reshape(-1, 1, self.head_dim)
        return np.broadcast_to(g, (g.shape[0], self.repeat, self.head_dim)).reshape(-1)

    def reduce(self, v: np.ndarray, how: str) -> np.ndarray:
        """Per-consumer-channel values to one per scale (``how``: ``mean`` or ``max``)."""
        if self.repeat == 1:
            return v
        g = v.reshape(-1, self.repeat, self.head_dim)
        return g.mean(axis=1).reshape(-1) if how == "mean" else g.max(axis=1).reshape(-1)


def _attn_geometry(lm: LoadedModel) -> tuple[int, int, int]:
    cfg = lm.model.config
    cfg = getattr(cfg, "text_config", None) or cfg
    n_heads = int(cfg.num_attention_heads)
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    return n_heads, n_kv, int(head_dim)


def site_plan(lm: LoadedModel) -> tuple[Site, ...]:
    """The foldable input sites of ``lm``, block by block (see the module docstring)."""
    names = {s.name for s in lm.specs}
    n_heads, n_kv, head_dim = _attn_geometry(lm)
    if n_heads % n_kv:
        raise FoldError(f"{n_heads} attention heads do not split into {n_kv} kv groups")
    offset = 1.0 if lm.architecture == "gemma3" else 0.0
    blocks = sorted({s.block for s in lm.specs if s.block is not None})
    sites = []
    for b in blocks:
        p = f"blk.{b}."
        need = "attn_norm ffn_norm attn_q attn_k attn_v attn_output ffn_gate ffn_up ffn_down"
        missing = [p + t + ".weight" for t in need.split() if p + t + ".weight" not in names]
        if missing:
            raise FoldError(f"block {b} of {lm.name!r} lacks {missing}; cannot fold it")
        d_in = lm.spec(p + "attn_q.weight").shape[1]
        d_ff = lm.spec(p + "ffn_down.weight").shape[1]
        v_rows = tuple(n for n in (p + "attn_v.weight", p + "attn_v.bias") if n in names)
        sites += [
            Site(p + "attn_in", b, "attn_in", (p + "attn_q.weight", p + "attn_k.weight",
                 p + "attn_v.weight"), d_in, norm=p + "attn_norm.weight", norm_offset=offset),
            Site(p + "attn_out", b, "attn_out", (p + "attn_output.weight",), n_kv * head_dim,
                 repeat=n_heads // n_kv, head_dim=head_dim, rows=v_rows),
            Site(p + "ffn_in", b, "ffn_in", (p + "ffn_gate.weight", p + "ffn_up.weight"), d_in,
                 norm=p + "ffn_norm.weight", norm_offset=offset),
            Site(p + "ffn_out", b, "ffn_out", (p + "ffn_down.weight",), d_ff,
                 rows=(p + "ffn_up.weight",)),
        ]
    o_in = lm.spec(f"blk.{blocks[0]}.attn_output.weight").shape[1] if blocks else 0
    if blocks and o_in != n_heads * head_dim:
        raise FoldError(f"attn_output reads {o_in} channels, expected {n_heads}x{head_dim}")
    return tuple(sites)


# ---------------------------------------------------------------------- applying scales
def replace_reference(lm: LoadedModel, name: str, tensor) -> None:
    """Make ``tensor`` tensor ``name``'s reference weight.

    The parameter points at it (:meth:`LoadedModel.set_weight`) and
    :meth:`LoadedModel.reference_weight` / :meth:`LoadedModel.restore` use it from now on.
    LoadedModel has no public setter for its reference tensors, so this updates its
    ``_reference`` mapping, the one place they are kept.
    """
    old = lm.reference_weight(name)
    if tuple(tensor.shape) != tuple(old.shape):
        raise FoldError(f"{name}: new reference has shape {tuple(tensor.shape)}, "
                        f"expected {tuple(old.shape)}")
    tensor = tensor.to(old.dtype).contiguous()
    lm.set_weight(name, tensor)
    lm._reference[name] = tensor


def fold_state(lm: LoadedModel) -> dict[str, np.ndarray] | None:
    """The scales folded into ``lm`` so far (site id -> scales), or None if never folded."""
    return getattr(lm, _MARK, None)


def apply_fold(lm: LoadedModel, scales: Mapping[str, np.ndarray]) -> None:
    """Fold ``scales`` (site id -> ``dim`` positive scales) into ``lm``'s reference weights.

    Consumers' columns are multiplied, the producer divided (see the module docstring); each
    touched tensor is computed in float64 from its current reference and stored once.
    """
    import torch

    plan = {s.id: s for s in site_plan(lm)}
    unknown = sorted(set(scales) - set(plan))
    if unknown:
        raise FoldError(f"unknown sites {unknown[:4]}; sites look like {next(iter(plan), '-')}")
    work: dict[str, Any] = {}

    def get(name: str):
        if name not in work:
            work[name] = lm.reference_weight(name).detach().to(torch.float64).clone()
        return work[name]

    for sid, s in scales.items():
        site = plan[sid]
        s = np.asarray(s, dtype=np.float64)
        if s.shape != (site.dim,):
            raise FoldError(f"site {sid}: {s.shape} scales given, expected ({site.dim},)")
        if not (np.isfinite(s).all() and (s > 0).all()):
            bad = int((~np.isfinite(s) | (s <= 0)).sum())
            raise FoldError(f"site {sid}: {bad} of {site.dim} scales are not finite and > 0")
        st = torch.from_numpy(s)
        sc = torch.from_numpy(np.ascontiguousarray(site.expand(s)))
        for n in site.consumers:
            get(n).mul_(sc[None, :])
        if site.norm:
            w = get(site.norm)
            w.copy_((w + site.norm_offset) / st - site.norm_offset)
        for n in site.rows:
            t = get(n)
            t.div_(st[:, None] if t.dim() == 2 else st)
    for name, t in work.items():
        replace_reference(lm, name, t.to(torch.float32))
    done = dict(fold_state(lm) or {})
    for sid, s in scales.items():
        prev = done.get(sid)
        s = np.asarray(s, dtype=np.float64)
        done[sid] = s if prev is None else prev * s
    setattr(lm, _MARK, done)


# --------------------------------------------------------------------- statistics
@dataclass(frozen=True, eq=False)
class FoldStats:
    """What folding needs of one input site: ``mean_abs`` (per consumer input channel,
    ``mean |x_j|``) and ``hessian`` (``X^T X / n``, float32), over ``tokens`` tokens."""

    mean_abs: np.ndarray
    hessian: np.ndarray
    tokens: int


def _module_of(lm: LoadedModel, weight_name: str):
    return lm.model.get_submodule(lm.spec(weight_name).hf_name.removesuffix(".weight"))


def collect_site_stats(lm: LoadedModel, windows: np.ndarray, *, batch_size: int = 1,
                       sites: Sequence[Site] | None = None) -> dict[str, FoldStats]:
    """Mean |x| and ``X^T X / n`` of every site's input over token ``windows`` ``(n, ctx)``.

    One forward pass with a pre-hook on each site's first consumer; memory is one ``d x d``
    float32 matrix per site (about 400 MB for SmolLM2-135M).
    """
    import torch

    windows = np.asarray(windows)
    if windows.ndim != 2 or windows.shape[0] == 0:
        raise FoldError(f"calibration windows must be a non-empty (n, ctx) array, "
                        f"got {windows.shape}")
    sites = tuple(sites if sites is not None else site_plan(lm))
    acc: dict[str, list] = {}

    def hook_for(sid: str):
        def hook(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            a = acc.get(sid)
            if a is None:
                d = x.shape[1]
                a = acc[sid] = [torch.zeros(d, dtype=torch.float64),
                                torch.zeros(d, d, dtype=torch.float32), 0]
            a[0] += x.abs().sum(0, dtype=torch.float64)
            a[1].addmm_(x.T, x)
            a[2] += x.shape[0]

        return hook

    t0 = time.perf_counter()
    lm.restore()
    handles = [_module_of(lm, s.consumers[0]).register_forward_pre_hook(hook_for(s.id))
               for s in sites]
    try:
        ids = torch.as_tensor(np.array(windows, dtype=np.int64))
        with torch.inference_mode():
            for i in range(0, ids.shape[0], max(1, int(batch_size))):
                lm.model.model(input_ids=ids[i : i + batch_size], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for s in sites:
        sa, xtx, n = acc[s.id]
        out[s.id] = FoldStats((sa / n).numpy(), (xtx / n).numpy(), int(n))
    log.info("site statistics: %d sites over %d tokens (%.1fs)", len(out), ids.numel(),
             time.perf_counter() - t0)
    return out


def _stats_for(lm: LoadedModel, calib: Any, sites: Sequence[Site]) -> dict[str, FoldStats]:
    """Site statistics from token windows, a ready mapping, or a
    :class:`autobits.calibrate.Calibration` (``site(name)`` with ``abs_mean``, ``h``, ``n``)."""
    if isinstance(calib, Mapping):
        missing = [s.id for s in sites if s.id not in calib]
        if missing:
            raise FoldError(f"site statistics lack {len(missing)} sites, e.g. {missing[:3]}")
        return dict(calib)
    if isinstance(calib, np.ndarray):
        return collect_site_stats(lm, calib, sites=sites)
    if callable(getattr(calib, "site", None)):
        out = {}
        for s in sites:
            st = calib.site(s.consumers[0])
            out[s.id] = FoldStats(np.asarray(st.abs_mean, dtype=np.float64),
                                  np.asarray(st.h, dtype=np.float32), int(st.n))
        return out
    raise FoldError(f"calibration must be token windows, site statistics or a Calibration, "
                    f"got {type(calib).__name__}")


def folded_calibration(calib: Any, lm: LoadedModel) -> Any:
    """``calib`` (an :class:`autobits.calibrate.Calibration` measured on ``lm`` before it was
    folded) as the folded ``lm`` would measure it, without another pass.

    Every folded site's input is ``x / s``: ``E[x^2] / s^2``, ``E|x| / s``, ``max|x| / s``,
    ``E[x^4] / s^4``, ``H / (s s^T)``; the output Fisher of a compensating producer
    (``attn_v``, ``ffn_up``: its outputs are divided by ``s``) is multiplied by ``s^2``;
    nothing else changes.  Exact up to the float rounding of the folded model.
    """
    scales = fold_state(lm)
    if scales is None:
        raise FoldError(f"{lm.name!r} is not folded; its calibration needs no rescaling")
    plan = {s.id: s for s in site_plan(lm)}
    sites, gains = dict(calib.sites), dict(calib.gains)
    for sid, s in scales.items():
        site = plan[sid]
        key = calib.tensor_site[site.consumers[0]]
        se = site.expand(np.asarray(s, dtype=np.float64))
        st = sites[key]
        if st.d != se.size:
            raise FoldError(f"calibration site {key} has {st.d} channels, fold site {sid} "
                            f"{se.size}")
        sites[key] = replace(
            st, sq_mean=st.sq_mean / se**2, abs_mean=st.abs_mean / se,
            abs_max=st.abs_max / se, x4_mean=st.x4_mean / se**4,
            h=(st.h / np.outer(se, se)).astype(np.float32),
        )
        for n in site.rows:
            if n in gains:
                gains[n] = gains[n] * s**2
    return replace(calib, sites=sites, gains=gains)


# ------------------------------------------------------------------ scales and errors
def fold_scales(mean_abs: np.ndarray, weight_max: np.ndarray, *, alpha: float,
                beta: float = 0.0) -> np.ndarray:
    """``s = (a / w**beta) ** alpha``, normalised to geometric mean 1 (module docstring)."""
    a = np.asarray(mean_abs, dtype=np.float64)
    w = np.asarray(weight_max, dtype=np.float64)
    if alpha == 0:
        return np.ones_like(a)
    a = np.maximum(a, MAGNITUDE_FLOOR * max(float(a.max()), 1e-30))
    w = np.maximum(w, MAGNITUDE_FLOOR * max(float(w.max()), 1e-30))
    log_s = alpha * (np.log(a) - beta * np.log(w))
    return np.exp(log_s - log_s.mean())


def _format_for(fmt: str, row_length: int):
    f = get_format(fmt)
    if f.fits(row_length):
        return f
    alt = get_format(LLAMA_FALLBACK.get(f.name, "F16"))
    return alt if alt.fits(row_length) else get_format("F16")


def site_error(weights: Sequence[np.ndarray], hessian, s: np.ndarray, fmt: str, *,
               importance: np.ndarray | None = None) -> float:
    """``sum tr(dW H dW^T)``, ``dW = Q(W diag(s)) diag(1/s) - W``, over ``weights``.

    ``s`` is per input channel (already expanded); ``importance`` is the imatrix given to
    the quantizer for the scaled weights (e.g. ``diag(H) / s**2``), or None.
    """
    import torch

    H = hessian if isinstance(hessian, torch.Tensor) else torch.from_numpy(
        np.array(hessian, dtype=np.float32))
    s32 = np.asarray(s, dtype=np.float32)
    total = 0.0
    for W in weights:
        f = _format_for(fmt, W.shape[1])
        ws = W * s32[None, :]
        deq = f.dequantize(f.quantize(ws, importance), ws.shape)
        dw = torch.from_numpy(np.ascontiguousarray(deq / s32[None, :] - W))
        total += float(((dw @ H) * dw).sum(dtype=torch.float64))
    return total


# ------------------------------------------------------------------------- the report
@dataclass(frozen=True)
class FoldGroup:
    """The search result of one site: chosen ``alpha``/``beta``, calibration output error
    unfolded (``error_before``, alpha = 0) and folded (``error_after``), the reference
    output energy ``sum tr(W H W^T)`` (for relative errors), the error at each ``grid``
    point, and the range of the chosen scales (kept in ``scales``, not in the JSON)."""

    site: str
    block: int
    kind: str
    consumers: tuple[str, ...]
    compensated: tuple[str, ...]
    alpha: float
    beta: float
    error_before: float
    error_after: float
    energy: float
    grid: tuple[tuple[float, float, float], ...]
    scale_min: float
    scale_max: float
    scales: np.ndarray = field(repr=False, compare=False)

    @property
    def gain(self) -> float:
        """``1 - error_after / error_before`` (0 when nothing was folded)."""
        return 1.0 - self.error_after / self.error_before if self.error_before > 0 else 0.0

    def to_json(self, *, scales: bool = False) -> dict:
        d = {k: getattr(self, k) for k in (
            "site", "block", "kind", "alpha", "beta", "error_before", "error_after", "energy",
            "scale_min", "scale_max")}
        d |= {"consumers": list(self.consumers), "compensated": list(self.compensated),
              "grid": [list(g) for g in self.grid], "gain": self.gain}
        if scales:
            d["scales"] = self.scales.tolist()
        return d


@dataclass(frozen=True)
class FoldReport:
    """What :func:`fold` did: the format and grid searched, one :class:`FoldGroup` per site,
    calibration tokens and wall time."""

    model: str
    architecture: str
    fmt: str
    alphas: tuple[float, ...]
    betas: tuple[float, ...]
    imatrix: bool
    tokens: int
    seconds: float
    groups: tuple[FoldGroup, ...]

    @property
    def error_before(self) -> float:
        return sum(g.error_before for g in self.groups)

    @property
    def error_after(self) -> float:
        return sum(g.error_after for g in self.groups)

    @property
    def folded(self) -> int:
        """How many groups got a non-trivial scale (alpha > 0)."""
        return sum(g.alpha > 0 for g in self.groups)

    def scales(self) -> dict[str, np.ndarray]:
        """Site id -> applied scales, for the folded groups."""
        return {g.site: g.scales for g in self.groups if g.alpha > 0}

    def to_json(self, *, scales: bool = False) -> dict:
        return {
            "model": self.model, "architecture": self.architecture, "fmt": self.fmt,
            "alphas": list(self.alphas), "betas": list(self.betas), "imatrix": self.imatrix,
            "tokens": self.tokens, "seconds": self.seconds, "folded": self.folded,
            "error_before": self.error_before, "error_after": self.error_after,
            "groups": [g.to_json(scales=scales) for g in self.groups],
        }


# ------------------------------------------------------------------------------ fold
def _grid(alphas: Iterable[float], betas: Iterable[float]) -> list[tuple[float, float]]:
    alphas = sorted({float(a) for a in alphas})
    betas = sorted({float(b) for b in betas})
    if not alphas or not betas:
        raise FoldError(f"need at least one alpha and one beta, got {alphas=} {betas=}")
    bad = [a for a in alphas if not 0 <= a <= 1] + [b for b in betas if not 0 <= b <= 1]
    if bad:
        raise FoldError(f"alphas and betas must lie in [0, 1], got {bad}")
    return [(0.0, 0.0)] + [(a, b) for b in betas for a in alphas if a > 0]


def _search(lm: LoadedModel, site: Site, st: FoldStats, fmt: str,
            grid: Sequence[tuple[float, float]], imatrix: bool) -> FoldGroup:
    import torch

    weights = [lm.reference_weight(n).detach().float().numpy() for n in site.consumers]
    d = weights[0].shape[1]
    if st.mean_abs.shape != (d,) or st.hessian.shape != (d, d):
        raise FoldError(f"site {site.id}: statistics of shape {st.mean_abs.shape} / "
                        f"{st.hessian.shape} for {d} input channels")
    a = site.reduce(np.asarray(st.mean_abs, dtype=np.float64), "mean")
    wmax = site.reduce(np.max([np.abs(w).max(axis=0) for w in weights], axis=0), "max")
    H = torch.from_numpy(np.array(st.hessian, dtype=np.float32))  # a writable copy
    diag = np.clip(np.diag(st.hessian).astype(np.float64), 0, None)
    energy = sum(float(((torch.from_numpy(w) @ H) * torch.from_numpy(w)).sum(dtype=torch.float64))
                 for w in weights)
    scored = []
    for alpha, beta in grid:
        s = fold_scales(a, wmax, alpha=alpha, beta=beta)
        se = site.expand(s)
        imp = (diag / se**2).astype(np.float32) if imatrix else None
        scored.append((site_error(weights, H, se, fmt, importance=imp), alpha, beta, s))
    before = scored[0][0]
    err, alpha, beta, s = min(scored, key=lambda t: (t[0], t[1]))
    return FoldGroup(
        site=site.id, block=site.block, kind=site.kind, consumers=site.consumers,
        compensated=site.compensated, alpha=alpha, beta=beta, error_before=before,
        error_after=err, energy=energy, grid=tuple((al, be, e) for e, al, be, _ in scored),
        scale_min=float(s.min()), scale_max=float(s.max()), scales=s,
    )


def fold(
    lm: LoadedModel,
    calib: Any,
    *,
    fmt: str = "Q4_0",
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    betas: Sequence[float] = DEFAULT_BETAS,
    imatrix: bool = False,
    kinds: Sequence[str] = SITE_KINDS,
) -> FoldReport:
    """Search a scale strength per site for format ``fmt`` and fold the winners into ``lm``.

    ``calib``: an :class:`autobits.calibrate.Calibration`, token windows ``(n, ctx)``
    (then only ``E|x|`` and ``H`` are collected here, no Fisher pass), or a mapping site id
    -> :class:`FoldStats` (:func:`collect_site_stats`), measured on ``lm`` as it is now;
    afterwards :func:`folded_calibration` turns a Calibration into the folded model's.
    ``imatrix``: quantize with importance ``diag(H) / s**2`` during the search.  ``kinds``:
    the site kinds to fold.  After the call ``lm``'s reference weights are the folded float
    weights.  Raises :class:`FoldError` if ``lm`` was folded before.
    """
    t0 = time.perf_counter()
    if fold_state(lm) is not None:
        raise FoldError(f"{lm.name!r} is already folded ({len(fold_state(lm))} sites); "
                        f"load the model again to fold it with other settings")
    bad = sorted(set(kinds) - set(SITE_KINDS))
    if bad:
        raise FoldError(f"unknown site kinds {bad}; expected some of {list(SITE_KINDS)}")
    fmt = get_format(fmt).name
    grid = _grid(alphas, betas)
    sites = [s for s in site_plan(lm) if s.kind in kinds]
    stats = _stats_for(lm, calib, sites)
    groups = []
    for site in sites:
        g = _search(lm, site, stats[site.id], fmt, grid, imatrix)
        log.debug("%s: alpha %.2f beta %.1f error %.4g -> %.4g (%.1f%%)", g.site, g.alpha,
                  g.beta, g.error_before, g.error_after, 100 * g.gain)
        groups.append(g)
    report = FoldReport(
        model=lm.name, architecture=lm.architecture, fmt=fmt,
        alphas=tuple(sorted({float(a) for a in alphas})),
        betas=tuple(sorted({float(b) for b in betas})), imatrix=bool(imatrix),
        tokens=max((stats[s.id].tokens for s in sites), default=0),
        seconds=0.0, groups=tuple(groups),
    )
    apply_fold(lm, report.scales())  # also marks lm as folded
    seconds = time.perf_counter() - t0
    log.info("folded %d of %d sites for %s: calibration error %.4g -> %.4g (%.1fs)",
             report.folded, len(groups), fmt, report.error_before, report.error_after, seconds)
    return replace(report, seconds=seconds)


def max_relative_logit_diff(reference, other) -> float:
    """``max |other - reference| / max |reference|`` over all positions and vocabulary."""
    import torch

    ref = torch.as_tensor(reference, dtype=torch.float64)
    oth = torch.as_tensor(other, dtype=torch.float64)
    if ref.shape != oth.shape:
        raise FoldError(f"logits of shape {tuple(ref.shape)} and {tuple(oth.shape)} differ")
    return float((oth - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
