"""The proxy error of a weight perturbation: the GPTQ/HAWQ quadratic form ``tr(dW H dW^T)``.

:func:`proxy_error` is that form, optionally weighted per output channel by the output
Fisher (then an estimate of the KLD it adds, see :mod:`autobits.calibrate`);
:func:`embedding_proxy_error` its counterpart for the token embedding; :class:`TensorProxy`
applies them to one tensor of a calibrated model, ready for many candidates.

The row terms ``(dW H dW^T)_jj`` cost ``rows x d^2`` multiply-adds with a plain product.
Given the Cholesky factor ``H = L L^T`` (:func:`hessian_factor`) they are the squared row
norms of ``dW L``, and since ``L`` is lower triangular, column block ``J`` of ``dW L`` only
reads the rows of ``L`` from ``J``'s first index on: about 0.6 of the work, in float32
products (sums float64).  :class:`TensorProxy` factors each ``H`` once and reuses it;
a singular ``H`` (no factor) takes the plain product.
"""

from __future__ import annotations

import numpy as np

from autobits.calibrate import Calibration, CalibrationError

__all__ = [
    "WEIGHTINGS", "TensorProxy", "embedding_proxy_error", "hessian_factor", "proxy_error",
    "row_errors", "site_factor_key",
]  # fmt: skip

#: How the quadratic forms are weighted: ``fisher`` (per output channel by the output
#: Fisher, times 1/2: an estimate of the added KLD in nats per token) or ``none`` (the plain
#: expected squared output error per token, ``tr(dW H dW^T)``).
WEIGHTINGS = ("fisher", "none")
#: Column blocks of the triangular product: work ``(k + 1) / 2k`` of the plain one.
FACTOR_BLOCKS = 6
_MIN_BLOCK = 64


def _t(a, dtype=None):
    import torch

    if not isinstance(a, torch.Tensor):
        a = np.ascontiguousarray(a)
        a = torch.from_numpy(a if a.flags.writeable else a.copy())
    return a.detach().to(dtype or torch.float32)


def hessian_factor(h):
    """Lower-triangular ``L`` (torch float32) with ``H = L L^T``, or None.

    The Cholesky factorisation runs in float64; None when ``H`` is not numerically positive
    definite (e.g. fewer calibration tokens than channels, or a dead channel).
    """
    import torch

    hh = _t(h, torch.float64)
    if hh.ndim != 2 or hh.shape[0] != hh.shape[1]:
        raise ValueError(f"H must be square, got shape {tuple(hh.shape)}")
    low, info = torch.linalg.cholesky_ex(hh)
    if int(info) != 0 or not bool(torch.isfinite(low).all()):
        return None
    return low.float()


def _factor_rows(dw, low):
    """Squared row norms of ``dw @ low`` (float64), ``low`` lower triangular."""
    import torch

    d = low.shape[0]
    step = max(_MIN_BLOCK, -(-d // FACTOR_BLOCKS))
    out = torch.zeros(dw.shape[0], dtype=torch.float64)
    for j in range(0, d, step):
        y = dw[:, j:] @ low[j:, j : j + step]
        out += y.square_().sum(1, dtype=torch.float64)
    return out


def row_errors(dw, h, *, chunk: int = 8192, factor=None):
    """``(dW H dW^T)_jj`` for every row ``j`` of ``dw`` (torch float64, clamped at 0).

    ``h`` is ``(d, d)``, or 1-D for a diagonal ``H``.  With ``factor``
    (:func:`hessian_factor` of ``h``) the triangular product of the module docstring;
    otherwise float32 matmuls over row chunks (memory ``chunk x d``), sums float64, cost
    ``rows x d^2`` multiply-adds.
    """
    import torch

    dw = _t(dw)
    if factor is not None:
        return _factor_rows(dw, factor)
    hh = _t(h)
    if hh.ndim == 1:
        return (dw.square() * hh).sum(1, dtype=torch.float64)
    out = torch.empty(dw.shape[0], dtype=torch.float64)
    for i in range(0, dw.shape[0], chunk):
        part = dw[i : i + chunk]
        out[i : i + chunk] = ((part @ hh) * part).sum(1, dtype=torch.float64)
    return out.clamp_min_(0.0)


def proxy_error(w, wq, h, *, gain=None, factor=None) -> float:
    """The GPTQ/HAWQ proxy error of replacing weight ``w`` (rows = output channels) by ``wq``.

    Without ``gain``: ``tr(dW H dW^T)``, the expected squared error added to the tensor's
    output per token (``H = E[x x^T]`` of its input).  With ``gain`` (the output Fisher
    diagonal, one value per row): ``1/2 sum_j gain_j (dW H dW^T)_jj``, the second-order
    estimate of the KL divergence (nats per token) the perturbation adds to the model's
    next-token distribution, which makes tensors comparable with one another.  ``factor``
    is :func:`hessian_factor` of ``h`` when known (faster, same value).
    """
    import torch

    dw = _t(wq) - _t(w)
    r = row_errors(dw, h, factor=factor)
    if gain is None:
        return float(r.sum())
    g = _t(gain, torch.float64)
    if g.shape != r.shape:
        raise ValueError(f"gain has shape {tuple(g.shape)}, expected ({r.shape[0]},), one per row")
    return float(0.5 * (g * r).sum())


def embedding_proxy_error(
    e, eq, freq, *, gain=None, head_h=None, head_gain=None, embed_scale: float = 1.0,
    head_factor=None,
) -> float:  # fmt: skip
    """Proxy error of the token embedding table ``e`` (``vocab x d``) replaced by ``eq``.

    As a lookup, row ``t`` is the output for token ``t`` (one-hot input, ``H`` the diagonal
    of token frequencies): ``sum_t freq_t ||dE_t||^2``.  When the table is also the output
    head (tied) pass ``head_h`` (``E[h h^T]`` of the final hidden state) to add the head's
    ``tr(dE H_head dE^T)`` (``head_factor``: its :func:`hessian_factor`, when known).  With
    the Fisher gains (``gain`` per hidden channel of the embedding output, ``head_gain`` per
    vocabulary entry) both terms are weighted and halved as in :func:`proxy_error` (a KLD
    estimate); ``embed_scale`` is the factor the model multiplies embeddings by (Gemma:
    sqrt(d)).
    """
    import torch

    de = _t(eq) - _t(e)
    f = _t(freq, torch.float64)
    if gain is None:
        total = float((de.square().sum(1, dtype=torch.float64) * f).sum())
    else:
        g = _t(gain) * float(embed_scale) ** 2
        total = 0.5 * float(((de.square() * g).sum(1, dtype=torch.float64) * f).sum())
    if head_h is not None:
        r = row_errors(de, head_h, factor=head_factor)
        if gain is None:
            total += float(r.sum())
        else:
            total += 0.5 * float((_t(head_gain, torch.float64) * r).sum())
    return total


class TensorProxy:
    """The proxy error of one tensor of a calibrated model, ready for many candidates.

    ``TensorProxy(calib, name, w)(wq)`` is the error of replacing reference weight ``w`` by
    ``wq``: :func:`proxy_error` for linear tensors, :func:`embedding_proxy_error` (with the
    head term when tied) for ``token_embd``.  ``weighting`` is one of :data:`WEIGHTINGS`.
    ``factors`` (a dict, shared by the proxies of one model) caches :func:`hessian_factor`
    per input site, so that tensors reading one input factor its ``H`` once.
    """

    def __init__(self, calib: Calibration, name: str, w, *, weighting: str = "fisher",
                 factors: dict | None = None):
        import torch

        if weighting not in WEIGHTINGS:
            raise CalibrationError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if weighting == "fisher" and not calib.has_fisher:
            raise CalibrationError("weighting='fisher' needs a calibration with fisher_windows > 0")
        self.name, self.weighting, self.calib = name, weighting, calib
        self.w = _t(w)
        fisher = weighting == "fisher"
        factors = {} if factors is None else factors
        if name == "token_embd.weight":
            self.kind = "embedding"
            self.freq = torch.from_numpy(calib.token_frequency())
            self.gain = _t(calib.gain(name)) if fisher else None
            self.head_h = _t(calib.head_hessian()) if calib.tied else None
            self.head_gain = _t(calib.head_gain, torch.float64) if fisher and calib.tied else None
            self.factor = _site_factor(factors, calib, name) if calib.tied else None
        else:
            self.kind = "linear"
            self.h = _t(calib.hessian(name))
            self.gain = _t(calib.gain(name), torch.float64) if fisher else None
            if self.h.shape[0] != self.w.shape[1]:
                raise CalibrationError(f"tensor {name!r} has rows of {self.w.shape[1]}, its "
                                       f"calibration site has {self.h.shape[0]} channels")
            self.factor = _site_factor(factors, calib, name)

    def __call__(self, wq) -> float:
        if self.kind == "embedding":
            return embedding_proxy_error(
                self.w, wq, self.freq, gain=self.gain, head_h=self.head_h,
                head_gain=self.head_gain, embed_scale=self.calib.embed_scale,
                head_factor=self.factor,
            )  # fmt: skip
        return proxy_error(self.w, wq, self.h, gain=self.gain, factor=self.factor)


def site_factor_key(calib: Calibration, name: str) -> int:
    """The key of ``name``'s input site in a ``factors`` dict of :class:`TensorProxy`
    (tensors reading one input share it; a caller may drop an entry it no longer needs)."""
    return id(calib.site(name))


def _site_factor(factors: dict, calib: Calibration, name: str):
    """:func:`hessian_factor` of ``name``'s input site, cached in ``factors``.

    Threads may race to fill an entry: both compute the same factor, one is kept.
    """
    st = calib.site(name)
    key = site_factor_key(calib, name)
    hit = factors.get(key)
    if hit is None:
        hit = factors.setdefault(key, (st, hessian_factor(st.h)))  # st pins the id
    return hit[1]
