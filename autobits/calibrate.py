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

``calibrate(..., tensors=names)`` measures only the input sites those tensors read (the head
site only for the head tensor: ``output.weight``, or a tied ``token_embd.weight``), so that
memory scales with the part of the model measured; without Fisher windows and without the
head site, each window's forward pass stops after the last block holding a requested
tensor.  A site's statistics are bit-identical to those of a pass over the whole model
with the same windows and shards (the same arithmetic on the same inputs).

The first ``fisher_windows`` windows also run backward (autograd on, weights frozen) to
measure the *output sensitivity* of every tensor: the diagonal Fisher information
``F_j = E[g_j^2]`` of its output channels, where ``g`` is the gradient of
``log p(y_hat)`` summed over the window, ``y_hat`` sampled from the model's own next-token
distribution (seeded).  By the second-order expansion of the KL divergence,
``KL(ref || perturbed) ~ 1/2 sum_j F_j E[dy_j^2]``, so ``1/2 sum_j F_j (dW H dW^T)_jj`` is an
estimate, in nats per token, of the KLD that quantizing this tensor adds: errors of
different tensors become comparable contributions to the output loss (see
:func:`autobits.proxy.proxy_error`).  The output head's Fisher is exact and needs no
backward: ``E[p_v (1 - p_v)]`` over the vocabulary (times the soft-cap derivative squared).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from autobits.errors import AutobitsError
from autobits.stages import StageTask
from autobits.threads import thread_map

__all__ = [
    "CALIBRATION_VERSION", "HEAD_SITE", "Calibration", "CalibrationError", "SiteStats",
    "accumulator_bytes", "calibrate", "site_of",
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


class _StopForward(Exception):
    """Raised by the forward hook of the last decoder block a calibration needs: the rest of
    the window's forward pass is skipped (caught in :meth:`_CalibrationTask._run`)."""


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
    ``tensors``: the quantizable tensors measured (``calibrate(..., tensors=...)``, in the
    model's order), None for all of the model's; ``tensor_site`` and ``gains`` then hold
    those tensors only, ``sites`` the sites they read.
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
    tensors: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.n_windows <= 0 or self.ctx <= 0:
            raise CalibrationError(f"calibration needs windows, got n_windows={self.n_windows}, "
                                   f"ctx={self.ctx}")
        if self.tensors is not None:
            object.__setattr__(self, "tensors", tuple(self.tensors))
            extra = sorted(set(self.tensor_site) - set(self.tensors))
            if extra:
                raise CalibrationError(
                    f"calibration of {len(self.tensors)} tensors has input sites for "
                    f"{len(extra)} others (first {extra[:3]})")
        missing = set(self.tensor_site.values()) - set(self.sites)
        if self.needs_head_site and HEAD_SITE not in self.sites:
            missing.add(HEAD_SITE)
        if missing:
            raise CalibrationError(f"calibration lacks input sites {sorted(missing)}")
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

    @property
    def needs_head_site(self) -> bool:
        """Whether the tensors measured include the head (its input is :data:`HEAD_SITE`)."""
        return self.tensors is None or "output.weight" in self.tensors or (
            self.tied and "token_embd.weight" in self.tensors)

    def covers(self, name: str) -> bool:
        """Whether tensor ``name`` was among the tensors measured."""
        return self.tensors is None or name in self.tensors

    def site(self, name: str) -> SiteStats:
        """Input statistics of tensor ``name`` (``token_embd`` of a tied model: the head's)."""
        if name == "token_embd.weight":
            if not self.tied:
                raise KeyError(f"{name!r} of an untied model reads one-hot tokens; no input site")
            if HEAD_SITE not in self.sites:
                raise KeyError(f"no calibration statistics for tensor {name!r}")
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
            "tensors": None if self.tensors is None else list(self.tensors),
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
            tensors=meta.get("tensors"),  # files written before subsets: the whole model
        )  # fmt: skip
        if lm is not None:
            calib.check_model(lm)
        return calib

    def check_model(self, lm, *, tensors=None) -> None:
        """Raise :class:`CalibrationError` unless this calibration covers ``lm``'s tensors.

        ``tensors``: only these quantizable tensors of ``lm`` must be covered (a calibration
        of a subset, ``calibrate(..., tensors=...)``); default every quantizable tensor, and
        then the calibration must hold exactly ``lm``'s.
        """
        specs = {s.name: s for s in lm.quantizable}
        names = list(specs) if tensors is None else list(tensors)
        unknown = sorted(set(names) - set(specs))
        if unknown:
            raise CalibrationError(
                f"{len(unknown)} of the {len(names)} tensors to check are not quantizable "
                f"tensors of {lm.name!r} (first {unknown[:3]})")
        if self.tensors is not None:
            lacking = sorted(set(names) - set(self.tensors))
            if lacking:
                raise CalibrationError(
                    f"calibration of {self.model!r} measured {len(self.tensors)} tensors, "
                    f"{len(lacking)} of the {len(names)} of {lm.name!r} asked for are not "
                    f"among them (first {lacking[:3]})")
        want = {n: site_of(specs[n]) for n in names if specs[n].role != "token_embd"}
        got = (dict(self.tensor_site) if tensors is None
               else {n: self.tensor_site.get(n) for n in want})
        if want != got:
            diff = sorted(set(want.items()) ^ set(got.items()), key=str)[:3]
            raise CalibrationError(
                f"calibration of {self.model!r} does not match model {lm.name!r} "
                f"({len(got)} vs {len(want)} tensors; first differences {diff})"
            )
        for name, site in want.items():
            if self.sites[site].d != specs[name].row_length:
                raise CalibrationError(
                    f"calibration site {site} has {self.sites[site].d} channels, tensor "
                    f"{name!r} has rows of {specs[name].row_length}"
                )


# ---------------------------------------------------------------------- pass
#: Row strip of the symmetric ``x^T x`` (only the upper triangle is multiplied).
_H_STRIP = 128


class _SiteAcc:
    """float64 running sums of one input site.

    ``strips`` hold ``sum x^T x`` in its upper triangle only, row strip ``k`` being rows
    ``k*S .. k*S+S`` from column ``k*S`` on (``S`` = :data:`_H_STRIP`): about 0.6 of the full
    product's work and ``d^2 / 2`` float64s instead of ``d^2``; :meth:`finish` mirrors it.
    """

    def __init__(self, d: int):
        import torch

        z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        self.n, self.sq, self.ab, self.x4 = 0, z(d), z(d), z(d)
        self.strips = [z(min(_H_STRIP, d - i), d - i) for i in range(0, d, _H_STRIP)]
        self.mx = torch.zeros(d, dtype=torch.float32)

    @staticmethod
    def nbytes(d: int) -> int:
        """Bytes of the accumulators of a ``d``-channel site."""
        return 8 * (4 * d + sum(min(_H_STRIP, d - i) * (d - i) for i in range(0, d, _H_STRIP)))

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
        for k, i in enumerate(range(0, x.shape[1], _H_STRIP)):
            self.strips[k] += x[:, i : i + _H_STRIP].T @ x[:, i:]
        self.n += x.shape[0]

    def merge(self, other: _SiteAcc) -> None:
        """Add the sums of ``other`` (another worker's windows)."""
        import torch

        self.n += other.n
        for k in ("sq", "ab", "x4"):
            getattr(self, k).add_(getattr(other, k))
        for a, b in zip(self.strips, other.strips):
            a.add_(b)
        torch.maximum(self.mx, other.mx, out=self.mx)

    def finish(self) -> SiteStats:
        """The site's statistics; the accumulators are released (the strips one by one)."""
        import torch

        n, d = self.n, self.sq.shape[0]
        h = torch.empty(d, d, dtype=torch.float32)
        for k, i in enumerate(range(0, d, _H_STRIP)):
            strip = self.strips[k] / n
            self.strips[k] = None
            w = strip.shape[0]
            b = strip[:, :w]  # diagonal block: (B + B^T) / 2; the rest mirrored below it
            h[i : i + w, i : i + w] = (b + b.T) * 0.5
            h[i : i + w, i + w :] = strip[:, w:]
            h[i + w :, i : i + w] = strip[:, w:].T
        self.strips = []
        return SiteStats(n=n, sq_mean=(self.sq / n).numpy(), abs_mean=(self.ab / n).numpy(),
                         abs_max=self.mx.double().numpy(), x4_mean=(self.x4 / n).numpy(),
                         h=h.numpy())


class _Worker:
    """What one calibration shard accumulates over its windows (merged in shard order).

    ``accs``: a fresh accumulator per input site (``site_d``: site -> channels), created
    here, outside inference mode, so that every thread and mode may update it in place.
    """

    def __init__(self, site_d: Mapping[str, int]):
        self.accs = {site: _SiteAcc(d) for site, d in site_d.items()}
        self.seen: dict[str, Any] = {}  # site -> the input tensor already measured this window
        self.gain_sum: dict[str, Any] = {}
        self.head_gain = None
        self.fisher_tokens = 0
        self.windows = 0

    def merge_gains(self, other: _Worker) -> None:
        for k, g in other.gain_sum.items():
            self.gain_sum[k] = self.gain_sum[k] + g if k in self.gain_sum else g
        if other.head_gain is not None:
            self.head_gain = (other.head_gain if self.head_gain is None
                              else self.head_gain + other.head_gain)
        self.fisher_tokens += other.fisher_tokens


def _assign(n_windows: int, n_fisher: int, workers: int) -> list[list[int]]:
    """Windows per worker, balanced by cost (a Fisher window ~3 plain ones); deterministic."""
    load, out = [0] * workers, [[] for _ in range(workers)]
    for i in range(n_windows):
        k = min(range(workers), key=lambda j: (load[j], j))
        out[k].append(i)
        load[k] += 3 if i < n_fisher else 1
    return [o for o in out if o]


def accumulator_bytes(d: int) -> int:
    """Bytes one calibration worker's float64 sums of a ``d``-channel input site take."""
    return _SiteAcc.nbytes(int(d))


#: Memory the per-worker H accumulators may take before calibration uses fewer threads.
PARALLEL_BYTES = 4 << 30


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


@dataclass(frozen=True)
class _PassContext:
    """What every calibration worker needs besides the model (picklable: a remote runner
    ships it to its workers once)."""

    windows: np.ndarray
    n_fisher: int
    #: the uniforms of y_hat ~ p per Fisher window, drawn in window order from the seed
    uniforms: tuple
    site_d: Mapping[str, int]
    #: the tensors measured (hooks on their modules only): tensor -> input site
    tensor_site: Mapping[str, str]
    #: Fisher windows of one worker process running at once (0: no bound)
    fisher_threads: int
    #: called once per finished window (a local progress bar; None for a remote runner)
    progress: Any = None
    #: the decoder block after which a window's forward pass stops (None: the whole pass)
    stop_block: int | None = None


class _CalibrationTask(StageTask):
    """One worker of the calibration pass: hooks on the model's linear layers and its
    embedding, feeding the :class:`_Worker` of the thread running a window; an item is a
    shard (a list of window indices), its result that shard's :class:`_Worker`."""

    def __init__(self, lm, context: _PassContext):
        import threading

        super().__init__(lm, context)
        lm.restore()
        self.local = threading.local()  # .state: the _Worker of the thread running a window
        gate = context.fisher_threads
        self.fisher_gate = threading.BoundedSemaphore(gate) if gate else contextlib.nullcontext()
        self.handles: list = []
        model = lm.model
        emb = model.get_input_embeddings()
        try:
            for s in lm.quantizable:
                if s.role in ("token_embd", "output") or s.name not in context.tensor_site:
                    continue
                mod = model.get_submodule(s.hf_name.removesuffix(".weight"))
                self.handles.append(mod.register_forward_pre_hook(
                    self._pre_hook(context.tensor_site[s.name], s.name)))
                self.handles.append(mod.register_forward_hook(self._out_hook(s.name)))
            self.handles.append(emb.register_forward_hook(self._emb_hook))
            if context.stop_block is not None:
                layer = _decoder_layers(model)[context.stop_block]
                self.handles.append(layer.register_forward_hook(self._stop_hook))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    @staticmethod
    def _stop_hook(module, args, out):
        raise _StopForward

    def _pre_hook(self, site: str, name: str):
        def hook(module, args):
            x, st = args[0], self.local.state
            prev = st.seen.get(site)
            if prev is None:
                st.seen[site] = x
                st.accs[site].add(x)
            elif prev is not x:
                raise CalibrationError(
                    f"tensor {name!r} does not read the same input as the other tensors of "
                    f"site {site}; this architecture needs its own site grouping"
                )
        return hook

    @staticmethod
    def _grad_acc(st: _Worker, key: str):  # bound at forward time: backward may run elsewhere
        def hook(g):
            s = g.detach().reshape(-1, g.shape[-1]).square().sum(0).double()
            st.gain_sum[key] = st.gain_sum[key] + s if key in st.gain_sum else s
        return hook

    def _out_hook(self, name: str):
        def hook(module, args, out):
            if out.requires_grad:
                out.register_hook(self._grad_acc(self.local.state, name))
        return hook

    def _emb_hook(self, module, args, out):
        import torch

        if torch.is_grad_enabled():
            out = out.detach().requires_grad_(True)
            out.register_hook(self._grad_acc(self.local.state, "token_embd.weight"))
            return out
        return None

    def _run(self, st: _Worker, i: int) -> None:
        import torch

        ctx, model = self.context, self.lm.model
        ids = torch.from_numpy(ctx.windows[i : i + 1])
        st.seen.clear()
        if i < ctx.n_fisher:
            with self.fisher_gate, torch.enable_grad():
                hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
                if HEAD_SITE in st.accs:
                    st.accs[HEAD_SITE].add(hidden)
                logits, dcap = _head_logits(model, hidden)
                logp = torch.log_softmax(logits[0], dim=-1)
                del logits  # (vocab x ctx) buffers are the bulk of a window's memory
                with torch.no_grad():
                    p = logp.exp()
                    hg = p - p.square()
                    if dcap is not None:
                        hg.mul_(dcap[0].square())
                    hg = hg.sum(0).double()
                    st.head_gain = hg if st.head_gain is None else st.head_gain + hg
                    # inverse-CDF sampling of y_hat ~ p (torch.multinomial is ~20x slower)
                    cdf = p.cumsum(-1)
                    y = torch.searchsorted(cdf, ctx.uniforms[i] * cdf[:, -1:])
                    y = y.clamp_max_(p.shape[-1] - 1)
                    del p, hg, cdf, dcap
                loss = logp.gather(1, y).sum()
                loss.backward()
            st.fisher_tokens += ids.numel()
        else:
            with torch.inference_mode():
                try:
                    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
                except _StopForward:  # the blocks measured are done (context.stop_block)
                    hidden = None
                if hidden is not None and HEAD_SITE in st.accs:
                    st.accs[HEAD_SITE].add(hidden)
        st.seen.clear()
        st.windows += 1
        if ctx.progress is not None:
            ctx.progress()

    def __call__(self, shard: list[int]) -> _Worker:
        self.local.state = st = _Worker(self.context.site_d)
        try:
            for i in shard:
                self._run(st, i)
        finally:
            del self.local.state
        return st


def _decoder_layers(model):
    """The decoder blocks of a causal LM (llama, qwen2, gemma3: ``model.model.layers``)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise CalibrationError(f"{type(model).__name__} has no model.layers; a calibration "
                               f"of some tensors cannot stop after their last block")
    return layers


def _subset(lm, tensors) -> frozenset[str] | None:
    """``tensors`` checked against ``lm``'s quantizable tensors (None: all of them)."""
    if tensors is None:
        return None
    if isinstance(tensors, str):
        raise CalibrationError(f"tensors must be a collection of tensor names, got the string "
                               f"{tensors!r}")
    names = frozenset(tensors)
    known = {s.name for s in lm.quantizable}
    unknown = sorted(names - known)
    if not names or unknown:
        raise CalibrationError(
            f"tensors must name quantizable tensors of {lm.name!r}: {len(unknown)} of the "
            f"{len(names)} named are not among its {len(known)} (first {unknown[:3]})")
    return names


def calibrate(
    lm, windows: np.ndarray, *, fisher_windows: int = 4, seed: int = 0, progress: bool = True,
    workers: int | None = None, fisher_threads: int | None = None, runner=None,
    tensors=None,
) -> Calibration:
    """Run the calibration pass of ``lm`` over ``windows`` (int token array ``(n, ctx)``).

    The first ``min(fisher_windows, n)`` windows also run backward for the output Fisher
    (0 disables it; the proxy is then unweighted).  Windows are cut into ``workers`` shards
    (default: the runner's workers, else the CPU count; fewer when their accumulators would
    exceed :data:`PARALLEL_BYTES`), balanced by cost, each with its own accumulators, merged
    in shard order.  ``runner`` (a :class:`~autobits.stages.StageRunner`) runs the shards:
    default a :class:`~autobits.stages.LocalRunner`, one thread per shard with torch's
    thread count 1 meanwhile (one window per core beats splitting every small op over the
    cores, above all on a shared machine); a Ray runner gives bit-identical statistics for
    the same shards, whatever its worker count.  Memory is the model, per shard the per-site
    accumulators (about ``sum d_in^2 / 2`` float64: the upper triangles of the second
    moments, a site's freed as soon as its statistics are finished) and one window's
    activations (and their gradients); the result holds every site's finished ``H``
    (``4 d_in^2`` bytes of float32 each).
    ``fisher_threads`` bounds how many Fisher windows (a forward pass that keeps every
    block's activations for the backward one, the largest buffers of the pass) one process
    runs at once (default: as many as :data:`~autobits.memory.FISHER_PARALLEL_BYTES` allows,
    :func:`~autobits.memory.fisher_concurrency`); the others' threads wait, so the results
    do not change, only the time and the memory.
    Deterministic for a given ``seed`` and shard count (one local shard: and torch thread
    count).

    ``tensors`` (quantizable tensor names; default all): measure only the input sites these
    tensors read (hooks on their modules only; the head site :data:`HEAD_SITE` only when the
    head, ``output.weight`` or a tied ``token_embd.weight``, is among them); token counts
    are always of every window.  The accumulators and finished ``H`` are then those of
    these sites only.  Without Fisher windows and without the head site, each window's
    forward pass stops after the last decoder block holding one of them (blocks ``0..b``
    of ``n``: about ``(b+1)/n`` of a pass's forward work); with Fisher windows the whole pass runs (the gains are those
    of the tensors named; the head's Fisher is always measured).  Every site's statistics
    are bit-identical to the whole model's calibration with the same windows, seed and
    shards; the shard count is ``min(workers, windows, PARALLEL_BYTES // accumulators)``,
    and a subset's accumulators are smaller, so give ``workers`` where the whole model's
    would exceed :data:`PARALLEL_BYTES`.
    """
    import torch
    from tqdm.auto import tqdm

    from autobits.stages import LocalRunner

    w = _check_windows(lm, windows)
    if isinstance(fisher_windows, bool) or not isinstance(fisher_windows, (int, np.integer)) \
            or fisher_windows < 0:
        raise CalibrationError(
            f"fisher_windows must be a non-negative count, got {fisher_windows!r}")
    n_fisher = min(int(fisher_windows), w.shape[0])
    if fisher_threads is not None and int(fisher_threads) < 1:
        raise CalibrationError(f"fisher_threads must be >= 1, got {fisher_threads!r}")
    subset = _subset(lm, tensors)
    t0 = time.perf_counter()
    lm.restore()
    model = lm.model
    specs = [s for s in lm.quantizable]
    tied = not any(s.role == "output" for s in specs)
    chosen = specs if subset is None else [s for s in specs if s.name in subset]
    tensor_site = {s.name: site_of(s) for s in chosen if s.role != "token_embd"}
    linear = [s for s in chosen if s.role not in ("token_embd", "output")]
    emb = model.get_input_embeddings()
    site_d = {tensor_site[s.name]: s.row_length for s in linear}
    head = subset is None or any(
        s.role == "output" or (tied and s.role == "token_embd") for s in chosen)
    if head:
        site_d[HEAD_SITE] = int(emb.weight.shape[1])
    stop_block = None
    if subset is not None and not head and n_fisher == 0:
        # nothing measured past the last block holding a tensor (none: not even block 0)
        stop_block = max((s.block for s in linear), default=0)
    acc_bytes = max(1, sum(_SiteAcc.nbytes(d) for d in site_d.values()))
    wanted = workers or (runner.workers if runner is not None else None) or os.cpu_count() or 1
    n_workers = max(1, min(int(wanted), w.shape[0], max(1, PARALLEL_BYTES // acc_bytes)))
    embed_scale = float(getattr(emb, "embed_scale", 1.0))
    plan = _assign(w.shape[0], n_fisher, n_workers)
    runner = runner if runner is not None else LocalRunner(len(plan))
    gen = torch.Generator().manual_seed(int(seed))
    if fisher_threads is None:
        from autobits.memory import fisher_concurrency, fisher_window_bytes

        window = fisher_window_bytes(vocab=int(emb.weight.shape[0]),
                                     hidden=int(emb.weight.shape[1]),
                                     n_blocks=len(_decoder_layers(model)), ctx=w.shape[1])
        gate_n = fisher_concurrency(window, len(plan))
    else:
        gate_n = int(fisher_threads)
    bar = tqdm(total=w.shape[0], desc="calibration", unit="window", disable=not progress)
    local = runner.shares_memory
    context = _PassContext(
        windows=w, n_fisher=n_fisher,
        uniforms=tuple(torch.rand(w.shape[1], 1, generator=gen) for _ in range(n_fisher)),
        site_d=site_d, tensor_site=tensor_site,
        # one shard per thread: the gate matters only when Fisher windows could overlap
        fisher_threads=gate_n if local and gate_n and gate_n < len(plan) else 0,
        progress=bar.update if local else None, stop_block=stop_block)
    try:
        done = list(runner.map(_CalibrationTask, plan, lm=lm, context=context,
                               name="calibration",
                               on_result=None if local else (lambda st: bar.update(st.windows))))
    finally:
        bar.close()
    missing = sorted(k for k in site_d if not any(st.accs[k].n for st in done))
    if missing:
        raise CalibrationError(f"the forward pass never reached input sites {missing[:5]}")

    def reduce(site: str) -> SiteStats:
        acc = done[0].accs.pop(site)
        for st in done[1:]:
            acc.merge(st.accs.pop(site))  # each worker's sums freed once merged
        return acc.finish()

    # as the windows: one site per core, torch's threads 1 (finish is memory-bound)
    sites = dict(zip(site_d, thread_map(reduce, list(site_d), len(plan), "calibration")))
    total = done[0]
    for st in done[1:]:
        total.merge_gains(st)
    fisher_tokens = total.fisher_tokens
    gains = ({k: (v / fisher_tokens).numpy() for k, v in total.gain_sum.items()
              if subset is None or k in subset} if fisher_tokens else {})
    head_gain = None if total.head_gain is None else (total.head_gain / fisher_tokens).numpy()
    vocab = int(emb.weight.shape[0])
    calib = Calibration(
        model=lm.name, ctx=int(w.shape[1]), n_windows=int(w.shape[0]), sites=sites,
        tensor_site=tensor_site, token_counts=np.bincount(w.ravel(), minlength=vocab),
        tied=tied, gains=gains, head_gain=head_gain, fisher_tokens=fisher_tokens,
        embed_scale=embed_scale, seed=int(seed), seconds=time.perf_counter() - t0,
        tensors=None if subset is None else tuple(s.name for s in chosen),
    )  # fmt: skip
    log.info("calibration of %s: %d windows x %d tokens (%d with Fisher), %d input sites%s, "
             "%d shards on %d %s workers, %.1fs", lm.name, w.shape[0], w.shape[1], n_fisher,
             len(sites), "" if subset is None else
             f" of {len(chosen)} tensors" + ("" if stop_block is None
                                             else f" (stopping after block {stop_block})"),
             len(plan), min(runner.workers, len(plan)),
             "local" if local else "remote", calib.seconds)
    return calib
