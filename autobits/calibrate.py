"""Calibration pass: input statistics and output sensitivities of every quantizable tensor.

One streamed pass over calibration windows collects, per *input site* (a tensor's input;
``attn_q``/``attn_k``/``attn_v`` share one site, ``ffn_gate``/``ffn_up`` share one, and the
tied or untied output head reads the final normed hidden state, site ``output_in``):

* ``E[x^2]`` per input channel: the diagonal Hessian proxy and the importance vector
  (what llama.cpp's imatrix holds);
* ``E|x|``, ``max|x|`` and ``E[x^4]`` per channel (activation magnitude, outliers, kurtosis);
* ``H = E[x x^T]`` (``d_in x d_in``): the GPTQ/HAWQ quadratic form ``tr(dW H dW^T)`` is the
  expected squared error a weight perturbation ``dW`` adds to the tensor's output per token;
* token counts (``token_embd``'s input is one-hot, so its ``H`` is the diagonal of token
  frequencies).

Accumulation is float64 (``x^T x`` per window is a float32 product added to a float64 sum;
the finished ``H`` is stored as float32); no activation is kept beyond its window.

The first ``fisher_windows`` windows also run backward (autograd on, weights frozen) to
measure the *output sensitivity* of every tensor: the diagonal Fisher information
``F_j = E[g_j^2]`` of its output channels, where ``g`` is the gradient of
``log p(y_hat)`` summed over the window, ``y_hat`` sampled from the model's own next-token
distribution (seeded).  By the second-order expansion of the KL divergence,
``KL(ref || perturbed) ~ 1/2 sum_j F_j E[dy_j^2]``, so ``1/2 sum_j F_j (dW H dW^T)_jj`` is an
estimate, in nats per token, of the KLD that quantizing this tensor adds: errors of
different tensors become comparable contributions to the output loss (see
:func:`autobits.features.proxy_error`).  The output head's Fisher is exact and needs no
backward: ``E[p_v (1 - p_v)]`` over the vocabulary (times the soft-cap derivative squared).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from autobits.errors import AutobitsError

__all__ = [
    "CALIBRATION_VERSION", "HEAD_SITE", "Calibration", "CalibrationError", "SiteStats",
    "calibrate", "site_of",
]  # fmt: skip

log = logging.getLogger(__name__)

#: Version of the saved calibration file layout.
CALIBRATION_VERSION = 1
#: Site of the output head's input (the final normed hidden state).
HEAD_SITE = "output_in"

_SITE_GROUP = {
    "attn_q": "attn_in", "attn_k": "attn_in", "attn_v": "attn_in",
    "attn_output": "attn_output_in",
    "ffn_gate": "ffn_in", "ffn_up": "ffn_in",
    "ffn_down": "ffn_down_in",
}  # fmt: skip


class CalibrationError(AutobitsError):
    """Bad calibration input (windows, counts), or a calibration that does not fit the model."""


def site_of(spec) -> str | None:
    """Input site of a quantizable tensor (``blk.3.attn_in``), ``output_in`` for the head,
    None for ``token_embd`` (its input is one-hot tokens)."""
    if spec.role == "token_embd":
        return None
    if spec.role == "output":
        return HEAD_SITE
    group = _SITE_GROUP.get(spec.role)
    if group is None or spec.block is None:
        raise CalibrationError(f"tensor {spec.name!r} (role {spec.role!r}) has no input site")
    return f"blk.{spec.block}.{group}"


def _ro(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False)
class SiteStats:
    """Statistics of one input site over ``n`` tokens (per input channel unless noted).

    ``sq_mean`` E[x^2], ``abs_mean`` E|x|, ``abs_max`` max|x|, ``x4_mean`` E[x^4] (float64,
    shape ``(d,)``); ``h`` E[x x^T] (float32, ``(d, d)``, symmetric).
    """

    n: int
    sq_mean: np.ndarray
    abs_mean: np.ndarray
    abs_max: np.ndarray
    x4_mean: np.ndarray
    h: np.ndarray

    def __post_init__(self) -> None:
        d = self.sq_mean.shape[0] if self.sq_mean.ndim == 1 else -1
        if self.n <= 0 or d <= 0:
            raise ValueError(f"site stats need n > 0 tokens and a 1-D sq_mean, got n={self.n}, "
                             f"sq_mean shape {self.sq_mean.shape}")
        for k in ("abs_mean", "abs_max", "x4_mean"):
            if getattr(self, k).shape != (d,):
                raise ValueError(f"{k} has shape {getattr(self, k).shape}, expected ({d},)")
        if self.h.shape != (d, d):
            raise ValueError(f"h has shape {self.h.shape}, expected ({d}, {d})")
        for k in ("sq_mean", "abs_mean", "abs_max", "x4_mean", "h"):
            object.__setattr__(self, k, _ro(getattr(self, k)))

    @property
    def d(self) -> int:
        return int(self.sq_mean.shape[0])

    @property
    def kurtosis(self) -> float:
        """Pooled kurtosis E[x^4] / E[x^2]^2 over all tokens and channels (3 for a Gaussian)."""
        m2 = float(self.sq_mean.mean())
        return float(self.x4_mean.mean()) / m2**2 if m2 > 0 else 0.0


@dataclass(frozen=True, eq=False)
class Calibration:
    """Everything one calibration pass measured on one model (see the module docstring).

    ``tensor_site`` maps each quantizable tensor except ``token_embd`` to its input site;
    ``gains`` holds the output Fisher diagonal of every linear tensor (and, under
    ``token_embd.weight``, of the embedding output, per hidden channel); ``head_gain`` the
    output head's (per vocabulary entry).  Both are empty/None without a Fisher pass.
    """

    model: str
    ctx: int
    n_windows: int
    sites: Mapping[str, SiteStats]
    tensor_site: Mapping[str, str]
    token_counts: np.ndarray
    tied: bool
    gains: Mapping[str, np.ndarray] = field(default_factory=dict)
    head_gain: np.ndarray | None = None
    fisher_tokens: int = 0
    embed_scale: float = 1.0
    seed: int = 0
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.n_windows <= 0 or self.ctx <= 0:
            raise CalibrationError(f"calibration needs windows, got n_windows={self.n_windows}, "
                                   f"ctx={self.ctx}")
        missing = sorted(set(self.tensor_site.values()) - set(self.sites))
        if missing or HEAD_SITE not in self.sites:
            raise CalibrationError(f"calibration lacks input sites {missing or [HEAD_SITE]}")
        if self.token_counts.ndim != 1 or int(self.token_counts.sum()) <= 0:
            raise CalibrationError("token_counts must be a non-empty 1-D count vector")
        object.__setattr__(self, "token_counts", _ro(self.token_counts.astype(np.int64)))
        object.__setattr__(self, "gains", {k: _ro(v) for k, v in self.gains.items()})
        if self.head_gain is not None:
            object.__setattr__(self, "head_gain", _ro(self.head_gain))

    # ------------------------------------------------------------------ access
    @property
    def n_tokens(self) -> int:
        return int(self.token_counts.sum())

    @property
    def has_fisher(self) -> bool:
        return self.fisher_tokens > 0 and self.head_gain is not None

    def site(self, name: str) -> SiteStats:
        """Input statistics of tensor ``name`` (``token_embd`` of a tied model: the head's)."""
        if name == "token_embd.weight":
            if not self.tied:
                raise KeyError(f"{name!r} of an untied model reads one-hot tokens; no input site")
            return self.sites[HEAD_SITE]
        try:
            return self.sites[self.tensor_site[name]]
        except KeyError:
            raise KeyError(f"no calibration statistics for tensor {name!r}") from None

    def importance(self, name: str) -> np.ndarray | None:
        """Per-input-channel E[x^2] of ``name``'s input (float32), as llama.cpp's imatrix.

        A tied ``token_embd`` gets its head input's vector (llama.cpp collects it from the
        output matmul); an untied ``token_embd`` has none (None).
        """
        if name == "token_embd.weight" and not self.tied:
            return None
        return self.site(name).sq_mean.astype(np.float32)

    def hessian(self, name: str) -> np.ndarray:
        """``E[x x^T]`` of ``name``'s input, float32 ``(d_in, d_in)``.

        For ``token_embd`` (one-hot input, diagonal ``H``) the 1-D vector of smoothed token
        frequencies, one per row (:meth:`token_frequency`); a tied embedding's head part is
        :meth:`head_hessian`.
        """
        if name == "token_embd.weight":
            return self.token_frequency()
        return self.site(name).h

    def head_hessian(self) -> np.ndarray:
        """``E[h h^T]`` of the final normed hidden state (the output head's input)."""
        return self.sites[HEAD_SITE].h

    def gain(self, name: str) -> np.ndarray | None:
        """Output Fisher diagonal of ``name`` (None without a Fisher pass).

        ``output.weight``: per vocabulary entry; ``token_embd.weight``: per hidden channel of
        the embedding output (multiply by ``embed_scale**2`` for the table's rows).
        """
        if name == "output.weight":
            return self.head_gain
        return self.gains.get(name)

    def token_frequency(self) -> np.ndarray:
        """Token frequencies with Good-Turing smoothing (float64, sums to 1).

        Unseen tokens share the mass ``N1/N`` (N1 = tokens seen once), the probability that
        the next token is one not seen yet; seen tokens share the rest by count.
        """
        c = self.token_counts.astype(np.float64)
        n, unseen = c.sum(), c == 0
        n_unseen = int(unseen.sum())
        p_new = min(float((c == 1).sum()) / n, 0.5) if n_unseen else 0.0
        f = c / n * (1.0 - p_new)
        if n_unseen:
            f[unseen] = p_new / n_unseen
        return f

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> Path:
        """Write an ``.npz`` (no pickles); read it back with :meth:`load`."""
        path = Path(path)
        site_names = sorted(self.sites)
        meta = {
            "version": CALIBRATION_VERSION, "model": self.model, "ctx": self.ctx,
            "n_windows": self.n_windows, "tied": self.tied, "fisher_tokens": self.fisher_tokens,
            "embed_scale": self.embed_scale, "seed": self.seed, "seconds": self.seconds,
            "tensor_site": dict(self.tensor_site), "sites": site_names,
            "site_n": [self.sites[s].n for s in site_names], "gains": sorted(self.gains),
        }  # fmt: skip
        arrays: dict[str, np.ndarray] = {"meta": np.array(json.dumps(meta)),
                                         "token_counts": self.token_counts}
        for i, s in enumerate(site_names):
            st = self.sites[s]
            for k in ("sq_mean", "abs_mean", "abs_max", "x4_mean", "h"):
                arrays[f"site{i}.{k}"] = getattr(st, k)
        for i, g in enumerate(sorted(self.gains)):
            arrays[f"gain{i}"] = self.gains[g]
        if self.head_gain is not None:
            arrays["head_gain"] = self.head_gain
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, lm=None) -> Calibration:
        """Read a file written by :meth:`save`; with ``lm``, check it measured that model."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                data = {k: z[k] for k in z.files}
        except (OSError, ValueError, KeyError) as e:
            raise CalibrationError(f"{str(path)!r} is not a calibration file: {e}") from None
        if meta.get("version") != CALIBRATION_VERSION:
            raise CalibrationError(f"{str(path)!r} has calibration version "
                                   f"{meta.get('version')}, expected {CALIBRATION_VERSION}")
        sites = {
            s: SiteStats(n=int(n), **{k: data[f"site{i}.{k}"] for k in
                                      ("sq_mean", "abs_mean", "abs_max", "x4_mean", "h")})
            for i, (s, n) in enumerate(zip(meta["sites"], meta["site_n"]))
        }
        calib = cls(
            model=meta["model"], ctx=meta["ctx"], n_windows=meta["n_windows"], sites=sites,
            tensor_site=meta["tensor_site"], token_counts=data["token_counts"],
            tied=meta["tied"], gains={g: data[f"gain{i}"] for i, g in enumerate(meta["gains"])},
            head_gain=data.get("head_gain"), fisher_tokens=meta["fisher_tokens"],
            embed_scale=meta["embed_scale"], seed=meta["seed"], seconds=meta["seconds"],
        )  # fmt: skip
        if lm is not None:
            calib.check_model(lm)
        return calib

    def check_model(self, lm) -> None:
        """Raise :class:`CalibrationError` unless this calibration covers ``lm``'s tensors."""
        want = {s.name: site_of(s) for s in lm.quantizable if s.role != "token_embd"}
        if want != dict(self.tensor_site):
            diff = sorted(set(want.items()) ^ set(self.tensor_site.items()))[:3]
            raise CalibrationError(
                f"calibration of {self.model!r} does not match model {lm.name!r} "
                f"({len(self.tensor_site)} vs {len(want)} tensors; first differences {diff})"
            )
        for name, site in want.items():
            if self.sites[site].d != lm.spec(name).row_length:
                raise CalibrationError(
                    f"calibration site {site} has {self.sites[site].d} channels, tensor "
                    f"{name!r} has rows of {lm.spec(name).row_length}"
                )


# ---------------------------------------------------------------------- pass
class _SiteAcc:
    """float64 running sums of one input site."""

    def __init__(self, d: int):
        import torch

        z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        self.n, self.sq, self.ab, self.x4, self.h = 0, z(d), z(d), z(d), z(d, d)
        self.mx = torch.zeros(d, dtype=torch.float32)

    def add(self, x) -> None:
        import torch

        # per-window sums in float32 (at most a few thousand terms), accumulated in float64
        x = x.detach().reshape(-1, x.shape[-1]).float()
        sq = x.square()
        ab = x.abs()
        self.sq += sq.sum(0).double()
        self.x4 += sq.square_().sum(0).double()
        self.ab += ab.sum(0).double()
        torch.maximum(self.mx, ab.amax(0), out=self.mx)
        self.h += x.T @ x
        self.n += x.shape[0]

    def finish(self) -> SiteStats:
        n = self.n
        # out of place: the sums may be inference tensors (filled under inference_mode)
        h = self.h / n
        h = ((h + h.T) * 0.5).float().numpy()
        return SiteStats(n=n, sq_mean=(self.sq / n).numpy(), abs_mean=(self.ab / n).numpy(),
                         abs_max=self.mx.double().numpy(), x4_mean=(self.x4 / n).numpy(), h=h)


def _check_windows(lm, windows) -> np.ndarray:
    w = np.asarray(windows)
    if w.ndim != 2 or w.shape[0] == 0 or w.shape[1] < 2:
        raise CalibrationError(f"calibration windows must be a non-empty (n, ctx >= 2) token "
                               f"array, got shape {w.shape}")
    if not np.issubdtype(w.dtype, np.integer):
        raise CalibrationError(f"calibration windows must hold integer token ids, got {w.dtype}")
    vocab = int(lm.model.get_input_embeddings().weight.shape[0])
    lo, hi = int(w.min()), int(w.max())
    if lo < 0 or hi >= vocab:
        raise CalibrationError(f"token ids must be in [0, {vocab}), got range [{lo}, {hi}]")
    return w.astype(np.int64)


def _head_logits(model, hidden):
    import torch

    z = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        t = torch.tanh(z / cap)
        return t * cap, 1.0 - t.square()  # capped logits, d(capped)/dz
    return z, None


def calibrate(
    lm, windows: np.ndarray, *, fisher_windows: int = 4, seed: int = 0, progress: bool = True
) -> Calibration:
    """Run the calibration pass of ``lm`` over ``windows`` (int token array ``(n, ctx)``).

    The first ``min(fisher_windows, n)`` windows also run backward for the output Fisher
    (0 disables it; the proxy is then unweighted).  Windows run one at a time; memory is
    the model, the per-site accumulators (``sum d_in^2`` float64) and one window's
    activations (and their gradients).  Deterministic for a given ``seed`` and thread count.
    """
    import torch
    from tqdm.auto import tqdm

    w = _check_windows(lm, windows)
    if isinstance(fisher_windows, bool) or not isinstance(fisher_windows, (int, np.integer)) \
            or fisher_windows < 0:
        raise CalibrationError(
            f"fisher_windows must be a non-negative count, got {fisher_windows!r}")
    n_fisher = min(int(fisher_windows), w.shape[0])
    t0 = time.perf_counter()
    lm.restore()
    model = lm.model
    specs = [s for s in lm.quantizable]
    tied = not any(s.role == "output" for s in specs)
    tensor_site = {s.name: site_of(s) for s in specs if s.role != "token_embd"}
    linear = [s for s in specs if s.role not in ("token_embd", "output")]
    accs: dict[str, _SiteAcc] = {}
    seen: dict[str, Any] = {}  # site -> the input tensor already measured in this window
    gain_sum: dict[str, Any] = {}
    handles = []

    def pre_hook(site: str, name: str):
        def hook(module, args):
            x = args[0]
            prev = seen.get(site)
            if prev is None:
                seen[site] = x
                if site not in accs:
                    accs[site] = _SiteAcc(x.shape[-1])
                accs[site].add(x)
            elif prev is not x:
                raise CalibrationError(
                    f"tensor {name!r} does not read the same input as the other tensors of "
                    f"site {site}; this architecture needs its own site grouping"
                )
        return hook

    def grad_acc(key: str):
        def hook(g):
            s = g.detach().reshape(-1, g.shape[-1]).square().sum(0).double()
            gain_sum[key] = gain_sum[key] + s if key in gain_sum else s
        return hook

    def out_hook(name: str):
        def hook(module, args, out):
            if out.requires_grad:
                out.register_hook(grad_acc(name))
        return hook

    def emb_hook(module, args, out):
        if torch.is_grad_enabled():
            out = out.detach().requires_grad_(True)
            out.register_hook(grad_acc("token_embd.weight"))
            return out
        return None

    emb = model.get_input_embeddings()
    embed_scale = float(getattr(emb, "embed_scale", 1.0))
    for s in linear:
        mod = model.get_submodule(s.hf_name.removesuffix(".weight"))
        handles.append(mod.register_forward_pre_hook(pre_hook(tensor_site[s.name], s.name)))
        handles.append(mod.register_forward_hook(out_hook(s.name)))
    handles.append(emb.register_forward_hook(emb_hook))
    gen = torch.Generator().manual_seed(int(seed))
    head_acc = _SiteAcc(int(emb.weight.shape[1]))
    head_gain = None
    fisher_tokens = 0
    try:
        for i in tqdm(range(w.shape[0]), desc="calibration", unit="window", disable=not progress):
            ids = torch.from_numpy(w[i : i + 1])
            seen.clear()
            if i < n_fisher:
                with torch.enable_grad():
                    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
                    head_acc.add(hidden)
                    logits, dcap = _head_logits(model, hidden)
                    logp = torch.log_softmax(logits[0], dim=-1)
                    with torch.no_grad():
                        p = logp.exp()
                        hg = p - p.square()
                        if dcap is not None:
                            hg.mul_(dcap[0].square())
                        hg = hg.sum(0).double()
                        head_gain = hg if head_gain is None else head_gain + hg
                        # inverse-CDF sampling of y_hat ~ p (torch.multinomial is ~20x slower)
                        cdf = p.cumsum(-1)
                        u = torch.rand(p.shape[0], 1, generator=gen) * cdf[:, -1:]
                        y = torch.searchsorted(cdf, u).clamp_max_(p.shape[-1] - 1)
                    loss = logp.gather(1, y).sum()
                    loss.backward()
                fisher_tokens += ids.numel()
            else:
                with torch.inference_mode():
                    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
                    head_acc.add(hidden)
    finally:
        for h in handles:
            h.remove()
        seen.clear()
    missing = sorted(set(tensor_site.values()) - set(accs) - {HEAD_SITE})
    if missing:
        raise CalibrationError(f"the forward pass never reached input sites {missing[:5]}")
    sites = {k: a.finish() for k, a in accs.items()}
    sites[HEAD_SITE] = head_acc.finish()
    gains = {k: (v / fisher_tokens).numpy() for k, v in gain_sum.items()} if fisher_tokens else {}
    vocab = int(emb.weight.shape[0])
    calib = Calibration(
        model=lm.name, ctx=int(w.shape[1]), n_windows=int(w.shape[0]), sites=sites,
        tensor_site=tensor_site, token_counts=np.bincount(w.ravel(), minlength=vocab),
        tied=tied, gains=gains,
        head_gain=None if head_gain is None else (head_gain / fisher_tokens).numpy(),
        fisher_tokens=fisher_tokens, embed_scale=embed_scale, seed=int(seed),
        seconds=time.perf_counter() - t0,
    )  # fmt: skip
    log.info("calibration of %s: %d windows x %d tokens (%d with Fisher), %d input sites, %.1fs",
             lm.name, w.shape[0], w.shape[1], n_fisher, len(sites), calib.seconds)
    return calib
